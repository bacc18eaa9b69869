"""Build the report: collect runs, compute the table and fits, draw figures, write HTML and Markdown.

The HTML file is self-contained (figures embedded as base64 PNG, styles inline, no external reference);
the Markdown summary beside it links the same figures as PNG files in ``figures/``.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from conceptprobe.plotting import concept_colors, model_colors, render
from conceptprobe.report import figures as F
from conceptprobe.report.collect import ReportData, ReportError, collect
from conceptprobe.report.embedding import MIN_DIST, N_NEIGHBORS, cache_dir, run_embedding
from conceptprobe.report.stats import (
    KEYS,
    Fit,
    comparison_table,
    decodability_curves,
    guarded_fit,
    layer_controls,
    pair_table,
    pooled_fits,
)
from conceptprobe.report.text import fmt_params
from conceptprobe.store import atomic_write_bytes

FIGURE_PREFIXES = ("decodability", "controls", "concepts", "pairs", "size", "cd_vs_acc", "umap", "shots")
SECTIONS = {
    "controls": "Decodability beside its controls",
    "decodability": "Decodability across layers, models side by side",
    "concepts": "Decodability per concept",
    "pairs": "Concepts that share an answer class",
    "size": "Against model size",
    "cd_vs_acc": "Decodability vs ICL accuracy, per concept",
    "umap": "Peak-layer representations (UMAP)",
    "shots": "Effect of the number of shots",
}

TABLE_NOTE = (
    "Layer: the residual-stream index (0 = embeddings, i = output of decoder block i-1), chosen on one half "
    "of the prompts (held-out peak); CD: leave-one-out k-NN decodability of all concepts (null included) at "
    "that layer on the other half, [95% bootstrap interval over prompts], or mean ± std over seeds when "
    "there are several; null p95: the 95th percentile of CD under shuffled concept labels at that layer; "
    "surface: the strongest model-free reader of the prompt (bag of answer words, of prompt words, or the "
    "task's lexical reader; k-NN or probe); CD − surface: selectivity at the held-out peak with its paired "
    "bootstrap interval; in-sample peak: the max over layers (optimistic); ICL acc.: greedy exact match "
    "without the null concept; R²: per-concept ICL accuracy on per-concept CD, only where both spread "
    "(n = concepts). Every number comes from the runs' metrics.parquet."
)
CAPTIONS = {
    "controls": (
        "Each panel: leave-one-out {k}-NN decodability of all {n} concepts per layer (solid; band: 95% "
        "bootstrap interval over prompts), the logistic probe (dashed), the label-permutation null (grey band "
        "from its mean to its 95th percentile: what the same measure gives when labels carry nothing), and the "
        "strongest surface baseline (black dash-dot line and band: the same classifiers on a model-free reading of "
        "the prompt). The dot marks the held-out peak (layer chosen on half the prompts, value from the other "
        "half). Decodability above the dash-dot line is what the residual stream adds to the prompt's surface."
    ),
    "concepts": (
        "Recall of each concept per layer (leave-one-out k-NN over all concepts); null is grey. Concepts near "
        "the top from the first layers are readable from the prompt's words before the model processes them."
    ),
    "pairs": (
        "Two concepts with the same answer class (first vs last noun, first vs last verb) differ only in "
        "the relation between answer and input, so a reader of the answers' word classes is at chance (0.5) "
        "by construction. Lines: k-NN decodability within the pair per layer and shots; bands: its label-"
        "permutation null; dotted: the strongest surface baseline within the pair."
    ),
    "size": (
        "Decodability at the held-out peak (left, with its 95% interval; dotted: the surface baseline) and "
        "ICL accuracy without null (right, with its 95% interval) against the parameter count, a line per "
        "shots value. Four models are four points: read the trend, not a fit."
    ),
    "decodability": (
        "How well the concept can be read off the residual stream at each layer (leave-one-out "
        "{k}-NN accuracy over all {n} concepts; dotted: chance 1/{n}); dots mark each model's "
        "peak. Plotted by absolute layer (0 = embeddings) and by relative depth (layer / "
        "n_layers), where models of different depth line up."
    ),
    "cd_vs_acc": (
        "Each dot is a concept: its decodability at the peak layer (x) against its ICL accuracy "
        "(y); dashed: least-squares line, R² with a 95% bootstrap interval over concepts "
        "({n_boot} resamples, seed {seed}); {null}."
    ),
    "pooled": (
        " The last column pools all shots (marker = shots; the bootstrap resamples concepts with "
        "all their shots)."
    ),
    "umap": (
        "Each dot is one prompt's residual-stream vector at the token before the answer, at the "
        "layer where decodability peaks (averaged over shots; {layers}), embedded in 2-D by UMAP "
        "(n_neighbors {nn}, min_dist {md}, random_state {seed}) after z-scoring each feature. "
        "Separate colour clusters = concepts the model encodes distinctly; null is grey."
    ),
    "shots": (
        "How ICL accuracy over all prompts (left) and decodability at the peak layer (right) "
        "change with the number of demonstrations in the prompt."
    ),
}


@dataclass
class ReportFigure:
    """One figure: where it goes, what it shows, and its PNG bytes."""

    key: str
    section: str
    task: str
    title: str
    caption: str
    png: bytes
    svg: bytes = b""


@dataclass
class Report:
    """Everything the HTML and Markdown renderings show."""

    data: ReportData
    table: pd.DataFrame
    pooled: pd.DataFrame
    figures: list[ReportFigure]
    facts: list[tuple[str, str]]
    notes: list[str] = field(default_factory=list)
    title: str = "conceptprobe report"
    generated: str = ""
    model_colors: dict[str, tuple] = field(default_factory=dict)
    extras: list[Any] = field(default_factory=list)  # extra_sections.ExtraSection: ICL/heads, causal tests
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # concept pairs sharing an answer class


@dataclass
class ReportResult:
    html: Path
    markdown: Path
    figures_dir: Path
    report: Report


# ------------------------------------------------------------------------------------------------------------
# Assembly


def _join(values: list[Any]) -> str:
    return ", ".join(str(v) for v in values)


def _facts(data: ReportData) -> list[tuple[str, str]]:
    runs = data.runs
    cfgs = [r.config for r in runs]
    tasks = sorted({(r.task, str(r.record["task"].get("version", "?"))) for r in runs})
    models = [
        f"{m} ({fmt_params(p)})" for m, p in zip(data.models["model"], data.models["n_params"], strict=True)
    ]
    created = sorted(str(r.record.get("created", "")) for r in runs if r.record.get("created"))
    updated = sorted(str(r.record.get("updated", "")) for r in runs if r.record.get("updated"))
    dates = (created[0][:10] if created else "?") + " – " + (updated[-1][:10] if updated else "?")
    vers: dict[str, set[str]] = {}
    for r in runs:
        for k, v in (r.record.get("versions") or {}).items():
            vers.setdefault(k, set()).add(str(v))
    shown = [
        f"{k} {'/'.join(sorted(vers[k]))}" for k in ("conceptprobe", "torch", "transformers") if k in vers
    ]
    gits = sorted(
        {
            (g["commit"][:10] + (" (dirty)" if g.get("dirty") else ""))
            for r in runs
            if isinstance(g := r.record.get("git"), dict) and g.get("commit")
        }
    )
    knn = sorted(
        {
            f"k={c.get('knn_k')}, {c.get('knn_metric')}"
            + (", z-scored features" if c.get("standardize", True) else ", raw features")
            for c in cfgs
        }
    )
    positions = sorted({r.position for r in runs})
    facts = [
        (
            "runs",
            f"{len(runs)}"
            + (f" (sweep {_join(sorted({str(s.get('name')) for s in data.sweeps}))})" if data.sweeps else ""),
        ),
        ("models", _join(models)),
        ("tasks", _join([f"{t} v{v}" for t, v in tasks])),
        ("shots", _join(data.shots())),
        ("prompts per concept", _join(sorted({r.n for r in runs}))),
        ("seeds", _join(sorted({r.seed for r in runs}))),
        ("dtype", _join(sorted({str(c.get("dtype")) for c in cfgs}))),
        ("decodability", _join(knn) + "; leave-one-out, all concepts incl. null"),
        ("position", _join(["token before the answer" if p == 0 else f"offset {p}" for p in positions])),
        ("run dates", dates),
        ("versions", _join(shown) or "?"),
    ]
    if gits:
        facts.append(("git", _join(gits)))
    return facts


def _umap_section(
    data: ReportData,
    task: str,
    models: list[str],
    shots: list[int],
    curves: pd.DataFrame,
    ccolors: dict[str, object],
    seed: int,
    cache: Path | None,
    log: Callable[[str], None],
) -> tuple[ReportFigure | None, list[str]]:
    notes: list[str] = []
    embs: dict[tuple[str, int], Any] = {}
    titles: dict[tuple[str, int], str] = {}
    layers: dict[str, int] = {}
    any_emb = False
    for m in models:
        mean = curves[(curves["task"] == task) & (curves["model"] == m)].groupby("layer")["value"].mean()
        if mean.empty:
            continue
        layer = int(mean.index[int(np.argmax(mean.to_numpy()))])
        layers[m] = layer
        for k in shots:
            runs = sorted(
                (r for r in data.runs if r.task == task and r.model == m and r.shots == k),
                key=lambda r: r.seed,
            )
            if not runs:
                continue
            run = runs[0]
            cd = curves[
                (curves["task"] == task)
                & (curves["model"] == m)
                & (curves["shots"] == k)
                & (curves["layer"] == layer)
            ]["value"]
            titles[(m, k)] = f"{k}-shot · layer {layer}" + (f" · CD {cd.iloc[0]:.2f}" if not cd.empty else "")
            t0 = time.perf_counter()
            got = run_embedding(run, layer, seed=seed, cache=cache)
            if got is None:
                embs[(m, k)] = "no activations saved"
                notes.append(f"UMAP skipped for {m} · {task} · {k}-shot: no activations in {run.folder}")
            else:
                embs[(m, k)] = got
                any_emb = True
                log(f"UMAP {task} · {m} · {k}-shot: {len(got[1])} points, {time.perf_counter() - t0:.1f} s")
    if not any_emb:
        return None, notes or [f"UMAP skipped for {task}: no run has activations saved"]
    fig = F.umap_grid(embs, titles, models, shots, ccolors)
    layer_txt = "; ".join(f"{m}: {layers[m]}" for m in models if m in layers)
    caption = CAPTIONS["umap"].format(layers=layer_txt, nn=N_NEIGHBORS, md=MIN_DIST, seed=seed)
    return _figure(
        f"umap_{_slug(task)}", "umap", task, f"{task}: UMAP at the peak layer", caption, fig
    ), notes


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-") or "x"


def _figure(key: str, section: str, task: str, title: str, caption: str, fig: Any) -> ReportFigure:
    png, svg = render(fig)
    return ReportFigure(key, section, task, title, caption, png, svg)


def assemble(
    data: ReportData,
    *,
    umap: bool = True,
    include_null: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
    title: str | None = None,
    cache: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Report:
    """Compute tables and draw every figure for ``data``."""
    log = log or (lambda _msg: None)
    metrics = data.metrics
    table, points = comparison_table(
        metrics, data.models, include_null=include_null, n_boot=n_boot, seed=seed
    )
    pooled = pooled_fits(points, n_boot=n_boot, seed=seed)
    pairs = pair_table(metrics)
    curves = decodability_curves(metrics)
    wide = layer_controls(metrics)
    per_concept = metrics[
        (metrics["metric"] == "cd_knn") & metrics["layer"].notna() & ~metrics["concept"].isin(["all"])
    ]
    per_concept = per_concept[~per_concept["concept"].str.contains("|", regex=False)]
    per_concept = per_concept.groupby(KEYS + ["concept", "layer"], as_index=False)["value"].mean()
    held = table.drop(columns=["peak_layer", "peak_cd"]).assign(
        peak_layer=table["held_layer"],
        peak_cd=table["held_cd"],
        peak_rel=table["held_layer"] / table["n_layers"],
    )
    mcolors = model_colors(list(data.models["model"]))
    figures: list[ReportFigure] = []
    notes: list[str] = []
    null_txt = (
        "null excluded (its answer is unpredictable by design)" if not include_null else "null included"
    )
    for task in data.tasks:
        slug = _slug(task)
        models = data.model_order(task)
        shots = data.shots(task)
        concepts = next(r.concepts for r in data.runs if r.task == task)
        ccolors = concept_colors(concepts)
        chance = 1.0 / max(len(concepts), 1)
        ks = "/".join(sorted({str(r.config.get("knn_k", "?")) for r in data.runs if r.task == task}))
        tt = table[table["task"] == task]
        figures.append(
            _figure(
                f"controls_{slug}",
                "controls",
                task,
                f"{task}: decodability per layer beside its controls",
                CAPTIONS["controls"].format(n=len(concepts), k=ks),
                F.layers_with_controls(wide[wide["task"] == task], tt, models, shots, mcolors),
            )
        )
        tc = curves[curves["task"] == task]
        tp = held[held["task"] == task]
        figures.append(
            _figure(
                f"decodability_{slug}",
                "decodability",
                task,
                f"{task}: decodability vs layer, models side by side",
                CAPTIONS["decodability"].format(n=len(concepts), k=ks),
                F.decodability_vs_layer(tc, tp, models, shots, mcolors, chance),
            )
        )
        figures.append(
            _figure(
                f"concepts_{slug}",
                "concepts",
                task,
                f"{task}: decodability per concept",
                CAPTIONS["concepts"],
                F.concept_curves(per_concept[per_concept["task"] == task], models, shots, ccolors),
            )
        )
        tpairs = pairs[pairs["task"] == task] if not pairs.empty else pairs
        if not tpairs.empty:
            names = sorted(tpairs["pair"].unique())
            wide_pairs = {name: layer_controls(metrics[metrics["task"] == task], name) for name in names}
            figures.append(
                _figure(
                    f"pairs_{slug}",
                    "pairs",
                    task,
                    f"{task}: decodability within concept pairs that share an answer class",
                    CAPTIONS["pairs"],
                    F.pair_curves(wide_pairs, tpairs, models, shots),
                )
            )
        if len(models) > 1:
            figures.append(
                _figure(
                    f"size_{slug}",
                    "size",
                    task,
                    f"{task}: decodability and accuracy against model size",
                    CAPTIONS["size"],
                    F.against_size(tt, models, shots),
                )
            )
        pts = points[points["task"] == task]
        fits: dict[tuple[str, int | str], Fit] = {}
        several = len(shots) > 1
        for m in models:
            for k in shots:
                sel = pts[(pts["model"] == m) & (pts["shots"] == k)]
                if not sel.empty:
                    fits[(m, k)] = guarded_fit(
                        sel["cd"].to_numpy(), sel["acc"].to_numpy(), n_boot=n_boot, seed=seed
                    )
            sel = pts[pts["model"] == m]
            if several and sel["shots"].nunique() > 1:
                fits[(m, "pooled")] = guarded_fit(
                    sel["cd"].to_numpy(),
                    sel["acc"].to_numpy(),
                    groups=sel["concept"].to_numpy(),
                    n_boot=n_boot,
                    seed=seed,
                )
        figures.append(
            _figure(
                f"cd_vs_acc_{slug}",
                "cd_vs_acc",
                task,
                f"{task}: decodability vs ICL accuracy",
                CAPTIONS["cd_vs_acc"].format(n_boot=n_boot, seed=seed, null=null_txt)
                + (CAPTIONS["pooled"] if several else ""),
                F.cd_vs_accuracy(pts, fits, tp, models, shots, ccolors, pooled=several),
            )
        )
        if umap:
            ufig, unotes = _umap_section(data, task, models, shots, curves, ccolors, seed, cache, log)
            notes += unotes
            if ufig is not None:
                figures.append(ufig)
        if several:
            figures.append(
                _figure(
                    f"shots_{slug}",
                    "shots",
                    task,
                    f"{task}: accuracy and decodability vs shots",
                    CAPTIONS["shots"],
                    F.vs_shots(tt, models, mcolors),
                )
            )
    if not umap:
        notes.append("UMAP figures were not drawn (--no-umap).")
    if all(len(data.shots(t)) < 2 for t in data.tasks):
        notes.append("Only one shots value per task: the shots figure and pooled fits are left out.")
    undefined = table[table["r2"].isna()]
    if not undefined.empty:
        rows = "; ".join(
            f"{r.model} · {r.task} · {r.shots}-shot ({r.r2_why})" for r in undefined.itertuples()
        )
        notes.append(f"R² is n/a where a fit has nothing to explain: {rows}.")
    old = sorted({r.folder.name for r in data.runs if not _has_controls(metrics, r.run_id)})
    if old:
        notes.append(
            f"{len(old)} run(s) predate the controls (no intervals, nulls or baselines): {', '.join(old[:5])}"
            + (" ..." if len(old) > 5 else "")
            + "; rerun them to add the controls (measures only, from the saved activations)."
        )
    notes += [f"skipped {s}" for s in data.skipped]
    return Report(
        data=data,
        table=table,
        pooled=pooled,
        figures=figures,
        facts=_facts(data),
        notes=notes,
        title=title or "conceptprobe report",
        generated=time.strftime("%Y-%m-%d %H:%M"),
        model_colors=mcolors,
        pairs=pairs,
    )


def _has_controls(metrics: pd.DataFrame, run_id: int) -> bool:
    m = metrics[metrics["run_id"] == run_id]
    return bool((m["metric"] == "cd_knn_heldout_peak").any())


# ------------------------------------------------------------------------------------------------------------
# Table cells shared by both renderings


def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _r2_text(row: pd.Series) -> str:
    if np.isnan(row["r2"]):
        return "n/a"
    ci = f" [{row['r2_lo']:.2f}, {row['r2_hi']:.2f}]" if not np.isnan(row["r2_lo"]) else ""
    n = row.get("n_concepts", row.get("n_points"))
    return f"{row['r2']:.2f}{ci}" + (f" (n={int(n)})" if n is not None and not pd.isna(n) else "")


def _with_uncertainty(row: pd.Series, col: str, lo: str, hi: str, digits: int = 3, sign: bool = False) -> str:
    """``0.834 [0.81, 0.86]`` for one seed, ``0.834 ± 0.012 (3 seeds)`` for several."""
    v = row.get(col)
    if v is None or pd.isna(v):
        return "–"
    text = f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"
    seeds = int(row.get("seeds", 1) or 1)
    sd = row.get(f"{col}_sd")
    if seeds > 1 and sd is not None and not pd.isna(sd):
        return f"{text} ± {sd:.{digits}f} ({seeds} seeds)"
    a, b = row.get(lo), row.get(hi)
    if a is None or pd.isna(a) or b is None or pd.isna(b):
        return text
    return f"{text} [{a:+.2f}, {b:+.2f}]" if sign else f"{text} [{a:.2f}, {b:.2f}]"


TABLE_COLUMNS = [
    ("model", "model"),
    ("n_params", "params"),
    ("shots", "shots"),
    ("held_layer", "layer (held-out)"),
    ("held_cd", "CD [95% CI]"),
    ("null_p95", "null p95"),
    ("surface", "surface (reader)"),
    ("sel", "CD − surface"),
    ("peak_cd", "in-sample peak"),
    ("icl_acc", "ICL acc. [95% CI]"),
    ("r2", "R² [95% CI]"),
]
PAIR_COLUMNS = [
    ("model", "model"),
    ("shots", "shots"),
    ("pair", "pair"),
    ("held_layer", "layer"),
    ("held_cd", "CD [95% CI]"),
    ("null_p95", "null p95"),
    ("wordclass", "word-class reader"),
    ("surface", "surface (reader)"),
    ("sel", "CD − surface"),
    ("held_n", "n"),
]


def cell_text(col: str, row: pd.Series) -> str:
    v = row.get(col)
    if col == "n_params":
        return fmt_params(float(v))
    if col == "held_layer":
        if v is None or pd.isna(v):
            return "–"
        layers = sorted(set(row.get("held_layers") or []))
        spread = f" ({min(layers)}–{max(layers)})" if len(layers) > 1 else ""
        return f"{int(v)} / {int(row['n_layers'])}{spread}" if "n_layers" in row else f"{int(v)}{spread}"
    if col == "held_cd":
        return _with_uncertainty(row, "held_cd", "held_lo", "held_hi")
    if col == "sel":
        return _with_uncertainty(row, "sel", "sel_lo", "sel_hi", sign=True)
    if col == "icl_acc":
        return _with_uncertainty(row, "icl_acc", "icl_lo", "icl_hi")
    if col == "surface":
        if v is None or pd.isna(v):
            return "–"
        return f"{v:.3f} ({row.get('surface_reader', '?')})"
    if col in ("null_p95", "peak_cd", "wordclass", "peak_rel"):
        return _num(v, 3 if col != "peak_rel" else 2)
    if col == "held_n":
        return "–" if v is None or pd.isna(v) else str(int(v))
    if col == "r2":
        return _r2_text(row)
    return str(v)


# ------------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { --ink:#1d2330; --mute:#5b6474; --line:#e3e7ee; --bg:#f6f7f9; --acc:#3b6fb6; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1240px; margin:0 auto; padding:24px 28px 48px; }
header { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px 14px; }
h1 { margin:0 0 4px; font-size:22px; letter-spacing:-.01em; }
.sub { color:var(--mute); margin:0 0 12px; }
.facts { display:grid; grid-template-columns:repeat(auto-fill,minmax(270px,1fr)); gap:6px 20px; margin:0; }
.facts div { display:flex; gap:8px; min-width:0; }
.facts dt { color:var(--mute); white-space:nowrap; }
.facts dd { margin:0; font-weight:500; overflow-wrap:anywhere; }
nav { margin:14px 0 0; display:flex; flex-wrap:wrap; gap:8px; }
nav a { color:var(--acc); text-decoration:none; border:1px solid var(--line); border-radius:999px;
  padding:2px 10px; font-size:13px; background:#fafbfc; }
section { margin-top:22px; }
h2 { font-size:17px; margin:0 0 10px; }
h3 { font-size:14px; margin:16px 0 6px; color:var(--mute); font-weight:600; text-transform:uppercase;
  letter-spacing:.04em; }
.card { background:#fff; border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { padding:5px 10px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th { font-size:12px; color:var(--mute); font-weight:600; background:#fafbfc; }
td.l, th.l { text-align:left; }
tr.first td { border-top:2px solid var(--line); }
.sw { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px;
  vertical-align:-1px; }
td.bar { background-repeat:no-repeat; background-size:var(--w) 70%; background-position:right center;
  background-image:linear-gradient(rgba(59,111,182,.18),rgba(59,111,182,.18)); }
figure { margin:0 0 18px; background:#fff; border:1px solid var(--line); border-radius:10px;
  padding:12px 14px; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption { color:var(--mute); font-size:13px; margin-top:8px; }
.ftitle { font-weight:600; margin:0 0 6px; }
ul.notes { color:var(--mute); font-size:13px; padding-left:18px; }
.muted { color:var(--mute); font-size:13px; }
"""


def _hex(color: Any) -> str:
    from matplotlib.colors import to_hex

    return to_hex(color)


def _html_rows(
    frame: pd.DataFrame, columns: list[tuple[str, str]], report: Report, bars: tuple[str, ...]
) -> str:
    rows, last = [], None
    for _, row in frame.iterrows():
        cells = []
        for col, _h in columns:
            text = html.escape(cell_text(col, row))
            value = row.get(col)
            attrs = f' data-col="{col}"'
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                attrs += f' data-value="{float(value)!r}"'
            if col == "r2":
                attrs += f' data-lo="{float(row["r2_lo"])!r}" data-hi="{float(row["r2_hi"])!r}"'
                if row.get("r2_why"):
                    attrs += f' title="{html.escape(str(row["r2_why"]))}"'
            cls = []
            if col in ("model", "family", "pair"):
                cls.append("l")
            if col in bars and value is not None and not pd.isna(value):
                cls.append("bar")
                attrs += f' style="--w:{max(0.0, min(1.0, float(value))) * 100:.1f}%"'
            if col == "model" and row["model"] in report.model_colors:
                swatch = _hex(report.model_colors[row["model"]])
                text = f'<span class="sw" style="background:{swatch}"></span>{text}'
            cells.append(f'<td class="{" ".join(cls)}"{attrs}>{text}</td>')
        first = ' class="first"' if last is not None and row["model"] != last else ""
        last = row["model"]
        rows.append(f"<tr{first}>{''.join(cells)}</tr>")
    return "".join(rows)


def _html_head(columns: list[tuple[str, str]]) -> str:
    return "".join(
        f'<th class="{"l" if c in ("model", "family", "pair") else ""}">{html.escape(h)}</th>'
        for c, h in columns
    )


def _html_table(report: Report, task: str) -> str:
    t = report.table[report.table["task"] == task]
    return (
        f'<table id="comparison-{html.escape(_slug(task))}" class="comparison" '
        f'data-task="{html.escape(task)}">'
        f"<thead><tr>{_html_head(TABLE_COLUMNS)}</tr></thead>"
        f"<tbody>{_html_rows(t, TABLE_COLUMNS, report, ('held_cd', 'icl_acc'))}</tbody></table>"
    )


def _html_pairs(report: Report, task: str) -> str:
    p = report.pairs[report.pairs["task"] == task] if not report.pairs.empty else report.pairs
    if p.empty:
        return ""
    return (
        '<p class="muted" style="margin:12px 0 4px">Within pairs of concepts that share an answer class '
        "(chance 0.5; the word-class reader is at chance by construction):</p>"
        f'<table class="pairs" data-task="{html.escape(task)}">'
        f"<thead><tr>{_html_head(PAIR_COLUMNS)}</tr></thead>"
        f"<tbody>{_html_rows(p, PAIR_COLUMNS, report, ('held_cd',))}</tbody></table>"
    )


def _models_rows(report: Report) -> list[tuple[str, str, str, str]]:
    """(model, weights, params, layers) of every model, the weights named with tuning and quantization."""
    from conceptprobe.models.packaged import weights_label

    out = []
    for _, r in report.data.models.iterrows():
        alias = next(
            (run.model_info.get("alias") for run in report.data.runs if run.model == r["model"]), None
        )
        ref = str(r.get("ref") or "")
        weights = weights_label(alias) or (
            f"GGUF file {Path(ref).name}, dequantized" if ref.endswith(".gguf") else ref
        )
        out.append((str(r["model"]), weights, fmt_params(float(r["n_params"])), str(r["n_layers"])))
    return out


def _html_pooled(report: Report, task: str) -> str:
    p = report.pooled[report.pooled["task"] == task]
    if p.empty:
        return ""
    rows = "".join(
        f'<tr><td class="l">{html.escape(r["model"])}</td><td>{html.escape(_join(r["shots"]))}</td>'
        f"<td>{int(r['n_concepts'])}</td><td>{html.escape(_r2_text(r))}</td></tr>"
        for _, r in p.iterrows()
    )
    return (
        '<p class="muted" style="margin:10px 0 4px">Pooled over shots (each concept at each shots value '
        'is a point; the bootstrap resamples concepts):</p><table class="pooled" style="width:auto">'
        '<thead><tr><th class="l">model</th><th>shots</th><th>concepts</th><th>R² [95% CI]</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page."""
    facts = "".join(f"<div><dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd></div>" for k, v in report.facts)
    present = [s for s in SECTIONS if any(f.section == s for f in report.figures)]
    nav = "".join(
        f'<a href="#{s}">{html.escape(SECTIONS[s])}</a>' for s in ["table", *present] if s != "table"
    )
    nav = ('<a href="#table">Comparison table</a>' if report.data.runs else "") + nav
    nav += "".join(f'<a href="#{x.id}">{html.escape(x.title)}</a>' for x in report.extras)
    tasks = report.data.tasks
    tables = "".join(
        (f"<h3>{html.escape(t)}</h3>" if len(tasks) > 1 else "")
        + _html_table(report, t)
        + _html_pairs(report, t)
        + _html_pooled(report, t)
        for t in tasks
    )
    model_rows = "".join(
        f'<tr><td class="l">{html.escape(m)}</td><td class="l">{html.escape(w)}</td><td>{p}</td><td>{n}</td></tr>'
        for m, w, p, n in (_models_rows(report) if report.data.runs else [])
    )
    models_table = (
        '<table class="models" style="width:auto"><thead><tr><th class="l">model</th><th class="l">weights</th>'
        f"<th>params</th><th>layers</th></tr></thead><tbody>{model_rows}</tbody></table>"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style></head><body><main>",
        f"<header><h1>{html.escape(report.title)}</h1>",
        f'<p class="sub">Concept decodability and in-context-learning accuracy across models · generated '
        f"{html.escape(report.generated)}</p>",
        f'<dl class="facts">{facts}</dl><nav>{nav}</nav></header>',
    ]
    if report.data.runs:
        parts += [
            '<section id="table"><h2>Comparison</h2><div class="card">',
            models_table,
            tables,
            f'<p class="muted" style="margin:10px 0 0">{html.escape(TABLE_NOTE)}</p></div></section>',
        ]
    for s in present:
        parts.append(f'<section id="{s}"><h2>{html.escape(SECTIONS[s])}</h2>')
        for f in (f for f in report.figures if f.section == s):
            b64 = base64.b64encode(f.png).decode("ascii")
            parts.append(
                f'<figure id="fig-{html.escape(f.key)}"><div class="ftitle">{html.escape(f.title)}</div>'
                f'<img src="data:image/png;base64,{b64}" '
                f'alt="{html.escape(f.title)}"><figcaption>{html.escape(f.caption)}</figcaption></figure>'
            )
        parts.append("</section>")
    if report.extras:
        from conceptprobe.report.extra_sections import section_html

        parts += [section_html(x) for x in report.extras]
    if report.notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
        parts.append(f'<section id="notes"><h2>Notes</h2><ul class="notes">{items}</ul></section>')
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------
# Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(frame: pd.DataFrame, columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(h for _c, h in columns) + " |"]
    lines.append(
        "|" + "|".join(":--" if c in ("model", "family", "pair") else "--:" for c, _h in columns) + "|"
    )
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_md_escape(cell_text(col, row)) for col, _h in columns) + " |")
    return lines


def render_markdown(report: Report, figures_rel: str = "figures") -> str:
    """The report as Markdown, linking the figures as ``<figures_rel>/<key>.png``."""
    lines = [f"# {report.title}", "", f"Generated {report.generated}.", ""]
    lines += [f"- **{k}**: {_md_escape(v)}" for k, v in report.facts]
    lines += ["", "## Comparison", ""] if report.data.runs else [""]
    if report.data.runs:
        lines += ["| model | weights | params | layers |", "|:--|:--|--:|--:|"]
        lines += [f"| {m} | {_md_escape(w)} | {p} | {n} |" for m, w, p, n in _models_rows(report)]
        lines.append("")
    for task in report.data.tasks:
        if len(report.data.tasks) > 1:
            lines += [f"### {task}", ""]
        lines += _md_table(report.table[report.table["task"] == task], TABLE_COLUMNS)
        pairs = report.pairs[report.pairs["task"] == task] if not report.pairs.empty else report.pairs
        if not pairs.empty:
            lines += ["", "Within pairs of concepts that share an answer class (chance 0.5):", ""]
            lines += _md_table(pairs, PAIR_COLUMNS)
        p = report.pooled[report.pooled["task"] == task]
        if not p.empty:
            lines += [
                "",
                "Pooled over shots (R² [95% CI], bootstrap over concepts): "
                + "; ".join(
                    f"{r['model']} {_r2_text(r) if not np.isnan(r['r2']) else 'n/a (' + r['r2_why'] + ')'}"
                    for _, r in p.iterrows()
                )
                + ".",
            ]
        lines.append("")
    if report.data.runs:
        lines += [
            TABLE_NOTE,
            "",
        ]
    for s, name in SECTIONS.items():
        figs = [f for f in report.figures if f.section == s]
        if not figs:
            continue
        lines += [f"## {name}", ""]
        for f in figs:
            lines += [f"![{f.title}]({figures_rel}/{f.key}.png)", "", f"*{f.caption}*", ""]
    if report.extras:
        from conceptprobe.report.extra_sections import section_markdown

        for x in report.extras:
            lines += section_markdown(x, figures_rel)
    if report.notes:
        lines += ["## Notes", ""] + [f"- {_md_escape(n)}" for n in report.notes] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Entry point


def _no_runs() -> ReportData:
    """The probe-run data of a report built from extra results only."""
    return ReportData(runs=[], metrics=pd.DataFrame(), models=pd.DataFrame(columns=["model", "n_params"]))


def build_report(
    paths: list[str | Path],
    out: str | Path,
    *,
    umap: bool = True,
    include_null: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
    title: str | None = None,
    cache: Path | None | bool = True,
    log: Callable[[str], None] | None = None,
) -> ReportResult:
    """Collect runs under ``paths``; write ``out`` (HTML), its ``.md`` twin and ``figures/`` beside it.

    Besides probe runs, ``paths`` may hold (or be) ICL-score, induction-heads, token-loss-PCA, patching and
    finetuning result folders: each kind found adds its section (:mod:`.extra_sections`); a report of those
    alone has no comparison table."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportError(
            f"--out {out} should name an .html file (the Markdown summary is written beside it)"
        )
    if out.is_dir():
        raise ReportError(
            f"--out {out} is a folder; name the .html file to write, e.g. {out / 'report.html'}"
        )
    from conceptprobe.report.extras import split_paths

    probe_paths, extras = split_paths(paths)
    data = collect(probe_paths) if probe_paths else _no_runs()
    cache_path = cache_dir() if cache is True else (cache or None)
    if data.runs:
        report = assemble(
            data,
            umap=umap,
            include_null=include_null,
            n_boot=n_boot,
            seed=seed,
            title=title,
            cache=cache_path,
            log=log,
        )
    else:
        report = Report(
            data=data,
            table=pd.DataFrame(),
            pooled=pd.DataFrame(),
            figures=[],
            facts=[],
            title=title or "conceptprobe report",
            generated=time.strftime("%Y-%m-%d %H:%M"),
        )
    if extras:
        from conceptprobe.report.extra_sections import build_sections, extra_facts

        report.extras = build_sections(extras, report.model_colors)
        report.facts = (
            report.facts + [("other results", extras.summary())] if data.runs else extra_facts(extras)
        )
        report.notes += [f"skipped {s}" for s in extras.skipped]
    figures_dir = out.parent / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    extra_figs = [f for x in report.extras for f in x.figures]
    keep = {f"{f.key}.png" for f in [*report.figures, *extra_figs]} | {f"{f.key}.svg" for f in report.figures}
    from conceptprobe.report.extra_sections import FIGURE_PREFIXES as EXTRA_PREFIXES

    prefixes = (*(f"{s}_" for s in FIGURE_PREFIXES), *EXTRA_PREFIXES)
    for old in [
        *figures_dir.glob("*.png"),
        *figures_dir.glob("*.svg"),
    ]:  # figures of an earlier report here that this one no longer has
        if old.name not in keep and old.name.startswith(prefixes):
            old.unlink()
    for f in [*report.figures, *extra_figs]:
        atomic_write_bytes(figures_dir / f"{f.key}.png", f.png)
        if getattr(f, "svg", b""):
            atomic_write_bytes(figures_dir / f"{f.key}.svg", f.svg)
    md = out.with_suffix(".md")
    atomic_write_bytes(md, render_markdown(report, "figures").encode())
    atomic_write_bytes(out, render_html(report).encode())
    return ReportResult(out, md, figures_dir, report)


__all__ = [
    "KEYS",
    "Report",
    "ReportFigure",
    "ReportResult",
    "assemble",
    "build_report",
    "render_html",
    "render_markdown",
]
