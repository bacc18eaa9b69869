"""``conceptprobe checkpoints CONFIG``: measure a model at every training checkpoint the config names.

    conceptprobe checkpoints probes/checkpoints-induction-cpu.yaml     # -> results/checkpoints-induction-cpu/
    conceptprobe checkpoints probes/checkpoints-pythia.yaml --out /tmp/pythia

Writes checkpoints.json, metrics.parquet (keyed by step), checkpoints.png, report.html / report.md and
figures/ in ``--out`` (default: the config's ``out``, else ``results/<name>``). Rerunning skips every
checkpoint already measured with the same settings.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def checkpoints_cmd(
    config: Path = typer.Argument(
        ..., help="Checkpoint-sweep YAML (e.g. probes/checkpoints-induction-cpu.yaml)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Result folder (default: the config's out, else results/NAME)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch CPU threads (default: the config's threads)."
    ),
    tasks_dir: Path | None = typer.Option(None, "--tasks-dir", help="Folder of task plugins."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html and report.md."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Head scores, ICL score and concept tasks at every training checkpoint, against the step."""
    from conceptprobe.api import checkpoint_sweep
    from conceptprobe.experiments.checkpoint_config import load_checkpoint_config

    cfg = load_checkpoint_config(config, {"threads": threads})
    folder = out or cfg.out_dir
    result = checkpoint_sweep(
        cfg,
        folder,
        report=report,
        tasks_dir=tasks_dir,
        progress=not no_progress and sys.stderr.isatty(),
        log=lambda msg: err_console.print(msg, style="dim", highlight=False, markup=False, soft_wrap=True),
    )
    from conceptprobe.experiments.checkpoints import summary_line

    for entry in result.record["checkpoints"]:
        console.print(
            f"step {entry['step']}: {summary_line(entry['summary'])}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    reused = len(result.record["checkpoints"]) - len(result.measured or [])
    if reused:
        console.print(f"{reused} checkpoints read back from an earlier run of the same settings")
    report_path = f" (report: {folder / 'report.html'})" if report else ""
    console.print(f"results: {folder}{report_path}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``checkpoints`` to ``app``."""
    app.command("checkpoints")(checkpoints_cmd)
