"""End-to-end wall time of a sweep and its report, broken down by stage (issue: Performance, target 5).

    python benchmarks/bench_end_to_end.py [--config probes/offline-4shot.yaml] [--out DIR] [--quick]
    python benchmarks/bench_end_to_end.py --from results/offline-families --shots 4   # an existing sweep

Runs ``conceptprobe sweep CONFIG`` into a fresh folder, then ``conceptprobe report`` on it, and prints the
seconds and share of each stage: model loading (the sweep's ``model_load_s``), forward passes (prefill with
capture, ``forward_s`` of each unit's ``run.json``), generation (KV-cached decoding steps, ``generate_s``),
measures (decodability, ``measures_s``), the report, and the rest (imports, prompt building, writing
shards). ``--from`` tabulates the units of a sweep that already ran (the report is rebuilt and timed). Models
load from the conceptprobe cache as after a first use; the report starts with an empty UMAP cache.
Goal: under 30 minutes, and no stage but the forward passes above 15% of the total.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "conceptprobe.cli"]


def _run(args: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"conceptprobe {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def stages(out: Path, shots: set[int] | None = None) -> tuple[dict[str, float], list[dict], dict]:
    """Per-stage seconds summed over the sweep's units (those with the given shots, if any)."""
    manifest = json.loads((out / "sweep.json").read_text())
    total = {"load": 0.0, "forward": 0.0, "generation": 0.0, "capture+generation": 0.0, "measures": 0.0}
    rows = []
    for u in manifest["units"]:
        record = out / u["folder"] / "run.json"
        if (shots and u["shots"] not in shots) or not record.is_file():
            continue
        run = json.loads(record.read_text())
        if run.get("status") != "complete":  # the unit's own record (another process may have finished it)
            continue
        t = run.get("timings", {})
        rows.append({"unit": u["folder"], **t, "seconds": u.get("seconds")})
        if "forward_s" in t:
            total["forward"] += t["forward_s"]
            total["generation"] += t["generate_s"]
        else:  # units written before the split was recorded
            total["capture+generation"] += t.get("capture_generate_s", 0.0)
        total["measures"] += t.get("measures_s", 0.0)
    loads = manifest.get("invocation", {}).get("model_load_s", {})
    total["load"] = float(sum(loads.values()))
    return total, rows, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="probes/offline-4shot.yaml")
    ap.add_argument("--out", help="sweep folder (default: a fresh temporary folder, removed afterwards)")
    ap.add_argument(
        "--from", dest="existing", help="tabulate an existing sweep folder instead of running one"
    )
    ap.add_argument("--shots", help="with --from: only units with these shots (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="smoke run: SmolLM2-135M, POS, 1 shot, n=6")
    args = ap.parse_args()

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"# bench_end_to_end: OMP_NUM_THREADS={threads}, {os.cpu_count()} CPUs")
    tmp = None
    if args.existing:
        out = Path(args.existing)
        shots = {int(s) for s in args.shots.split(",")} if args.shots else None
        sweep_wall = None
    else:
        shots = None
        if args.out:
            out = Path(args.out)
            if out.exists() and any(out.iterdir()):
                sys.exit(f"--out {out} is not empty: finished units would be skipped; pass an empty folder")
        else:
            tmp = tempfile.mkdtemp(prefix="conceptprobe-e2e-")
            out = Path(tmp)
        extra = (
            ["--models", "smollm2-135m", "--tasks", "pos", "--shots", "1", "--n", "6"] if args.quick else []
        )
        sweep_wall = _run(["sweep", args.config, "--out", str(out), "--no-progress", *extra])
    total, rows, manifest = stages(out, shots)
    report_dir = Path(tempfile.mkdtemp(prefix="conceptprobe-e2e-report-")) if args.existing else out
    targets = [str(out / r["unit"]) for r in rows] if shots else [str(out)]
    with tempfile.TemporaryDirectory(
        prefix="conceptprobe-e2e-cache-"
    ) as cold:  # no cached UMAPs: a cold report
        report_s = _run(
            ["report", *targets, "--out", str(report_dir / "report.html")],
            env={**os.environ, "CONCEPTPROBE_CACHE": cold},
        )
    if args.existing:
        shutil.rmtree(report_dir, ignore_errors=True)
    total["report"] = report_s
    measured = sum(total.values())
    wall = (sweep_wall + report_s) if sweep_wall is not None else measured
    total["other"] = max(0.0, wall - measured)

    print(f"\nsweep {manifest['name']}: {len(rows)} units -> {out}")
    print("\n| unit | forward s | generation s | measures s | unit total s |\n|---|---|---|---|---|")
    for r in rows:
        fwd = r.get("forward_s", r.get("capture_generate_s"))
        gen = r.get("generate_s", "(in forward)")
        print(f"| {r['unit']} | {fwd} | {gen} | {r.get('measures_s')} | {r.get('total_s')} |")
    print("\n| stage | seconds | share |\n|---|---|---|")
    for name, sec in total.items():
        if sec or name in ("load", "forward", "generation", "measures", "report"):
            print(f"| {name} | {sec:.1f} | {sec / wall:.1%} |")
    print(f"| **total** | **{wall:.1f}** ({wall / 60:.1f} min) | 100% |")
    over = [n for n, s in total.items() if n not in ("forward", "capture+generation") and s / wall > 0.15]
    print(
        f"\ngoal under 30 min: {'met' if wall < 1800 else 'NOT met'}; stages other than the forward passes "
        f"above 15%: {', '.join(over) if over else 'none'}"
    )
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
