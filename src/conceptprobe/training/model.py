"""Small transformers built from transformers' own configs (GPT-2 or Llama), no dropout.

- :class:`RegressionTransformer`: a linear read-in of real-valued tokens into ``inputs_embeds`` of a
  ``GPT2Model`` / ``LlamaModel`` backbone and a linear read-out to one number per position.
- :func:`build_lm`: a ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` for token sequences; with
  ``attention_only`` every MLP is replaced by :class:`ZeroMLP` (the residual stream only passes
  through attention, as in Olsson et al.'s attention-only models). Both are ordinary transformers
  models, so :mod:`conceptprobe.measures.induction` scores their heads unchanged.

**Layers.** :func:`residual_stream` returns ``n_layers + 1`` vectors per position: index 0 is the input of
the first block (embeddings, plus learned positions for GPT-2), index ``l`` the output of block ``l``
(the last one *before* the final norm, unlike HF's last ``hidden_states`` entry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from conceptprobe.hooks import on_layer


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


def _config(spec: ModelSpec, vocab_size: int, n_positions: int) -> Any:
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


def _strip_mlps(backbone: nn.Module) -> None:
    for block in blocks(backbone):
        block.mlp = ZeroMLP()


class RegressionTransformer(nn.Module):
    """Real-valued tokens ``[B, T, token_dim]`` -> one prediction per position ``[B, T]``."""

    def __init__(self, spec: ModelSpec, token_dim: int, n_positions: int) -> None:
        super().__init__()
        from transformers import GPT2Model, LlamaModel

        self.spec = spec
        cfg = _config(spec, vocab_size=1, n_positions=n_positions)
        self.config = cfg
        self.read_in = nn.Linear(token_dim, spec.d_model)
        self.backbone = GPT2Model(cfg) if spec.arch == "gpt2" else LlamaModel(cfg)
        if spec.attention_only:
            _strip_mlps(self.backbone)
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


def build_lm(spec: ModelSpec, vocab_size: int, n_positions: int) -> nn.Module:
    """A causal LM (``GPT2LMHeadModel`` or ``LlamaForCausalLM``), attention-only if the spec says so."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cfg = _config(spec, vocab_size, n_positions)
    model = GPT2LMHeadModel(cfg) if spec.arch == "gpt2" else LlamaForCausalLM(cfg)
    if spec.attention_only:
        _strip_mlps(model.transformer if spec.arch == "gpt2" else model.model)
    return model


def lm_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a model from :func:`build_lm`."""
    return blocks(model.transformer if hasattr(model, "transformer") else model.model)


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
