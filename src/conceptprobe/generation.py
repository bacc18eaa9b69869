"""Batched prefill with capture, then greedy decoding that reuses the prompt's KV cache.

The prefill runs the decoder-only body (not the ``*ForCausalLM`` wrapper) so that logits are computed
only for the rows that need them, as a contiguous 2-D tensor through the unembedding (measured:
``logits_to_keep=1`` is slow on torch 2.13's CPU path). Decoding steps feed one token per row with
the cache; positions come from the attention mask, so left padding changes nothing.

Decoding is cheap arithmetic but a fixed overhead per step, so answers are decoded in wide batches: the
prompts are prefilled in token-budget batches (bounded activation memory), their KV caches are kept and
merged, left padded, into one decoding batch per ``decode_bytes`` of cache
(:func:`capture_and_generate_batches`). Rows stop at their newline; the batch stops when all rows have.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from conceptprobe.hooks import ResidualCapture, StopForward
from conceptprobe.models.layers import base_model, logits_from_hidden


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [batch, seq], left padded
    attention_mask: torch.Tensor  # [batch, seq]

    @property
    def last_index(self) -> torch.Tensor:
        """Index of each row's last real token (``seq - 1`` for every row under left padding)."""
        seq = self.attention_mask.shape[1]
        idx = torch.arange(seq).expand_as(self.attention_mask)
        return torch.where(self.attention_mask.bool(), idx, -1).max(dim=1).values


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> Encoded:
    """Tokenize with left padding (the tokenizer adds BOS if its model expects one)."""
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return Encoded(enc["input_ids"], enc["attention_mask"])


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (pads get 0), as generate() computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _cache_kwarg(body: nn.Module) -> str:
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(output: object) -> object:
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@dataclass
class Prefilled:
    """A prefilled batch waiting for its answers: KV cache, last hidden state, mask and next positions."""

    cache: Any
    hidden: torch.Tensor  # [batch, d]: the last position's output of the final norm's input
    mask: torch.Tensor  # [batch, seq]
    next_pos: torch.Tensor  # [batch, 1]

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]


def kv_bytes(cache: Any) -> int:
    """Bytes held by a cache's key and value tensors (0 if its layout is unknown)."""
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _mergeable(cache: Any) -> bool:
    """Whether a cache is a list of dynamic (full or sliding-window) layers that :func:`merge` understands."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    for layer in layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            return False
        if getattr(layer, "record_past", False) or not getattr(layer, "is_initialized", False):
            return False
    return True


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge(parts: Sequence[Prefilled]) -> Prefilled | None:
    """One batch from several prefilled batches: each left-padded to the longest, rows stacked.

    Full-attention layers keep every position; a sliding-window layer keeps the last ``window - 1``
    (as :class:`~transformers.cache_utils.DynamicSlidingWindowLayer` does), right-aligned, so each row's
    real tokens keep their distances to the next token. Pads are masked. Returns None (decode the parts
    one by one) when a cache is not made of dynamic layers of the same kinds.
    """
    if len(parts) == 1:
        return parts[0]
    caches = [p.cache for p in parts]
    if not all(_mergeable(c) for c in caches):
        return None
    kinds = [tuple(type(layer) for layer in c.layers) for c in caches]
    if len(set(kinds)) != 1:
        return None
    seq = max(p.mask.shape[1] for p in parts)
    merged = caches[0]
    for i, layer in enumerate(merged.layers):
        window = getattr(layer, "sliding_window", None)
        keep = seq if window is None else min(seq, int(window) - 1)
        keys = [_left_pad(c.layers[i].keys, keep, dim=-2) for c in caches]
        values = [_left_pad(c.layers[i].values, keep, dim=-2) for c in caches]
        layer.keys, layer.values = torch.cat(keys), torch.cat(values)
        if window is not None:
            layer.cumulative_length = seq
    return Prefilled(
        merged,
        torch.cat([p.hidden for p in parts]),
        torch.cat([_left_pad(p.mask, seq, dim=1) for p in parts]),
        torch.cat([p.next_pos for p in parts]),
    )


@torch.inference_mode()
def prefill(
    model: nn.Module,
    batch: Encoded,
    capture: ResidualCapture | None,
    offsets: list[int],
    use_cache: bool = True,
    timer: dict[str, float] | None = None,
) -> tuple[torch.Tensor | None, Prefilled | None]:
    """The forward pass over the prompts, capturing rows at ``last_index + offset``.

    With ``use_cache`` the KV cache and last hidden state come back for :func:`decode`; without it (and
    with a capture) the forward pass stops after the last captured layer and returns no state.
    """
    t_start = time.perf_counter()
    body = base_model(model)
    device = _device(model)
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    pos = position_ids(mask)
    if capture is not None:
        last = batch.last_index.unsqueeze(1)
        capture.set_positions(last + torch.tensor(offsets, dtype=torch.long).unsqueeze(0))
    if not use_cache:
        if capture is None:
            return None, None
        capture.stop_after_last = True
        try:
            body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        except StopForward:
            pass
        finally:
            capture.stop_after_last = False
        _add_seconds(timer, "forward_s", time.perf_counter() - t_start)
        return capture.take(), None
    out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    acts = capture.take() if capture is not None else None
    state = Prefilled(_cache_of(out), out.last_hidden_state[:, -1, :], mask, pos[:, -1:] + 1)
    _add_seconds(timer, "forward_s", time.perf_counter() - t_start)
    return acts, state


@torch.inference_mode()
def decode(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    state: Prefilled,
    max_new_tokens: int,
    stop: str = "\n",
    timer: dict[str, float] | None = None,
) -> list[str]:
    """Greedy decoding from a prefilled state; each row stops at ``stop`` or EOS, the batch when all have.

    Returns each row's text cut at the first ``stop``. Hooks on the model (a capture) must be disabled by
    the caller: decoding steps are not prompt positions.
    """
    t_start = time.perf_counter()
    body = base_model(model)
    device = _device(model)
    cache_kw = _cache_kwarg(body)
    cache, hidden, mask, next_pos = state.cache, state.hidden, state.mask, state.next_pos
    rows = state.rows
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    eos = tokenizer.eos_token_id
    texts = [""] * rows
    for step in range(max_new_tokens):
        token = logits_from_hidden(model, hidden).argmax(dim=-1).cpu()
        for row, tok in enumerate(token.tolist()):
            if done[row]:
                continue
            if eos is not None and tok == eos:
                done[row] = True
                continue
            generated[row].append(tok)
            texts[row] = tokenizer.decode(generated[row], skip_special_tokens=True)
            if stop and stop in texts[row]:
                done[row] = True
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = body(
            input_ids=token.unsqueeze(1).to(device),
            attention_mask=mask,
            position_ids=next_pos,
            use_cache=True,
            **{cache_kw: cache},
        )
        cache = _cache_of(out)
        hidden = out.last_hidden_state[:, -1, :]
        next_pos = next_pos + 1
    _add_seconds(timer, "generate_s", time.perf_counter() - t_start)
    return [t.split(stop, 1)[0] if stop else t for t in texts]


def capture_and_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: Encoded,
    capture: ResidualCapture | None,
    offsets: list[int],
    max_new_tokens: int,
    stop: str = "\n",
    timer: dict[str, float] | None = None,
) -> tuple[torch.Tensor | None, list[str]]:
    """One prefill (capturing rows at ``last_index + offset``), then greedy decoding of the same rows.

    Returns the captured rows ``[batch, layers, len(offsets), d]`` (or None) and the generated text of
    each row, cut at the first ``stop`` string. With ``max_new_tokens == 0`` nothing is generated and,
    if a capture is given, the forward pass stops after its last layer. ``timer`` (if given) accumulates
    seconds under ``forward_s`` (the prefill) and ``generate_s`` (the decoding steps).
    """
    got = capture_and_generate_batches(
        model, tokenizer, [batch], capture, offsets, max_new_tokens, stop=stop, timer=timer
    )
    return got[0]


def capture_and_generate_batches(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batches: Sequence[Encoded],
    capture: ResidualCapture | None,
    offsets: list[int],
    max_new_tokens: int,
    *,
    stop: str = "\n",
    decode_bytes: int | None = None,
    timer: dict[str, float] | None = None,
    on_prefill: Callable[[int], None] | None = None,
) -> list[tuple[torch.Tensor | None, list[str]]]:
    """Prefill each batch (capturing), then decode the answers of many batches together.

    Prefill batches stay within the token budget they were planned with; their KV caches are merged
    (:func:`merge`) into decoding batches of up to ``decode_bytes`` of cache (None: all batches at once),
    so a decoding step runs many rows instead of one prefill batch's few. Returns ``(acts, texts)`` per
    batch, in order; results equal :func:`capture_and_generate` on each batch alone. ``on_prefill`` is
    called with each prefilled batch's row count (for progress bars).
    """
    results: list[tuple[torch.Tensor | None, list[str]]] = [(None, [])] * len(batches)
    pending: list[tuple[int, Prefilled]] = []
    held = 0

    def flush() -> None:
        nonlocal held
        if not pending:
            return
        if capture is not None:
            capture.enabled = False
        try:
            merged = merge([s for _, s in pending])
            groups = [(merged, pending)] if merged is not None else [(s, [(i, s)]) for i, s in pending]
            for state, group in groups:
                texts = decode(model, tokenizer, state, max_new_tokens, stop, timer)
                start = 0
                for i, part in group:
                    results[i] = (results[i][0], texts[start : start + part.rows])
                    start += part.rows
        finally:
            if capture is not None:
                capture.enabled = True
        pending.clear()
        held = 0

    generate = max_new_tokens > 0
    for i, batch in enumerate(batches):
        acts, state = prefill(model, batch, capture, offsets, use_cache=generate, timer=timer)
        if not generate:
            results[i] = (acts, [""] * batch.input_ids.shape[0])
        else:
            assert state is not None
            size = kv_bytes(state.cache)
            if pending and decode_bytes is not None and held + size > decode_bytes:
                flush()
            results[i] = (acts, [])
            pending.append((i, state))
            held += size
        if on_prefill is not None:
            on_prefill(batch.input_ids.shape[0])
    flush()
    return results


def capture_prompts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batches: Sequence[Sequence[int]],
    capture: ResidualCapture,
    offsets: list[int],
    max_new_tokens: int,
    **kwargs: Any,
) -> tuple[torch.Tensor, list[str]]:
    """:func:`capture_and_generate_batches` over ``texts`` grouped by ``batches`` (index lists, e.g. from
    :func:`~conceptprobe.batching.plan_batches`), returned per prompt in the order of ``texts``:
    activations ``[n, layers, len(offsets), d]`` (float32) and answers. ``kwargs`` go to it."""
    done = capture_and_generate_batches(
        model,
        tokenizer,
        [encode(tokenizer, [texts[i] for i in idx]) for idx in batches],
        capture,
        offsets,
        max_new_tokens,
        **kwargs,
    )
    acts: torch.Tensor | None = None
    answers = [""] * len(texts)
    for idx, (got, out) in zip(batches, done, strict=True):
        assert got is not None
        if acts is None:
            acts = torch.empty(len(texts), *got.shape[1:], dtype=got.dtype)
        acts[list(idx)] = got
        for j, i in enumerate(idx):
            answers[i] = out[j]
    assert acts is not None
    return acts, answers


def _add_seconds(timer: dict[str, float] | None, key: str, seconds: float) -> None:
    """Accumulate seconds under ``key`` (``forward_s`` or ``generate_s``) into ``timer`` (if given)."""
    if timer is not None:
        timer[key] = timer.get(key, 0.0) + seconds
