"""Head ablation: the hook against a hand-edited forward, the experiment end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conceptprobe.experiments.ablation import (
    AblationConfig,
    ablate,
    add_paired_changes,
    control_sets,
    paired_accuracy_changes,
    parse_head,
    rank_heads,
)
from conceptprobe.hooks import HeadAblation, head_layout, head_output_means
from conceptprobe.models import LoadedModel, ModelInfo
from helpers import make_model, make_tokenizer


def _ids(seed: int = 0, n: int = 2, t: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 600, (n, t), generator=g)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3"])
def test_zero_ablation_equals_zeroed_o_proj_columns(family):
    model = make_model(family, layers=3)
    ids = _ids()
    heads = [(1, 2), (2, 0), (2, 3)]
    before = _logits(model, ids)
    with HeadAblation(model, heads, "zero"):
        got = _logits(model, ids)
    _, _, d = head_layout(model)
    edited = make_model(family, layers=3)
    with torch.no_grad():
        for b, h in heads:
            edited.model.layers[b].self_attn.o_proj.weight[:, h * d : (h + 1) * d] = 0
    torch.testing.assert_close(got, _logits(edited, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, before)
    # nothing ablated changes nothing; the hooks are gone afterwards
    with HeadAblation(model, [], "zero"):
        torch.testing.assert_close(_logits(model, ids), before)
    torch.testing.assert_close(_logits(model, ids), before)
    assert all(not layer.self_attn.o_proj._forward_pre_hooks for layer in model.model.layers)


def test_mean_ablation_uses_the_given_means():
    model = make_model("llama", layers=2)
    ids = _ids(1)
    means = head_output_means(model, _ids(2, n=3), batch_size=2)
    n_blocks, n_heads, d = head_layout(model)
    assert means.shape == (n_blocks, n_heads, d) and means.abs().sum() > 0
    # the means are the plain average of the o_proj input over every token
    ref, proj = _ids(2, n=3), model.model.layers[1].self_attn.o_proj
    seen: list[torch.Tensor] = []
    handle = proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    _logits(model, ref)
    handle.remove()
    torch.testing.assert_close(means[1], seen[0].reshape(-1, n_heads, d).mean(0), atol=1e-5, rtol=1e-5)
    seen.clear()
    with HeadAblation(model, [(1, 3)], "mean", means):  # pre-hooks run in order: the spy sees the result
        handle = proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        _logits(model, ids)
    handle.remove()
    x = seen[0][..., 3 * d : 4 * d]
    torch.testing.assert_close(x, means[1, 3].expand_as(x))
    with pytest.raises(ValueError, match="needs means"):
        HeadAblation(model, [(1, 3)], "mean")


def test_bad_head_index_is_one_line_error():
    model = make_model("llama", layers=2)
    with pytest.raises(ValueError, match=r"L5H0 is out of range.*blocks 0..1.*heads\.json") as err:
        HeadAblation(model, [(5, 0)])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="L18H6"):
        parse_head("18:6")


def test_control_sets_exclude_ablated_and_differ():
    ablated = [(0, 1), (2, 3)]
    sets = control_sets(ablated, 3, 4, "random", 5, seed=0)
    assert len({frozenset(s) for s in sets}) == 5
    assert all(len(s) == 2 and not set(s) & set(ablated) for s in sets)
    matched = control_sets(ablated, 3, 4, "layer-matched", 3, seed=0)
    assert all(sorted(b for b, _ in s) == [0, 2] and not set(s) & set(ablated) for s in matched)
    assert control_sets(ablated, 3, 4, "random", 5, seed=0) == sets


def test_rank_heads_puts_induction_heads_first():
    pm = [[0.1, 0.9], [0.5, 0.7]]
    record = {
        "prefix_matching": pm,
        "copying": [[0, 0], [1, 1]],
        "induction_heads": [{"block": 1, "head": 1}],
    }
    assert [r["label"] for r in rank_heads(record)] == ["L1H1", "L0H1", "L1H0", "L0H0"]


def _loaded() -> LoadedModel:
    model = make_model("llama", layers=3)
    info = ModelInfo(
        ref="tiny", source="local", family="llama", architecture=type(model).__name__, n_params=1, n_layers=3,
        hidden_size=32, dtype="float32",
    )  # fmt: skip
    return LoadedModel(model, make_tokenizer(), info)


def _config(**kw) -> AblationConfig:
    base = dict(
        model="tiny", dtype="float32", k=2, draws=3, n_contexts=3, n_tokens=40, late=30, early=5, tasks=["bitwise"],
        shots=1, n=4, n_bootstrap=50, n_permutations=2, n_seqs=3, seq_len=6,
    )  # fmt: skip
    return AblationConfig(**{**base, **kw})


def test_ablate_end_to_end(tmp_path):
    from conceptprobe.experiments.heads import HeadsConfig, head_scores
    from conceptprobe.results import load_runs

    loaded = _loaded()
    heads_dir = tmp_path / "heads"
    head_scores(
        HeadsConfig(model="tiny", n_seqs=2, seq_len=8, freq_docs=5), heads_dir, loaded=loaded, progress=False
    )
    out = tmp_path / "abl"
    result = ablate(_config(heads_folder=str(heads_dir)), out, loaded=loaded, progress=False)
    assert {p.name for p in out.iterdir()} >= {
        "ablation.json",
        "metrics.parquet",
        "ablation.png",
        "predictions.jsonl",
    }
    rec = json.loads((out / "ablation.json").read_text())
    ranking = rank_heads(json.loads((heads_dir / "heads.json").read_text()))
    assert rec["kind"] == "ablation" and rec["ablated"] == [r["label"] for r in ranking[:2]]
    m = pd.read_parquet(out / "metrics.parquet")
    assert set(m.condition) == {"baseline", "induction", "control"}
    assert {"icl_score", "icl_accuracy", "cd_knn", "prefix_matching_top_k"} <= set(m.metric)
    # prefix matching: the top-k set is fixed, the best intact head is never an ablated one
    for cond in rec["conditions"]:
        best = cond["induction"]["prefix_matching_best_intact"]
        assert best["head"] not in cond["heads"] and best["ci"][0] <= best["value"] <= best["ci"][1]
    ctrl = m[(m.condition == "control") & m.draw.notna()]
    assert sorted(ctrl.draw.unique()) == [0, 1, 2]
    sets = {frozenset(h.split(",")) for h in ctrl.heads}
    assert len(sets) == 3 and not any(s & set(rec["ablated"]) for s in sets)
    summ = m[(m.condition == "control") & m.draw.isna() & (m.metric == "icl_score")]
    assert summ.value.item() == pytest.approx(ctrl[ctrl.metric == "icl_score"].value.mean())
    assert (m[m.condition == "baseline"].delta == 0).all()
    # the control sets change the model's output
    icl = ctrl[ctrl.metric == "icl_score"].value
    assert icl.nunique() > 1
    # load_runs stacks the folder as kind ablation
    stacked = load_runs([out])
    assert set(stacked.kind) == {"ablation"} and len(stacked) == len(m)
    # the report's causal section shows the ablation table (3 conditions) and its figure
    from conceptprobe.report.extra_sections import build_sections
    from conceptprobe.report.extras import find_extras

    ex = find_extras([out])
    assert len(ex.ablation) == 1 and ex.has_causal
    (section,) = build_sections(ex, {})
    (table,) = [b for b in section.blocks if getattr(b, "cls", None) == "ablation"]
    assert [r["condition"].text for r in table.rows] == ["baseline", "induction", "control"]
    assert table.rows[0]["m0"].value == pytest.approx(rec["conditions"][0]["icl_score"]["value"])
    assert any(f.key.startswith("causal_ablation_") for f in section.figures)
    assert any("paired over the same prompts" in getattr(b, "text", "") for b in section.blocks)
    # the paired accuracy changes are in the record and recomputed equal from predictions.jsonl
    paired = {e["task"]: e for e in rec["paired_accuracy"]}
    assert (
        set(paired) == set(m[m.metric == "icl_accuracy"].task)
        and paired[next(iter(paired))]["control"]["draws"] == 3
    )
    assert add_paired_changes(out)["paired_accuracy"] == rec["paired_accuracy"]
    # the same seed gives the same result
    again = ablate(_config(heads_folder=str(heads_dir)), None, loaded=loaded, progress=False)
    pd.testing.assert_frame_equal(again.metrics.reset_index(drop=True), result.metrics.reset_index(drop=True))


def test_prefix_matching_per_sequence_matches_the_heads_measure():
    from conceptprobe.experiments.ablation import prefix_matching_per_sequence
    from conceptprobe.measures.induction import induction_head_scores, repeated_random_tokens

    model = make_model("llama", layers=3)
    candidates = list(range(10, 200))
    ids = repeated_random_tokens(candidates, 4, 7, 3, [1], seed=3)
    per_seq = prefix_matching_per_sequence(model, ids, 1 + 7)
    ref = induction_head_scores(model, candidates, [1], 4, 7, 3, seed=3)
    # every sequence has the same number of queries, so the per-sequence mean is the pooled mean
    assert per_seq.shape == (4, *ref.prefix_matching.shape)
    torch.testing.assert_close(
        torch.from_numpy(per_seq.mean(0)), ref.prefix_matching.float(), atol=1e-5, rtol=1e-5
    )
    # ablating block 0's heads changes later blocks' patterns, not block 0's own
    with HeadAblation(model, [(0, h) for h in range(head_layout(model)[1])], "zero"):
        ablated = prefix_matching_per_sequence(model, ids, 1 + 7)
    assert abs(ablated[:, 0] - per_seq[:, 0]).max() < 1e-5
    assert abs(ablated[:, 1:] - per_seq[:, 1:]).max() > 1e-4


def test_ablate_explicit_heads_mean_mode_and_bad_head():
    loaded = _loaded()
    got = ablate(
        _config(heads=["L0H1", "L2H3"], draws=2, mode="mean", control="layer-matched", tasks=[]),
        loaded=loaded,
        progress=False,
    )
    assert got.record["ablated"] == ["L0H1", "L2H3"]
    assert all(sorted(int(h[1]) for h in s) == [0, 2] for s in got.record["control_sets"])
    with pytest.raises(ValueError, match=r"L7H0 is out of range") as err:
        ablate(_config(heads=["L7H0"], tasks=[]), loaded=loaded, progress=False)
    assert "\n" not in str(err.value)


def test_ablate_cli_smoke(tmp_path):
    import typer
    from typer.testing import CliRunner

    from conceptprobe.commands import causal_cmds

    folder = tmp_path / "tiny-llama"
    make_model("llama", layers=3).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    app = typer.Typer()
    causal_cmds.register(app)
    out = tmp_path / "abl"
    args = ["ablate", "--model", str(folder), "--heads", "L0H1,L2H3", "--draws", "2", "--tasks", "bitwise"]
    args += ["--shots", "1", "--n", "3", "--n-contexts", "2", "--dtype", "float32", "--out", str(out)]
    got = CliRunner().invoke(app, [*args, "--no-progress"])
    assert got.exit_code == 0, got.output
    assert "ICL score" in got.output and "bitwise accuracy" in got.output
    rec = json.loads((out / "ablation.json").read_text())
    assert rec["ablated"] == ["L0H1", "L2H3"] and len(rec["control_sets"]) == 2
    again = CliRunner().invoke(app, [*args, "--no-progress"])
    assert again.exit_code == 2  # a non-empty --out is refused (usage error naming --overwrite)


def test_paired_accuracy_changes_on_planted_predictions():
    """Half the prompts lose their answer under the ablation: change -0.5 with a paired interval inside
    [-1, 0]; the two control draws change nothing and one prompt; null prompts are left out."""

    def rows(cond, draw, correct):
        return [
            {"condition": cond, "draw": draw, "task": "t", "concept": c, "index": i, "correct": ok}
            for (c, i), ok in correct.items()
        ]

    keys = [(c, i) for c in ("a", "b") for i in range(10)]
    base = dict.fromkeys(keys, True)
    ablated = {k: k[1] >= 5 for k in keys}  # indices 0-4 of each concept lost
    one_lost = {k: k != ("a", 0) for k in keys}
    preds = rows("baseline", None, base) + rows("induction", None, ablated)
    preds += rows("control", 0, base) + rows("control", 1, one_lost)
    preds += [
        {"condition": "baseline", "draw": None, "task": "t", "concept": "null", "index": 0, "correct": False}
    ]
    (entry,) = paired_accuracy_changes(preds, n_boot=500, seed=0)
    assert entry["n"] == 20 and entry["induction"]["delta"] == pytest.approx(-0.5)
    low, high = entry["induction"]["ci"]
    assert -1 < low < -0.5 < high < 0
    assert entry["control"]["each"] == pytest.approx([0.0, -0.05]) and entry["control"]["draws"] == 2
    assert entry["control"]["std"] == pytest.approx(np.std([0.0, -0.05], ddof=1))
