"""Batches of prompts bounded by a row count and by a padded-token budget.

A batch's memory (activations in the forward pass, the KV cache while generating) grows with its rows times
its longest prompt, so a budget on ``rows x (longest + new tokens)`` keeps peak memory flat when prompts get
longer: twice as long prompts give batches of half as many rows. Results do not depend on the batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None, extra: int = 0
) -> list[list[int]]:
    """Group prompt indices, shortest first, into batches of at most ``batch_size`` rows whose padded size
    ``rows x (longest length + extra)`` stays within ``max_tokens`` (None: no budget).

    A prompt longer than the budget on its own still gets a batch of one row. Every index appears once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i] + extra  # ``order`` is ascending: the newcomer is the longest
        too_many = len(current) >= batch_size
        too_big = max_tokens is not None and current and (len(current) + 1) * longest > max_tokens
        if too_many or too_big:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


#: Share of the available memory (free GPU memory on a GPU) that batches may fill when the budget is "auto".
AUTO_MEMORY_SHARE = 0.25
#: Bounds of the automatic prefill budget, in padded tokens. Above the upper bound CPU matmuls gain nothing
#: (benchmarks/README.md); below the lower one the per-call overhead dominates.
AUTO_MIN_TOKENS = 512
AUTO_MAX_TOKENS = 8192
#: Sequence length the per-token cost of attention scores is reckoned at (scores grow with it).
AUTO_SEQ = 512


@dataclass(frozen=True)
class BatchBudget:
    """The batching a run uses: the prefill token budget, the KV-cache bytes a decoding batch may hold and
    how they were chosen (written to ``run.json``)."""

    max_batch_tokens: int | None
    decode_bytes: int | None
    rule: str
    available_bytes: int | None = None
    bytes_per_token: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _available_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device, else the machine's available memory."""
    from conceptprobe.models.plan import local_cpu_memory

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return local_cpu_memory()


def prefill_bytes_per_token(config: Any, dtype_bytes: int, seq: int = AUTO_SEQ) -> int:
    """Memory one prompt token costs while prefilling: one layer's transient activations (the memory
    model of :mod:`conceptprobe.models.plan`, attention scores reckoned at ``seq``) plus the KV cache of
    every layer, which is kept until the answers are decoded."""
    from conceptprobe.models.plan import Shape, layer_activation_bytes

    shape = Shape.of(config)
    activations = layer_activation_bytes(shape, 1, seq, dtype_bytes, eager=False) / seq
    kv = sum(shape.kv_bytes(layer, 1, 1, dtype_bytes) for layer in range(shape.n_layers))
    return int(activations + kv)


def batch_budget(model: torch.nn.Module, setting: int | str | None = "auto") -> BatchBudget:
    """The batching for ``model``: ``setting`` an int (that token budget), None (rows alone) or "auto".

    "auto" sizes the prefill budget from memory: :data:`AUTO_MEMORY_SHARE` of the available memory (free
    memory of the model's GPU on a GPU) divided by :func:`prefill_bytes_per_token`, within
    [:data:`AUTO_MIN_TOKENS`, :data:`AUTO_MAX_TOKENS`]. Decoding batches may hold that share of memory in
    KV cache in every case. Peak memory stays flat in prompt length, since batches are bounded in tokens.
    """
    device = model.get_input_embeddings().weight.device
    available = _available_bytes(device)
    share = int(AUTO_MEMORY_SHARE * available)
    if setting != "auto":
        tokens = None if setting is None else int(setting)
        return BatchBudget(tokens, share, f"max_batch_tokens={setting} as set", available)
    dtype_bytes = model.get_input_embeddings().weight.element_size()
    per_token = prefill_bytes_per_token(model.config, dtype_bytes)
    tokens = max(AUTO_MIN_TOKENS, min(AUTO_MAX_TOKENS, share // per_token))
    where = f"free memory of {device}" if device.type == "cuda" else "available memory"
    rule = (
        f"auto: {AUTO_MEMORY_SHARE:.0%} of the {where} ({available / 2**30:.1f} GiB) / "
        f"{per_token / 2**10:.0f} KiB per prompt token, within [{AUTO_MIN_TOKENS}, {AUTO_MAX_TOKENS}]"
    )
    return BatchBudget(int(tokens), share, rule, available, per_token)
