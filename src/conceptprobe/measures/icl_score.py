"""In-context learning score (Olsson et al. 2022) from per-token losses.

Indexing (used everywhere in this module): token indices are **1-based positions within the text of a
context**. A context is ``prefix + x_1 .. x_n`` where ``prefix`` holds the special tokens the tokenizer
itself puts before text (Gemma's ``<bos>``; nothing for SmolLM2 or Qwen). The loss of token ``t`` is
``-log p(x_t | prefix, x_1 .. x_{t-1})`` in nats; it lives in column ``t - 1`` of a loss matrix
``[n_contexts, n]``. Without a prefix ``x_1`` has no prediction and its column is NaN.

ICL score = mean over contexts of ``loss(x_late) - loss(x_early)``, defaults ``late=500, early=50``
(the 500th and 50th tokens), with a percentile bootstrap interval over contexts. Negative = the model
predicts later tokens better (Olsson: about -0.4 nats after the induction-head phase change).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conceptprobe.corpus import CorpusError, Document
from conceptprobe.models.layers import base_model, logits_from_hidden
from conceptprobe.progress import progress_bar

LATE, EARLY, N_TOKENS = 500, 50, 512
CHARS_PER_TOKEN_FILTER = 6  # documents shorter than this many characters per needed token are skipped


class ContextLengthError(ValueError):
    """The model cannot see contexts as long as the measurement needs."""


@dataclass
class ICLScore:
    """The ICL score of a loss matrix; ``per_context`` holds each context's late-minus-early loss."""

    score: float
    ci_low: float
    ci_high: float
    ci: float
    n_contexts: int
    late: int
    early: int
    mean_loss_late: float
    mean_loss_early: float
    n_boot: int
    window: int = 0
    per_context: list[float] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def icl_score(
    losses: np.ndarray | torch.Tensor,
    late: int = LATE,
    early: int = EARLY,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    window: int = 0,
) -> ICLScore:
    """ICL score of ``losses[context, t - 1]`` (1-based token ``t``): mean of ``L[late] - L[early]``.

    The interval is the percentile bootstrap over contexts (``n_boot`` resamples, seeded). ``window > 0``
    replaces each single-token loss by the context's mean loss over tokens ``t - window .. t + window``
    that have one (a lower-variance variant; ``window=0`` is Olsson's definition).
    """
    arr = np.asarray(losses.float().numpy() if isinstance(losses, torch.Tensor) else losses, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"losses must be [n_contexts, n_tokens], got shape {arr.shape}")
    if not 1 <= early < late <= arr.shape[1]:
        raise ValueError(
            f"need 1 <= early ({early}) < late ({late}) <= n_tokens ({arr.shape[1]}); indices are 1-based"
        )
    if window < 0 or early - window < 1 or late + window > arr.shape[1]:
        raise ValueError(
            f"window {window} reaches outside tokens 1..{arr.shape[1]} around {early} and {late}"
        )

    def at(t: int) -> np.ndarray:
        if not window:
            return arr[:, t - 1]
        block = arr[:, t - 1 - window : t + window]  # the first token may have no loss (no BOS): skip it
        with np.errstate(invalid="ignore"):
            return np.where(
                np.isfinite(block).any(axis=1),
                np.nanmean(np.where(np.isfinite(block), block, np.nan), axis=1),
                np.nan,
            )

    at_late, at_early = at(late), at(early)
    diff = at_late - at_early
    if not np.isfinite(diff).all():
        raise ValueError(
            f"losses at tokens {early} or {late} are not finite in {int((~np.isfinite(diff)).sum())} contexts"
        )
    if diff.size == 0:
        raise ValueError("no contexts")
    score = float(diff.mean())
    if diff.size > 1 and n_boot > 0:
        rng = np.random.default_rng(seed)
        boots = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
        lo, hi = np.quantile(boots, [(1 - ci) / 2, (1 + ci) / 2])
    else:
        lo = hi = score
    return ICLScore(
        score=score,
        ci_low=float(lo),
        ci_high=float(hi),
        ci=ci,
        n_contexts=int(diff.size),
        late=late,
        early=early,
        mean_loss_late=float(at_late.mean()),
        mean_loss_early=float(at_early.mean()),
        n_boot=n_boot,
        window=window,
        per_context=diff.tolist(),
    )


def loss_curve(losses: np.ndarray | torch.Tensor, n_bins: int = 24) -> dict[str, Any]:
    """Mean loss per token index and its log-binned form with ``d loss / d ln(t)``.

    Bins are geometric in the 1-based index ``t`` over the defined tokens; each bin's centre is the
    geometric mean of its indices; the derivative is ``np.gradient`` of the binned means against
    ``ln(centre)`` (nats per e-fold of context; times ``ln(1.01)`` gives the change per 1% more context).
    """
    arr = np.asarray(losses.float().numpy() if isinstance(losses, torch.Tensor) else losses, dtype=np.float64)
    n = arr.shape[1]
    index = np.arange(1, n + 1)
    finite = np.isfinite(arr)
    defined = finite.any(axis=0)
    if not defined.any():
        raise ValueError("no finite losses")
    counts = finite.sum(axis=0)
    filled = np.where(finite, arr, 0.0)
    mean = np.full(n, np.nan)
    sem = np.full(n, np.nan)
    mean[defined] = filled[:, defined].sum(axis=0) / counts[defined]
    dev = np.where(finite, arr - np.where(defined, mean, 0.0), 0.0)
    sem[defined] = np.sqrt((dev[:, defined] ** 2).sum(axis=0) / counts[defined]) / np.sqrt(counts[defined])
    first = int(index[defined][0])
    edges = np.unique(np.round(np.geomspace(first, n + 1, n_bins + 1)).astype(int))
    centres, binned = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (index >= lo) & (index < hi) & defined
        if sel.any():
            centres.append(float(np.exp(np.log(index[sel]).mean())))
            binned.append(float(np.mean(mean[sel])))
    c, b = np.array(centres), np.array(binned)
    deriv = np.gradient(b, np.log(c)) if len(c) > 1 else np.zeros_like(b)
    return {
        "index": index.tolist(),
        "mean_loss": [None if not math.isfinite(v) else float(v) for v in mean],
        "sem": [None if not math.isfinite(v) else float(v) for v in sem],
        "log_bins": {"centre": c.tolist(), "mean_loss": b.tolist(), "dloss_dlog_index": deriv.tolist()},
    }


def special_prefix(tokenizer: Any) -> list[int]:
    """The token ids the tokenizer itself puts before text (e.g. ``[<bos>]``), possibly none."""
    probe = "hello world"
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return full[:k]
    return []


def max_context(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (None when it does not say)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_length(model: nn.Module, needed: int, name: str = "the model") -> None:
    """Raise :class:`ContextLengthError` when ``needed`` tokens exceed the model's maximum context."""
    limit = max_context(model)
    if limit is not None and needed > limit:
        raise ContextLengthError(
            f"{name} has a maximum context of {limit} tokens but the ICL score needs {needed} "
            f"(prefix + --n-tokens); it cannot be measured on this model (use smaller --n-tokens/--late only "
            "for a non-standard score)"
        )


@dataclass
class Contexts:
    """Token contexts ``[n, n_prefix + n_tokens]`` and the document (and window) each came from."""

    input_ids: torch.Tensor
    n_prefix: int
    doc_ids: list[str]
    n_documents_read: int = 0

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1] - self.n_prefix


def build_contexts(
    tokenizer: Any,
    documents: Iterable[Document],
    n_contexts: int,
    n_tokens: int = N_TOKENS,
    per_doc: int = 1,
    min_chars_per_token: float = CHARS_PER_TOKEN_FILTER,
) -> Contexts:
    """The first ``n_contexts`` windows of ``n_tokens`` text tokens from ``documents``, in order.

    Each document gives up to ``per_doc`` consecutive non-overlapping windows from its start. Documents
    with fewer than ``min_chars_per_token * n_tokens`` characters are skipped before tokenizing, so
    different tokenizers mostly pick the same documents (the ids record which were used).
    """
    prefix = special_prefix(tokenizer)
    rows: list[list[int]] = []
    ids: list[str] = []
    read = 0
    for doc in documents:
        if len(rows) >= n_contexts:
            break
        read += 1
        if len(doc.text) < min_chars_per_token * n_tokens:
            continue
        need = per_doc * n_tokens
        text = doc.text[: need * 16]
        toks = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if len(toks) < need and len(text) < len(doc.text):
            toks = list(tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"])
        for w in range(min(per_doc, len(toks) // n_tokens)):
            if len(rows) >= n_contexts:
                break
            rows.append(prefix + toks[w * n_tokens : (w + 1) * n_tokens])
            ids.append(f"{doc.doc_id}#{w}")
    if len(rows) < n_contexts:
        raise CorpusError(
            f"the corpus gave only {len(rows)} contexts of {n_tokens} tokens (asked for {n_contexts}; "
            f"{read} documents read); add text with --text, raise --per-doc, or lower --n-contexts"
        )
    return Contexts(torch.tensor(rows, dtype=torch.long), len(prefix), ids, read)


@torch.inference_mode()
def per_token_losses(
    model: nn.Module,
    input_ids: torch.Tensor,
    n_prefix: int,
    batch_size: int = 4,
    rows_per_chunk: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Per-token cross-entropy ``[n_contexts, n_tokens]`` (float32, nats), column ``t - 1`` for token ``t``.

    Runs the decoder body only, then the unembedding (with soft-capping) on chunks of rows, so logits
    never exceed about ``2**26`` floats at once whatever the vocabulary.
    """
    body = base_model(model)
    n_ctx, total = input_ids.shape
    n = total - n_prefix
    start = 1 if n_prefix == 0 else 0  # first 0-based column that has a prediction
    out = torch.full((n_ctx, n), float("nan"), dtype=torch.float32)
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = rows_per_chunk or max(32, 2**26 // vocab)
    bar = progress_bar(None, progress, unit="contexts", transient=True)
    with bar:
        task = bar.add_task("per-token loss", total=n_ctx)
        for b in range(0, n_ctx, batch_size):
            ids = input_ids[b : b + batch_size].to(device)
            hidden = body(
                input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False
            ).last_hidden_state
            rows = hidden[:, n_prefix + start - 1 : total - 1].reshape(-1, hidden.shape[-1])
            targets = ids[:, n_prefix + start :].reshape(-1)
            losses = torch.empty(rows.shape[0], dtype=torch.float32, device=device)
            for i in range(0, rows.shape[0], chunk):
                logits = logits_from_hidden(model, rows[i : i + chunk]).float()
                losses[i : i + chunk] = F.cross_entropy(logits, targets[i : i + chunk], reduction="none")
            out[b : b + ids.shape[0], start:] = losses.view(ids.shape[0], -1).cpu()
            bar.advance(task, ids.shape[0])
    return out


def plot_loss_curve(curve: dict[str, Any], score: ICLScore, path: str | Path, title: str) -> None:
    """Mean loss against log token index (raw and log-binned) and its derivative per log index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = np.array(curve["index"], dtype=float)
    mean = np.array([np.nan if v is None else v for v in curve["mean_loss"]], dtype=float)
    bins = curve["log_bins"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True, height_ratios=(2, 1))
    ax.plot(index, mean, lw=0.6, alpha=0.5, color="tab:blue", label="per token index")
    ax.plot(bins["centre"], bins["mean_loss"], "o-", color="tab:blue", ms=3, label="log-binned")
    for t in (score.early, score.late):
        ax.axvline(t, color="grey", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(
        f"{title}\nICL score {score.score:+.3f} nats "
        f"[{score.ci_low:+.3f}, {score.ci_high:+.3f}] (L{score.late} - L{score.early}, n={score.n_contexts})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax2.plot(bins["centre"], bins["dloss_dlog_index"], "o-", color="tab:red", ms=3)
    ax2.axhline(0, color="grey", lw=0.6)
    ax2.set_xscale("log")
    ax2.set_xlabel("token index (1-based, log scale)")
    ax2.set_ylabel("d loss / d ln(index)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
