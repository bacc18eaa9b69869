"""The synthetic training tasks as text concept tasks, registered beside ``pos`` and ``bitwise``.

Both families have a numeric generator used for training (:mod:`conceptprobe.tasks.synthetic_data`) and a text
rendering here, so pretrained models can be probed on the same concepts through the usual pipeline
(``conceptprobe run --task sparse_regression``) and ``conceptprobe tasks`` lists them.

- ``sparse_regression``: the concept is a basis (which coordinates of ``x`` matter). The k-shot text
  pipeline samples every demonstration independently, so a per-sequence weight vector ``w`` cannot be
  shared across a prompt; the text rendering therefore fixes ``w = 1``: input ``dim`` digits, answer the
  sum of the digits on the concept's coordinates (exact). Training uses the full mixture, with ``w``
  drawn per sequence (:class:`~conceptprobe.tasks.synthetic_data.RegressionSpec`). ``null``: the sum of
  ``rank`` random coordinates.
- ``repeated_segments``: ``copy``: the input is random letters in which a segment of distinct letters
  recurs, cut off inside the second copy; the answer is the letter that followed the current letter in
  the first copy (exact: the cue letter occurs once before). ``null``: a random letter.
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np

from conceptprobe.tasks.base import NULL_CONCEPT, ConceptTask, Example
from conceptprobe.tasks.registry import register_task
from conceptprobe.tasks.synthetic_data import RegressionSpec

#: Most digits in a sparse_regression input (``dim`` sets the prompt length).
MAX_DIM = 256


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"`{name}` must be an integer >= {lo}; got {str(value)[:40]!r}")
    if hi is not None and value > hi:
        raise ValueError(f"`{name}` must be at most {hi} (it sets the prompt length); got {str(value)[:40]}")
    return int(value)


@register_task("sparse_regression")
class SparseRegressionTask(ConceptTask):
    """Sum of the digits on a concept's coordinates. Params: ``dim``, ``n_bases``, ``rank``, ``overlap``."""

    version = "1"
    concepts = ("basis0", "basis1", "basis2", "basis3", NULL_CONCEPT)
    description = (
        "Mixture of sparse linear regressions (the concept is the basis); as text: `dim` digits, answer the "
        "sum of the digits on the basis's coordinates (w = 1). Trained numerically by `conceptprobe train`."
    )

    def __init__(
        self, dim: int = 16, n_bases: int = 4, rank: int = 4, overlap: int = 0, **unknown: Any
    ) -> None:
        if unknown:
            raise ValueError(
                f"task 'sparse_regression' got unknown parameter(s) {sorted(unknown)}; "
                "its parameters are dim, n_bases, rank, overlap"
            )
        dim, n_bases = _check_int("dim", dim, 1, MAX_DIM), _check_int("n_bases", n_bases, 1, MAX_DIM)
        rank, overlap = _check_int("rank", rank, 1, MAX_DIM), _check_int("overlap", overlap, 0, MAX_DIM)
        self.spec = RegressionSpec(dim=dim, n_bases=n_bases, rank=rank, overlap=overlap)  # validates
        super().__init__(dim=dim, n_bases=n_bases, rank=rank, overlap=overlap)
        self.concepts = (*self.spec.concepts, NULL_CONCEPT)  # type: ignore[misc]

    def sample(self, concept: str, rng: np.random.Generator) -> Example:
        """``dim`` random digits; the answer sums those on the concept's coordinates."""
        self.check_concept(concept)
        x = rng.integers(0, 10, size=self.spec.dim)
        if concept == NULL_CONCEPT:
            coords = rng.choice(self.spec.dim, size=self.spec.rank, replace=False)
        else:
            coords = self.spec.directions(int(concept.removeprefix("basis")))
        return Example(" ".join(str(int(v)) for v in x), str(int(x[coords].sum())))


@register_task("repeated_segments")
class RepeatedSegmentsTask(ConceptTask):
    """Continue a repeated segment of letters. Params: ``segment_min``, ``segment_max``, ``filler_max``."""

    version = "1"
    concepts = ("copy", NULL_CONCEPT)
    description = (
        "Random letters in which a segment recurs, cut inside the second copy; copy: the letter that "
        "followed the current one in the first copy (induction); null: a random letter."
    )
    LETTERS = string.ascii_lowercase

    def __init__(
        self, segment_min: int = 3, segment_max: int = 8, filler_max: int = 6, **unknown: Any
    ) -> None:
        if unknown:
            raise ValueError(
                f"task 'repeated_segments' got unknown parameter(s) {sorted(unknown)}; "
                "its parameters are segment_min, segment_max, filler_max"
            )
        lo, hi = _check_int("segment_min", segment_min, 2), _check_int("segment_max", segment_max, 2)
        filler = _check_int("filler_max", filler_max, 0)
        if lo > hi or hi + filler > len(self.LETTERS):
            raise ValueError("need 2 <= segment_min <= segment_max and segment_max + filler_max <= 26")
        super().__init__(segment_min=lo, segment_max=hi, filler_max=filler)
        self.lo, self.hi, self.filler = lo, hi, filler

    def sample(self, concept: str, rng: np.random.Generator) -> Example:
        """Filler, segment, filler, the segment's first ``j`` letters; the answer is letter ``j``."""
        self.check_concept(concept)
        length = int(rng.integers(self.lo, self.hi + 1))
        letters = list(rng.permutation(list(self.LETTERS)))
        segment, rest = letters[:length], letters[length:]
        before = rest[: int(rng.integers(0, self.filler + 1))]
        between = list(rng.choice(rest, size=int(rng.integers(0, self.filler + 1))))
        j = int(rng.integers(1, length))  # at least one letter of the copy, at least one left to predict
        text = before + segment + between + segment[:j]
        answer = str(rng.choice(list(self.LETTERS))) if concept == NULL_CONCEPT else segment[j]
        return Example(" ".join(text), answer)
