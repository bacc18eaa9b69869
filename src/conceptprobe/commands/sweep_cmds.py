"""``conceptprobe sweep CONFIG``: run (or with ``--dry-run`` print) a sweep of models x tasks x shots x seeds.

    conceptprobe sweep probes/offline-smoke.yaml
    conceptprobe sweep probes/paper-families.yaml --dry-run
    conceptprobe sweep probes/offline-families.yaml --models smollm2-135m --shots 1,4 --n 20 --out /tmp/s

Units go to ``<out>/<model-label>/<task>_<shots>shot_seed<seed>/``; ``<out>/sweep.json`` lists them.
Rerunning the same command skips every complete unit and resumes a partial one.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from conceptprobe.sweep import SweepPlan, UnitState
    from conceptprobe.sweep.local import SweepResult

console = Console()
err_console = Console(stderr=True)


def _int_list(value: str | None, flag: str) -> list[int] | None:
    if value is None:
        return None
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"{flag} takes comma-separated integers, e.g. 1,4,10; got {value!r}"
        ) from None
    if not items:
        raise typer.BadParameter(f"{flag} needs at least one value")
    return items


def _str_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def _layers(value: str | None) -> object:
    if value is None or value == "all":
        return value
    parsed = _int_list(value, "--layers")
    return parsed


def print_plan(plan: SweepPlan, states: dict[str, UnitState], out: Console) -> None:
    """The models and units of a sweep, what is complete already and the prompts left to run."""
    from conceptprobe.sweep.local import model_problem

    models = Table(title=f"Sweep {plan.config.name!r}: models ({plan.source})")
    for col in ("label", "ref", "dtype", "quantize", "device_map", "units", "left", "note"):
        models.add_column(col, overflow="fold")
    for model, units in plan.by_model():
        left = sum(1 for u in units if states[u.id].status != "complete")
        note = (model_problem(model) or "") if left else "all complete: not loaded"
        models.add_row(
            model.label,
            model.ref,
            units[0].config.dtype,
            model.quantize or "-",
            str(model.device_map) if model.device_map is not None else "-",
            str(len(units)),
            str(left),
            note,
        )
    out.print(models)
    table = Table(title=f"Units -> {plan.out}")
    for col in ("#", "model", "task", "shots", "seed", "prompts", "state", "folder"):
        table.add_column(
            col, justify="right" if col in ("#", "shots", "seed", "prompts") else "left", overflow="fold"
        )
    style = {"complete": "green", "partial": "yellow", "pending": "", "conflict": "red"}
    for i, unit in enumerate(plan.units, 1):
        state = states[unit.id]
        text = state.status + (f" ({state.detail})" if state.detail else "")
        table.add_row(
            str(i),
            unit.model.label,
            unit.task.label,
            str(unit.shots),
            str(unit.seed),
            str(unit.n_prompts),
            f"[{style[state.status]}]{text}[/]" if style[state.status] else text,
            unit.name,
        )
    out.print(table)
    counts = Counter(s.status for s in states.values())
    left = [u for u in plan.units if states[u.id].status != "complete"]
    loads = len({u.model.label for u in left})
    out.print(
        f"{len(plan.units)} units: {counts['complete']} complete, {counts['partial']} partial, "
        f"{counts['pending']} pending, {counts['conflict']} conflicting; "
        f"{sum(u.n_prompts for u in left)} prompts to run; {loads} model load(s)",
        highlight=False,
    )


def print_summary(result: SweepResult, out: Console) -> None:
    """Per model: units ran, skipped and failed; then each failure's error."""
    table = Table(title=f"Sweep summary ({result.wall_s:.1f} s) -> {result.out}")
    for col in ("model", "ran", "skipped", "failed", "not run"):
        table.add_column(col, justify="left" if col == "model" else "right")
    by_model: dict[str, Counter] = {}
    for u in result.units:
        by_model.setdefault(u["model"], Counter())[u.get("action") or "not run"] += 1
    for model, c in by_model.items():
        table.add_row(model, str(c["ran"]), str(c["skipped"]), str(c["failed"]), str(c["not run"]))
    out.print(table)
    for u in result.failed:
        out.print(f"[red]failed[/] {u['id']}: {escape(u['error'] or '')}", highlight=False)
    out.print(f"manifest: {result.manifest}", highlight=False)


def sweep_cmd(
    config: Path = typer.Argument(..., help="Sweep YAML (see probes/)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan and what is complete; load nothing."
    ),
    models: str | None = typer.Option(
        None,
        "--models",
        help="Comma-separated model labels or refs: run only these (unknown ones are added).",
    ),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated task names or labels to run."),
    shots: str | None = typer.Option(None, "--shots", "-k", help="Comma-separated shot counts, e.g. 1,4,10."),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2."),
    n: int | None = typer.Option(None, "--n", help="Prompts per concept."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="auto | float32 | bfloat16 | float16, for every model."
    ),
    layers: str | None = typer.Option(None, "--layers", help="'all' or comma-separated layer indices."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Prompts per forward pass."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Sweep folder [results/<name>]."),
    tasks_dir: Path | None = typer.Option(None, "--tasks-dir", help="Folder of task plugins [./tasks]."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace unit folders holding another config's run."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (one line per unit)."),
    executor: str = typer.Option("local", "--executor", help="local | ray (one Ray task per model group)."),
    address: str | None = typer.Option(
        None, "--address", help="Ray cluster address ('auto' joins a running cluster; default: a local Ray)."
    ),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="Let hub or folder models run their own Python code (off by default; never set by a file).",
    ),
) -> None:
    """Run a sweep: every model x task x shots x seed, each model loaded once, finished units skipped."""
    from conceptprobe.sweep import expand, load_sweep_config, plan_states

    overrides = {
        "models": _str_list(models),
        "tasks": _str_list(tasks),
        "shots": _int_list(shots, "--shots"),
        "seeds": _int_list(seeds, "--seeds"),
        "n": n,
        "dtype": dtype,
        "layers": _layers(layers),
        "batch_size": batch_size,
        "out": str(out) if out is not None else None,
    }
    cfg = load_sweep_config(config, overrides)
    plan = expand(cfg, str(config), tasks_dir=tasks_dir, trust_remote_code=trust_remote_code)
    states = plan_states(plan)
    if trust_remote_code:
        err_console.print(
            "warning: --trust-remote-code: the models' own Python code may run "
            f"({', '.join(m.ref for m in cfg.models)})",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if dry_run:
        print_plan(plan, states, console)
        return
    if executor not in ("local", "ray"):
        raise typer.BadParameter(f"--executor must be 'local' or 'ray', got {executor!r}")
    from conceptprobe.sweep import run_sweep

    left = sum(1 for s in states.values() if s.status != "complete")
    err_console.print(
        f"sweep {cfg.name!r}: {len(plan.units)} units, {left} to run -> {plan.out}", highlight=False
    )
    try:
        if executor == "ray":
            from conceptprobe.sweep.ray_executor import run_sweep_ray

            result = run_sweep_ray(
                plan,
                address=address,
                tasks_dir=tasks_dir,
                overwrite=overwrite,
                progress=not no_progress,
                console=err_console,
            )
        else:
            result = run_sweep(
                plan, tasks_dir=tasks_dir, overwrite=overwrite, progress=not no_progress, console=err_console
            )
    except KeyboardInterrupt:
        sys.exit(130)  # typer would turn the interrupt into an exit code that `main` does not pass on
    print_summary(result, console)
    if not result.ok:
        err_console.print(
            f"[bold red]error:[/] {len(result.failed)} of {len(result.units)} units failed (see above and "
            f"{result.manifest}); rerun the same command to retry them",
            highlight=False,
        )
        sys.exit(1)


def register(app: typer.Typer) -> None:
    """Add ``sweep`` to the main CLI."""
    app.command("sweep")(sweep_cmd)
