"""2-D UMAP embeddings of representations (n_neighbors 15, min_dist 0.1 by default, as the paper's figures)."""

from __future__ import annotations

import warnings

import numpy as np

N_NEIGHBORS = 15
MIN_DIST = 0.1


def standardize(x: np.ndarray) -> np.ndarray:
    """Z-score every feature over the rows (constant features become 0)."""
    mu = x.mean(axis=0, keepdims=True)
    sd = x.std(axis=0, keepdims=True)
    return (x - mu) / np.where(sd > 1e-12, sd, 1.0)


def umap_2d(
    x: np.ndarray, seed: int = 0, n_neighbors: int = N_NEIGHBORS, min_dist: float = MIN_DIST
) -> np.ndarray:
    """A 2-D UMAP of the standardised rows of ``x`` (n_neighbors capped at n - 1 for tiny inputs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import umap

        reducer = umap.UMAP(
            n_neighbors=min(n_neighbors, x.shape[0] - 1),
            min_dist=min_dist,
            n_components=2,
            metric="euclidean",
            random_state=seed,
        )
        return np.asarray(reducer.fit_transform(standardize(x)), dtype=np.float32)
