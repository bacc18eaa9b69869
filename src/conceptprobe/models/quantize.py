"""bitsandbytes quantization options (``quantize: 4bit | 8bit``), refused before anything is loaded.

``4bit`` is NF4 with double quantization (the absmax statistics are themselves quantized to 8 bits)
and computes in the model's dtype; ``8bit`` is LLM.int8() (int8 weights with per-row scales,
outlier threshold 6.0). Both need the ``bitsandbytes`` package and a CUDA GPU: conceptprobe refuses
them otherwise, naming what is missing and the fix, instead of failing halfway through a load.
``conceptprobe plan --quantize ...`` needs neither: it only counts bytes.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from conceptprobe.models.errors import ModelLoadError

QUANTIZE_CHOICES = ("4bit", "8bit")
_ALIASES = {
    "4bit": "4bit",
    "4-bit": "4bit",
    "nf4": "4bit",
    "int4": "4bit",
    "8bit": "8bit",
    "8-bit": "8bit",
    "int8": "8bit",
    "llm.int8": "8bit",
}


class QuantizationUnavailable(ModelLoadError):
    """Quantization was requested where bitsandbytes cannot run; the message names what is missing."""


def normalize_quantize(quantize: str | None) -> str | None:
    """``"4bit"`` / ``"8bit"`` (accepting nf4, int8, 4-bit, ...), ``None`` for none/empty."""
    if quantize is None:
        return None
    key = str(quantize).strip().lower()
    if key in ("", "none", "no", "off", "false"):
        return None
    if key not in _ALIASES:
        raise ValueError(f"unknown quantization {quantize!r}; use one of: {', '.join(QUANTIZE_CHOICES)}")
    return _ALIASES[key]


def missing_for_quantization() -> list[str]:
    """What this machine lacks to run bitsandbytes quantization (empty when it can)."""
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (fix: pip install bitsandbytes)")
    if torch.version.cuda is None:
        missing.append(
            f"a CUDA build of torch (this torch {torch.__version__} is CPU-only; fix: install a CUDA wheel "
            "of torch, see https://pytorch.org/get-started/locally/)"
        )
    elif not torch.cuda.is_available():
        missing.append(
            "a CUDA GPU (torch sees none; fix: run on a machine with an NVIDIA GPU and its driver)"
        )
    return missing


def check_quantization_available(quantize: str) -> None:
    """Raise :class:`QuantizationUnavailable` unless bitsandbytes and a CUDA GPU are both here."""
    missing = missing_for_quantization()
    if missing:
        raise QuantizationUnavailable(
            f"quantize={quantize} needs bitsandbytes and a CUDA GPU, and this machine lacks "
            + "; and ".join(missing)
            + ". Or drop the quantization and use dtype bfloat16; `conceptprobe plan --quantize "
            f"{quantize}` estimates the memory without either."
        )


def build_quantization_config(
    quantize: str,
    compute_dtype: torch.dtype = torch.bfloat16,
    *,
    double_quant: bool = True,
    check: bool = True,
    **overrides: Any,
):
    """A ``transformers.BitsAndBytesConfig`` for ``"4bit"`` (NF4, double quant) or ``"8bit"`` (LLM.int8).

    With ``check`` (the default) this refuses first when bitsandbytes or a CUDA GPU is missing.
    ``overrides`` are passed to ``BitsAndBytesConfig`` (e.g. ``llm_int8_enable_fp32_cpu_offload=True``).
    """
    from transformers import BitsAndBytesConfig

    scheme = normalize_quantize(quantize)
    if scheme is None:
        raise ValueError("build_quantization_config needs '4bit' or '8bit'")
    if check:
        check_quantization_available(scheme)
    if scheme == "4bit":
        kwargs: dict[str, Any] = dict(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    else:
        kwargs = dict(load_in_8bit=True)
    kwargs.update(overrides)
    return BitsAndBytesConfig(**kwargs)
