"""Training on synthetic tasks: generators, models, trainer (checkpoints, exact resume), tracking, report, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conceptprobe.tasks.synthetic_data import (
    RegressionSpec,
    SegmentSpec,
    concept_bases,
    regression_eval_set,
    regression_train_batch,
    sample_regression,
    sample_segments,
    step_rng,
)
from conceptprobe.training.model import ModelSpec, build_lm, build_regression_model, residual_stream
from conceptprobe.training.trainer import (
    TrainConfig,
    checkpoint_steps,
    complete_checkpoints,
    learning_rate,
    load_model_at,
    load_optimizer_tensors,
    load_train_config,
    optimizer_tensors,
    train,
)

REPO = Path(__file__).resolve().parents[1]

TINY_REG = {
    "name": "tiny-reg",
    "task": "sparse_regression",
    "data": {"dim": 8, "n_bases": 2, "rank": 2, "n_examples": 6},
    "model": {"n_layer": 2, "n_head": 2, "d_model": 16},
    "steps": 30,
    "batch_size": 8,
    "warmup": 5,
    "checkpoints": {"every": 10, "log_points": 3},
    "tracking": {"n_per_concept": 12, "probe_folds": 3, "knn_k": 3, "umap_snapshots": 2},
}
TINY_IND = {
    "name": "tiny-ind",
    "task": "repeated_segments",
    "data": {"vocab_size": 32, "seq_len": 24, "segment_min": 3, "segment_max": 6},
    "model": {"arch": "llama", "n_layer": 2, "n_head": 2, "d_model": 16, "attention_only": True},
    "steps": 20,
    "batch_size": 8,
    "warmup": 5,
    "checkpoints": {"every": 10, "log_points": 2},
    "tracking": {"n_contexts": 16, "n_token_loss_contexts": 8, "head_seqs": 4},
    "controls": {"one_layer": {"model": {"n_layer": 1}}},
}


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("basis", ["sparse", "rotated"])
def test_bases_orthonormal_and_mutually_orthogonal(basis: str) -> None:
    spec = RegressionSpec(dim=16, n_bases=4, rank=4, basis=basis)
    B = concept_bases(spec)
    assert B.shape == (4, 16, 4)
    for z in range(4):
        np.testing.assert_allclose(B[z].T @ B[z], np.eye(4), atol=1e-12)
        for w in range(z + 1, 4):
            np.testing.assert_allclose(B[z].T @ B[w], 0.0, atol=1e-12)
    if basis == "sparse":  # coordinate axes: W is sparse
        assert set(np.unique(B)) <= {0.0, 1.0}


def test_overlap_shares_directions() -> None:
    spec = RegressionSpec(dim=16, n_bases=4, rank=4, overlap=2)
    B = concept_bases(spec)
    assert np.linalg.matrix_rank(np.concatenate([B[0], B[1]], axis=1)) == 6  # 2 shared directions
    with pytest.raises(ValueError, match="need"):
        RegressionSpec(dim=8, n_bases=4, rank=4)


def test_regression_targets_exact_and_in_the_concept_span() -> None:
    spec = RegressionSpec(dim=16, n_bases=4, rank=4, n_examples=20, basis="rotated")
    B = concept_bases(spec)
    z = np.array([0, 1, 2, 3, -1, 2])
    batch = sample_regression(spec, z, np.random.default_rng(0), B)
    assert batch.x.shape == (6, 20, 16) and batch.y.shape == (6, 20) and batch.W.shape == (6, 16)
    for i, c in enumerate(z[:4]):
        np.testing.assert_allclose(batch.y[i], batch.x[i] @ batch.W[i], rtol=0, atol=1e-12)  # y = W^T x
        P = B[c] @ B[c].T
        np.testing.assert_allclose(P @ batch.W[i], batch.W[i], atol=1e-12)  # W lies in the basis
    assert (batch.W[4] == 0).all()  # null: y independent of x
    tokens = batch.tokens()
    assert tokens.shape == (6, 40, 17)
    np.testing.assert_array_equal(tokens[:, 0::2, :16], batch.x.astype(np.float32))
    assert (tokens[:, 0::2, 16] == 0).all() and (tokens[:, 1::2, :16] == 0).all()
    np.testing.assert_array_equal(tokens[:, 1::2, 16], batch.y.astype(np.float32))
    assert (batch.tokens("xy")[:, 1::2, :16] == tokens[:, 0::2, :16]).all()


def test_regression_noise_and_mixture() -> None:
    spec = RegressionSpec(noise_std=0.5, weights=(3, 1, 0, 0))
    batch = regression_train_batch(spec, 400, step_rng(0, 0))
    assert set(np.unique(batch.concept)) == {0, 1}
    assert (batch.concept == 0).mean() > 0.6
    resid = batch.y - np.einsum("bkd,bd->bk", batch.x, batch.W)
    assert 0.4 < resid.std() < 0.6
    a, b = regression_train_batch(spec, 4, step_rng(3, 7)), regression_train_batch(spec, 4, step_rng(3, 7))
    np.testing.assert_array_equal(a.x, b.x)  # batch s depends only on (seed, s)
    ev = regression_eval_set(spec, 5, seed=0)
    assert (
        list(ev.labels(spec))
        == ["basis0"] * 5 + ["basis1"] * 5 + ["basis2"] * 5 + ["basis3"] * 5 + ["null"] * 5
    )


def test_repeated_segments_really_repeat() -> None:
    spec = SegmentSpec(vocab_size=50, seq_len=64, segment_min=4, segment_max=10, repeat_prob=0.5)
    batch = sample_segments(spec, 32, np.random.default_rng(0))
    assert batch.ids.shape == (32, 65) and (batch.ids[:, 0] == 0).all()
    assert ((batch.ids[:, 1:] >= 1) & (batch.ids[:, 1:] < 50)).all()
    rows, cols = np.nonzero(batch.copy_src >= 0)
    assert len(rows) > 0.25 * batch.ids[:, 1:].size  # a good share of tokens are copies
    src = batch.copy_src[rows, cols]
    assert (src < cols).all() and (src >= 1).all()
    np.testing.assert_array_equal(batch.ids[rows, cols], batch.ids[rows, src])
    pred = batch.predictable
    r, c = np.nonzero(pred)
    np.testing.assert_array_equal(batch.ids[r, c - 1], batch.ids[r, batch.copy_src[r, c] - 1])  # same prefix


# ---------------------------------------------------------------- text tasks


def test_text_tasks_registered_and_exact() -> None:
    from conceptprobe.tasks import get_task, task_names
    from conceptprobe.tasks.registry import task_origin

    assert {"sparse_regression", "repeated_segments"} <= set(task_names())
    assert task_origin("sparse_regression") == task_origin("repeated_segments") == "builtin"
    rng = np.random.default_rng(0)
    reg = get_task("sparse_regression", dim=8, n_bases=2, rank=3, overlap=1)
    assert reg.concepts == ("basis0", "basis1", "null")
    for _ in range(20):
        ex = reg.sample("basis1", rng)
        x = [int(v) for v in ex.input.split()]
        assert len(x) == 8 and int(ex.answer) == sum(x[2:5])
    seg = get_task("repeated_segments")
    for _ in range(50):
        ex = seg.sample("copy", rng)
        letters = ex.input.split()
        cue = letters[-1]
        first = letters.index(cue)
        assert letters.count(cue) == 2 and first < len(letters) - 1
        assert ex.answer == letters[first + 1]
    with pytest.raises(ValueError, match="unknown parameter"):
        get_task("sparse_regression", width=3)


# ---------------------------------------------------------------- models


def test_regression_model_and_residual_stream() -> None:
    torch.manual_seed(0)
    spec = ModelSpec(n_layer=3, n_head=2, d_model=16)
    model = build_regression_model(spec, token_dim=9, n_positions=12).eval()
    x = torch.randn(4, 12, 9)
    out = model(x)
    assert out.shape == (4, 12)
    reps = residual_stream(model.blocks, lambda: model(x), [10])
    assert reps.shape == (4, 4, 1, 16)
    hs = model.backbone(inputs_embeds=model.read_in(x), output_hidden_states=True).hidden_states
    for layer in range(3):  # HF's last entry is after the final norm; ours is before it
        torch.testing.assert_close(reps[layer, :, 0], hs[layer][:, 10])


def test_attention_only_has_no_mlp() -> None:
    from conceptprobe.training.model import ZeroMLP, lm_blocks

    for arch in ("gpt2", "llama"):
        model = build_lm(ModelSpec(arch=arch, n_layer=2, n_head=2, d_model=16, attention_only=True), 20, 16)
        assert all(isinstance(b.mlp, ZeroMLP) for b in lm_blocks(model))
        assert not any("mlp" in n for n, _ in model.named_parameters())
        assert model(input_ids=torch.randint(0, 20, (2, 16))).logits.shape == (2, 16, 20)


# ---------------------------------------------------------------- trainer


def test_schedule_and_config(tmp_path: Path) -> None:
    steps = checkpoint_steps(1000, 250, 5)
    assert steps[0] == 0 and steps[-1] == 1000 and {1, 250, 500, 750} <= set(steps)
    cfg = TrainConfig(**{**TINY_REG, "schedule": "cosine", "warmup": 10, "steps": 110, "min_lr_ratio": 0.1})
    assert learning_rate(cfg, 0) == pytest.approx(1e-4) and learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 110) == pytest.approx(1e-4)
    for name in ("concepts-cpu", "induction-cpu", "concepts-paper"):
        preset = load_train_config(REPO / "probes" / f"train-{name}.yaml")
        assert preset.name == name
    path = _write(tmp_path / "bad.yaml", {**TINY_REG, "model": {"n_layer": 2, "n_head": 3, "d_model": 16}})
    with pytest.raises(ValueError, match="divisible"):
        load_train_config(path)
    with pytest.raises(ValueError, match="unknown preset"):
        load_train_config("no-such-preset")


def test_optimizer_state_roundtrip() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    tensors, meta = optimizer_tensors(opt)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.5)
    load_optimizer_tensors(opt2, tensors, meta)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key in a["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key])


@pytest.fixture(scope="module")
def reg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reg") / "run"
    train(TrainConfig(**TINY_REG), folder, progress=False)
    return folder


def test_training_reduces_loss_and_tracks(reg_run: Path) -> None:
    m = pd.read_parquet(reg_run / "metrics.parquet")
    loss = m[(m.metric == "loss") & (m.concept == "all")].set_index("step")["value"]
    assert loss[30] < loss[0] - 0.2
    knn = m[(m.metric == "cd_knn") & (m.step == 30)]
    assert set(knn.layer) == {0, 1, 2} and set(knn.concept) == {"all", "basis0", "basis1"}
    assert {"probe_accuracy", "loss_last", "loss_at_k"} <= set(m.metric)
    assert complete_checkpoints(reg_run) == [0, 1, 5, 10, 20, 30]
    assert (reg_run / "checkpoints" / "step_0000030" / "optimizer.safetensors").is_file()
    assert not (reg_run / "checkpoints" / "step_0000020" / "optimizer.safetensors").exists()
    info = json.loads((reg_run / "train.json").read_text())
    assert info["status"] == "complete" and info["n_params"] > 0
    log = pd.read_csv(reg_run / "train_log.csv")
    assert log["step"].tolist() == [1, 5, 10, 20, 30]


def _same_run(a: Path, b: Path, step: int) -> None:
    ma, mb = load_model_at(a, step), load_model_at(b, step)
    for (na, pa), (_, pb) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    fa = (
        pd.read_parquet(a / "metrics.parquet")
        .sort_values(["step", "metric", "concept", "layer"])
        .reset_index(drop=True)
    )
    fb = (
        pd.read_parquet(b / "metrics.parquet")
        .sort_values(["step", "metric", "concept", "layer"])
        .reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(fa, fb)
    pd.testing.assert_frame_equal(
        pd.read_csv(a / "train_log.csv").drop(columns="elapsed_s"),
        pd.read_csv(b / "train_log.csv").drop(columns="elapsed_s"),
    )


def test_resume_after_interruption_is_exact(reg_run: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(**TINY_REG)
    folder = tmp_path / "run"
    first = train(cfg, folder, progress=False, stop_at=10)
    assert not first.complete and complete_checkpoints(folder)[-1] == 10
    assert json.loads((folder / "train.json").read_text())["status"] == "interrupted"
    second = train(cfg, folder, progress=False)
    assert second.resumed_from == 10 and second.complete
    _same_run(reg_run, folder, 30)
    other = TrainConfig(**{**TINY_REG, "lr": 0.01})
    with pytest.raises(ValueError, match="different config"):
        train(other, folder, progress=False)


def test_resume_after_sigkill_is_exact(reg_run: Path, tmp_path: Path) -> None:
    """A real SIGKILL of a training subprocess midway; the rerun continues to identical results."""
    cfg = {**TINY_REG, "steps": 30}
    preset = _write(tmp_path / "tiny.yaml", cfg)
    folder = tmp_path / "run"
    code = (
        "import time, conceptprobe.training.trainer as T\n"
        "orig = T.Run.update\n"
        "def slow(self, step):\n"
        "    time.sleep(0.05)\n"
        "    return orig(self, step)\n"
        "T.Run.update = slow\n"
        f"T.train(T.load_train_config({str(preset)!r}), {str(folder)!r}, progress=False)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (
            not complete_checkpoints(folder) or complete_checkpoints(folder)[-1] < 10
        ):
            if proc.poll() is not None:
                raise AssertionError(f"trainer exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed_at = complete_checkpoints(folder)[-1]
    assert 10 <= killed_at < 30
    result = train(TrainConfig(**cfg), folder, progress=False)
    assert result.resumed_from == killed_at
    _same_run(reg_run, folder, 30)


# ---------------------------------------------------------------- tracking and analysis


def test_icl_positions_and_transition() -> None:
    from conceptprobe.training.figures import transition
    from conceptprobe.training.tracking import icl_positions

    assert icl_positions(512) == (50, 500)
    assert icl_positions(64) == (6, 62)
    steps = np.arange(0, 1100, 100)
    loss = np.array([1, 1, 1, 0.98, 0.9, 0.5, 0.2, 0.1, 0.1, 0.1, 0.1])
    t = transition(steps, loss, rising=False, min_amp=0.1)
    assert t is not None and t["start"] == 300 and t["mid"] == 500 and t["end"] == 700
    assert t["from"] == pytest.approx(1.0) and t["to"] == pytest.approx(0.1)
    assert transition(steps, np.full(11, 0.5), rising=True, min_amp=0.1) is None


def test_induction_tracker_sees_a_handmade_induction_head() -> None:
    """Prefix matching of a model whose last-layer attention is forced onto the induction target."""
    from conceptprobe.measures.induction import (
        prefix_matching_scores,
        prefix_matching_targets,
        repeated_random_tokens,
    )

    ids = repeated_random_tokens(np.arange(1, 30), n_seqs=2, seq_len=6, n_repeats=3, prefix=[0], seed=0)
    targets, _ = prefix_matching_targets(ids, first_query=7)
    attn = targets.float() / targets.float().sum(-1, keepdim=True).clamp(min=1)
    attn = attn[:, None].expand(-1, 2, -1, -1)  # 2 heads
    assert torch.allclose(prefix_matching_scores(attn, ids, 7), torch.ones(2))


def test_induction_run_report_and_cli(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from conceptprobe.commands.train_cmds import register

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps typer in multi-command mode
        pass

    preset = _write(tmp_path / "tiny-ind.yaml", TINY_IND)
    out = tmp_path / "ind"
    res = CliRunner().invoke(app, ["train", "--preset", str(preset), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    m = pd.read_parquet(out / "metrics.parquet")
    assert {"prefix_matching", "copying", "icl_score", "loss_copy", "loss_fresh"} <= set(m.metric)
    assert set(m[m.metric == "prefix_matching"]["head"].dropna()) == {0, 1}
    assert (out / "controls" / "one_layer" / "metrics.parquet").is_file()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "http://" not in page and "https://" not in page
    assert "one_layer" in page and (out / "report.md").is_file() and (out / "token_loss_pca.json").is_file()
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["induction"]["n_layers"] == 2 and "one_layer" in analysis["controls"]
    (out / "report.html").unlink()
    res = CliRunner().invoke(app, ["train", "--report-only", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "report.html").is_file()


def test_regression_report(reg_run: Path) -> None:
    from conceptprobe.training.figures import build_training_report

    path = build_training_report(reg_run, umap=False)
    page = path.read_text()
    assert "basis0" in page and page.count("data:image/png;base64,") >= 4
    analysis = json.loads((reg_run / "analysis.json").read_text())
    assert set(analysis["concepts"]["concepts"]) == {"basis0", "basis1"}
    assert analysis["concepts"]["chance"] == pytest.approx(0.5)
