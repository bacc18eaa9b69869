"""The report's figures (matplotlib, Agg backend), returned as PNG bytes.

Colours: one per model (ordered by size) and one per concept (in the task's concept order, ``null``
always grey), the same in every figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg", force=False)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from conceptprobe.plotting import (  # noqa: E402
    LAYER_AXIS,
    MARKERS,
    NULL_BAND,
    STYLE,
    SURFACE,
    TAB10,
    legend_top,
)
from conceptprobe.report.stats import NULL_CONCEPT, Fit  # noqa: E402


def _shots_title(shots: int) -> str:
    return f"{shots}-shot"


def decodability_vs_layer(
    curves: pd.DataFrame,
    peak: pd.DataFrame,
    models: Sequence[str],
    shots: Sequence[int],
    colors: dict[str, tuple],
    chance: float,
) -> Figure:
    """Overall k-NN decodability per layer, a line per model, per shots value: by absolute layer and by
    relative depth (two rows; side by side when there is one shots value)."""
    with plt.rc_context(STYLE):
        single = len(shots) == 1
        nrow, ncol = (1, 2) if single else (2, len(shots))
        fig, axes = plt.subplots(
            nrow, ncol, figsize=(3.4 * ncol + 0.4, 2.5 * nrow), squeeze=False, sharey=True
        )
        for j, k in enumerate(shots):
            for row, xcol in enumerate(("layer", "rel_layer")):
                ax = axes[0, row] if single else axes[row, j]
                for m in models:
                    c = curves[(curves["model"] == m) & (curves["shots"] == k)]
                    if c.empty:
                        continue
                    ax.plot(c[xcol], c["value"], color=colors[m], lw=1.6, label=m)
                    p = peak[(peak["model"] == m) & (peak["shots"] == k)]
                    if not p.empty:
                        px = p["peak_layer"].iloc[0] if xcol == "layer" else p["peak_rel"].iloc[0]
                        ax.plot(
                            [px], [p["peak_cd"].iloc[0]], "o", ms=5, color=colors[m], mec="white", mew=0.8
                        )
                ax.axhline(chance, color="0.5", lw=0.8, ls=":")
                ax.set_ylim(0, 1.02)
                if row == 0 or single:
                    ax.set_title(_shots_title(k))
                if row == 0:
                    ax.set_xlabel("layer")
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                else:
                    ax.set_xlabel("relative depth (layer / n_layers)")
                    ax.set_xlim(-0.02, 1.02)
                if (j == 0 and not single) or (single and row == 0):
                    ax.set_ylabel("decodability (k-NN)")
        handles = [Line2D([], [], color=colors[m], lw=2) for m in models]
        handles.append(Line2D([], [], color="0.5", lw=0.8, ls=":"))
        fig.tight_layout(h_pad=1.2)
        legend_top(fig, handles, [*models, "chance"])
        return fig


def _scatter_panel(
    ax, pts: pd.DataFrame, f: Fit, ccolors: dict, marker_of: dict[int, str] | None = None
) -> None:
    for _, r in pts.iterrows():
        mk = marker_of.get(int(r["shots"]), "o") if marker_of else "o"
        ax.scatter(
            r["cd"],
            r["acc"],
            s=34,
            color=ccolors.get(r["concept"], "k"),
            marker=mk,
            edgecolor="white",
            linewidth=0.6,
            zorder=3,
        )
    if not np.isnan(f.r2):
        xs = np.linspace(float(pts["cd"].min()), float(pts["cd"].max()), 20)  # the line over the data only
        ax.plot(xs, f.slope * xs + f.intercept, color="0.25", lw=1, ls="--", zorder=2)
    ax.text(
        0.03,
        0.97,
        f.label(),
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=8.5,
        bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "0.8", "alpha": 0.9},
    )
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)


def cd_vs_accuracy(
    points: pd.DataFrame,
    fits: dict[tuple[str, int | str], Fit],
    peak: pd.DataFrame,
    models: Sequence[str],
    shots: Sequence[int],
    ccolors: dict[str, object],
    pooled: bool,
) -> Figure:
    """Per-concept decodability at the peak layer vs ICL accuracy: a row per model, a column per shots."""
    cols: list[int | str] = [*shots, "pooled"] if pooled else list(shots)
    marker_of = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(shots)}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            len(models),
            len(cols),
            figsize=(2.9 * len(cols) + 0.6, 2.7 * len(models) + 0.3),
            squeeze=False,
            sharex=True,
            sharey=True,
        )
        for i, m in enumerate(models):
            for j, k in enumerate(cols):
                ax = axes[i, j]
                if k == "pooled":
                    pts = points[points["model"] == m]
                    title = "pooled over shots"
                else:
                    pts = points[(points["model"] == m) & (points["shots"] == k)]
                    p = peak[(peak["model"] == m) & (peak["shots"] == k)]
                    title = _shots_title(int(k)) + (
                        f" · layer {int(p['peak_layer'].iloc[0])}" if not p.empty else ""
                    )
                f = fits.get((m, k))
                if pts.empty or f is None:
                    why = "one shots value" if k == "pooled" and not pts.empty else "no run"
                    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="0.5")
                else:
                    _scatter_panel(ax, pts, f, ccolors, marker_of if k == "pooled" else None)
                ax.set_title(title, fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"{m}\nICL accuracy")
                if i == len(models) - 1:
                    ax.set_xlabel("decodability at peak layer")
        present = [c for c in ccolors if c in set(points["concept"])]
        handles = [Line2D([], [], ls="", marker="o", ms=7, color=ccolors[c]) for c in present]
        labels = list(present)
        if pooled:
            handles += [Line2D([], [], ls="", marker=marker_of[k], ms=6, color="0.35") for k in shots]
            labels += [_shots_title(k) for k in shots]
        fig.tight_layout(h_pad=1.0)
        legend_top(fig, handles, labels, ncol=min(len(labels), 10))
        return fig


def umap_grid(
    embeddings: dict[tuple[str, int], tuple[np.ndarray, np.ndarray] | str],
    titles: dict[tuple[str, int], str],
    models: Sequence[str],
    shots: Sequence[int],
    ccolors: dict[str, object],
) -> Figure:
    """UMAP panels, a row per model and a column per shots value, points coloured by concept."""
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = plt.subplots(
            len(models), len(shots), figsize=(2.8 * len(shots) + 0.6, 2.7 * len(models) + 0.3), squeeze=False
        )
        seen: set[str] = set()
        for i, m in enumerate(models):
            for j, k in enumerate(shots):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                for side in ("top", "right", "left", "bottom"):
                    ax.spines[side].set_visible(True)
                    ax.spines[side].set_color("0.85")
                got = embeddings.get((m, k), "no run")
                ax.set_title(titles.get((m, k), _shots_title(k)), fontsize=9)
                if j == 0:
                    ax.set_ylabel(m)
                if isinstance(got, str):
                    ax.text(
                        0.5,
                        0.5,
                        got,
                        ha="center",
                        va="center",
                        transform=ax.transAxes,
                        color="0.45",
                        fontsize=8.5,
                        wrap=True,
                    )
                    continue
                emb, labels = got
                size = float(np.clip(2500 / max(len(labels), 1), 5, 24))
                for c in ccolors:
                    sel = labels == c
                    if sel.any():
                        seen.add(c)
                        ax.scatter(
                            emb[sel, 0],
                            emb[sel, 1],
                            s=size,
                            color=ccolors[c],
                            alpha=0.85,
                            linewidths=0,
                            zorder=1 if c == NULL_CONCEPT else 2,
                        )
        present = [c for c in ccolors if c in seen]
        fig.tight_layout(h_pad=0.8, w_pad=0.6)
        if present:
            handles = [Line2D([], [], ls="", marker="o", ms=7, color=ccolors[c]) for c in present]
            legend_top(fig, handles, present, ncol=min(len(present), 10))
        return fig


def vs_shots(table: pd.DataFrame, models: Sequence[str], colors: dict[str, tuple]) -> Figure:
    """ICL accuracy and peak decodability against the number of shots, a line per model."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(8.2, 3.0), sharex=True)
        shots = sorted(table["shots"].unique())
        for ax, col, label in (
            (axes[0], "icl_acc", "ICL accuracy (without null)"),
            (axes[1], "held_cd", "decodability at held-out peak (k-NN)"),
        ):
            for m in models:
                t = table[table["model"] == m].sort_values("shots")
                if t.empty:
                    continue
                ax.plot(t["shots"], t[col], "-o", color=colors[m], lw=1.6, ms=4.5, label=m)
                if col == "held_cd" and "surface" in t:
                    ax.plot(t["shots"], t["surface"], ":", color=colors[m], lw=1.0)
            ax.set_ylabel(label)
            ax.set_xlabel("shots")
            ax.set_ylim(0, 1.02)
            ax.set_xticks(shots)
        fig.tight_layout()
        handles = [Line2D([], [], color=colors[m], lw=2, marker="o", ms=4.5) for m in models]
        handles.append(Line2D([], [], color="0.3", ls=":", lw=1.0))
        legend_top(fig, handles, [*models, "surface baseline"])
        return fig


def _col(frame: pd.DataFrame, name: str) -> np.ndarray:
    return frame[name].to_numpy(dtype=float) if name in frame else np.full(len(frame), np.nan)


def layers_with_controls(
    wide: pd.DataFrame,
    table: pd.DataFrame,
    models: Sequence[str],
    shots: Sequence[int],
    colors: dict[str, tuple],
) -> Figure:
    """Per model (rows) and shots (columns): k-NN decodability per layer with its bootstrap band, the probe,
    the label-permutation null (grey band, mean to 95th percentile) and the strongest surface baseline
    (black dash-dot line and band), the held-out peak marked."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            len(models),
            len(shots),
            figsize=(3.1 * len(shots) + 0.5, 2.35 * len(models) + 0.4),
            squeeze=False,
            sharey=True,
        )
        for i, m in enumerate(models):
            for j, k in enumerate(shots):
                ax = axes[i, j]
                w = wide[(wide["model"] == m) & (wide["shots"] == k)].sort_values("layer")
                t = table[(table["model"] == m) & (table["shots"] == k)]
                ax.set_ylim(0, 1.02)
                if i == 0:
                    ax.set_title(_shots_title(k))
                if j == 0:
                    ax.set_ylabel(f"{m}\ndecodability")
                if i == len(models) - 1:
                    ax.set_xlabel(LAYER_AXIS if j == 0 else "layer")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                if w.empty:
                    ax.text(0.5, 0.5, "no run", ha="center", va="center", transform=ax.transAxes, color="0.5")
                    continue
                x = w["layer"].to_numpy()
                lo, hi = _col(w, "cd_knn_null_mean"), _col(w, "cd_knn_null_p95")
                if np.isfinite(hi).any():
                    ax.fill_between(x, lo, hi, color=NULL_BAND, alpha=0.35, lw=0)
                if not t.empty and np.isfinite(t["surface"].iloc[0] if "surface" in t else np.nan):
                    sv = float(t["surface"].iloc[0])
                    slo = float(t["surface_lo"].iloc[0]) if "surface_lo" in t else sv
                    shi = float(t["surface_hi"].iloc[0]) if "surface_hi" in t else sv
                    ax.axhspan(slo, shi, color=SURFACE, alpha=0.10, lw=0)
                    ax.axhline(sv, color=SURFACE, lw=1.1, ls="-.")
                c_lo, c_hi = _col(w, "cd_knn_ci_low"), _col(w, "cd_knn_ci_high")
                if np.isfinite(c_hi).any():
                    ax.fill_between(x, c_lo, c_hi, color=colors[m], alpha=0.25, lw=0)
                ax.plot(x, _col(w, "cd_knn"), color=colors[m], lw=1.6)
                ax.plot(x, _col(w, "probe_accuracy"), color=colors[m], lw=1.0, ls="--")
                if not t.empty and "held_layer" in t and np.isfinite(t["held_cd"].iloc[0]):
                    ax.plot(
                        [t["held_layer"].iloc[0]],
                        [t["held_cd"].iloc[0]],
                        "o",
                        ms=5,
                        color=colors[m],
                        mec="black",
                        mew=0.7,
                        zorder=5,
                    )
        handles = [
            Line2D([], [], color="0.2", lw=1.6),
            Line2D([], [], color="0.2", lw=1.0, ls="--"),
            Line2D([], [], color=NULL_BAND, lw=6, alpha=0.5),
            Line2D([], [], color=SURFACE, lw=1.1, ls="-."),
            Line2D([], [], ls="", marker="o", ms=5, color="0.6", mec="black"),
        ]
        labels = [
            "k-NN (band: 95% CI)",
            "probe",
            "permutation null (mean–p95)",
            "surface baseline (band: 95% CI)",
            "held-out peak",
        ]
        fig.tight_layout(h_pad=0.8)
        legend_top(fig, handles, labels, ncol=5)
        return fig


def concept_curves(
    per_concept: pd.DataFrame,
    models: Sequence[str],
    shots: Sequence[int],
    ccolors: dict[str, object],
) -> Figure:
    """k-NN decodability (recall) per concept and layer: a row per model, a column per shots value."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            len(models),
            len(shots),
            figsize=(3.1 * len(shots) + 0.5, 2.3 * len(models) + 0.4),
            squeeze=False,
            sharey=True,
        )
        for i, m in enumerate(models):
            for j, k in enumerate(shots):
                ax = axes[i, j]
                sel = per_concept[(per_concept["model"] == m) & (per_concept["shots"] == k)]
                for c, color in ccolors.items():
                    cur = sel[sel["concept"] == c].sort_values("layer")
                    if not cur.empty:
                        ax.plot(cur["layer"], cur["value"], color=color, lw=1.3 if c != NULL_CONCEPT else 1.0)
                ax.set_ylim(0, 1.02)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                if i == 0:
                    ax.set_title(_shots_title(k))
                if j == 0:
                    ax.set_ylabel(f"{m}\nrecall (k-NN)")
                if i == len(models) - 1:
                    ax.set_xlabel(LAYER_AXIS if j == 0 else "layer")
        present = [c for c in ccolors if c in set(per_concept["concept"])]
        handles = [Line2D([], [], color=ccolors[c], lw=2) for c in present]
        fig.tight_layout(h_pad=0.8)
        legend_top(fig, handles, present, ncol=min(len(present), 8))
        return fig


def pair_curves(
    wide_pairs: dict[str, pd.DataFrame],
    pairs: pd.DataFrame,
    models: Sequence[str],
    shots: Sequence[int],
) -> Figure:
    """Decodability within each pair of concepts sharing an answer class (chance 0.5): a row per model, a
    column per pair; a line per shots value with its permutation null (band) and its strongest surface
    baseline (dotted, same colour)."""
    names = list(wide_pairs)
    shot_colors = {k: TAB10[i % 10] for i, k in enumerate(shots)}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            len(models),
            len(names),
            figsize=(3.3 * len(names) + 0.5, 2.3 * len(models) + 0.4),
            squeeze=False,
            sharey=True,
        )
        for i, m in enumerate(models):
            for j, name in enumerate(names):
                ax = axes[i, j]
                w = wide_pairs[name]
                for k in shots:
                    cur = w[(w["model"] == m) & (w["shots"] == k)].sort_values("layer")
                    if cur.empty:
                        continue
                    x = cur["layer"].to_numpy()
                    ax.fill_between(
                        x,
                        _col(cur, "cd_knn_null_mean"),
                        _col(cur, "cd_knn_null_p95"),
                        color=shot_colors[k],
                        alpha=0.12,
                        lw=0,
                    )
                    ax.plot(x, _col(cur, "cd_knn"), color=shot_colors[k], lw=1.5)
                    row = pairs[(pairs["model"] == m) & (pairs["shots"] == k) & (pairs["pair"] == name)]
                    if not row.empty and "surface" in row and np.isfinite(row["surface"].iloc[0]):
                        ax.axhline(float(row["surface"].iloc[0]), color=shot_colors[k], lw=1.0, ls=":")
                ax.axhline(0.5, color="0.5", lw=0.6)
                ax.set_ylim(0, 1.02)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                if i == 0:
                    ax.set_title(name.replace("|", " vs "))
                if j == 0:
                    ax.set_ylabel(f"{m}\ndecodability")
                if i == len(models) - 1:
                    ax.set_xlabel(LAYER_AXIS if j == 0 else "layer")
        handles = [Line2D([], [], color=shot_colors[k], lw=2) for k in shots]
        handles += [
            Line2D([], [], color="0.3", lw=1.0, ls=":"),
            Line2D([], [], color="0.5", lw=6, alpha=0.25),
        ]
        labels = [_shots_title(k) for k in shots] + ["surface baseline", "permutation null (mean–p95)"]
        fig.tight_layout(h_pad=0.8)
        legend_top(fig, handles, labels, ncol=len(labels))
        return fig


def against_size(table: pd.DataFrame, models: Sequence[str], shots: Sequence[int]) -> Figure:
    """Decodability at the held-out peak (with its interval) and ICL accuracy without null, against the
    parameter count (log scale), a line per shots value; the surface baseline dotted."""
    shot_colors = {k: TAB10[i % 10] for i, k in enumerate(shots)}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.1), sharex=True)
        for ax, col, lo, hi, label in (
            (axes[0], "held_cd", "held_lo", "held_hi", "decodability at held-out peak (k-NN)"),
            (axes[1], "icl_acc", "icl_lo", "icl_hi", "ICL accuracy (without null)"),
        ):
            for k in shots:
                t = table[(table["shots"] == k) & table["model"].isin(models)].sort_values("n_params")
                if t.empty:
                    continue
                x = t["n_params"].to_numpy(dtype=float)
                y = _col(t, col)
                err = np.clip(np.vstack([y - _col(t, lo), _col(t, hi) - y]), 0, None)
                ax.errorbar(
                    x, y, yerr=np.nan_to_num(err), fmt="-o", color=shot_colors[k], ms=4.5, lw=1.4, capsize=2
                )
                if col == "held_cd" and "surface" in t:
                    ax.plot(x, _col(t, "surface"), ls=":", color=shot_colors[k], lw=1.1)
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.set_ylabel(label)
            ax.set_ylim(0, 1.02)
        t = table.drop_duplicates("model")
        for _, r in t.iterrows():
            axes[0].annotate(
                str(r["model"]), (float(r["n_params"]), 0.02), fontsize=7, rotation=90, color="0.4"
            )
        handles = [Line2D([], [], color=shot_colors[k], lw=2, marker="o", ms=4) for k in shots]
        handles.append(Line2D([], [], color="0.3", ls=":", lw=1.1))
        fig.tight_layout()
        legend_top(fig, handles, [_shots_title(k) for k in shots] + ["surface baseline"], ncol=len(shots) + 1)
        return fig
