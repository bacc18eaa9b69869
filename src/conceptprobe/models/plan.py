"""Memory plan from a model's config alone: will it fit, where does each layer go, and if not, what would.

The model is built on the meta device (``accelerate.init_empty_weights`` +
``AutoModelForCausalLM.from_config``: no weights are read or allocated), its bytes are counted for the
requested dtype or bitsandbytes quantization, the run's activations are added, and accelerate's
``infer_auto_device_map`` places it, exactly as ``from_pretrained(device_map="auto", max_memory=...)``
would (``get_balanced_memory`` first on several GPUs). Load with the plan's map
(``load_model(..., device_map=plan.device_map)``) to get what was checked: with ``device_map="auto"``
and quantization, transformers also keeps 10% of every device free (its bitsandbytes quantizer's
``adjust_max_memory``) and may offload sooner than this plan; the plan counts the transient bf16 copy
of a weight being quantized in the dequantization scratch instead.

Memory model (the assumptions; all counts are bytes):

* **Weights**: every parameter in the compute ``dtype`` (modules in ``_keep_in_fp32_modules`` stay fp32).
  Buffers (rotary frequencies, embedding scales) as they are built.
* **4-bit** (bitsandbytes NF4, what ``quantize: 4bit`` loads): every ``nn.Linear`` except those
  transformers keeps (``get_keys_to_not_convert``: the lm_head / output embedding and tied weights)
  stores 4 bits per weight, packed two per byte, plus per 64-weight block an absmax; with double
  quantization (our default) the absmax is 1 byte per block plus one fp32 scale per 256 blocks, a
  256-entry fp32 code and an fp32 offset per tensor; the 16-entry fp32 NF4 code per tensor. Biases,
  embeddings, norms and the lm_head stay in the compute dtype (as bitsandbytes leaves them).
* **8-bit** (LLM.int8): the same Linear layers store 1 byte per weight plus one fp32 scale per output row.
* **KV cache**: 2 x batch x positions x kv_heads x head_dim per layer in the compute dtype, on the
  device of that layer; sliding-window layers hold at most ``sliding_window`` positions. ``seq_len``
  counts every position the cache holds (prompt plus generated tokens).
* **Activations** (on every GPU that runs layers; layers run one at a time): the layer's input and
  output and a normed copy (3 x batch x seq x d), plus the larger of the attention phase (q, k, v,
  attention output, the repeated k/v of eager attention, and the scores: batch x heads x seq x seq in
  fp32 plus the dtype copy for eager attention, once in the dtype for SDPA, conservatively, since
  flash kernels need none) and the MLP phase (3 x batch x seq x intermediate), plus the 4-D attention
  mask. Quantized layers add a dequantization scratch (the largest Linear in the compute dtype for
  4-bit; int8 input and int32 output of the largest Linear for 8-bit).
* **Logits**: only the rows needed (one per prompt, as ``generation.capture_and_generate`` does),
  batch x vocab in fp32 plus the dtype, on the device of the lm_head.
* **Capture buffers**: batch x captured layers x positions x d in fp32, on the CPU (hooks copy rows there).
* **Runtime reserve**: ``gpu_reserve`` per GPU (default 1 GiB: CUDA context, cuBLAS workspace,
  allocator fragmentation) and ``cpu_reserve`` on the host (default 1 GiB: Python, torch, tokenizer).
* **Offload**: layers placed on "cpu"/"disk" run on GPU 0, so their KV cache and activations are
  counted there, plus a staging copy of the largest offloaded layer.

A plan *fits* when every weight sits on a GPU (or, with no GPUs, in CPU memory) and every device's
total is within its capacity. Otherwise :attr:`MemoryPlan.options` lists the smallest configurations
that would: a smaller batch, more GPUs of the same size, 8-bit, 4-bit, CPU offload.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conceptprobe.models.quantize import normalize_quantize

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4
CONFIG_DIR = Path(__file__).with_name("configs")
KV_BUFFER = "conceptprobe_kv_cache"
NF4_BLOCK = 64  # bitsandbytes' 4-bit blocksize on CUDA
DQ_BLOCK = 256  # blocksize of the nested (double) quantization of the absmax values
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": TiB,
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PlanError(ValueError):
    """A plan could not be made (unknown model, bad size), or a load was refused because it does not fit."""


# ---------------------------------------------------------------------------------------------- parsing


def parse_size(text: str | int | float) -> int:
    """Bytes from ``"80GiB"``, ``"24GB"``, ``"512MiB"``, ``"1.5TiB"`` or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"cannot read the size {text!r}; write it like 80GiB, 24GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_gpus(text: str | None) -> list[int]:
    """GPU capacities from ``"2x80GiB"``, ``"80GiB"``, ``"2x80GiB,1x40GiB"``; ``None``/``"0"``/``"none"`` = no GPU."""
    if text is None or str(text).strip().lower() in ("", "0", "none", "cpu"):
        return []
    out: list[int] = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(?:(\d+)\s*[x×*]\s*)?(.+?)\s*", part)
        if not m:
            raise PlanError(f"cannot read --gpus {text!r}; write it like 2x80GiB or 1x24GiB")
        count = int(m.group(1)) if m.group(1) else 1
        size = parse_size(m.group(2))
        if size <= 0:
            raise PlanError(f"GPU size must be positive in --gpus {text!r}")
        out += [size] * count
    return out


def fmt_bytes(n: float) -> str:
    """``37.1 GiB`` / ``412 MiB`` / ``12 KiB``."""
    if abs(n) >= GiB:
        return f"{n / GiB:.1f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / KiB:.0f} KiB"


def fmt_gpus(gpus: Sequence[int]) -> str:
    """``2x80GiB`` (or ``80GiB,40GiB`` for mixed sizes; ``no GPU``)."""
    if not gpus:
        return "no GPU"
    groups: list[list[int]] = []
    for g in gpus:
        if groups and groups[-1][0] == g:
            groups[-1].append(g)
        else:
            groups.append([g])
    return ",".join(f"{len(grp)}x{_size_label(grp[0])}" for grp in groups)


def _size_label(n: int) -> str:
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    for unit, scale in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n / GiB:.1f}GiB"


# ---------------------------------------------------------------------------------------------- configs


def shipped_configs() -> dict[str, Path]:
    """Configs shipped with the package: the paper's five hub ids and the packaged aliases."""
    return {p.stem.replace("--", "/"): p for p in sorted(CONFIG_DIR.glob("*.json"))}


def _config_from_dict(data: dict[str, Any]):
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def resolve_config(
    ref: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> tuple[Any, str]:
    """``(config, where it came from)`` for a shipped hub id or alias, a local folder, a .gguf file or a hub id.

    The five paper models and the packaged aliases resolve offline to the configs shipped in
    ``conceptprobe/models/configs``; any other hub id asks the hub (``AutoConfig.from_pretrained``).
    """
    from transformers import AutoConfig

    shipped = {k.lower(): (k, p) for k, p in shipped_configs().items()}
    key = ref.strip().lower()
    if key in shipped and not Path(ref).expanduser().exists():
        name, path = shipped[key]
        return _config_from_dict(json.loads(path.read_text())), f"shipped config of {name}"
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise PlanError(f"GGUF file {ref} does not exist; check the path")
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name), f"GGUF metadata of {path.name}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"folder {ref} has no config.json; point --model at a transformers model folder")
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), f"{path}/config.json"
    try:
        config = AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # offline, gated, misspelt: one clear message
        known = ", ".join(shipped_configs())
        raise PlanError(
            f"no config for {ref!r}: it is not a shipped config ({known}), a local folder with config.json "
            f"or a .gguf file, and the hub did not serve it ({exc.__class__.__name__}). Check the name or the "
            "network, or download its config.json into a folder and pass the folder."
        ) from exc
    return config, f"hub config of {ref}"


# ---------------------------------------------------------------------------------------------- weights


def _quiet_accelerate() -> contextlib.AbstractContextManager:
    """accelerate warns 'Device 0 is not available' for every planned GPU on a machine without them."""

    @contextlib.contextmanager
    def quiet() -> Iterator[None]:
        names = ("accelerate.utils.modeling", "accelerate.big_modeling", "transformers.modeling_utils")
        loggers = [logging.getLogger(n) for n in names]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)

    return quiet()


def build_meta_model(
    config: Any, dtype: torch.dtype = torch.bfloat16, trust_remote_code: bool = False
) -> nn.Module:
    """The causal LM of ``config`` on the meta device, tied, with parameters in ``dtype``."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with _quiet_accelerate(), init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # init_empty_weights leaves tied weights untied
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    keep_fp32 |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        target = torch.float32 if any(k in name.split(".") for k in keep_fp32) else dtype
        if param.dtype != target:
            param.data = param.data.to(target)
    return model.eval()


def quantized_linear_names(model: nn.Module) -> list[str]:
    """The ``nn.Linear`` modules bitsandbytes would quantize (transformers' own skip list applied)."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model)
    return [
        name
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and should_convert_module(name, skip)
    ]


def quantized_linear_bytes(
    out_features: int, in_features: int, scheme: str, double_quant: bool = True
) -> int:
    """Bytes of a bitsandbytes-quantized Linear weight (not its bias): see the module docstring."""
    n = out_features * in_features
    if scheme == "8bit":
        return n + 4 * out_features  # int8 weight + fp32 scale per row (SCB)
    if scheme != "4bit":
        raise ValueError(scheme)
    blocks = math.ceil(n / NF4_BLOCK)
    packed = math.ceil(n / 2)
    # double quant: uint8 absmax per block, an fp32 scale per 256 blocks, a 256-entry fp32 code, an fp32 offset
    stats = blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4 * 256 + 4 if double_quant else 4 * blocks
    return packed + stats + 4 * 16  # + the NF4 code table


@dataclass
class WeightCount:
    """Parameters and their bytes in the planned precision."""

    n_params: int
    n_quantized: int  # parameters stored by bitsandbytes (0 without quantization)
    n_quantized_modules: int
    param_bytes: int
    buffer_bytes: int
    by_kind: dict[
        str, int
    ]  # e.g. {"bfloat16": ..., "nf4 weights (packed)": ..., "nf4 block statistics": ...}

    @property
    def total(self) -> int:
        return self.param_bytes + self.buffer_bytes


def _quantize_in_place(
    model: nn.Module, scheme: str, double_quant: bool = True
) -> tuple[int, int, dict[str, int]]:
    """Replace each quantizable Linear weight by a meta uint8 tensor of its quantized size (for accelerate)."""
    n_q = 0
    names = quantized_linear_names(model)
    packed = stats = 0
    for name in names:
        mod = model.get_submodule(name)
        out_f, in_f = mod.out_features, mod.in_features
        nbytes = quantized_linear_bytes(out_f, in_f, scheme, double_quant)
        body = out_f * in_f if scheme == "8bit" else math.ceil(out_f * in_f / 2)
        packed += body
        stats += nbytes - body
        n_q += out_f * in_f
        mod.weight = nn.Parameter(torch.empty(nbytes, dtype=torch.uint8, device="meta"), requires_grad=False)
    label = "nf4" if scheme == "4bit" else "int8"
    kinds = {f"{label} weights" + (" (packed)" if scheme == "4bit" else ""): packed}
    kinds[f"{label} {'block statistics' if scheme == '4bit' else 'row scales'}"] = stats
    return n_q, len(names), kinds


def count_weights(
    model: nn.Module,
    quant_kinds: dict[str, int] | None = None,
    n_quantized: int = 0,
    n_quantized_modules: int = 0,
    n_params: int | None = None,
) -> WeightCount:
    """Bytes of a (meta) model's parameters by dtype, and of its buffers (KV placeholders excluded)."""
    by_kind: dict[str, int] = {}
    param_bytes = 0
    for _, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        param_bytes += nbytes
        if p.dtype != torch.uint8:
            key = str(p.dtype).removeprefix("torch.")
            by_kind[key] = by_kind.get(key, 0) + nbytes
    by_kind.update(quant_kinds or {})
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.endswith(KV_BUFFER))
    if n_params is None:
        n_params = sum(p.numel() for p in model.parameters())
    return WeightCount(n_params, n_quantized, n_quantized_modules, param_bytes, buffers, by_kind)


# ---------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Shape:
    """What the memory model needs from a config."""

    n_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    sliding_window: int | None
    layer_types: tuple[str, ...] | None

    @classmethod
    def of(cls, config: Any) -> Shape:
        text = getattr(config, "text_config", None) or config
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        layer_types = getattr(text, "layer_types", None)
        return cls(
            n_layers=int(text.num_hidden_layers),
            hidden=int(text.hidden_size),
            heads=heads,
            kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate=int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size),
            vocab=int(text.vocab_size),
            sliding_window=getattr(text, "sliding_window", None),
            layer_types=tuple(layer_types) if layer_types else None,
        )

    def kv_positions(self, layer: int, seq: int) -> int:
        sliding = self.layer_types is not None and self.layer_types[layer] == "sliding_attention"
        if sliding and self.sliding_window:
            return min(seq, int(self.sliding_window))
        return seq

    def kv_bytes(self, layer: int, batch: int, seq: int, dtype_bytes: int) -> int:
        return 2 * batch * self.kv_positions(layer, seq) * self.kv_heads * self.head_dim * dtype_bytes


def layer_activation_bytes(
    shape: Shape, batch: int, seq: int, dtype_bytes: int, eager: bool, quant_scratch: int = 0
) -> int:
    """Peak transient bytes while one decoder layer runs (see the module docstring)."""
    t = batch * seq
    residual = 3 * t * shape.hidden * dtype_bytes
    q_out = 2 * t * shape.heads * shape.head_dim
    kv = 2 * t * shape.kv_heads * shape.head_dim
    if eager and shape.kv_heads != shape.heads:
        kv += 2 * t * shape.heads * shape.head_dim  # repeat_kv
    scores = batch * shape.heads * seq * seq * ((4 + dtype_bytes) if eager else dtype_bytes)
    attention = (q_out + kv) * dtype_bytes + scores
    mlp = 3 * t * shape.intermediate * dtype_bytes
    mask = batch * seq * seq * dtype_bytes
    return residual + max(attention, mlp) + mask + quant_scratch


def logits_bytes(shape: Shape, batch: int, dtype_bytes: int) -> int:
    return batch * shape.vocab * (4 + dtype_bytes)


def capture_bytes(shape: Shape, batch: int, n_layers: int, positions: int) -> int:
    return batch * n_layers * positions * shape.hidden * 4


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for."""

    dtype: str = "bfloat16"
    quantize: str | None = None  # "4bit" | "8bit"
    gpus: tuple[int, ...] = ()  # capacity of each GPU, bytes
    cpu_memory: int = 64 * GiB
    batch_size: int = 16
    seq_len: int = 512
    layers: str | tuple[int, ...] = (
        "all"  # captured layers: "all" (embeddings + every decoder layer) or indices
    )
    positions: int = 1  # captured positions per prompt
    gpu_reserve: int = GiB
    cpu_reserve: int = GiB
    double_quant: bool = True
    allow_offload: bool = True  # place what does not fit on GPUs on cpu/disk (as device_map="auto" would)

    def describe(self) -> str:
        prec = {"4bit": "4-bit NF4", "8bit": "8-bit int8"}.get(self.quantize or "", self.dtype)
        if self.quantize:
            prec += f" (compute {self.dtype})"
        return f"{prec} on {fmt_gpus(self.gpus)}" if self.gpus else f"{prec} on the CPU"


@dataclass
class DeviceUse:
    """Planned peak memory of one device."""

    device: str  # cuda:0 | cpu | disk
    capacity: int | None
    weights: int = 0
    kv_cache: int = 0
    activations: int = 0
    runtime: int = 0
    capture: int = 0
    layers: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime + self.capture

    @property
    def free(self) -> int | None:
        return None if self.capacity is None else self.capacity - self.total

    @property
    def over(self) -> bool:
        return self.capacity is not None and self.total > self.capacity


@dataclass
class Option:
    """A configuration that would fit."""

    label: str
    request: PlanRequest
    peak_gpu: int  # bytes on the fullest GPU (0 without GPUs)
    cpu_needed: int
    fits_given_gpus: bool  # needs no more GPUs than the request had
    note: str = ""
    flag: str = ""  # the command-line change

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "flag": self.flag,
            "gpus": fmt_gpus(self.request.gpus),
            "quantize": self.request.quantize,
            "dtype": self.request.dtype,
            "batch_size": self.request.batch_size,
            "peak_gpu_bytes": self.peak_gpu,
            "cpu_needed_bytes": self.cpu_needed,
            "fits_given_gpus": self.fits_given_gpus,
            "note": self.note,
        }


@dataclass
class MemoryPlan:
    """The result of :func:`plan_memory`."""

    model: str
    source: str
    architecture: str
    shape: Shape
    request: PlanRequest
    weights: WeightCount
    kv_cache: int
    layer_activations: int
    logits: int
    capture: int
    captured_layers: int
    attention: str
    device_map: dict[str, Any]
    max_memory: dict[Any, int]  # the budgets accelerate placed weights (and KV cache) within
    devices: list[DeviceUse]
    fits: bool
    offloaded: int  # weight bytes on cpu/disk while GPUs were given
    options: list[Option] = field(default_factory=list)

    @property
    def gpu_devices(self) -> list[DeviceUse]:
        return [d for d in self.devices if d.device.startswith("cuda")]

    @property
    def peak_gpu(self) -> int:
        return max((d.total for d in self.gpu_devices), default=0)

    @property
    def cpu_needed(self) -> int:
        return sum(d.total for d in self.devices if d.device == "cpu")

    @property
    def need(self) -> int:
        """Everything the run needs on its compute devices (weights + KV + activations + reserves)."""
        return sum(d.total for d in self.devices if d.device != "disk")

    def headline(self) -> str:
        """One line: verdict, where, how much."""
        req = self.request
        if self.fits:
            if req.gpus:
                tight = min(self.gpu_devices, key=lambda d: d.free or 0)
                return (
                    f"FITS: {self.model} in {req.describe()}, batch {req.batch_size} x {req.seq_len} tokens; "
                    f"peak {fmt_bytes(self.peak_gpu)} on the fullest GPU ({tight.device}), "
                    f"{fmt_bytes(tight.free or 0)} to spare"
                )
            return (
                f"FITS: {self.model} in {req.describe()} with {fmt_bytes(req.cpu_memory)} of CPU memory: "
                f"needs {fmt_bytes(self.cpu_needed)}"
            )
        return (
            f"DOES NOT FIT: {self.model} in {req.describe()}, batch {req.batch_size} x {req.seq_len} tokens"
        )

    def reasons(self) -> list[str]:
        """Why it does not fit, with the numbers."""
        req = self.request
        out = []
        weights_kv = self.weights.total + self.kv_cache
        if req.gpus:
            cap = sum(req.gpus)
            fixed = len(req.gpus) * (req.gpu_reserve + self.layer_activations + self.logits)
            out.append(
                f"weights {fmt_bytes(self.weights.total)} ({self.weights.total / 1e9:.1f} GB) + KV cache "
                f"{fmt_bytes(self.kv_cache)} + activations and runtime reserve {fmt_bytes(fixed)} = "
                f"{fmt_bytes(weights_kv + fixed)}, against {fmt_bytes(cap)} of GPU memory ({fmt_gpus(req.gpus)}; "
                "activations and reserve counted on every GPU)"
            )
            if self.offloaded:
                out.append(
                    f"accelerate's device map leaves {fmt_bytes(self.offloaded)} of weights on the CPU/disk "
                    "(device_map='auto' would offload them: slow)"
                )
            elif weights_kv + fixed <= cap:
                out.append(
                    "the total is under the capacity, but whole decoder layers do not split across GPUs"
                )
            for d in self.devices:
                if d.over:
                    out.append(f"{d.device} would need {fmt_bytes(d.total)} of {fmt_bytes(d.capacity or 0)}")
        else:
            out.append(
                f"needs {fmt_bytes(self.cpu_needed)} of CPU memory, against {fmt_bytes(req.cpu_memory)}"
                + (f"; {fmt_bytes(self.offloaded)} of weights would go to disk" if self.offloaded else "")
            )
        return out

    def recommendation(self) -> Option | None:
        """The least invasive option that fits on the GPUs given (else the fewest GPUs, else offload)."""
        if not self.options:
            return None
        same = [o for o in self.options if o.fits_given_gpus]
        return same[0] if same else self.options[0]

    def explain(self) -> list[str]:
        """The verdict and, when it does not fit, why and what would (plain lines)."""
        lines = [self.headline()]
        if not self.fits:
            lines += ["  " + r for r in self.reasons()]
            best = self.recommendation()
            if best is None:
                lines.append(
                    "  no configuration searched fits; try a smaller --batch-size/--seq-len or a bigger GPU"
                )
            else:
                lines.append(f"  smallest change that fits: {best.label} ({best.flag}): {best.note}")
                others = [o for o in self.options if o is not best]
                if others:
                    lines.append("  other options: " + "; ".join(f"{o.label} ({o.flag})" for o in others))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source": self.source,
            "architecture": self.architecture,
            "shape": asdict(self.shape),
            "request": {**asdict(self.request), "gpus": list(self.request.gpus)},
            "n_params": self.weights.n_params,
            "n_quantized_params": self.weights.n_quantized,
            "weight_bytes": self.weights.total,
            "param_bytes": self.weights.param_bytes,
            "buffer_bytes": self.weights.buffer_bytes,
            "weight_bytes_by_kind": self.weights.by_kind,
            "kv_cache_bytes": self.kv_cache,
            "layer_activation_bytes": self.layer_activations,
            "logits_bytes": self.logits,
            "capture_bytes": self.capture,
            "attention": self.attention,
            "fits": self.fits,
            "offloaded_bytes": self.offloaded,
            "peak_gpu_bytes": self.peak_gpu,
            "devices": [
                {
                    **{k: v for k, v in asdict(d).items() if k != "layers"},
                    "total": d.total,
                    "layers": len(d.layers),
                }
                for d in self.devices
            ],
            "device_map": {k: (v if isinstance(v, str) else f"cuda:{v}") for k, v in self.device_map.items()},
            "max_memory": {str(k): int(v) for k, v in self.max_memory.items()},
            "explanation": self.explain(),
            "options": [o.to_dict() for o in self.options],
        }


class Planner:
    """Plans one model for many requests (meta models are built once per precision)."""

    def __init__(
        self, config: Any, model: str = "model", source: str = "config", trust_remote_code: bool = False
    ):
        self.config = config
        self.model_name = model
        self.source = source
        self.trust_remote_code = trust_remote_code
        self.shape = Shape.of(config)
        self._models: dict[
            tuple[str, str | None, bool], tuple[nn.Module, WeightCount, tuple[int, int, int]]
        ] = {}

    @classmethod
    def for_ref(cls, ref: str, revision: str | None = None, trust_remote_code: bool = False) -> Planner:
        config, source = resolve_config(ref, revision=revision, trust_remote_code=trust_remote_code)
        return cls(config, model=ref, source=source, trust_remote_code=trust_remote_code)

    def _meta(
        self, dtype: str, quantize: str | None, double_quant: bool
    ) -> tuple[nn.Module, WeightCount, tuple[int, int, int]]:
        """The meta model in this precision, its weight count, and (max in, max out, max numel) of quantized Linears."""
        key = (dtype, quantize, double_quant)
        if key not in self._models:
            if dtype not in _DTYPES:
                raise PlanError(f"unknown dtype {dtype!r}; use one of: {', '.join(_DTYPES)}")
            model = build_meta_model(self.config, _DTYPES[dtype], self.trust_remote_code)
            n_params = sum(p.numel() for p in model.parameters())
            dims = (0, 0, 0)
            if quantize:
                mods = [model.get_submodule(n) for n in quantized_linear_names(model)]
                if mods:
                    dims = (
                        max(m.in_features for m in mods),
                        max(m.out_features for m in mods),
                        max(m.in_features * m.out_features for m in mods),
                    )
                n_q, n_mod, kinds = _quantize_in_place(model, quantize, double_quant)
                weights = count_weights(model, kinds, n_q, n_mod, n_params=n_params)
            else:
                weights = count_weights(model, n_params=n_params)
            self._models[key] = (model, weights, dims)
        return self._models[key]

    def plan(self, request: PlanRequest, suggest: bool = True) -> MemoryPlan:
        """Count, place and judge ``request``; with ``suggest``, search for options when it does not fit."""
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        quantize = normalize_quantize(request.quantize)
        request = replace(request, quantize=quantize)
        if request.batch_size < 1 or request.seq_len < 1 or request.positions < 1:
            raise PlanError("batch size, sequence length and positions must be at least 1")
        model, weights, (max_in, max_out, max_numel) = self._meta(
            request.dtype, quantize, request.double_quant
        )
        shape = self.shape
        dbytes = _DTYPES[request.dtype].itemsize
        batch, seq = request.batch_size, request.seq_len
        scratch = 0  # 4-bit: a dequantized weight; 8-bit: int8 input and int32 output of the largest Linear
        if quantize == "4bit":
            scratch = max_numel * dbytes
        elif quantize == "8bit":
            scratch = batch * seq * (max_in + 4 * max_out)
        from conceptprobe.models.layers import decoder_layers

        blocks = decoder_layers(model)
        kv_total = 0
        for i, block in enumerate(blocks):
            nbytes = shape.kv_bytes(i, batch, seq, dbytes)
            kv_total += nbytes
            block.register_buffer(
                KV_BUFFER, torch.empty(nbytes, dtype=torch.uint8, device="meta"), persistent=False
            )
        attn_impl = str(getattr(model.config, "_attn_implementation", None) or "sdpa")
        eager = attn_impl == "eager"
        act = layer_activation_bytes(shape, batch, seq, dbytes, eager, scratch)
        logit = logits_bytes(shape, batch, dbytes)
        n_capture = shape.n_layers + 1 if request.layers == "all" else len(request.layers)
        cap = capture_bytes(shape, batch, n_capture, request.positions)

        gpus = list(request.gpus)
        max_memory: dict[Any, int] = {}
        for i, size in enumerate(gpus):
            max_memory[i] = max(0, size - request.gpu_reserve - act - logit)
        cpu_fixed = request.cpu_reserve + cap + (0 if gpus else act + logit)
        cpu_budget = max(0, request.cpu_memory - cpu_fixed) if (request.allow_offload or not gpus) else 0
        max_memory["cpu"] = cpu_budget
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        for _ in range(4):  # offloaded layers run on GPU 0: shrink its budget until their KV and staging fit
            with _quiet_accelerate(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                budget = dict(max_memory)
                if sum(1 for g in budget if isinstance(g, int) and budget[g] > 0) > 1:
                    budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split)
                device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
            devices = self._account(model, device_map, request, act, logit, cap)
            offloading = any(not isinstance(v, int) for v in device_map.values())
            if not (gpus and offloading and devices[0].over and max_memory[0] > 0):
                break
            max_memory[0] = max(0, max_memory[0] - (devices[0].total - gpus[0]))
        gpu_weights_only = all(isinstance(v, int) for v in device_map.values())
        offloaded = sum(d.weights for d in devices if d.device in ("cpu", "disk")) if gpus else 0
        if gpus:
            fits = gpu_weights_only and not any(d.over for d in devices)
        else:
            fits = "disk" not in device_map.values() and not any(d.over for d in devices)
            offloaded = next((d.weights for d in devices if d.device == "disk"), 0)
        result = MemoryPlan(
            model=self.model_name,
            source=self.source,
            architecture=type(model).__name__,
            shape=shape,
            request=request,
            weights=weights,
            kv_cache=kv_total,
            layer_activations=act,
            logits=logit,
            capture=cap,
            captured_layers=n_capture,
            attention=attn_impl,
            device_map=dict(device_map),
            max_memory=budget,
            devices=devices,
            fits=fits,
            offloaded=offloaded,
        )
        if suggest and not fits:
            result.options = self.options(request, result)
        return result

    def _account(
        self, model: nn.Module, device_map: dict[str, Any], req: PlanRequest, act: int, logit: int, cap: int
    ) -> list[DeviceUse]:
        """Per-device peak memory from a device map (weights where placed; offloaded layers run on GPU 0)."""
        from conceptprobe.models.layers import decoder_layers

        gpus = list(req.gpus)
        names = {i: f"cuda:{i}" for i in range(len(gpus))}
        uses: dict[str, DeviceUse] = {
            names[i]: DeviceUse(names[i], gpus[i], runtime=req.gpu_reserve) for i in names
        }
        uses["cpu"] = DeviceUse("cpu", req.cpu_memory, runtime=req.cpu_reserve, capture=cap)
        exec_device = names[0] if gpus else "cpu"

        def place(name: str) -> str:
            best, where = -1, None
            for key, dev in device_map.items():
                if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best:
                    best, where = len(key), dev
            if where is None:
                raise PlanError(f"the device map does not place {name}")
            return names[where] if isinstance(where, int) else str(where)

        layer_of: dict[str, int] = {}
        prefix = None
        blocks = decoder_layers(model)
        for name, mod in model.named_modules():
            if mod is blocks:
                prefix = name
                break
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            nbytes = tensor.numel() * tensor.element_size()
            dev = place(name)
            if name.endswith(KV_BUFFER):
                run_on = dev if dev.startswith("cuda") else exec_device
                uses[run_on].kv_cache += nbytes
                continue
            uses.setdefault(dev, DeviceUse(dev, None)).weights += nbytes
            if prefix and name.startswith(prefix + "."):
                layer_of[name] = int(name[len(prefix) + 1 :].split(".")[0])
        # which device runs each decoder layer, and the largest layer streamed in from cpu/disk
        staging = 0
        for i in range(len(blocks)):
            dev = place(f"{prefix}.{i}")
            run_on = dev if dev.startswith("cuda") else exec_device
            uses[run_on].layers.append(i)
            if run_on != dev:
                size = sum(t.numel() * t.element_size() for n, t in blocks[i].named_parameters())
                staging = max(staging, size)
        for use in uses.values():
            if use.layers:
                use.activations += act
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), "")
        head_dev = place(head_name + ".weight") if head_name else exec_device
        head_run = head_dev if head_dev.startswith("cuda") else exec_device
        uses[head_run].activations += logit
        uses[exec_device].activations += staging
        order = [names[i] for i in range(len(gpus))] + ["cpu", "disk"]
        return [uses[d] for d in order if d in uses and (d != "disk" or uses[d].weights)]

    # ------------------------------------------------------------------------------------------ options

    def _fits(self, request: PlanRequest) -> MemoryPlan:
        return self.plan(request, suggest=False)

    def min_gpus(self, request: PlanRequest, size: int, limit: int = 64) -> MemoryPlan | None:
        """The plan with the fewest GPUs of ``size`` that fits (None beyond ``limit``)."""
        probe = self._fits(replace(request, gpus=(size,), allow_offload=False))
        per_gpu = size - request.gpu_reserve - probe.layer_activations - probe.logits
        if per_gpu <= 0:
            return None
        start = max(1, math.ceil((probe.weights.total + probe.kv_cache) / per_gpu))
        for n in range(start, limit + 1):
            result = self._fits(replace(request, gpus=(size,) * n, allow_offload=False))
            if result.fits:
                return result
        return None

    def options(self, request: PlanRequest, current: MemoryPlan) -> list[Option]:
        """Configurations that would fit, least invasive first: smaller batch, more GPUs, 8-bit, 4-bit, offload."""
        out: list[Option] = []
        n_given = len(request.gpus)
        size = max(request.gpus) if request.gpus else 0
        # 1. a smaller batch on the same hardware, when the weights themselves fit
        if request.batch_size > 1:
            b = request.batch_size // 2
            while b >= 1:
                trial = self._fits(replace(request, batch_size=b, allow_offload=False))
                if trial.fits:
                    out.append(
                        Option(
                            f"batch size {b}",
                            trial.request,
                            trial.peak_gpu,
                            trial.cpu_needed,
                            True,
                            f"same precision and GPUs; peak {fmt_bytes(trial.peak_gpu or trial.cpu_needed)}",
                            f"--batch-size {b}",
                        )
                    )
                    break
                b //= 2
        # 2-4. same precision on more GPUs, then 8-bit, then 4-bit (each with its fewest GPUs)
        if size:
            order = [request.quantize]
            order += [
                q
                for q in ("8bit", "4bit")
                if q not in order and not (request.quantize == "4bit" and q == "8bit")
            ]
            for quant in order:
                trial = self.min_gpus(replace(request, quantize=quant), size)
                if trial is None:
                    continue
                n = len(trial.request.gpus)
                prec = {"4bit": "4-bit", "8bit": "8-bit"}.get(quant or "", request.dtype)
                label = f"{prec} on {fmt_gpus(trial.request.gpus)}"
                flag = (f"--quantize {quant} " if quant and quant != request.quantize else "") + (
                    f"--gpus {fmt_gpus(trial.request.gpus)}"
                )
                note = (
                    f"weights {fmt_bytes(trial.weights.total)}, peak {fmt_bytes(trial.peak_gpu)} per GPU"
                    + (
                        ""
                        if quant == request.quantize
                        else "; quantized weights perturb the model, so CD and accuracy may shift"
                    )
                )
                out.append(
                    Option(label, trial.request, trial.peak_gpu, trial.cpu_needed, n <= n_given, note, flag)
                )
        # 5. CPU offload on the GPUs given (bitsandbytes cannot offload quantized layers to the CPU)
        if request.gpus and not request.quantize:
            trial = self._fits(replace(request, cpu_memory=64 * TiB, allow_offload=True))
            on_cpu = sum(d.weights for d in trial.devices if d.device == "cpu")
            if (
                "disk" not in trial.device_map.values()
                and on_cpu
                and not any(d.over for d in trial.devices if d.device != "cpu")
            ):
                need = trial.cpu_needed
                have = (
                    ""
                    if need <= request.cpu_memory
                    else f" (more than the {fmt_bytes(request.cpu_memory)} given)"
                )
                out.append(
                    Option(
                        f"CPU offload of {fmt_bytes(on_cpu)}",
                        replace(trial.request, cpu_memory=need),
                        trial.peak_gpu,
                        need,
                        need <= request.cpu_memory,
                        f"needs {fmt_bytes(need)} of CPU RAM{have}; slow: offloaded layers are copied to the "
                        "GPU on every forward pass",
                        f"--cpu-memory {math.ceil(need / GiB)}GiB (load with device_map='auto')",
                    )
                )
        if not request.gpus:
            need = current.need + current.offloaded
            out.append(
                Option(
                    f"{fmt_bytes(need)} of CPU memory",
                    replace(request, cpu_memory=need),
                    0,
                    need,
                    True,
                    "or a GPU: plan again with --gpus",
                    f"--cpu-memory {math.ceil(need / GiB)}GiB",
                )
            )
        return out


def plan_memory(
    model: str | Any,
    request: PlanRequest | None = None,
    *,
    suggest: bool = True,
    revision: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> MemoryPlan:
    """Plan ``model`` (a ref, or a config object) for ``request`` (or its fields as keyword arguments)."""
    if request is None:
        if "gpus" in kwargs and isinstance(kwargs["gpus"], str):
            kwargs["gpus"] = tuple(parse_gpus(kwargs["gpus"]))
        if "cpu_memory" in kwargs:
            kwargs["cpu_memory"] = parse_size(kwargs["cpu_memory"])
        request = PlanRequest(**kwargs)
    if isinstance(model, str):
        planner = Planner.for_ref(model, revision=revision, trust_remote_code=trust_remote_code)
    else:
        planner = Planner(
            model, model=getattr(model, "name_or_path", None) or "model", source="config object"
        )
    return planner.plan(request, suggest=suggest)


def local_gpus() -> list[int]:
    """Free memory of each visible CUDA GPU, bytes (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def local_cpu_memory() -> int:
    """Available memory of this machine, bytes."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _gpu_index(key: Any) -> int | None:
    """GPU index of a max_memory key (``0`` or ``"cuda:0"``); None for "cpu"/"disk"."""
    if isinstance(key, int):
        return key
    text = str(key)
    return int(text.split(":")[1]) if text.startswith("cuda:") else None


def ensure_fits(
    ref: str,
    dtype: str = "bfloat16",
    quantize: str | None = None,
    *,
    max_memory: dict | None = None,
    batch_size: int = 16,
    seq_len: int = 512,
    allow_offload: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> MemoryPlan:
    """Plan ``ref`` on this machine's free GPU (and CPU) memory; raise :class:`PlanError` if it does not fit.

    ``max_memory`` (as for ``from_pretrained``) overrides the detected capacities. With
    ``allow_offload`` a plan that spills onto the CPU is accepted (it runs, slowly).
    """
    gpus = local_gpus()
    cpu = local_cpu_memory()
    if max_memory:
        gpu_items = sorted(
            ((_gpu_index(k), v) for k, v in max_memory.items() if _gpu_index(k) is not None),
            key=lambda kv: kv[0],
        )
        gpus = [parse_size(v) for _, v in gpu_items]
        cpu = parse_size(max_memory.get("cpu", cpu))
    request = PlanRequest(
        dtype=dtype,
        quantize=quantize,
        gpus=tuple(gpus),
        cpu_memory=cpu,
        batch_size=batch_size,
        seq_len=seq_len,
        allow_offload=allow_offload or not gpus,
    )
    result = plan_memory(ref, request, revision=revision, trust_remote_code=trust_remote_code)
    ok = result.fits or (allow_offload and "disk" not in result.device_map.values())
    if not ok:
        raise PlanError(" ".join(line.strip() for line in result.explain()))
    return result
