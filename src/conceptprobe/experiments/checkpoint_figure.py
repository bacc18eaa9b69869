"""What a checkpoint sweep shows against the training step: the phase summary and the figure.

:func:`phase_summary` describes each summary measure's change over the checkpoints: its first and last
values, the *halfway step* (the first checkpoint at which the measure has moved past the midpoint between
its first and its last value, with the checkpoint before it, each with its interval where it has one) and
the largest change between consecutive checkpoints. :func:`checkpoint_figure` draws prefix matching and
copying per head, the ICL score with its 95% interval band and, when measured, each concept task's accuracy
and decodability, all against the step, with the halfway step of the best head's prefix matching marked in
every panel. Nothing is recomputed: every value is read from the sweep's metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: (task, metric) series the phase summary describes; ``None`` task = any.
PHASE_METRICS = (
    "prefix_matching_max",
    "prefix_matching_top_mean",
    "copying_best_head",
    "copying_top_mean",
    "n_induction_heads",
    "icl_score",
    "icl_accuracy",
    "cd_knn_heldout_peak",
)
HEAD_AXIS = "L<b>H<h>: decoder block b (reads residual layer b, writes b+1), head h"


def _cell(row: Any) -> dict[str, Any]:
    cell: dict[str, Any] = {"step": int(row["step"]), "value": float(row["value"])}
    lo, hi = row.get("ci_low"), row.get("ci_high")
    if lo is not None and lo == lo and hi is not None and hi == hi:
        cell["ci"] = [float(lo), float(hi)]
    return cell


def series(metrics: Any, metric: str, task: str | None = None) -> Any:
    """Rows of one summary measure (one per checkpoint), in step order."""
    sel = metrics[metrics["metric"] == metric]
    if task is not None:
        sel = sel[sel["task"] == task]
    return sel.sort_values("step")


def phase_summary(metrics: Any) -> dict[str, Any]:
    """Per summary measure (``task/metric`` for concept tasks): first, last, halfway step, biggest jump."""
    out: dict[str, Any] = {}
    for metric in PHASE_METRICS:
        for task in sorted(set(metrics.loc[metrics["metric"] == metric, "task"].dropna())) or [None]:
            s = series(metrics, metric, task)
            if len(s) < 2 or s["step"].duplicated().any():
                continue
            rows = [r for _, r in s.iterrows()]
            first, last = float(rows[0]["value"]), float(rows[-1]["value"])
            mid = (first + last) / 2
            up = last >= first
            cross = next(
                (i for i, r in enumerate(rows) if (r["value"] >= mid if up else r["value"] <= mid)), None
            )
            jumps = [float(rows[i + 1]["value"] - rows[i]["value"]) for i in range(len(rows) - 1)]
            j = max(range(len(jumps)), key=lambda i: abs(jumps[i]))
            key = metric if metric in PHASE_METRICS[:6] else f"{task}/{metric}"
            out[key] = {
                "first": _cell(rows[0]),
                "last": _cell(rows[-1]),
                "halfway_step": None if cross is None else int(rows[cross]["step"]),
                "halfway": None
                if cross is None
                else {"before": _cell(rows[max(0, cross - 1)]), "at": _cell(rows[cross])},
                "largest_change": {
                    "from": _cell(rows[j]),
                    "to": _cell(rows[j + 1]),
                    "delta": jumps[j],
                },
            }
    return out


def checkpoint_figure(metrics: Any, record: dict[str, Any]) -> Any:
    """Panels against the step: prefix matching per head, copying per head, ICL score (with its interval
    band) and, per concept task, accuracy and decodability (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from conceptprobe.plotting import STYLE

    cfg = record.get("config") or {}
    tasks = [t for t in dict.fromkeys(series(metrics, "icl_accuracy")["task"].dropna())]
    copy_metric = "copying" if (metrics["metric"] == "copying").any() else "copying_in_context"
    has_copy = (metrics["metric"] == copy_metric).any()
    panels = ["prefix_matching", *([copy_metric] if has_copy else []), "icl_score", *tasks]
    phase = (record.get("phase") or {}).get("prefix_matching_max") or {}
    marker = phase.get("halfway_step")
    threshold = 0.4 if record.get("source") == "train_folder" else float(cfg.get("threshold", 0.4))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            len(panels), 1, figsize=(9.6, 2.3 * len(panels) + 0.7), sharex=True, squeeze=False
        )
        axes = axes[:, 0]
        for ax, panel in zip(axes, panels, strict=True):
            if panel in ("prefix_matching", "copying", "copying_in_context"):
                _head_panel(ax, metrics, panel, threshold)
            elif panel == "icl_score":
                s = series(metrics, "icl_score")
                ax.plot(s["step"], s["value"], color="#d62728", lw=1.6, marker=".", label="ICL score")
                if s["ci_low"].notna().any():
                    ax.fill_between(
                        s["step"], s["ci_low"].astype(float), s["ci_high"].astype(float), color="#d62728",
                        alpha=0.2, lw=0, label="95% bootstrap interval",
                    )  # fmt: skip
                ax.axhline(0, color="black", lw=0.5)
                ax.set_ylabel("ICL score (nats)")
                ax.set_title(
                    "ICL score: loss of a late token minus an early one (negative = learns in context)"
                )
            else:
                for metric, colour, name in (
                    ("icl_accuracy", "#1f77b4", "ICL accuracy (no null)"),
                    ("cd_knn_heldout_peak", "#2ca02c", "k-NN decodability\n(held-out peak layer)"),
                ):
                    s = series(metrics, metric, panel)
                    if not len(s):
                        continue
                    ax.plot(s["step"], s["value"], color=colour, lw=1.5, marker=".", label=name)
                    ax.fill_between(
                        s["step"], s["ci_low"].astype(float), s["ci_high"].astype(float), color=colour,
                        alpha=0.18, lw=0,
                    )  # fmt: skip
                null = series(metrics, "cd_knn_null_p95", panel)
                if len(null):
                    ax.plot(null["step"], null["value"], color="0.5", lw=0.9, ls=":", label="k-NN null p95")
                ax.set_ylabel("accuracy / decodability")
                ax.set_title(
                    f"concept task {panel}, {cfg.get('shots', '?')}-shot (bands: 95% bootstrap intervals)"
                )
                ax.set_ylim(-0.02, 1.02)
            if marker is not None:
                ax.axvline(marker, color="0.3", lw=0.8, ls="--")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if cfg.get("x_scale") == "log":
            steps = sorted(set(metrics["step"].dropna().astype(int)))
            nonzero = [s for s in steps if s > 0]
            axes[-1].set_xscale("symlog", linthresh=max(1, nonzero[0] if nonzero else 1))
        axes[-1].set_xlabel(
            "training step"
            + (
                f"   (dashed: step {marker}, where the best head's prefix matching passes halfway)"
                if marker
                else ""
            )
        )
        ticks = np.asarray(sorted(set(metrics["step"].dropna().astype(int))))
        if len(ticks) <= 12:
            axes[-1].set_xticks(ticks)
        fig.suptitle(f"{record.get('name', 'checkpoints')}: measures against the training step", fontsize=10)
        fig.tight_layout()
    return fig


def _head_panel(ax: Any, metrics: Any, panel: str, threshold: float) -> None:
    """Per-head lines (a colour per block, a shade per head; a grey range band past 16 heads) and the
    best prefix-matching head's line."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    heads = metrics[(metrics["metric"] == panel) & metrics["head"].notna()]
    labels = heads[["layer", "head"]].drop_duplicates().sort_values(["layer", "head"])
    n_heads = int(labels["head"].max()) + 1 if len(labels) else 1
    if len(labels) <= 16:
        for _, lh in labels.iterrows():
            b, h = int(lh["layer"]), int(lh["head"])
            base = to_rgb(plt.get_cmap("tab10")(b % 10))
            shade = 0.55 * h / max(1, n_heads - 1)  # lighter for later heads
            colour = tuple(c + (1 - c) * shade for c in base)
            s = heads[(heads["layer"] == b) & (heads["head"] == h)].sort_values("step")
            ax.plot(s["step"], s["value"], lw=1.1, color=colour, label=f"L{b}H{h}")
    else:
        grid = heads.groupby("step")["value"]
        ax.fill_between(grid.min().index, grid.min(), grid.max(), color="0.85", label="range over heads")
    best = series(metrics, "prefix_matching_max")
    if panel == "prefix_matching":
        ax.plot(best["step"], best["value"], color="black", lw=1.6, ls="--", label="best head")
        ax.axhline(threshold, color="0.4", lw=0.8, ls=":", label=f"threshold {threshold:g}")
        ax.set_ylabel("prefix matching")
        ax.set_ylim(-0.02, 1.02)
    else:
        keys = [(int(r["step"]), int(r["layer"]), int(r["head"])) for _, r in best.iterrows()]
        names = [(panel, "best prefix-\nmatching head", "--")]
        if panel == "copying":
            names.append(("copying_in_context", "that head, in context\n(the trainer's copying)", "-."))
        for metric, name, style in names:
            sel = metrics[(metrics["metric"] == metric) & metrics["head"].notna()]
            cells = sel.set_index(["step", "layer", "head"])["value"]
            got = [(k[0], float(cells[k])) for k in keys if k in cells.index]
            if got:
                ax.plot(*zip(*got, strict=True), color="black", lw=1.5, ls=style, label=name)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("copying" + (" (OV)" if panel == "copying" else " (in context)"))
    what = {
        "prefix_matching": "prefix matching per head",
        "copying": "copying per head (Olsson's OV-circuit eigenvalues)",
        "copying_in_context": "copying per head (in context)",
    }[panel]
    ax.set_title(f"{what}; {HEAD_AXIS}" if panel == "prefix_matching" else f"{what}; heads labelled as above")


def plot_checkpoints(metrics: Any, record: dict[str, Any], path: str | Path) -> None:
    """:func:`checkpoint_figure` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = checkpoint_figure(metrics, record)
    fig.savefig(path, dpi=110)
    plt.close(fig)
