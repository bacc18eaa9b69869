"""Concept decodability per layer: leave-one-out k-NN (Han et al. 2024) and a cross-validated logistic probe.

Both measures take a stack of representations ``X`` of shape ``[n_layers, n, d]`` (or ``[n, d]`` for one
layer; numpy or torch, any float dtype) and ``n`` concept labels, and return per-layer accuracies, overall
and per concept (recall). Classes are listed in order of first appearance.

Scaling. Raw residual-stream distances are dominated by a few high-variance dimensions, so both
measures z-score every feature by default: for k-NN per layer over all ``n`` points (unsupervised, uses no
labels), for the probe per training fold (fitted on the training rows only, as ``StandardScaler`` in a
scikit-learn pipeline). ``standardize=False`` gives the raw-feature versions.

k-NN: one [n, n] distance matrix per layer in torch (squared euclidean from the Gram matrix, or 1 - cosine),
the k nearest other points found exactly, ties included, without a full sort (:func:`_nearest`).

Probe: every (layer, fold) problem is scikit-learn's ``LogisticRegression`` objective, solved for all layers
and folds at once by a batched L-BFGS in torch with scikit-learn's stopping rule, so accuracies agree with
scikit-learn to rounding (see benchmarks/bench_probes.py). The speed comes from batching: the folds of a
layer share one [folds * K, d] x [d, n] product, layers leave the batch as they converge, and there is no
per-fit overhead. Tried and dropped: PCA/whitening preconditioners, class-mean or ridge starts, warm starts
from the neighbouring layer (at most ~10% fewer iterations on real SmolLM2 activations).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "KnnResult",
    "ProbeResult",
    "decodability_peak",
    "knn_decodability",
    "knn_vote",
    "probe_accuracy",
    "stratified_fold_ids",
]

_METRICS = ("euclidean", "cosine")


@dataclass
class KnnResult:
    """Leave-one-out k-NN decodability per layer.

    ``overall[l]`` is the fraction of points classified correctly at layer ``l``; ``per_concept[c][l]`` the
    recall of concept ``c``; ``predictions[l, i]`` the predicted class index (into ``classes``) of point ``i``;
    ``neighbours[l, i]`` the indices of its k nearest other points, nearest first (labels play no part in
    them, so a permutation null recounts only the votes).
    """

    overall: np.ndarray
    per_concept: dict[str, np.ndarray]
    predictions: np.ndarray
    classes: list[str]
    k: int = 10
    metric: str = "euclidean"
    standardize: bool = True
    neighbours: np.ndarray | None = None
    y: np.ndarray | None = None  # the class index of each point (into ``classes``)

    def correct(self) -> np.ndarray:
        """``[n_layers, n]``: whether each point was classified correctly (leave-one-out)."""
        assert self.y is not None
        return self.predictions == self.y[None, :]


@dataclass
class ProbeResult:
    """Cross-validated logistic-probe accuracy per layer.

    ``overall[l]`` is the held-out accuracy at layer ``l`` (pooled over folds); ``per_concept[c][l]`` the
    held-out recall of concept ``c``; ``predictions[l, i]`` the class index predicted for point ``i`` by the
    probe of the fold that held it out; ``fold_ids[i]`` that fold. ``n_iter``, ``converged`` and
    ``grad_max`` ([n_layers, folds]) describe the optimiser: iterations used, whether the largest absolute
    gradient entry of the (sample-averaged) objective reached ``tol``, and its final value.
    """

    overall: np.ndarray
    per_concept: dict[str, np.ndarray]
    classes: list[str]
    predictions: np.ndarray
    fold_ids: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    grad_max: np.ndarray
    C: float = 1.0
    standardize: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    y: np.ndarray | None = None  # the class index of each point (into ``classes``)

    def correct(self) -> np.ndarray:
        """``[n_layers, n]``: whether each point was classified correctly by the probe that held it out."""
        assert self.y is not None
        return self.predictions == self.y[None, :]


# --------------------------------------------------------------------------------------------------------------
# Shared input handling


def _as_layers(X: Any) -> torch.Tensor:
    """Return ``X`` as a floating tensor of shape [n_layers, n, d] (a 2-D input is one layer)."""
    t = X.detach() if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise ValueError(f"X must have shape [n_layers, n, d] or [n, d]; got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"X has no points or no features: shape {tuple(t.shape)}")
    lo, hi = torch.aminmax(t.reshape(t.shape[0], -1), dim=1)  # NaN and inf show in the extremes
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    if bool(bad.any()):
        layers = torch.nonzero(bad).flatten().tolist()
        raise ValueError(
            f"X contains NaN or inf at layer {layers[0]} (layers with non-finite values: {layers})"
        )
    return t.cpu()


def _encode_labels(labels: Sequence[str], n: int) -> tuple[np.ndarray, list[str]]:
    """Map labels to indices; classes are kept in order of first appearance (numpy strings become str)."""
    labels = list(np.asarray(labels, dtype=object).ravel()) if not isinstance(labels, list) else labels
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} points: they must match X.shape[-2]")
    index: dict[Any, int] = {}
    y = np.fromiter((index.setdefault(lab, len(index)) for lab in labels), dtype=np.int64, count=n)
    if len(index) < 2:
        raise ValueError(f"decodability needs at least 2 classes; got {len(index)}: {list(index)}")
    return y, [str(c) if isinstance(c, str) else c for c in index]


def _zscore(Z: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Z-score each feature over the points axis (-2) in ``dtype``; (near-)constant features become 0."""
    Z = Z if dtype is None else Z.to(dtype)
    var, mean = torch.var_mean(Z, dim=-2, correction=0, keepdim=True)
    const = var.sqrt() <= 4 * torch.finfo(Z.dtype).eps * mean.abs()  # includes var == 0
    inv = torch.where(const, 0.0, var.clamp_min(torch.finfo(Z.dtype).tiny).rsqrt())
    return torch.addcmul(-mean * inv, Z, inv)


def _center(Z: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    Z = Z if dtype is None else Z.to(dtype)
    return Z - Z.mean(dim=-2, keepdim=True)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (None: leave the setting alone), restoring it afterwards."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_threads must be a positive integer or None; got {n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _recalls(pred: np.ndarray, y: np.ndarray, classes: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    correct = pred == y[None, :]
    overall = correct.mean(axis=1)
    per_concept = {c: correct[:, y == i].mean(axis=1) for i, c in enumerate(classes)}
    return overall, per_concept


def decodability_peak(overall: np.ndarray) -> int:
    """The layer of highest decodability (the first one on ties)."""
    a = np.asarray(overall, dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"overall must be a non-empty 1-D array of per-layer values; got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError("overall contains NaN")
    return int(np.argmax(a))


# --------------------------------------------------------------------------------------------------------------
# Leave-one-out k-NN


def knn_vote(nb: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Majority vote over neighbour labels ``nb`` [..., k] (ordered nearest first).

    Ties between classes go to the tied class whose nearest member among the k neighbours is closest.
    """
    counts = F.one_hot(nb, n_classes).sum(dim=-2)
    tied = counts == counts.max(dim=-1, keepdim=True).values
    first = tied.gather(-1, nb).to(torch.int32).argmax(dim=-1, keepdim=True)
    return nb.gather(-1, first).squeeze(-1)


def _knn_predict(
    Xt: torch.Tensor, y_t: torch.Tensor, n_classes: int, k: int, metric: str, standardize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out k-NN predictions [n_layers, n] and neighbours [n_layers, n, k], a few layers at a time."""
    n_layers, n, _ = Xt.shape
    dtype = torch.float64 if Xt.dtype == torch.float64 else torch.float32
    preds = torch.empty(n_layers, n, dtype=torch.int64)
    neighbours = torch.empty(n_layers, n, k, dtype=torch.int64)
    chunk = max(1, (1 << 24) // (n * n))  # bound the [chunk, n, n] distance block to ~64 MB in float32
    for start in range(0, n_layers, chunk):
        Z = Xt[start : start + chunk].to(dtype)
        if standardize:
            Z = _zscore(Z)
        if metric == "cosine":
            Z = Z / Z.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
            D = -(Z @ Z.mT)  # ranks like 1 - cos
        else:
            if not standardize:  # translation-invariant; centring keeps the Gram-matrix form accurate
                Z = _center(Z)
            sq = (Z * Z).sum(dim=-1)
            D = (sq[:, :, None] + sq[:, None, :]).sub_(Z @ Z.mT, alpha=2.0).clamp_min_(0.0)
        D.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
        nb = _nearest(D, k)
        neighbours[start : start + chunk] = nb
        preds[start : start + chunk] = knn_vote(y_t[nb], n_classes)
    return preds, neighbours


def _nearest(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k smallest entries of each row of ``dist``, ordered by (value, index).

    Exact on ties without a full sort: every entry below the k-th smallest value is in, and entries equal to it
    are taken in index order until there are k.
    """
    kth = torch.topk(dist, k, dim=-1, largest=False, sorted=False).values.amax(dim=-1, keepdim=True)
    less = dist < kth
    eq = dist == kth
    need = k - less.sum(dim=-1, keepdim=True, dtype=torch.int32)
    chosen = less | (eq & (eq.cumsum(dim=-1, dtype=torch.int32) <= need))
    idx = chosen.nonzero()[:, -1].view(*dist.shape[:-1], k)  # ascending index within each row
    order = torch.sort(dist.gather(-1, idx), dim=-1, stable=True).indices
    return idx.gather(-1, order)


def knn_decodability(
    X: Any,
    labels: Sequence[str],
    k: int = 10,
    metric: str = "euclidean",
    standardize: bool = True,
    *,
    num_threads: int | None = 1,
) -> KnnResult:
    """Leave-one-out k-NN concept decodability per layer (Han et al. 2024).

    Each point is classified by a majority vote of its ``k`` nearest *other* points. Neighbours are ordered by
    (distance, index), so equal distances go to the lower index; a tie between classes goes to the tied class
    whose nearest member is closest. ``standardize`` z-scores each feature per layer over all points first
    (constant features become 0). ``metric`` is ``"euclidean"`` or ``"cosine"`` (1 - cosine similarity; a
    zero vector is at distance 1 from everything). Computed in float64 if ``X`` is float64, else float32.
    """
    Xt = _as_layers(X)
    n_layers, n, _ = Xt.shape
    y, classes = _encode_labels(labels, n)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if k >= n:
        raise ValueError(f"k={k} needs at least k+1 points; got n={n}")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}; got {metric!r}")
    with _torch_threads(num_threads):
        preds, neighbours = _knn_predict(Xt, torch.from_numpy(y), len(classes), k, metric, standardize)
    pred = preds.numpy()
    overall, per_concept = _recalls(pred, y, classes)
    return KnnResult(overall, per_concept, pred, classes, int(k), metric, standardize, neighbours.numpy(), y)


# --------------------------------------------------------------------------------------------------------------
# Cross-validated logistic probe


def stratified_fold_ids(labels: Sequence[str], folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index (0..folds-1) of each point: the assignment of scikit-learn's ``StratifiedKFold(folds,
    shuffle=True, random_state=seed)`` (tested equal), computed here so a run need not import scikit-learn.

    Classes are numbered by first appearance; the sorted labels are dealt round-robin to the folds to fix how
    many points of each class each fold gets; then, class by class, that list of fold slots is shuffled by one
    ``RandomState(seed)`` and given to the class's points in order.
    """
    y, classes = _encode_labels(labels, len(labels))
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2; got {folds!r}")
    counts = np.bincount(y)
    if counts.min() < folds:
        small = classes[int(np.argmin(counts))]
        raise ValueError(f"class {small!r} has only {counts.min()} points; need at least folds={folds}")
    codes, first = np.unique(y, return_index=True)
    rank = np.empty(int(codes.max()) + 1, dtype=np.int64)
    rank[codes[np.argsort(first)]] = np.arange(len(codes))
    by_appearance = rank[y]
    dealt = np.sort(by_appearance)
    per_fold = np.stack([np.bincount(dealt[f::folds], minlength=len(codes)) for f in range(folds)])
    rng = np.random.RandomState(seed)
    fold_ids = np.empty(len(y), dtype=np.int64)
    for k in range(len(codes)):
        slots = np.repeat(np.arange(folds), per_fold[:, k])
        rng.shuffle(slots)
        fold_ids[by_appearance == k] = slots
    return fold_ids


class _ProbeBatch:
    """All (layer, fold) multinomial logistic problems of a stack, evaluated together.

    Per layer the features ``Z`` are centred (and, with ``standardize``, z-scored) over all points once: a
    change of variables only, since each fold's own scaler is folded into its weights. Problem (l, f) is thus
    exactly scikit-learn's ``StandardScaler`` + ``LogisticRegression`` on fold f's training rows, with
    objective ``mean log-loss + ||W||^2 / (2 C n_f)`` (intercept unpenalised). Parameters of a problem are
    stored class-major as [K, d + 1] (weights, then intercept); the logits of all folds of a layer come from
    one [folds * K, d] x [d, n] product, laid out [folds, K, n] so that softmax runs along contiguous rows.
    """

    def __init__(
        self, X: torch.Tensor, y: np.ndarray, fold_ids: np.ndarray, C: float, standardize: bool
    ) -> None:
        n_layers, n, d = X.shape
        folds = int(fold_ids.max()) + 1
        K = int(y.max()) + 1
        self.d, self.K, self.folds, self.n = d, K, folds, n
        self.Z = _zscore(X, dtype=torch.float32) if standardize else _center(X, dtype=torch.float32)
        train = torch.from_numpy(fold_ids[None, :] != np.arange(folds)[:, None])  # [folds, n]
        n_f = train.sum(dim=1).to(torch.float64)
        Mn64 = train.to(torch.float64) / n_f[:, None]
        self.Mn = Mn64.to(torch.float32)  # training-row weights 1 / n_f, [folds, n]
        self.Mn64 = Mn64
        # K = 2: doubling the penalty of the symmetric 2-class softmax gives scikit-learn's binary model.
        self.lam = ((2.0 if K == 2 else 1.0) / (C * n_f)).to(torch.float32).view(1, folds, 1, 1)
        # Per-fold training mean / std of Z in float64, a few layers at a time.
        self.mu = torch.empty(n_layers, folds, d)
        self.sd = torch.ones(n_layers, folds, d)
        step = max(1, (1 << 21) // (n * d))
        for start in range(0, n_layers, step):
            z = self.Z[start : start + step].to(torch.float64)
            m1 = Mn64 @ z
            self.mu[start : start + step] = m1
            if standardize:
                m2 = Mn64 @ z.square_()
                var = (m2 - m1.square()).clamp_min_(0.0)
                const = var <= 1e-10 * m2  # StandardScaler leaves (near-)constant features unscaled
                self.sd[start : start + step] = torch.where(const, 1.0, var.sqrt())
        self.y = torch.from_numpy(y)
        self.onehot = F.one_hot(self.y, K).T.to(torch.float32).contiguous()  # [K, n]
        self.fold_ids = torch.from_numpy(fold_ids)

    def select(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the data of layers a..b-1."""
        return self.Z[a:b], self.mu[a:b], self.sd[a:b]

    def logits(
        self, theta: torch.Tensor, Z: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor
    ) -> torch.Tensor:
        """Logits [La, folds, K, n] of every point under every fold's probe; ``theta`` is [La, folds, D]."""
        La, n, d = Z.shape
        K, folds = self.K, self.folds
        theta = theta.view(La, folds, K, d + 1)
        Vt = theta[..., :d] / sd.unsqueeze(2)  # weights on the globally scaled features
        c = theta[..., d : d + 1] - Vt @ mu.unsqueeze(-1)  # [La, folds, K, 1]
        out = torch.baddbmm(c.view(La, folds * K, 1), Vt.view(La, folds * K, d), Z.mT)
        return out.view(La, folds, K, n)

    def loss_grad(
        self, theta: torch.Tensor, Z: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective [La, folds] (float64) and its gradient [La, folds, D]."""
        La, n, d = Z.shape
        K, folds = self.K, self.folds
        Wt = theta.view(La, folds, K, d + 1)[..., :d]
        logp = torch.log_softmax(self.logits(theta, Z, mu, sd), dim=2)
        nll = -logp.gather(2, self.y.view(1, 1, 1, n).expand(La, folds, 1, n)).squeeze(2)
        loss = (nll.to(torch.float64) * self.Mn64).sum(dim=-1)
        sq = torch.linalg.vecdot(theta, theta) - torch.linalg.vecdot(
            b := theta.view(La, folds, K, d + 1)[..., d], b
        )
        loss += (0.5 * self.lam.view(1, folds) * sq).to(torch.float64)
        R = logp.exp_().sub_(self.onehot).mul_(self.Mn.view(1, folds, 1, n))  # d loss / d logits
        Rsum = R.sum(dim=-1, keepdim=True)  # [La, folds, K, 1]
        gWt = (R.view(La, folds * K, n) @ Z).view(La, folds, K, d)
        gWt.addcmul_(Rsum, mu.unsqueeze(2), value=-1.0).div_(sd.unsqueeze(2)).addcmul_(self.lam, Wt)
        return loss, torch.cat([gWt, Rsum], dim=-1).view(La, folds, K * (d + 1))


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as half-open runs of consecutive values: [0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]."""
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)


def _lbfgs(
    fun: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    theta: torch.Tensor,
    tol: float,
    max_iter: int,
    history: int,
    max_ls: int = 25,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Batched L-BFGS over problems ``theta`` [L, folds, D] with per-problem Armijo backtracking.

    ``fun(theta_active, active_layers)`` returns (loss [La, folds] float64, grad [La, folds, D]). A problem
    stops once the largest absolute entry of its gradient is <= ``tol`` (scikit-learn's ``gtol``); a layer
    leaves the batch once all its folds stopped. The first step of a problem is -g / ||g|| (as SciPy's
    L-BFGS-B); later steps try 1 first. Returns the solution, iterations, converged flags and max |grad|.
    """
    L, folds = theta.shape[:2]
    out = theta.clone()
    n_iter = torch.zeros(L, folds, dtype=torch.int64)
    gmax_out = torch.zeros(L, folds, dtype=torch.float64)
    conv_out = torch.zeros(L, folds, dtype=torch.bool)
    act = torch.arange(L)
    f, g = fun(theta, act)
    S: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    RHO: list[torch.Tensor] = []
    gamma = torch.zeros(L, folds)  # 0 until a problem has a curvature pair
    iters = torch.zeros(L, folds, dtype=torch.int64)
    stalled = torch.zeros(L, folds, dtype=torch.bool)

    def gmax(grad: torch.Tensor) -> torch.Tensor:
        return grad.abs().amax(dim=-1).to(torch.float64)

    done = gmax(g) <= tol
    for it in range(max_iter + 1):
        finished = (done | stalled).all(dim=1)
        if it == max_iter:
            finished = torch.ones_like(finished)
        if bool(finished.any()):
            gl = act[finished]
            out[gl], n_iter[gl], gmax_out[gl], conv_out[gl] = (
                theta[finished],
                iters[finished],
                gmax(g[finished]),
                done[finished],
            )
            keep = ~finished
            act, theta, f, g, done, stalled, iters, gamma = (
                t[keep] for t in (act, theta, f, g, done, stalled, iters, gamma)
            )
            S, Y, RHO = [s[keep] for s in S], [y[keep] for y in Y], [r[keep] for r in RHO]
            if act.numel() == 0:
                break
        live = ~(done | stalled)
        # Two-loop recursion: direction = -H g with H0 = gamma * I; a pair with rho = 0 is inert.
        q = g.clone()
        alphas = []
        for s, yv, rho in zip(reversed(S), reversed(Y), reversed(RHO), strict=True):
            a = rho * _dot(s, q)
            alphas.append(a)
            q.sub_(a.unsqueeze(-1) * yv)
        has_hist = gamma > 0
        q.mul_(torch.where(has_hist, gamma, 1.0).unsqueeze(-1))
        for s, yv, rho, a in zip(S, Y, RHO, reversed(alphas), strict=True):
            q.add_((a - rho * _dot(yv, q)).unsqueeze(-1) * s)
        direction = q.neg_()
        gd = _dot(g, direction)
        uphill = gd >= 0
        if bool(uphill.any()):  # cannot happen in exact arithmetic; fall back to steepest descent
            direction[uphill] = -g[uphill]
            gd = torch.where(uphill, -_dot(g, g), gd)
            has_hist = has_hist & ~uphill
        dnorm = _dot(direction, direction).sqrt().clamp_min(1e-30)
        step = torch.where(has_hist, torch.ones_like(dnorm), 1.0 / dnorm) * live
        gd64 = gd.to(torch.float64)
        ok = torch.zeros_like(live)
        for ls in range(max_ls):
            theta_new = torch.addcmul(theta, step.unsqueeze(-1), direction)
            if ls == 0:
                f_new, g_new = fun(theta_new, act)
            else:  # backtrack only the layers with a fold that failed: the others keep their evaluation
                redo = (~ok).any(dim=1)
                f_new, g_new = f_new.clone(), g_new.clone()
                f_new[redo], g_new[redo] = fun(theta_new[redo], act[redo])
            slack = 1e-6 * f.abs() + 1e-12  # float32 logits: ignore changes below rounding
            ok = (f_new <= f + 1e-4 * step.to(torch.float64) * gd64 + slack) | ~live
            if bool(ok.all()):
                break
            step = torch.where(ok, step, 0.5 * step)
        accept = ok & live
        stalled |= live & ~ok
        s_new, y_new = theta_new - theta, g_new - g
        sy, yy = _dot(s_new, y_new), _dot(y_new, y_new)
        good = accept & (sy > 1e-10 * yy) & (yy > 0)
        if not bool(good.all()):
            s_new, y_new = s_new * good.unsqueeze(-1), y_new * good.unsqueeze(-1)
        S.append(s_new)
        Y.append(y_new)
        RHO.append(torch.where(good, 1.0 / sy.clamp_min(1e-30), 0.0))
        if len(S) > history:
            S.pop(0), Y.pop(0), RHO.pop(0)
        gamma = torch.where(good, sy / yy.clamp_min(1e-30), gamma)
        if bool(accept.all()):
            theta, g, f = theta_new, g_new, f_new
        else:
            a2 = accept.unsqueeze(-1)
            theta, g, f = (
                torch.where(a2, theta_new, theta),
                torch.where(a2, g_new, g),
                torch.where(accept, f_new, f),
            )
        iters += accept
        done |= accept & (gmax(g) <= tol)
    return out, n_iter.numpy(), conv_out.numpy(), gmax_out.numpy()


def _solve_probes(
    Xt: torch.Tensor,
    y: np.ndarray,
    fold_ids: np.ndarray,
    C: float,
    standardize: bool,
    tol: float,
    max_iter: int,
    history: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit every (layer, fold) probe; return held-out predictions [L, n], n_iter, converged, grad_max."""
    n_layers, n, _ = Xt.shape
    folds = int(fold_ids.max()) + 1
    batch = _ProbeBatch(Xt, y, fold_ids, C, standardize)
    K, d = batch.K, batch.d

    def fun(theta: torch.Tensor, layers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Evaluate contiguous runs of active layers on views of Z: no copy of the data as layers finish.
        out, pos = [], 0
        for a, b in _runs(layers.tolist()):
            out.append(batch.loss_grad(theta[pos : pos + b - a], *batch.select(a, b)))
            pos += b - a
        if len(out) == 1:
            return out[0]
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    theta0 = torch.zeros(n_layers, folds, K * (d + 1))
    theta, n_iter, converged, grad_max = _lbfgs(fun, theta0, tol, max_iter, history)
    pred = np.empty((n_layers, n), dtype=np.int64)
    chunk = max(1, (1 << 22) // (n * folds * K))
    for start in range(0, n_layers, chunk):
        stop = min(start + chunk, n_layers)
        logits = batch.logits(theta[start:stop], *batch.select(start, stop))
        own = logits.permute(0, 3, 1, 2)[:, torch.arange(n), batch.fold_ids]  # [La, n, K]
        pred[start:stop] = own.argmax(dim=-1).numpy()  # each point under the probe that held it out
    return pred, n_iter, converged, grad_max


def probe_accuracy(
    X: Any,
    labels: Sequence[str],
    folds: int = 5,
    seed: int = 0,
    C: float = 1.0,
    standardize: bool = True,
    *,
    tol: float = 1e-4,
    max_iter: int = 1000,
    history: int = 10,
    fold_ids: np.ndarray | None = None,
    num_threads: int | None = 1,
) -> ProbeResult:
    """Cross-validated multinomial logistic-probe accuracy per layer.

    Problem (layer l, fold f) is scikit-learn's ``make_pipeline(StandardScaler(), LogisticRegression(C=C))``
    (without the scaler if ``standardize`` is False) fitted on fold f's training rows, with folds from
    :func:`stratified_fold_ids` (``folds``, ``seed``) unless ``fold_ids`` gives them. Each minimises
    ``mean log-loss + ||W||^2 / (2 C n_f)`` (intercept unpenalised; for two classes the symmetric
    multinomial model with the penalty doubled, which is exactly scikit-learn's binary model). All layers and
    folds are solved together by one batched L-BFGS in torch (float32; history ``history``, Armijo
    backtracking), each problem stopping when the largest absolute entry of its gradient is <= ``tol`` (the
    ``gtol`` scikit-learn gives SciPy). Problems not converged within ``max_iter`` are flagged in
    ``converged`` and warned about. ``num_threads`` sets torch's intra-op threads for the call (None: leave
    them): the solver runs many small element-wise steps, which extra threads slow down several-fold when
    the cores are shared; raise it on an idle many-core machine.
    """
    Xt = _as_layers(X)
    n_layers, n, _ = Xt.shape
    y, classes = _encode_labels(labels, n)
    if not (np.isfinite(C) and C > 0):
        raise ValueError(f"C must be a positive finite number; got {C!r}")
    if not (tol > 0 and max_iter >= 1 and history >= 1):
        raise ValueError("tol must be > 0, max_iter >= 1 and history >= 1")
    if fold_ids is None:
        fold_ids = stratified_fold_ids(labels, folds, seed)
    else:
        fold_ids = np.asarray(fold_ids, dtype=np.int64)
        if fold_ids.shape != (n,) or fold_ids.min() < 0:
            raise ValueError(f"fold_ids must be {n} non-negative fold indices")
        folds = int(fold_ids.max()) + 1
        if folds < 2 or len(np.unique(fold_ids)) != folds:
            raise ValueError("fold_ids must use every fold index 0..folds-1, with at least 2 folds")
    with _torch_threads(num_threads):
        pred, n_iter, converged, grad_max = _solve_probes(
            Xt, y, fold_ids, C, standardize, tol, max_iter, history
        )
    if not converged.all():
        bad = np.argwhere(~converged)
        warnings.warn(
            f"probe_accuracy: {len(bad)} of {converged.size} (layer, fold) problems did not reach tol={tol} "
            f"(first: layer {bad[0][0]}, fold {bad[0][1]}; max |grad| {grad_max.max():.2e}); raise max_iter, "
            "or standardize",
            RuntimeWarning,
            stacklevel=2,
        )
    overall, per_concept = _recalls(pred, y, classes)
    info = {"solver": "batched L-BFGS, torch float32", "tol": tol, "max_iter": max_iter, "history": history}
    return ProbeResult(
        overall,
        per_concept,
        classes,
        pred,
        fold_ids,
        n_iter,
        converged,
        grad_max,
        float(C),
        standardize,
        info,
        y,
    )
