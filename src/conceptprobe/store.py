"""A run folder: provenance (``run.json``), per-concept shards, metrics (Parquet), predictions (JSONL).

Layout::

    <run>/run.json                        config, fingerprint, model/task info, versions, git, timings
    <run>/metrics.parquet                 long form: model, family, n_params, task, concept, shots,
                                          layer, position, metric, value, seed
    <run>/predictions.jsonl               one line per prompt
    <run>/table.txt                       the table `conceptprobe run` printed
    <run>/activations/<concept>.safetensors
        tensor "activations" [n_prompts, n_layers, n_positions, d] (float32); metadata holds the
        layers, positions and the predictions of that concept (the unit of resumption)

Every file is written to a temporary name and renamed, so a killed run leaves either the old file or
the new one, never half of one. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from conceptprobe.config import ConfigError, RunConfig

METRIC_COLUMNS = [
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
]
_VERSIONED = (
    "conceptprobe",
    "torch",
    "transformers",
    "numpy",
    "scikit-learn",
    "safetensors",
    "gguf",
    "tokenizers",
)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename (fsync'd)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def git_revision() -> dict[str, Any] | None:
    """The git commit of the conceptprobe checkout (None when installed from a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": rev, "dirty": bool(dirty)}


class RunStore:
    """One run's folder. Refuses (with the fix) a folder holding a run of a different config."""

    def __init__(self, folder: str | Path, config: RunConfig, overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.config = config
        self.overwrite = overwrite

    @property
    def run_json(self) -> Path:
        return self.folder / "run.json"

    @property
    def shard_dir(self) -> Path:
        return self.folder / "activations"

    def shard_path(self, concept: str) -> Path:
        return self.shard_dir / f"{concept}.safetensors"

    def read_run_json(self) -> dict[str, Any] | None:
        if not self.run_json.is_file():
            return None
        try:
            return json.loads(self.run_json.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{self.run_json} is not valid JSON ({exc}); move the folder away or pass --overwrite"
            ) from None

    def prepare(self) -> dict[str, Any] | None:
        """Check the folder against this config; returns the previous run.json when resuming."""
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"output path {self.folder} exists and is not a folder; choose another --out")
        if self.folder.is_dir():  # temporaries of a killed writer are never results
            for tmp in self.folder.rglob(".*.tmp*"):
                tmp.unlink(missing_ok=True)
        previous = self.read_run_json()
        if previous is None:
            if self.folder.is_dir() and any(self.folder.iterdir()) and not self.overwrite:
                stray = sorted(p.name for p in self.folder.iterdir())[:5]
                raise ConfigError(
                    f"output folder {self.folder} is not empty and holds no run ({', '.join(stray)}); "
                    "choose another --out or pass --overwrite"
                )
            return None
        if previous.get("fingerprint") != self.config.fingerprint():
            if not self.overwrite:
                old = previous.get("config", {})
                diff = sorted(
                    k
                    for k in set(old) | set(self.config.model_dump(mode="json"))
                    if k not in ("batch_size", "save_activations")
                    and old.get(k) != self.config.model_dump(mode="json").get(k)
                )
                raise ConfigError(
                    f"output folder {self.folder} holds a run of a different config (differs in: "
                    f"{', '.join(diff) or 'fingerprint'}); choose another --out, or pass --overwrite to replace it"
                )
            self.clear()
            return None
        return previous

    def clear(self) -> None:
        for path in (self.run_json, self.folder / "metrics.parquet", self.folder / "predictions.jsonl"):
            path.unlink(missing_ok=True)
        if self.shard_dir.is_dir():
            for shard in self.shard_dir.glob("*.safetensors"):
                shard.unlink()

    def write_run_json(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.run_json, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")

    def has_shard(self, concept: str, n: int, layers: list[int], positions: list[int]) -> bool:
        """Whether a complete, readable shard for ``concept`` exists (a corrupt one is deleted)."""
        path = self.shard_path(concept)
        if not path.is_file():
            return False
        try:
            acts, meta = self.read_shard(concept)
        except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError):
            path.unlink(missing_ok=True)
            return False
        ok = (
            acts.shape[0] == n
            and meta["layers"] == layers
            and meta["positions"] == positions
            and len(meta["predictions"]) == n
        )
        if not ok:
            path.unlink(missing_ok=True)
        return ok

    def write_shard(
        self,
        concept: str,
        activations: torch.Tensor,
        predictions: list[dict[str, Any]],
        layers: list[int],
        positions: list[int],
    ) -> None:
        if not torch.isfinite(activations).all():
            bad = (~torch.isfinite(activations)).nonzero()[0].tolist()
            raise FloatingPointError(
                f"NaN/inf in captured activations of concept {concept!r} (prompt {bad[0]}, layer "
                f"{layers[bad[1]]}); try --dtype float32, the model is numerically unstable in this dtype"
            )
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        path = self.shard_path(concept)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        meta = {
            "concept": concept,
            "layers": json.dumps(layers),
            "positions": json.dumps(positions),
            "predictions": json.dumps(predictions),
        }
        save_file({"activations": activations.contiguous()}, str(tmp), metadata=meta)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def read_shard(self, concept: str) -> tuple[torch.Tensor, dict[str, Any]]:
        path = self.shard_path(concept)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
        acts = load_file(str(path))["activations"]
        meta = {
            "concept": raw["concept"],
            "layers": json.loads(raw["layers"]),
            "positions": json.loads(raw["positions"]),
            "predictions": json.loads(raw["predictions"]),
        }
        return acts, meta

    def write_metrics(self, frame: pd.DataFrame) -> None:
        missing = [c for c in METRIC_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"metrics frame lacks columns {missing}")
        frame = frame[METRIC_COLUMNS + [c for c in frame.columns if c not in METRIC_COLUMNS]]
        tmp = self.folder / f".metrics.parquet.tmp{os.getpid()}"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, self.folder / "metrics.parquet")

    def write_predictions(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write_text(self.folder / "predictions.jsonl", text)


def read_metrics(folder: str | Path) -> pd.DataFrame:
    """The metrics of a run folder, with a clear error if the run is incomplete."""
    path = Path(folder) / "metrics.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no metrics.parquet: the run is incomplete or this is not a run folder"
        )
    return pd.read_parquet(path)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
