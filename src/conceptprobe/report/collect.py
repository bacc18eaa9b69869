"""Find run folders under the given paths and load their provenance and metrics into one frame.

A run folder is a folder holding ``run.json`` (see :mod:`conceptprobe.store`). Paths may be run folders,
sweep roots (``<root>/<model-label>/<task>_<shots>shot_seed<seed>/``) or any folder above them. Model
and task labels come from a ``sweep.json`` above the run when there is one, else from the run itself
(packaged alias, GGUF stem or last part of the path / hub id; the task name, with its params if any).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from conceptprobe.results import kind_of

#: The metrics.parquet columns the report reads (see conceptprobe.store.METRIC_COLUMNS; not imported: torch).
REQUIRED_COLUMNS = (
    "model",
    "family",
    "n_params",
    "task",
    "concept",
    "shots",
    "layer",
    "position",
    "metric",
    "value",
    "seed",
)


class ReportError(ValueError):
    """The report cannot be built from what was given; the message says why and what to do."""


@dataclass
class RunInfo:
    """One complete run folder, as the report sees it."""

    run_id: int
    folder: Path
    record: dict[str, Any]
    model: str
    task: str
    shots: int
    seed: int
    n: int
    n_layers: int
    position: int
    concepts: list[str]

    @property
    def model_info(self) -> dict[str, Any]:
        return self.record.get("model", {})

    @property
    def config(self) -> dict[str, Any]:
        return self.record.get("config", {})

    def shard(self, concept: str) -> Path:
        return self.folder / "activations" / f"{concept}.safetensors"

    def has_activations(self) -> bool:
        return all(self.shard(c).is_file() for c in self.concepts)


@dataclass
class ReportData:
    """Every run found, their metrics in one long frame, and notes on what was skipped."""

    runs: list[RunInfo]
    metrics: pd.DataFrame
    models: pd.DataFrame  # one row per model label: model, family, n_params, n_layers, hidden_size, ...
    skipped: list[str] = field(default_factory=list)
    sweeps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return sorted({r.task for r in self.runs})

    def shots(self, task: str | None = None) -> list[int]:
        return sorted({r.shots for r in self.runs if task is None or r.task == task})

    def model_order(self, task: str | None = None) -> list[str]:
        present = {r.model for r in self.runs if task is None or r.task == task}
        return [m for m in self.models["model"] if m in present]


def find_run_folders(path: str | Path) -> list[Path]:
    """Run folders at or below ``path`` (folders with a ``run.json``), sorted; errors name the fix.

    Patching and finetuning folders (``run.json`` kind ``patch`` / ``finetune``) and, below a path, the runs
    inside a finetuning folder are not probe runs: the report shows them in its causal-tests section."""
    p = Path(path)
    if not p.exists():
        raise ReportError(f"{p} does not exist; pass run folders or folders that contain them")
    if p.is_file():
        if p.name == "run.json":
            return [] if kind_of(p.parent) in INTERVENTION_KINDS else [p.parent]
        raise ReportError(f"{p} is a file; pass a run folder (with run.json) or a folder that contains runs")
    if (p / "run.json").is_file():
        return [] if kind_of(p) in INTERVENTION_KINDS else [p]
    return sorted(
        f.parent
        for f in p.rglob("run.json")
        if not any(part.startswith(".") for part in f.parts[-3:]) and not _in_intervention(f.parent)
    )


#: ``run.json`` kinds of the causal tests (conceptprobe.interventions): shown in the report's own section.
INTERVENTION_KINDS = ("patch", "finetune")


def _in_intervention(folder: Path) -> bool:
    """A patching or finetuning folder, or a run inside a finetuning folder (its per-condition evaluation):
    found under a path these are not probe runs of their own."""
    return kind_of(folder) in INTERVENTION_KINDS or (
        (folder.parent / "run.json").is_file() and kind_of(folder.parent) == "finetune"
    )


def _sweep_labels(folder: Path, stop: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The ``sweep.json`` above ``folder`` (up to ``stop``'s parent) and this folder's unit in it."""
    here = folder.resolve()
    stop = stop.resolve()
    for parent in [here, *here.parents]:
        manifest = parent / "sweep.json"
        if manifest.is_file():
            try:
                data = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError):
                return None, None
            for unit in data.get("units", []):
                if isinstance(unit, dict) and (parent / str(unit.get("folder", ""))).resolve() == here:
                    return data, unit
            return data, None
        if parent == stop.parent or parent == parent.parent:
            break
    return None, None


def model_label(model: dict[str, Any]) -> str:
    if model.get("alias"):
        return str(model["alias"])
    ref = str(model.get("ref", "model")).rstrip("/")
    return Path(ref).stem if ref.endswith(".gguf") else Path(ref).name


def _task_label(task: dict[str, Any], config: dict[str, Any]) -> str:
    params = (
        config.get("task_params") or {}
    )  # what the user set; the task's defaults are not part of the label
    name = str(task.get("name") or config.get("task"))
    return name + ("(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")" if params else "")


def _load_one(
    folder: Path, root: Path, skipped: list[str]
) -> tuple[RunInfo, pd.DataFrame, dict | None] | None:
    try:
        record = json.loads((folder / "run.json").read_bytes())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text
        why = "not valid JSON" if isinstance(exc, ValueError) else exc.__class__.__name__
        skipped.append(f"{folder}: run.json unreadable ({why}); rerun that run to rebuild it")
        return None
    if not isinstance(record, dict) or not {"config", "model", "task"} <= record.keys():
        skipped.append(f"{folder}: run.json is not a concept run (no config/model/task)")
        return None
    if not all(isinstance(record[k], dict) for k in ("config", "model", "task")):
        skipped.append(f"{folder}: run.json is not a concept run (config/model/task are not objects)")
        return None
    if record.get("status") != "complete":
        skipped.append(f"{folder}: status {record.get('status')!r}, not complete (rerun it to finish)")
        return None
    if not (folder / "metrics.parquet").is_file():
        skipped.append(f"{folder}: no metrics.parquet")
        return None
    try:
        metrics = pd.read_parquet(folder / "metrics.parquet")
    except Exception as exc:  # noqa: BLE001 - a corrupt file skips this run, never the report
        skipped.append(f"{folder}: metrics.parquet unreadable ({exc.__class__.__name__}); rerun that run")
        return None
    missing = [c for c in REQUIRED_COLUMNS if c not in metrics.columns]
    if missing:
        skipped.append(f"{folder}: metrics.parquet lacks columns {missing}")
        return None
    config, model, task = record["config"], record["model"], record["task"]
    try:
        sweep, unit = _sweep_labels(folder, root)
    except (OSError, ValueError, AttributeError, TypeError):  # a corrupt sweep.json: the run's own labels
        sweep, unit = None, None
        skipped.append(f"{folder}: the sweep.json above it is unreadable; labels taken from the run itself")
    try:
        positions = config.get("positions") or [0]
        info = RunInfo(
            run_id=-1,
            folder=folder,
            record=record,
            model=str((unit or {}).get("model") or model_label(model)),
            task=str((unit or {}).get("task_label") or _task_label(task, config)),
            shots=int(config.get("shots", metrics["shots"].iloc[0])),
            seed=int(config.get("seed", metrics["seed"].iloc[0])),
            n=int(config.get("n", 0)),
            n_layers=int(model["n_layers"]),
            position=int(positions[0]),
            concepts=list(task.get("concepts") or sorted(set(metrics["concept"]) - {"all"})),
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        why = exc.__class__.__name__
        skipped.append(f"{folder}: run.json is not a readable run record ({why}); rerun that run")
        return None
    return info, metrics, sweep


def _disambiguate(runs: list[RunInfo]) -> None:
    """Give runs of different models (ref or dtype) that share a label distinct labels."""
    by_label: dict[str, set[tuple[str, str]]] = {}
    for r in runs:
        by_label.setdefault(r.model, set()).add((str(r.model_info.get("ref")), str(r.config.get("dtype"))))
    for r in runs:
        variants = by_label[r.model]
        if len(variants) > 1:
            refs = {v[0] for v in variants}
            r.model = (
                f"{r.model} [{r.config.get('dtype')}]"
                if len(refs) == 1
                else f"{r.model} [{r.model_info.get('ref')}]"
            )


def collect(paths: list[str | Path] | tuple[str | Path, ...]) -> ReportData:
    """Load every complete run under ``paths`` (run folders or folders above them)."""
    if not paths:
        raise ReportError("no paths given; pass run folders or a sweep's output folder")
    skipped: list[str] = []
    found: dict[Path, Path] = {}
    for path in paths:
        folders = find_run_folders(path)
        if not folders:
            raise ReportError(
                f"no run folders (folders with run.json) under {path}; pass a run or sweep folder"
            )
        for f in folders:
            found.setdefault(f.resolve(), Path(path))
    loaded: list[tuple[RunInfo, pd.DataFrame]] = []
    sweeps: dict[str, dict[str, Any]] = {}
    for folder, root in found.items():
        got = _load_one(folder, root, skipped)
        if got is None:
            continue
        info, metrics, sweep = got
        loaded.append((info, metrics))
        if sweep is not None:
            sweeps[str(sweep.get("name")) + str(sweep.get("created"))] = sweep
    if not loaded:
        raise ReportError(
            "no complete runs under "
            + ", ".join(map(str, paths))
            + (": " + "; ".join(skipped[:3]) if skipped else "")
        )
    _disambiguate([i for i, _ in loaded])
    # one run per (model, task, shots, seed): the most recently updated one
    latest: dict[tuple, tuple[RunInfo, pd.DataFrame]] = {}
    for info, metrics in loaded:
        key = (info.model, info.task, info.shots, info.seed)
        if key in latest:
            old = latest[key][0]
            keep, drop = (
                (info, old)
                if str(info.record.get("updated")) > str(old.record.get("updated"))
                else (old, info)
            )
            skipped.append(f"{drop.folder}: same model/task/shots/seed as {keep.folder} (kept the newer one)")
            latest[key] = (keep, metrics if keep is info else latest[key][1])
        else:
            latest[key] = (info, metrics)
    runs, frames = [], []
    for run_id, (info, metrics) in enumerate(sorted(latest.values(), key=lambda im: str(im[0].folder))):
        info.run_id = run_id
        runs.append(info)
        m = metrics.copy()
        m = m[m["position"].isna() | (m["position"] == info.position)]
        m["model_ref"] = m["model"]
        m["model"] = info.model
        m["task_name"] = m["task"]
        m["task"] = info.task
        m["run_id"] = run_id
        m["n_layers"] = info.n_layers
        frames.append(m)
    frame = pd.concat(frames, ignore_index=True)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["rel_layer"] = frame["layer"].astype("float") / frame["n_layers"]
    models = _models_frame(runs)
    return ReportData(runs=runs, metrics=frame, models=models, skipped=skipped, sweeps=list(sweeps.values()))


def _models_frame(runs: list[RunInfo]) -> pd.DataFrame:
    rows = {}
    for r in runs:
        mi = r.model_info
        rows.setdefault(
            r.model,
            {
                "model": r.model,
                "ref": mi.get("ref"),
                "family": mi.get("family"),
                "architecture": mi.get("architecture"),
                "n_params": int(mi.get("n_params", 0)),
                "n_layers": r.n_layers,
                "hidden_size": mi.get("hidden_size"),
                "dtype": r.config.get("dtype"),
            },
        )
    frame = pd.DataFrame(list(rows.values()))
    return frame.sort_values(["n_params", "model"]).reset_index(drop=True)
