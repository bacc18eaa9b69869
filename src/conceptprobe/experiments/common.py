"""What the experiments share: the folder name of a model, torch threads, the metrics-frame layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conceptprobe.store import METRIC_COLUMNS


def model_slug(ref: str, alias: str | None = None) -> str:
    """A folder name for a model: its packaged alias, a GGUF file's stem, a folder's name, or the hub id."""
    if alias:
        return alias
    path = Path(ref)
    if ref.endswith(".gguf"):
        return path.stem
    if path.exists():
        return path.resolve().name
    return ref.replace("/", "--")


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads when given (on a busy shared CPU one thread can be many times faster than
    two); returns the number in use."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def model_columns(info: Any, seed: int) -> dict[str, Any]:
    """The metrics columns that name the model of a result."""
    return {
        "model": info.alias or info.ref,
        "family": info.family,
        "n_params": info.n_params,
        "seed": seed,
        "concept": None,
        "shots": None,
        "position": None,
    }


def metrics_frame(rows: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> Any:
    """Rows in the long metrics layout (:data:`conceptprobe.store.METRIC_COLUMNS`, then ``extra``)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    front = [*METRIC_COLUMNS, *extra]
    for col in front:
        if col not in frame.columns:
            frame[col] = None
    return frame[front + [c for c in frame.columns if c not in front]]
