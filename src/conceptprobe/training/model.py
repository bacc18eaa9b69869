"""Small transformers built from transformers' own configs (GPT-2 or Llama), no dropout.

- :class:`RegressionTransformer`: a linear read-in of real-valued tokens into ``inputs_embeds`` of a
  ``GPT2Model`` / ``LlamaModel`` backbone and a linear read-out to one number per position.
- :func:`build_lm`: a ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` for token sequences; with
  ``attention_only`` every MLP is replaced by :class:`ZeroMLP` (the residual stream only passes
  through attention, as in Olsson et al.'s attention-only models). Both are ordinary transformers
  models, so :mod:`conceptprobe.measures.induction` scores their heads unchanged. The LM, its spec and
  config live in :mod:`conceptprobe.models.small_lm` (the model loader rebuilds training checkpoints from
  them) and are re-exported here.

**Layers.** :func:`residual_stream` returns ``n_layers + 1`` vectors per position: index 0 is the input of
the first block (embeddings, plus learned positions for GPT-2), index ``l`` the output of block ``l``
(the last one *before* the final norm, unlike HF's last ``hidden_states`` entry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from conceptprobe.hooks import on_layer
from conceptprobe.models.small_lm import (
    ModelSpec,
    ZeroMLP,
    blocks,
    build_lm,
    lm_blocks,
    lm_config,
    strip_mlps,
)

__all__ = [
    "ModelSpec",
    "RegressionTransformer",
    "ZeroMLP",
    "blocks",
    "build_lm",
    "build_regression_model",
    "lm_blocks",
    "lm_config",
    "n_parameters",
    "residual_stream",
    "strip_mlps",
]


class RegressionTransformer(nn.Module):
    """Real-valued tokens ``[B, T, token_dim]`` -> one prediction per position ``[B, T]``."""

    def __init__(self, spec: ModelSpec, token_dim: int, n_positions: int) -> None:
        super().__init__()
        from transformers import GPT2Model, LlamaModel

        self.spec = spec
        cfg = lm_config(spec, vocab_size=1, n_positions=n_positions)
        self.config = cfg
        self.read_in = nn.Linear(token_dim, spec.d_model)
        self.backbone = GPT2Model(cfg) if spec.arch == "gpt2" else LlamaModel(cfg)
        if spec.attention_only:
            strip_mlps(self.backbone)
        self.read_out = nn.Linear(spec.d_model, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(inputs_embeds=self.read_in(tokens), use_cache=False).last_hidden_state
        return self.read_out(hidden).squeeze(-1)

    @property
    def blocks(self) -> nn.ModuleList:
        return blocks(self.backbone)


def build_regression_model(spec: ModelSpec, token_dim: int, n_positions: int) -> RegressionTransformer:
    """A :class:`RegressionTransformer` in training mode, initialised from torch's global generator."""
    return RegressionTransformer(spec, token_dim, n_positions)


def residual_stream(
    layer_blocks: nn.ModuleList, run: Any, positions: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """``[n_layers + 1, B, len(positions), d]``: the residual stream at ``positions`` (see the module doc).

    ``run()`` performs the forward pass; hooks on the blocks keep only the requested rows.
    """
    pos = torch.as_tensor(positions, dtype=torch.long)
    rows: list[torch.Tensor | None] = [None] * (len(layer_blocks) + 1)

    def keeper(index: int) -> Any:
        def keep(tensor: torch.Tensor) -> None:
            rows[index] = tensor[:, pos].detach().float().cpu()

        return keep

    handles = [on_layer(layer_blocks, i, keeper(i)) for i in range(len(layer_blocks) + 1)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    if any(r is None for r in rows):
        raise RuntimeError("a block did not run; cannot read its residual stream")
    return torch.stack(rows)  # type: ignore[arg-type]


def n_parameters(model: nn.Module) -> int:
    """Trainable parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
