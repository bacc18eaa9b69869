"""Sweeps on Ray (a private local Ray instance, CPU only): same folders and metrics as the local executor;
a worker killed mid-unit is retried and the unit completes; a rerun skips everything."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import ray  # noqa: E402,F401  (a dev dependency: installed by scripts/setup.sh)
import torch
import yaml
from rich.console import Console

from conceptprobe.sweep import expand, load_sweep_config
from conceptprobe.sweep.local import run_sweep  # noqa: E402
from conceptprobe.sweep.ray_executor import gpus_for, run_sweep_ray  # noqa: E402
from helpers import make_model, make_tokenizer

RAY_INIT = {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
METRIC_KEYS = ["model", "task", "shots", "seed", "layer", "concept", "metric"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for family in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        make_model(family, layers=2).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="module")
def ray_session():
    ray.init(**RAY_INIT)
    yield
    ray.shutdown()


def _plan(tmp_path: Path, out: Path, models: list, tasks: list, tasks_dir: Path | None = None):
    cfg = {
        "name": "tiny",
        "out": str(out),
        "models": models,
        "tasks": tasks,
        "shots": [1, 2],
        "n": 5,
        "batch_size": 8,
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return expand(load_sweep_config(path), str(path), tasks_dir=tasks_dir)


def _metrics(out: Path) -> pd.DataFrame:
    manifest = json.loads((out / "sweep.json").read_text())
    frames = [pd.read_parquet(out / u["folder"] / "metrics.parquet") for u in manifest["units"]]
    frame = pd.concat(frames, ignore_index=True)
    keys = [k for k in METRIC_KEYS if k in frame.columns]
    return frame.sort_values(keys).reset_index(drop=True)[keys + ["value"]]


def test_ray_gives_the_same_metrics_as_local(tiny_models, tmp_path, ray_session):
    models = [{"ref": str(tiny_models["llama"]), "label": "tiny-llama"}, str(tiny_models["qwen2"])]
    quiet = Console(file=io.StringIO())
    local = run_sweep(
        _plan(tmp_path, tmp_path / "local", models, ["pos", "bitwise"]), progress=False, console=quiet
    )
    assert local.ok
    plan = _plan(tmp_path, tmp_path / "ray", models, ["pos", "bitwise"])
    result = run_sweep_ray(plan, console=quiet)
    assert result.ok and result.count("ran") == 8
    manifest = json.loads((tmp_path / "ray" / "sweep.json").read_text())
    assert manifest["status"] == "complete" and manifest["executor"]["name"] == "ray"
    assert {u["status"] for u in manifest["units"]} == {"complete"}
    assert all(u["node"] for u in manifest["units"])
    assert manifest["executor"]["gpus_per_task"] == {"tiny-llama": 0, tiny_models["qwen2"].name: 0}
    pd.testing.assert_frame_equal(_metrics(tmp_path / "local"), _metrics(tmp_path / "ray"))

    # a rerun submits nothing and rewrites no result
    again = run_sweep_ray(_plan(tmp_path, tmp_path / "ray", models, ["pos", "bitwise"]), console=quiet)
    assert again.ok and again.count("skipped") == 8 and again.count("ran") == 0


CRASHER = textwrap.dedent(
    """
    import os
    from pathlib import Path

    from conceptprobe.tasks import register_task
    from conceptprobe.tasks.pos import *  # noqa: F401,F403
    from conceptprobe.tasks import get_task_class

    Base = get_task_class("pos")
    MARKER = Path({marker!r})
    AFTER = Path({after!r})  # crash only once this file exists (a finished unit), so a retry must skip it


    @register_task("crash_once")
    class CrashOnce(Base):
        '''POS, but the first process to sample dies abruptly (a stand-in for an OOM kill).'''

        def sample(self, concept, rng):
            if AFTER.exists() and not MARKER.exists():
                MARKER.write_text("crashed")
                os._exit(1)
            return super().sample(concept, rng)
    """
)


def test_killed_worker_is_retried_and_never_corrupts(tiny_models, tmp_path, ray_session):
    tasks_dir = tmp_path / "plugins"
    tasks_dir.mkdir()
    marker = tmp_path / "crashed.txt"
    first = tmp_path / "crash" / "tiny-llama" / "crash_once_1shot_seed0" / "metrics.parquet"
    (tasks_dir / "crash_once.py").write_text(CRASHER.format(marker=str(marker), after=str(first)))
    models = [{"ref": str(tiny_models["llama"]), "label": "tiny-llama"}]
    quiet = Console(file=io.StringIO())
    plan = _plan(tmp_path, tmp_path / "crash", models, ["crash_once"], tasks_dir=tasks_dir)
    result = run_sweep_ray(plan, tasks_dir=tasks_dir, console=quiet, max_retries=2)
    assert marker.exists(), "the first attempt should have died"
    assert result.ok, result.units
    manifest = json.loads((tmp_path / "crash" / "sweep.json").read_text())
    actions = {u["id"]: u["action"] for u in manifest["units"]}
    # the retry found the 1-shot unit complete on disk and ran only the 2-shot one
    assert actions == {
        "tiny-llama/crash_once_1shot_seed0": "skipped",
        "tiny-llama/crash_once_2shot_seed0": "ran",
    }
    # the same units run cleanly give the same metrics
    clean = _plan(tmp_path, tmp_path / "clean", models, ["crash_once"], tasks_dir=tasks_dir)
    run_sweep(clean, tasks_dir=tasks_dir, progress=False, console=quiet)
    pd.testing.assert_frame_equal(_metrics(tmp_path / "crash"), _metrics(tmp_path / "clean"))


def test_retries_exhausted_fail_the_group_not_the_sweep(tiny_models, tmp_path, ray_session):
    tasks_dir = tmp_path / "plugins"
    tasks_dir.mkdir()
    always = CRASHER.replace("if AFTER.exists() and not MARKER.exists():", "if True:")
    always = always.replace("crash_once", "crash_always")
    (tasks_dir / "crash_always.py").write_text(always.format(marker=str(tmp_path / "m"), after=str(tmp_path)))
    models = [{"ref": str(tiny_models["llama"]), "label": "tiny-llama"}]
    quiet = Console(file=io.StringIO())
    plan = _plan(tmp_path, tmp_path / "fail", models, ["crash_always"], tasks_dir=tasks_dir)
    result = run_sweep_ray(plan, tasks_dir=tasks_dir, console=quiet, max_retries=1)
    assert not result.ok
    assert {u["status"] for u in result.units} == {"failed"}
    assert all("Ray task failed after 1 retries" in u["error"] for u in result.units)
    assert json.loads((tmp_path / "fail" / "sweep.json").read_text())["status"] == "failed"


def test_gpus_for_uses_the_memory_plan():
    from conceptprobe.sweep.config import ModelEntry

    big = ModelEntry(ref="meta-llama/Llama-3.1-70B")
    assert gpus_for(big, "bfloat16", 80 * 1024**3) == 2
    assert (
        gpus_for(ModelEntry(ref="meta-llama/Llama-3.1-70B", quantize="4bit"), "bfloat16", 80 * 1024**3) == 1
    )
    assert gpus_for(ModelEntry(ref="google/gemma-2-27b"), "bfloat16", 24 * 1024**3) == 3
