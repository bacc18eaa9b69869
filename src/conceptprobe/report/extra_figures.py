"""Figures of the ICL/induction-heads and causal-test sections (matplotlib, Agg), in the report's style.

Every value drawn is read from the result files (:mod:`.extras`); nothing is refitted or resampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg", force=False)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from conceptprobe.plotting import STYLE, legend_top  # noqa: E402
from conceptprobe.report.extras import (  # noqa: E402
    HeadsResult,
    IclResult,
    InterventionResult,
    PcaResult,
    finetune_conditions,
    finetune_ref_layer,
)

_GREY = "#9a9a9a"


def extend_colors(base: dict[str, tuple], models: Sequence[str]) -> dict[str, tuple]:
    """``base`` (the probe figures' model colours) plus an unused colour for each model it lacks."""
    out = dict(base)
    n = len(set(out) | set(models))
    palette = (
        [plt.get_cmap("tab10")(i) for i in range(10)]
        if n <= 10
        else [plt.get_cmap("tab20")(i) for i in range(20)]
    )
    free = [c for c in palette if c not in set(out.values())] or palette
    for i, m in enumerate(m for m in models if m not in out):
        out[m] = free[i % len(free)]
    return out


def condition_color(condition: str) -> object:
    """Finetuning conditions: base grey, first:k blue, last:k red, others from tab10."""
    if condition == "base":
        return "#555555"
    if condition.startswith("first"):
        return "#1f77b4"
    if condition.startswith("last"):
        return "#d62728"
    return plt.get_cmap("tab10")(2 + sum(map(ord, condition)) % 5)


# ------------------------------------------------------------------------------------------------------------
# ICL score and induction heads


def icl_loss_curves(icls: Sequence[IclResult], colors: dict[str, tuple]) -> Figure:
    """Mean loss per token index (log axis), every model overlaid: the per-token mean (thin), its
    log-binned mean (thick, dots) and a band of ± 1 s.e.m.; dotted verticals at the scored tokens."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.6, 3.9))
        tops: list[float] = []
        marks: set[tuple[int, int]] = set()
        for r in icls:
            curve = r.data.get("curve") or {}
            idx = np.asarray(curve.get("index") or [], dtype=float)
            mean = np.asarray([np.nan if v is None else v for v in curve.get("mean_loss") or []], dtype=float)
            sem = np.asarray([np.nan if v is None else v for v in curve.get("sem") or []], dtype=float)
            c = colors[r.model]
            if len(idx) and len(mean) == len(idx):
                ax.plot(idx, mean, color=c, lw=0.7, alpha=0.45)
                if len(sem) == len(idx):
                    ax.fill_between(idx, mean - sem, mean + sem, color=c, alpha=0.12, lw=0)
                later = mean[idx >= 4]
                if np.isfinite(later).any():
                    tops.append(float(np.nanmax(later)))
            bins = curve.get("log_bins") or {}
            if bins.get("centre"):
                ax.plot(bins["centre"], bins["mean_loss"], "-o", color=c, lw=1.8, ms=3.2)
            if "early" in r.data and "late" in r.data:
                marks.add((int(r.data["early"]), int(r.data["late"])))
        for early, late in marks:
            for t in (early, late):
                ax.axvline(t, color="0.45", lw=0.8, ls=":")
                tr = ax.get_xaxis_transform()
                ax.text(t, 1.0, f" token {t}", transform=tr, fontsize=8, color="0.35", va="top", ha="left")
        ax.set_xscale("log")
        ax.set_xlabel("token index in the context (log scale)")
        ax.set_ylabel("mean loss (nats)")
        if tops:
            ax.set_ylim(0, max(tops) * 1.08)
        handles = [Line2D([], [], color=colors[r.model], lw=2, marker="o", ms=3.5) for r in icls]
        labels = [f"{r.model} (ICL score {float(r.data['score']):+.3f})" for r in icls]
        fig.tight_layout()
        legend_top(fig, handles, labels, ncol=min(len(labels), 3))
        return fig


def prefix_matching_grid(heads: Sequence[HeadsResult]) -> Figure:
    """Prefix-matching score per layer (y, 0 at the top) and head (x), a panel per model; panels share
    their height, so rows line up by relative depth; boxes mark heads at or above each run's threshold."""
    widths = [max(2.3, 0.2 * r.prefix_matching.shape[1] + 0.7) for r in heads]
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = plt.subplots(
            1,
            len(heads),
            figsize=(sum(widths) + 1.6, 4.6),
            squeeze=False,
            gridspec_kw={"width_ratios": widths},
        )
        im = None
        for ax, r in zip(axes[0], heads, strict=True):
            pm = r.prefix_matching
            n_layers, n_heads = pm.shape
            im = ax.imshow(pm, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
            for h in r.above:
                ax.add_patch(
                    Rectangle((h["head"] - 0.5, h["layer"] - 0.5), 1, 1, fill=False, ec="#ff3b30", lw=1.1)
                )
            ax.set_xlabel("head")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
            ax.set_title(f"{r.model}\n{n_layers} × {n_heads} heads · {len(r.above)} ≥ {r.threshold:g}")
        axes[0, 0].set_ylabel("layer (decoder layer, 0 = first)")
        if im is not None:
            fig.colorbar(
                im, ax=axes[0].tolist(), shrink=0.85, fraction=0.04, pad=0.02, label="prefix matching"
            )
        return fig


def token_loss_pca(result: PcaResult, colors: dict[str, tuple]) -> Figure:
    """The models' coordinates on the first (two) principal components of their per-token loss vectors."""
    d = result.data
    coords = np.asarray(d["coords"], dtype=float)
    evr = list(d.get("explained_variance_ratio") or [])
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.4 if coords.shape[1] > 1 else 1.9))
        ys = coords[:, 1] if coords.shape[1] > 1 else np.zeros(len(coords))
        if coords.shape[1] > 1 and d.get("trajectory"):
            ax.plot(coords[:, 0], ys, color="0.6", lw=0.8, zorder=1)
        for (x, y), label in zip(
            zip(coords[:, 0], ys, strict=True), result.labels or d["labels"], strict=True
        ):
            ax.scatter([x], [y], s=46, color=colors.get(label, _GREY), edgecolor="white", lw=0.6, zorder=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8.5)
        ax.set_xlabel(f"PC1 ({100 * evr[0]:.1f}% of variance)" if evr else "PC1")
        if coords.shape[1] > 1:
            ax.set_ylabel(f"PC2 ({100 * evr[1]:.1f}% of variance)" if len(evr) > 1 else "PC2")
        else:
            ax.set_yticks([])
            ax.spines["left"].set_visible(False)
        span = float(np.ptp(coords[:, 0])) or 1.0
        ax.set_xlim(coords[:, 0].min() - 0.15 * span, coords[:, 0].max() + 0.3 * span)
        fig.tight_layout()
        return fig


# ------------------------------------------------------------------------------------------------------------
# Causal tests


@dataclass
class Panel:
    """One heatmap panel: values and their stds (rows x cols), labels, title."""

    title: str
    values: np.ndarray
    stds: np.ndarray
    xlabels: list[str]
    ylabels: list[str]
    ylabel: str


def heatmap_grid(
    grid: list[list[Panel | None]], cbar_label: str, vmin: float = -1, vmax: float = 1
) -> Figure:
    """Diverging heatmaps (RdBu, centred on 0) in a grid, cells annotated ``mean ± std`` when small."""
    nrow, ncol = len(grid), max(len(r) for r in grid)
    cells = [p for row in grid for p in row if p is not None]
    max_cols = max(len(p.xlabels) for p in cells)
    max_rows = max(len(p.ylabels) for p in cells)
    annotate = max_rows <= 12 and max_cols <= 12
    cw = 0.62 if annotate else 0.32
    rh = 0.5 if annotate else 0.2
    with plt.rc_context({**STYLE, "axes.grid": False}):
        fig, axes = plt.subplots(
            nrow,
            ncol,
            figsize=(ncol * (cw * max_cols + 1.2) + 1.4, nrow * (rh * max_rows + 1.5)),
            squeeze=False,
            layout="constrained",
        )
        im = None
        for i in range(nrow):
            for j in range(ncol):
                ax = axes[i, j]
                p = grid[i][j] if j < len(grid[i]) else None
                if p is None:
                    ax.axis("off")
                    continue
                im = ax.imshow(
                    p.values, cmap="RdBu", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest"
                )
                ax.set_xticks(range(len(p.xlabels)), p.xlabels, rotation=40, ha="right")
                step = int(np.ceil(len(p.ylabels) / 16)) if len(p.ylabels) > 16 else 1
                left = grid[i][j - 1] if j > 0 else None
                repeat = (
                    left is not None and left.ylabels == p.ylabels
                )  # the panel to the left names the rows
                ax.set_yticks(range(0, len(p.ylabels), step), [] if repeat else p.ylabels[::step])
                if not repeat:
                    ax.set_ylabel(p.ylabel)
                ax.set_title(p.title)
                if annotate:
                    for a in range(p.values.shape[0]):
                        for b in range(p.values.shape[1]):
                            v, e = p.values[a, b], p.stds[a, b]
                            if np.isfinite(v):
                                text = f"{v:+.2f}" + (f"\n±{e:.2f}" if np.isfinite(e) else "")
                                ink = "white" if abs(v) > 0.6 else "black"
                                ax.text(b, a, text, ha="center", va="center", fontsize=7.2, color=ink)
        if im is not None:
            fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, fraction=0.03, pad=0.01, label=cbar_label)
        return fig


def finetune_curves(
    results: Sequence[InterventionResult], tasks: Sequence[str], models: Sequence[str]
) -> Figure:
    """Overall k-NN decodability per layer for each finetuning condition: a row per task, a column per
    model; dotted: the base model's peak layer (the table's reference layer)."""
    with plt.rc_context(STYLE):
        size = (3.3 * len(models) + 0.4, 2.5 * len(tasks) + 0.4)
        fig, axes = plt.subplots(len(tasks), len(models), figsize=size, squeeze=False, sharey=True)
        for i, task in enumerate(tasks):
            for j, model in enumerate(models):
                ax = axes[i, j]
                got = [r for r in results if r.task == task and r.model == model]
                ax.set_title(f"{model} · {task}")
                if not got:
                    ax.text(0.5, 0.5, "no run", ha="center", va="center", transform=ax.transAxes, color="0.5")
                    ax.set_ylim(0, 1.02)
                    continue
                r = got[0]
                m = r.metrics
                for cond in finetune_conditions(r):
                    sel = m[(m["condition"] == cond) & (m["metric"] == "cd_knn") & (m["concept"] == "all")]
                    sel = sel[sel["layer"].notna()].sort_values("layer")
                    if len(sel):
                        x = sel["layer"].astype(int)
                        ax.plot(x, sel["value"], color=condition_color(cond), lw=1.5, label=cond)
                ref = finetune_ref_layer(r)
                if ref is not None:
                    ax.axvline(ref, color="0.5", lw=0.8, ls=":")
                ax.set_ylim(0, 1.02)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.legend(fontsize=7.5, loc="lower right")
                if i == len(tasks) - 1:
                    ax.set_xlabel("layer (0 = embeddings)")
                if j == 0:
                    ax.set_ylabel("decodability (k-NN)")
        fig.tight_layout()
        return fig
