"""Per-token loss vectors across models or checkpoints, and their PCA (Olsson et al. 2022).

``icl-score`` writes ``token_losses.safetensors`` into its result folder: tensors ``losses``
``[n_contexts, n_tokens]`` (float32 nats; column ``t - 1`` holds 1-based token ``t``; NaN where undefined)
and ``input_ids`` ``[n_contexts, n_prefix + n_tokens]``, with metadata ``n_prefix`` and ``doc_ids`` (JSON
list naming the document and window of each context).

To compare folders, contexts are matched by ``doc_id`` (those present in every folder, in the first
folder's order), token columns are truncated to the shortest ``n_tokens`` and kept where every folder
has a finite loss in every matched context; optionally a seeded random subset of ``positions``
(context, token) pairs is used as the fixed token set. Each folder becomes one vector; PCA (scikit-learn,
centred, not scaled) gives the coordinates. The positions must hold the same tokens in every folder
(checkpoints of one model, as Olsson et al. used it, or models sharing a tokenizer): across tokenizers the
same index is different text, so the PCA would separate tokenizers by construction, and it is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOSS_FILE = "token_losses.safetensors"
ICL_FILE = "icl.json"


@dataclass
class TokenLosses:
    """One result folder's per-token losses."""

    folder: Path
    label: str
    losses: np.ndarray
    input_ids: np.ndarray
    n_prefix: int
    doc_ids: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def write_token_losses(
    folder: str | Path, losses: torch.Tensor, input_ids: torch.Tensor, n_prefix: int, doc_ids: Sequence[str]
) -> Path:
    """Write ``token_losses.safetensors`` atomically."""
    from safetensors.torch import save

    from conceptprobe.store import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOSS_FILE
    meta = {"n_prefix": str(n_prefix), "doc_ids": json.dumps(list(doc_ids))}
    tensors = {"losses": losses.float().contiguous(), "input_ids": input_ids.long().contiguous()}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def read_token_losses(folder: str | Path) -> TokenLosses:
    """Read a folder written by ``icl-score`` (label: the model alias or ref in icl.json, else the name)."""
    from safetensors import safe_open

    folder = Path(folder)
    path = folder / LOSS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {LOSS_FILE}; run `conceptprobe icl-score --out {folder}` first"
        )
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        losses = fh.get_tensor("losses").float().numpy()
        ids = fh.get_tensor("input_ids").numpy()
    info: dict[str, Any] = {}
    if (folder / ICL_FILE).is_file():
        info = json.loads((folder / ICL_FILE).read_text())
    model = info.get("model") or {}
    label = model.get("alias") or model.get("ref") or folder.name
    return TokenLosses(
        folder=folder,
        label=str(label),
        losses=losses,
        input_ids=ids,
        n_prefix=int(meta.get("n_prefix", 0)),
        doc_ids=json.loads(meta.get("doc_ids", "[]")) or [f"#{i}" for i in range(len(losses))],
        info=info,
    )


def align(
    runs: Sequence[TokenLosses], positions: int = 0, seed: int = 0
) -> tuple[np.ndarray, dict[str, Any]]:
    """Stack the runs' losses on a common set of (context, token) positions -> ``[n_runs, n_positions]``."""
    if len(runs) < 2:
        raise ValueError("need at least two result folders to compare")
    common = set(runs[0].doc_ids)
    for run in runs[1:]:
        common &= set(run.doc_ids)
    docs = [d for d in runs[0].doc_ids if d in common]
    if not docs:
        raise ValueError(
            "the folders share no contexts (doc_ids); run icl-score with the same corpus and seed"
        )
    n_tok = min(run.losses.shape[1] for run in runs)
    blocks, token_blocks = [], []
    for run in runs:
        index = {d: i for i, d in enumerate(run.doc_ids)}
        rows = [index[d] for d in docs]
        blocks.append(run.losses[rows, :n_tok])
        token_blocks.append(run.input_ids[rows, run.n_prefix : run.n_prefix + n_tok])
    cube = np.stack(blocks)  # [runs, contexts, tokens]
    keep_cols = np.isfinite(cube).all(axis=(0, 1))
    cols = np.flatnonzero(keep_cols)
    pairs = np.array([(c, t) for c in range(len(docs)) for t in cols], dtype=np.int64)
    total = len(pairs)
    subset = bool(positions) and positions < total
    if subset:
        rng = np.random.default_rng(seed)
        pairs = pairs[np.sort(rng.choice(len(pairs), size=positions, replace=False))]
    same = all(tb.shape == token_blocks[0].shape and (tb == token_blocks[0]).all() for tb in token_blocks[1:])
    if not same:
        differ = next(
            run.label
            for run, tb in zip(runs, token_blocks, strict=True)
            if not np.array_equal(tb, token_blocks[0])
        )
        raise ValueError(
            f"{runs[0].label} and {differ} scored different tokens (different tokenizers or corpora), so "
            "their losses at one index are different text; compare checkpoints of one model, or models "
            "sharing a tokenizer, run with the same corpus and seed"
        )
    matrix = cube[:, pairs[:, 0], pairs[:, 1]]
    meta = {
        "n_contexts": len(docs),
        "n_tokens": int(n_tok),
        "token_columns": [int(cols[0]) + 1, int(cols[-1]) + 1] if len(cols) else [],
        "n_positions": int(len(pairs)),
        "n_positions_available": int(total),
        "positions_subset": bool(subset),
        "same_tokens": bool(same),
    }
    return matrix, meta


def token_loss_pca(
    runs: Sequence[TokenLosses], n_components: int = 2, positions: int = 0, seed: int = 0
) -> dict[str, Any]:
    """PCA of the runs' per-token loss vectors: coordinates, explained variance, alignment details."""
    from sklearn.decomposition import PCA

    matrix, meta = align(runs, positions, seed)
    k = max(1, min(n_components, len(runs) - 1, matrix.shape[1]))
    pca = PCA(n_components=k, random_state=seed)
    coords = pca.fit_transform(matrix.astype(np.float64))
    return {
        "labels": [r.label for r in runs],
        "folders": [str(r.folder) for r in runs],
        "coords": coords.tolist(),
        "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
        "mean_loss": matrix.mean(axis=1).tolist(),
        **meta,
    }


def plot_token_loss_pca(result: dict[str, Any], path: str | Path, trajectory: bool = False) -> None:
    """Points per folder (models), or a line through them in the given order (checkpoints)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coords = np.asarray(result["coords"], dtype=float)
    if coords.shape[1] == 1:
        coords = np.hstack([coords, np.zeros((len(coords), 1))])
    evr = list(result["explained_variance_ratio"]) + [0.0]
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    if trajectory:
        ax.plot(coords[:, 0], coords[:, 1], "-", color="grey", lw=1, zorder=1)
        sc = ax.scatter(coords[:, 0], coords[:, 1], c=np.arange(len(coords)), cmap="viridis", zorder=2)
        fig.colorbar(sc, ax=ax, label="order given")
    else:
        ax.scatter(coords[:, 0], coords[:, 1], zorder=2)
    span = np.ptp(coords, axis=0)
    scaled = coords / np.where(span > 0, span, 1.0)
    for i, ((x, y), label) in enumerate(zip(coords, result["labels"], strict=True)):
        dist = np.linalg.norm(scaled - scaled[i], axis=1)
        dist[i] = np.inf
        j = int(np.argmin(dist)) if len(coords) > 1 else i
        below = j != i and dist[j] < 0.1 and (y, i) < (coords[j, 1], j)  # the lower of two close points
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -11 if below else 4), fontsize=8)
    ax.margins(0.18)
    ax.set_xlabel(f"PC1 ({100 * evr[0]:.1f}% of variance)")
    ax.set_ylabel(
        f"PC2 ({100 * evr[1]:.1f}%)" if len(result["explained_variance_ratio"]) > 1 else "(single component)"
    )
    same = "same tokens" if result["same_tokens"] else "same documents, different tokenizations"
    ax.set_title(
        f"per-token loss PCA: {result['n_positions']} positions,\n{result['n_contexts']} contexts ({same})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pca_metrics(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The long-form metrics rows of a :func:`token_loss_pca` result: each model's coordinates (``pc1``,
    ``pc2``, ...) and mean loss, with ``n`` the (context, token) positions they rest on."""
    rows = []
    n = int(result["n_positions"])
    for label, xy, loss in zip(result["labels"], result["coords"], result["mean_loss"], strict=True):
        values = {f"pc{i + 1}": float(v) for i, v in enumerate(xy)} | {"mean_loss": float(loss)}
        for metric, value in values.items():
            rows.append({"model": label, "metric": metric, "value": value, "n": n})
    return rows
