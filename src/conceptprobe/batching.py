"""Batches of prompts bounded by a row count and by a padded-token budget.

A batch's memory (activations in the forward pass, the KV cache while generating) grows with its rows times
its longest prompt, so a budget on ``rows x (longest + new tokens)`` keeps peak memory flat when prompts get
longer: twice as long prompts give batches of half as many rows. Results do not depend on the batching.
"""

from __future__ import annotations

from collections.abc import Sequence


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
