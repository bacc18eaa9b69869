"""Concept decodability measures on planted data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptprobe.measures.decodability import (
    decodability_peak,
    knn_decodability,
    probe_accuracy,
    stratified_fold_ids,
)


def _clusters(
    rng: np.random.Generator, strengths: list[float], n_per: int, n_classes: int, d: int
) -> tuple[np.ndarray, list[str]]:
    """One layer per strength: unit Gaussian noise plus ``strength`` times a fixed random class mean."""
    y = np.repeat(np.arange(n_classes), n_per)
    means = rng.standard_normal((n_classes, d))
    X = np.stack([rng.standard_normal((len(y), d)) + s * means[y] for s in strengths])
    return X, [f"concept{c}" for c in y]


# (a) well separated -> ~1 -------------------------------------------------------------------------------------


def test_well_separated_clusters_are_fully_decodable() -> None:
    rng = np.random.default_rng(0)
    X, labels = _clusters(rng, [6.0, 8.0, 10.0], n_per=20, n_classes=5, d=16)
    knn = knn_decodability(X, labels)
    probe = probe_accuracy(X, labels)
    np.testing.assert_array_equal(knn.overall, 1.0)
    assert probe.overall.min() >= 0.99
    assert knn.classes == [f"concept{c}" for c in range(5)]
    assert set(knn.per_concept) == set(knn.classes)
    for recall in knn.per_concept.values():
        np.testing.assert_array_equal(recall, 1.0)
    assert knn.predictions.shape == (3, 100)
    assert probe.converged.all() and probe.n_iter.shape == (3, 5)


# (b) identical distributions -> chance -------------------------------------------------------------------------


def test_identical_distributions_are_at_chance() -> None:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((6, 200, 8))
    labels = [f"c{i % 4}" for i in range(200)]
    for result in (knn_decodability(X, labels), probe_accuracy(X, labels)):
        assert abs(result.overall.mean() - 0.25) < 0.07
        assert result.overall.max() < 0.4


# (c) planted layer profile -> peak -----------------------------------------------------------------------------


def test_planted_profile_peaks_at_planted_layer() -> None:
    rng = np.random.default_rng(2)
    strengths = [0.1, 0.25, 0.4, 0.55, 0.8, 0.55, 0.4, 0.25, 0.1]
    X, labels = _clusters(rng, strengths, n_per=40, n_classes=4, d=16)
    knn = knn_decodability(X, labels)
    probe = probe_accuracy(X, labels)
    for overall in (knn.overall, probe.overall):
        assert decodability_peak(overall) == 4
        assert overall[4] > overall[0] + 0.3 and overall[4] > overall[8] + 0.3
        assert np.all(np.diff(overall[:5]) > 0)  # rises to the peak


def test_peak_ties_go_to_the_earliest_layer() -> None:
    assert decodability_peak(np.array([0.2, 0.9, 0.5, 0.9])) == 1
    with pytest.raises(ValueError):
        decodability_peak(np.array([0.2, np.nan]))
    with pytest.raises(ValueError):
        decodability_peak(np.array([]))


# (d) hand-built example ----------------------------------------------------------------------------------------


def test_knn_hand_built_example() -> None:
    """Six points on a line, k=3, raw coordinates (their mean, 2, is exact, so ties stay exact).

    idx  x     label | 3 nearest others (distance)            | votes          -> prediction
    0    0     C     | 4 (1, B), 5 (1.5, A), 1 (2, A)          | A 2, B 1       -> A  (1 and 2 tie at
                     |   distance 2: the lower index, 1, is taken; taking 2 instead would give B)
    1    2     A     | 4 (1, B), 0 (2, C), 5 (3.5, A)          | 3-way tie      -> B  (nearest member)
    2    -2    B     | 5 (0.5, A), 0 (2, C), 4 (3, B)         | 3-way tie      -> A
    3    12.5  A     | 1 (10.5, A), 4 (11.5, B), 0 (12.5, C)   | 3-way tie      -> A  (correct)
    4    1     B     | 0 (1, C), 1 (1, A), 5 (2.5, A)          | A 2, C 1       -> A
    5    -1.5  A     | 2 (0.5, B), 0 (1.5, C), 4 (2.5, B)      | B 2, C 1       -> B
    Counting the point itself, or breaking class ties by class index, would change several answers.
    """
    x = np.array([0.0, 2.0, -2.0, 12.5, 1.0, -1.5], dtype=np.float32)[:, None]
    labels = ["C", "A", "B", "A", "B", "A"]
    result = knn_decodability(x, labels, k=3, standardize=False)
    assert result.classes == ["C", "A", "B"]
    names = [result.classes[i] for i in result.predictions[0]]
    assert names == ["A", "B", "A", "A", "A", "B"]
    assert result.overall.tolist() == [pytest.approx(1 / 6)]
    assert result.per_concept["A"].tolist() == [pytest.approx(1 / 3)]
    assert result.per_concept["B"].tolist() == [0.0]
    assert result.per_concept["C"].tolist() == [0.0]
    # Same answer from float64 input, a torch tensor, and as one layer of a stack.
    stacked = torch.from_numpy(np.stack([x, x]).astype(np.float64))
    np.testing.assert_array_equal(
        knn_decodability(stacked, labels, k=3, standardize=False).predictions[1], result.predictions[0]
    )


def test_cosine_ignores_norm() -> None:
    """Two classes 10 degrees apart with norms spanning 1..1000: cosine separates them, raw euclidean cannot."""
    rng = np.random.default_rng(3)
    angle = np.deg2rad(10.0)
    dirs = np.array([[1.0, 0.0], [np.cos(angle), np.sin(angle)]])
    y = np.repeat(np.arange(2), 40)
    norms = np.exp(rng.uniform(0, np.log(1000), len(y)))[:, None]
    X = dirs[y] * norms * (1 + 0.01 * rng.standard_normal((len(y), 2)))
    labels = [str(c) for c in y]
    assert knn_decodability(X, labels, k=5, metric="cosine", standardize=False).overall[0] == 1.0
    assert knn_decodability(X, labels, k=5, metric="euclidean", standardize=False).overall[0] < 0.7


# (e) agreement with scikit-learn -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("C", "standardize", "n_classes"), [(1.0, True, 4), (0.05, True, 4), (1.0, False, 4), (1.0, True, 2)]
)
def test_probe_matches_sklearn(C: float, standardize: bool, n_classes: int) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(4)
    strengths = [0.3, 0.5, 0.8] if n_classes > 2 else [0.2, 0.3, 0.4]
    X, labels = _clusters(rng, strengths, n_per=160 // n_classes, n_classes=n_classes, d=20)
    X[:, :, 3] *= 5.0  # a high-variance feature, so that scaling matters
    X += 3.0
    y = np.array([int(s[-1]) for s in labels])
    result = probe_accuracy(X, labels, C=C, standardize=standardize)
    assert result.converged.all()
    fold_ids = stratified_fold_ids(labels, folds=5, seed=0)
    np.testing.assert_array_equal(result.fold_ids, fold_ids)
    for layer in range(X.shape[0]):
        pred = np.empty(len(y), dtype=int)
        for f in range(5):
            train, test = fold_ids != f, fold_ids == f
            Xtr, Xte = X[layer][train], X[layer][test]
            if standardize:
                scaler = StandardScaler().fit(Xtr)
                Xtr, Xte = scaler.transform(Xtr), scaler.transform(Xte)
            with threadpool_limits(1):  # more BLAS threads only oversubscribe a small shared machine
                clf = LogisticRegression(C=C, max_iter=5000, tol=1e-6).fit(Xtr, y[train])
            pred[test] = clf.predict(Xte)
        sk_acc = (pred == y).mean()
        assert abs(result.overall[layer] - sk_acc) <= 0.02, (layer, result.overall[layer], sk_acc)
        assert (result.predictions[layer] == pred).mean() >= 0.95
    assert 0.4 < result.overall.mean() < 0.95  # a moderate problem, not saturated


def test_stratified_folds_are_balanced_and_seeded() -> None:
    labels = [f"c{i % 3}" for i in range(30)]
    ids = stratified_fold_ids(labels, folds=5, seed=0)
    for f in range(5):
        assert sorted(labels[i] for i in np.flatnonzero(ids == f)) == ["c0", "c0", "c1", "c1", "c2", "c2"]
    assert not np.array_equal(ids, stratified_fold_ids(labels, folds=5, seed=1))


@pytest.mark.parametrize("case", range(12))
def test_stratified_folds_equal_scikit_learn(case: int) -> None:
    """The same folds as StratifiedKFold(shuffle=True), without importing scikit-learn at run time: uneven
    classes, labels out of order, several seeds and fold counts."""
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(case)
    n_classes, folds = int(rng.integers(2, 8)), int(rng.integers(2, 7))
    sizes = rng.integers(folds, 40, size=n_classes)
    labels = [f"k{c}" for c, size in zip(rng.permutation(n_classes), sizes, strict=True) for _ in range(size)]
    labels = [labels[i] for i in rng.permutation(len(labels))]
    ref = np.empty(len(labels), dtype=np.int64)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=case).split(
        np.zeros(len(labels)), labels
    )
    for f, (_, test) in enumerate(split):
        ref[test] = f
    np.testing.assert_array_equal(stratified_fold_ids(labels, folds=folds, seed=case), ref)


# (f) input validation ------------------------------------------------------------------------------------------


def test_validation_errors() -> None:
    rng = np.random.default_rng(5)
    X = rng.standard_normal((3, 20, 4))
    labels = ["a", "b"] * 10
    with pytest.raises(ValueError, match="k=20"):
        knn_decodability(X, labels, k=20)
    with pytest.raises(ValueError, match="19 labels for 20 points"):
        knn_decodability(X, labels[:19])
    with pytest.raises(ValueError, match="at least 2 classes"):
        probe_accuracy(X, ["a"] * 20)
    bad = X.copy()
    bad[2, 5, 1] = np.nan
    with pytest.raises(ValueError, match="layer 2"):
        knn_decodability(bad, labels)
    bad[2, 5, 1] = np.inf
    with pytest.raises(ValueError, match="layer 2"):
        probe_accuracy(bad, labels)
    with pytest.raises(ValueError, match="metric"):
        knn_decodability(X, labels, metric="manhattan")
    with pytest.raises(ValueError, match="shape"):
        knn_decodability(X[0, 0], labels)
    with pytest.raises(ValueError, match="only 2 points"):
        probe_accuracy(X, ["a"] * 18 + ["b"] * 2, folds=5)
    with pytest.raises(ValueError, match="C must be"):
        probe_accuracy(X, labels, C=0.0)
    with pytest.raises(ValueError, match="k must be"):
        knn_decodability(X, labels, k=0)


# (g) standardisation matters -----------------------------------------------------------------------------------


def test_standardize_recovers_signal_hidden_by_a_huge_variance_dimension() -> None:
    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(3), 40)
    signal = 4.0 * np.eye(3)[y]  # classes 4 sigma apart in three unit-variance dimensions
    noise = 1000.0 * rng.standard_normal((len(y), 1))  # one dimension that swamps raw distances
    X = np.concatenate([signal + rng.standard_normal((len(y), 3)), noise], axis=1)
    labels = [f"c{c}" for c in y]
    raw = knn_decodability(X, labels, standardize=False).overall[0]
    scaled = knn_decodability(X, labels, standardize=True).overall[0]
    assert raw < 0.55
    assert scaled > 0.9
