"""Build the report: collect runs, compute the table and fits, draw figures, write HTML and Markdown.

The HTML file is self-contained (figures embedded as base64 PNG, styles inline, no external reference);
the Markdown summary beside it links the same figures as PNG files in ``figures/``.
"""

from __future__ import annotations

import base64
import html
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from conceptprobe.report import figures as F
from conceptprobe.report.collect import ReportData, ReportError, collect
from conceptprobe.report.embedding import MIN_DIST, N_NEIGHBORS, cache_dir, run_embedding
from conceptprobe.report.stats import (
    KEYS,
    Fit,
    comparison_table,
    concept_points,
    decodability_curves,
    fit,
    peaks,
    pooled_fits,
)

FIGURE_PREFIXES = ("decodability", "cd_vs_acc", "umap", "shots")
SECTIONS = {
    "decodability": "Decodability across layers",
    "cd_vs_acc": "Decodability vs ICL accuracy, per concept",
    "umap": "Peak-layer representations (UMAP)",
    "shots": "Effect of the number of shots",
}

TABLE_NOTE = (
    "Peak layer: the layer of highest overall k-NN decodability (0 = embeddings); peak depth = "
    "peak layer / layers; peak CD: decodability there; ICL acc.: exact-match accuracy over all "
    "prompts; R²: linear fit of per-concept ICL accuracy on per-concept decodability at the peak "
    "layer, with a 95% bootstrap interval over concepts. All numbers are computed from each run's"
    " metrics.parquet."
)
CAPTIONS = {
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


@dataclass
class ReportResult:
    html: Path
    markdown: Path
    figures_dir: Path
    report: Report


# ------------------------------------------------------------------------------------------------------------
# Assembly


def fmt_params(n: float) -> str:
    if not n or np.isnan(n):
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.2f}{unit}" if v < 10 else f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(int(n))


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
    return ReportFigure(
        f"umap_{_slug(task)}", "umap", task, f"{task}: UMAP at the peak layer", caption, F.to_png(fig)
    ), notes


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-") or "x"


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
    table = comparison_table(metrics, data.models, include_null=include_null, n_boot=n_boot, seed=seed)
    pooled = pooled_fits(metrics, include_null=include_null, n_boot=n_boot, seed=seed)
    curves = decodability_curves(metrics)
    peak = peaks(curves)
    points = concept_points(metrics, peak, include_null)
    mcolors = F.model_colors(list(data.models["model"]))
    figures: list[ReportFigure] = []
    notes: list[str] = []
    null_txt = "null included" if include_null else "null excluded (its answer is unpredictable by design)"
    for task in data.tasks:
        models = data.model_order(task)
        shots = data.shots(task)
        concepts = next(r.concepts for r in data.runs if r.task == task)
        ccolors = F.concept_colors(concepts)
        chance = 1.0 / max(len(concepts), 1)
        ks = "/".join(sorted({str(r.config.get("knn_k", "?")) for r in data.runs if r.task == task}))
        tc, tp = curves[curves["task"] == task], peak[peak["task"] == task]
        fig = F.decodability_vs_layer(tc, tp, models, shots, mcolors, chance)
        figures.append(
            ReportFigure(
                f"decodability_{_slug(task)}",
                "decodability",
                task,
                f"{task}: decodability vs layer",
                CAPTIONS["decodability"].format(n=len(concepts), k=ks),
                F.to_png(fig),
            )
        )
        pts = points[points["task"] == task]
        fits: dict[tuple[str, int | str], Fit] = {}
        several = len(shots) > 1
        for m in models:
            for k in shots:
                sel = pts[(pts["model"] == m) & (pts["shots"] == k)]
                if not sel.empty:
                    fits[(m, k)] = fit(sel["cd"].to_numpy(), sel["acc"].to_numpy(), n_boot=n_boot, seed=seed)
            sel = pts[pts["model"] == m]
            if several and sel["shots"].nunique() > 1:
                fits[(m, "pooled")] = fit(
                    sel["cd"].to_numpy(),
                    sel["acc"].to_numpy(),
                    groups=sel["concept"].to_numpy(),
                    n_boot=n_boot,
                    seed=seed,
                )
        fig = F.cd_vs_accuracy(pts, fits, tp, models, shots, ccolors, pooled=several)
        figures.append(
            ReportFigure(
                f"cd_vs_acc_{_slug(task)}",
                "cd_vs_acc",
                task,
                f"{task}: decodability vs ICL accuracy",
                CAPTIONS["cd_vs_acc"].format(n_boot=n_boot, seed=seed, null=null_txt)
                + (CAPTIONS["pooled"] if several else ""),
                F.to_png(fig),
            )
        )
        if umap:
            ufig, unotes = _umap_section(data, task, models, shots, curves, ccolors, seed, cache, log)
            notes += unotes
            if ufig is not None:
                figures.append(ufig)
        if several:
            fig = F.vs_shots(table[table["task"] == task], models, mcolors)
            figures.append(
                ReportFigure(
                    f"shots_{_slug(task)}",
                    "shots",
                    task,
                    f"{task}: accuracy and decodability vs shots",
                    CAPTIONS["shots"],
                    F.to_png(fig),
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
        hint = (
            " Decodability at the ceiling for every concept leaves nothing to explain; --include-null adds "
            "the null concept as a point."
            if (undefined["r2_why"] == "decodability equal for all").any() and not include_null
            else ""
        )
        notes.append(f"R² is n/a where a fit has nothing to explain: {rows}.{hint}")
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
    )


# ------------------------------------------------------------------------------------------------------------
# Table cells shared by both renderings


def _num(v: Any, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _r2_text(row: pd.Series) -> str:
    if np.isnan(row["r2"]):
        return "n/a"
    ci = f" [{row['r2_lo']:.2f}, {row['r2_hi']:.2f}]" if not np.isnan(row["r2_lo"]) else ""
    return f"{row['r2']:.2f}{ci}"


TABLE_COLUMNS = [
    ("model", "model"),
    ("family", "family"),
    ("n_params", "params"),
    ("n_layers", "layers"),
    ("shots", "shots"),
    ("peak_layer", "peak layer"),
    ("peak_rel", "peak depth"),
    ("peak_cd", "peak CD"),
    ("icl_acc", "ICL acc."),
    ("r2", "R² [95% CI]"),
]


def cell_text(col: str, row: pd.Series) -> str:
    v = row[col]
    if col == "n_params":
        return fmt_params(float(v))
    if col in ("peak_rel",):
        return _num(v, 2)
    if col in ("peak_cd", "icl_acc"):
        return _num(v, 3)
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


def _html_table(report: Report, task: str) -> str:
    t = report.table[report.table["task"] == task]
    head = "".join(
        f'<th class="{"l" if c in ("model", "family") else ""}">{html.escape(h)}</th>'
        for c, h in TABLE_COLUMNS
    )
    rows, last = [], None
    for _, row in t.iterrows():
        cells = []
        for col, _h in TABLE_COLUMNS:
            text = html.escape(cell_text(col, row))
            value = row[col]
            attrs = f' data-col="{col}"'
            if isinstance(value, (int, float, np.integer, np.floating)):
                attrs += f' data-value="{float(value)!r}"'
            if col == "r2":
                attrs += f' data-lo="{float(row["r2_lo"])!r}" data-hi="{float(row["r2_hi"])!r}"'
                if row["r2_why"]:
                    attrs += f' title="{html.escape(str(row["r2_why"]))}"'
            cls = []
            if col in ("model", "family"):
                cls.append("l")
            if col in ("peak_cd", "icl_acc") and not np.isnan(value):
                cls.append("bar")
                attrs += f' style="--w:{max(0.0, min(1.0, float(value))) * 100:.1f}%"'
            if col == "model":
                swatch = _hex(report.model_colors[row["model"]])
                text = f'<span class="sw" style="background:{swatch}"></span>{text}'
            if col == "peak_layer":
                text = f"{text} / {int(row['n_layers'])}"
            cells.append(f'<td class="{" ".join(cls)}"{attrs}>{text}</td>')
        first = ' class="first"' if last is not None and row["model"] != last else ""
        last = row["model"]
        rows.append(f"<tr{first}>{''.join(cells)}</tr>")
    return (
        f'<table id="comparison-{html.escape(_slug(task))}" class="comparison" '
        f'data-task="{html.escape(task)}">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


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
        + _html_pooled(report, t)
        for t in tasks
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


def render_markdown(report: Report, figures_rel: str = "figures") -> str:
    """The report as Markdown, linking the figures as ``<figures_rel>/<key>.png``."""
    lines = [f"# {report.title}", "", f"Generated {report.generated}.", ""]
    lines += [f"- **{k}**: {_md_escape(v)}" for k, v in report.facts]
    lines += ["", "## Comparison", ""] if report.data.runs else [""]
    for task in report.data.tasks:
        if len(report.data.tasks) > 1:
            lines += [f"### {task}", ""]
        lines.append("| " + " | ".join(h for _c, h in TABLE_COLUMNS) + " |")
        lines.append(
            "|" + "|".join(":--" if c in ("model", "family") else "--:" for c, _h in TABLE_COLUMNS) + "|"
        )
        for _, row in report.table[report.table["task"] == task].iterrows():
            cells = []
            for col, _h in TABLE_COLUMNS:
                text = cell_text(col, row)
                if col == "peak_layer":
                    text = f"{text} / {int(row['n_layers'])}"
                cells.append(_md_escape(text))
            lines.append("| " + " | ".join(cells) + " |")
        p = report.pooled[report.pooled["task"] == task]
        if not p.empty:
            lines += [
                "",
                "Pooled over shots (R² [95% CI], bootstrap over concepts): "
                + "; ".join(f"{r['model']} {_r2_text(r)}" for _, r in p.iterrows())
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


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename (conceptprobe.store's helper imports torch; this does not)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    keep = {f"{f.key}.png" for f in [*report.figures, *extra_figs]}
    prefixes = (*(f"{s}_" for s in FIGURE_PREFIXES), "icl_", "causal_")
    for old in figures_dir.glob("*.png"):  # figures of an earlier report here that this one no longer has
        if old.name not in keep and old.name.startswith(prefixes):
            old.unlink()
    for f in [*report.figures, *extra_figs]:
        _atomic_write(figures_dir / f"{f.key}.png", f.png)
    md = out.with_suffix(".md")
    _atomic_write(md, render_markdown(report, "figures").encode())
    _atomic_write(out, render_html(report).encode())
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
