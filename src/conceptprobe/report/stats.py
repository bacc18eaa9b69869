"""Numbers behind the report, all recomputed from ``metrics.parquet``: curves, peaks, CD-vs-accuracy fits.

* The decodability curve of a (task, model, shots) is the overall k-NN decodability (``cd_knn``, concept
  ``all``) per layer, averaged over seeds when a run was repeated; its peak is the first layer of highest
  value (as :func:`conceptprobe.measures.decodability.decodability_peak`).
* A concept point is (decodability of that concept at the peak layer, ICL accuracy of that concept).
* R² is that of an ordinary least-squares line through the concept points (= Pearson r²); its 95%
  interval is a percentile bootstrap over concepts (a concept keeps all its points when shots are pooled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

NULL_CONCEPT = "null"
KEYS = ["task", "model", "shots"]


@dataclass(frozen=True)
class Fit:
    """A linear fit of accuracy on decodability across concepts, with a bootstrap interval for R²."""

    r2: float
    lo: float
    hi: float
    slope: float
    intercept: float
    n: int
    n_boot_valid: int
    why: str = ""  # why there is no R² (empty when there is one)

    def label(self, digits: int = 2) -> str:
        """``R² 0.78 [0.41, 0.97]``, or why there is none."""
        if np.isnan(self.r2):
            return f"R² n/a ({self.why})"
        ci = f" [{self.lo:.{digits}f}, {self.hi:.{digits}f}]" if not np.isnan(self.lo) else ""
        return f"R² {self.r2:.{digits}f}{ci}"


def r_squared(x: np.ndarray, y: np.ndarray) -> float:
    """R² of the least-squares line of ``y`` on ``x`` (NaN with fewer than 3 points or a constant axis)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3:
        return float("nan")
    return float(_r2_rows(x[None], y[None])[0])


def _r2_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise R² of ``y`` on ``x`` ([B, n] each); NaN where a row is constant in x or y."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    sxx, syy, sxy = (xc * xc).sum(1), (yc * yc).sum(1), (xc * yc).sum(1)
    scale = np.maximum(np.abs(x).max(1), 1e-300) ** 2 * x.shape[1]
    scale_y = np.maximum(np.abs(y).max(1), 1e-300) ** 2 * y.shape[1]
    ok = (sxx > 1e-12 * scale) & (syy > 1e-12 * scale_y)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ok, sxy**2 / (sxx * syy), np.nan)
    return np.clip(r2, 0.0, 1.0)


def bootstrap_r2(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, int]:
    """Percentile bootstrap interval of R², resampling groups (default: each point) with replacement.

    Resamples that are constant in x or y have no R² and are dropped; with fewer than half valid, the
    interval is NaN. Returns ``(lo, hi, n_valid)``.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if groups is None:
        groups = np.arange(x.size)
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    if uniq.size < 3:
        return float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, uniq.size, size=(n_boot, uniq.size))
    members = [np.flatnonzero(inverse == g) for g in range(uniq.size)]
    sizes = {m.size for m in members}
    if len(sizes) == 1:  # equal-size groups: one vectorised gather
        table = np.stack(members)  # [G, size]
        idx = table[picks].reshape(n_boot, -1)
        r2 = _r2_rows(x[idx], y[idx])
    else:
        r2 = np.array(
            [
                r_squared(
                    x[np.concatenate([members[g] for g in row])], y[np.concatenate([members[g] for g in row])]
                )
                for row in picks
            ]
        )
    valid = r2[~np.isnan(r2)]
    if valid.size < n_boot / 2:
        return float("nan"), float("nan"), int(valid.size)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(valid, [alpha, 1 - alpha])
    return float(lo), float(hi), int(valid.size)


def fit(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, n_boot: int = 2000, seed: int = 0
) -> Fit:
    """R², bootstrap interval and the least-squares line of ``y`` on ``x``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    r2 = r_squared(x, y)
    if np.isnan(r2):
        why = (
            "< 3 concepts"
            if x.size < 3
            else "decodability equal for all"
            if np.ptp(x) == 0
            else "accuracy equal for all"
        )
        if x.size >= 3 and np.ptp(x) == 0 and np.ptp(y) == 0:
            why = "all points equal"
        return Fit(r2, float("nan"), float("nan"), float("nan"), float("nan"), int(x.size), 0, why)
    slope, intercept = np.polyfit(x, y, 1)
    lo, hi, valid = bootstrap_r2(x, y, groups, n_boot=n_boot, seed=seed)
    return Fit(r2, lo, hi, float(slope), float(intercept), int(x.size), valid)


# ------------------------------------------------------------------------------------------------------------
# From the long-form metrics frame (see collect.py: one position per run, model/task are labels)


def decodability_curves(metrics: pd.DataFrame, metric: str = "cd_knn") -> pd.DataFrame:
    """Overall ``metric`` per (task, model, shots, layer), mean over seeds; with ``rel_layer``."""
    sel = metrics[(metrics["metric"] == metric) & (metrics["concept"] == "all") & metrics["layer"].notna()]
    out = sel.groupby(KEYS + ["layer"], as_index=False).agg(
        value=("value", "mean"), n_layers=("n_layers", "first"), seeds=("seed", "nunique")
    )
    out["layer"] = out["layer"].astype(int)
    out["rel_layer"] = out["layer"] / out["n_layers"]
    return out.sort_values(KEYS + ["layer"]).reset_index(drop=True)


def peaks(curves: pd.DataFrame) -> pd.DataFrame:
    """The peak layer (first of highest value) of every curve: peak_layer, peak_rel, peak_cd."""
    rows = []
    for key, grp in curves.groupby(KEYS, sort=True):
        grp = grp.sort_values("layer")
        i = int(np.argmax(grp["value"].to_numpy()))
        row = grp.iloc[i]
        rows.append(
            dict(
                zip(KEYS, key, strict=True),
                peak_layer=int(row["layer"]),
                peak_rel=float(row["rel_layer"]),
                peak_cd=float(row["value"]),
                n_layers=int(row["n_layers"]),
                seeds=int(row["seeds"]),
            )
        )
    return pd.DataFrame(rows, columns=KEYS + ["peak_layer", "peak_rel", "peak_cd", "n_layers", "seeds"])


def concept_points(metrics: pd.DataFrame, peak: pd.DataFrame, include_null: bool = False) -> pd.DataFrame:
    """Per (task, model, shots, concept): decodability at the peak layer (``cd``), ICL accuracy (``acc``)."""
    per = metrics[metrics["concept"] != "all"]
    if not include_null:
        per = per[per["concept"] != NULL_CONCEPT]
    acc = (
        per[per["metric"] == "icl_accuracy"]
        .groupby(KEYS + ["concept"], as_index=False)["value"]
        .mean()
        .rename(columns={"value": "acc"})
    )
    cd = per[(per["metric"] == "cd_knn") & per["layer"].notna()].merge(peak[KEYS + ["peak_layer"]], on=KEYS)
    cd = cd[cd["layer"] == cd["peak_layer"]]
    cd = cd.groupby(KEYS + ["concept"], as_index=False)["value"].mean().rename(columns={"value": "cd"})
    return cd.merge(acc, on=KEYS + ["concept"], how="inner")


def mean_accuracy(metrics: pd.DataFrame) -> pd.DataFrame:
    """ICL accuracy over all prompts of a run (concept ``all``), mean over seeds, per (task, model, shots)."""
    sel = metrics[(metrics["metric"] == "icl_accuracy") & (metrics["concept"] == "all")]
    return sel.groupby(KEYS, as_index=False)["value"].mean().rename(columns={"value": "icl_acc"})


def comparison_table(
    metrics: pd.DataFrame,
    models: pd.DataFrame,
    include_null: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (task, model, shots): the comparison table of the report.

    ``models`` has one row per model label: model, family, n_params (the order of its rows is kept).
    """
    curves = decodability_curves(metrics)
    peak = peaks(curves)
    points = concept_points(metrics, peak, include_null)
    table = peak.merge(mean_accuracy(metrics), on=KEYS, how="left")
    fits = []
    for key, grp in points.groupby(KEYS):
        f = fit(grp["cd"].to_numpy(), grp["acc"].to_numpy(), n_boot=n_boot, seed=seed)
        fits.append(
            dict(zip(KEYS, key, strict=True), r2=f.r2, r2_lo=f.lo, r2_hi=f.hi, n_concepts=f.n, r2_why=f.why)
        )
    fit_cols = KEYS + ["r2", "r2_lo", "r2_hi", "n_concepts", "r2_why"]
    table = table.merge(pd.DataFrame(fits, columns=fit_cols), on=KEYS, how="left")
    table["r2_why"] = table["r2_why"].fillna("no concept points")
    table = table.merge(models[["model", "family", "n_params"]], on="model", how="left")
    order = {m: i for i, m in enumerate(models["model"])}
    table["_order"] = table["model"].map(order)
    table = table.sort_values(["task", "_order", "shots"]).drop(columns="_order").reset_index(drop=True)
    cols = [
        "task",
        "model",
        "family",
        "n_params",
        "n_layers",
        "shots",
        "seeds",
        "peak_layer",
        "peak_rel",
        "peak_cd",
        "icl_acc",
        "r2",
        "r2_lo",
        "r2_hi",
        "n_concepts",
        "r2_why",
    ]
    return table[cols]


def pooled_fits(
    metrics: pd.DataFrame, include_null: bool = False, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """R² across concepts and shots together, per (task, model), where a model has several shots values.

    Each shots value contributes its own peak layer's decodability; the bootstrap resamples concepts.
    """
    curves = decodability_curves(metrics)
    points = concept_points(metrics, peaks(curves), include_null)
    rows = []
    for (task, model), grp in points.groupby(["task", "model"]):
        if grp["shots"].nunique() < 2:
            continue
        f = fit(
            grp["cd"].to_numpy(),
            grp["acc"].to_numpy(),
            groups=grp["concept"].to_numpy(),
            n_boot=n_boot,
            seed=seed,
        )
        rows.append(
            dict(
                task=task,
                model=model,
                shots=sorted(grp["shots"].unique().tolist()),
                r2=f.r2,
                r2_lo=f.lo,
                r2_hi=f.hi,
                n_points=f.n,
                n_concepts=grp["concept"].nunique(),
            )
        )
    return pd.DataFrame(
        rows, columns=["task", "model", "shots", "r2", "r2_lo", "r2_hi", "n_points", "n_concepts"]
    )
