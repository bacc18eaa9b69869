"""Same config and seed -> byte-identical prompts, predictions, metrics and tables; activations do not
depend on batch size or padding (1e-5, fp32); ``run.json`` holds what a rerun needs, and a rerun from
it reproduces the metrics byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptprobe.cli import run_cli
from conceptprobe.prompts import build_prompts
from conceptprobe.tasks import get_task
from helpers import make_model, make_tokenizer

FILES = ("metrics.parquet", "predictions.jsonl", "table.txt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    make_model("qwen2", layers=2).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def run(tiny: Path, out: Path, *extra: str) -> None:
    args = ["run", "--model", str(tiny), "--task", "pos", "--shots", "2", "--n", "6", "--out", str(out)]
    args += ["--dtype", "float32"]  # exactness is tested in fp32 (bf16 rounds differently by batch)
    assert run_cli([*args, "--no-progress", *extra]) == 0


def test_prompts_are_identical_for_a_seed_and_differ_across_seeds():
    for name in ("pos", "bitwise"):
        task = get_task(name)
        for concept in task.concepts:
            a = build_prompts(task, concept, 4, 20, seed=3)
            assert a == build_prompts(get_task(name), concept, 4, 20, seed=3)
            assert [p.text for p in a] != [p.text for p in build_prompts(task, concept, 4, 20, seed=4)]


def test_same_config_same_bytes_across_processes(tiny, tmp_path):
    """One run in this process, one in a fresh process with another hash seed: identical bytes."""
    run(tiny, tmp_path / "a", "--batch-size", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    args = ["run", "--model", str(tiny), "--task", "pos", "--shots", "2", "--n", "6", "--batch-size", "4"]
    args += ["--dtype", "float32"]
    proc = subprocess.run(
        [sys.executable, "-m", "conceptprobe.cli", *args, "--out", str(tmp_path / "b"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    for shard in (tmp_path / "a" / "activations").iterdir():
        assert shard.read_bytes() == (tmp_path / "b" / "activations" / shard.name).read_bytes(), shard.name
    a, b = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("a", "b"))
    assert a["fingerprint"] == b["fingerprint"] and a["outputs"] == b["outputs"]


@pytest.mark.parametrize("other", [["--batch-size", "5"], ["--batch-size", "6", "--max-batch-tokens", "300"]])
def test_activations_invariant_to_batching_and_padding(tiny, tmp_path, other):
    """Batch size 1 (no padding) vs 5, or a token budget (left padding, prompts of different lengths)."""
    run(tiny, tmp_path / "bs1", "--batch-size", "1")
    run(tiny, tmp_path / "other", *other)
    shards = sorted((tmp_path / "bs1" / "activations").iterdir())
    assert len(shards) == 7
    for shard in shards:
        one = load_file(str(shard))["activations"]
        many = load_file(str(tmp_path / "other" / "activations" / shard.name))["activations"]
        assert one.dtype == torch.float32 and one.shape == many.shape
        torch.testing.assert_close(one, many, atol=1e-5, rtol=0)
    for name in ("predictions.jsonl", "table.txt"):
        assert (tmp_path / "bs1" / name).read_bytes() == (tmp_path / "other" / name).read_bytes(), name
    a, b = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("bs1", "other"))
    assert a["fingerprint"] == b["fingerprint"]  # batching is not part of a run's identity
    timings = b["timings"]
    assert timings["forward_s"] > 0 and timings["generate_s"] > 0
    assert timings["forward_s"] + timings["generate_s"] <= timings["capture_generate_s"] + 0.05


def test_run_json_holds_what_a_rerun_needs(tiny, tmp_path):
    first = tmp_path / "first"
    run(tiny, first)
    record = json.loads((first / "run.json").read_text())
    assert record["status"] == "complete" and record["config"]["seed"] == 0
    assert {"python", "conceptprobe", "torch", "transformers", "numpy", "safetensors"} <= set(
        record["versions"]
    )
    assert "git" in record and (record["git"] is None or len(record["git"]["commit"]) == 40)
    weights = tiny / "model.safetensors"
    assert record["model_files"]["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["task"]["origin"] == "builtin" and record["task"]["version"]
    for rel, sha in record["outputs"].items():  # the completion marker: a checksum per output
        assert hashlib.sha256((first / rel).read_bytes()).hexdigest() == sha

    # rerun from run.json alone, into another folder: the same metrics, byte for byte
    again = tmp_path / "again"
    assert run_cli(["run", "--config", str(first / "run.json"), "--out", str(again), "--no-progress"]) == 0
    for name in FILES:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert json.loads((again / "run.json").read_text())["fingerprint"] == record["fingerprint"]
