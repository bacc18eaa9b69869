"""One loader for a packaged alias, a GGUF file, a local folder or a Hugging Face hub id (and, through a
documented adapter, the checkpoints ``conceptprobe train`` writes: :mod:`.training_checkpoint`).

GGUF files are dequantized by transformers (``from_pretrained(dir, gguf_file=...)``); the result is
cached once as safetensors (fp32) so later loads take seconds instead of a minute. Sharding,
offload and quantization go through Hugging Face itself (``device_map``, ``max_memory``,
``BitsAndBytesConfig``); nothing here reimplements them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from conceptprobe.models.errors import ModelLoadError
from conceptprobe.models.layers import architecture_name, decoder_layers
from conceptprobe.models.packaged import PACKAGED, cache_dir, gguf_path, gguf_sha256
from conceptprobe.models.training_checkpoint import (
    WEIGHTS,
    checkpoint_extra,
    is_training_folder,
    load_training_checkpoint,
    resolve_checkpoint,
)
from conceptprobe.store import sha256_of

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CACHE_FORMAT = "1"


@dataclass
class ModelInfo:
    """What a result records about the model it came from."""

    ref: str
    source: str  # packaged | gguf | local | hub
    family: str  # config.model_type
    architecture: str
    n_params: int
    n_layers: int
    hidden_size: int
    dtype: str
    alias: str | None = None
    file: str | None = None
    file_sha256: str | None = None
    revision: str | None = None
    load_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name; ``auto`` is bfloat16 where the hardware has it natively, else float32."""
    from conceptprobe.config import choose_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = choose_dtype(dtype)
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pad on the left (answers are generated after the last prompt token) and make sure a pad token exists."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError(
                "the tokenizer has no pad, eos or unk token to pad batches with; set tokenizer.pad_token"
            )
        tokenizer.pad_token = fallback
    return tokenizer


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """A GGUF-loaded model refuses save_pretrained until its (already dequantized) quantizer is dropped."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


TokenizerHook = Callable[[PreTrainedTokenizerBase], None]


def _auto_tokenizer(
    source: str | Path, ref: str, trust_remote_code: bool, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained``; a tokenizer that needs its own code names --trust-remote-code."""
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:
        text = str(exc)
        if not trust_remote_code and ("custom code" in text or "trust_remote_code" in text):
            raise ModelLoadError(
                f"model {ref}: its tokenizer needs its own Python code, which conceptprobe never runs unless "
                "you pass --trust-remote-code (only for code you trust)"
            ) from None
        raise


def load_tokenizer(
    ref: str, trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """The prepared tokenizer of ``ref`` alone, loading no weights (to check prompts against it)."""
    if ref in PACKAGED or ref.endswith(".gguf"):
        path = gguf_path(PACKAGED[ref]) if ref in PACKAGED else Path(ref).expanduser().resolve()
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    elif Path(ref).expanduser().is_dir():
        tok = _auto_tokenizer(Path(ref).expanduser(), ref, trust_remote_code)
    else:
        tok = _auto_tokenizer(ref, ref, trust_remote_code, revision=revision)
    _tokenizer_ready(tok, ref, None)
    return tok


def _tokenizer_ready(tok: PreTrainedTokenizerBase, ref: str, hook: TokenizerHook | None) -> None:
    """Prepare the tokenizer and run the caller's checks on it, before any weight is loaded."""
    try:
        prepare_tokenizer(tok)
    except ModelLoadError as exc:
        raise ModelLoadError(f"model {ref}: {exc}") from None
    if hook is not None:
        hook(tok)


def _load_gguf(
    path: Path,
    sha: str,
    dtype: torch.dtype,
    use_cache: bool,
    on_tokenizer: TokenizerHook | None = None,
    ref: str = "",
    **kwargs: Any,
):
    """Load a GGUF file through transformers, via (or into) the safetensors cache."""
    cached = cache_dir() / "hf" / f"{path.stem}-{sha[:16]}"
    marker = cached / "conceptprobe-cache.json"
    if use_cache and marker.is_file():
        try:
            tok = AutoTokenizer.from_pretrained(cached)
        except Exception as exc:  # a broken cache is rebuilt, not fatal
            log.warning("model cache %s unreadable (%s); rebuilding it from the GGUF file", cached, exc)
        else:
            _tokenizer_ready(tok, ref or str(path), on_tokenizer)
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    cached, dtype=dtype, use_safetensors=True, **kwargs
                )
                return model, tok
            except Exception as exc:  # a broken cache is rebuilt, not fatal
                log.warning("model cache %s unreadable (%s); rebuilding it from the GGUF file", cached, exc)
                on_tokenizer = None  # checked already
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise ModelLoadError(
            f"could not read the tokenizer of GGUF file {path}: {exc}. Check the file is complete (size, "
            "sha256) and that the `gguf` package is installed."
        ) from exc
    _tokenizer_ready(tok, ref or str(path), on_tokenizer)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load GGUF file {path}: {exc}. Check the file is complete (size, sha256) and that "
            "the `gguf` package is installed."
        ) from exc
    _strip_gguf_quantizer(model)
    if use_cache:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "conceptprobe-cache.json").write_text(
                json.dumps({"format": _CACHE_FORMAT, "gguf": str(path), "sha256": sha})
            )
            if cached.exists():
                import shutil

                shutil.rmtree(cached)
            os.replace(tmp, cached)
        except OSError as exc:
            log.warning("could not write the model cache %s (%s); loading will stay slow", cached, exc)
    if dtype != torch.float32 or kwargs:
        if kwargs and use_cache and marker.is_file():
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, use_safetensors=True, **kwargs)
        else:
            model = model.to(dtype)
    return model, tok


def load_model(
    ref: str,
    dtype: str | torch.dtype = "float32",
    *,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    quantization_config: Any | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    use_cache: bool = True,
    quantize: str | None = None,
    offload_folder: str | Path | None = None,
    check_memory: bool = False,
    on_tokenizer: TokenizerHook | None = None,
) -> LoadedModel:
    """Load ``ref``: a packaged alias (``smollm2-135m``), a ``.gguf`` file, a local folder or a hub id.

    A ``conceptprobe train`` run folder or one of its ``checkpoints/step_<n>`` folders loads through the
    adapter of :mod:`conceptprobe.models.training_checkpoint` (``revision`` picks a run folder's step; the
    tokenizer is an integer stand-in; ``info.extra["step"]`` is the training step).

    ``device_map`` ("auto", "balanced", "sequential" or an explicit ``{module: device}`` dict, devices
    being GPU indices, "cpu" or "disk"), ``max_memory`` and ``offload_folder`` (needed for "disk") go to
    ``from_pretrained``. ``quantize="4bit"|"8bit"`` builds a ``BitsAndBytesConfig`` (NF4 + double quant
    in ``dtype``, or LLM.int8) and refuses first, loading nothing, where bitsandbytes or a CUDA GPU is
    missing. ``check_memory`` plans the load from the config first (``conceptprobe.models.plan``) and
    refuses one that does not fit this machine's free GPU memory (or ``max_memory``).
    ``on_tokenizer`` is called with the prepared tokenizer before any weight is loaded (to check prompts
    against it). ``trust_remote_code`` stays False unless the caller passes True; weights are read from
    safetensors or GGUF only (never unpickled).
    """
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {}
    if quantize is not None:
        from conceptprobe.models.quantize import build_quantization_config, normalize_quantize

        if quantization_config is not None:
            raise ModelLoadError("pass either quantize= or quantization_config=, not both")
        try:
            quantize = normalize_quantize(quantize)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        if quantize is not None:
            quantization_config = build_quantization_config(quantize, torch_dtype)
    if check_memory:
        from conceptprobe.models.plan import ensure_fits

        ensure_fits(
            ref,
            str(torch_dtype).removeprefix("torch."),
            quantize,
            max_memory=max_memory,
            allow_offload=offload_folder is not None,
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    start = time.perf_counter()
    alias = file = sha = None
    extra: dict[str, Any] = {}
    if ref in PACKAGED:
        alias = ref
        spec = PACKAGED[ref]
        path = gguf_path(spec)
        sha = gguf_sha256(spec) if spec.chunks else cached_sha256(path)
        model, tok = _load_gguf(path, sha, torch_dtype, use_cache, on_tokenizer, ref, **kwargs)
        source, file = "packaged", str(path)
    elif ref.endswith(".gguf"):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {ref} does not exist; check the path")
        sha = cached_sha256(path)
        model, tok = _load_gguf(path.resolve(), sha, torch_dtype, use_cache, on_tokenizer, ref, **kwargs)
        source, file = "gguf", str(path.resolve())
    elif is_training_folder(Path(ref).expanduser()):  # conceptprobe train's own checkpoints
        ckpt = resolve_checkpoint(ref, revision)
        model, tok = load_training_checkpoint(ckpt, torch_dtype)
        _tokenizer_ready(tok, ref, on_tokenizer)
        source, file, revision = "training", str((ckpt.folder / WEIGHTS).resolve()), ckpt.folder.name
        sha = sha256_of(ckpt.folder / WEIGHTS)
        extra = checkpoint_extra(ckpt)
    elif Path(ref).expanduser().is_dir():
        folder = Path(ref).expanduser()
        if not (folder / "config.json").is_file():
            ggufs = sorted(folder.glob("*.gguf"))
            hint = f" It holds {ggufs[0].name}: pass that file instead." if ggufs else ""
            raise ModelLoadError(
                f"folder {folder} has no config.json, so it is not a transformers model.{hint}"
            )
        tok = _auto_tokenizer(folder, ref, trust_remote_code)
        _tokenizer_ready(tok, ref, on_tokenizer)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
        )
        source, file = "local", str(folder.resolve())
    else:
        try:
            tok = _auto_tokenizer(ref, ref, trust_remote_code, revision=revision)
            _tokenizer_ready(tok, ref, on_tokenizer)
            model = AutoModelForCausalLM.from_pretrained(
                ref,
                dtype=torch_dtype,
                revision=revision,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                **kwargs,
            )
        except OSError as exc:
            known = ", ".join(PACKAGED)
            raise ModelLoadError(
                f"could not load {ref!r}: not a packaged alias ({known}), a .gguf file or a local folder, and the "
                f"hub did not serve it ({exc.__class__.__name__}). Check the name, or that this machine can reach "
                "the hub and you have access to the model."
            ) from exc
        source = "hub"
    model.eval()
    arch = architecture_name(model)
    n_layers = len(decoder_layers(model))
    info = ModelInfo(
        ref=ref,
        source=source,
        family=str(getattr(model.config, "model_type", "unknown")),
        architecture=arch,
        n_params=sum(p.numel() for p in model.parameters()),
        n_layers=n_layers,
        hidden_size=int(model.config.hidden_size),
        dtype=str(torch_dtype).removeprefix("torch."),
        alias=alias,
        file=file,
        file_sha256=sha,
        revision=revision or getattr(model.config, "_commit_hash", None),
        load_seconds=round(time.perf_counter() - start, 2),
        extra=extra,
    )
    if quantize is not None:
        info.extra["quantize"] = quantize
        info.n_params = int(model.num_parameters())  # counts packed 4-bit weights as their unpacked size
    if getattr(model, "hf_device_map", None) is not None and device_map is not None:
        info.extra["device_map"] = {k: str(v) for k, v in model.hf_device_map.items()}
    return LoadedModel(model=model, tokenizer=tok, info=info)


def cached_sha256(path: Path) -> str:
    """sha256 of a file, memoised next to the cache by (path, size, mtime)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    memo = cache_dir() / "sha256.json"
    table: dict[str, str] = {}
    if memo.is_file():
        try:
            table = json.loads(memo.read_text())
        except json.JSONDecodeError:
            table = {}
    if key not in table:
        table[key] = sha256_of(path)
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(memo.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=0))
        os.replace(tmp, memo)
    return table[key]
