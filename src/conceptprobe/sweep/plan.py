"""Expand a sweep into units (model x task x shots x seed), each a RunConfig with its own run folder.

Folder of a unit: ``<out>/<model-label>/<task-label>_<shots>shot_seed<seed>/``. Nothing here loads a
model: planning, validation and the state of each unit on disk need only the config and the tasks.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from conceptprobe.config import ConfigError, RunConfig, format_validation_error, os_error_line
from conceptprobe.store import LOCK_NAMES, config_diff, read_record, same_measures, sha256_of, stale_temps
from conceptprobe.sweep.config import ModelEntry, SweepConfig, TaskEntry
from conceptprobe.tasks import UnknownTaskError, get_task

MANIFEST = "sweep.json"


@dataclass(frozen=True)
class Unit:
    """One run of a sweep."""

    model: ModelEntry
    task: TaskEntry
    shots: int
    seed: int
    config: RunConfig
    folder: Path
    concepts: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.task.label}_{self.shots}shot_seed{self.seed}"

    @property
    def id(self) -> str:
        return f"{self.model.label}/{self.name}"

    @property
    def n_prompts(self) -> int:
        return self.config.n * len(self.concepts)


@dataclass
class SweepPlan:
    """A validated sweep: its config, where it came from, its output folder and its units."""

    config: SweepConfig
    source: str
    out: Path
    units: list[Unit]
    #: from the command-line flag or the API only, never from the sweep file
    trust_remote_code: bool = False

    def by_model(self) -> Iterator[tuple[ModelEntry, list[Unit]]]:
        """Units grouped by model, in config order (each model is loaded once for its group)."""
        for model in self.config.models:
            yield model, [u for u in self.units if u.model.label == model.label]

    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST


def expand(
    config: SweepConfig,
    source: str = "sweep config",
    tasks_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> SweepPlan:
    """Every unit of ``config``; task names, task params and run fields are checked here.

    ``trust_remote_code`` (the ``--trust-remote-code`` flag) lets the models run their own Python code.
    """
    concepts: dict[str, tuple[str, ...]] = {}
    for i, entry in enumerate(config.tasks):
        key = f"{source}: key 'tasks.{i}'"
        try:
            task = get_task(entry.name, tasks_dir=tasks_dir or config.tasks_dir, **entry.params)
        except UnknownTaskError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key} ({entry.name}): bad params: {exc}") from None
        except OSError as exc:  # the tasks folder is missing, or a file
            raise ConfigError(os_error_line(exc)) from None
        assert entry.label is not None
        concepts[entry.label] = tuple(task.concepts)
    out = config.out_dir
    defaults = config.run_defaults()
    units = []
    for model in config.models:
        assert model.label is not None
        for entry in config.tasks:
            assert entry.label is not None
            for shots in config.shots:
                for seed in config.seeds_for(shots):
                    fields = {
                        **defaults,
                        "model": model.ref,
                        "revision": model.revision,
                        "task": entry.name,
                        "task_params": entry.params,
                        "shots": shots,
                        "seed": seed,
                        "dtype": model.dtype or defaults["dtype"],
                    }
                    try:
                        run_config = RunConfig.model_validate(fields)
                    except ValidationError as exc:
                        raise ConfigError(format_validation_error(exc, source)) from None
                    folder = out / model.label / f"{entry.label}_{shots}shot_seed{seed}"
                    units.append(Unit(model, entry, shots, seed, run_config, folder, concepts[entry.label]))
    return SweepPlan(config=config, source=source, out=out, units=units, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------- the state of units on disk


@dataclass(frozen=True)
class UnitState:
    """``complete`` | ``partial`` (resumable) | ``pending`` | ``conflict`` (another config's run)."""

    status: str
    detail: str = ""


def manifest_problem(data: Any) -> str | None:
    """Why ``data`` (a parsed ``sweep.json``) is not a sweep manifest, or None."""
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object"
    units = data.get("units", [])
    if not isinstance(units, list):
        return f"key 'units' is a {type(units).__name__}, not a list"
    for i, unit in enumerate(units):
        if not isinstance(unit, dict):
            return f"units[{i}] is a {type(unit).__name__}, not an object"
        for key in ("id", "fingerprint", "metrics_sha256", "started", "finished"):
            if unit.get(key) is not None and not isinstance(unit[key], str):
                return f"units[{i}].{key} is a {type(unit[key]).__name__}, not a string"
    if data.get("created") is not None and not isinstance(data["created"], str):
        return "key 'created' is not a string"
    return None


def read_manifest(out: Path, set_aside: bool = False) -> dict[str, Any] | None:
    """The previous ``sweep.json`` of ``out`` (None when missing or unreadable).

    With ``set_aside``, an unreadable or wrong-shaped one is renamed ``sweep.json.corrupt-<time>`` (with
    a warning naming it), so that the sweep rebuilds it from the unit folders.
    """
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    except json.JSONDecodeError as exc:
        problem = f"JSON syntax error at line {exc.lineno}, column {exc.colno}"
    except OSError as exc:
        problem = f"unreadable: {os.strerror(exc.errno or 0)}"
    else:
        problem = manifest_problem(data)
        if problem is None:
            return data
    if set_aside:
        aside = path.with_name(f"{MANIFEST}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(path, aside)
        warnings.warn(
            f"{path} was corrupt ({problem}); set aside as {aside.name}, rebuilt from the unit folders",
            stacklevel=2,
        )
    return None


def stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files left by a killed writer (``.<name>.tmp<pid>``, pid gone) in a run folder."""
    return stale_temps(folder) + stale_temps(folder / "activations")


def unit_state(unit: Unit, metrics_sha256: str | None = None) -> UnitState:
    """What is on disk for ``unit``; ``metrics_sha256`` (from the manifest) is verified when given."""
    folder = unit.folder
    if not folder.exists():
        return UnitState("pending")
    if not folder.is_dir():
        return UnitState("conflict", f"{folder} is a file")
    run_json = folder / "run.json"
    if not run_json.is_file():
        stale = set(stale_temp_files(folder))
        stray = sorted(p.name for p in folder.iterdir() if p not in stale and p.name not in LOCK_NAMES)
        return (
            UnitState("conflict", f"holds {', '.join(stray[:3])} but no run")
            if stray
            else UnitState("pending")
        )
    try:
        record = read_record(run_json, "pass --overwrite to replace that unit, or move it away")
    except ConfigError as exc:
        from conceptprobe.store import RunStore  # shards that carry this config rebuild the record

        if RunStore(folder, unit.config).recovered_record() is not None:
            return UnitState("partial", "run.json unreadable: rebuilt from its shards on resume")
        return UnitState("conflict", str(exc).split("; ")[0])
    assert record is not None
    if record.get("fingerprint") != unit.config.fingerprint():
        diff = config_diff(record.get("config") or {}, unit.config.model_dump(mode="json"))
        return UnitState(
            "conflict", f"a run of another config (differs in: {', '.join(diff) or 'fingerprint'})"
        )
    metrics = folder / "metrics.parquet"
    if record.get("status") == "complete" and not same_measures(record, unit.config):
        return UnitState("partial", "measure settings changed: measures are recomputed from the activations")
    if record.get("status") == "complete" and isinstance(record.get("outputs"), dict):
        from conceptprobe.store import RunStore  # the run's own completion marker: checksums of its outputs

        problems = RunStore(folder, unit.config).verify_outputs(record)
        return UnitState("partial", "; ".join(problems)) if problems else UnitState("complete")
    if record.get("status") == "complete" and metrics.is_file():
        if metrics_sha256 is not None:
            ok = sha256_of(metrics) == metrics_sha256
        else:  # no checksum recorded (e.g. a run made outside a sweep): at least its footer must parse
            ok = _parquet_readable(metrics)
        return UnitState("complete") if ok else UnitState("partial", "metrics.parquet is corrupt")
    shards = folder / "activations"
    done = sum(1 for c in unit.concepts if (shards / f"{c}.safetensors").is_file())
    return UnitState("partial", f"{done}/{len(unit.concepts)} concepts")


def _parquet_readable(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except (OSError, ValueError, pq.lib.ArrowException):
        return False
    return True


def plan_states(plan: SweepPlan) -> dict[str, UnitState]:
    """The state of every unit, verifying metrics checksums recorded in the previous manifest."""
    previous = read_manifest(plan.out) or {}
    sums = {
        u.get("id"): u.get("metrics_sha256")
        for u in previous.get("units", [])
        if isinstance(u, dict) and u.get("fingerprint")
    }
    fingerprints = {
        u.get("id"): u.get("fingerprint") for u in previous.get("units", []) if isinstance(u, dict)
    }
    states = {}
    for unit in plan.units:
        same = fingerprints.get(unit.id) == unit.config.fingerprint()
        states[unit.id] = unit_state(unit, sums.get(unit.id) if same else None)
    return states


# ---------------------------------------------------------------- checks before any model loads


def check_units(plan: SweepPlan, units: list[Unit], tasks_dir: str | Path | None = None) -> None:
    """Check ``units`` as ``conceptprobe run`` checks a run before loading weights, all before the first
    model of the sweep loads; the first problem is a one-line ConfigError naming the unit or model.

    Each task's prompts (plugins, concepts, shots, knn_k: :func:`~conceptprobe.validate.check_task`, once per
    task, shots and seed), each model reference (:func:`~conceptprobe.validate.check_model_ref`, with "did
    you mean"), its layers, and the prompts against its context. A model's tokenizer (never its weights)
    is loaded only when a prompt could be longer than its context (more UTF-8 bytes than context
    positions) or for negative position offsets.
    """
    from conceptprobe.validate import check_layers, check_model_ref, check_prompts, check_task

    prompts_of: dict[tuple[str, int, int], dict[str, Any]] = {}
    for unit in units:
        key = (str(unit.task.label), unit.shots, unit.seed)
        if key not in prompts_of:
            try:
                prompts_of[key] = check_task(unit.config, tasks_dir)[1]
            except ConfigError as exc:
                raise ConfigError(f"{plan.source}: unit {unit.id}: {exc}") from None
    ids = {u.id for u in units}
    for model, group in plan.by_model():
        todo = [u for u in group if u.id in ids]
        if not todo:
            continue
        try:
            ref = check_model_ref(model.ref, plan.trust_remote_code, model.revision)
        except ConfigError as exc:
            raise ConfigError(f"{plan.source}: models ({model.label}): {exc}") from None
        tokenizer: Any = None
        for unit in todo:
            prompts = prompts_of[(str(unit.task.label), unit.shots, unit.seed)]
            try:
                if ref.n_layers is not None:
                    check_layers(unit.config, ref.n_layers, model.ref)
                if _needs_tokenizer(unit.config, prompts, ref.max_positions):
                    if tokenizer is None:
                        tokenizer = _tokenizer_or_none(model.ref, plan.trust_remote_code)
                    if tokenizer is not False:
                        check_prompts(unit.config, tokenizer, prompts, ref.max_positions, model.ref)
            except ConfigError as exc:
                raise ConfigError(f"{plan.source}: unit {unit.id}: {exc}") from None


def _needs_tokenizer(config: RunConfig, prompts: dict[str, Any], max_positions: int | None) -> bool:
    """Whether checking ``prompts`` needs token counts: a negative position offset, or a prompt with more
    UTF-8 bytes (plus special tokens) than the context has positions (a token covers at least one byte)."""
    if min(config.positions) < 0:
        return True
    if not max_positions:
        return False
    longest = max((len(p.text.encode()) for ps in prompts.values() for p in ps), default=0)
    return longest + 16 > max_positions


def _tokenizer_or_none(ref: str, trust_remote_code: bool) -> Any:
    """The model's tokenizer alone; False when it cannot be loaded here (the unit then fails at its load).

    A tokenizer refused before any weight loads (remote code, no pad token) is a ConfigError.
    """
    from conceptprobe.models.load import ModelLoadError, load_tokenizer

    try:
        return load_tokenizer(ref, trust_remote_code)
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from None
    except Exception:  # noqa: BLE001 - offline hub, odd files: left to the model's own load
        return False


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (posix), else as given."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
