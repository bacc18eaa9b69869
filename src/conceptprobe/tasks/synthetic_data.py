"""Synthetic training data: a mixture of sparse linear regressions, and token sequences with repeated segments.

**Mixture of sparse linear regressions** (Han et al. 2024, training-dynamics experiment). A concept is an
orthonormal basis ``B_z`` of ``rank`` directions in ``R^dim``; concepts are mutually orthogonal when
``overlap = 0`` (concept ``z`` uses directions ``z * (rank - overlap) .. z * (rank - overlap) + rank - 1``, so
consecutive concepts share ``overlap`` directions). Directions are the coordinate axes (``basis="sparse"``:
``W`` is sparse, the paper's masking) or the columns of a seeded random rotation (``basis="rotated"``).
A sequence of concept ``z``: ``w ~ N(0, I_rank / rank)`` (``coef="positive"``: ``|w|``, so the
concept shows in first-order statistics ``E[x y]``), ``W = B_z w``, ``K = n_examples`` inputs
``x_i ~ N(0, I_dim)`` and targets ``y_i = W^T x_i + eps``, ``eps ~ N(0, noise_std^2)``, so
``Var y = 1 + noise_std^2`` and predicting 0 has loss 1. ``null``: ``y ~ N(0, 1)`` independent of ``x``.
The model sees ``2K`` tokens of ``dim + 1`` channels, ``x``-tokens ``(x_i, 0)`` and ``y``-tokens
``(0, y_i)`` (Garg et al.'s format; ``y_tokens="xy"``: ``(x_i, y_i)``), and predicts ``y_i`` at the ``x_i`` token (even positions ``0, 2, ..``); the position
right before predicting the last ``y`` is ``2K - 2``.

**Repeated segments** (induction heads, Olsson et al. 2022). Token 0 is BOS, tokens ``1 .. vocab_size - 1``
are content. After BOS a sequence is built chunk by chunk: with probability ``repeat_prob`` (once at least
``segment_min`` tokens exist) a chunk copies an earlier stretch of the sequence of random length in
``[segment_min, segment_max]`` from a random start; otherwise it is that many fresh uniform tokens. The
first token of a copy is not predictable; the rest are predictable by induction (find the previous
occurrence of the current token's context and copy what followed). ``copy_src[i]`` is the earlier
position token ``i`` copies (-1 for fresh tokens and BOS). Segment positions and lengths are random, so
no fixed-offset (positional) head can solve the task: only content-based induction can.

Everything is numpy and seeded by an explicit generator: batch ``s`` of a run is drawn from
``default_rng([seed, s])``, so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

NULL = "null"
BOS = 0


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The generator of training batch ``step`` (``stream`` separates evaluation sets from training)."""
    return np.random.default_rng([int(seed), int(step), int(stream)])


# ---------------------------------------------------------------- mixture of sparse linear regressions


@dataclass(frozen=True)
class RegressionSpec:
    """The regression mixture; see the module doc. ``weights``: training mixture over the bases (uniform
    when None); ``null_weight``: weight of ``null`` in the training mixture (0: never trained on)."""

    dim: int = 16
    n_bases: int = 4
    rank: int = 4
    overlap: int = 0
    n_examples: int = 20
    noise_std: float = 0.0
    basis: Literal["sparse", "rotated"] = "sparse"
    basis_seed: int = 0
    weights: tuple[float, ...] | None = None
    null_weight: float = 0.0
    y_tokens: Literal["y", "xy"] = "y"
    coef: Literal["gaussian", "positive"] = "gaussian"

    def __post_init__(self) -> None:
        if self.dim < 1 or self.rank < 1 or self.n_bases < 1 or self.n_examples < 1:
            raise ValueError("dim, rank, n_bases and n_examples must be >= 1")
        if not 0 <= self.overlap < self.rank:
            raise ValueError(f"overlap must be in [0, rank - 1] = [0, {self.rank - 1}]; got {self.overlap}")
        need = self.n_bases * (self.rank - self.overlap) + self.overlap
        if need > self.dim:
            raise ValueError(
                f"{self.n_bases} bases of rank {self.rank} with overlap {self.overlap} need {need} "
                f"directions but dim is {self.dim}; raise dim or overlap, or lower n_bases or rank"
            )
        if self.coef not in ("gaussian", "positive"):
            raise ValueError(f"coef must be 'gaussian' or 'positive'; got {self.coef!r}")
        if self.y_tokens not in ("y", "xy"):
            raise ValueError(f"y_tokens must be 'y' or 'xy'; got {self.y_tokens!r}")
        if self.basis not in ("sparse", "rotated"):
            raise ValueError(f"basis must be 'sparse' or 'rotated'; got {self.basis!r}")
        if self.weights is not None and (
            len(self.weights) != self.n_bases or min(self.weights) < 0 or sum(self.weights) <= 0
        ):
            raise ValueError(f"weights must be {self.n_bases} non-negative numbers with a positive sum")
        if self.noise_std < 0 or self.null_weight < 0:
            raise ValueError("noise_std and null_weight must be >= 0")

    @property
    def concepts(self) -> tuple[str, ...]:
        """The concept names: ``basis0 .. basis{n-1}`` (``null`` is not among them)."""
        return tuple(f"basis{i}" for i in range(self.n_bases))

    @property
    def token_dim(self) -> int:
        return self.dim + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.n_examples

    def directions(self, z: int) -> np.ndarray:
        """Indices of the directions concept ``z`` spans."""
        start = z * (self.rank - self.overlap)
        return np.arange(start, start + self.rank)

    def mixture(self) -> np.ndarray:
        """Training probabilities of ``basis0 .. basis{n-1}, null``."""
        w = np.ones(self.n_bases) if self.weights is None else np.asarray(self.weights, dtype=float)
        p = np.append(w / w.sum(), 0.0)
        if self.null_weight > 0:
            p = np.append(np.asarray(w) / w.sum() * (1 - self.null_weight), self.null_weight)
        return p / p.sum()


def concept_bases(spec: RegressionSpec) -> np.ndarray:
    """``[n_bases, dim, rank]``: the orthonormal basis of every concept (float64)."""
    frame = np.eye(spec.dim)
    if spec.basis == "rotated":
        q, r = np.linalg.qr(np.random.default_rng(spec.basis_seed).standard_normal((spec.dim, spec.dim)))
        frame = q * np.sign(np.diag(r))  # Haar-distributed rotation
    return np.stack([frame[:, spec.directions(z)] for z in range(spec.n_bases)])


@dataclass
class RegressionBatch:
    """``x [B, K, dim]``, ``y [B, K]``, ``W [B, dim]`` (zeros for null), ``concept [B]`` (-1 = null)."""

    x: np.ndarray
    y: np.ndarray
    W: np.ndarray
    concept: np.ndarray

    def tokens(self, y_tokens: str = "y") -> np.ndarray:
        """``[B, 2K, dim + 1]`` float32: x-tokens ``(x_i, 0)`` then y-tokens ``(0, y_i)`` (``"xy"``:
        ``(x_i, y_i)``, so one attention layer can pair inputs with their targets)."""
        b, k, d = self.x.shape
        out = np.zeros((b, 2 * k, d + 1), dtype=np.float32)
        out[:, 0::2, :d] = self.x
        out[:, 1::2, d] = self.y
        if y_tokens == "xy":
            out[:, 1::2, :d] = self.x
        return out

    def labels(self, spec: RegressionSpec) -> list[str]:
        names = spec.concepts
        return [NULL if c < 0 else names[c] for c in self.concept]


def sample_regression(
    spec: RegressionSpec, concepts: np.ndarray, rng: np.random.Generator, bases: np.ndarray | None = None
) -> RegressionBatch:
    """One sequence per entry of ``concepts`` (basis index, or -1 for null)."""
    concepts = np.asarray(concepts, dtype=np.int64)
    if concepts.ndim != 1 or (concepts >= spec.n_bases).any() or (concepts < -1).any():
        raise ValueError(f"concepts must be a 1-D array of indices in [-1, {spec.n_bases - 1}]")
    bases = concept_bases(spec) if bases is None else bases
    b = len(concepts)
    x = rng.standard_normal((b, spec.n_examples, spec.dim))
    coef = rng.standard_normal((b, spec.rank)) / np.sqrt(spec.rank)
    if spec.coef == "positive":
        coef = np.abs(coef)
    null = concepts < 0
    W = np.einsum("bdr,br->bd", bases[np.where(null, 0, concepts)], coef)
    W[null] = 0.0
    y = np.einsum("bkd,bd->bk", x, W)
    if spec.noise_std > 0:
        y = y + spec.noise_std * rng.standard_normal(y.shape)
    if null.any():
        y[null] = rng.standard_normal((int(null.sum()), spec.n_examples))
    return RegressionBatch(x=x, y=y, W=W, concept=concepts)


def regression_train_batch(
    spec: RegressionSpec, batch_size: int, rng: np.random.Generator, bases: np.ndarray | None = None
) -> RegressionBatch:
    """A training batch: concepts drawn from the mixture (index ``n_bases`` of it means null)."""
    p = spec.mixture()
    z = rng.choice(len(p), size=batch_size, p=p)
    z = np.where(z == spec.n_bases, -1, z)
    return sample_regression(spec, z, rng, bases)


def regression_eval_set(
    spec: RegressionSpec, n_per_concept: int, seed: int, include_null: bool = True
) -> RegressionBatch:
    """A fixed evaluation set, ``n_per_concept`` sequences of each basis (and null), grouped by concept."""
    z = np.repeat(np.arange(spec.n_bases), n_per_concept)
    if include_null:
        z = np.concatenate([z, np.full(n_per_concept, -1)])
    return sample_regression(spec, z, np.random.default_rng([int(seed), 1 << 20]))


# ---------------------------------------------------------------- repeated segments


@dataclass(frozen=True)
class SegmentSpec:
    """Token sequences with repeated segments; see the module doc. ``seq_len`` counts tokens after BOS."""

    vocab_size: int = 128
    seq_len: int = 64
    segment_min: int = 4
    segment_max: int = 12
    repeat_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.vocab_size < 3:
            raise ValueError("vocab_size must be >= 3 (BOS plus at least 2 content tokens)")
        if not 1 <= self.segment_min <= self.segment_max:
            raise ValueError("need 1 <= segment_min <= segment_max")
        if self.seq_len < 2 * self.segment_min:
            raise ValueError(f"seq_len ({self.seq_len}) must leave room for a segment and one copy")
        if not 0 <= self.repeat_prob <= 1:
            raise ValueError("repeat_prob must be in [0, 1]")

    @property
    def total_len(self) -> int:
        """Tokens per sequence including BOS."""
        return self.seq_len + 1


@dataclass
class SegmentBatch:
    """``ids [B, 1 + seq_len]`` (int64, BOS first) and ``copy_src`` (same shape, -1 where not a copy)."""

    ids: np.ndarray
    copy_src: np.ndarray = field(repr=False)

    @property
    def predictable(self) -> np.ndarray:
        """Tokens an induction head can predict: copies whose predecessor is the copy of theirs."""
        prev = np.concatenate([np.full_like(self.copy_src[:, :1], -1), self.copy_src[:, :-1]], axis=1)
        return (self.copy_src >= 0) & (prev >= 0) & (prev + 1 == self.copy_src)


def _one_sequence(spec: SegmentSpec, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    ids, src = [BOS], [-1]
    while len(ids) < spec.total_len:
        length = int(rng.integers(spec.segment_min, spec.segment_max + 1))
        have = len(ids) - 1  # content tokens so far
        if have >= spec.segment_min and rng.random() < spec.repeat_prob:
            length = min(length, have)
            start = 1 + int(rng.integers(0, have - length + 1))
            ids += ids[start : start + length]
            src += list(range(start, start + length))
        else:
            ids += rng.integers(1, spec.vocab_size, size=length).tolist()
            src += [-1] * length
    return ids[: spec.total_len], src[: spec.total_len]


def sample_segments(spec: SegmentSpec, n: int, rng: np.random.Generator) -> SegmentBatch:
    """``n`` sequences with repeated segments."""
    rows = [_one_sequence(spec, rng) for _ in range(n)]
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    src = np.array([r[1] for r in rows], dtype=np.int64)
    return SegmentBatch(ids=ids, copy_src=src)


def segments_eval_set(spec: SegmentSpec, n: int, seed: int) -> SegmentBatch:
    """A fixed evaluation set (a stream no training batch uses)."""
    return sample_segments(spec, n, np.random.default_rng([int(seed), 1 << 20]))
