"""The report's extra sections: ICL score and induction heads; causal tests (patching, finetuning, head
ablation); checkpoint sweeps (measures against the training step).

:func:`build_sections` turns what :func:`conceptprobe.report.extras.find_extras` found into sections of
headings, tables and figures; :func:`section_html` and :func:`section_markdown` render one. Every number in a
table is a value of an ``icl.json``, ``heads.json``, ``token_loss_pca.json``, ``ablation.json``,
``checkpoints.json`` or ``metrics.parquet``, shown
rounded; the exact value rides along in the cell's ``data-value``.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import conceptprobe.report.extra_figures as XF
from conceptprobe.plotting import to_png
from conceptprobe.report.extras import (
    PATCH_CONDITIONS,
    AblationResult,
    CheckpointsResult,
    Extras,
    InterventionResult,
    finetune_conditions,
    finetune_ref_layer,
    finetune_row,
    patch_concepts,
    patch_layers,
    patch_value,
)
from conceptprobe.report.text import fmt_params

SECTION_TITLES = {
    "icl": "In-context learning score and induction heads",
    "causal": "Causal tests",
    "checkpoints": "Training checkpoints",
}
FIGURE_PREFIXES = ("icl_", "causal_", "checkpoints_")
TOP_HEADS = 5
COND_LABEL = {"positive": "positive (own)", "negative": "negative (null)", "cross": "cross (other B)"}


@dataclass
class Cell:
    text: str
    value: float | None = None
    attrs: dict[str, str] = field(default_factory=dict)
    html: str | None = None  # rich HTML in place of the escaped text (e.g. a colour swatch)


@dataclass
class Table:
    cls: str
    columns: list[tuple[str, str]]  # (key, header)
    rows: list[dict[str, Cell]]
    row_attrs: list[dict[str, str]] = field(default_factory=list)
    left: tuple[str, ...] = ("model",)
    attrs: dict[str, str] = field(default_factory=dict)
    collapse: str | None = None  # summary line of a <details> that holds a long table


@dataclass
class ExtraFigure:
    key: str
    title: str
    caption: str
    png: bytes


@dataclass
class Text:
    kind: str  # "h3" | "h4" | "p"
    text: str


@dataclass
class ExtraSection:
    id: str
    title: str
    blocks: list[Table | ExtraFigure | Text]

    @property
    def figures(self) -> list[ExtraFigure]:
        return [b for b in self.blocks if isinstance(b, ExtraFigure)]


# ------------------------------------------------------------------------------------------------------------
# Cell helpers


def _f(v: Any, digits: int = 3, sign: bool = False) -> str:
    if v is None or not np.isfinite(float(v)):
        return "–"
    return f"{float(v):+.{digits}f}" if sign else f"{float(v):.{digits}f}"


def _num(v: Any, digits: int = 3, sign: bool = False, **attrs: str) -> Cell:
    value = None if v is None else float(v)
    return Cell(_f(value, digits, sign), value, dict(attrs))


def _ci(d: dict[str, Any] | None, digits: int = 3) -> Cell:
    if not d or d.get("score") is None:
        return Cell("–")
    lo, hi = d.get("ci_low"), d.get("ci_high")
    text = _f(d["score"], digits, sign=True)
    attrs = {}
    if lo is not None and hi is not None:
        text += f" [{_f(lo, digits, sign=True)}, {_f(hi, digits, sign=True)}]"
        attrs = {"data-lo": repr(float(lo)), "data-hi": repr(float(hi))}
    return Cell(text, float(d["score"]), attrs)


def _pm(mean: float, std: float, sign: bool = True) -> Cell:
    if not np.isfinite(mean):
        return Cell("–")
    text = _f(mean, 2, sign) + (f" ± {std:.2f}" if np.isfinite(std) else "")
    return Cell(text, mean, {"data-std": repr(std)} if np.isfinite(std) else {})


def _model_cell(model: str, colors: dict[str, tuple]) -> Cell:
    from matplotlib.colors import to_hex

    swatch = f'<span class="sw" style="background:{to_hex(colors[model])}"></span>' if model in colors else ""
    return Cell(model, html=swatch + html.escape(model))


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0–2, 5``."""
    out: list[str] = []
    for v in sorted(layers):
        if out and out[-1].split("–")[-1] == str(v - 1):
            out[-1] = out[-1].split("–")[0] + f"–{v}"
        else:
            out.append(str(v))
    return ", ".join(out)


def _same(values: list[Any]) -> Any:
    return values[0] if values and all(v == values[0] for v in values) else None


# ------------------------------------------------------------------------------------------------------------
# ICL score and induction heads


def _icl_section(ex: Extras, colors: dict[str, tuple]) -> ExtraSection:
    blocks: list[Table | ExtraFigure | Text] = []
    icl = {r.model: r for r in ex.icl}
    heads = {r.model: r for r in ex.heads}
    models = [m for m in ex.models() if m in icl or m in heads]
    if models:
        early = _same([int(r.data.get("early", -1)) for r in ex.icl])
        late = _same([int(r.data.get("late", -1)) for r in ex.icl])
        window = _same([int((r.windowed or {}).get("window", -1)) for r in ex.icl])
        thr = _same([r.threshold for r in ex.heads])
        columns = [
            ("model", "model"),
            ("n_params", "params"),
            ("icl_score", "ICL score [95% CI]"),
            ("icl_window", f"windowed ±{window} [95% CI]" if window and window > 0 else "windowed [95% CI]"),
            ("loss_early", f"loss @ token {early}" if early is not None else "loss early"),
            ("loss_late", f"loss @ token {late}" if late is not None else "loss late"),
            ("n_contexts", "contexts"),
            ("shape", "layers × heads"),
            ("n_above", f"heads ≥ {thr:g}" if thr is not None else "heads ≥ threshold"),
        ]
        drop = (
            {"icl_score", "icl_window", "loss_early", "loss_late", "n_contexts"} if not ex.icl else set()
        ) | ({"shape", "n_above"} if not ex.heads else set())
        columns = [c for c in columns if c[0] not in drop]
        rows = []
        for m in models:
            r, h = icl.get(m), heads.get(m)
            n_params = (r or h).n_params  # type: ignore[union-attr]
            row = {
                "model": _model_cell(m, colors),
                "n_params": Cell(fmt_params(n_params), float(n_params)),
                "icl_score": _ci(r.data) if r else Cell("–"),
                "icl_window": _ci(r.windowed) if r else Cell("–"),
                "loss_early": _num(r.data.get("mean_loss_early")) if r else Cell("–"),
                "loss_late": _num(r.data.get("mean_loss_late")) if r else Cell("–"),
                "n_contexts": Cell(
                    str(r.data.get("n_contexts", "?")), float(r.data.get("n_contexts", np.nan))
                )
                if r
                else Cell("–"),
                "shape": Cell(f"{h.data['n_layers']} × {h.data['n_heads']}") if h else Cell("–"),
                "n_above": Cell(str(len(h.above)), float(len(h.above)), {"data-threshold": repr(h.threshold)})
                if h
                else Cell("–"),
            }
            if r and r.windowed and window is None:  # windows differ: say which
                row["icl_window"].text += f" (±{r.windowed.get('window')})"
            if h and thr is None:
                row["n_above"].text += f" (≥ {h.threshold:g})"
            rows.append(row)
        blocks.append(
            Table(
                "icl-summary", columns, rows, [{"data-model": m} for m in models], attrs={"id": "icl-summary"}
            )
        )
        notes = []
        if ex.icl:
            defs = sorted({str(r.data.get("definition", "")) for r in ex.icl} - {""})
            notes.append(
                "ICL score: " + " / ".join(defs) + " (negative = later tokens are predicted better)."
                if defs
                else "ICL score: loss of a late token minus that of an early one."
            )
            wdefs = sorted({str((r.windowed or {}).get("definition", "")) for r in ex.icl} - {""})
            if wdefs:
                notes.append("Windowed: " + " / ".join(wdefs) + ".")
            corpora = sorted(
                {
                    f"{(r.data.get('corpus') or {}).get('name', '?')}, {r.data.get('n_contexts', '?')} contexts of "
                    f"{(r.data.get('corpus') or {}).get('tokens_per_context', '?')} tokens"
                    for r in ex.icl
                }
            )
            notes.append("Text: " + "; ".join(corpora) + ".")
        if ex.heads:
            d = ex.heads[0].data.get("definitions") or {}
            if d.get("prefix_matching"):
                notes.append(f"Prefix matching: {d['prefix_matching']}.")
            settings = sorted(
                {
                    f"{s.get('n_seqs', '?')} random sequences of {s.get('seq_len', '?')} tokens × "
                    f"{s.get('n_repeats', '?')} repeats"
                    for s in (r.data.get("settings") or {} for r in ex.heads)
                }
            )
            notes.append("Heads scored on " + "; ".join(settings) + "; layer = decoder layer (0 = first).")
        blocks.append(Text("p", " ".join(notes)))
    tops = [r for r in ex.heads if r.top]
    if tops:
        n = min(TOP_HEADS, max(len(r.top) for r in tops))
        columns = [("rank", "rank")] + [(f"m{i}", r.model) for i, r in enumerate(tops)]
        rows = []
        for k in range(n):
            row = {"rank": Cell(str(k + 1), float(k + 1))}
            for i, r in enumerate(tops):
                if k < len(r.top):
                    t = r.top[k]
                    cp = t.get("copying")
                    row[f"m{i}"] = Cell(
                        f"L{t['layer']}H{t['head']} · {t['prefix_matching']:.3f} / {_f(cp, 3, sign=True)}",
                        float(t["prefix_matching"]),
                        {
                            "data-layer": str(t["layer"]),
                            "data-head": str(t["head"]),
                            "data-copying": repr(float(cp)) if cp is not None else "nan",
                            "data-model": r.model,
                        },
                    )
                else:
                    row[f"m{i}"] = Cell("–")
            rows.append(row)
        blocks.append(Text("h3", "Top heads: prefix matching / copying"))
        blocks.append(Table("top-heads", columns, rows, left=("rank",), attrs={"id": "top-heads"}))
    if ex.icl:
        fig = XF.icl_loss_curves(ex.icl, colors)
        blocks.append(
            ExtraFigure(
                "icl_loss_curves",
                "Mean loss vs token index",
                "Mean per-token loss over the contexts at each token index (log axis), all models: thin = "
                "each index, band ± 1 s.e.m., thick with dots = the means over geometric bins of indices (the "
                "curve stored in icl.json). The ICL score is the difference between the dotted tokens. The y "
                "axis starts at 0 and ends just above the highest mean from token 4 on (the first tokens have "
                "higher losses).",
                to_png(fig),
            )
        )
    if ex.heads:
        fig = XF.prefix_matching_grid(ex.heads)
        blocks.append(
            ExtraFigure(
                "icl_prefix_matching",
                "Prefix-matching score per head",
                "Prefix matching of every attention head (x: head, y: layer, 0 at the top), a panel per "
                "model; all panels have the same height, so rows at the same height are at the same relative "
                "depth. Red boxes: heads at or above the threshold (induction-head candidates), as listed in "
                "heads.json.",
                to_png(fig),
            )
        )
    for i, p in enumerate(ex.pca):
        d = p.data
        fig = XF.token_loss_pca(p, colors)
        evr = ", ".join(f"{100 * v:.1f}%" for v in d.get("explained_variance_ratio", []))
        blocks.append(
            ExtraFigure(
                f"icl_token_loss_pca_{i}",
                "Per-token loss PCA",
                f"Each model's vector of per-token losses ({d.get('n_positions', '?')} positions, "
                f"{d.get('n_contexts', '?')} contexts; same tokens: {d.get('same_tokens')}) projected on the "
                f"principal components of all of them (explained variance {evr}); from {p.folder.name}/"
                "token_loss_pca.json.",
                to_png(fig),
            )
        )
        coords = np.asarray(d["coords"], dtype=float)
        columns = [("label", "model")] + [(f"pc{j + 1}", f"PC{j + 1}") for j in range(coords.shape[1])]
        has_loss = len(d.get("mean_loss") or []) == len(d["labels"])
        if has_loss:
            columns.append(("mean_loss", "mean loss"))
        rows = []
        for k, label in enumerate(p.labels or d["labels"]):
            row = {"label": _model_cell(label, colors)}
            for j in range(coords.shape[1]):
                row[f"pc{j + 1}"] = _num(coords[k, j], 3, sign=True)
            if has_loss:
                row["mean_loss"] = _num(d["mean_loss"][k])
            rows.append(row)
        blocks.append(
            Table("token-loss-pca", columns, rows, left=("label",), attrs={"id": f"token-loss-pca-{i}"})
        )
    return ExtraSection("icl", SECTION_TITLES["icl"], blocks)


# ------------------------------------------------------------------------------------------------------------
# Causal tests


def _patch_table(r: InterventionResult) -> Table:
    layers = patch_layers(r)
    concepts = patch_concepts(r)
    conds = [c for c in PATCH_CONDITIONS if c in set(r.metrics["condition"])]
    multi = len(layers) > 1
    plan: list[tuple[str, str, str, int | None, bool]] = [
        ("baseline accuracy", "patch_accuracy", "baseline", None, False)
    ]
    for layer in layers:
        at = f" · layer {layer}" if multi else ""
        for c in conds:
            plan.append((f"Δ accuracy · {c}{at}", "patch_delta_accuracy", c, layer, True))
        if "cross" in conds and (r.metrics["metric"] == "patch_follow_delta").any():
            plan.append((f"Δ follows B · cross{at}", "patch_follow_delta", "cross", layer, True))
    columns = [("row", "")] + [(c, c) for c in concepts]
    rows, row_attrs = [], []
    for label, metric, cond, layer, sign in plan:
        row = {"row": Cell(label)}
        for c in concepts:
            row[c] = _pm(*patch_value(r, metric, cond, c, layer), sign=sign)
        rows.append(row)
        row_attrs.append(
            {"data-metric": metric, "data-condition": cond, "data-layer": "" if layer is None else str(layer)}
        )
    attrs = {
        "data-model": r.model,
        "data-task": r.task,
        "data-mode": r.mode,
        "data-shots": str(r.shots),
        "data-folder": r.folder.name,
    }
    collapse = f"{len(rows)} rows: show the table" if len(rows) > 14 else None
    return Table("patch", columns, rows, row_attrs, left=("row",), attrs=attrs, collapse=collapse)


def _patch_note(r: InterventionResult) -> str:
    rec = r.record
    seeds = rec.get("eval_seeds") or []
    n = r.config.get("n", "?")
    layers = patch_layers(r)
    peak = rec.get("peak_layer")
    txt = (
        f"{r.folder.name}: {len(seeds)} seeds × {n} prompts per concept; patched at layer "
        f"{_ranges(layers)}"
        + (f" (peak {peak}: {rec.get('peak_source')})" if peak is not None else "")
        + (f". {sem[:1].upper()}{sem[1:]}." if (sem := str(rec.get("semantics", ""))) else ".")
    )
    return txt


def _patch_figure(group: list[InterventionResult], key: str) -> ExtraFigure:
    r0 = group[0]
    multi = any(len(patch_layers(r)) > 1 for r in group)
    grid: list[list[XF.Panel | None]] = []
    if not multi:
        panels = []
        for r in group:
            concepts = patch_concepts(r)
            layer = patch_layers(r)[0] if patch_layers(r) else None
            conds = [c for c in PATCH_CONDITIONS if c in set(r.metrics["condition"])]
            vals = np.array(
                [[patch_value(r, "patch_delta_accuracy", c, k, layer) for k in concepts] for c in conds]
            ).reshape(len(conds), len(concepts), 2)
            panels.append(
                XF.Panel(
                    f"{r.model} · layer {layer}",
                    vals[..., 0],
                    vals[..., 1],
                    concepts,
                    [COND_LABEL.get(c, c) for c in conds],
                    "",
                )
            )
        grid = [panels[i : i + 4] for i in range(0, len(panels), 4)]
    else:
        for r in group:
            concepts, layers = patch_concepts(r), patch_layers(r)
            row: list[XF.Panel | None] = []
            for c in [c for c in PATCH_CONDITIONS if c in set(r.metrics["condition"])]:
                vals = np.array(
                    [[patch_value(r, "patch_delta_accuracy", c, k, lay) for k in concepts] for lay in layers]
                ).reshape(len(layers), len(concepts), 2)
                title = f"{r.model} · {COND_LABEL.get(c, c)}"
                ylabels = [str(v) for v in layers]
                row.append(XF.Panel(title, vals[..., 0], vals[..., 1], concepts, ylabels, "layer"))
            grid.append(row)
    fig = XF.heatmap_grid(grid, "patched − baseline accuracy")
    what = "layer (y) per condition" if multi else "condition (y)"
    return ExtraFigure(
        key,
        f"{r0.task} · {r0.shots}-shot · {r0.mode}: change in ICL accuracy from patching",
        f"Patched minus baseline exact-match accuracy per concept (x; all = mean over concepts) and {what}, "
        "a panel per model; cells: mean ± std over evaluation seeds as written in metrics.parquet "
        "(patch_delta_accuracy and its _std). Positive: the prompt's own concept vector; negative: the null "
        "concept's; cross: another concept B's.",
        to_png(fig),
    )


def _finetune_table(r: InterventionResult) -> Table:
    ref = finetune_ref_layer(r)
    refs = "–" if ref is None else str(ref)
    columns = [
        ("condition", "condition"),
        ("layers", "LoRA decoder layers"),
        ("cd_ref", f"CD k-NN @ layer {refs}"),
        ("probe_ref", f"probe @ layer {refs}"),
        ("cd_max", "max CD k-NN (layer)"),
        ("acc", "ICL acc."),
        ("train_loss", "train loss"),
    ]
    conds = finetune_conditions(r)
    rows = []
    for c in conds:
        v = finetune_row(r, c)
        dec = ((r.record.get("conditions") or {}).get(c) or {}).get("decoder_layers")
        best = _num(v["cd_max"], **{"data-layer": _f(v["cd_max_layer"], 0)})
        if np.isfinite(v["cd_max_layer"]):
            best.text += f" ({int(v['cd_max_layer'])})"
        rows.append(
            {
                "condition": Cell(c),
                "layers": Cell("none" if c == "base" else (_ranges(dec) if dec else "?")),
                "cd_ref": _num(v["cd_ref"]),
                "probe_ref": _num(v["probe_ref"]),
                "cd_max": best,
                "acc": _num(v["acc"]),
                "train_loss": _num(v["train_loss"]),
            }
        )
    attrs = {"data-model": r.model, "data-task": r.task, "data-folder": r.folder.name}
    if ref is not None:
        attrs["data-ref-layer"] = str(ref)
    row_attrs = [{"data-condition": c} for c in conds]
    return Table("finetune", columns, rows, row_attrs, left=("condition", "layers"), attrs=attrs)


def _ablation_table(r: AblationResult) -> Table:
    """Rows: baseline, induction, control; a column per measure. Baseline and induction cells: value [95%
    CI]; control: mean ± std over draws (``ablation.json``'s summary)."""
    from conceptprobe.experiments.ablation import CONDITIONS, measure_name

    entries = list(r.data.get("summary") or [])
    columns = [("condition", "condition"), ("heads", "heads ablated")]
    columns += [(f"m{i}", measure_name(e["task"], e["metric"])) for i, e in enumerate(entries)]
    draws = [c for c in r.data.get("conditions", []) if c.get("condition") == "control"]
    heads = {
        "baseline": "none",
        "induction": ", ".join(r.data.get("ablated") or []),
        "control": f"{len(draws)} draws of {len(r.data.get('ablated') or [])} "
        f"({r.data.get('config', {}).get('control', '?')})",
    }
    rows = []
    for cond in CONDITIONS:
        row = {"condition": Cell(cond), "heads": Cell(heads[cond])}
        for i, e in enumerate(entries):
            cell = e.get(cond)
            if not cell:
                row[f"m{i}"] = Cell("–")
            elif cond == "control":
                row[f"m{i}"] = _pm(cell["value"], float(cell.get("std", float("nan"))), sign=False)
            else:
                lo, hi = cell["ci"]
                row[f"m{i}"] = Cell(
                    f"{_f(cell['value'])} [{_f(lo)}, {_f(hi)}]",
                    float(cell["value"]),
                    {"data-lo": repr(float(lo)), "data-hi": repr(float(hi))},
                )
        rows.append(row)
    attrs = {"data-model": r.model, "data-folder": r.folder.name}
    return Table(
        "ablation", columns, rows, [{"data-condition": c} for c in CONDITIONS], ("condition", "heads"), attrs
    )


def _paired_text(entries: list[dict[str, Any]]) -> str:
    """One sentence of the paired accuracy changes of an ``ablation.json`` (empty without them)."""
    parts = []
    for e in entries:
        ind, ctrl = e.get("induction"), e.get("control")
        if not ind:
            continue
        text = f"{e['task']} {ind['delta']:+.2f} [{ind['ci'][0]:+.2f}, {ind['ci'][1]:+.2f}]"
        if ctrl:
            text += f" (random draws {ctrl['delta']:+.2f} ± {ctrl['std']:.2f}, {ctrl['draws']} draws)"
        parts.append(f"{text}, n = {e['n']}")
    if not parts:
        return ""
    return (
        "Accuracy change from the baseline, paired over the same prompts (95% bootstrap interval of the "
        "per-prompt differences): " + "; ".join(parts) + "."
    )


def _ablation_blocks(ex: Extras) -> list[Table | ExtraFigure | Text]:
    from conceptprobe.experiments.ablation import ablation_figure

    order = {m: i for i, m in enumerate(ex.models())}
    blocks: list[Table | ExtraFigure | Text] = [Text("h3", "Head ablation")]
    blocks.append(
        Text(
            "p",
            "The top-k induction heads (both scores over their thresholds first, then by prefix matching) are "
            "ablated before the attention output projection, against k random control heads over several "
            "draws. Baseline and induction cells: value [95% bootstrap CI over contexts or prompts]; control: "
            "mean ± std over draws. Decodability (cd_knn) is read at the unablated run's held-out peak layer.",
        )
    )
    for r in sorted(ex.ablation, key=lambda r: (order.get(r.model, 0), r.folder.name)):
        cfg = r.data.get("config") or {}
        blocks.append(
            Text(
                "h4",
                f"{r.model} · {cfg.get('mode', '?')}-ablation of {len(r.data.get('ablated') or [])} heads",
            )
        )
        blocks.append(_ablation_table(r))
        paired = _paired_text(r.data.get("paired_accuracy") or [])
        if paired:
            blocks.append(Text("p", paired))
        key = "causal_ablation_" + "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in r.folder.name)
        fig = ablation_figure(r.data, r.model)
        blocks.append(
            ExtraFigure(
                key,
                f"Head ablation: {r.model}",
                "Bars: baseline, the ablated induction heads and the control (dots: each draw); whiskers: 95% "
                "bootstrap intervals (baseline, induction) and ± std over draws (control).",
                to_png(fig),
            )
        )
        blocks.append(
            Text(
                "p",
                f"{r.folder.name}: {cfg.get('n_contexts', '?')} ICL-score contexts; {cfg.get('shots', '?')}-shot "
                f"tasks with {cfg.get('n', '?')} prompts per concept; seed {cfg.get('seed', '?')}; heads from "
                f"{r.data.get('heads_source', '?')}.",
            )
        )
    return blocks


def _causal_section(ex: Extras, colors: dict[str, tuple]) -> ExtraSection:
    blocks: list[Table | ExtraFigure | Text] = []
    order = {m: i for i, m in enumerate(ex.models())}
    if ex.patch:
        blocks.append(Text("h3", "Concept-vector patching"))
        blocks.append(
            Text(
                "p",
                "Rows: the unpatched (baseline) accuracy, then the patched minus baseline accuracy for each "
                "condition (positive: the prompt's own concept vector; negative: the null concept's; cross: "
                "another concept B's), and for cross the change in the share of answers that are B's answer "
                "(Δ follows B). Cells: mean ± std over evaluation seeds, as written in metrics.parquet.",
            )
        )
        groups: dict[tuple, list[InterventionResult]] = {}
        for r in sorted(
            ex.patch, key=lambda r: (r.task, r.shots, r.mode, order.get(r.model, 0), r.folder.name)
        ):
            multi = len(patch_layers(r)) > 1
            groups.setdefault((r.task, r.shots, r.mode, multi), []).append(r)
        for (task, shots, mode, multi), group in groups.items():
            if not any(patch_layers(r) for r in group):
                continue
            key = f"causal_patch_{task}_{shots}shot_{mode}" + ("_layers" if multi else "")
            blocks.append(
                _patch_figure(group, "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in key))
            )
            for r in group:
                blocks.append(Text("h4", f"{r.model} · {task} · {shots}-shot · {mode}"))
                blocks.append(_patch_table(r))
                blocks.append(Text("p", _patch_note(r)))
    if ex.finetune:
        blocks.append(Text("h3", "Layer-restricted finetuning (LoRA)"))
        tasks = sorted({r.task for r in ex.finetune})
        models = [m for m in ex.models() if any(r.model == m for r in ex.finetune)]
        fig = XF.finetune_curves(ex.finetune, tasks, models)
        blocks.append(
            ExtraFigure(
                "causal_finetune",
                "Decodability per layer after finetuning the first or the last layers",
                "Overall k-NN decodability at each layer (0 = embeddings) of the base model and of the model "
                "with LoRA adapters on its first or last decoder layers, a row per task and a column per "
                "model; dotted: the base model's peak layer (the tables' reference layer).",
                to_png(fig),
            )
        )
        for r in sorted(ex.finetune, key=lambda r: (order.get(r.model, 0), r.task, r.folder.name)):
            cfg = r.config
            blocks.append(Text("h4", f"{r.model} · {r.task} · {r.shots}-shot"))
            blocks.append(_finetune_table(r))
            blocks.append(
                Text(
                    "p",
                    f"{r.folder.name}: reference layer = the base model's peak (run.json peak_layers.base); "
                    "ICL acc. = exact-match accuracy over all concepts incl. null (finetune_accuracy, "
                    f"concept all); train loss = mean over the last 10% of {cfg.get('steps', '?')} steps "
                    f"(LoRA rank {cfg.get('rank', '?')}, lr {cfg.get('lr', '?')}); "
                    f"{cfg.get('n', '?')} evaluation prompts per concept, seed {r.record.get('eval_seed', '?')}.",
                )
            )
    if ex.ablation:
        blocks += _ablation_blocks(ex)
    return ExtraSection("causal", SECTION_TITLES["causal"], blocks)


def _cell_ci(cell: dict[str, Any] | None, digits: int = 3, sign: bool = False) -> Cell:
    """``value [lo, hi]`` of a summary cell (``{"value", "ci"}``), with the exact values as attributes."""
    if not cell:
        return Cell("–")
    text, attrs = _f(cell["value"], digits, sign), {}
    if cell.get("ci"):
        lo, hi = cell["ci"]
        text += f" [{_f(lo, digits, sign)}, {_f(hi, digits, sign)}]"
        attrs = {"data-lo": repr(float(lo)), "data-hi": repr(float(hi))}
    return Cell(text, float(cell["value"]), attrs)


def _checkpoints_table(r: CheckpointsResult) -> Table:
    """A row per checkpoint: step, ICL score [CI], the heads' summaries and each task's accuracy and
    decodability [CI] (the checkpoint's summary in ``checkpoints.json``)."""
    entries = list(r.data.get("checkpoints") or [])
    tasks = sorted({k.split("/")[0] for e in entries for k in (e.get("summary") or {}) if "/" in k})
    top = (r.data.get("config") or {}).get("top_heads", "?")
    columns = [
        ("step", "step"), ("icl", "ICL score [95% CI]"), ("pm", "prefix matching, best head"),
        ("pm_top", f"prefix matching, top {top}"), ("cp", "copying of that head (OV)"),
        ("n_ind", "induction heads"),
    ]  # fmt: skip
    for t in tasks:
        columns += [(f"{t}_acc", f"{t} accuracy [CI]"), (f"{t}_cd", f"{t} k-NN CD [CI] (layer)")]
    rows = []
    for e in entries:
        sm = e.get("summary") or {}
        pm = sm.get("prefix_matching_max")
        row = {
            "step": Cell(str(e["step"]), float(e["step"])),
            "icl": _cell_ci(sm.get("icl_score"), sign=True),
            "pm": Cell(f"{_f(pm['value'])} ({pm['head']})", float(pm["value"])) if pm else Cell("–"),
            "pm_top": _num((sm.get("prefix_matching_top_mean") or {}).get("value")),
            "cp": _num((sm.get("copying_best_head") or {}).get("value")),
            "n_ind": _num((sm.get("n_induction_heads") or {}).get("value"), 0),
        }
        for t in tasks:
            row[f"{t}_acc"] = _cell_ci(sm.get(f"{t}/icl_accuracy"))
            cd = sm.get(f"{t}/cd_knn_heldout_peak")
            cell = _cell_ci(cd)
            if cd and "layer" in cd:
                cell.text += f" ({cd['layer']})"
            row[f"{t}_cd"] = cell
        rows.append(row)
    collapse = f"every checkpoint ({len(rows)} rows)" if len(rows) > 12 else None
    return Table(
        "checkpoints", columns, rows, [{"data-step": str(e["step"])} for e in entries], ("step",),
        {"data-model": r.model, "data-folder": r.folder.name}, collapse,
    )  # fmt: skip


def _phase_text(r: CheckpointsResult) -> str:
    """Where the best head's prefix matching and the ICL score pass halfway, with their intervals, and the
    check against the trainer's own tracked values."""
    phase = r.data.get("phase") or {}
    parts = []
    for key, name, sign in (
        ("prefix_matching_max", "the best head's prefix matching", False),
        ("icl_score", "the ICL score", True),
    ):
        got = phase.get(key)
        if not got or got.get("halfway") is None:
            continue
        before, at = got["halfway"]["before"], got["halfway"]["at"]

        def show(c: dict[str, Any], sign: bool = sign) -> str:
            ci = f" [{_f(c['ci'][0], 3, sign)}, {_f(c['ci'][1], 3, sign)}]" if c.get("ci") else ""
            return f"{_f(c['value'], 3, sign)}{ci} at step {c['step']}"

        parts.append(
            f"{name} goes from {show(got['first'])} to {show(got['last'])} and passes halfway between "
            f"{show(before)} and {show(at)}"
        )
    text = ("; ".join(parts) + ".") if parts else ""
    text = text[:1].upper() + text[1:]
    check = r.data.get("tracked_check")
    if check and check.get("max_abs_diff"):
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in check["max_abs_diff"].items())
        n = max(check.get("compared", {}).values(), default=0)
        text += (
            f" Largest difference from the values `conceptprobe train` tracked at the same steps "
            f"({check['file']}, up to {n} values per measure): {diffs}."
        )
    return text.strip()


def _checkpoints_section(ex: Extras) -> ExtraSection:
    from conceptprobe.experiments.checkpoint_figure import checkpoint_figure

    blocks: list[Table | ExtraFigure | Text] = [
        Text(
            "p",
            "One model measured at several training checkpoints. Heads are labelled L<b>H<h>: decoder block b "
            "(0-based; it reads residual-stream layer b and writes b+1), head h. Prefix matching: attention "
            "from each repeated token to the token after its earlier copies; copying: Olsson et al.'s "
            "OV-circuit eigenvalue score; ICL score: loss of a late token minus an early one (95% bootstrap "
            "interval over contexts). Training checkpoints are measured with their run's own evaluation "
            "data and settings, as `conceptprobe train` tracked them.",
        )
    ]
    for r in ex.checkpoints:
        steps = r.data.get("steps") or []
        span = f"steps {steps[0]}–{steps[-1]}" if steps else ""
        blocks.append(
            Text("h3", f"{r.model} · {r.data.get('name', r.folder.name)}: {len(steps)} checkpoints, {span}")
        )
        phase = _phase_text(r)
        if phase:
            blocks.append(Text("p", phase))
        key = "checkpoints_" + "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in r.folder.name)
        blocks.append(
            ExtraFigure(
                key,
                f"Measures against the training step: {r.model}",
                "Per head: prefix matching and copying (a colour per decoder block, lighter for later heads; "
                "black dashed: the best prefix-matching head; dash-dot: its in-context copying); ICL score "
                "with its 95% bootstrap band; concept "
                "tasks (when measured): accuracy and k-NN decodability with 95% bands and the k-NN null. "
                "Vertical dashed line: the checkpoint where the best head's prefix matching passes halfway.",
                to_png(checkpoint_figure(r.metrics, r.data)),
            )
        )
        blocks.append(_checkpoints_table(r))
        src = (r.data.get("config") or {}).get("train_folder") or "model entries (ref + revision / step)"
        blocks.append(Text("p", f"{r.folder.name}: checkpoints from {src}; definitions in checkpoints.json."))
    return ExtraSection("checkpoints", SECTION_TITLES["checkpoints"], blocks)


def build_sections(ex: Extras, colors: dict[str, tuple]) -> list[ExtraSection]:
    """The sections for ``ex`` (none when it holds nothing); ``colors`` is extended to every model."""
    colors.update(XF.extend_colors(colors, [*ex.models(), *(lab for p in ex.pca for lab in p.labels)]))
    out = []
    if ex.has_icl:
        out.append(_icl_section(ex, colors))
    if ex.has_causal:
        out.append(_causal_section(ex, colors))
    if ex.has_checkpoints:
        out.append(_checkpoints_section(ex))
    return out


def extra_facts(ex: Extras) -> list[tuple[str, str]]:
    """Header facts of a report that has only extra results."""
    sizes: dict[str, int] = {}
    vers: dict[str, set[str]] = {}
    gits: set[str] = set()
    for r in [*ex.icl, *ex.heads, *ex.patch, *ex.finetune, *ex.ablation, *ex.checkpoints]:
        sizes.setdefault(r.model, r.n_params)
        data = getattr(r, "data", None) or getattr(r, "record", {})
        for k, v in (data.get("versions") or {}).items():
            vers.setdefault(k, set()).add(str(v))
        g = data.get("git")
        if isinstance(g, dict) and g.get("commit"):
            gits.add(g["commit"][:10] + (" (dirty)" if g.get("dirty") else ""))
    facts = [("results", ex.summary())]
    if sizes:
        facts.append(("models", ", ".join(f"{m} ({fmt_params(sizes[m])})" for m in ex.models())))
    tasks = sorted({r.task for r in [*ex.patch, *ex.finetune]})
    if tasks:
        facts.append(("causal-test tasks", ", ".join(tasks)))
    shown = [
        f"{k} {'/'.join(sorted(vers[k]))}" for k in ("conceptprobe", "torch", "transformers") if k in vers
    ]
    facts.append(("versions", ", ".join(shown) or "?"))
    if gits:
        facts.append(("git", ", ".join(sorted(gits))))
    return facts


# ------------------------------------------------------------------------------------------------------------
# Rendering


def _attrs(attrs: dict[str, str]) -> str:
    return "".join(f' {k}="{html.escape(str(v))}"' for k, v in attrs.items())


def table_html(t: Table) -> str:
    head = "".join(f'<th class="{"l" if k in t.left else ""}">{html.escape(h)}</th>' for k, h in t.columns)
    rows = []
    for i, row in enumerate(t.rows):
        cells = []
        for k, _h in t.columns:
            c = row.get(k, Cell("–"))
            attrs = {
                "data-col": k,
                **({"data-value": repr(c.value)} if c.value is not None else {}),
                **c.attrs,
            }
            body = c.html if c.html is not None else html.escape(c.text)
            cells.append(f'<td class="{"l" if k in t.left else ""}"{_attrs(attrs)}>{body}</td>')
        ra = t.row_attrs[i] if i < len(t.row_attrs) else {}
        rows.append(f"<tr{_attrs(ra)}>{''.join(cells)}</tr>")
    table = (
        f'<div style="overflow-x:auto"><table class="extra {html.escape(t.cls)}"{_attrs(t.attrs)}>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )
    if t.collapse:
        return f'<details><summary class="muted">{html.escape(t.collapse)}</summary>{table}</details>'
    return table


def table_markdown(t: Table) -> list[str]:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) or " " for _k, h in t.columns) + " |"]
    lines.append("|" + "|".join(":--" if k in t.left else "--:" for k, _h in t.columns) + "|")
    for row in t.rows:
        lines.append("| " + " | ".join(esc(row.get(k, Cell("–")).text) for k, _h in t.columns) + " |")
    return lines


def section_html(s: ExtraSection) -> str:
    parts = [f'<section id="{html.escape(s.id)}"><h2>{html.escape(s.title)}</h2>']
    card: list[str] = []

    def flush() -> None:
        if card:
            parts.append('<div class="card" style="margin-bottom:18px">' + "".join(card) + "</div>")
            card.clear()

    for b in s.blocks:
        if isinstance(b, Table):
            card.append(table_html(b))
        elif isinstance(b, Text):
            if b.kind == "h3":
                flush()
                parts.append(f"<h3>{html.escape(b.text)}</h3>")
            elif b.kind == "h4":
                card.append(f'<div class="ftitle" style="margin:14px 0 6px">{html.escape(b.text)}</div>')
            else:
                card.append(f'<p class="muted" style="margin:8px 0 6px">{html.escape(b.text)}</p>')
        else:
            flush()
            b64 = base64.b64encode(b.png).decode("ascii")
            parts.append(
                f'<figure id="fig-{html.escape(b.key)}"><div class="ftitle">{html.escape(b.title)}</div>'
                f'<img src="data:image/png;base64,{b64}" alt="{html.escape(b.title)}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>"
            )
    flush()
    parts.append("</section>")
    return "".join(parts)


def section_markdown(s: ExtraSection, figures_rel: str = "figures") -> list[str]:
    lines = [f"## {s.title}", ""]
    for b in s.blocks:
        if isinstance(b, Table):
            lines += [*table_markdown(b), ""]
        elif isinstance(b, Text):
            head = {"h3": "### ", "h4": "#### "}.get(b.kind, "")
            lines += [head + (b.text if head else b.text.replace("|", "\\|")), ""]
        else:
            lines += [f"![{b.title}]({figures_rel}/{b.key}.png)", "", f"*{b.caption}*", ""]
    return lines
