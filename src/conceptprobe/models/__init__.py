"""Model loading (packaged aliases, GGUF, local, hub) and per-architecture layer lookup."""

from conceptprobe.models.layers import (
    SUPPORTED,
    UnsupportedArchitectureError,
    architecture_name,
    base_model,
    decoder_layers,
    logits_from_hidden,
)
from conceptprobe.models.load import LoadedModel, ModelInfo, ModelLoadError, load_model, prepare_tokenizer
from conceptprobe.models.packaged import PACKAGED, PackagedModel, PackagedModelMissing, is_installed

__all__ = [
    "PACKAGED",
    "SUPPORTED",
    "LoadedModel",
    "ModelInfo",
    "ModelLoadError",
    "PackagedModel",
    "PackagedModelMissing",
    "UnsupportedArchitectureError",
    "architecture_name",
    "base_model",
    "decoder_layers",
    "is_installed",
    "load_model",
    "logits_from_hidden",
    "prepare_tokenizer",
]
