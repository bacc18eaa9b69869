"""Batched prefill with capture, then greedy decoding that reuses the prompt's KV cache.

The prefill runs the decoder-only body (not the ``*ForCausalLM`` wrapper) so that logits are computed
only for the rows that need them, as a contiguous 2-D tensor through the unembedding (measured:
``logits_to_keep=1`` is slow on torch 2.13's CPU path). Decoding steps feed one token per row with
the cache; positions come from the attention mask, so left padding changes nothing.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

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


@torch.inference_mode()
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
    """One prefill (capturing rows at ``last_index + offset``), then greedy decoding.

    Returns the captured rows ``[batch, layers, len(offsets), d]`` (or None) and the generated text of
    each row, cut at the first ``stop`` string. With ``max_new_tokens == 0`` nothing is generated and,
    if a capture is given, the forward pass stops after its last layer. ``timer`` (if given) accumulates
    seconds under ``forward_s`` (the prefill) and ``generate_s`` (the decoding steps).
    """
    t_start = time.perf_counter()
    body = base_model(model)
    device = _device(model)
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    pos = position_ids(mask)
    acts = None
    if capture is not None:
        last = batch.last_index.unsqueeze(1)
        capture.set_positions(last + torch.tensor(offsets, dtype=torch.long).unsqueeze(0))
    if max_new_tokens == 0:
        if capture is None:
            return None, [""] * ids.shape[0]
        capture.stop_after_last = True
        try:
            body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        except StopForward:
            pass
        finally:
            capture.stop_after_last = False
        _add_seconds(timer, time.perf_counter() - t_start, 0.0)
        return capture.take(), [""] * ids.shape[0]

    cache_kw = _cache_kwarg(body)
    out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    if capture is not None:
        acts = capture.take()
        capture.enabled = False
    t_decode = time.perf_counter()
    try:
        cache = _cache_of(out)
        hidden = out.last_hidden_state[:, -1, :]
        batch_size = ids.shape[0]
        generated: list[list[int]] = [[] for _ in range(batch_size)]
        done = torch.zeros(batch_size, dtype=torch.bool)
        eos = tokenizer.eos_token_id
        texts = [""] * batch_size
        next_pos = pos[:, -1:] + 1
        for step in range(max_new_tokens):
            logits = logits_from_hidden(model, hidden)
            token = logits.argmax(dim=-1).cpu()
            for row in range(batch_size):
                if done[row]:
                    continue
                if eos is not None and token[row].item() == eos:
                    done[row] = True
                    continue
                generated[row].append(int(token[row]))
                texts[row] = tokenizer.decode(generated[row], skip_special_tokens=True)
                if stop and stop in texts[row]:
                    done[row] = True
            if bool(done.all()) or step == max_new_tokens - 1:
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
    finally:
        if capture is not None:
            capture.enabled = True
    _add_seconds(timer, t_decode - t_start, time.perf_counter() - t_decode)
    cut = [t.split(stop, 1)[0] if stop else t for t in texts]
    return acts, cut


def _add_seconds(timer: dict[str, float] | None, forward: float, generate: float) -> None:
    """Accumulate prefill and decoding seconds into ``timer`` (if given)."""
    if timer is not None:
        timer["forward_s"] = timer.get("forward_s", 0.0) + forward
        timer["generate_s"] = timer.get("generate_s", 0.0) + generate
