"""Sweeps: config validation, plan expansion, dry run, a real sweep of tiny models, resume and failures."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import typer
import yaml
from rich.console import Console
from typer.testing import CliRunner

import conceptprobe.sweep.local as local
from conceptprobe.commands import sweep_cmds
from conceptprobe.config import ConfigError, choose_dtype
from conceptprobe.sweep import expand, load_sweep_config
from helpers import make_model, make_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids spin-waiting (50x slower ops here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny random models of different families, saved with the in-memory tokenizer."""
    folders = {}
    for family in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        make_model(family, layers=2).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture
def app(monkeypatch) -> typer.Typer:
    """A CLI with only the sweep command (cli.py wires the same `register` into the main app)."""
    monkeypatch.setattr(sweep_cmds, "console", Console(width=220))
    monkeypatch.setattr(sweep_cmds, "err_console", Console(stderr=True, width=220))
    cli = typer.Typer(pretty_exceptions_enable=False)

    @cli.callback()
    def _root() -> None:
        pass

    sweep_cmds.register(cli)
    return cli


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def sweep(app: typer.Typer, *args: str, code: int = 0):
    result = CliRunner().invoke(app, ["sweep", *args, "--no-progress"])
    assert result.exit_code == code, (result.output, result.exception)
    return result


# ---------------------------------------------------------------- validation

BASE = {"name": "s", "models": ["smollm2-135m"], "tasks": ["pos"], "shots": [1], "n": 10}

BAD = [
    ({"nn": 5}, ["key 'nn'", "unknown key", "did you mean 'n'"]),
    ({"n": "many"}, ["key 'n'", "integer"]),
    ({"tasks": ["bitwse"]}, ["key 'tasks.0'", "did you mean 'bitwise'"]),
    ({"models": []}, ["key 'models'", "at least 1"]),
    ({"models": ["smollm2-135m", "smollm2-135m"]}, ["listed twice"]),
    ({"models": ["a/x", "b/x"]}, ["same label", "label:"]),
    (
        {"models": [{"ref": "smollm2-135m", "dtyp": "bfloat16"}]},
        ["key 'models.0.dtyp'", "did you mean 'dtype'"],
    ),
    (
        {"models": [{"ref": "smollm2-135m", "quantize": "3bit"}]},
        ["key 'models.0.quantize'", "'4bit' or '8bit'"],
    ),
    ({"dtype": "fp8"}, ["key 'dtype'", "'float32', 'bfloat16' or 'float16'"]),
    ({"seed": 1}, ["key 'seed'", "seeds: [0, ...]"]),
    ({"shots": [1, 1]}, ["key 'shots'", "twice"]),
    ({"positions": [1]}, ["key 'positions'", "offsets <= 0"]),
    ({"tasks": [{"name": "bitwise", "params": {"widht": 3}}]}, ["key 'tasks.0'", "width"]),
    ({"name": "a/b"}, ["key 'name'", "folder"]),
]


@pytest.mark.parametrize("change,expected", BAD, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(BAD)])
def test_config_errors_name_file_and_key(tmp_path, change, expected):
    path = write(tmp_path / "bad.yaml", {**BASE, **change})
    with pytest.raises(ConfigError) as info:
        expand(load_sweep_config(path), str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for part in expected:
        assert part.lower() in message.lower(), message


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_sweep_config(write(tmp_path / "m.yaml", "name: [unclosed"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep_config(tmp_path / "nope.yaml")


def test_cli_override_errors_name_the_flag(tmp_path, app):
    path = write(tmp_path / "s.yaml", BASE)
    result = CliRunner().invoke(app, ["sweep", str(path), "--n", "1", "--dry-run"])
    assert result.exit_code != 0
    assert "--n" in str(result.exception) and "key 'n'" in str(result.exception)


# ---------------------------------------------------------------- plan


def test_plan_expansion_labels_and_folders(tmp_path):
    cfg = {
        "name": "fam",
        "models": [
            "smollm2-135m",
            {"ref": "google/gemma-2-2b", "dtype": "bfloat16", "device_map": "auto"},
            {"ref": "meta-llama/Llama-3.1-70B", "quantize": "4bit"},
            {"ref": "/models/x.gguf", "label": "xq"},
        ],
        "tasks": ["pos", {"name": "bitwise", "params": {"width": 3}, "label": "bitwise3"}],
        "shots": [1, 4, 10],
        "seeds": [0, 1],
        "n": 20,
        "batch_size": 4,
    }
    path = write(tmp_path / "fam.yaml", cfg)
    plan = expand(load_sweep_config(path), str(path))
    assert len(plan.units) == 4 * 2 * 3 * 2
    assert [m.label for m in plan.config.models] == ["smollm2-135m", "gemma-2-2b", "Llama-3.1-70B-4bit", "xq"]
    first = plan.units[0]
    assert first.folder == Path("results/fam/smollm2-135m/pos_1shot_seed0")
    assert first.config.n == 20 and first.config.batch_size == 4
    # no dtype in the config: auto, held as the dtype this machine computes natively (bf16 or float32)
    assert first.config.dtype == choose_dtype("auto") and first.config.dtype in ("bfloat16", "float32")
    assert first.n_prompts == 20 * len(first.concepts) == 20 * 7
    gemma = [u for u in plan.units if u.model.label == "gemma-2-2b"]
    assert {u.config.dtype for u in gemma} == {"bfloat16"} and {u.config.model for u in gemma} == {
        "google/gemma-2-2b"
    }
    b3 = [u for u in plan.units if u.task.label == "bitwise3"]
    assert len(b3) == 4 * 3 * 2 and b3[0].config.task_params == {"width": 3}
    assert {u.folder.name for u in b3} >= {"bitwise3_10shot_seed1", "bitwise3_1shot_seed0"}
    assert len({u.folder for u in plan.units}) == len(plan.units)
    assert [len(us) for _, us in plan.by_model()] == [12, 12, 12, 12]
    # CLI overrides: select models by label (keeping their settings), add unknown ones, replace axes
    over = load_sweep_config(
        path, {"models": ["gemma-2-2b", "other/model"], "shots": [4], "n": 30, "out": str(tmp_path / "o")}
    )
    plan = expand(over, str(path))
    assert [m.label for m in over.models] == ["gemma-2-2b", "model"] and over.models[0].device_map == "auto"
    assert len(plan.units) == 2 * 2 * 1 * 2 and {u.config.n for u in plan.units} == {30}
    assert plan.units[0].folder == tmp_path / "o" / "gemma-2-2b" / "pos_4shot_seed0"
    assert {u.config.dtype for u in expand(load_sweep_config(path, {"dtype": "float16"})).units} == {
        "float16"
    }


def test_packaged_configs_validate():
    root = Path(__file__).resolve().parents[1] / "probes"
    sizes = {"offline-families.yaml": 80, "offline-smoke.yaml": 12, "paper-families.yaml": 30}
    for name, units in sizes.items():
        plan = expand(load_sweep_config(root / name), name)
        assert len(plan.units) == units and {u.config.n for u in plan.units} <= {40, 100}


def test_dry_run_loads_nothing(tmp_path, app, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("dry run loaded a model")

    monkeypatch.setattr(local, "load_model", boom)
    monkeypatch.setattr("conceptprobe.experiments.probe.load_model", boom)
    root = Path(__file__).resolve().parents[1] / "probes"
    out = tmp_path / "paper"
    result = sweep(app, str(root / "paper-families.yaml"), "--dry-run", "--out", str(out))
    assert "Llama-3.1-70B" in result.output and "gemma-2-27b" in result.output
    assert (
        "30 units: 0 complete" in result.output and "21000 prompts to run; 5 model load(s)" in result.output
    )
    assert not out.exists()
    # a quantized model on a machine without CUDA: the plan says so; a real run refuses before loading
    path = write(
        tmp_path / "q.yaml", {**BASE, "models": [{"ref": "org/big", "quantize": "4bit"}], "out": str(out)}
    )
    assert "not supported yet on this machine" in sweep(app, str(path), "--dry-run").output.replace("\n", " ")
    result = CliRunner().invoke(app, ["sweep", str(path), "--no-progress"])
    assert isinstance(result.exception, ConfigError) and "not supported yet" in str(result.exception)


# ---------------------------------------------------------------- a real sweep of tiny models


def _mtimes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".parquet", ".jsonl")
    }


def test_sweep_runs_then_resumes_recomputing_nothing(tiny_models, tmp_path, app, monkeypatch):
    out = tmp_path / "sweep"
    cfg = {
        "name": "tiny",
        "out": str(out),
        "models": [{"ref": str(tiny_models["llama"]), "label": "tiny-llama"}, str(tiny_models["qwen2"])],
        "tasks": ["pos", "bitwise"],
        "shots": [1, 2],
        "n": 5,
        "batch_size": 8,
    }
    path = write(tmp_path / "tiny.yaml", cfg)
    loads: list[str] = []
    real_load = local.load_model

    def counting(ref, *args, **kwargs):
        loads.append(ref)
        return real_load(ref, *args, **kwargs)

    monkeypatch.setattr(local, "load_model", counting)
    result = sweep(app, str(path))
    assert loads == [str(tiny_models["llama"]), str(tiny_models["qwen2"])]  # each model loaded once
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["units"]) == 8
    assert {u["status"] for u in manifest["units"]} == {"complete"}
    assert {u["action"] for u in manifest["units"]} == {"ran"}
    folders = {u["folder"] for u in manifest["units"]}
    assert f"{tiny_models['qwen2'].name}/bitwise_1shot_seed0" in folders
    assert "tiny-llama/pos_2shot_seed0" in folders
    for u in manifest["units"]:
        run = json.loads((out / u["folder"] / "run.json").read_text())
        assert run["status"] == "complete" and run["fingerprint"] == u["fingerprint"]
        assert run["model"]["extra"]["label"] == u["model"]
        metrics = pd.read_parquet(out / u["folder"] / "metrics.parquet")
        assert set(metrics["shots"]) == {u["shots"]} and set(metrics["task"]) == {u["task"]}
    before = _mtimes(out)

    # the second invocation loads no model and rewrites no result file
    def boom(*args, **kwargs):
        raise AssertionError("a complete sweep loaded a model")

    monkeypatch.setattr(local, "load_model", boom)
    result = sweep(app, str(path))
    assert _mtimes(out) == before
    manifest = json.loads((out / "sweep.json").read_text())
    assert {u["action"] for u in manifest["units"]} == {"skipped"} and manifest["invocation"]["skipped"] == 8
    assert "8 complete" in sweep(app, str(path), "--dry-run").output

    # a corrupt metrics file fails its checksum: only that unit is redone, from its saved shards
    victim = out / "tiny-llama" / "bitwise_2shot_seed0"
    (victim / "metrics.parquet").write_bytes(b"garbage")
    assert "metrics.parquet is corrupt" in sweep(app, str(path), "--dry-run").output
    monkeypatch.setattr(local, "load_model", counting)
    loads.clear()
    sweep(app, str(path))
    assert loads == [str(tiny_models["llama"])]
    after = _mtimes(out)
    assert {k for k in after if after[k] != before[k]} == {
        "tiny-llama/bitwise_2shot_seed0/metrics.parquet",
        "tiny-llama/bitwise_2shot_seed0/predictions.jsonl",
    }
    run = json.loads((victim / "run.json").read_text())
    assert len(run["resumed_concepts"]) == 7

    # CLI overrides: another n and fewer shots/models, into another folder
    other = tmp_path / "other"
    sweep(
        app,
        str(path),
        "--models",
        "tiny-llama",
        "--shots",
        "1",
        "--tasks",
        "bitwise",
        "--n",
        "6",
        "--out",
        str(other),
    )
    manifest = json.loads((other / "sweep.json").read_text())
    assert [u["id"] for u in manifest["units"]] == ["tiny-llama/bitwise_1shot_seed0"]
    assert json.loads((other / manifest["units"][0]["folder"] / "run.json").read_text())["config"]["n"] == 6

    # a changed config does not silently mix with old results
    result = CliRunner().invoke(app, ["sweep", str(path), "--n", "6", "--no-progress"])
    assert isinstance(result.exception, ConfigError) and "--overwrite" in str(result.exception)
    assert "differs in: n" in str(result.exception)


def test_failing_unit_is_reported_and_the_rest_run(tiny_models, tmp_path, app):
    # failures only the run itself finds (what can be checked before loading is refused up front, see
    # test_robustness.py): NaN activations fail a model's units, weights that do not match their config fail
    # its load; the sweep records both and the other model's unit completes
    nan = tmp_path / "nan-model"
    model = make_model("llama", layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(nan)
    make_tokenizer().save_pretrained(nan)
    broken = tmp_path / "broken"
    make_model("llama", layers=2).save_pretrained(broken)
    make_tokenizer().save_pretrained(broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    out = tmp_path / "sweep"
    good = tiny_models["llama"]
    models = [str(good), str(nan), str(broken)]
    cfg = {"name": "f", "out": str(out), "models": models, "tasks": ["bitwise"], "shots": [1], "n": 5}
    path = write(tmp_path / "f.yaml", cfg)
    result = sweep(app, str(path), code=1)
    manifest = json.loads((out / "sweep.json").read_text())
    status = {u["id"]: u["status"] for u in manifest["units"]}
    assert status == {
        f"{good.name}/bitwise_1shot_seed0": "complete",
        "nan-model/bitwise_1shot_seed0": "failed",
        "broken/bitwise_1shot_seed0": "failed",
    }
    failed = manifest["units"][1]
    assert "nan/inf" in failed["error"].lower() and "Traceback" in failed["traceback"]
    assert manifest["units"][2]["error"].startswith(f"loading {broken}")
    assert manifest["status"] == "failed"
    assert "failed" in result.output and "NaN" in result.output
