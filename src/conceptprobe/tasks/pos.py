"""The paper's part-of-speech task: the answer is the FIRST word of a given part of speech in a sentence.

Two versions, chosen by the ``version`` parameter (1 or 2; default 2):

- **2** (default, :mod:`conceptprobe.tasks.pos_v2`): grammatical English templates in which most words
  belong to two or more parts of speech and are tagged by the slot they fill ("watch" is a noun in "the
  watch" and a verb in "they will watch"), so the concept is not the lexical class of the answers.
- **1**: the original generator, kept exactly (same prompts for the same seed). Sentences are built from
  templates of tagged slots filled from the disjoint word lists of :mod:`conceptprobe.tasks.pos_lexicon`.

Both versions: lowercase words joined by single spaces, no punctuation, so an answer always equals one
whitespace-separated token of the input exactly; every sentence contains all six parts of speech; some
templates contain two words of one tag, so "first" matters; no content word appears twice in a sentence.
``null``: a word of the sentence chosen uniformly over its tokens (function words included).

The sentence depends only on the random stream, not on the concept: the same seed gives the same input
under every concept (``null`` then draws one more number to pick its word).

Version 1 details: every sentence also contains determiners ("the", "a"/"an") and sometimes "and", which are
never answers of a part-of-speech concept; templates vary the word order (pronoun first, adverb first,
prepositional phrase first, noun phrase first, ...) so the first word of a tag is not always at one index.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from conceptprobe.tasks import pos_v2
from conceptprobe.tasks.base import NULL_CONCEPT, ConceptTask, Example
from conceptprobe.tasks.lexical import pos_histogram
from conceptprobe.tasks.pos_lexicon import (
    ADJECTIVES,
    ADVERBS,
    FUNCTION_WORDS,
    LEXICON,
    NOUNS,
    OBJECT_PRONOUNS,
    PREPOSITIONS,
    SUBJECT_PRONOUNS,
    VERBS,
)
from conceptprobe.tasks.registry import register_task

# Version 1. Slot code -> (part-of-speech tag or None for function words, word pool).
_SLOTS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "NOUN": ("noun", NOUNS),
    "VERB": ("verb", VERBS),
    "ADJ": ("adjective", ADJECTIVES),
    "ADV": ("adverb", ADVERBS),
    "PREP": ("preposition", PREPOSITIONS),
    "PRON_S": ("pronoun", SUBJECT_PRONOUNS),
    "PRON_O": ("pronoun", OBJECT_PRONOUNS),
    "DET": (None, ("the", "a")),  # "a" becomes "an" before a vowel letter
    "AND": (None, ("and",)),
}

TEMPLATES: tuple[tuple[str, ...], ...] = (
    # pronoun first: "she quickly ate the tiny apple beneath the tiger"
    ("PRON_S", "ADV", "VERB", "DET", "ADJ", "NOUN", "PREP", "DET", "NOUN"),
    # adverb first
    ("ADV", "PRON_S", "VERB", "DET", "NOUN", "PREP", "DET", "ADJ", "NOUN"),
    # prepositional phrase first
    ("PREP", "DET", "ADJ", "NOUN", "PRON_S", "VERB", "DET", "NOUN", "ADV"),
    # adjective before the subject noun, object pronoun
    ("DET", "ADJ", "NOUN", "VERB", "PRON_O", "ADV", "PREP", "DET", "NOUN"),
    # two adjectives
    ("DET", "ADJ", "ADJ", "NOUN", "ADV", "VERB", "DET", "NOUN", "PREP", "PRON_O"),
    # noun first, the subject modified by a prepositional phrase
    ("DET", "NOUN", "PREP", "DET", "ADJ", "NOUN", "VERB", "PRON_O", "ADV"),
    # two pronouns
    ("PRON_S", "VERB", "DET", "ADJ", "NOUN", "ADV", "PREP", "PRON_O"),
    # two adverbs
    ("ADV", "AND", "ADV", "PRON_S", "VERB", "DET", "NOUN", "PREP", "DET", "ADJ", "NOUN"),
    # two prepositions, three nouns
    ("DET", "NOUN", "ADV", "VERB", "DET", "ADJ", "NOUN", "PREP", "DET", "NOUN", "PREP", "PRON_O"),
    # two verbs
    ("PRON_S", "VERB", "DET", "NOUN", "AND", "VERB", "DET", "ADJ", "NOUN", "ADV", "PREP", "DET", "NOUN"),
    # verb second, object pronoun, adverb last
    ("PRON_S", "VERB", "PRON_O", "PREP", "DET", "ADJ", "NOUN", "ADV"),
    # preposition and object pronoun first
    ("PREP", "PRON_O", "DET", "ADJ", "NOUN", "ADV", "VERB", "DET", "NOUN"),
)
"""Version 1's sentence templates as slot codes (keys of the slot table); version 2's are in ``pos_v2``."""

POS_CONCEPTS: tuple[str, ...] = ("noun", "verb", "adjective", "adverb", "preposition", "pronoun")


VERSIONS: tuple[str, ...] = ("1", "2")
"""The generator versions of ``pos`` (the ``version`` parameter); the last is the default."""

_V1_TAG: dict[str, str] = {w: tag for tag, words in LEXICON.items() for w in words}
_V1_TAG.update(dict.fromkeys(FUNCTION_WORDS, "other"))


def _parse_version(version: Any) -> str:
    """``1``/``"1"`` -> ``"1"``, ``2``/``"2"`` -> ``"2"``; anything else is a ValueError naming the choices."""
    if isinstance(version, numbers.Integral) and not isinstance(version, bool):
        text = str(int(version))
    elif isinstance(version, str):
        text = version.strip()
    else:
        text = ""
    if text not in VERSIONS:
        raise ValueError(f"task 'pos' `version` must be 1 or 2 (an int or a string), got {version!r}")
    return text


@register_task("pos")
class PosTask(ConceptTask):
    """First word of a part of speech in a generated sentence (Han et al. 2024's POS task).

    Param: ``version`` (1 or 2, default 2; recorded in :attr:`params` only when given). The class attribute
    ``version`` is the default; an instance's own (``task.version``, ``info()["version"]``) is the one used.
    """

    version = VERSIONS[-1]
    concepts = (*POS_CONCEPTS, NULL_CONCEPT)
    description = (
        "First noun / verb / adjective / adverb / preposition / pronoun of a lowercase sentence without "
        "punctuation (version 2, the default: words whose part of speech depends on their slot); null: a "
        "uniformly chosen word of the sentence."
    )

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - {"version"})
        if unknown:
            raise ValueError(
                f"task 'pos' got unknown parameter(s) {unknown}; its only parameter is `version` "
                f"({' or '.join(VERSIONS)})"
            )
        if "version" in params:
            version = _parse_version(params["version"])
            super().__init__(version=int(version))
            self.version = version  # type: ignore[misc]
        else:
            super().__init__()

    def sample_tagged(self, rng: np.random.Generator) -> list[tuple[str, str | None]]:
        """One sentence as ``(word, tag)`` pairs; ``tag`` is a POS concept, or None for a function word."""
        if self.version == "1":
            return _sample_tagged_v1(rng)
        return pos_v2.sample_tagged(rng)

    def lexical_features(self, answers: Sequence[str]) -> dict[str, float]:
        """Histogram of the answers' most frequent tags in this version's lexicon (``"other"``: unknown)."""
        table = _V1_TAG if self.version == "1" else pos_v2.MOST_FREQUENT_TAG
        return pos_histogram(answers, table)

    def sample(self, concept: str, rng: np.random.Generator) -> Example:
        """A sentence and the first word tagged ``concept`` (or, for null, a uniformly chosen word)."""
        self.check_concept(concept)
        tagged = self.sample_tagged(rng)
        words = [w for w, _ in tagged]
        if concept == NULL_CONCEPT:
            answer = words[int(rng.integers(len(words)))]
        else:
            answer = next(w for w, tag in tagged if tag == concept)
        return Example(input=" ".join(words), answer=answer)


def _sample_tagged_v1(rng: np.random.Generator) -> list[tuple[str, str | None]]:
    """Version 1: one sentence as ``(word, tag)`` pairs (the original generator, unchanged)."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    used: set[str] = set()
    tagged: list[tuple[str, str | None]] = []
    for slot in template:
        tag, pool = _SLOTS[slot]
        if tag is None:
            word = pool[int(rng.integers(len(pool)))]
        else:
            choices = [w for w in pool if w not in used]
            word = choices[int(rng.integers(len(choices)))]
            used.add(word)
        tagged.append((word, tag))
    # Fix the indefinite article now that the following word is known.
    for i, (word, tag) in enumerate(tagged[:-1]):
        if word == "a" and tagged[i + 1][0][0] in "aeiou":
            tagged[i] = ("an", tag)
    return tagged
