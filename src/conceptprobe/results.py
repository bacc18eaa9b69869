"""Result folders: their kinds, and the readers a notebook uses.

Every experiment writes one folder; what kind it is follows from its record file:

========================  =============================  ==========================================
kind                      record                         written by
========================  =============================  ==========================================
``probe``                 ``run.json`` (no ``kind``)     ``conceptprobe run`` / :func:`conceptprobe.run`
``patch``, ``finetune``   ``run.json`` with ``kind``     ``conceptprobe patch`` / ``finetune``
``icl``                   ``icl.json``                   ``conceptprobe icl-score`` / ``icl_score``
``heads``                 ``heads.json``                 ``conceptprobe heads`` / ``head_scores``
``ablation``              ``ablation.json``              ``conceptprobe ablate`` / ``ablate``
``checkpoints``           ``checkpoints.json``           ``conceptprobe checkpoints`` / ``checkpoint_sweep``
``token-loss-pca``        ``token_loss_pca.json``        ``conceptprobe token-loss-pca``
``train``                 ``train.json``                 ``conceptprobe train``
``sweep``                 ``sweep.json``                 ``conceptprobe sweep`` (a folder of runs)
========================  =============================  ==========================================

Every kind but ``sweep`` has a ``metrics.parquet`` in the same long form (``model, family, n_params, task,
concept, shots, layer, position, metric, value, seed``, plus kind-specific columns such as ``n`` or
``head``). A checkpoint sweep's rows carry the training ``step``, and so do the rows of a probe run whose
model was a sweep entry naming a checkpoint (``revision: step1000`` or ``step:``; read from ``run.json``).
:func:`load_runs` stacks the metrics of every folder under some paths, :func:`load_run` opens one folder
with its metrics, predictions and (for probe runs) activations as ``(X, labels)`` in the order ``run.json``
records, which is the order the run's own measures used.

``layer`` is always the residual-stream index: 0 = the embeddings (input of decoder block 0), i = the
output of decoder block i-1, before the final norm. Head scores are per decoder block: block b reads
layer b and writes layer b + 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

RECORDS = {  # in order of precedence: a training folder also holds its checkpoints' token_loss_pca.json
    "train.json": "train",
    "icl.json": "icl",
    "heads.json": "heads",
    "ablation.json": "ablation",
    "checkpoints.json": "checkpoints",
    "token_loss_pca.json": "token-loss-pca",
    "sweep.json": "sweep",
}
KINDS = (
    "probe",
    "patch",
    "finetune",
    "icl",
    "heads",
    "ablation",
    "checkpoints",
    "token-loss-pca",
    "train",
    "sweep",
)


class ResultError(ValueError):
    """A folder that is not a readable result; the message names it and the fix."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(
            f"{path} is unreadable ({exc.__class__.__name__}); rerun the command that wrote it"
        ) from None
    if not isinstance(data, dict):
        raise ResultError(
            f"{path} is not a result record (not a JSON object); rerun the command that wrote it"
        )
    return data


def kind_of(folder: str | Path) -> str | None:
    """The kind of result ``folder`` holds (see the module doc), or None when it holds none."""
    folder = Path(folder)
    run_json = folder / "run.json"
    if run_json.is_file():
        try:
            record = _read_json(run_json)
        except ResultError:
            return "probe"  # an unreadable run.json: reported when read
        return str(record.get("kind") or "probe")
    for name, kind in RECORDS.items():
        if (folder / name).is_file():
            return kind
    return None


def find_results(paths: Any, kinds: tuple[str, ...] = KINDS) -> list[tuple[Path, str]]:
    """Result folders at or below ``paths`` (a path or a list), with their kinds, sorted; hidden folders and
    the per-condition runs inside a finetuning folder are left out."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found: dict[Path, str] = {}
    for path in paths:
        root = Path(path)
        if not root.exists():
            raise ResultError(f"{root} does not exist; pass result folders or folders that contain them")
        candidates = [root] if root.is_dir() else [root.parent]
        if root.is_dir():
            candidates += sorted({p.parent for name in ("run.json", *RECORDS) for p in root.rglob(name)})
        for folder in candidates:
            if any(part.startswith(".") for part in folder.relative_to(candidates[0]).parts):
                continue
            kind = kind_of(folder)
            if kind is None or kind not in kinds:
                continue
            if kind == "probe" and kind_of(folder.parent) == "finetune":
                continue
            found.setdefault(folder.resolve(), kind)
    return sorted(found.items())


@dataclass
class Run:
    """One result folder: its kind, its record and readers of what it holds."""

    folder: Path
    kind: str
    record: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.record.get("config") or {})

    @property
    def metrics(self) -> pd.DataFrame:
        """``metrics.parquet`` (long form), with a ``kind`` column."""
        import pandas as pd

        path = self.folder / "metrics.parquet"
        if self.kind == "token-loss-pca" and not path.is_file():  # folders written before it had one
            from conceptprobe.experiments.common import metrics_frame
            from conceptprobe.measures.token_loss import pca_metrics

            frame = metrics_frame(pca_metrics(self.record), extra=("n",))
            frame.insert(0, "kind", self.kind)
            return frame
        if not path.is_file():
            raise ResultError(
                f"{self.folder} has no metrics.parquet: the run is incomplete; rerun it to finish"
            )
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise ResultError(
                f"{path} is unreadable ({exc.__class__.__name__}); rerun the run to rewrite it"
            ) from None
        frame.insert(0, "kind", self.kind)
        step = ((self.record.get("model") or {}).get("extra") or {}).get("step")
        if step is not None and "step" not in frame.columns:  # a sweep's checkpoint (revision step1000)
            frame["step"] = int(step)
        return frame

    @property
    def predictions(self) -> pd.DataFrame:
        """``predictions.jsonl`` of a probe run: one row per prompt (concept, index, prompt, answer, ...)."""
        import pandas as pd

        path = self.folder / "predictions.jsonl"
        if not path.is_file():
            raise ResultError(f"{self.folder} has no predictions.jsonl (kind {self.kind})")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return pd.DataFrame(rows)

    @property
    def concepts(self) -> list[str]:
        """The concepts in the order the run measured them (``run.json``'s task)."""
        return list((self.record.get("task") or {}).get("concepts") or [])

    @property
    def layers(self) -> list[int]:
        """The residual-stream layers the run captured."""
        return [int(v) for v in self.record.get("layers") or []]

    def activations(self, layer: int, position: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(X, labels)``: the residual stream at ``layer`` (residual index) and ``position`` (offset from the
        token before the answer) of every prompt, ``[n, d]`` float32, and each prompt's concept, in the
        order of ``run.json`` (concepts in task order, prompts in index order) — the order of the run's
        own measures, so folds and neighbours match its metrics."""
        import numpy as np
        from safetensors.numpy import load_file

        if self.kind != "probe":
            raise ResultError(f"{self.folder} is a {self.kind} result; activations belong to probe runs")
        if layer not in self.layers:
            raise ResultError(
                f"layer {layer} was not captured in {self.folder}; its layers are {self.layers}"
            )
        positions = list(self.config.get("positions") or [0])
        if position not in positions:
            raise ResultError(
                f"position {position} was not captured in {self.folder}; its positions are {positions}"
            )
        li, pi = self.layers.index(layer), positions.index(position)
        xs, labels = [], []
        for concept in self.concepts:
            path = self.folder / "activations" / f"{concept}.safetensors"
            if not path.is_file():
                raise ResultError(
                    f"{path} is missing (activations are not kept in git); rerun the run's config to recreate it"
                )
            acts = load_file(str(path))["activations"]  # [n, layers, positions, d]
            xs.append(acts[:, li, pi, :])
            labels += [concept] * acts.shape[0]
        return np.concatenate(xs).astype(np.float32), np.asarray(labels)


def _record_file(folder: Path, kind: str) -> Path:
    if kind in ("probe", "patch", "finetune"):
        return folder / "run.json"
    return folder / next(name for name, k in RECORDS.items() if k == kind)


def load_run(folder: str | Path) -> Run:
    """Open one result folder (any kind); errors name the folder and the fix."""
    folder = Path(folder)
    if folder.name in ("run.json", *RECORDS) and folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise ResultError(
            f"{folder} is not a folder; pass a result folder (one with run.json or another record)"
        )
    kind = kind_of(folder)
    if kind is None:
        raise ResultError(
            f"{folder} holds no result (no run.json, icl.json, heads.json, ...); pass a result folder"
        )
    return Run(folder, kind, _read_json(_record_file(folder, kind)))


def load_runs(paths: Any, kinds: tuple[str, ...] = KINDS) -> pd.DataFrame:
    """The metrics of every complete result folder under ``paths``, stacked, with ``kind`` and ``folder``.

    Folders that cannot be read (incomplete, damaged) are skipped; their reasons are in the frame's
    ``attrs["skipped"]``.
    """
    import pandas as pd

    frames, skipped = [], []
    for folder, kind in find_results(paths, tuple(k for k in kinds if k != "sweep")):
        try:
            run = load_run(folder)
            if kind in ("probe", "patch", "finetune") and run.record.get("status") not in (None, "complete"):
                raise ResultError(f"{folder}: status {run.record.get('status')!r}, not complete")
            frame = run.metrics
        except ResultError as exc:
            skipped.append(str(exc))
            continue
        frame.insert(1, "folder", str(folder))
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    out.attrs["skipped"] = skipped
    return out
