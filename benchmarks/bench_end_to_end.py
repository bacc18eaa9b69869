"""End-to-end wall time of a sweep and its report, by stage, against the matmul floor.

    python benchmarks/bench_end_to_end.py [--config probes/offline-4shot.yaml] [--out DIR] [--quick]
    python benchmarks/bench_end_to_end.py --from results/offline-families --shots 4   # an existing sweep

Runs ``conceptprobe sweep CONFIG`` into a fresh folder, then ``conceptprobe report`` on it, and prints the
seconds and share of each stage: model loading (the sweep's ``model_load_s``, from the conversion cache),
forward passes (prefill with capture, ``forward_s`` of each unit's ``run.json``), generation (KV-cached
decoding steps, ``generate_s``), measures (decodability, ``measures_s``), the report, and the rest
(imports, prompt building, writing shards). ``--from`` tabulates the units of a sweep that already ran
(the report is rebuilt and timed).

Before the sweep, each model is loaded once: a first use converts its GGUF into the cache, which is timed
and printed apart ("first-use conversion"), so the sweep's loads are cached loads. The report starts with
an empty UMAP cache.

The floor: 2 x non-embedding parameters x prompt tokens (each unit's ``run.json`` ``tokens.prompt``),
divided by the best matmul rate this script measures in the sweep's dtype with the same threads (shapes of
the packaged models' linear layers). Each stage is printed as a ratio to it. Goal (issue 18): total within
2x the floor, generation under 15% of the forward passes, no stage but the forward passes above 15%.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "conceptprobe.cli"]


def _run(args: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"conceptprobe {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def matmul_rate(dtype: torch.dtype, seconds: float = 1.0) -> tuple[float, dict[str, float]]:
    """Best FLOP/s of ``[tokens, k] @ [k, n]`` matmuls in ``dtype`` (shapes of the packaged models' linear
    layers, 2048 tokens), each repeated for about ``seconds``; returns the best and each shape's rate."""
    rates = {}
    for m, k, n in ((2048, 576, 1536), (2048, 1536, 1536), (2048, 1536, 8960), (2048, 896, 4864)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b  # warm-up (first call picks the kernel)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n * reps / (time.perf_counter() - start)
    return max(rates.values()), rates


def non_embedding_params(model: str) -> int:
    """Parameters outside the token embedding and the unembedding (which runs on one row per prompt)."""
    from conceptprobe.models.plan import build_meta_model, resolve_config

    meta = build_meta_model(resolve_config(model)[0])
    skip = {id(meta.get_input_embeddings().weight)}
    out = meta.get_output_embeddings()
    if out is not None:
        skip.add(id(out.weight))
    return sum(p.numel() for p in meta.parameters() if id(p) not in skip)


def warm_loads(models: list[str], dtype: str) -> list[tuple[str, float, bool]]:
    """Load each model once in a fresh process (a first use converts its GGUF into the cache):
    ``(model, seconds, converted)``."""
    from conceptprobe.models.packaged import cache_dir

    rows = []
    for model in models:
        before = set(cache_dir().rglob("*")) if cache_dir().exists() else set()
        code = f"from conceptprobe.models import load_model; load_model({model!r}, {dtype!r})"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"loading {model} failed:\n{proc.stderr[-3000:]}")
        after = set(cache_dir().rglob("*")) if cache_dir().exists() else set()
        rows.append((model, time.perf_counter() - start, bool(after - before)))
    return rows


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
        tokens = (run.get("tokens") or {}).get("prompt")
        rows.append(
            {"unit": u["folder"], **t, "seconds": u.get("seconds"), "model": u["model"], "tokens": tokens}
        )
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

    from conceptprobe.config import choose_dtype
    from conceptprobe.sweep.config import load_sweep_config

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(
        f"# bench_end_to_end: OMP_NUM_THREADS={threads}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs"
    )
    sweep = load_sweep_config(args.config)
    models = [m.ref for m in sweep.models][:1] if args.quick else [m.ref for m in sweep.models]
    dtype_name = choose_dtype(sweep.dtype)
    rate, rates = matmul_rate(getattr(torch, dtype_name))
    print(
        f"\n{dtype_name} matmul rate (best of shapes, {torch.get_num_threads()} threads): {rate / 1e12:.2f} TFLOP/s"
    )
    print("  " + ", ".join(f"{k}: {v / 1e12:.2f}" for k, v in rates.items()))
    tmp = None
    conversions: list[tuple[str, float, bool]] = []
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
        conversions = warm_loads(models, dtype_name)
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

    params = {m: non_embedding_params(m) for m in sorted({r["model"] for r in rows})}
    counted = [r for r in rows if r["tokens"]]
    flops = sum(2 * params[r["model"]] * r["tokens"] for r in counted)
    floor = flops / rate if len(counted) == len(rows) and rows else None

    print(f"\nsweep {manifest['name']}: {len(rows)} units -> {out}")
    if conversions:
        print("\n| first use of the model | seconds | what happened |\n|---|---|---|")
        for model, sec, converted in conversions:
            what = "GGUF converted into the cache (once per machine)" if converted else "already cached"
            print(f"| {model} | {sec:.1f} | {what} |")
    print(
        "\n| unit | prompt tokens | forward s | generation s | measures s | unit total s |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        fwd = r.get("forward_s", r.get("capture_generate_s"))
        gen = r.get("generate_s", "(in forward)")
        print(f"| {r['unit']} | {r['tokens']} | {fwd} | {gen} | {r.get('measures_s')} | {r.get('total_s')} |")
    if floor is not None:
        print(
            f"\nfloor: 2 x non-embedding parameters x prompt tokens = {flops / 1e12:.1f} TFLOP at "
            f"{rate / 1e12:.2f} TFLOP/s = {floor:.1f} s ({floor / 60:.1f} min); parameters: "
            + ", ".join(f"{m} {n / 1e6:.0f}M" for m, n in params.items())
        )
    else:
        print("\nfloor: not computed (units without a tokens record in run.json: run before it was kept)")
    print("\n| stage | seconds | share | x floor |\n|---|---|---|---|")
    for name, sec in total.items():
        if sec or name in ("load", "forward", "generation", "measures", "report"):
            ratio = f"{sec / floor:.2f}" if floor else "-"
            print(f"| {name} | {sec:.1f} | {sec / wall:.1%} | {ratio} |")
    ratio = f"{wall / floor:.2f}" if floor else "-"
    print(f"| **total** | **{wall:.1f}** ({wall / 60:.1f} min) | 100% | **{ratio}** |")
    over = [n for n, s in total.items() if n not in ("forward", "capture+generation") and s / wall > 0.15]
    gen_share = total["generation"] / total["forward"] if total["forward"] else float("nan")
    within = "met" if floor and wall <= 2 * floor else "NOT met"
    print(
        f"\ngoal within 2x the floor: {within}; generation {gen_share:.1%} of the forward passes "
        f"(goal < 15%: {'met' if gen_share < 0.15 else 'NOT met'}); stages other than the forward passes "
        f"above 15% of the total: {', '.join(over) if over else 'none'}"
    )
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
