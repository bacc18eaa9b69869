"""Where the decoder layers, the base model and the unembedding live, by architecture.

Dispatch is on the model's class name (``LlamaForCausalLM``), falling back to ``config.architectures``
and then ``config.model_type``; never on the model's name. GGUF-loaded models have no
``config.architectures``, which is why the class name comes first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchitectureSpec:
    """Attribute paths, from the ``*ForCausalLM`` object, of its parts."""

    base: str  # the decoder-only model (returns the final-normed last hidden state)
    layers: str  # the ModuleList of decoder layers
    final_norm: str  # relative to base
    embed: str  # token embedding, relative to base


_DECODER = ArchitectureSpec(base="model", layers="model.layers", final_norm="norm", embed="embed_tokens")

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "LlamaForCausalLM": _DECODER,
    "MistralForCausalLM": _DECODER,
    "MixtralForCausalLM": _DECODER,
    "Qwen2ForCausalLM": _DECODER,
    "Qwen3ForCausalLM": _DECODER,
    "GemmaForCausalLM": _DECODER,
    "Gemma2ForCausalLM": _DECODER,
    "Gemma3ForCausalLM": _DECODER,
    "Phi3ForCausalLM": _DECODER,
    "OlmoForCausalLM": _DECODER,
    "Olmo2ForCausalLM": _DECODER,
    "GPT2LMHeadModel": ArchitectureSpec(
        base="transformer", layers="transformer.h", final_norm="ln_f", embed="wte"
    ),
    "GPTNeoXForCausalLM": ArchitectureSpec(  # Pythia: fused QKV, so no copying score (needs v_proj/o_proj)
        base="gpt_neox", layers="gpt_neox.layers", final_norm="final_layer_norm", embed="embed_in"
    ),
}

MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo": "OlmoForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
}

SUPPORTED = tuple(sorted(ARCHITECTURES))


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no entry in :data:`ARCHITECTURES`."""


def architecture_name(model: nn.Module) -> str:
    """The architecture key of ``model`` (class name, else config.architectures, else model_type)."""
    name = type(model).__name__
    if name in ARCHITECTURES:
        return name
    config = getattr(model, "config", None)
    for arch in getattr(config, "architectures", None) or ():
        if arch in ARCHITECTURES:
            return arch
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise UnsupportedArchitectureError(
        f"architecture {name} (model_type={model_type!r}) is not supported; supported: {', '.join(SUPPORTED)}. "
        "Add an entry to conceptprobe.models.layers.ARCHITECTURES naming where its decoder layers live."
    )


def _get(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def spec_for(model: nn.Module) -> ArchitectureSpec:
    return ARCHITECTURES[architecture_name(model)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, in order."""
    layers = _get(model, spec_for(model).layers)
    assert isinstance(layers, nn.ModuleList)
    return layers


def base_model(model: nn.Module) -> nn.Module:
    """The decoder-only body (no unembedding); its output is the final-normed last hidden state."""
    return _get(model, spec_for(model).base)  # type: ignore[return-value]


def final_norm(model: nn.Module) -> nn.Module:
    spec = spec_for(model)
    return _get(_get(model, spec.base), spec.final_norm)  # type: ignore[return-value]


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for final-normed hidden rows ``[..., d]`` (contiguous 2-D is fastest), with soft-capping."""
    head = model.get_output_embeddings()
    logits = head(hidden.contiguous())
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
