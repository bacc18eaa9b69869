"""The benchmarks run end to end in their quick mode (a smoke run: no thresholds; timings are not tested)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_probes_quick():
    out = _run("bench_probes.py")
    assert "Logistic probe" in out and "k-NN" in out


@pytest.mark.real
def test_bench_capture_quick():
    out = _run("bench_capture.py")
    assert "ratio to floor" in out and "| ours |" in out and "Peak RSS" in out


@pytest.mark.real
def test_bench_end_to_end_quick():
    out = _run("bench_end_to_end.py")
    assert "| stage | seconds | share | x floor |" in out and "| forward |" in out and "| report |" in out
    assert "TFLOP/s" in out and "floor: 2 x non-embedding parameters" in out
    assert "| first use of the model |" in out and "goal within 2x the floor" in out
