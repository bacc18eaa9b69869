"""Benchmark: decodability probes, ours vs scikit-learn, on the same data and the same folds.

    python benchmarks/bench_probes.py            # 31 layers x 700 points x 576 dims, 7 classes, 5 folds
    python benchmarks/bench_probes.py --quick    # a small smoke shape

Logistic probe (5-fold CV, StandardScaler fitted per training fold, C=1):
  (i)   scikit-learn plain loop: layers x folds, ``LogisticRegression(max_iter=1000)``, default BLAS threads;
  (ii)  scikit-learn tuned: ``threadpool_limits(1)`` in each worker + joblib over layers (n_jobs=2; the pool
        is started before timing, which favours it);
  (iii) ours: ``probe_accuracy`` (one batched L-BFGS over all layers and folds), num_threads 1 and 2.
k-NN (k=10, leave-one-out, z-scored features): scikit-learn ``KNeighborsClassifier(10).fit(Z, y).predict(None)``
per layer (predict(None) excludes each point from its own neighbours) vs ``knn_decodability``.

Accuracy differences are the mean (and max) absolute difference per layer. CPU timings on a shared machine
vary run to run: compare within one run, as ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np
import sklearn
import torch
from joblib import Parallel, delayed
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from conceptprobe.measures.decodability import knn_decodability, probe_accuracy, stratified_fold_ids


def make_activations(
    n_layers: int = 31, n_per_class: int = 100, d: int = 576, n_classes: int = 7, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Residual-stream-like synthetic stack [n_layers, n, d] (float32) with a layer-dependent class signal.

    Each layer: low-rank correlated noise plus isotropic noise, a large constant offset and a few
    huge-variance dimensions (as real residual streams have), scale growing with depth, and class means whose
    strength rises to a peak at 45% of the depth and falls again (so the decodability profile has one peak).
    """
    rng = np.random.default_rng(seed)
    n = n_per_class * n_classes
    y = np.repeat(np.arange(n_classes), n_per_class)
    class_dirs = rng.standard_normal((n_classes, d))
    outliers = rng.choice(d, 4, replace=False)
    peak = 0.45 * (n_layers - 1)
    X = np.empty((n_layers, n, d), dtype=np.float32)
    for layer in range(n_layers):
        signal = 0.36 * np.exp(-0.5 * ((layer - peak) / (n_layers / 5)) ** 2) + 0.03
        means = class_dirs + 0.3 * rng.standard_normal((n_classes, d))
        low_rank = 0.3 * rng.standard_normal((n, 32)) @ rng.standard_normal((32, d))
        x = rng.standard_normal((n, d)) + low_rank + signal * means[y]
        x *= 1.0 + 0.05 * layer
        x[:, outliers] *= 30.0
        X[layer] = x + 5.0
    return X, [f"concept{c}" for c in y]


def _sk_layer_probe(Xl: np.ndarray, y: np.ndarray, fold_ids: np.ndarray, limit_threads: bool) -> np.ndarray:
    """Held-out predictions of one layer, fold by fold, with scikit-learn."""

    def run() -> np.ndarray:
        pred = np.empty(len(y), dtype=np.int64)
        for f in range(int(fold_ids.max()) + 1):
            train, test = fold_ids != f, fold_ids == f
            scaler = StandardScaler().fit(Xl[train])
            clf = LogisticRegression(max_iter=1000).fit(scaler.transform(Xl[train]), y[train])
            pred[test] = clf.predict(scaler.transform(Xl[test]))
        return pred

    if limit_threads:
        with threadpool_limits(1):
            return run()
    return run()


def _sk_knn_layer(Xl: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    Z = StandardScaler().fit_transform(Xl)
    return KNeighborsClassifier(n_neighbors=k).fit(Z, y).predict(None)


def _vote_tied(Xl: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Whether each point's leave-one-out k-NN vote has a tie between classes."""
    Z = StandardScaler().fit_transform(Xl)
    _, idx = KNeighborsClassifier(n_neighbors=k).fit(Z, y).kneighbors(None)
    counts = np.stack([np.bincount(row, minlength=y.max() + 1) for row in y[idx]])
    return (counts == counts.max(axis=1, keepdims=True)).sum(axis=1) > 1


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _acc(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (pred == y[None, :]).mean(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke shape (6 layers x 140 x 64)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        shape = {"n_layers": 6, "n_per_class": 20, "d": 64}
    else:
        shape = {"n_layers": 31, "n_per_class": 100, "d": 576}
    if args.layers:
        shape["n_layers"] = args.layers
    X, labels = make_activations(**shape, seed=args.seed)
    classes = sorted(set(labels), key=labels.index)
    y = np.array([classes.index(c) for c in labels])
    fold_ids = stratified_fold_ids(labels, folds=5, seed=args.seed)
    L, n, d = X.shape

    print(f"# bench_probes  {datetime.now():%Y-%m-%d %H:%M}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load avg {os.getloadavg()[0]:.1f}; torch {torch.__version__} (threads {torch.get_num_threads()}), "
        f"scikit-learn {sklearn.__version__}, numpy {np.__version__}"
    )
    print(f"data: {L} layers x {n} points x {d} dims, {len(classes)} classes, 5 stratified folds\n")

    rows: list[tuple[str, float, np.ndarray | None]] = []
    # Warm-up (imports, allocator, joblib pool) outside the timings.
    probe_accuracy(X[:1, :, :], labels, fold_ids=fold_ids)
    with Parallel(n_jobs=2) as pool:
        pool(delayed(_sk_layer_probe)(X[i], y, fold_ids, True) for i in range(min(2, L)))
        t_tuned, preds = _timed(
            lambda: pool(delayed(_sk_layer_probe)(X[i], y, fold_ids, True) for i in range(L))
        )
    acc_tuned = _acc(np.stack(preds), y)
    t_plain, preds = _timed(lambda: [_sk_layer_probe(X[i], y, fold_ids, False) for i in range(L)])
    acc_plain = _acc(np.stack(preds), y)
    rows += [("sklearn plain loop (default threads)", t_plain, acc_plain)]
    rows += [("sklearn tuned (1 BLAS thread, joblib n_jobs=2)", t_tuned, acc_tuned)]
    ours = {}
    for threads in (1, 2):
        t, res = _timed(
            lambda threads=threads: probe_accuracy(X, labels, fold_ids=fold_ids, num_threads=threads)
        )
        ours[threads] = res
        rows += [(f"ours probe_accuracy (num_threads={threads})", t, res.overall)]

    print("## Logistic probe (5-fold CV)")
    print(f"{'method':<50} {'seconds':>8} {'plain/x':>8} {'tuned/x':>8} {'|dacc| mean':>11} {'max':>6}")
    for name, t, acc in rows:
        diff = np.abs(acc - acc_plain)
        print(
            f"{name:<50} {t:8.2f} {t_plain / t:8.1f} {t_tuned / t:8.2f} "
            f"{100 * diff.mean():10.2f}pt {100 * diff.max():5.2f}"
        )
    res = ours[1]
    print(
        f"ours: converged {res.converged.mean():.0%} of {res.converged.size} problems, iterations mean "
        f"{res.n_iter.mean():.1f} / max {res.n_iter.max()}, max |grad| {res.grad_max.max():.1e}; peak layer "
        f"ours {int(np.argmax(res.overall))} vs sklearn {int(np.argmax(acc_plain))}"
    )

    # k-NN
    t_sk, preds = _timed(lambda: [_sk_knn_layer(X[i], y, 10) for i in range(L)])
    acc_sk = _acc(np.stack(preds), y)
    knn_rows = [("sklearn KNeighborsClassifier predict(None) loop", t_sk, acc_sk, np.stack(preds))]
    for threads in (1, 2):
        t, kr = _timed(lambda threads=threads: knn_decodability(X, labels, k=10, num_threads=threads))
        knn_rows += [(f"ours knn_decodability (num_threads={threads})", t, kr.overall, kr.predictions)]
    untied = ~np.stack([_vote_tied(X[i], y, 10) for i in range(L)])  # untimed
    print("\n## k-NN decodability (k=10, leave-one-out, z-scored)")
    print(
        f"{'method':<50} {'seconds':>8} {'sk/x':>8} {'|dacc| mean':>11} {'max':>6} {'same pred':>9} "
        f"{'untied':>7}"
    )
    for name, t, acc, pred in knn_rows:
        diff = np.abs(acc - acc_sk)
        same = pred == knn_rows[0][3]
        print(
            f"{name:<50} {t:8.2f} {t_sk / t:8.1f} {100 * diff.mean():10.2f}pt {100 * diff.max():5.2f} "
            f"{same.mean():9.4f} {same[untied].mean():7.4f}"
        )
    print(
        f"(same pred: share of identical predictions; untied: the same over the {untied.mean():.0%} of points\n"
        " whose vote has no tie. On a tie scikit-learn takes the lowest class index, ours the tied class with\n"
        " the closest member.)"
    )
    print(f"\nload avg at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
