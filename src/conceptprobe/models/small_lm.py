"""Small causal LMs built from transformers' own configs (GPT-2 or Llama), no dropout: the architecture of
``conceptprobe train``'s models, here so that the model loader can rebuild a training checkpoint
(:mod:`conceptprobe.models.training_checkpoint`) without importing the training package.

- :class:`ModelSpec`: the architecture (``arch``, layers, heads, width, MLP width, attention-only).
- :func:`lm_config`: the ``GPT2Config`` / ``LlamaConfig`` of a spec.
- :func:`build_lm`: a ``GPT2LMHeadModel`` / ``LlamaForCausalLM``; with ``attention_only`` every MLP is
  replaced by :class:`ZeroMLP` (the residual stream only passes through attention, as in Olsson et al.'s
  attention-only models).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a trained model. ``d_mlp`` defaults to ``4 * d_model``; ``activation`` is the MLP's
    (transformers' names; exact ``gelu`` is ~1.5x faster on CPU than GPT-2's tanh ``gelu_new``)."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 64
    d_mlp: int | None = None
    attention_only: bool = False
    tie_embeddings: bool = False
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"arch must be 'gpt2' or 'llama'; got {self.arch!r}")
        if self.n_layer < 1 or self.n_head < 1 or self.d_model < 1:
            raise ValueError("n_layer, n_head and d_model must be >= 1")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ZeroMLP(nn.Module):
    """Stands in for a block's MLP: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def lm_config(spec: ModelSpec, vocab_size: int, n_positions: int) -> Any:
    """The ``GPT2Config`` / ``LlamaConfig`` of ``spec`` (no dropout; token 0 is BOS, EOS and padding)."""
    from transformers import GPT2Config, LlamaConfig

    d_mlp = spec.d_mlp or 4 * spec.d_model
    if spec.arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_positions=n_positions,
            n_embd=spec.d_model,
            n_layer=spec.n_layer,
            n_head=spec.n_head,
            n_inner=d_mlp,
            activation_function=spec.activation,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=spec.tie_embeddings,
            bos_token_id=0,
            eos_token_id=0,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            max_position_embeddings=n_positions,
            hidden_size=spec.d_model,
            intermediate_size=d_mlp,
            hidden_act=spec.activation,
            num_hidden_layers=spec.n_layer,
            num_attention_heads=spec.n_head,
            num_key_value_heads=spec.n_head,
            attention_dropout=0.0,
            tie_word_embeddings=spec.tie_embeddings,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    cfg._attn_implementation = "sdpa"
    return cfg


def blocks(backbone: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a ``GPT2Model`` (``h``) or ``LlamaModel`` (``layers``)."""
    found = getattr(backbone, "h", None) or getattr(backbone, "layers", None)
    if not isinstance(found, nn.ModuleList):
        raise TypeError(f"{type(backbone).__name__} has no decoder blocks at .h or .layers")
    return found


def strip_mlps(backbone: nn.Module) -> None:
    """Replace every block's MLP by :class:`ZeroMLP`."""
    for block in blocks(backbone):
        block.mlp = ZeroMLP()


def build_lm(spec: ModelSpec, vocab_size: int, n_positions: int) -> nn.Module:
    """A causal LM (``GPT2LMHeadModel`` or ``LlamaForCausalLM``), attention-only if the spec says so."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cfg = lm_config(spec, vocab_size, n_positions)
    model = GPT2LMHeadModel(cfg) if spec.arch == "gpt2" else LlamaForCausalLM(cfg)
    if spec.attention_only:
        strip_mlps(model.transformer if spec.arch == "gpt2" else model.model)
    return model


def lm_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a model from :func:`build_lm`."""
    return blocks(model.transformer if hasattr(model, "transformer") else model.model)
