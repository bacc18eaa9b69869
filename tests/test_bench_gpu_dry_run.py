"""``benchmarks/bench_gpu.py --dry-run``: the GPU script's logic on the CPU with tiny shapes (issue 17).

The GPU-only parts (bitsandbytes 4/8-bit) must say they were skipped; everything the CPU can do (capture
timing, the end-to-end run and its checks, the plan comparisons, the split comparison) must produce
finite numbers, in tables that name the device.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu-dry")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "CONCEPTPROBE_CACHE": str(out / "cache"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_gpu.py"),
            "--dry-run",
            "--out",
            str(out / "tables"),
            "--work",
            str(out / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "tables" / "bench_gpu.json").read_text())
    return out / "tables", data


def _rows(data: dict, section: str) -> list[dict]:
    return [r for r in data["rows"] if r["section"] == section]


def test_tables_exist_and_name_the_device(dry_run):
    tables, data = dry_run
    for name in ("bench_gpu.md", "capture.csv", "quantized.csv", "split.csv", "plan70b.csv", "kernels.csv"):
        assert (tables / name).is_file(), name
    env = data["environment"]
    assert env["device"] == "cpu" and env["dry_run"] is True
    assert env["torch"] and env["transformers"]
    assert "device: cpu" in (tables / "bench_gpu.md").read_text()
    with (tables / "capture.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["device_name"] for r in rows} == {"cpu"}
    errors = [r for r in data["rows"] if r["status"] == "error"]
    assert not errors, errors


def test_cuda_only_parts_are_skipped_explicitly(dry_run):
    _, data = dry_run
    status = {r["item"]: r["status"] for r in _rows(data, "quantized") + _rows(data, "plan70b")}
    for item in ("llama-3.1-8b 4bit", "llama-3.1-8b 8bit", "llama-3.1-70b 4bit"):
        assert status[item].startswith("skipped: needs CUDA"), status


def test_capture_rows_have_finite_timings_and_rates(dry_run):
    _, data = dry_run
    rows = _rows(data, "capture")
    matmul = [r for r in rows if r.get("variant") == "matmul"]
    assert len(matmul) == 1 and _finite(matmul[0]["tflops"]) and matmul[0]["tflops"] > 0
    for shape in ("gemma-2-2b", "llama-3.1-8b"):
        got = {r["variant"]: r for r in rows if r["item"] == shape}
        for variant in ("floor", "capture"):
            row = got[variant]
            for key in ("seconds", "tokens_per_s", "ratio_to_floor", "tflops", "share_of_matmul_rate"):
                assert _finite(row[key]) and row[key] > 0, (shape, variant, key, row[key])
            assert row["layers_captured"] == row["decoder_layers"] + 1
        assert got["floor"]["ratio_to_floor"] == 1.0
        gen = next(r for k, r in got.items() if k.startswith("capture + greedy answer"))
        assert gen["status"] == "ok"
        assert all(_finite(gen[k]) for k in ("prefill_s", "decode_s", "ms_per_decode_step"))
        assert _finite(got["memory"]["plan_weights_gib"])
    kernels = _rows(data, "kernels")
    assert kernels and all(0 < r["share_of_self_time"] <= 1 for r in kernels)


def test_run_split_and_plan_comparisons_computed(dry_run):
    _, data = dry_run
    run = next(r for r in _rows(data, "quantized") if r["status"] == "ok")
    assert run["vectors_finite"] is True and run["knn_layers"] == run["layers"] > 0
    assert run["prompts"] == 7 * 8  # bitwise has 7 concepts, --dry-run asks 8 each
    assert 0.85 <= run["weights_over_plan"] <= 1.15, run

    (split,) = _rows(data, "split")
    assert split["status"] == "ok" and "disk" in split["placement"] and "cpu" in split["placement"]
    assert _finite(split["max_abs_diff"]) and _finite(split["max_diff_over_max_value"])
    assert split["within_bf16"] is True

    plan = next(r for r in _rows(data, "plan70b") if r["status"] == "ok")
    assert plan["depth"] == 80  # the real depth, extrapolated from 2 and 4 layers
    for key in (
        "measured_per_layer_mib",
        "plan_per_layer_mib",
        "extrapolated_weights_gib",
        "plan_weights_gib",
    ):
        assert _finite(plan[key]) and plan[key] > 0, key
    assert 0.85 <= plan["per_layer_over_plan"] <= 1.15 and 0.85 <= plan["extrapolated_over_plan"] <= 1.15
