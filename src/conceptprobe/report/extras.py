"""Find and load the result folders the report shows beside the probe runs.

- ``icl.json`` (``conceptprobe icl-score``): ICL score with its interval, windowed score, loss curve.
- ``heads.json`` (``conceptprobe heads``): prefix-matching and copying scores per layer and head.
- ``token_loss_pca.json`` (``conceptprobe token-loss-pca``): PCA coordinates of per-token loss vectors.
- ``ablation.json`` (``conceptprobe ablate``): head ablation, per condition and measure with intervals.
- ``checkpoints.json`` (``conceptprobe checkpoints``): a checkpoint sweep, with its ``metrics.parquet`` keyed by
  training step.
- ``run.json`` with ``kind: patch`` (:mod:`conceptprobe.interventions.patching`) and ``kind: finetune``
  (:mod:`conceptprobe.interventions.finetune`), each with its ``metrics.parquet``.

Nothing here recomputes a measure: every number is read from these files (the finetuning table picks values
out of ``metrics.parquet`` the way ``finetune.comparison_table`` does). No torch import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from conceptprobe.report.collect import INTERVENTION_KINDS, ReportError, find_run_folders, model_label

ICL_FILE, HEADS_FILE, PCA_FILE = "icl.json", "heads.json", "token_loss_pca.json"
ABLATION_FILE, CHECKPOINTS_FILE = "ablation.json", "checkpoints.json"
MARKERS = (ICL_FILE, HEADS_FILE, PCA_FILE, ABLATION_FILE, CHECKPOINTS_FILE, "run.json")


@dataclass
class IclResult:
    folder: Path
    model: str
    n_params: int
    data: dict[str, Any]  # icl.json as written

    @property
    def windowed(self) -> dict[str, Any] | None:
        return self.data.get("windowed") or None


@dataclass
class HeadsResult:
    folder: Path
    model: str
    n_params: int
    data: dict[str, Any]  # heads.json as written

    @property
    def prefix_matching(self) -> np.ndarray:
        return np.asarray(self.data["prefix_matching"], dtype=float)

    @property
    def threshold(self) -> float:
        return float(self.data.get("settings", {}).get("threshold", float("nan")))

    @property
    def above(self) -> list[dict[str, Any]]:
        return list(self.data.get("heads_above_threshold") or [])

    @property
    def top(self) -> list[dict[str, Any]]:
        return list(self.data.get("top_heads") or [])


@dataclass
class AblationResult:
    folder: Path
    model: str
    n_params: int
    data: dict[str, Any]  # ablation.json as written


@dataclass
class CheckpointsResult:
    """A checkpoint sweep: its record and its metrics (long form, ``step`` column)."""

    folder: Path
    model: str
    n_params: int
    data: dict[str, Any]  # checkpoints.json as written
    metrics: pd.DataFrame


@dataclass
class PcaResult:
    folder: Path
    data: dict[str, Any]  # token_loss_pca.json as written
    labels: list[str] = field(default_factory=list)  # the points' labels, as the ICL rows name the models


@dataclass
class InterventionResult:
    """A patching or finetuning folder: its run.json and metrics.parquet."""

    folder: Path
    kind: str  # "patch" | "finetune"
    model: str
    n_params: int
    task: str
    record: dict[str, Any]
    metrics: pd.DataFrame

    @property
    def config(self) -> dict[str, Any]:
        return self.record.get("config", {})

    @property
    def shots(self) -> int:
        return int(self.config.get("shots", -1))

    @property
    def mode(self) -> str:
        return str(self.config.get("mode", "?"))

    @property
    def n_layers(self) -> int:
        return int(self.record.get("model", {}).get("n_layers", 0))


@dataclass
class Extras:
    """Every extra result found under the report's paths, and what was skipped and why."""

    icl: list[IclResult] = field(default_factory=list)
    heads: list[HeadsResult] = field(default_factory=list)
    pca: list[PcaResult] = field(default_factory=list)
    patch: list[InterventionResult] = field(default_factory=list)
    finetune: list[InterventionResult] = field(default_factory=list)
    ablation: list[AblationResult] = field(default_factory=list)
    checkpoints: list[CheckpointsResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def has_icl(self) -> bool:
        return bool(self.icl or self.heads or self.pca)

    @property
    def has_causal(self) -> bool:
        return bool(self.patch or self.finetune or self.ablation)

    @property
    def has_checkpoints(self) -> bool:
        return bool(self.checkpoints)

    def __bool__(self) -> bool:
        return self.has_icl or self.has_causal or self.has_checkpoints

    def under(self, path: str | Path) -> bool:
        """Whether any result found lies at or below ``path``."""
        root = Path(path).resolve()
        if root.is_file():
            root = root.parent
        found = [*self.icl, *self.heads, *self.pca, *self.patch, *self.finetune, *self.ablation]
        folders = [r.folder.resolve() for r in [*found, *self.checkpoints]]
        return any(f == root or root in f.parents for f in folders)

    def models(self) -> list[str]:
        """Model labels in order of size (then name)."""
        sizes: dict[str, int] = {}
        for r in [*self.icl, *self.heads, *self.patch, *self.finetune, *self.ablation, *self.checkpoints]:
            sizes.setdefault(r.model, r.n_params)
        return sorted(sizes, key=lambda m: (sizes[m], m))

    def summary(self) -> str:
        parts = [
            f"{len(self.icl)} ICL score" if self.icl else "",
            f"{len(self.heads)} induction heads" if self.heads else "",
            f"{len(self.pca)} token-loss PCA" if self.pca else "",
            f"{len(self.patch)} patching" if self.patch else "",
            f"{len(self.finetune)} finetuning" if self.finetune else "",
            f"{len(self.ablation)} head ablation" if self.ablation else "",
            f"{len(self.checkpoints)} checkpoint sweep" if self.checkpoints else "",
        ]
        return ", ".join(p for p in parts if p)


def _read_json(path: Path, skipped: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        skipped.append(f"{path}: unreadable ({exc})")
        return None
    if not isinstance(data, dict):
        skipped.append(f"{path}: not a JSON object")
        return None
    return data


def _candidates(path: Path) -> list[Path]:
    """Marker files at or below ``path`` (hidden folders left out)."""
    if path.is_file():
        return [path] if path.name in MARKERS else []
    out = []
    for name in MARKERS:
        out += [
            f
            for f in path.rglob(name)
            if not any(part.startswith(".") for part in f.relative_to(path).parts[:-1])
        ]
    return sorted(set(out))


def _unique_labels(results: list[Any], key: Any = lambda r: ()) -> None:
    """Two folders of one model label that would share a row or panel (e.g. two dtypes, two patching runs
    of one task and mode): add the folder name to tell them apart."""
    keys = [(r.model, key(r)) for r in results]
    for r, k in zip(results, keys, strict=True):
        if keys.count(k) > 1:
            r.model = f"{r.model} ({r.folder.name})"


def _load_intervention(folder: Path, record: dict[str, Any], skipped: list[str]) -> InterventionResult | None:
    if record.get("status") != "complete":
        skipped.append(f"{folder}: {record.get('kind')} status {record.get('status')!r}, not complete")
        return None
    if not (folder / "metrics.parquet").is_file():
        skipped.append(f"{folder}: {record.get('kind')} folder without metrics.parquet")
        return None
    metrics = pd.read_parquet(folder / "metrics.parquet")
    need = {"metric", "value", "concept", "condition", "layer"}
    if not need <= set(metrics.columns):
        skipped.append(f"{folder}: metrics.parquet lacks columns {sorted(need - set(metrics.columns))}")
        return None
    model = record.get("model") or {}
    task = record.get("task") or {}
    return InterventionResult(
        folder=folder,
        kind=str(record["kind"]),
        model=model_label(model),
        n_params=int(model.get("n_params") or 0),
        task=str(task.get("name") or record.get("config", {}).get("task")),
        record=record,
        metrics=metrics,
    )


def find_extras(paths: list[str | Path] | tuple[str | Path, ...]) -> Extras:
    """ICL, heads, token-loss PCA, patching and finetuning folders at or below ``paths``."""
    ex = Extras()
    seen: set[Path] = set()
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise ReportError(f"{p} does not exist; pass run or result folders or folders that contain them")
        for marker in _candidates(p):
            folder = marker.parent
            key = marker.resolve()
            if key in seen:
                continue
            seen.add(key)
            if marker.name == "run.json":
                record = _read_json(marker, [])  # probe runs are collect's business; only kinds here
                if record is None or record.get("kind") not in INTERVENTION_KINDS:
                    continue
                got = _load_intervention(folder, record, ex.skipped)
                if got is not None:
                    (ex.patch if got.kind == "patch" else ex.finetune).append(got)
                continue
            data = _read_json(marker, ex.skipped)
            if data is None:
                continue
            if marker.name == ICL_FILE:
                if data.get("measure") != "icl_score" or "score" not in data:
                    ex.skipped.append(f"{marker}: not an icl-score result")
                    continue
                model = data.get("model") or {}
                ex.icl.append(IclResult(folder, model_label(model), int(model.get("n_params") or 0), data))
            elif marker.name == HEADS_FILE:
                if data.get("measure") != "induction_heads" or "prefix_matching" not in data:
                    ex.skipped.append(f"{marker}: not a heads result")
                    continue
                model = data.get("model") or {}
                ex.heads.append(
                    HeadsResult(folder, model_label(model), int(model.get("n_params") or 0), data)
                )
            elif marker.name == ABLATION_FILE:
                if data.get("kind") != "ablation" or not data.get("summary"):
                    ex.skipped.append(f"{marker}: not a head-ablation result")
                    continue
                model = data.get("model") or {}
                ex.ablation.append(
                    AblationResult(folder, model_label(model), int(model.get("n_params") or 0), data)
                )
            elif marker.name == CHECKPOINTS_FILE:
                got = _load_checkpoints(folder, data, ex.skipped)
                if got is not None:
                    ex.checkpoints.append(got)
            elif marker.name == PCA_FILE:
                if not {"labels", "coords", "explained_variance_ratio"} <= data.keys():
                    ex.skipped.append(f"{marker}: not a token-loss PCA result")
                    continue
                ex.pca.append(PcaResult(folder, data))
    for group in (ex.icl, ex.heads, ex.patch, ex.finetune, ex.ablation, ex.checkpoints):
        group.sort(key=lambda r: (r.n_params, r.model, str(r.folder)))
    _unique_labels(ex.icl)
    _unique_labels(ex.heads)
    _unique_labels(ex.patch, lambda r: (r.task, r.shots, r.mode, len(patch_layers(r)) > 1))
    _unique_labels(ex.finetune, lambda r: (r.task, r.shots))
    _unique_labels(ex.ablation)
    _unique_labels(ex.checkpoints)
    ex.pca.sort(key=lambda r: str(r.folder))
    for p in ex.pca:
        p.labels = _pca_labels(p, ex.icl)
    return ex


def _load_checkpoints(folder: Path, data: dict[str, Any], skipped: list[str]) -> CheckpointsResult | None:
    if data.get("kind") != "checkpoints" or not data.get("checkpoints"):
        skipped.append(f"{folder / CHECKPOINTS_FILE}: not a checkpoint-sweep result")
        return None
    try:
        metrics = pd.read_parquet(folder / "metrics.parquet")
    except Exception as exc:  # noqa: BLE001 - missing or damaged: reported, not fatal
        skipped.append(
            f"{folder}: checkpoint sweep without a readable metrics.parquet ({exc.__class__.__name__})"
        )
        return None
    if not {"step", "metric", "value", "layer", "head"} <= set(metrics.columns):
        skipped.append(
            f"{folder}: checkpoint metrics.parquet lacks a step, metric, value, layer or head column"
        )
        return None
    last = data["checkpoints"][-1]
    model = last.get("model") or {}
    extra = model.get("extra") or {}
    name = extra.get("run_name") if model.get("source") == "training" else model_label(model)
    return CheckpointsResult(
        folder, str(name or data.get("name")), int(model.get("n_params") or 0), data, metrics
    )


def _pca_labels(p: PcaResult, icl: list[IclResult]) -> list[str]:
    """A PCA point is labelled with its model's alias, else its ref (a path for a local model): use the label
    of the ICL folder it was computed from when that folder is here, else the last part of a path."""
    folders = list(p.data.get("folders") or [])
    out = []
    for k, label in enumerate(p.data["labels"]):
        name = Path(str(folders[k])).name if k < len(folders) else None
        match = [r.model for r in icl if name is not None and r.folder.name == name]
        out.append(
            match[0] if len(match) == 1 else Path(str(label)).name if "/" in str(label) else str(label)
        )
    return out


def split_paths(paths: list[str | Path] | tuple[str | Path, ...]) -> tuple[list[str | Path], Extras]:
    """The paths that hold probe runs (for :func:`~conceptprobe.report.collect.collect`), and every extra
    result under any path; a path with neither is an error that names it."""
    if not paths:
        raise ReportError("no paths given; pass run folders or a sweep's output folder")
    extras = find_extras(paths)
    result_files = (ICL_FILE, HEADS_FILE, PCA_FILE, ABLATION_FILE, CHECKPOINTS_FILE)  # a path may name one
    probe = [p for p in paths if not (Path(p).name in result_files and Path(p).is_file())]
    probe = [p for p in probe if find_run_folders(p)]
    for p in paths:
        if p not in probe and not extras.under(p):
            raise ReportError(
                f"no run folders (run.json) or results (icl.json, heads.json, token_loss_pca.json, ablation.json, "
                f"checkpoints.json, patching or finetuning run.json) under {p}; pass a run, sweep or result folder"
            )
    return probe, extras


# ------------------------------------------------------------------------------------------------------------
# Values picked out of the intervention metrics (no recomputation)

PATCH_CONDITIONS = ("positive", "negative", "cross")


def patch_layers(r: InterventionResult) -> list[int]:
    m = r.metrics
    return sorted(int(v) for v in m.loc[m["metric"] == "patch_delta_accuracy", "layer"].dropna().unique())


def patch_concepts(r: InterventionResult) -> list[str]:
    """The task's concepts present in the metrics (task order), then ``all``."""
    present = set(r.metrics.loc[r.metrics["metric"] == "patch_delta_accuracy", "concept"])
    order = [
        c for c in (r.record.get("task", {}).get("concepts") or sorted(present - {"all"})) if c in present
    ]
    return order + (["all"] if "all" in present else [])


def patch_value(
    r: InterventionResult, metric: str, condition: str, concept: str, layer: int | None
) -> tuple[float, float]:
    """``metric`` and ``metric_std`` (mean and sample std over seeds, as written) for one cell."""
    m = r.metrics
    sel = (m["condition"] == condition) & (m["concept"] == concept)
    sel &= m["layer"].isna() if layer is None else (m["layer"] == layer)
    out = []
    for name in (metric, f"{metric}_std"):
        v = m.loc[sel & (m["metric"] == name), "value"]
        out.append(float(v.iloc[0]) if len(v) else float("nan"))
    return out[0], out[1]


def finetune_conditions(r: InterventionResult) -> list[str]:
    conds = ["base", *(r.record.get("conditions") or {})]
    present = set(r.metrics["condition"])
    return [c for c in conds if c in present] + sorted(present - set(conds))


def finetune_ref_layer(r: InterventionResult) -> int | None:
    peak = (r.record.get("peak_layers") or {}).get("base")
    return None if peak is None else int(peak)


def finetune_row(r: InterventionResult, condition: str) -> dict[str, float]:
    """Table-1 cells of one condition: decodability and probe accuracy at the base model's peak layer,
    the highest k-NN decodability over layers and its layer, ICL accuracy (all concepts), train loss."""
    m = r.metrics
    m = m[(m["condition"] == condition) & (m["concept"] == "all")]
    ref = finetune_ref_layer(r)

    def at(metric: str, layer: int | None) -> float:
        sel = m[m["metric"] == metric]
        sel = sel[sel["layer"].isna()] if layer is None else sel[sel["layer"] == layer]
        return float(sel["value"].iloc[0]) if len(sel) else float("nan")

    knn = m[(m["metric"] == "cd_knn") & m["layer"].notna()]
    best = knn.loc[knn["value"].idxmax()] if len(knn) else None
    return {
        "cd_ref": at("cd_knn", ref) if ref is not None else float("nan"),
        "probe_ref": at("probe_accuracy", ref) if ref is not None else float("nan"),
        "cd_max": float(best["value"]) if best is not None else float("nan"),
        "cd_max_layer": float(best["layer"]) if best is not None else float("nan"),
        "acc": at("finetune_accuracy", None),
        "train_loss": at("finetune_train_loss", None),
    }


__all__ = [
    "AblationResult",
    "CheckpointsResult",
    "Extras",
    "HeadsResult",
    "IclResult",
    "InterventionResult",
    "PcaResult",
    "find_extras",
    "finetune_conditions",
    "finetune_ref_layer",
    "finetune_row",
    "patch_concepts",
    "patch_layers",
    "patch_value",
    "split_paths",
]
