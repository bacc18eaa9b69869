"""UMAP of the residual stream at one layer, coloured by concept (the paper's Fig. 3).

Features are z-scored per dimension over all points of the panel first (raw residual-stream distances
are dominated by a few high-variance dimensions), then embedded with umap-learn
(``n_neighbors=15``, ``min_dist=0.1``, euclidean, ``random_state`` fixed, which makes it single-threaded
and reproducible). Embeddings are cached on disk, keyed by the shard files and the parameters, so a
report re-rendered from the same runs does not recompute them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from conceptprobe.measures.embedding import MIN_DIST, N_NEIGHBORS, umap_2d
from conceptprobe.report.collect import RunInfo
from conceptprobe.store import atomic_write_bytes


def cache_dir() -> Path:
    """``$CONCEPTPROBE_CACHE/umap`` (default ``~/.cache/conceptprobe/umap``)."""
    root = os.environ.get("CONCEPTPROBE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "conceptprobe"
    )
    return Path(root) / "umap"


def load_layer(run: RunInfo, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Vectors ``[n, d]`` at ``layer`` (the run's report position) and concept labels; None if absent."""
    from safetensors import safe_open

    xs, labels = [], []
    for concept in run.concepts:
        path = run.shard(concept)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            layers, positions = json.loads(meta["layers"]), json.loads(meta["positions"])
            if layer not in layers or run.position not in positions:
                return None
            li, pi = layers.index(layer), positions.index(run.position)
            x = fh.get_slice("activations")[:, li : li + 1, pi : pi + 1, :]
        x = np.asarray(x, dtype=np.float32).reshape(x.shape[0], -1)
        xs.append(x)
        labels += [concept] * x.shape[0]
    return np.concatenate(xs), np.array(labels)


def _key(run: RunInfo, layer: int, seed: int) -> str:
    stamp = []
    for concept in run.concepts:
        st = run.shard(concept).stat()
        stamp.append([concept, st.st_size, st.st_mtime_ns])
    blob = json.dumps([str(run.folder.resolve()), run.position, layer, seed, N_NEIGHBORS, MIN_DIST, stamp])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def run_embedding(
    run: RunInfo, layer: int, seed: int = 0, cache: Path | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The 2-D UMAP of ``run`` at ``layer`` and its labels (None when activations are absent); cached."""
    if not run.has_activations():
        return None
    path = None
    if cache is not None:
        path = cache / f"{_key(run, layer, seed)}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    return z["embedding"], z["labels"]
            except (OSError, ValueError, KeyError):
                path.unlink(missing_ok=True)
    got = load_layer(run, layer)
    if got is None:
        return None
    x, labels = got
    emb = umap_2d(x, seed=seed)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.savez(buf, embedding=emb, labels=labels)
            atomic_write_bytes(path, buf.getvalue())
        except OSError:
            pass  # a cache that cannot be written only costs time
    return emb, labels
