"""Expand a sweep into units (model x task x shots x seed), each a RunConfig with its own run folder.

Folder of a unit: ``<out>/<model-label>/<task-label>_<shots>shot_seed<seed>/``. Nothing here loads a
model: planning, validation and the state of each unit on disk need only the config and the tasks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from conceptprobe.config import ConfigError, RunConfig, _format_validation_error
from conceptprobe.store import config_diff, same_measures, sha256_of, stale_temps
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
            task = get_task(entry.name, tasks_dir=tasks_dir, **entry.params)
        except UnknownTaskError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key} ({entry.name}): bad params: {exc}") from None
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
                        "task": entry.name,
                        "task_params": entry.params,
                        "shots": shots,
                        "seed": seed,
                        "dtype": model.dtype or defaults["dtype"],
                    }
                    try:
                        run_config = RunConfig.model_validate(fields)
                    except ValidationError as exc:
                        raise ConfigError(_format_validation_error(exc, source)) from None
                    folder = out / model.label / f"{entry.label}_{shots}shot_seed{seed}"
                    units.append(Unit(model, entry, shots, seed, run_config, folder, concepts[entry.label]))
    return SweepPlan(config=config, source=source, out=out, units=units, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------- the state of units on disk


@dataclass(frozen=True)
class UnitState:
    """``complete`` | ``partial`` (resumable) | ``pending`` | ``conflict`` (another config's run)."""

    status: str
    detail: str = ""


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The previous ``sweep.json`` of ``out`` (None when missing or unreadable)."""
    path = out / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


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
        stray = sorted(p.name for p in folder.iterdir() if p not in stale)
        return (
            UnitState("conflict", f"holds {', '.join(stray[:3])} but no run")
            if stray
            else UnitState("pending")
        )
    try:
        record = json.loads(run_json.read_text())
    except (OSError, json.JSONDecodeError):
        return UnitState("conflict", "run.json unreadable")
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


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (posix), else as given."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
