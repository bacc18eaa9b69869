"""The CLI end to end on a tiny random model saved to a folder, with an in-memory tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from conceptprobe.cli import app
from conceptprobe.store import METRIC_COLUMNS
from helpers import make_model, make_tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", layers=3).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_run_end_to_end_and_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--task", "bitwise", "--shots", "2", "--n", "12"]
    result = invoke(*args, "--out", str(out), "--batch-size", "5", "--no-progress")
    assert "Concept decodability per layer" in result.output and "peak" in result.output

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["task"]["name"] == "bitwise" and run["task"]["version"] == "1"
    assert run["model"]["n_layers"] == 3 and run["model"]["source"] == "local"
    assert run["config"]["seed"] == 0 and "torch" in run["versions"]
    batching = run["batching"]  # the memory-sized budget it used, and why
    assert batching["batch_size"] == 5 and run["config"]["max_batch_tokens"] == "auto"
    assert batching["max_batch_tokens"] >= 512 and batching["rule"].startswith("auto:")

    metrics = pd.read_parquet(out / "metrics.parquet")
    assert list(metrics.columns[: len(METRIC_COLUMNS)]) == METRIC_COLUMNS
    controls = {
        f"{m}{suffix}"
        for m in ("cd_knn", "probe_accuracy")
        for suffix in ("", "_ci_low", "_ci_high", "_null_p95", "_p_value", "_selectivity", "_heldout_peak")
    }
    expected = {"icl_accuracy", "icl_accuracy_ci_low", "demo_reuse_rate", "surface_baseline", *controls}
    assert expected <= set(metrics["metric"])
    assert {"surface_answers_knn", "surface_prompt_probe", "surface_lexical_knn"} <= set(metrics["metric"])
    assert (metrics["n"] > 0).all() and metrics["n"].dtype == "int64"
    assert metrics[(metrics.metric == "cd_knn") & (metrics.concept == "all")]["n"].eq(7 * 12).all()
    knn = metrics[(metrics.metric == "cd_knn") & (metrics.concept == "all")]
    assert sorted(knn["layer"]) == [0, 1, 2, 3]
    assert metrics[metrics.metric == "icl_accuracy"]["layer"].isna().all()

    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 7 * 12
    acc = metrics[(metrics.metric == "icl_accuracy") & (metrics.concept == "all")]["value"].item()
    assert acc == pytest.approx(sum(p["correct"] for p in preds) / len(preds))
    assert all(p["prompt"].endswith("Output:") for p in preds)
    assert all(p["correct"] == (p["prediction"] == p["answer"]) for p in preds)

    # a second run of the same config resumes every concept and reproduces the metrics exactly
    mtime = {p.name: p.stat().st_mtime_ns for p in (out / "activations").iterdir()}
    result = invoke(*args, "--out", str(out), "--batch-size", "7", "--no-progress")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "activations").iterdir()} == mtime
    again = pd.read_parquet(out / "metrics.parquet")
    pd.testing.assert_frame_equal(metrics, again)

    # other measure settings: measures are recomputed from the stored activations, the model is not needed
    result = invoke(*args, "--out", str(out), "--knn-k", "3", "--no-progress")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "activations").iterdir()} == mtime
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["knn_k"] == 3 and run["timings"]["capture_generate_s"] < 1.0
    assert not pd.read_parquet(out / "metrics.parquet").equals(metrics)


def test_batch_size_does_not_change_results(tiny_model_dir, tmp_path):
    frames = []
    for bs in ("1", "12"):
        out = tmp_path / f"bs{bs}"
        invoke(
            "run",
            "--model",
            str(tiny_model_dir),
            "--task",
            "pos",
            "--shots",
            "1",
            "--n",
            "6",
            "--out",
            str(out),
            "--batch-size",
            bs,
            "--dtype",
            "float32",
            "--no-progress",
        )
        frames.append(pd.read_parquet(out / "metrics.parquet"))
    pd.testing.assert_frame_equal(frames[0], frames[1], atol=1e-6, check_exact=False)


def test_cli_errors_are_one_line(tiny_model_dir, tmp_path):
    cases = [
        (["run", "--model", str(tiny_model_dir), "--task", "bitwse"], "did you mean 'bitwise'"),
        (
            ["run", "--model", "no-such-alias-xyz", "--task", "pos", "--out", str(tmp_path / "x")],
            "could not load",
        ),
        (["run", "--task", "pos"], "no model given"),
    ]
    for args, expected in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "conceptprobe.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode == 2, proc.stderr
        assert expected.lower() in proc.stderr.lower(), proc.stderr
        assert "Traceback" not in proc.stderr


def test_rerun_with_other_config_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    invoke(
        "run",
        "--model",
        str(tiny_model_dir),
        "--task",
        "bitwise",
        "--shots",
        "1",
        "--n",
        "5",
        "--out",
        str(out),
        "--no-progress",
    )
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--model",
            str(tiny_model_dir),
            "--task",
            "bitwise",
            "--shots",
            "2",
            "--n",
            "5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code != 0
    assert "different config" in str(result.exception) and "shots" in str(result.exception)


def test_tasks_and_models_commands(monkeypatch):
    from rich.console import Console

    import conceptprobe.cli as cli

    monkeypatch.setattr(cli, "console", Console(width=250))
    out = invoke("tasks").output
    assert "pos" in out and "bitwise" in out and "preposition" in out
    out = invoke("models").output
    assert "smollm2-135m" in out and "gemma3-270m" in out and "qwen2.5-1.5b" in out
