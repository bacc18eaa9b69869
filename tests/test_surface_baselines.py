"""The surface baselines on the real task generators: they see what a lexical reader sees, both ways.

- On ``pos`` v1 (disjoint word lists) the answers' word class gives the concept away: the baseline is near 1.
- Within the pairs of ``first-last`` (same answer class) the word-class reader is at chance by construction.
- A "model" whose representation is only the prompt's surface has a selectivity of about zero, and one that
  carries the concept beyond the surface has a clearly positive one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conceptprobe.measures.suite import SuiteSettings, decodability_suite, pair_label
from conceptprobe.measures.surface import surface_features
from conceptprobe.prompts import build_prompts
from conceptprobe.tasks import get_task

FAST = SuiteSettings(n_permutations=20, probe_permutations=2, probe_null_layers=1, n_bootstrap=200)


def _prompts(task, shots: int, n: int):
    prompts = [p for c in task.concepts for p in build_prompts(task, c, shots, n, seed=0)]
    return prompts, [p.concept for p in prompts]


def _value(frame: pd.DataFrame, metric: str, concept: str = "all", layer: int | None = None) -> float:
    sel = frame[(frame.metric == metric) & (frame.concept == concept)]
    sel = sel[sel.layer.isna()] if layer is None else sel[sel.layer == layer]
    assert len(sel) == 1, (metric, concept, layer)
    return float(sel.value.iloc[0])


def test_the_word_class_reader_gives_pos_v1_away():
    task = get_task("pos", version=1)
    prompts, labels = _prompts(task, 4, 40)
    surface = surface_features(prompts, task)
    noise = np.random.default_rng(0).normal(size=(1, len(labels), 8)).astype(np.float32)
    frame = pd.DataFrame(decodability_suite(noise, labels, [0], surface=surface, settings=FAST))
    assert _value(frame, "surface_lexical_probe") > 0.8  # the concept is the answers' lexical class
    assert _value(frame, "surface_baseline") >= _value(frame, "surface_lexical_probe")
    assert _value(frame, "cd_knn_selectivity", layer=0) < -0.6  # noise is far below what the surface gives


@pytest.mark.parametrize("shots", [4, 10])
def test_the_word_class_reader_is_at_chance_within_first_last_pairs(shots):
    task = get_task("first-last")
    prompts, labels = _prompts(task, shots, 40)
    surface = surface_features(prompts, task)
    noise = np.random.default_rng(1).normal(size=(1, len(labels), 8)).astype(np.float32)
    frame = pd.DataFrame(
        decodability_suite(
            noise, labels, [0], surface={"lexical": surface["lexical"]}, pairs=task.pairs, settings=FAST
        )
    )
    for a, b in task.pairs:
        for clf in ("knn", "probe"):
            assert 0.3 <= _value(frame, f"surface_lexical_{clf}", pair_label(a, b)) <= 0.7
    # across all concepts it still separates noun concepts from verb concepts (and from null): above chance
    assert _value(frame, "surface_lexical_probe") > 0.35


def test_a_representation_of_the_surface_alone_has_no_selectivity_and_one_of_the_concept_has_some():
    task = get_task("pos", version=1)
    prompts, labels = _prompts(task, 1, 40)
    surface = surface_features(prompts, task)
    y = np.array([task.concepts.index(c) for c in labels])
    rng = np.random.default_rng(2)
    copy = surface["lexical"] + rng.normal(0, 0.01, surface["lexical"].shape)  # reads exactly the surface
    concept = np.eye(len(task.concepts))[y] * 6 + rng.normal(size=(len(y), len(task.concepts)))  # knows more
    X = np.stack([np.pad(copy, ((0, 0), (0, concept.shape[1] - copy.shape[1]))), concept]).astype(np.float32)
    frame = pd.DataFrame(
        decodability_suite(X, labels, [0, 1], surface={"lexical": surface["lexical"]}, settings=FAST)
    )
    assert abs(_value(frame, "cd_knn_selectivity", layer=0)) < 0.08
    assert _value(frame, "cd_knn_selectivity_ci_low", layer=1) > 0.05
