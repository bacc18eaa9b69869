"""The paper's part-of-speech task: the answer is the FIRST word of a given part of speech in a sentence.

Sentences are built from templates of tagged slots filled from the curated lexicon in
:mod:`conceptprobe.tasks.pos_lexicon`, so every answer is exact by construction. Format of an input:
lowercase words joined by single spaces, no punctuation (e.g. ``"she quickly ate the tiny apple beneath
the tiger"``), so an answer always equals one whitespace-separated token of the input exactly.

- Every sentence contains all six parts of speech at least once, plus determiners ("the", "a"/"an")
  and sometimes "and", which are never answers of a part-of-speech concept.
- Templates vary the word order (pronoun first, adverb first, prepositional phrase first, noun phrase
  first, ...) so the first word of a tag is not always at the same index, and several contain two words
  of one tag (two adjectives, adverbs, verbs, nouns, prepositions or pronouns), so "first" matters.
- No word appears twice in a sentence (determiners aside).
- ``null``: a word of the sentence chosen uniformly over its tokens (determiners included).

The sentence depends only on the random stream, not on the concept: the same seed gives the same input
under every concept (``null`` then draws one more number to pick its word).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from conceptprobe.tasks.base import NULL_CONCEPT, ConceptTask, Example
from conceptprobe.tasks.pos_lexicon import (
    ADJECTIVES,
    ADVERBS,
    NOUNS,
    OBJECT_PRONOUNS,
    PREPOSITIONS,
    SUBJECT_PRONOUNS,
    VERBS,
)
from conceptprobe.tasks.registry import register_task

# Slot code -> (part-of-speech tag or None for function words, word pool).
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
"""Sentence templates as slot codes (keys of the slot table)."""

POS_CONCEPTS: tuple[str, ...] = ("noun", "verb", "adjective", "adverb", "preposition", "pronoun")


@register_task("pos")
class PosTask(ConceptTask):
    """First word of a part of speech in a generated sentence (Han et al. 2024's POS task). No params."""

    version = "1"
    concepts = (*POS_CONCEPTS, NULL_CONCEPT)
    description = (
        "First noun / verb / adjective / adverb / preposition / pronoun of a lowercase sentence without "
        "punctuation; null: a uniformly chosen word of the sentence."
    )

    def __init__(self, **params: Any) -> None:
        if params:
            raise ValueError(
                f"task 'pos' takes no parameters, got {sorted(params)}; remove them (e.g. `get_task('pos')`)"
            )
        super().__init__()

    @staticmethod
    def sample_tagged(rng: np.random.Generator) -> list[tuple[str, str | None]]:
        """One sentence as ``(word, tag)`` pairs; ``tag`` is a POS concept, or None for a function word."""
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
