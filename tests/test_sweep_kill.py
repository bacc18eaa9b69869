"""A sweep killed with SIGKILL mid-unit resumes to exactly the results of an uninterrupted sweep.

Real processes: ``python -m conceptprobe.cli sweep`` on a tiny model saved by the test (the uninterrupted
reference sweep runs in the test's own process). The kill lands
after the first concept shard of the second unit is written, so one unit is complete and one is half
done; the resumed sweep must skip the first, keep the second's finished shards, and produce metrics
and predictions identical to a sweep that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from conceptprobe.sweep import expand, load_sweep_config, run_sweep
from helpers import make_model, make_tokenizer

CLI = [sys.executable, "-m", "conceptprobe.cli"]


def _env() -> dict[str, str]:
    # one thread: tiny models on a shared machine spin-wait badly with more
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _sweep(config: Path, out: Path, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*CLI, "sweep", str(config), "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        **kwargs,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sigkill_mid_unit_then_resume_matches_uninterrupted(tmp_path):
    model = tmp_path / "tiny-llama"
    make_model("llama", layers=2).save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    config = tmp_path / "kill.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "kill",
                "models": [{"ref": str(model), "label": "tiny"}],
                "tasks": ["bitwise"],
                "shots": [1, 2],
                "n": 40,  # 7 concepts x 40 prompts, one per forward pass: a unit takes a few seconds
                "batch_size": 1,
            }
        )
    )
    units = ["tiny/bitwise_1shot_seed0", "tiny/bitwise_2shot_seed0"]

    # the uninterrupted reference runs in this process (same executor, one thread: saves a process start)
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan = expand(load_sweep_config(config, {"out": str(reference)}), str(config))
        assert run_sweep(plan, progress=False).ok
    finally:
        torch.set_num_threads(threads)

    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [*CLI, "sweep", str(config), "--out", str(killed), "--no-progress"],
        stdout=log,
        stderr=log,
        env=_env(),
    )
    second = killed / units[1] / "activations"
    deadline = time.monotonic() + 90
    while not (second.is_dir() and any(second.glob("*.safetensors"))):
        assert proc.poll() is None, (
            f"the sweep ended before the kill: {(tmp_path / 'killed.log').read_text()}"
        )
        assert time.monotonic() < deadline, "no shard of the second unit appeared in 90 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    log.close()
    assert proc.returncode == -signal.SIGKILL

    # the kill landed mid-unit: the first unit is complete, the second is running with some shards
    first_run = json.loads((killed / units[0] / "run.json").read_text())
    second_run = json.loads((killed / units[1] / "run.json").read_text())
    assert first_run["status"] == "complete" and second_run["status"] == "running"
    kept = {p.name: p.stat().st_mtime_ns for p in second.glob("*.safetensors")}
    assert 1 <= len(kept) < 7
    first_files = {p.name: p.stat().st_mtime_ns for p in (killed / units[0]).rglob("*") if p.is_file()}

    _sweep(config, killed)

    manifest = json.loads((killed / "sweep.json").read_text())
    assert manifest["status"] == "complete"
    assert {u["id"]: u["action"] for u in manifest["units"]} == {units[0]: "skipped", units[1]: "ran"}
    # nothing finished was recomputed: the complete unit untouched, the kept shards not rewritten
    assert {
        p.name: p.stat().st_mtime_ns for p in (killed / units[0]).rglob("*") if p.is_file()
    } == first_files
    assert {p.name: p.stat().st_mtime_ns for p in second.glob("*.safetensors") if p.name in kept} == kept
    second_run = json.loads((killed / units[1] / "run.json").read_text())
    assert sorted(c + ".safetensors" for c in second_run["resumed_concepts"]) == sorted(kept)

    # nothing lost: identical metrics and predictions to the uninterrupted sweep
    for unit in units:
        pd.testing.assert_frame_equal(
            pd.read_parquet(reference / unit / "metrics.parquet"),
            pd.read_parquet(killed / unit / "metrics.parquet"),
        )
        assert (reference / unit / "predictions.jsonl").read_text() == (
            killed / unit / "predictions.jsonl"
        ).read_text()
