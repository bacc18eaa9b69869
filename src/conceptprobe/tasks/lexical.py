"""Context-free lexical readers shared by the part-of-speech tasks (the surface baseline's features)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

POS_TAGS: tuple[str, ...] = ("noun", "verb", "adjective", "adverb", "preposition", "pronoun")
"""The six parts of speech (the concept names of the part-of-speech tasks)."""

HISTOGRAM_KEYS: tuple[str, ...] = (*POS_TAGS, "other")


def pos_histogram(answers: Sequence[str], most_frequent_tag: Mapping[str, str]) -> dict[str, float]:
    """Normalised histogram of the answers' most frequent tags (keys: the six tags and ``"other"``).

    ``most_frequent_tag`` maps a word to its most frequent tag in a lexicon, never to its tag in context. A
    word missing from it, or whose most frequent tag is none of the six, counts as ``"other"``. No answers
    (a 0-shot prompt) give all zeros.
    """
    out = dict.fromkeys(HISTOGRAM_KEYS, 0.0)
    for answer in answers:
        tag = most_frequent_tag.get(answer, "other")
        out[tag if tag in out else "other"] += 1.0
    if answers:
        out = {k: v / len(answers) for k, v in out.items()}
    return out
