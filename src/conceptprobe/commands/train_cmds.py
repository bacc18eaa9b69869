"""``conceptprobe train``: train a small transformer on a synthetic concept task and report what emerges.

    conceptprobe train --preset concepts-cpu        # probes/train-concepts-cpu.yaml -> results/train-concepts-cpu/
    conceptprobe train --preset induction-cpu       # 2-layer attention-only model (+ a 1-layer control)
    conceptprobe train --preset my-run.yaml --steps 2000 --out /tmp/run
    conceptprobe train --report-only --out results/train-concepts-cpu   # rebuild report.html / report.md

Rerunning the same command resumes from the last complete checkpoint (``--fresh`` starts over).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def train_cmd(
    preset: str | None = typer.Option(
        None, "--preset", "-p", help="Preset name (probes/train-<name>.yaml) or a YAML file."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run folder (default: results/train-<preset>)."
    ),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override the number of training steps."),
    seed: int | None = typer.Option(None, "--seed", help="Override the seed."),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch CPU threads (presets say 1: fastest on a busy 2-core box)."
    ),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda."),
    fresh: bool = typer.Option(
        False, "--fresh", help="Delete previous checkpoints and results in --out first."
    ),
    no_controls: bool = typer.Option(False, "--no-controls", help="Skip the preset's control runs."),
    report: bool = typer.Option(
        True, "--report/--no-report", help="Write report.html and report.md at the end."
    ),
    report_only: bool = typer.Option(False, "--report-only", help="Only rebuild the report of --out."),
    umap: bool = typer.Option(True, "--umap/--no-umap", help="Compute the UMAP snapshots for the report."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Train a small transformer on a synthetic task, tracking concepts or induction heads at every checkpoint."""
    from conceptprobe.training.figures import build_training_report

    def log(msg: str) -> None:
        err_console.print(msg, style="dim", highlight=False, markup=False)

    if report_only:
        if out is None:
            if preset is None:
                raise typer.BadParameter("--report-only needs --out (or --preset for its default folder)")
            out = _default_out(preset)
        path = build_training_report(out, log=log, umap=umap)
        _print_findings(out)
        console.print(f"report: {path}")
        return
    if preset is None:
        raise typer.BadParameter(
            "give --preset NAME (concepts-cpu, induction-cpu, concepts-paper) or a YAML file"
        )
    from conceptprobe.training.trainer import load_train_config, train

    overrides = {"steps": steps, "seed": seed, "threads": threads, "device": device}
    cfg = load_train_config(preset, overrides)
    folder = out or _default_out(preset)
    t0 = time.perf_counter()
    result = train(
        cfg,
        folder,
        fresh=fresh,
        progress=not no_progress and sys.stderr.isatty(),
        log=log,
        controls=not no_controls,
    )
    wall = time.perf_counter() - t0
    if result.resumed_from is not None:
        err_console.print(f"resumed from step {result.resumed_from}")
    if not result.complete:
        console.print(f"stopped at step {result.final_step}; rerun the same command to continue")
        return
    if report:
        path = build_training_report(folder, log=log, umap=umap)
        _print_findings(folder)
        console.print(f"report: {path}")
    console.print(f"results: {folder} ({wall:.0f} s)")


def _print_findings(folder: Path) -> None:
    import json

    analysis = json.loads((folder / "analysis.json").read_text())
    for line in analysis.get("findings", []):
        console.print(f"- {line}", highlight=False, markup=False)


def _default_out(preset: str) -> Path:
    name = Path(preset).stem.removeprefix("train-") if preset.endswith((".yaml", ".yml")) else preset
    return Path("results") / f"train-{name}"


def register(app: typer.Typer) -> None:
    """Add ``train`` to the CLI."""
    app.command("train")(train_cmd)
