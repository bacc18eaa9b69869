"""Controls of decodability on planted data: each control must say what it claims, both ways."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import KNeighborsClassifier

from conceptprobe.measures.controls import (
    bootstrap_interval,
    heldout_peak,
    knn_permutation_null,
    permutation_p_value,
    split_halves,
)
from conceptprobe.measures.decodability import knn_decodability
from conceptprobe.measures.suite import SuiteSettings, decodability_suite, pair_label
from conceptprobe.measures.surface import bag_of_words, words

FAST = SuiteSettings(n_permutations=30, probe_permutations=3, probe_null_layers=2, n_bootstrap=300)


def _planted(
    n_per: int = 30, classes: int = 4, d: int = 16, sep: float = 3.0, layers: int = 3, seed: int = 0
):
    """Layer 0: noise; layer 1: classes separated by ``sep``; layer 2: half that."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per)
    means = rng.normal(size=(classes, d))
    X = rng.normal(size=(layers, len(y), d)).astype(np.float32)
    X[1] += sep * means[y]
    if layers > 2:
        X[2] += 0.5 * sep * means[y]
    return X, [f"c{c}" for c in y], y


def _frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows)


def _value(frame: pd.DataFrame, metric: str, concept: str = "all", layer: int | None = None) -> float:
    sel = frame[(frame.metric == metric) & (frame.concept == concept)]
    sel = sel[sel.layer.isna()] if layer is None else sel[sel.layer == layer]
    assert len(sel) == 1, (metric, concept, layer, len(sel))
    return float(sel.value.iloc[0])


# ------------------------------------------------------------------ reference implementations


def test_bootstrap_interval_matches_a_plain_resampling_loop():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], [20, 30, 10])
    correct = (rng.random(len(y)) < 0.7).astype(float)
    low, high = bootstrap_interval(correct, y, n_boot=4000, seed=3)
    means = []
    loop = np.random.default_rng(7)
    for _ in range(4000):
        idx = np.concatenate([loop.choice(np.flatnonzero(y == c), (y == c).sum()) for c in range(3)])
        means.append(correct[idx].mean())
    ref_low, ref_high = np.quantile(means, [0.025, 0.975])
    assert abs(low - ref_low) < 0.02 and abs(high - ref_high) < 0.02
    assert low < correct.mean() < high


def test_permutation_null_equals_knn_rerun_on_the_permuted_labels():
    X, labels, y = _planted(layers=2)
    knn = knn_decodability(X, labels, k=5)
    null = knn_permutation_null(knn.neighbours, y, n_permutations=5, seed=11)
    rng = np.random.default_rng(np.random.SeedSequence([11, 0x9E77]))
    for p in range(5):
        yp = rng.permutation(y)
        again = knn_decodability(X, [f"c{c}" for c in yp], k=5)
        # the class order of knn_decodability follows first appearance: compare accuracies, not indices
        np.testing.assert_allclose(null[:, p], again.overall)


def test_knn_agrees_with_scikit_learn_leave_one_out():
    X, labels, y = _planted(layers=2, sep=1.0)
    knn = knn_decodability(X, labels, k=7, standardize=False)
    for layer in range(2):
        clf = KNeighborsClassifier(n_neighbors=7)
        hits = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            clf.fit(X[layer][keep], y[keep])
            hits.append(clf.predict(X[layer][i : i + 1])[0] == y[i])
        # sklearn breaks vote ties by class order, ours by the nearest member: allow a few disagreements
        assert abs(np.mean(hits) - knn.overall[layer]) <= 3 / len(y)


# ------------------------------------------------------------------ the controls, both ways


def test_shuffled_labels_give_decodability_near_the_null_and_a_large_p_value():
    X, labels, _ = _planted(sep=4.0)
    shuffled = list(np.random.default_rng(0).permutation(labels))
    frame = _frame(decodability_suite(X, shuffled, [0, 1, 2], settings=FAST))
    value = _value(frame, "cd_knn", layer=1)
    assert value < 0.4  # 4 classes: chance 0.25, LOO k-NN sits a little below
    assert value <= _value(frame, "cd_knn_null_p95", layer=1) + 0.05
    assert _value(frame, "cd_knn_p_value", layer=1) > 0.05


def test_planted_concepts_beat_the_null_and_a_noise_surface_baseline():
    X, labels, y = _planted(sep=4.0)
    noise = {"answers": np.random.default_rng(5).normal(size=(len(y), 8)).astype(np.float32)}
    frame = _frame(decodability_suite(X, labels, [0, 1, 2], surface=noise, settings=FAST))
    assert _value(frame, "cd_knn", layer=1) > 0.95
    assert _value(frame, "cd_knn_p_value", layer=1) < 0.05
    assert _value(frame, "cd_knn_null_p95", layer=1) < 0.45
    assert _value(frame, "surface_baseline") < 0.5  # the surface reader sees noise: near chance
    sel = _value(frame, "cd_knn_selectivity", layer=1)
    assert sel > 0.4 and _value(frame, "cd_knn_selectivity_ci_low", layer=1) > 0.3
    low, high = _value(frame, "cd_knn_ci_low", layer=1), _value(frame, "cd_knn_ci_high", layer=1)
    assert low <= _value(frame, "cd_knn", layer=1) <= high
    assert set(frame.n.unique()) >= {len(y), 30}


def test_a_surface_that_gives_the_concept_away_has_a_baseline_close_to_decodability():
    X, labels, y = _planted(sep=4.0)
    leak = {"answers": np.eye(4, dtype=np.float32)[y] * 3 + np.random.default_rng(2).normal(size=(len(y), 4))}
    frame = _frame(decodability_suite(X, labels, [0, 1, 2], surface=leak, settings=FAST))
    assert _value(frame, "surface_baseline") > 0.9
    assert abs(_value(frame, "cd_knn_selectivity", layer=1)) < 0.1
    # where the model layer carries nothing (layer 0) the selectivity is strongly negative
    assert _value(frame, "cd_knn_selectivity", layer=0) < -0.5


def test_heldout_peak_picks_the_informative_layer_and_reports_on_other_prompts():
    X, labels, y = _planted(sep=4.0)
    knn = knn_decodability(X, labels, k=10)
    peak = heldout_peak(knn.correct(), y, seed=0)
    assert peak.layer_index == 1 and peak.n_select + peak.n_report == len(y)
    a, b = split_halves(y, 0)
    assert not set(a) & set(b) and all((y[a] == c).sum() == 15 for c in range(4))
    assert peak.value == pytest.approx(knn.correct()[1, b].mean())


def test_heldout_peak_is_not_biased_upward_like_the_in_sample_maximum():
    """Thirty layers of pure noise: the in-sample max is well above the null; the held-out one is not."""
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(4), 40)
    maxima, heldout = [], []
    for rep in range(6):
        correct = rng.random((30, len(y))) < 0.25
        maxima.append(correct.mean(axis=1).max())
        heldout.append(heldout_peak(correct, y, seed=rep).value)
    assert np.mean(maxima) > 0.30
    assert abs(np.mean(heldout) - 0.25) < 0.04


def test_p_value_counts_ties_and_the_observation():
    assert permutation_p_value(np.array([0.5]), np.array([[0.1, 0.5, 0.9, 0.2]]))[0] == pytest.approx(3 / 5)


def test_pairs_are_measured_on_their_own_prompts_with_chance_one_half():
    X, labels, y = _planted(sep=4.0)
    frame = _frame(
        decodability_suite(X, labels, [0, 1, 2], pairs=[("c0", "c1"), ("c0", "zz")], settings=FAST)
    )
    pair = pair_label("c0", "c1")
    assert _value(frame, "cd_knn", pair, layer=1) > 0.95
    assert _value(frame, "cd_knn_null_p95", pair, layer=1) < 0.65
    rows = frame[frame.concept == pair]
    assert (rows[rows.metric == "cd_knn"].n == 60).all()
    assert (rows[rows.metric == "cd_knn_heldout_peak"].n == 30).all()
    assert pair_label("c0", "zz") not in set(frame.concept)  # an absent concept: skipped


def test_probe_null_exists_only_at_its_chosen_layers():
    X, labels, _ = _planted(layers=6, sep=3.0)
    settings = SuiteSettings(n_permutations=10, probe_permutations=2, probe_null_layers=2, n_bootstrap=100)
    frame = _frame(decodability_suite(X, labels, list(range(6)), settings=settings))
    probe_null = frame[(frame.metric == "probe_accuracy_null_p95") & (frame.concept == "all")]
    assert 2 <= len(probe_null) < 6
    assert len(frame[(frame.metric == "cd_knn_null_p95") & (frame.concept == "all")]) == 6

    none = SuiteSettings(n_permutations=10, probe_permutations=0, n_bootstrap=100)
    frame = _frame(decodability_suite(X, labels, list(range(6)), settings=none))
    assert not frame.metric.str.startswith("probe_accuracy_null").any()
    assert not (frame.metric == "probe_accuracy_p_value").any()
    assert (frame.metric == "probe_accuracy").sum() >= 6


def test_bag_of_words_keeps_words_seen_in_two_documents():
    counts, vocab = bag_of_words([words("a b b"), words("b c"), words("d")])
    assert vocab == ["b"] and counts[:, 0].tolist() == [2, 1, 0]
    assert words("Input: 1011 x.") == ["Input", ":", "1011", "x", "."]
