"""The decodability suite of one run: k-NN and probe per layer, each beside its controls.

For one position's residual stream ``X`` ``[n_layers, n, d]`` and the concept of each prompt, it computes:

- ``cd_knn`` (leave-one-out k-NN) and ``probe_accuracy`` (cross-validated logistic probe) per layer, overall
  and per concept, with a stratified bootstrap interval over prompts (``*_ci_low``, ``*_ci_high``);
- the label-permutation null per layer (``*_null_mean``, ``*_null_p95``, ``*_p_value``): for k-NN every layer
  and ``n_permutations`` shufflings (one neighbour table per layer serves them all); for the probe, which
  must be refitted, ``probe_permutations`` shufflings at ``probe_null_layers`` evenly spaced layers plus its
  peaks (other layers have no probe null);
- the surface baselines (:mod:`conceptprobe.measures.surface`): the same k-NN and probe on each reader's
  features (``surface_<reader>_knn``, ``surface_<reader>_probe``), the strongest of them
  (``surface_baseline``), and per layer the *selectivity*: decodability minus that strongest baseline, with a
  paired bootstrap interval (the same prompts, the same resamples);
- the held-out peak (``*_heldout_peak``): the layer chosen on one half of the prompts, the value reported on
  the other half, and its selectivity there; the in-sample peak (max over layers) is optimistic;
- for concept pairs that share an answer class (a task's ``pairs``), all of the above restricted to the two
  concepts' prompts, with the row's ``concept`` set to ``"a|b"`` (chance 0.5; the word-class readers are at
  chance there by construction).

Every row carries ``n``, the number of prompts its value rests on. Rows are plain dicts
(``concept, layer, metric, value, n``; ``layer`` None for layer-free rows); the run adds the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from conceptprobe.measures.controls import (
    bootstrap_interval,
    bootstrap_weights,
    heldout_peak,
    knn_permutation_null,
    permutation_p_value,
    split_halves,
)
from conceptprobe.measures.decodability import knn_decodability, probe_accuracy, stratified_fold_ids

__all__ = ["SuiteSettings", "decodability_suite", "pair_label"]

Row = dict[str, Any]


@dataclass(frozen=True)
class SuiteSettings:
    """How the suite measures; the defaults are the run config's."""

    k: int = 10
    metric: str = "euclidean"
    standardize: bool = True
    folds: int = 5
    seed: int = 0
    n_permutations: int = 100
    probe_permutations: int = 10
    probe_null_layers: int = 3
    n_bootstrap: int = 1000
    level: float = 0.95


def pair_label(a: str, b: str) -> str:
    """The ``concept`` value of rows about a pair of concepts."""
    return f"{a}|{b}"


def _row(concept: str, layer: int | None, metric: str, value: float, n: int) -> Row:
    return {"concept": concept, "layer": layer, "metric": metric, "value": float(value), "n": int(n)}


def _folds_for(y: np.ndarray, folds: int) -> int:
    return max(2, min(folds, int(np.bincount(y).min())))


def _surface(
    features: dict[str, np.ndarray], labels: list[str], s: SuiteSettings, k: int, fold_ids: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-prompt correctness ``[n]`` of every (reader, classifier) baseline, keyed ``<reader>_<knn|probe>``."""
    out: dict[str, np.ndarray] = {}
    for reader, F in features.items():
        knn = knn_decodability(F, labels, k=k, metric=s.metric, standardize=s.standardize)
        out[f"{reader}_knn"] = knn.correct()[0]
        probe = probe_accuracy(F, labels, fold_ids=fold_ids, standardize=s.standardize)
        out[f"{reader}_probe"] = probe.correct()[0]
    return out


def _probe_null_layers(n_layers: int, count: int, extra: Sequence[int]) -> list[int]:
    spaced = np.unique(np.linspace(0, n_layers - 1, num=min(count, n_layers)).round().astype(int))
    return sorted(set(spaced.tolist()) | set(extra))


def _measure_group(
    X: torch.Tensor,
    labels: list[str],
    layers: list[int],
    concept: str,
    surface: dict[str, np.ndarray] | None,
    s: SuiteSettings,
    per_concept: bool,
) -> list[Row]:
    """All rows for one set of prompts (every concept, or one pair), labelled ``concept``."""
    rows: list[Row] = []
    n = len(labels)
    k = min(s.k, n - 1)
    knn = knn_decodability(X, labels, k=k, metric=s.metric, standardize=s.standardize)
    y = knn.y
    assert y is not None
    folds = _folds_for(y, s.folds)
    fold_ids = stratified_fold_ids(labels, folds, s.seed)
    probe = probe_accuracy(X, labels, fold_ids=fold_ids, standardize=s.standardize)
    weights = bootstrap_weights(y, s.n_bootstrap, s.seed)
    base = _surface(surface, labels, s, k, fold_ids) if surface else {}
    best_name = max(base, key=lambda name: base[name].mean()) if base else None
    for name, correct in base.items():
        low, high = bootstrap_interval(correct, y, level=s.level, weights=weights)
        rows += [
            _row(concept, None, f"surface_{name}", correct.mean(), n),
            _row(concept, None, f"surface_{name}_ci_low", low, n),
            _row(concept, None, f"surface_{name}_ci_high", high, n),
        ]
    if best_name is not None:
        rows.append(_row(concept, None, "surface_baseline", base[best_name].mean(), n))

    for metric, result in (("cd_knn", knn), ("probe_accuracy", probe)):
        correct = result.correct().astype(np.float64)  # [L, n]
        low, high = bootstrap_interval(correct, y, level=s.level, weights=weights)
        peak = heldout_peak(correct, y, s.seed, s.n_bootstrap, s.level)
        if metric == "cd_knn":
            assert knn.neighbours is not None
            null = knn_permutation_null(knn.neighbours, y, s.n_permutations, s.seed)
            null_layers = list(range(len(layers)))
        elif s.probe_permutations == 0:  # no probe null asked for: no null rows
            null_layers = []
            null = np.full((len(layers), 1), np.nan)
        else:
            null_layers = _probe_null_layers(
                len(layers), s.probe_null_layers, [int(np.argmax(result.overall)), peak.layer_index]
            )
            null = np.full((len(layers), s.probe_permutations), np.nan)
            rng = np.random.default_rng(np.random.SeedSequence([s.seed, 0x9E78]))
            Xs = X[null_layers]
            for p in range(s.probe_permutations):
                shuffled = [labels[i] for i in rng.permutation(n)]
                got = probe_accuracy(Xs, shuffled, fold_ids=fold_ids, standardize=s.standardize)
                null[null_layers, p] = got.overall
        p_values = permutation_p_value(result.overall, null)
        for li, layer in enumerate(layers):
            rows += [
                _row(concept, layer, metric, result.overall[li], n),
                _row(concept, layer, f"{metric}_ci_low", low[li], n),
                _row(concept, layer, f"{metric}_ci_high", high[li], n),
            ]
            if li in null_layers:
                rows += [
                    _row(concept, layer, f"{metric}_null_mean", null[li].mean(), n),
                    _row(concept, layer, f"{metric}_null_p95", np.quantile(null[li], 0.95), n),
                    _row(concept, layer, f"{metric}_p_value", p_values[li], n),
                ]
            if per_concept:
                for c, values in result.per_concept.items():
                    rows.append(_row(c, layer, metric, values[li], int((np.asarray(labels) == c).sum())))
        if best_name is not None:
            diff = correct - base[best_name][None, :]
            dlow, dhigh = bootstrap_interval(diff, y, level=s.level, weights=weights)
            for li, layer in enumerate(layers):
                rows += [
                    _row(concept, layer, f"{metric}_selectivity", diff[li].mean(), n),
                    _row(concept, layer, f"{metric}_selectivity_ci_low", dlow[li], n),
                    _row(concept, layer, f"{metric}_selectivity_ci_high", dhigh[li], n),
                ]
        chosen = layers[peak.layer_index]
        rows += [
            _row(concept, chosen, f"{metric}_heldout_peak", peak.value, peak.n_report),
            _row(concept, chosen, f"{metric}_heldout_peak_ci_low", peak.ci_low, peak.n_report),
            _row(concept, chosen, f"{metric}_heldout_peak_ci_high", peak.ci_high, peak.n_report),
        ]
        if best_name is not None:
            _, report = split_halves(y, s.seed)
            diff = correct[peak.layer_index, report] - base[best_name][report]
            dlow, dhigh = bootstrap_interval(diff, y[report], s.n_bootstrap, s.level, s.seed)
            rows += [
                _row(concept, chosen, f"{metric}_heldout_selectivity", diff.mean(), len(report)),
                _row(concept, chosen, f"{metric}_heldout_selectivity_ci_low", dlow, len(report)),
                _row(concept, chosen, f"{metric}_heldout_selectivity_ci_high", dhigh, len(report)),
            ]
    return rows


def decodability_suite(
    X: Any,
    labels: Sequence[str],
    layers: Sequence[int],
    *,
    surface: dict[str, np.ndarray] | None = None,
    pairs: Sequence[tuple[str, str]] = (),
    settings: SuiteSettings | None = None,
) -> list[Row]:
    """Rows of every measure and control for ``X`` ``[n_layers, n, d]`` (see the module docstring).

    ``surface`` maps a reader's name to its features ``[n, f]`` for the same prompts, in the same order;
    ``pairs`` are concept pairs to measure on their own (pairs with a concept absent from ``labels`` are
    skipped).
    """
    s = settings or SuiteSettings()
    X = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
    if X.ndim == 2:
        X = X.unsqueeze(0)
    labels = list(labels)
    layers = list(layers)
    rows = _measure_group(X, labels, layers, "all", surface, s, per_concept=True)
    present = set(labels)
    for a, b in pairs:
        if a not in present or b not in present:
            continue
        idx = np.flatnonzero(np.isin(np.asarray(labels), [a, b]))
        sub = {name: F[idx] for name, F in (surface or {}).items()}
        Xp = X[:, torch.from_numpy(idx)]
        rows += _measure_group(
            Xp, [labels[i] for i in idx], layers, pair_label(a, b), sub or None, s, per_concept=False
        )
    return rows
