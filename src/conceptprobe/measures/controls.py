"""Controls and uncertainty for a decodability measure, computed from its per-prompt outcomes.

Every function here works on ``correct``: a boolean array ``[n_layers, n]`` (or ``[n]``) saying whether each
prompt was classified correctly (leave-one-out for k-NN, held out by its fold for the probe), and on the
concept labels ``y`` (integers ``[n]``). Nothing here refits a classifier, so the controls cost little:

- :func:`bootstrap_interval`: a percentile interval over prompts, resampled *within each concept* (the
  class balance is kept). The classifier is held fixed (its neighbours or fitted probes), so the interval
  is the sampling error of the evaluation; seeds (new prompts, new fits) give the other part of the spread.
  Paired differences (decodability minus a baseline on the same prompts) use the same resamples.
- :func:`knn_permutation_null`: leave-one-out k-NN accuracy under shuffled concept labels. The k nearest
  neighbours of each point do not depend on the labels, so one neighbour table per layer serves every
  permutation: only the votes are recounted. LOO k-NN sits *below* 1/C at zero separation (a point's own
  class is one short among its neighbours), so compare with this null, not with chance.
- :func:`heldout_peak`: the peak layer chosen on one half of the prompts (stratified by concept) and its
  accuracy reported on the other half. The in-sample peak (max over all layers of the same prompts) is
  biased upward by the selection.
- :func:`permutation_p_value`: ``(1 + #{null >= observed}) / (1 + n_permutations)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "HeldoutPeak",
    "bootstrap_interval",
    "bootstrap_weights",
    "heldout_peak",
    "knn_permutation_null",
    "permutation_p_value",
    "split_halves",
]


def _as_2d(correct: np.ndarray) -> tuple[np.ndarray, bool]:
    a = np.asarray(correct, dtype=np.float64)
    return (a[None, :], True) if a.ndim == 1 else (a, False)


def bootstrap_weights(y: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Resampling weights ``[n_boot, n]``: how often each prompt is drawn, with replacement within its class."""
    y = np.asarray(y)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB007]))
    w = np.zeros((n_boot, len(y)), dtype=np.float64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return w


def bootstrap_interval(
    values: np.ndarray,
    y: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of the mean of ``values`` ``[n_layers, n]`` (or ``[n]``) over prompts, per layer.

    ``values`` are per-prompt outcomes (0/1 correctness, or a paired difference of two such). Resampling is
    stratified by ``y``; pass ``weights`` from :func:`bootstrap_weights` to pair several quantities.
    """
    v, flat = _as_2d(values)
    w = bootstrap_weights(y, n_boot, seed) if weights is None else weights
    means = v @ w.T / len(y)  # [n_layers, n_boot]
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], axis=1)
    return (low[0], high[0]) if flat else (low, high)


def _vote(labels_of_neighbours: torch.Tensor, n_classes: int) -> torch.Tensor:
    from conceptprobe.measures.decodability import knn_vote

    return knn_vote(labels_of_neighbours, n_classes)


def knn_permutation_null(
    neighbours: np.ndarray, y: np.ndarray, n_permutations: int = 100, seed: int = 0
) -> np.ndarray:
    """Leave-one-out k-NN accuracy under ``n_permutations`` shufflings of ``y``: ``[n_layers, n_permutations]``.

    ``neighbours`` ``[n_layers, n, k]`` are each point's k nearest other points, nearest first (from
    :func:`~conceptprobe.measures.decodability.knn_decodability`); votes use the same tie rule.
    """
    nb = torch.as_tensor(np.asarray(neighbours), dtype=torch.int64)
    y = np.asarray(y, dtype=np.int64)
    n_classes = int(y.max()) + 1
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9E77]))
    out = np.empty((nb.shape[0], n_permutations))
    for p in range(n_permutations):
        yp = torch.from_numpy(rng.permutation(y))
        pred = _vote(yp[nb], n_classes)  # [n_layers, n]
        out[:, p] = (pred == yp[None, :]).double().mean(dim=1).numpy()
    return out


def permutation_p_value(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided p-value per layer: ``(1 + #{null >= observed}) / (1 + n_permutations)``."""
    obs = np.asarray(observed, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    return (1.0 + (null >= obs[..., None] - 1e-12).sum(axis=-1)) / (1.0 + null.shape[-1])


def split_halves(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the prompts (index arrays), each holding half of every concept."""
    y = np.asarray(y)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4A1F]))
    a, b = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        a.append(idx[: len(idx) // 2])
        b.append(idx[len(idx) // 2 :])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


@dataclass(frozen=True)
class HeldoutPeak:
    """The layer index chosen on half ``select`` and the accuracy there on half ``report`` (with its interval)."""

    layer_index: int
    value: float
    ci_low: float
    ci_high: float
    n_select: int
    n_report: int


def heldout_peak(
    correct: np.ndarray, y: np.ndarray, seed: int = 0, n_boot: int = 1000, level: float = 0.95
) -> HeldoutPeak:
    """Choose the best layer on one half of the prompts, report its accuracy on the other half.

    ``correct`` is ``[n_layers, n]``; the first layer wins ties. The interval is a stratified bootstrap over
    the reporting half.
    """
    c, _ = _as_2d(correct)
    y = np.asarray(y)
    sel, rep = split_halves(y, seed)
    layer = int(np.argmax(c[:, sel].mean(axis=1)))
    low, high = bootstrap_interval(c[layer, rep], y[rep], n_boot, level, seed)
    return HeldoutPeak(layer, float(c[layer, rep].mean()), float(low), float(high), len(sel), len(rep))
