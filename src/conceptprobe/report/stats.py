"""Numbers behind the report, all recomputed from ``metrics.parquet``: curves, peaks, CD-vs-accuracy fits.

* The decodability curve of a (task, model, shots) is the overall k-NN decodability (``cd_knn``, concept
  ``all``) per layer, averaged over seeds when a run was repeated; its in-sample peak is the first layer of
  highest value (optimistic: the max over noisy layers).
* The quoted decodability of a run is at its *held-out* peak (the layer chosen on one half of the prompts,
  the value from the other half), beside its bootstrap interval, its label-permutation null and the
  strongest surface baseline; over seeds, the mean and the std across seeds.
* A concept point is (decodability of that concept at the held-out peak layer, ICL accuracy of that
  concept), averaged over seeds.
* R² is that of an ordinary least-squares line through the concept points (= Pearson r²), shown only where
  there is something to explain (at least 4 concepts, decodability spread >= 0.10, accuracy spread
  >= 0.05); its 95% interval is a percentile bootstrap over concepts (a concept keeps all its points when
  shots are pooled). With 6 concepts the interval's upper end is near 1 by construction.
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

RUN_KEYS = [*KEYS, "seed", "run_id"]
#: What makes a fit worth showing: enough concepts, and a spread in both axes wider than noise.
MIN_CONCEPTS, MIN_CD_SPREAD, MIN_ACC_SPREAD = 4, 0.10, 0.05


def decodability_curves(metrics: pd.DataFrame, metric: str = "cd_knn", concept: str = "all") -> pd.DataFrame:
    """``metric`` per (task, model, shots, layer) for ``concept``, mean over seeds; with ``rel_layer``."""
    sel = metrics[(metrics["metric"] == metric) & (metrics["concept"] == concept) & metrics["layer"].notna()]
    out = sel.groupby(KEYS + ["layer"], as_index=False).agg(
        value=("value", "mean"), n_layers=("n_layers", "first"), seeds=("seed", "nunique")
    )
    out["layer"] = out["layer"].astype(int)
    out["rel_layer"] = out["layer"] / out["n_layers"]
    return out.sort_values(KEYS + ["layer"]).reset_index(drop=True)


def layer_controls(metrics: pd.DataFrame, concept: str = "all") -> pd.DataFrame:
    """Per (task, model, shots, layer): every per-layer metric of ``concept`` as a column, mean over seeds.

    Columns (where the runs have them): ``cd_knn``, ``cd_knn_ci_low/high``, ``cd_knn_null_mean/p95``,
    ``probe_accuracy`` (and its interval and null), ``cd_knn_selectivity`` ... plus ``rel_layer``.
    """
    sel = metrics[(metrics["concept"] == concept) & metrics["layer"].notna()]
    sel = sel[~sel["metric"].str.contains("heldout")]
    wide = sel.pivot_table(index=KEYS + ["layer"], columns="metric", values="value", aggfunc="mean")
    wide = wide.reset_index()
    n_layers = metrics.groupby(KEYS)["n_layers"].first().rename("n_layers").reset_index()
    wide = wide.merge(n_layers, on=KEYS, how="left")
    wide["layer"] = wide["layer"].astype(int)
    wide["rel_layer"] = wide["layer"] / wide["n_layers"]
    return wide.sort_values(KEYS + ["layer"]).reset_index(drop=True)


def peaks(curves: pd.DataFrame) -> pd.DataFrame:
    """The in-sample peak layer (first of highest value) of every curve: peak_layer, peak_rel, peak_cd."""
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


def _one(m: pd.DataFrame, metric: str, concept: str = "all", layer: int | None = None) -> tuple[float, float]:
    """(value, n) of one row of a run's metrics; NaN when absent; ``layer`` None = the layer-free row."""
    sel = m[(m["metric"] == metric) & (m["concept"] == concept)]
    sel = sel[sel["layer"].isna()] if layer is None else sel[sel["layer"] == layer]
    if sel.empty:
        return float("nan"), float("nan")
    n = float(sel["n"].iloc[0]) if "n" in sel.columns and pd.notna(sel["n"].iloc[0]) else float("nan")
    return float(sel["value"].iloc[0]), n


def _headline(m: pd.DataFrame, concept: str) -> dict[str, object]:
    """The quoted numbers of one run (``concept`` 'all' or a pair), each with its interval and n."""
    curve = m[(m["metric"] == "cd_knn") & (m["concept"] == concept) & m["layer"].notna()].sort_values("layer")
    out: dict[str, object] = {}
    if curve.empty:
        return out
    i = int(np.argmax(curve["value"].to_numpy()))
    out["peak_layer"] = int(curve["layer"].iloc[i])
    out["peak_cd"] = float(curve["value"].iloc[i])
    held = m[(m["metric"] == "cd_knn_heldout_peak") & (m["concept"] == concept)]
    layer = int(held["layer"].iloc[0]) if not held.empty else out["peak_layer"]
    out["held_layer"] = layer
    out["held_cd"], out["held_n"] = _one(m, "cd_knn_heldout_peak", concept, layer)
    out["held_lo"], _ = _one(m, "cd_knn_heldout_peak_ci_low", concept, layer)
    out["held_hi"], _ = _one(m, "cd_knn_heldout_peak_ci_high", concept, layer)
    out["null_p95"], _ = _one(m, "cd_knn_null_p95", concept, layer)
    out["p_value"], _ = _one(m, "cd_knn_p_value", concept, layer)
    out["sel"], _ = _one(m, "cd_knn_heldout_selectivity", concept, layer)
    out["sel_lo"], _ = _one(m, "cd_knn_heldout_selectivity_ci_low", concept, layer)
    out["sel_hi"], _ = _one(m, "cd_knn_heldout_selectivity_ci_high", concept, layer)
    probe = m[(m["metric"] == "probe_accuracy_heldout_peak") & (m["concept"] == concept)]
    out["probe_held"] = float(probe["value"].iloc[0]) if not probe.empty else float("nan")
    surf = m[
        m["metric"].str.match(r"^surface_[a-z]+_(knn|probe)$") & (m["concept"] == concept) & m["layer"].isna()
    ]
    if not surf.empty:
        best = surf.loc[surf["value"].idxmax()]
        out["surface"] = float(best["value"])
        out["surface_reader"] = str(best["metric"]).removeprefix("surface_")
        out["surface_lo"], _ = _one(m, f"{best['metric']}_ci_low", concept)
        out["surface_hi"], _ = _one(m, f"{best['metric']}_ci_high", concept)
        out["wordclass"], _ = _one(m, "surface_lexical_knn", concept)
    return out


def run_headlines(metrics: pd.DataFrame, concept: str = "all") -> pd.DataFrame:
    """One row per run: ICL accuracy without null (with interval and n), the held-out peak decodability with
    its interval, permutation null and selectivity, the strongest surface baseline, and the in-sample peak.

    Runs written before the controls existed lack those columns' values (NaN); their held-out layer is the
    in-sample one.
    """
    rows = []
    for key, m in metrics.groupby(RUN_KEYS, sort=True):
        if concept != "all" and not (m["concept"] == concept).any():
            continue  # a run of a task without this pair
        row: dict[str, object] = dict(zip(RUN_KEYS, key, strict=True))
        if concept == "all":
            acc = (
                "all_but_null"
                if ((m["concept"] == "all_but_null") & (m["metric"] == "icl_accuracy")).any()
                else "all"
            )
            row["acc_concepts"] = acc
            row["icl_acc"], row["icl_n"] = _one(m, "icl_accuracy", acc)
            row["icl_lo"], _ = _one(m, "icl_accuracy_ci_low", acc)
            row["icl_hi"], _ = _one(m, "icl_accuracy_ci_high", acc)
            row["icl_with_null"], _ = _one(m, "icl_accuracy", "all")
            row["reuse"], _ = _one(m, "demo_reuse_rate")
        else:
            row["pair"] = concept
        row.update(_headline(m, concept))
        row["n_layers"] = int(m["n_layers"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def _spread(values: pd.Series) -> float:
    v = values.dropna()
    return float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def aggregate_seeds(heads: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean over seeds of every numeric headline column, with ``<col>_sd`` (std across seeds, NaN for one
    seed) for the quoted numbers, ``seeds`` (how many) and ``held_layers`` (the layer each seed chose)."""
    rows = []
    numeric = [
        c for c in heads.columns if c not in keys + ["seed", "run_id"] and heads[c].dtype.kind in "fiu"
    ]
    for key, grp in heads.groupby(keys, sort=True):
        grp = grp.sort_values("seed")
        row: dict[str, object] = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        for col in numeric:
            row[col] = float(grp[col].mean())
        for col in ("icl_acc", "held_cd", "sel", "surface", "peak_cd"):
            if col in grp:
                row[f"{col}_sd"] = _spread(grp[col])
        for col in ("surface_reader", "acc_concepts"):
            if col in grp:
                row[col] = str(grp[col].iloc[0])
        row["seeds"] = int(grp["seed"].nunique())
        row["held_layers"] = [int(v) for v in grp["held_layer"].dropna()] if "held_layer" in grp else []
        if "held_layer" in grp and grp["held_layer"].notna().any():
            row["held_layer"] = int(grp["held_layer"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def concept_points(metrics: pd.DataFrame, heads: pd.DataFrame, include_null: bool = False) -> pd.DataFrame:
    """Per (task, model, shots, concept): decodability of the concept at each run's held-out peak layer
    (``cd``) and its ICL accuracy (``acc``), mean over seeds; ``n`` = seeds behind the point."""
    per = metrics[
        ~metrics["concept"].isin(["all", "all_but_null"]) & ~metrics["concept"].str.contains("|", regex=False)
    ]
    if not include_null:
        per = per[per["concept"] != NULL_CONCEPT]
    layer_of = heads.set_index("run_id")["held_layer"]
    acc = per[per["metric"] == "icl_accuracy"][RUN_KEYS + ["concept", "value"]].rename(
        columns={"value": "acc"}
    )
    cd = per[(per["metric"] == "cd_knn") & per["layer"].notna()]
    cd = cd[cd["layer"] == cd["run_id"].map(layer_of)][RUN_KEYS + ["concept", "value"]]
    both = cd.rename(columns={"value": "cd"}).merge(acc, on=RUN_KEYS + ["concept"], how="inner")
    return both.groupby(KEYS + ["concept"], as_index=False).agg(
        cd=("cd", "mean"), acc=("acc", "mean"), n=("seed", "nunique")
    )


def explainable(x: np.ndarray, y: np.ndarray) -> str:
    """Why a fit of accuracy on decodability across these concepts has nothing to explain ("" if it has)."""
    if len(x) < MIN_CONCEPTS:
        return f"< {MIN_CONCEPTS} concepts"
    if np.ptp(x) < MIN_CD_SPREAD:
        return f"decodability spread {np.ptp(x):.2f} < {MIN_CD_SPREAD} (near the ceiling or the floor)"
    if np.ptp(y) < MIN_ACC_SPREAD:
        return f"accuracy spread {np.ptp(y):.2f} < {MIN_ACC_SPREAD}"
    return ""


def guarded_fit(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, n_boot: int = 2000, seed: int = 0
) -> Fit:
    """:func:`fit`, or a Fit with NaN R² and the reason when there is nothing to explain."""
    why = explainable(np.asarray(x, float), np.asarray(y, float))
    if why:
        nan = float("nan")
        return Fit(nan, nan, nan, nan, nan, int(len(x)), 0, why)
    return fit(x, y, groups, n_boot=n_boot, seed=seed)


def comparison_table(
    metrics: pd.DataFrame,
    models: pd.DataFrame,
    include_null: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The comparison table (one row per task, model, shots; seeds averaged) and the concept points.

    ``models`` has one row per model label: model, family, n_params (its row order is kept).
    """
    heads = run_headlines(metrics)
    table = aggregate_seeds(heads, KEYS)
    points = concept_points(metrics, heads, include_null)
    fits = []
    for key, grp in points.groupby(KEYS):
        f = guarded_fit(grp["cd"].to_numpy(), grp["acc"].to_numpy(), n_boot=n_boot, seed=seed)
        fits.append(
            dict(zip(KEYS, key, strict=True), r2=f.r2, r2_lo=f.lo, r2_hi=f.hi, n_concepts=f.n, r2_why=f.why)
        )
    fit_cols = KEYS + ["r2", "r2_lo", "r2_hi", "n_concepts", "r2_why"]
    table = table.merge(pd.DataFrame(fits, columns=fit_cols), on=KEYS, how="left")
    table["r2_why"] = table["r2_why"].fillna("no concept points")
    table = table.merge(models[["model", "family", "n_params"]], on="model", how="left")
    table["peak_rel"] = table["held_layer"] / table["n_layers"]
    order = {m: i for i, m in enumerate(models["model"])}
    table["_order"] = table["model"].map(order)
    table = table.sort_values(["task", "_order", "shots"]).drop(columns="_order").reset_index(drop=True)
    return table, points


def pair_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, model, shots, pair) of concepts sharing an answer class, seeds averaged."""
    pairs = sorted(c for c in metrics["concept"].unique() if "|" in str(c))
    frames = [run_headlines(metrics, pair) for pair in pairs]
    frames = [f for f in frames if not f.empty and "held_cd" in f]
    if not frames:
        return pd.DataFrame()
    return aggregate_seeds(pd.concat(frames, ignore_index=True), KEYS + ["pair"])


def pooled_fits(points: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """R² across concepts and shots together, per (task, model), where a model has several shots values.

    Each shots value contributes its own held-out peak layer's decodability; the bootstrap resamples
    concepts; ``n_points`` says how many points the fit rests on.
    """
    rows = []
    for (task, model), grp in points.groupby(["task", "model"]):
        if grp["shots"].nunique() < 2:
            continue
        f = guarded_fit(
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
                r2_why=f.why,
            )
        )
    return pd.DataFrame(
        rows, columns=["task", "model", "shots", "r2", "r2_lo", "r2_hi", "n_points", "n_concepts", "r2_why"]
    )
