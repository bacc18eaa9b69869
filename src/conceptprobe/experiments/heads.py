"""Induction heads of a model (Olsson et al. 2022): prefix matching and copying per head.

    from conceptprobe.experiments.heads import HeadsConfig, head_scores
    result = head_scores(HeadsConfig(model="smollm2-135m"))
    result.prefix_matching[18, 6], result.copying[18, 6], result.induction_heads

Heads are labelled by decoder **block** (``L18H6`` = block 18, head 6); block b reads residual-stream layer b
and writes layer b + 1 (the layer numbering of decodability). Two copying scores:

- ``copying`` (Olsson's): from the weights, the eigenvalues of the head's OV circuit through the embedding and
  the unembedding over the full vocabulary (:func:`conceptprobe.measures.induction.ov_copying_scores`);
- ``copying_in_context``: the head's direct effect on the logits of the repeated random tokens it attends
  to, in context (:func:`conceptprobe.measures.induction.copying_scores`).

An *induction head* has prefix matching >= ``threshold`` and copying >= ``copying_threshold``.
With ``out`` the folder holds ``heads.json``, ``prefix_matching.png``, ``copying.png`` and
``metrics.parquet``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conceptprobe.config import Dtype
from conceptprobe.experiments.common import metrics_frame, model_columns, set_threads


class HeadsConfig(BaseModel):
    """Settings of an induction-head measurement (the defaults of ``conceptprobe heads``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="packaged alias, .gguf file, local folder or hub id")
    revision: str | None = Field(None, description="hub branch, tag or commit")
    n_seqs: int = Field(10, ge=1, le=10_000, description="random sequences to average over")
    seq_len: int = Field(25, ge=2, le=4096, description="distinct random tokens per repeat")
    repeats: int = Field(4, ge=2, le=64, description="times each sequence is repeated")
    threshold: float = Field(0.4, ge=0, le=1, description="prefix matching that marks an induction head")
    copying_threshold: float = Field(
        0.5, ge=-1, le=1, description="OV copying score an induction head must also reach"
    )
    copy_over: Literal["context", "vocab"] = Field(
        "context", description="candidates of the in-context copying score"
    )
    text: list[str] | None = Field(None, description="text to count token frequencies on")
    freq_docs: int = Field(200, ge=1, description="documents of the built-in corpus for token frequencies")
    dtype: Dtype = Field(
        "auto", validate_default=True, description="auto: bfloat16 where native, else float32"
    )
    seed: int = Field(0, ge=0, lt=2**32)
    threads: int | None = Field(None, ge=1)


@dataclass
class HeadsResult:
    """Scores ``[blocks, heads]`` and the record written as ``heads.json``."""

    prefix_matching: Any
    copying: Any
    copying_in_context: Any
    induction_heads: list[dict[str, Any]]
    record: dict[str, Any]
    metrics: Any
    folder: Path | None = None


def _label(block: int, head: int) -> str:
    return f"L{block}H{head}"


def sequence_tokens(
    loaded: Any, text: list[str] | None = None, freq_docs: int = 200, seed: int = 0
) -> tuple[Any, list[int]]:
    """The candidate tokens of the repeated random sequences (mid-frequency tokens of ``text`` files, or of
    the first ``freq_docs`` documents of the built-in corpus) and the special prefix (BOS) put before them."""
    from conceptprobe.corpus import iter_corpus, iter_text_paths
    from conceptprobe.measures.icl_score import special_prefix
    from conceptprobe.measures.induction import candidate_token_ids

    tok = loaded.tokenizer
    docs = (
        iter_text_paths([Path(t) for t in text])
        if text
        else islice(iter_corpus("stdlib-docs", seed), freq_docs)
    )
    texts = [d.text for d in docs]
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    return candidate_token_ids(tok, texts, vocab_size=min(vocab, len(tok))), special_prefix(tok)


def head_scores(
    config: HeadsConfig, out: str | Path | None = None, *, loaded: Any = None, progress: bool = True
) -> HeadsResult:
    """Score every head of ``config.model``; write the result folder ``out`` when given."""
    from conceptprobe.measures.induction import induction_head_scores, ov_copying_scores
    from conceptprobe.models import load_model
    from conceptprobe.store import package_versions

    c = config
    threads = set_threads(c.threads)
    started = time.perf_counter()
    loaded = loaded or load_model(c.model, dtype=c.dtype, revision=c.revision)
    info, tok = loaded.info, loaded.tokenizer
    candidates, prefix = sequence_tokens(loaded, c.text, c.freq_docs, c.seed)
    t0 = time.perf_counter()
    scores = induction_head_scores(
        loaded.model, candidates, prefix, c.n_seqs, c.seq_len, c.repeats, seed=c.seed, copy_over=c.copy_over
    )
    try:
        ov = ov_copying_scores(loaded.model)
        ov_error = None
    except NotImplementedError as exc:
        ov, ov_error = None, str(exc)
    score_s = time.perf_counter() - t0
    pm = scores.prefix_matching
    n_blocks, n_heads = pm.shape
    rows_all = []
    for block in range(n_blocks):
        for head in range(n_heads):
            rows_all.append(
                {
                    "label": _label(block, head),
                    "block": block,
                    "layer": block,  # the block (key kept for files written before "block" existed)
                    "head": head,
                    "writes_layer": block + 1,
                    "prefix_matching": float(pm[block, head]),
                    "copying": None if ov is None else float(ov[block, head]),
                    "copying_in_context": None
                    if scores.copying is None
                    else float(scores.copying[block, head]),
                }
            )
    ranked = sorted(rows_all, key=lambda r: -r["prefix_matching"])
    above = [r for r in ranked if r["prefix_matching"] >= c.threshold]
    induction = [r for r in above if r["copying"] is not None and r["copying"] >= c.copying_threshold]
    first = scores.ids[0, scores.n_prefix : scores.n_prefix + c.seq_len].tolist()
    record = {
        "kind": "heads",
        "measure": "induction_heads",
        "head_numbering": "L<b>H<h>: decoder block b (0-based), head h; block b reads residual-stream layer b "
        "and writes layer b+1",
        "definitions": {
            "prefix_matching": "attention from each token in repeats 2..n to the positions that follow its "
            "earlier copies, summed over those positions; mean over queries and sequences",
            "copying": "Olsson et al. 2022 / Elhage et al. 2021: sum Re(eig) / sum |eig| of the OV circuit "
            "W_U D_final D_post W_O^h W_V^h D_in W_E^T over the full vocabulary (norms folded in as gains)",
            "copying_in_context": "direct path input-norm -> V -> O slice -> [post-attention norm] -> final norm "
            "-> unembedding on each source token's first-repeat residual; c = logits - mean over candidates; "
            "score = ReLU(c_s)/sum ReLU(c) - ReLU(-c_s)/sum ReLU(-c); mean over source tokens",
            "induction_head": f"prefix_matching >= {c.threshold} and copying >= {c.copying_threshold}",
        },
        "model": info.to_dict(),
        "config": c.model_dump(mode="json"),
        "settings": {
            **scores.settings,
            "threshold": c.threshold,
            "copying_threshold": c.copying_threshold,
            "dtype": c.dtype,
            "threads": threads,
            "ov_copying_error": ov_error,
            "frequency_text": c.text or f"stdlib-docs, first {c.freq_docs} documents",
        },
        "n_layers": n_blocks,
        "n_blocks": n_blocks,
        "n_heads": n_heads,
        "prefix_matching": pm.tolist(),
        "copying": None if ov is None else ov.tolist(),
        "copying_in_context": None if scores.copying is None else scores.copying.tolist(),
        "heads_above_threshold": above,
        "induction_heads": induction,
        "top_heads": ranked[:10],
        "example_tokens": tok.convert_ids_to_tokens(first),
        "seconds": {
            "load": info.load_seconds,
            "score": round(score_s, 2),
            "total": round(time.perf_counter() - started, 2),
        },
        "versions": package_versions(),
    }
    base = {**model_columns(info, c.seed), "task": "induction"}
    rows = []
    for r in rows_all:
        for metric in ("prefix_matching", "copying", "copying_in_context"):
            if r[metric] is not None:
                rows.append(
                    {
                        **base,
                        "layer": r["block"],
                        "head": r["head"],
                        "metric": metric,
                        "value": r[metric],
                    }
                )
    result = HeadsResult(pm, ov, scores.copying, induction, record, metrics_frame(rows, ("head",)))
    if out is not None:
        result.folder = write_heads_folder(Path(out), result, f"{info.alias or c.model} ({info.dtype})", c)
    return result


def write_heads_folder(folder: Path, result: HeadsResult, name: str, c: HeadsConfig) -> Path:
    """``heads.json``, the heatmaps and ``metrics.parquet`` in ``folder``."""
    from conceptprobe.measures.induction import plot_heatmap
    from conceptprobe.store import atomic_write_parquet, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    marks = [(r["block"], r["head"]) for r in result.induction_heads]
    plot_heatmap(
        result.prefix_matching,
        folder / "prefix_matching.png",
        f"prefix matching: {name}\nboxes: induction heads (prefix >= {c.threshold}, copying >= {c.copying_threshold})",
        0.0,
        1.0,
        marks=marks,
    )
    if result.copying is not None:
        plot_heatmap(
            result.copying,
            folder / "copying.png",
            f"copying (OV-circuit eigenvalues, full vocabulary)\n{name}",
            -1.0,
            1.0,
            cmap="RdBu_r",
            marks=marks,
        )
    atomic_write_parquet(folder / "metrics.parquet", result.metrics)
    atomic_write_text(folder / "heads.json", json.dumps(result.record, indent=2, default=str) + "\n")
    return folder
