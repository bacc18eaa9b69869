"""``first-last`` and ``first-last-treebank``: concepts that share an answer class (first vs last noun or verb).

Concepts ``first_noun``, ``last_noun``, ``first_verb``, ``last_verb`` and ``null``. Within each pair
(``pairs``) both answers are words of the same part of speech drawn from the same sentences, so a lexical
reader of the answers (their most frequent tag) cannot tell the pair apart: only the relation between the
answer and the input (first or last occurrence) differs.

- ``first-last``: the grammatical sentences of ``pos`` version 2 (:mod:`conceptprobe.tasks.pos_v2`) that hold
  at least two distinct noun words and two distinct verb words, so first and last differ. Words joined by
  single spaces without punctuation; ``null``: a uniformly chosen word of the sentence. The sentence depends
  only on the random stream, not on the concept. No params.
- ``first-last-treebank``: natural treebank sentences whose first and last noun are different words and whose
  first and last verb are different words (case ignored), each a whole word of the text; same parameters,
  pools and ``null`` as ``pos-treebank`` (:class:`~conceptprobe.tasks.treebank.TreebankTask`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from conceptprobe.tasks import pos_v2
from conceptprobe.tasks.base import NULL_CONCEPT, ConceptTask, Example
from conceptprobe.tasks.lexical import pos_histogram
from conceptprobe.tasks.registry import register_task
from conceptprobe.tasks.treebank import TreebankTask

FIRST_LAST_CONCEPTS: tuple[str, ...] = ("first_noun", "last_noun", "first_verb", "last_verb")
FIRST_LAST_PAIRS: tuple[tuple[str, str], ...] = (("first_noun", "last_noun"), ("first_verb", "last_verb"))
_TAG = {"first_noun": "noun", "last_noun": "noun", "first_verb": "verb", "last_verb": "verb"}
MAX_TRIES = 1000


def first_last_answers(words: Sequence[str], tags: Sequence[str | None]) -> dict[str, str] | None:
    """First and last noun and verb of a tagged sentence; None unless first != last for both (case ignored)."""
    answers: dict[str, str] = {}
    for tag in ("noun", "verb"):
        found = [w for w, t in zip(words, tags, strict=True) if t == tag]
        if len(found) < 2 or found[0].lower() == found[-1].lower():
            return None
        answers[f"first_{tag}"], answers[f"last_{tag}"] = found[0], found[-1]
    return answers


@register_task("first-last")
class FirstLastTask(ConceptTask):
    """First or last noun or verb of a generated sentence (pos version 2 sentences with two of each). No params."""

    version = "1"
    concepts = (*FIRST_LAST_CONCEPTS, NULL_CONCEPT)
    pairs = FIRST_LAST_PAIRS
    description = (
        "First / last noun and first / last verb of a grammatical lowercase sentence (pos v2) with two nouns "
        "and two verbs; pairs share the answer class; null: a uniformly chosen word."
    )

    def __init__(self, **params: Any) -> None:
        if params:
            raise ValueError(
                f"task 'first-last' takes no parameters, got {sorted(params)}; remove them "
                "(`first-last-treebank` takes a treebank)"
            )
        super().__init__()

    @staticmethod
    def sample_tagged(rng: np.random.Generator) -> list[tuple[str, str | None]]:
        """A pos v2 sentence with two distinct nouns and two distinct verbs, as ``(word, tag)`` pairs."""
        for _ in range(MAX_TRIES):
            tagged = pos_v2.sample_tagged(rng)
            if first_last_answers([w for w, _ in tagged], [t for _, t in tagged]) is not None:
                return tagged
        raise RuntimeError(f"no pos v2 sentence with two nouns and two verbs in {MAX_TRIES} draws")

    def sample(self, concept: str, rng: np.random.Generator) -> Example:
        """A sentence and its first/last noun/verb (or, for null, a uniformly chosen word)."""
        self.check_concept(concept)
        tagged = self.sample_tagged(rng)
        words = [w for w, _ in tagged]
        if concept == NULL_CONCEPT:
            answer = words[int(rng.integers(len(words)))]
        else:
            answers = first_last_answers(words, [t for _, t in tagged])
            assert answers is not None
            answer = answers[concept]
        return Example(input=" ".join(words), answer=answer)

    def lexical_features(self, answers: Sequence[str]) -> dict[str, float]:
        """Histogram of the answers' most frequent part of speech in the pos v2 lexicon (else "other")."""
        return pos_histogram(answers, pos_v2.MOST_FREQUENT_TAG)


@register_task("first-last-treebank")
class FirstLastTreebankTask(TreebankTask):
    """First or last noun or verb of a treebank sentence. Params: those of ``pos-treebank``."""

    version = "1"
    concepts = (*FIRST_LAST_CONCEPTS, NULL_CONCEPT)
    pairs = FIRST_LAST_PAIRS
    description = (
        "First / last noun and first / last verb of a natural treebank sentence (param `treebank`) whose first "
        "and last differ; pairs share the answer class; disjoint demo/query pools; null: a random word."
    )
    keep_rule = "sentences whose first and last noun, and first and last verb, are different whole words"

    def answers_of(
        self, forms: Sequence[str], classes: Sequence[str], whole: Sequence[bool]
    ) -> dict[str, str] | None:
        """First and last noun and verb; None unless they differ and each is a whole word of the text."""
        answers = first_last_answers(forms, classes)
        if answers is None:
            return None
        for concept in FIRST_LAST_CONCEPTS:
            tag = _TAG[concept]
            indices = [i for i, c in enumerate(classes) if c == tag]
            i = indices[0] if concept.startswith("first") else indices[-1]
            if not whole[i]:
                return None
        return answers
