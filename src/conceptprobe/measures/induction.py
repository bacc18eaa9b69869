"""Induction heads (Olsson et al. 2022): prefix-matching and copying scores per layer and head.

Input: ``n_seqs`` sequences of ``seq_len`` distinct random tokens repeated ``n_repeats`` times, after the
special prefix the tokenizer itself adds (Gemma's ``<bos>``; none for SmolLM2/Qwen). Random tokens are
drawn from a mid-frequency band: token frequencies are counted on sample text, the tokens that occur
are ranked by count, and the top and bottom ``drop_frac`` (default 4%) of that ranking, special tokens
and unseen tokens are excluded (without sample text: non-special ids with the lowest and highest
``drop_frac`` of ids removed, since BPE ids roughly follow merge order).

**Prefix matching** of a head: for every query position in repeats 2..n_repeats, the attention it puts
on all positions ``k`` whose previous token ``k - 1`` is an earlier copy of the query's token (the
tokens that *followed* its earlier copies), summed over those positions; averaged over queries and
sequences. In ``[0, 1]``; 1 = a perfect induction pattern. Attention weights are the model's own
(eager attention, ``output_attentions=True``).

**Copying** of a head (direct path, OV circuit to the unembedding): for each source token ``s`` at its
first-repeat position, take the residual stream entering that layer, apply the layer's input norm, the
head's value projection (its grouped-query kv head ``head // (n_heads // n_kv_heads)``) and its slice of
the output projection (no biases of ``o_proj``: they are not per head), then the norm on the attention
output where the block has one (Gemma-2/3 sandwich, Olmo-2 post-norm), the final norm and the
unembedding (no soft-capping)
-> logits ``z`` over a candidate set (default: the sequence's own ``seq_len`` random tokens; or the
whole vocabulary). With ``c = z - mean(z)``:
``copy(s) = ReLU(c_s) / sum_j ReLU(c_j) - ReLU(-c_s) / sum_j ReLU(-c_j)``,
the share of the positive logit mass that lands on ``s`` minus its share of the negative mass. It lies in
``[-1, 1]``: +1 = the head raises only ``s``, -1 = it lowers only ``s``, and its expectation is 0 for a
head unrelated to ``s``. The head's score is the mean over source tokens. Both norms act per row, so the
scores do not depend on their rescaling; only their per-dimension gains matter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from conceptprobe.models.layers import decoder_layers, final_norm

THRESHOLD = 0.4


# ---------------------------------------------------------------- token sampling


def candidate_token_ids(
    tokenizer: Any, texts: Sequence[str] | None = None, drop_frac: float = 0.04, vocab_size: int | None = None
) -> np.ndarray:
    """Token ids to sample random sequences from: mid-frequency, non-special (see the module doc)."""
    vocab = vocab_size or len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if texts:
        counts = np.zeros(vocab, dtype=np.int64)
        for text in texts:
            ids = np.asarray(
                tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64
            )
            ids = ids[(ids >= 0) & (ids < vocab)]
            counts += np.bincount(ids, minlength=vocab)
        seen = np.array([i for i in np.flatnonzero(counts) if i not in special], dtype=np.int64)
        order = seen[np.lexsort((seen, -counts[seen]))]  # by count desc, then id
        k = math.ceil(drop_frac * len(order))
        kept = np.sort(order[k : len(order) - k])
        if len(kept) >= 50:
            return kept
    ids = np.array([i for i in range(vocab) if i not in special], dtype=np.int64)
    k = math.ceil(drop_frac * len(ids))
    return ids[k : len(ids) - k]


def repeated_random_tokens(
    candidates: Sequence[int] | np.ndarray,
    n_seqs: int = 10,
    seq_len: int = 25,
    n_repeats: int = 4,
    prefix: Sequence[int] = (),
    seed: int = 0,
) -> torch.Tensor:
    """``[n_seqs, len(prefix) + seq_len * n_repeats]``: distinct random tokens repeated, after ``prefix``."""
    cands = np.asarray(candidates, dtype=np.int64)
    if len(cands) < seq_len:
        raise ValueError(f"only {len(cands)} candidate tokens for sequences of {seq_len} distinct tokens")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_seqs):
        seq = rng.choice(cands, size=seq_len, replace=False).tolist()
        rows.append(list(prefix) + seq * n_repeats)
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------- prefix matching (pure)


def prefix_matching_targets(ids: torch.Tensor, first_query: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target mask ``[B, T, T]`` (query, key) and query mask ``[B, T]`` of the prefix-matching score.

    Key ``k`` is a target of query ``q`` when ``1 <= k <= q`` and ``ids[k - 1] == ids[q]`` with
    ``k - 1 < q`` (``k`` follows an earlier copy of the query's token). Queries are positions
    ``>= first_query`` with at least one target.
    """
    _, t = ids.shape
    prev = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :-1]], dim=1)  # token before each key
    same = prev[:, None, :] == ids[:, :, None]  # [B, q, k]: ids[k-1] == ids[q]
    q_idx = torch.arange(t)[:, None]
    k_idx = torch.arange(t)[None, :]
    causal = (k_idx >= 1) & (k_idx <= q_idx)
    targets = same & causal[None]
    queries = targets.any(-1) & (torch.arange(t) >= first_query)[None]
    return targets & queries[..., None], queries


def prefix_matching_scores(attn: torch.Tensor, ids: torch.Tensor, first_query: int) -> torch.Tensor:
    """Prefix-matching score per head from attention ``[B, H, T, T]`` (or ``[L, B, H, T, T]``).

    Mean over the selected queries (all sequences) of the attention summed over their targets.
    """
    targets, queries = prefix_matching_targets(ids, first_query)
    n = queries.sum()
    if n == 0:
        raise ValueError("no query position has an earlier copy of its token")
    mass = (attn.float() * targets[:, None].float()).sum(-1)  # [..., B, H, T]
    return (mass * queries[:, None].float()).sum(dim=(-3, -1)) / n


# ---------------------------------------------------------------- copying (pure part)


def copying_from_logits(logits: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Per-row copying score in ``[-1, 1]`` of ``logits [..., C]`` for the column ``source [...]``.

    ``c = logits - mean``; score = ``ReLU(c_s)/sum ReLU(c) - ReLU(-c_s)/sum ReLU(-c)`` (0/0 -> 0).
    """
    c = logits.float() - logits.float().mean(-1, keepdim=True)
    pos, neg = c.clamp(min=0), (-c).clamp(min=0)
    src = source[..., None]
    share_pos = pos.gather(-1, src)[..., 0] / pos.sum(-1).clamp(min=1e-30)
    share_neg = neg.gather(-1, src)[..., 0] / neg.sum(-1).clamp(min=1e-30)
    return share_pos - share_neg


# ---------------------------------------------------------------- model side


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch the model to eager attention (which returns weights) for the duration."""
    previous = getattr(model.config, "_attn_implementation", None)
    switch = previous != "eager" and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch and previous is not None:
            model.set_attn_implementation(previous)


def head_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, head_dim)`` from the config."""
    cfg = model.config
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    return n_heads, n_kv, head_dim


def kv_head(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The key/value head a query head reads under grouped-query attention."""
    return head // (n_heads // n_kv_heads)


@torch.inference_mode()
def attention_and_residuals(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Attention weights ``[L, B, H, T, T]`` (float32, CPU) and the residual stream entering each layer."""
    device = next(model.parameters()).device
    ids_d = ids.to(device)
    with eager_attention(model):
        out = model(
            input_ids=ids_d,
            attention_mask=torch.ones_like(ids_d),
            output_attentions=True,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
    if not out.attentions or any(a is None for a in out.attentions):
        raise RuntimeError("the model returned no attention weights even in eager mode; cannot score heads")
    attn = torch.stack([a.float().cpu() for a in out.attentions])
    n_layers = len(decoder_layers(model))
    residuals = list(out.hidden_states[:n_layers])  # entry l = input of layer l (last entry is final-normed)
    return attn, residuals


def _normed_attention_output(layer: nn.Module) -> bool:
    """Whether ``post_attention_layernorm`` acts on the attention output (Gemma-2/3 sandwich, Olmo-2
    post-norm) rather than before the MLP (Llama, Qwen, Mistral)."""
    if not hasattr(layer, "post_attention_layernorm"):
        return False
    return hasattr(layer, "pre_feedforward_layernorm") or not hasattr(layer, "input_layernorm")


@torch.inference_mode()
def copying_scores(
    model: nn.Module,
    ids: torch.Tensor,
    residuals: list[torch.Tensor],
    source_positions: Sequence[int],
    candidates: str = "context",
    rows_per_chunk: int = 8,
) -> torch.Tensor:
    """Copying score ``[L, H]`` (see the module doc) from the residuals entering each layer.

    ``candidates``: ``"context"`` (each sequence's tokens at ``source_positions``) or ``"vocab"``.
    """
    if candidates not in ("context", "vocab"):
        raise ValueError(f"candidates must be 'context' or 'vocab', got {candidates!r}")
    layers = decoder_layers(model)
    n_heads, n_kv, head_dim = head_shape(model)
    kv_of = torch.tensor([kv_head(h, n_heads, n_kv) for h in range(n_heads)])
    unembed = model.get_output_embeddings()
    w_u, b_u = unembed.weight, getattr(unembed, "bias", None)
    fnorm = final_norm(model)
    pos = torch.as_tensor(list(source_positions))
    src_ids = ids[:, pos].to(w_u.device)  # [B, S]
    scores = torch.zeros(len(layers), n_heads)
    for li, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "v_proj") or not hasattr(attn, "o_proj"):
            raise NotImplementedError(
                f"copying score needs separate v_proj/o_proj projections; {type(layer).__name__} has none"
            )
        in_norm = getattr(layer, "input_layernorm", None)
        x = residuals[li][:, pos] if in_norm is None else in_norm(residuals[li][:, pos])  # [B, S, d]
        v = attn.v_proj(x).view(*x.shape[:2], n_kv, head_dim)
        if hasattr(attn, "v_norm"):
            v = attn.v_norm(v)
        v = v[:, :, kv_of]  # [B, S, H, dh]
        w_o = attn.o_proj.weight.view(-1, n_heads, head_dim)  # [d, H, dh]
        out = torch.einsum("bshe,dhe->bshd", v, w_o)  # [B, S, H, d]
        if _normed_attention_output(layer):
            out = layer.post_attention_layernorm(out)
        z = fnorm(out)
        total = torch.zeros(n_heads)
        for b in range(z.shape[0]):
            if candidates == "context":
                cand = src_ids[b]  # the sequence's tokens; source s is column s
                logits = z[b] @ w_u[cand].T  # [S, H, S]
                if b_u is not None:
                    logits = logits + b_u[cand]
                col = torch.arange(len(cand), device=logits.device)[:, None].expand(-1, n_heads)
                total += copying_from_logits(logits, col).float().sum(0).cpu()
            else:
                for i in range(0, z.shape[1], rows_per_chunk):
                    zz = z[b, i : i + rows_per_chunk]  # [s, H, d]
                    logits = zz @ w_u.T
                    if b_u is not None:
                        logits = logits + b_u
                    col = src_ids[b, i : i + rows_per_chunk, None].expand(-1, n_heads)
                    total += copying_from_logits(logits, col).float().sum(0).cpu()
        scores[li] = total / (z.shape[0] * z.shape[1])
    return scores


def _gain(norm: nn.Module | None, width: int, like: torch.Tensor) -> torch.Tensor:
    """The per-dimension gain of a norm module (RMSNorm: its output on a vector of RMS 1; LayerNorm: its
    weight); ones for no norm. The per-row rescaling a norm also does is a positive factor, which leaves
    the copying score unchanged."""
    ones = torch.ones(width, dtype=torch.float32, device=like.device)
    if norm is None:
        return ones
    if isinstance(norm, nn.LayerNorm):
        return ones if norm.weight is None else norm.weight.detach().float()
    return norm(torch.ones(1, width, dtype=like.dtype, device=like.device))[0].detach().float()


@torch.inference_mode()
def embedding_unembedding(model: nn.Module, chunk: int = 32768) -> torch.Tensor:
    """``G = W_E^T W_U`` ``[d, d]`` (float64): the token embedding meeting the unembedding, over the whole
    vocabulary (the rows both matrices have), float32 products accumulated in float64 by chunks."""
    w_e = model.get_input_embeddings().weight
    w_u = model.get_output_embeddings().weight
    n = min(w_e.shape[0], w_u.shape[0])
    g = torch.zeros(w_e.shape[1], w_u.shape[1], dtype=torch.float64, device=w_e.device)
    for i in range(0, n, chunk):
        g += (w_e[i : i + chunk].float().T @ w_u[i : i + chunk].float()).double()  # fp32 products, fp64 sum
    return g


@torch.inference_mode()
def ov_copying_scores(model: nn.Module) -> torch.Tensor:
    """Olsson et al.'s copying score of every head ``[L, H]``, from the weights alone.

    The OV circuit of head h in layer l maps a token to logits through the embedding, the layer's input
    norm, the head's value and output projections, the post-attention norm where the block applies one
    to the attention output, the final norm and the unembedding (Elhage et al. 2021, "A Mathematical
    Framework for Transformer Circuits"):

        M_h = W_U  D_f D_post  W_O^h  W_V^h  D_in  W_E^T          (vocab x vocab)

    with the norms folded in as their per-dimension gains D. A head copies when M_h has mostly positive
    eigenvalues; the score is ``sum_i Re(lambda_i) / sum_i |lambda_i|`` in [-1, 1] (Olsson et al. 2022,
    "In-context Learning and Induction Heads", the copying summary; TransformerLens's OV-circuit eigenvalue
    check). Since ``eig(AB)`` and ``eig(BA)`` share their non-zero values, the eigenvalues are computed on the
    ``d_head x d_head`` matrix ``W_V^h D_in (W_E^T W_U) D_f D_post W_O^h`` over the full vocabulary, exactly.
    Gemma's embedding scale and logit soft-capping are positive monotone factors and are left out.
    """
    layers = decoder_layers(model)
    n_heads, n_kv, head_dim = head_shape(model)
    g = embedding_unembedding(model)
    w = model.get_output_embeddings().weight
    d = g.shape[0]
    g_final = _gain(final_norm(model), d, w).double()
    scores = torch.zeros(len(layers), n_heads)
    for li, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "v_proj") or not hasattr(attn, "o_proj"):
            raise NotImplementedError(
                f"the OV copying score needs separate v_proj/o_proj projections; {type(layer).__name__} has none"
            )
        g_in = _gain(getattr(layer, "input_layernorm", None), d, w).double()
        g_post = (
            _gain(layer.post_attention_layernorm, d, w).double()
            if _normed_attention_output(layer)
            else torch.ones(d, dtype=torch.float64, device=g.device)
        )
        inner = g_in[:, None] * g * (g_final * g_post)[None, :]  # D_in G D_f D_post
        w_v = attn.v_proj.weight.double().view(n_kv, head_dim, -1)  # [kv, dh, d]
        if hasattr(attn, "v_norm"):
            w_v = w_v * _gain(attn.v_norm, head_dim, w).double()[None, :, None]
        w_o = attn.o_proj.weight.double().view(-1, n_heads, head_dim)  # [d, H, dh]
        for h in range(n_heads):
            a = w_v[kv_head(h, n_heads, n_kv)] @ inner @ w_o[:, h]  # [dh, dh]
            lam = torch.linalg.eigvals(a)
            total = lam.abs().sum()
            scores[li, h] = float(lam.real.sum() / total) if total > 0 else 0.0
    return scores


@dataclass
class HeadScores:
    """Per-layer, per-head scores and how they were measured."""

    prefix_matching: torch.Tensor  # [L, H]
    copying: torch.Tensor | None  # [L, H]; None when the architecture's projections are not supported
    ids: torch.Tensor
    n_prefix: int
    settings: dict[str, Any]

    def heads_above(self, threshold: float = THRESHOLD) -> list[dict[str, Any]]:
        """Heads with prefix matching >= threshold, best first."""
        rows = []
        for layer, head in (self.prefix_matching >= threshold).nonzero().tolist():
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "prefix_matching": float(self.prefix_matching[layer, head]),
                    "copying": None if self.copying is None else float(self.copying[layer, head]),
                }
            )
        return sorted(rows, key=lambda r: -r["prefix_matching"])


def induction_head_scores(
    model: nn.Module,
    candidates: Sequence[int] | np.ndarray,
    prefix: Sequence[int] = (),
    n_seqs: int = 10,
    seq_len: int = 25,
    n_repeats: int = 4,
    seed: int = 0,
    copy_over: str = "context",
    batch_size: int = 10,
) -> HeadScores:
    """Prefix-matching and copying scores of every head (see the module doc)."""
    if n_repeats < 2:
        raise ValueError("need at least 2 repeats")
    ids = repeated_random_tokens(candidates, n_seqs, seq_len, n_repeats, prefix, seed)
    p = len(prefix)
    first_query = p + seq_len
    prefix_sum: torch.Tensor | None = None
    copy_sum: torch.Tensor | None = None
    copy_error: str | None = None
    n_done = 0
    for b in range(0, n_seqs, batch_size):
        chunk = ids[b : b + batch_size]
        attn, residuals = attention_and_residuals(model, chunk)
        pm = prefix_matching_scores(attn, chunk, first_query) * chunk.shape[0]
        prefix_sum = pm if prefix_sum is None else prefix_sum + pm
        if copy_error is None:
            try:
                cp = (
                    copying_scores(model, chunk, residuals, range(p, p + seq_len), copy_over) * chunk.shape[0]
                )
                copy_sum = cp if copy_sum is None else copy_sum + cp
            except NotImplementedError as exc:
                copy_error, copy_sum = str(exc), None
        n_done += chunk.shape[0]
    assert prefix_sum is not None
    settings = {
        "n_seqs": n_seqs,
        "seq_len": seq_len,
        "n_repeats": n_repeats,
        "seed": seed,
        "prefix": list(prefix),
        "n_candidates": len(candidates),
        "copy_over": copy_over,
        "copy_error": copy_error,
    }
    return HeadScores(
        prefix_matching=prefix_sum / n_done,
        copying=None if copy_sum is None else copy_sum / n_done,
        ids=ids,
        n_prefix=p,
        settings=settings,
    )


def plot_heatmap(
    matrix: torch.Tensor | np.ndarray,
    path: str | Path,
    title: str,
    vmin: float,
    vmax: float,
    cmap: str = "viridis",
    marks: list[tuple[int, int]] | None = None,
) -> None:
    """A block x head heatmap (decoder blocks on the y axis, 0 at the top), optional marked cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=float)
    n_layers, n_heads = m.shape
    fig, ax = plt.subplots(figsize=(max(4.2, 0.45 * n_heads + 2), max(3.0, 0.22 * n_layers + 1.2)))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto", interpolation="nearest")
    for layer, head in marks or []:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("decoder block b (reads layer b, writes layer b+1)")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
