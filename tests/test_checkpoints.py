"""Checkpoint sweeps (issue 15, part 3): training checkpoints through the model loader, the sweep reproducing
the trainer's tracked values, resume, hub revisions (no network), local folders with concept tasks, the
report, and one-line errors for bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import conceptprobe as cp
from conceptprobe.cli import run_cli
from conceptprobe.config import ConfigError
from conceptprobe.experiments.checkpoint_config import (
    load_checkpoint_config,
    plan_checkpoints,
    validate_checkpoint_config,
)
from conceptprobe.experiments.checkpoints import checkpoint_sweep
from conceptprobe.models import ModelLoadError, load_model
from conceptprobe.training.trainer import TrainConfig, load_model_at, train
from helpers import make_model, make_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny-ind",
    "task": "repeated_segments",
    "data": {"vocab_size": 32, "seq_len": 24, "segment_min": 3, "segment_max": 6},
    "model": {"arch": "llama", "n_layer": 2, "n_head": 2, "d_model": 16, "attention_only": True},
    "steps": 30,
    "batch_size": 8,
    "lr": 0.003,
    "warmup": 5,
    "checkpoints": {"every": 10, "log_points": 2},
    "tracking": {"n_contexts": 16, "n_token_loss_contexts": 4, "head_seqs": 4},
}
STEPS = [0, 1, 10, 20, 30]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train") / "tiny-ind"
    train(TrainConfig(**TINY), folder, progress=False, controls=False)
    return folder


def _config(run_folder: Path, **over: object) -> object:
    return validate_checkpoint_config({"name": "tiny-ck", "train_folder": str(run_folder), **over}, "test")


# ---------------------------------------------------------------- the adapter


def test_training_checkpoints_load_through_the_model_loader(run_folder: Path) -> None:
    ckpt = run_folder / "checkpoints" / "step_0000010"
    loaded = load_model(str(ckpt))
    info = loaded.info
    assert info.source == "training" and info.revision == "step_0000010"
    assert info.extra["step"] == 10 and info.architecture == "LlamaForCausalLM" and info.n_layers == 2
    tok = loaded.tokenizer
    assert tok("3 5 31")["input_ids"] == [0, 3, 5, 31] and tok.decode([3, 5]) == "3 5"
    ids = torch.randint(1, 32, (2, 25))
    ids[:, 0] = 0
    own = load_model_at(run_folder, 10)  # the trainer's own loader
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, own(input_ids=ids).logits)
        by_revision = load_model(str(run_folder), revision="step10").model
        assert torch.equal(by_revision(input_ids=ids).logits, own(input_ids=ids).logits)
        latest = load_model(str(run_folder)).model  # a run folder without a revision: its last checkpoint
        assert torch.equal(latest(input_ids=ids).logits, load_model_at(run_folder, 30)(input_ids=ids).logits)
    with pytest.raises(ModelLoadError, match="saved no checkpoint at step 7"):
        load_model(str(run_folder), revision="step7")
    from conceptprobe.validate import check_model_ref

    ref = check_model_ref(str(ckpt))
    assert ref.source == "training" and ref.n_layers == 2 and ref.max_positions == 25


def test_text_measures_refuse_a_training_checkpoint(run_folder: Path, tmp_path: Path, capsys) -> None:
    """The integer tokenizer stand-in cannot encode text: concept tasks and the corpus ICL score say so."""
    ckpt = str(run_folder / "checkpoints" / "step_0000010")
    for args in (
        ["run", "--model", ckpt, "--task", "bitwise", "--n", "6", "--out", str(tmp_path / "run")],
        ["icl-score", "--model", ckpt, "--n-contexts", "2", "--out", str(tmp_path / "icl")],
    ):
        code = run_cli(args)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and "checkpoint over integer tokens" in err[0], err


# ---------------------------------------------------------------- the sweep against the trainer


def test_sweep_reproduces_the_trainers_tracked_values(run_folder: Path, tmp_path: Path) -> None:
    result = checkpoint_sweep(_config(run_folder), tmp_path / "ck", progress=False)
    m = result.metrics
    assert sorted(m["step"].dropna().unique()) == STEPS
    tracked = pd.read_parquet(run_folder / "metrics.parquet")
    for step in STEPS:
        mine = m[(m.step == step) & (m.metric == "icl_score")].iloc[0]
        theirs = tracked[tracked.step == step].set_index("metric")["value"]
        assert mine["value"] == pytest.approx(theirs["icl_score"], abs=1e-6)
        assert mine["ci_low"] == pytest.approx(theirs["icl_score_ci_low"], abs=1e-6)
        assert mine["ci_high"] == pytest.approx(theirs["icl_score_ci_high"], abs=1e-6)
        assert mine["n"] == TINY["tracking"]["n_contexts"]
        for ours, trainer in (("prefix_matching", "prefix_matching"), ("copying_in_context", "copying")):
            a = m[(m.step == step) & (m.metric == ours)].sort_values(["layer", "head"])["value"].to_numpy()
            b = tracked[(tracked.step == step) & (tracked.metric == trainer)].sort_values(["layer", "head"])
            assert len(a) == 4 and np.allclose(a, b["value"].to_numpy(), atol=1e-6, rtol=0)
    check = result.record["tracked_check"]
    assert check["compared"]["prefix_matching"] == 4 * len(STEPS)
    assert max(check["max_abs_diff"].values()) <= 1e-6
    # the summaries: the best head is the maximum of the per-head rows, Olsson's copying is there per head
    last = m[m.step == 30]
    best = last[last.metric == "prefix_matching_max"].iloc[0]
    heads = last[last.metric == "prefix_matching"]
    assert best["value"] == heads["value"].max()
    assert heads.loc[heads["value"].idxmax(), ["layer", "head"]].tolist() == [best["layer"], best["head"]]
    assert len(last[last.metric == "copying"]) == 4 and {"n_induction_heads"} <= set(last.metric)
    assert result.record["checkpoints"][2]["model"]["extra"]["step"] == 10


def test_resume_skips_finished_checkpoints(run_folder: Path, tmp_path: Path, monkeypatch) -> None:
    import conceptprobe.models as models

    out = tmp_path / "ck"
    first = checkpoint_sweep(_config(run_folder, steps=[0, 10]), out, progress=False)
    assert first.measured == ["step_0000000", "step_0000010"] and not (out / "steps").exists()
    loads: list[str] = []
    real = models.load_model

    def counting(ref: str, *args: object, **kwargs: object) -> object:
        loads.append(Path(ref).name)
        if Path(ref).name == "step_0000030" and stop:
            raise KeyboardInterrupt  # the sweep is interrupted while measuring step 30
        return real(ref, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        checkpoint_sweep(_config(run_folder, steps=[0, 10, 20, 30]), out, progress=False)
    assert loads == ["step_0000020", "step_0000030"]  # 0 and 10 read back from the finished sweep
    assert (out / "steps" / "step_0000020" / "checkpoint.json").is_file()
    stop, loads[:] = False, []
    again = checkpoint_sweep(_config(run_folder, steps=[0, 10, 20, 30]), out, progress=False)
    assert loads == ["step_0000030"] and again.measured == ["step_0000030"]
    for step in (0, 10):
        a = again.metrics[again.metrics.step == step].reset_index(drop=True)
        b = first.metrics[first.metrics.step == step].reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)
    loads.clear()
    checkpoint_sweep(_config(run_folder, steps=[0, 10, 20, 30]), out, progress=False)
    assert loads == []
    assert json.loads((out / "checkpoints.json").read_text())["steps"] == [0, 10, 20, 30]


# ---------------------------------------------------------------- hub revisions and local folders


def test_a_hub_revision_reaches_the_loader_and_its_step_is_recorded(tmp_path: Path, monkeypatch) -> None:
    """No network: the hub loading functions are replaced by a tiny model and tokenizer."""
    import conceptprobe.models.load as load

    calls: list[tuple[str, str, object]] = []

    class FakeAuto:
        @staticmethod
        def from_pretrained(ref: str, **kwargs: object) -> torch.nn.Module:
            calls.append(("model", ref, kwargs.get("revision")))
            return make_model("llama")

    def fake_tokenizer(source: object, ref: str, trust_remote_code: bool, **kwargs: object) -> object:
        calls.append(("tokenizer", ref, kwargs.get("revision")))
        return make_tokenizer()

    monkeypatch.setattr(load, "AutoModelForCausalLM", FakeAuto)
    monkeypatch.setattr(load, "_auto_tokenizer", fake_tokenizer)
    cfg = validate_checkpoint_config(
        {
            "name": "hub",
            "models": [{"ref": "EleutherAI/pythia-160m", "revision": "step1000"}],
            **TINY_MEASURES,
        },  # fmt: skip
        "test",
    )
    result = checkpoint_sweep(cfg, tmp_path / "hub", progress=False)
    assert calls == [
        ("tokenizer", "EleutherAI/pythia-160m", "step1000"),
        ("model", "EleutherAI/pythia-160m", "step1000"),
    ]
    m = result.metrics
    assert set(m["step"]) == {1000} and set(m["checkpoint"]) == {"pythia-160m+step1000"}
    entry = result.record["checkpoints"][0]
    assert (
        entry["step"] == 1000 and entry["revision"] == "step1000" and entry["model"]["revision"] == "step1000"
    )
    icl = m[m.metric == "icl_score"].iloc[0]
    assert icl["n"] == 3 and icl["ci_low"] <= icl["value"] <= icl["ci_high"]


# measure settings small enough for a tiny model and a few seconds
TINY_MEASURES = {
    "dtype": "float32", "n_contexts": 3, "n_tokens": 48, "late": 40, "early": 8, "n_seqs": 2, "seq_len": 6,
    "n_bootstrap": 50,
}  # fmt: skip


def _neox_folder(path: Path, seed: int) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=600,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=1024,
            rotary_pct=0.25,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )  # fmt: skip
    )
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


def test_local_folders_with_steps_and_concept_tasks_then_the_report(tmp_path: Path) -> None:
    """Pythia's architecture (GPT-NeoX: no separate v/o projections, so no copying score), two local
    checkpoints given with their steps, a concept task, and the folder's own report."""
    refs = [_neox_folder(tmp_path / f"ckpt{s}", seed=s) for s in (1, 2)]
    cfg = validate_checkpoint_config(
        {
            "name": "local",
            "models": [{"ref": str(refs[1]), "step": 200}, {"ref": str(refs[0]), "step": 100}],
            **TINY_MEASURES,
            "tasks": ["bitwise"],
            "shots": 1,
            "n": 6,
            "n_permutations": 5,
            "threads": 1,
        },  # fmt: skip
        "test",
    )
    out = tmp_path / "out"
    result = cp.checkpoint_sweep(cfg, out, progress=False)
    m = result.metrics
    assert result.record["steps"] == [100, 200]  # in step order, whatever the config's order
    for step in (100, 200):
        at = m[(m.step == step) & (m.task == "bitwise")].set_index("metric")
        assert {"icl_accuracy", "cd_knn_heldout_peak", "cd_knn_null_p95", "cd_knn"} <= set(at.index)
        acc = at.loc["icl_accuracy"]
        assert acc["ci_low"] <= acc["value"] <= acc["ci_high"] and acc["n"] == 6 * 6
    assert "copying" not in set(m.metric) and "n_induction_heads" not in set(m.metric)
    assert len(m[(m.metric == "prefix_matching") & (m.step == 100)]) == 2 * 4
    # the folder's own report, and load_runs
    html = (out / "report.html").read_text()
    assert "Training checkpoints" in html and 'data-step="200"' in html
    assert list((out / "figures").glob("checkpoints_*.png"))
    frame = cp.load_runs([out])
    assert set(frame.kind) == {"checkpoints"} and set(frame.step) == {100, 200}
    assert frame.attrs["skipped"] == []


def test_probe_runs_of_a_checkpoint_entry_load_with_their_step(tmp_path: Path) -> None:
    """A sweep's model entry with revision step1000 records step 1000 in run.json; load_runs keys by it."""
    rows = {"model": ["m"], "task": ["bitwise"], "metric": ["icl_accuracy"], "value": [0.5]}
    for name, extra in (("ckpt", {"step": 1000, "label": "m+step1000"}), ("plain", {})):
        folder = tmp_path / name
        folder.mkdir()
        record = {"status": "complete", "config": {}, "model": {"ref": "m", "extra": extra}}
        (folder / "run.json").write_text(json.dumps(record))
        pd.DataFrame(rows).to_parquet(folder / "metrics.parquet")
    frame = cp.load_runs([tmp_path]).set_index("folder")
    assert frame.loc[str((tmp_path / "ckpt").resolve()), "step"] == 1000
    assert pd.isna(frame.loc[str((tmp_path / "plain").resolve()), "step"])


def test_the_report_draws_a_train_folder_sweep(run_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ck"
    code = run_cli(["checkpoints", str(_yaml(tmp_path, run_folder)), "--out", str(out), "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "step 30: ICL score" in printed
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert "Training checkpoints" in html and "prefix matching" in md
    assert "Largest difference from the values `conceptprobe train` tracked" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2:3].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == STEPS


def _yaml(tmp_path: Path, run_folder: Path, **over: object) -> Path:
    import yaml

    path = tmp_path / "ck.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny-ck", "train_folder": str(run_folder), **over}))
    return path


# ---------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"train_folder": "/nonexistent/run"}, "train_folder /nonexistent/run does not exist"),
        ({"steps": [0, 7]}, "saved no checkpoint at step 7"),
        ({"models": [{"ref": "x/y", "revision": "main"}]}, "not both or neither"),
        ({"train_folder": None, "models": [{"ref": "x/y", "revision": "main"}]}, "has no training step"),
        ({"tasks": ["bitwise"]}, "remove tasks"),
    ],
)
def test_bad_configs_give_one_line_errors(run_folder, tmp_path, capsys, over, expected) -> None:
    code = run_cli(["checkpoints", str(_yaml(tmp_path, run_folder, **over)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err
    assert not (tmp_path / "o").exists()


def test_the_committed_configs_parse_and_validate_offline(monkeypatch) -> None:
    from conceptprobe.validate import check_model_ref

    pythia = load_checkpoint_config(REPO / "probes" / "checkpoints-pythia.yaml")
    planned = plan_checkpoints(pythia)
    assert [c.step for c in planned] == sorted(c.step for c in planned) and planned[-1].step == 143000
    assert all(c.revision == f"step{c.step}" and not c.training for c in planned)
    assert {t.name for t in pythia.tasks} == {"bitwise", "pos"}
    ref = check_model_ref("EleutherAI/pythia-160m", revision="step1000")  # the shipped config: no network
    assert ref.architecture == "GPTNeoXForCausalLM" and ref.n_layers == 12
    induction = load_checkpoint_config(REPO / "probes" / "checkpoints-induction-cpu.yaml")
    assert induction.train_folder == "results/local/train-induction-cpu" and induction.steps == "all"
    monkeypatch.chdir(REPO)
    if (REPO / induction.train_folder / "train.json").is_file():  # trained here: every saved step
        assert [c.step for c in plan_checkpoints(induction)][:3] == [0, 1, 2]
    else:
        with pytest.raises(ConfigError, match="does not exist"):
            plan_checkpoints(induction)
