"""The ICL score of a model (Olsson et al. 2022): loss of a late token minus an early one, over contexts.

    from conceptprobe.experiments.icl import IclScoreConfig, icl_score
    result = icl_score(IclScoreConfig(model="smollm2-135m", n_contexts=16))
    result.score.score, result.score.ci_low, result.score.ci_high

With ``out`` the folder holds ``icl.json`` (the record: score, interval, windowed score, loss curve,
corpus, settings), ``token_losses.safetensors`` (per-token losses, for :mod:`conceptprobe.measures.token_loss`),
``loss_curve.png`` and ``metrics.parquet`` (long form).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from conceptprobe.config import Dtype
from conceptprobe.experiments.common import metrics_frame, model_columns, set_threads


class IclScoreConfig(BaseModel):
    """Settings of an ICL-score measurement (the defaults of ``conceptprobe icl-score``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="packaged alias, .gguf file, local folder or hub id")
    revision: str | None = Field(None, description="hub branch, tag or commit")
    text: list[str] | None = Field(None, description="text files or folders; default: the built-in corpus")
    corpus: Literal["stdlib-docs", "stdlib-source", "licenses"] = "stdlib-docs"
    n_contexts: int = Field(64, ge=1, le=100_000)
    n_tokens: int = Field(512, ge=2, le=1_000_000, description="text tokens per context")
    late: int = Field(500, ge=2, description="the later token (1-based index within the context's text)")
    early: int = Field(50, ge=1, description="the earlier token (1-based)")
    per_doc: int = Field(1, ge=1, description="most contexts taken from one document (consecutive windows)")
    batch_size: int = Field(4, ge=1)
    dtype: Dtype = Field(
        "auto", validate_default=True, description="auto: bfloat16 where native, else float32"
    )
    seed: int = Field(0, ge=0, lt=2**32)
    n_boot: int = Field(2000, ge=10)
    window: int = Field(10, ge=0, description="also the score on token windows +-window (0 = off)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads [torch's default]")

    @model_validator(mode="after")
    def _order(self) -> IclScoreConfig:
        if not 1 <= self.early < self.late <= self.n_tokens:
            raise ValueError(
                f"need 1 <= early ({self.early}) < late ({self.late}) <= n_tokens ({self.n_tokens})"
            )
        return self


@dataclass
class IclScoreResult:
    """The score (:class:`conceptprobe.measures.icl_score.ICLScore`), the windowed one, the per-token losses
    ``[n_contexts, n_tokens]`` and the record written as ``icl.json``."""

    score: Any
    windowed: Any
    losses: Any
    record: dict[str, Any]
    folder: Path | None = None
    metrics: Any = field(default=None)


def icl_score(
    config: IclScoreConfig, out: str | Path | None = None, *, loaded: Any = None, progress: bool = True
) -> IclScoreResult:
    """Measure the ICL score of ``config.model``; write the result folder ``out`` when given."""
    from conceptprobe.corpus import describe_corpus, iter_corpus, iter_text_paths
    from conceptprobe.measures.icl_score import (
        build_contexts,
        check_context_length,
        loss_curve,
        per_token_losses,
        special_prefix,
    )
    from conceptprobe.measures.icl_score import icl_score as score_of
    from conceptprobe.models import load_model
    from conceptprobe.models.training_checkpoint import refuse_text
    from conceptprobe.store import package_versions

    c = config
    threads = set_threads(c.threads)
    started = time.perf_counter()
    loaded = loaded or load_model(c.model, dtype=c.dtype, revision=c.revision)
    info = loaded.info
    refuse_text(loaded.tokenizer, c.model, "the ICL score")
    prefix = special_prefix(loaded.tokenizer)
    check_context_length(loaded.model, len(prefix) + c.n_tokens, name=c.model)
    texts = [Path(t) for t in c.text] if c.text else None
    documents = iter_text_paths(texts) if texts else iter_corpus(c.corpus, c.seed)
    contexts = build_contexts(loaded.tokenizer, documents, c.n_contexts, c.n_tokens, per_doc=c.per_doc)
    t0 = time.perf_counter()
    losses = per_token_losses(
        loaded.model, contexts.input_ids, contexts.n_prefix, batch_size=c.batch_size, progress=progress
    )
    forward_s = time.perf_counter() - t0
    score = score_of(losses, late=c.late, early=c.early, n_boot=c.n_boot, seed=c.seed)
    window = max(0, min(c.window, c.early - 1, c.n_tokens - c.late))  # clipped to fit inside the context
    windowed = score_of(losses, c.late, c.early, c.n_boot, seed=c.seed, window=window) if window else None
    curve = loss_curve(losses)
    corpus_info = describe_corpus(
        None if texts else c.corpus, [str(p) for p in texts] if texts else None, c.seed
    )
    corpus_info.update(
        {
            "documents_read": contexts.n_documents_read,
            "contexts": len(contexts.doc_ids),
            "per_doc": c.per_doc,
            "tokens_per_context": c.n_tokens,
            "special_prefix": prefix,
            "tokens_scored": int(losses.isfinite().sum()),
        }
    )
    record = {
        "kind": "icl",
        "measure": "icl_score",
        "definition": (
            f"mean over contexts of loss(token {c.late}) - loss(token {c.early}); tokens are 1-based "
            "positions in the context's text after the tokenizer's own special prefix; "
            "loss = -ln p(x_t | prefix, x_<t) in nats; "
            f"{int(score.ci * 100)}% percentile bootstrap over contexts"
        ),
        **{k: v for k, v in score.to_dict().items() if k != "per_context"},
        "per_context": score.per_context,
        "windowed": None
        if windowed is None
        else {k: v for k, v in windowed.to_dict().items() if k in ("score", "ci_low", "ci_high", "window")}
        | {"definition": f"mean loss over tokens t-{window}..t+{window} in place of the single token t"},
        "curve": curve,
        "model": info.to_dict(),
        "corpus": corpus_info,
        "doc_ids": contexts.doc_ids,
        "config": c.model_dump(mode="json"),
        "settings": {
            "batch_size": c.batch_size,
            "dtype": c.dtype,
            "seed": c.seed,
            "n_boot": c.n_boot,
            "threads": threads,
        },
        "seconds": {
            "load": info.load_seconds,
            "forward": round(forward_s, 2),
            "total": round(time.perf_counter() - started, 2),
        },
        "versions": package_versions(),
    }
    base = {**model_columns(info, c.seed), "task": "icl", "layer": None, "head": None}
    rows = [
        {
            **base,
            "metric": "icl_score",
            "value": score.score,
            "ci_low": score.ci_low,
            "ci_high": score.ci_high,
        },
        {**base, "metric": f"loss_token_{c.early}", "value": score.mean_loss_early},
        {**base, "metric": f"loss_token_{c.late}", "value": score.mean_loss_late},
    ]
    if windowed is not None:
        rows.insert(
            2,
            {
                **base,
                "metric": f"icl_score_window{window}",
                "value": windowed.score,
                "ci_low": windowed.ci_low,
                "ci_high": windowed.ci_high,
            },
        )
    metrics = metrics_frame(rows, ("head",))
    result = IclScoreResult(score, windowed, losses, record, None, metrics)
    if out is not None:
        result.folder = write_icl_folder(
            Path(out), result, contexts, f"{info.alias or c.model} ({info.dtype})"
        )
    return result


def write_icl_folder(folder: Path, result: IclScoreResult, contexts: Any, title: str) -> Path:
    """``icl.json``, ``token_losses.safetensors``, ``loss_curve.png`` and ``metrics.parquet`` in ``folder``."""
    from conceptprobe.measures.icl_score import plot_loss_curve
    from conceptprobe.measures.token_loss import write_token_losses
    from conceptprobe.store import atomic_write_parquet, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    write_token_losses(folder, result.losses, contexts.input_ids, contexts.n_prefix, contexts.doc_ids)
    plot_loss_curve(result.record["curve"], result.score, folder / "loss_curve.png", title)
    atomic_write_parquet(folder / "metrics.parquet", result.metrics)
    atomic_write_text(folder / "icl.json", json.dumps(result.record, indent=2, default=str) + "\n")
    return folder
