"""The training report: coupled emergence of concept loss and decodability; the induction phase change.

``build_training_report(folder)`` reads a training folder (``train.json``, ``metrics.parquet``,
``train_log.csv``, ``tracking/`` and ``controls/``) and writes ``report.html`` (self-contained, figures as
base64 PNG), ``report.md`` (linking ``figures/*.png``) and ``analysis.json`` (every number the text
quotes). UMAP coordinates and the per-token-loss PCA are computed from ``tracking/*.safetensors`` and
kept in ``umap.parquet`` / ``token_loss_pca.json``, so the report can be rebuilt where the (ignored)
safetensors files are absent.

**Transitions.** For a series ``v`` over checkpoints (loss: negated), ``lo`` = median of its first three
points (losses: the value at the end of the warmup, when the initial fit is over), ``hi`` = median of its last three; a
transition needs ``hi - lo >= min_amp``; ``mid`` is the first step reaching ``lo + (hi - lo) / 2``,
``start`` the last step before it still within 10% of ``lo``, ``end`` the first step after it within 10%
of ``hi``. The phase change of the induction run is the transition of the largest prefix-matching score in the
last layer (``start`` .. ``end`` as above), provided that score reaches 0.4.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

THRESHOLD = 0.4
FIG_DIR = "figures"


@dataclass
class RunData:
    """One training folder's results."""

    folder: Path
    info: dict[str, Any]
    metrics: pd.DataFrame
    log: pd.DataFrame
    controls: dict[str, RunData] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        return self.info["config"]

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def steps(self) -> list[int]:
        return sorted(int(s) for s in self.metrics["step"].unique())

    @property
    def loss_metric(self) -> str:
        """``loss_rel`` (MSE / mean y^2) where tracked, else ``loss``."""
        return "loss_rel" if (self.metrics["metric"] == "loss_rel").any() else "loss"

    def series(
        self,
        metric: str,
        concept: str = "all",
        layer: int | None = None,
        head: int | None = None,
        position: int | None = None,
    ) -> pd.Series:
        """``value`` by ``step`` of one measure."""
        m = self.metrics
        sel = (m["metric"] == metric) & (m["concept"] == concept)
        sel &= m["layer"].isna() if layer is None else (m["layer"] == layer)
        if head is not None:
            sel &= m["head"] == head
        if position is not None:
            sel &= m["position"] == position
        return m[sel].groupby("step")["value"].mean().sort_index()


def load_run(folder: str | Path) -> RunData:
    """Read a training folder (and its controls)."""
    folder = Path(folder)
    info_path = folder / "train.json"
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a training folder (no train.json); run `conceptprobe train`"
        )
    info = json.loads(info_path.read_text())
    metrics = pd.read_parquet(folder / "metrics.parquet")
    log = pd.read_csv(folder / "train_log.csv") if (folder / "train_log.csv").is_file() else pd.DataFrame()
    controls = {}
    for sub in sorted((folder / "controls").glob("*/train.json")) if (folder / "controls").is_dir() else []:
        controls[sub.parent.name] = load_run(sub.parent)
    return RunData(folder, info, metrics, log, controls)


# ---------------------------------------------------------------- analysis


def transition(
    steps: list[int] | np.ndarray,
    values: list[float] | np.ndarray,
    rising: bool,
    min_amp: float,
    smooth_start: bool = True,
) -> dict[str, Any] | None:
    """Start, middle and end steps of the main rise (or fall) of a series; None if it barely moves.

    ``smooth_start=False`` takes the first value as the starting level (smooth series such as losses).
    """
    s = np.asarray(steps)
    v = np.asarray(values, dtype=float) * (1.0 if rising else -1.0)
    if len(v) < 4:
        return None
    lo = float(np.median(v[:3])) if smooth_start else float(v[0])
    hi = float(np.median(v[-3:]))
    amp = hi - lo
    if amp < min_amp:
        return None
    reached = np.flatnonzero(v >= lo + 0.5 * amp)
    if not len(reached):
        return None
    mid = int(reached[0])
    before = np.flatnonzero(v[: mid + 1] <= lo + 0.1 * amp)
    start = int(before[-1]) if len(before) else 0
    after = np.flatnonzero(v[mid:] >= lo + 0.9 * amp)
    end = mid + int(after[0]) if len(after) else len(v) - 1
    sign = 1.0 if rising else -1.0
    return {
        "start": int(s[start]),
        "mid": int(s[mid]),
        "end": int(s[end]),
        "from": sign * lo,
        "to": sign * hi,
    }


def _fit_step(run: RunData) -> int:
    """First checkpoint at or after the warmup (the initial fit, from random outputs to about the prior's
    mean prediction, is over by then)."""
    target = int(run.config.get("warmup", 0))
    later = [s for s in run.steps if s >= target]
    return later[0] if later else run.steps[0]


def concept_analysis(run: RunData) -> dict[str, Any]:
    """Per concept: the loss drop, the decodability rise at the chosen layer, and how they line up."""
    track = run.config["tracking"]
    m = run.metrics
    knn_all = m[(m["metric"] == "cd_knn") & (m["concept"] == "all") & (m["position"] == 0)]
    final = knn_all[knn_all["step"] == run.steps[-1]].set_index("layer")["value"].sort_index()
    layer = int(final.idxmax()) if track.get("umap_layer", "auto") == "auto" else int(track["umap_layer"])
    concepts = [c for c in run.metrics[run.metrics["metric"] == "loss"]["concept"].unique() if c != "all"]
    out_metric = run.loss_metric
    n_classes = len(
        run.metrics[(run.metrics["metric"] == "cd_knn") & (run.metrics["concept"] != "all")][
            "concept"
        ].unique()
    )
    chance = 1.0 / max(1, n_classes)
    fit = _fit_step(run)
    out: dict[str, Any] = {
        "layer": layer,
        "chance": chance,
        "fit_step": fit,
        "loss_metric": run.loss_metric,
        "concepts": {},
    }
    for c in concepts:
        loss = run.series(out_metric, c)
        cd = run.series("cd_knn", c, layer, position=0)
        probe = run.series("probe_accuracy", c, layer, position=0)
        ctx = run.series("cd_knn", c, layer, position=-1)
        after = loss[loss.index >= fit]
        drop = transition(after.index, after.values, rising=False, min_amp=0.1, smooth_start=False)
        rise = transition(cd.index, cd.values, rising=True, min_amp=0.15)
        common = loss.index.intersection(cd.index)
        common = common[common >= fit]
        corr = (
            float(np.corrcoef(loss[common], cd[common])[0, 1])
            if len(common) > 2 and loss[common].std() > 0 and cd[common].std() > 0
            else float("nan")
        )
        together = None
        if drop and rise:
            overlap = min(drop["end"], rise["end"]) - max(drop["start"], rise["start"])
            together = overlap >= 0
        out["concepts"][c] = {
            "loss_start": float(loss.iloc[0]),
            "loss_fit": float(after.iloc[0]) if len(after) else float("nan"),
            "loss_final": float(loss.iloc[-1]),
            "cd_start": float(cd.iloc[0]),
            "cd_final": float(cd.iloc[-1]),
            "probe_final": float(probe.iloc[-1]) if len(probe) else float("nan"),
            "cd_context_final": float(ctx.iloc[-1]) if len(ctx) else float("nan"),
            "drop": drop,
            "rise": rise,
            "corr_loss_cd": corr,
            "coupled": together,
        }
    overall = run.series("cd_knn", "all", layer, position=0)
    out["cd_all_start"], out["cd_all_final"] = float(overall.iloc[0]), float(overall.iloc[-1])
    out["final_cd_by_layer"] = [float(v) for v in final.values]
    return out


def phase_change(run: RunData) -> dict[str, Any]:
    """Prefix matching of the last layer's best head over training, the ICL score, and the phase change."""
    pm = run.metrics[run.metrics["metric"] == "prefix_matching"]
    n_layers = int(pm["layer"].max()) + 1
    last = pm[pm["layer"] == n_layers - 1]
    best = last.groupby("step")["value"].max().sort_index()
    icl = run.series("icl_score")
    steps = list(best.index)
    out: dict[str, Any] = {
        "n_layers": n_layers,
        "max_prefix_matching": float(pm["value"].max()),
        "max_prefix_matching_last_layer": float(best.max()),
        "icl_start": float(icl.iloc[0]),
        "icl_final": float(icl.iloc[-1]),
        "final_max_prefix_matching_by_layer": [
            float(pm[(pm["layer"] == la) & (pm["step"] == steps[-1])]["value"].max())
            for la in range(n_layers)
        ],
    }
    out["phase_change"] = None
    rise = transition(steps, best.values, rising=True, min_amp=0.2)
    hit = [s for s in steps if best[s] >= THRESHOLD]
    if rise and hit:
        start, end = rise["start"], max(rise["end"], hit[0])
        head_row = last[last["step"] == hit[0]].sort_values("value").iloc[-1]
        total = float(icl.iloc[0] - icl.iloc[-1])
        within = float(icl[start] - icl[end]) if start in icl.index and end in icl.index else float("nan")
        out["phase_change"] = {
            "start": int(start),
            "end": int(end),
            "width": int(end - start),
            "crosses_threshold_at": int(hit[0]),
            "head": int(head_row["head"]),
            "layer": n_layers - 1,
            "pm_start": float(best[start]),
            "pm_end": float(best[end]),
            "icl_before": float(icl[start]),
            "icl_after": float(icl[end]),
            "icl_share_in_window": within / total if total else float("nan"),
        }
    cp = run.metrics[(run.metrics["metric"] == "copying") & (run.metrics["step"] == steps[-1])]
    cp = cp[cp["layer"] == n_layers - 1].sort_values("head")
    out["final_copying_last_layer"] = [float(v) for v in cp["value"]]
    out["icl_transition"] = transition(icl.index, icl.values, rising=False, min_amp=0.1)
    return out


def _tracking_file(run: RunData, step: int) -> Path:
    return run.folder / "tracking" / f"step_{step:07d}.safetensors"


def snapshot_steps(run: RunData, analysis: dict[str, Any], n: int) -> list[int]:
    """Steps for the UMAP snapshots: before, during and after each concept's loss drop (at most ``n``)."""
    steps = run.steps
    wanted: list[int] = []
    for info in analysis["concepts"].values():
        if info["drop"]:
            wanted += [info["drop"]["start"], info["drop"]["mid"], info["drop"]["end"]]
    if not wanted:
        idx = np.unique(np.round(np.geomspace(1, len(steps), min(n, len(steps)))).astype(int) - 1)
        return [steps[i] for i in idx]
    wanted = sorted(set(wanted) | {steps[0], steps[-1]})
    if len(wanted) > n:
        keep = np.unique(np.round(np.linspace(0, len(wanted) - 1, n)).astype(int))
        wanted = [wanted[i] for i in keep]
    return wanted


def compute_umaps(run: RunData, layer: int, steps: list[int], seed: int = 0) -> pd.DataFrame | None:
    """UMAP coordinates of the tracked representations at ``layer`` for ``steps`` (None if not tracked)."""
    from safetensors.torch import load_file

    from conceptprobe.measures.embedding import umap_2d

    frames = []
    names = None
    for step in steps:
        path = _tracking_file(run, step)
        if not path.is_file():
            return None
        t = load_file(str(path))
        x = t["reps"][layer].float().numpy()
        concept = t["concept"].numpy()
        if names is None:
            n_bases = int(run.config["data"].get("n_bases", 4))
            names = [f"basis{i}" for i in range(n_bases)]
        labels = [names[c] if c >= 0 else "null" for c in concept]
        xy = umap_2d(x, seed=seed)
        frames.append(
            pd.DataFrame(
                {
                    "step": step,
                    "layer": layer,
                    "index": np.arange(len(x)),
                    "concept": labels,
                    "x": xy[:, 0],
                    "y": xy[:, 1],
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else None


def compute_token_loss_pca(run: RunData, n_labels: int = 8) -> dict[str, Any] | None:
    """PCA of the per-token loss vectors across checkpoints (:func:`token_loss_pca`), steps as labels."""
    from safetensors.torch import load_file

    from conceptprobe.measures.token_loss import TokenLosses, token_loss_pca

    runs = []
    steps = [s for s in run.steps if _tracking_file(run, s).is_file()]
    if len(steps) < 3:
        return None
    show = set(np.unique(np.round(np.geomspace(1, len(steps), n_labels)).astype(int) - 1).tolist())
    pc = phase_change(run).get("phase_change")
    for i, step in enumerate(steps):
        t = load_file(str(_tracking_file(run, step)))
        losses = t["token_losses"].float().numpy()
        label = str(step) if i in show or (pc and step in (pc["start"], pc["end"])) else ""
        runs.append(
            TokenLosses(
                folder=_tracking_file(run, step),
                label=label,
                losses=losses,
                input_ids=t["input_ids"].numpy(),
                n_prefix=1,
                doc_ids=[f"eval#{j}" for j in range(len(losses))],
            )
        )
    result = token_loss_pca(runs, n_components=2)
    result["steps"] = steps
    result.pop("folders", None)
    return result


# ---------------------------------------------------------------- figures


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from conceptprobe.plotting import STYLE

    plt.rcParams.update(STYLE)
    return plt


def _shade(ax: Any, window: dict[str, Any] | None, color: Any, alpha: float = 0.12) -> None:
    if window:
        ax.axvspan(window["start"], window["end"], color=color, alpha=alpha, lw=0)
        ax.axvline(window["mid"], color=color, lw=0.8, ls=":")


def fig_coupled(run: RunData, analysis: dict[str, Any]) -> bytes:
    """One panel per concept: its loss and its decodability (k-NN and probe) on the same axis."""
    from conceptprobe.plotting import concept_colors, to_png

    plt = _plt()
    concepts = list(analysis["concepts"])
    colors = concept_colors(concepts)
    layer, chance = analysis["layer"], analysis["chance"]
    n = len(concepts)
    cols = min(n, 2 if n <= 4 else 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.0 * rows), sharex=True, squeeze=False)
    ymax = 1.05
    metric = run.loss_metric
    label = "loss (MSE / mean y²)" if metric == "loss_rel" else "loss (MSE)"
    for c in concepts:
        ymax = max(ymax, float(run.series(metric, c).max()) * 1.05)
    for ax, c in zip(axes.flat, concepts, strict=False):
        col = colors[c]
        loss = run.series(metric, c)
        cd = run.series("cd_knn", c, layer, position=0)
        probe = run.series("probe_accuracy", c, layer, position=0)
        loss, cd, probe = (x[x.index > 0] for x in (loss, cd, probe))  # log axis: step 0 left out
        ax.plot(loss.index, loss.values, "-", color=col, lw=1.8, label=label)
        ax.plot(cd.index, cd.values, "o-", color="black", ms=2.5, lw=1.1, label=f"k-NN CD, layer {layer}")
        if len(probe):
            ax.plot(probe.index, probe.values, "--", color="grey", lw=1.0, label=f"probe, layer {layer}")
        ctx = run.series("cd_knn", c, layer, position=-1)
        ctx = ctx[ctx.index > 0]
        if len(ctx):
            ax.plot(
                ctx.index,
                ctx.values,
                ":",
                color="tab:purple",
                lw=1.1,
                label=f"k-NN CD, layer {layer}, last y token",
            )
        ax.axhline(chance, color="grey", lw=0.7, ls=":")
        info = analysis["concepts"][c]
        _shade(ax, info["drop"], col, 0.15)
        _shade(ax, info["rise"], "black", 0.06)
        ax.set_ylim(0, ymax)
        ax.set_xscale("log")
        ax.set_title(
            f"{c}: loss {info['loss_fit']:.2f} -> {info['loss_final']:.2f}, CD {info['cd_start']:.2f} -> {info['cd_final']:.2f}"
        )
        ax.set_xlabel("training step (log scale)")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 1.02))
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return to_png(fig)


def fig_all_concepts(run: RunData, analysis: dict[str, Any]) -> bytes:
    """All concepts' losses and decodabilities in one panel (colour = concept)."""
    from conceptprobe.plotting import concept_colors, to_png

    plt = _plt()
    concepts = list(analysis["concepts"])
    colors = concept_colors(concepts)
    layer = analysis["layer"]
    fig, ax = plt.subplots(figsize=(7.6, 3.8))
    for c in concepts:
        loss = run.series(run.loss_metric, c)
        cd = run.series("cd_knn", c, layer, position=0)
        ax.plot(loss.index, loss.values, "-", color=colors[c], lw=1.8, label=f"{c} loss")
        ax.plot(cd.index, cd.values, "--", color=colors[c], lw=1.2, label=f"{c} CD")
    ax.axhline(analysis["chance"], color="grey", lw=0.7, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel(("loss (MSE / mean y²)" if run.loss_metric == "loss_rel" else "loss (MSE)") + " / k-NN CD")
    ax.legend(ncol=len(concepts), fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    fig.tight_layout()
    return to_png(fig)


def fig_layers(run: RunData, metric: str = "cd_knn", position: int = 0) -> bytes:
    """Overall decodability per layer (rows) and checkpoint (columns)."""
    from conceptprobe.plotting import to_png

    plt = _plt()
    m = run.metrics
    m = m[(m["metric"] == metric) & (m["concept"] == "all") & (m["position"] == position)]
    grid = m.pivot_table(index="layer", columns="step", values="value").sort_index()
    fig, ax = plt.subplots(figsize=(8.0, 0.32 * len(grid) + 1.6))
    im = ax.imshow(
        grid.values, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
    )
    steps = list(grid.columns)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(10, len(steps))).round().astype(int))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], rotation=45, ha="right")
    ax.set_yticks(range(len(grid)), [str(int(v)) for v in grid.index])
    ax.set_xlabel("checkpoint step (columns in order; not to scale)")
    ax.set_ylabel("layer (0 = embeddings)")
    ax.grid(False)
    fig.colorbar(im, ax=ax, fraction=0.04, label="k-NN CD" if metric == "cd_knn" else "probe accuracy")
    fig.tight_layout()
    return to_png(fig)


def fig_umap(umaps: pd.DataFrame, run: RunData, analysis: dict[str, Any]) -> bytes:
    from conceptprobe.plotting import concept_colors, to_png

    plt = _plt()
    steps = sorted(umaps["step"].unique())
    concepts = list(dict.fromkeys(umaps["concept"]))
    colors = concept_colors(concepts)
    cols = min(len(steps), 4)
    rows = math.ceil(len(steps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.0 * rows), squeeze=False)
    layer = int(umaps["layer"].iloc[0])
    for ax, step in zip(axes.flat, steps, strict=False):
        sub = umaps[umaps["step"] == step]
        for c in concepts:
            pts = sub[sub["concept"] == c]
            ax.scatter(pts["x"], pts["y"], s=5, color=colors[c], label=c, alpha=0.8, lw=0)
        loss = run.metrics[
            (run.metrics["metric"] == "loss")
            & (run.metrics["concept"] == "all")
            & (run.metrics["step"] == step)
        ]["value"]
        cd = run.series("cd_knn", "all", layer, position=0)
        ax.set_title(f"step {step}: loss {float(loss.iloc[0]):.2f}, CD {float(cd.get(step, np.nan)):.2f}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    for ax in axes.flat[len(steps) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", ncol=len(concepts), bbox_to_anchor=(0.5, 1.03), markerscale=2.5
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return to_png(fig)


def fig_train_loss(run: RunData, ylabel: str) -> bytes:
    from conceptprobe.plotting import to_png

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    if not run.log.empty:
        ax.plot(run.log["step"], run.log["loss"], lw=1.0, label=run.config["name"])
    for name, ctrl in run.controls.items():
        if not ctrl.log.empty:
            ax.plot(ctrl.log["step"], ctrl.log["loss"], lw=1.0, ls="--", label=f"control: {name}")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    return to_png(fig)


def fig_phase_change(run: RunData, pc: dict[str, Any]) -> bytes:
    """Prefix matching per head (last layer) and the ICL score over training, the phase change shaded."""
    from conceptprobe.plotting import to_png

    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.6, 6.0), sharex=True)
    pm = run.metrics[run.metrics["metric"] == "prefix_matching"]
    n_layers = pc["n_layers"]
    cmap = plt.get_cmap("tab10")
    for layer in range(n_layers):
        sub = pm[pm["layer"] == layer]
        for head in sorted(sub["head"].unique()):
            s = sub[sub["head"] == head].set_index("step")["value"].sort_index()
            ax.plot(s.index, s.values, lw=0.8, alpha=0.55, color=cmap(layer))
        best = sub.groupby("step")["value"].max().sort_index()
        ax.plot(best.index, best.values, lw=2.0, color=cmap(layer), label=f"layer {layer + 1}: best head")
    for name, ctrl in run.controls.items():
        cpm = (
            ctrl.metrics[ctrl.metrics["metric"] == "prefix_matching"]
            .groupby("step")["value"]
            .max()
            .sort_index()
        )
        ax.plot(cpm.index, cpm.values, lw=1.6, ls="--", color="black", label=f"control {name}: best head")
    ax.axhline(THRESHOLD, color="grey", ls=":", lw=0.8)
    ax.set_ylabel("prefix-matching score")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    icl = run.series("icl_score")
    lo, hi = run.series("icl_score_ci_low"), run.series("icl_score_ci_high")
    ax2.plot(icl.index, icl.values, "o-", ms=2.5, color="tab:red", label=f"ICL score ({run.config['name']})")
    ax2.fill_between(
        icl.index, lo.reindex(icl.index), hi.reindex(icl.index), color="tab:red", alpha=0.15, lw=0
    )
    for name, ctrl in run.controls.items():
        ci = ctrl.series("icl_score")
        ax2.plot(ci.index, ci.values, "--", color="black", lw=1.2, label=f"control {name}")
    ax2.axhline(0, color="grey", lw=0.6)
    ax2.set_ylabel("ICL score (nats; < 0 = later tokens easier)")
    ax2.set_xlabel("training step")
    ax2.legend(fontsize=8)
    if pc["phase_change"]:
        for a in (ax, ax2):
            a.axvspan(pc["phase_change"]["start"], pc["phase_change"]["end"], color="gold", alpha=0.3, lw=0)
    fig.tight_layout()
    return to_png(fig)


def fig_losses_induction(run: RunData) -> bytes:
    from conceptprobe.plotting import to_png

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.6, 3.0))
    for metric, label, style in (("loss_copy", "repeated tokens", "-"), ("loss_fresh", "fresh tokens", "--")):
        concept = "copy" if metric == "loss_copy" else "fresh"
        s = run.series(metric, concept)
        ax.plot(s.index, s.values, style, color="tab:blue", label=f"{run.config['name']}: {label}")
        for name, ctrl in run.controls.items():
            c = ctrl.series(metric, concept)
            ax.plot(c.index, c.values, style, color="black", lw=1.0, label=f"control {name}: {label}")
    ax.set_xlabel("training step")
    ax.set_ylabel("eval loss (nats)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return to_png(fig)


def fig_heads(run: RunData, metric: str = "prefix_matching") -> bytes:
    """Final prefix matching (or copying) per layer and head, via measures.induction.plot_heatmap."""
    import tempfile

    from conceptprobe.measures.induction import plot_heatmap

    m = run.metrics
    sel = m[(m["metric"] == metric) & (m["step"] == run.steps[-1])]
    grid = sel.pivot_table(index="layer", columns="head", values="value").sort_index()
    pm = m[(m["metric"] == "prefix_matching") & (m["step"] == run.steps[-1])]
    pm_grid = pm.pivot_table(index="layer", columns="head", values="value").sort_index()
    marks = [(int(r), int(c)) for r, c in zip(*np.nonzero(pm_grid.values >= THRESHOLD), strict=True)]
    lo = 0.0 if metric == "prefix_matching" else -1.0
    title = f"{metric.replace('_', ' ')} at step {run.steps[-1]} (red: prefix matching >= {THRESHOLD})"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "heads.png"
        plot_heatmap(grid.values, path, title, lo, 1.0, cmap="viridis" if lo == 0 else "RdBu_r", marks=marks)
        return path.read_bytes()


def fig_token_loss_pca(result: dict[str, Any]) -> bytes:
    import tempfile

    from conceptprobe.measures.token_loss import plot_token_loss_pca

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pca.png"
        plot_token_loss_pca(result, path, trajectory=True)
        return path.read_bytes()


# ---------------------------------------------------------------- page


@dataclass
class Figure:
    key: str
    title: str
    caption: str
    png: bytes


_CSS = """
:root { --ink:#1d2330; --mute:#5b6474; --line:#e3e7ee; --bg:#f6f7f9; --acc:#3b6fb6; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1180px; margin:0 auto; padding:24px 28px 48px; }
header, .card, figure { background:#fff; border:1px solid var(--line); border-radius:10px; }
header { padding:18px 22px 14px; }
h1 { margin:0 0 4px; font-size:22px; }
h2 { font-size:17px; margin:22px 0 10px; }
.sub, .muted, figcaption { color:var(--mute); }
.facts { display:grid; grid-template-columns:repeat(auto-fill,minmax(270px,1fr)); gap:6px 20px; margin:10px 0 0; }
.facts div { display:flex; gap:8px; } .facts dt { color:var(--mute); white-space:nowrap; } .facts dd { margin:0; }
.card { padding:14px 16px; }
ul.find li { margin:4px 0; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { padding:5px 10px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { font-size:12px; color:var(--mute); background:#fafbfc; } td.l, th.l { text-align:left; }
figure { margin:0 0 18px; padding:12px 14px; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption { font-size:13px; margin-top:8px; }
.ftitle { font-weight:600; margin:0 0 6px; }
"""


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _window(w: dict[str, Any] | None) -> str:
    return "none" if not w else f"{w['start']}–{w['end']} (mid {w['mid']})"


def _concept_table(analysis: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = [
        "concept",
        "loss after fit",
        "final loss",
        "loss drop (steps)",
        "CD start",
        "final CD",
        "CD rise (steps)",
        "final probe",
        "final CD, last y",
        "corr(loss, CD)",
        "together",
    ]
    rows = []
    for c, i in analysis["concepts"].items():
        rows.append(
            [
                c,
                _fmt(i["loss_fit"]),
                _fmt(i["loss_final"]),
                _window(i["drop"]),
                _fmt(i["cd_start"], 2),
                _fmt(i["cd_final"], 2),
                _window(i["rise"]),
                _fmt(i["probe_final"], 2),
                _fmt(i.get("cd_context_final"), 2),
                _fmt(i["corr_loss_cd"], 2),
                {True: "yes", False: "no", None: "–"}[i["coupled"]],
            ]
        )
    return head, rows


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>' for i, h in enumerate(head))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"l" if i == 0 else ""}">{html.escape(v)}</td>' for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(":--" if i == 0 else "--:" for i in range(len(head))) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _facts(run: RunData) -> list[tuple[str, str]]:
    cfg = run.config
    info = run.info
    m = cfg["model"]
    timing = info.get("timings", {})
    facts = [
        ("run", cfg["name"]),
        ("task", f"{cfg['task']} {json.dumps(cfg['data'])}"),
        (
            "model",
            f"{m.get('arch', 'gpt2')}, {m.get('n_layer')} layers, {m.get('n_head')} heads, width {m.get('d_model')}"
            + (", attention-only" if m.get("attention_only") else "")
            + f" ({info.get('n_params', 0):,} parameters)",
        ),
        (
            "training",
            f"{cfg['steps']} steps, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} ({cfg['schedule']}, warmup {cfg['warmup']}), seed {cfg['seed']}",
        ),
        ("checkpoints", f"{len(run.steps)} tracked (every {cfg['checkpoints']['every']} + log-spaced)"),
        ("device", f"{info.get('device')} · {info.get('threads')} thread(s)"),
        ("time", _time_text(timing)),
    ]
    for name, ctrl in run.controls.items():
        cm = ctrl.config["model"]
        t = ctrl.info.get("timings")
        facts.append(
            (
                f"control {name}",
                f"{cm.get('n_layer')} layer(s), otherwise the same" + (f"; {_time_text(t)}" if t else ""),
            )
        )
    return facts


def _time_text(timing: dict[str, Any] | None) -> str:
    """Wall (and CPU, where recorded) seconds of training plus tracking."""
    if not timing:
        return "–"
    text = f"{timing.get('train_and_track_s', float('nan')):.0f} s wall"
    if timing.get("cpu_s_this_process") is not None:
        text += f", {timing['cpu_s_this_process']:.0f} s CPU"
    return text + " (training + tracking)"


def _concept_findings(analysis: dict[str, Any]) -> list[str]:
    out = []
    layer = analysis["layer"]
    for c, i in analysis["concepts"].items():
        if i["drop"] and i["rise"]:
            rel = "at the same time (windows overlap)" if i["coupled"] else "but not in overlapping windows"
            out.append(
                f"{c}: loss fell {i['drop']['from']:.2f} -> {i['drop']['to']:.2f} over steps "
                f"{i['drop']['start']}–{i['drop']['end']} while its k-NN decodability at layer {layer} rose "
                f"{i['rise']['from']:.2f} -> {i['rise']['to']:.2f} over steps {i['rise']['start']}–{i['rise']['end']}, {rel}; "
                f"correlation of the two curves {i['corr_loss_cd']:.2f}."
            )
        elif i["drop"]:
            out.append(
                f"{c}: loss fell {i['drop']['from']:.2f} -> {i['drop']['to']:.2f} (steps {_window(i['drop'])}) with no clear decodability rise at layer {layer}."
            )
        elif i["rise"]:
            out.append(
                f"{c}: decodability rose (steps {_window(i['rise'])}) without a clear loss drop after the initial fit."
            )
        else:
            out.append(
                f"{c}: no clear loss drop after the initial fit and no clear decodability rise (loss {i['loss_fit']:.2f} -> {i['loss_final']:.2f})."
            )
    by_layer = analysis["final_cd_by_layer"]
    out.append(
        "Final overall k-NN decodability by layer (0 = embeddings): "
        + ", ".join(f"{v:.2f}" for v in by_layer)
        + f"; chance {analysis['chance']:.2f}."
    )
    return out


def _induction_findings(pc: dict[str, Any], controls: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    p = pc["phase_change"]
    if p:
        out.append(
            f"Phase change: the best head of layer {p['layer'] + 1} (head {p['head']} when it crossed {THRESHOLD} at "
            f"step {p['crosses_threshold_at']}) went from prefix matching {p['pm_start']:.2f} at step {p['start']} "
            f"to {p['pm_end']:.2f} at step {p['end']} ({p['width']} steps); "
            f"over the same window the ICL score went {p['icl_before']:+.2f} -> {p['icl_after']:+.2f} nats "
            f"({100 * p['icl_share_in_window']:.0f}% of its total change {pc['icl_start']:+.2f} -> {pc['icl_final']:+.2f})."
        )
    else:
        out.append(
            f"No head of the last layer reached prefix matching {THRESHOLD} (best {pc['max_prefix_matching_last_layer']:.2f})."
        )
    if pc.get("final_copying_last_layer"):
        cp = pc["final_copying_last_layer"]
        out.append(
            f"Copying scores of the last layer's heads at the end: {', '.join(f'{v:.2f}' for v in cp)}."
        )
    out.append(
        "Final best prefix matching per layer: "
        + ", ".join(f"layer {i + 1} {v:.2f}" for i, v in enumerate(pc["final_max_prefix_matching_by_layer"]))
        + "."
    )
    for name, c in controls.items():
        out.append(
            f"Control {name} ({c['n_layers']} layer(s)): best prefix matching of any head at any checkpoint "
            f"{c['max_prefix_matching']:.2f}; ICL score {c['icl_start']:+.2f} -> {c['icl_final']:+.2f} nats"
            + (
                " — no induction head."
                if c["max_prefix_matching"] < THRESHOLD
                else " — an induction-like head formed."
            )
        )
    return out


CAPTIONS = {
    "coupled": (
        "Each panel is one concept (basis). Coloured line: the model's loss on that concept's evaluation "
        "sequences, MSE over all {K} predictions divided by their mean y² (1 = no better than predicting 0). Black: the concept's k-NN decodability (recall of "
        "leave-one-out {k}-NN, z-scored features) of the residual stream at the last x token at layer {layer}; "
        "grey dashed: the logistic probe's held-out recall; dotted: chance {chance:.2f}. Shaded: the loss drop "
        "(colour) and the decodability rise (grey), vertical dotted lines at their midpoints; purple dotted: k-NN "
        "decodability at the y token before the last x token. Log step axis (step 0 left out)."
    ),
    "all": "All concepts on one axis: solid = loss, dashed = k-NN decodability at layer {layer}.",
    "layers": (
        "Overall k-NN decodability of the concept at every layer (rows; 0 = embeddings, l = output of block l) "
        "and checkpoint (columns, in order)."
    ),
    "probe_layers": "The same for the 5-fold logistic probe.",
    "layers_context": (
        "The same at the y token before the last x token (position -1): it sees the whole context but not the "
        "query input, whose random coordinates dominate the last x token's representation."
    ),
    "umap": (
        "UMAP (n_neighbors 15, min_dist 0.1, z-scored features, seed 0) of the residual stream at the last x "
        "token at layer {layer}, at checkpoints before, during and after the loss drops; colour = concept."
    ),
    "train_loss": "Training loss (mean over the logged interval).",
    "phase": (
        "Top: prefix-matching score of every head (thin) and of the best head per layer (thick) on {n} "
        "sequences of {L} random tokens repeated 4 times after BOS; dotted: {thr}. Bottom: ICL score = loss of "
        "token {late} minus token {early} (Olsson's 500 and 50 of 512, scaled to {T} tokens), with its 95% "
        "bootstrap interval over {ctx} evaluation sequences. Yellow: the phase change. Dashed black: the control."
    ),
    "losses": "Evaluation loss on tokens an induction head can predict (continuations of a repeat) and on the rest.",
    "heads": "Prefix matching per head at the last checkpoint (layer index from 0).",
    "copying": (
        "Copying score per head at the last checkpoint (measures.induction: the head's OV circuit read through "
        "the unembedding raises the attended token, +1, or lowers it, -1); induction heads copy."
    ),
    "pca": (
        "Per-token loss vectors ({np} tokens of {nc} evaluation sequences) at every checkpoint, projected on "
        "their first two principal components (measures.token_loss.token_loss_pca); the line joins "
        "checkpoints in order, labels are steps."
    ),
}


def build_training_report(
    folder: str | Path, log: Callable[[str], None] | None = None, umap: bool = True
) -> Path:
    """Analyse a training folder and write ``report.html``, ``report.md``, ``analysis.json`` and figures."""
    from conceptprobe.store import atomic_write_bytes, atomic_write_text

    say = log or (lambda _m: None)
    run = load_run(folder)
    folder = run.folder
    cfg = run.config
    figures: list[Figure] = []
    findings: list[str] = []
    tables: list[tuple[list[str], list[list[str]]]] = []
    analysis: dict[str, Any] = {"task": run.task, "steps": run.steps}
    track = cfg["tracking"]
    if run.task == "sparse_regression":
        ca = concept_analysis(run)
        analysis["concepts"] = ca
        layer = ca["layer"]
        fmt = {
            "K": cfg["data"].get("n_examples", 20),
            "k": track["knn_k"],
            "layer": layer,
            "chance": ca["chance"],
        }
        figures.append(
            Figure(
                "coupled",
                "Loss and decodability per concept",
                CAPTIONS["coupled"].format(**fmt),
                fig_coupled(run, ca),
            )
        )
        figures.append(
            Figure(
                "all_concepts",
                "All concepts together",
                CAPTIONS["all"].format(**fmt),
                fig_all_concepts(run, ca),
            )
        )
        figures.append(
            Figure(
                "layers", "Decodability per layer over training (k-NN)", CAPTIONS["layers"], fig_layers(run)
            )
        )
        if (run.metrics["position"] == -1).any():
            figures.append(
                Figure(
                    "layers_context",
                    "Decodability per layer over training at the last y token (k-NN)",
                    CAPTIONS["layers_context"],
                    fig_layers(run, position=-1),
                )
            )
        if (run.metrics["metric"] == "probe_accuracy").any():
            figures.append(
                Figure(
                    "probe_layers",
                    "Decodability per layer over training (probe)",
                    CAPTIONS["probe_layers"],
                    fig_layers(run, "probe_accuracy"),
                )
            )
        umap_path = folder / "umap.parquet"
        umaps = None
        if umap:
            steps = snapshot_steps(run, ca, int(track.get("umap_snapshots", 6)))
            say(f"UMAP at layer {layer} for steps {steps}")
            umaps = compute_umaps(run, layer, steps)
            if umaps is not None:
                from conceptprobe.store import atomic_write_parquet

                atomic_write_parquet(umap_path, umaps)
        if umaps is None and umap_path.is_file():
            umaps = pd.read_parquet(umap_path)
        if umaps is not None:
            analysis["umap_steps"] = sorted(int(s) for s in umaps["step"].unique())
            figures.append(
                Figure(
                    "umap",
                    f"Representations at layer {int(umaps['layer'].iloc[0])} during training (UMAP)",
                    CAPTIONS["umap"].format(layer=int(umaps["layer"].iloc[0])),
                    fig_umap(umaps, run, ca),
                )
            )
        figures.append(
            Figure("train_loss", "Training loss", CAPTIONS["train_loss"], fig_train_loss(run, "MSE"))
        )
        findings = _concept_findings(ca)
        tables.append(_concept_table(ca))
    else:
        pc = phase_change(run)
        analysis["induction"] = pc
        controls = {name: phase_change(ctrl) for name, ctrl in run.controls.items()}
        analysis["controls"] = controls
        from conceptprobe.training.tracking import icl_positions

        T = int(cfg["data"].get("seq_len", 64))
        early, late = icl_positions(T)
        fmt = {
            "n": track["head_seqs"],
            "L": min(25, T // 4),
            "thr": THRESHOLD,
            "late": late,
            "early": early,
            "T": T,
            "ctx": track["n_contexts"],
        }
        figures.append(
            Figure(
                "phase",
                "Induction heads and the ICL score over training",
                CAPTIONS["phase"].format(**fmt),
                fig_phase_change(run, pc),
            )
        )
        figures.append(
            Figure(
                "losses", "Loss on repeated and fresh tokens", CAPTIONS["losses"], fig_losses_induction(run)
            )
        )
        figures.append(
            Figure("heads", "Prefix matching per head, last checkpoint", CAPTIONS["heads"], fig_heads(run))
        )
        if (run.metrics["metric"] == "copying").any():
            figures.append(
                Figure(
                    "copying",
                    "Copying score per head, last checkpoint",
                    CAPTIONS["copying"],
                    fig_heads(run, "copying"),
                )
            )
        pca_path = folder / "token_loss_pca.json"
        pca = compute_token_loss_pca(run)
        if pca is not None:
            atomic_write_text(pca_path, json.dumps(pca, indent=1) + "\n")
        elif pca_path.is_file():
            pca = json.loads(pca_path.read_text())
        if pca is not None:
            figures.append(
                Figure(
                    "token_loss_pca",
                    "Per-token loss vectors across checkpoints (PCA)",
                    CAPTIONS["pca"].format(np=pca["n_positions"], nc=pca["n_contexts"]),
                    fig_token_loss_pca(pca),
                )
            )
            analysis["token_loss_pca"] = {"explained_variance_ratio": pca["explained_variance_ratio"]}
        figures.append(
            Figure(
                "train_loss",
                "Training loss",
                CAPTIONS["train_loss"],
                fig_train_loss(run, "cross-entropy (nats)"),
            )
        )
        findings = _induction_findings(pc, controls)
    analysis["findings"] = findings
    atomic_write_text(folder / "analysis.json", json.dumps(analysis, indent=2, default=_json_default) + "\n")
    for f in figures:
        atomic_write_bytes(folder / FIG_DIR / f"{f.key}.png", f.png)
    title = f"conceptprobe training report: {cfg['name']}"
    generated = time.strftime("%Y-%m-%d %H:%M")
    atomic_write_text(folder / "report.html", _render_html(title, generated, run, findings, tables, figures))
    atomic_write_text(folder / "report.md", _render_md(title, generated, run, findings, tables, figures))
    return folder / "report.html"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    return str(o)


def _render_html(
    title: str, generated: str, run: RunData, findings: list[str], tables: list[Any], figures: list[Figure]
) -> str:
    facts = "".join(f"<div><dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd></div>" for k, v in _facts(run))
    desc = run.config.get("description", "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
        f'<header><h1>{html.escape(title)}</h1><p class="sub">{html.escape(desc)} · generated {html.escape(generated)}</p>',
        f'<dl class="facts">{facts}</dl></header>',
        '<h2>What the run shows</h2><div class="card"><ul class="find">',
        "".join(f"<li>{html.escape(f)}</li>" for f in findings),
        "</ul>",
        "".join(_html_table(h, r) for h, r in tables),
        "</div>",
    ]
    for f in figures:
        b64 = base64.b64encode(f.png).decode("ascii")
        parts.append(
            f'<h2 id="{f.key}">{html.escape(f.title)}</h2><figure><img src="data:image/png;base64,{b64}" '
            f'alt="{html.escape(f.title)}"><figcaption>{html.escape(f.caption)}</figcaption></figure>'
        )
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _render_md(
    title: str, generated: str, run: RunData, findings: list[str], tables: list[Any], figures: list[Figure]
) -> str:
    lines = [f"# {title}", "", f"{run.config.get('description', '')} Generated {generated}.", ""]
    lines += [f"- **{k}**: {v}" for k, v in _facts(run)]
    lines += ["", "## What the run shows", ""] + [f"- {f}" for f in findings] + [""]
    for head, rows in tables:
        lines += _md_table(head, rows) + [""]
    for f in figures:
        lines += [f"## {f.title}", "", f"![{f.title}]({FIG_DIR}/{f.key}.png)", "", f"*{f.caption}*", ""]
    return "\n".join(lines)
