"""The 2B-70B path on one GPU: bf16 capture speed, 4/8-bit bitsandbytes loading, a GPU/CPU split and the
70B memory plan, measured in one run against the package's own plan (issue 17).

    python benchmarks/bench_gpu.py [--out results/gpu] [--budget-s 480] [--sections capture,quantized,split,plan70b]
    python benchmarks/bench_gpu.py --dry-run --out /tmp/gpu-dry   # the same code on the CPU, tiny shapes

No weights are downloaded: every model is a random initialisation of a real shape, built from the configs
the package ships (``conceptprobe/models/configs``: google/gemma-2-2b, meta-llama/Llama-3.1-8B and
meta-llama/Llama-3.1-70B), with an offline byte-level BPE tokenizer trained in memory on the task prompts
(digits one token each, as Gemma-2's tokenizer splits them, so the 4-shot bitwise prompts have a realistic
length). Sections, each guarded (a failure becomes a row with its error text, and the others still run):

capture    bf16 tokens/s of capturing every layer at the last position (``capture_and_generate``, the
           package's capture path) vs the decoder-only floor (same model and batches, no hooks), achieved
           TFLOP/s (2 x non-embedding parameters x tokens) vs a bf16 matmul rate measured here, the
           greedy-answer step, the top kernels of one captured batch, and peak memory vs ``plan``.
quantized  a random Llama-3.1-8B saved as safetensors, loaded through ``from_pretrained`` with
           ``quantize=4bit`` and ``8bit`` (``load_model``), then ``conceptprobe.run`` on bitwise end to end:
           finite vectors, k-NN decodability computed, peak ``torch.cuda.max_memory_allocated`` vs ``plan``.
split      the same 8B folder split across GPU and CPU (``device_map="auto"`` + ``max_memory``): its
           vectors vs the unsplit bf16 load (max abs and relative difference).
plan70b    2 and 4 layers of the Llama-3.1-70B shape in 4-bit: bytes per layer, extrapolated to 80 layers,
           vs the plan's per-layer and total weight bytes; the plan's verdict for the full 70B here.

``--dry-run`` runs the same code on the CPU with tiny shapes (the shipped configs shrunk to d=64, 4 layers)
and writes "skipped: needs CUDA" rows for what needs a GPU or bitsandbytes. Tables go to ``--out``:
``bench_gpu.md`` (all tables), one CSV per section and ``bench_gpu.json`` (device, versions, rows); they
are rewritten after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SHAPES = {
    "gemma-2-2b": "google/gemma-2-2b",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
}
# --dry-run: the shipped configs shrunk (everything else, e.g. Gemma's soft-capping and sliding layers, kept)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=1024,
)
TINY_LAYERS = 4  # --dry-run depth, except where the real depth is asked for (the 70B extrapolation)
SECTIONS = ("capture", "quantized", "split", "plan70b")
GiB = 1024**3
NEEDS_CUDA = "skipped: needs CUDA"


# ---------------------------------------------------------------------------------------------- set-up


class Context:
    """Settings of this run, its clock, the shared tokenizer and the model folders saved so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = bool(args.dry_run)
        self.cuda = torch.cuda.is_available() and not self.dry
        self.device = "cuda" if self.cuda else "cpu"
        self.start = time.perf_counter()
        self.budget = float(args.budget_s)
        self.batch_size = args.batch_size or (4 if self.dry else 32)
        self.n_batches = args.batches or (2 if self.dry else 16)
        self.repeats = args.repeats or (1 if self.dry else 3)
        self.run_n = args.run_n or (8 if self.dry else 20)
        self.split_prompts = 8 if self.dry else 64
        self.work = Path(args.work or tempfile.mkdtemp(prefix="bench-gpu-"))
        self.work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("CONCEPTPROBE_CACHE", str(self.work / "cache"))  # hashes memoised here, not ~
        self._tokenizer = None
        self._folders: dict[tuple[str, int | None], Path | BaseException] = {}
        self.save_seconds: dict[str, float] = {}  # building + saving each random model (disk speed matters)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget

    @property
    def capacity(self) -> int:
        return torch.cuda.get_device_properties(0).total_memory if self.cuda else 0

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer()
        return self._tokenizer

    def saved(self, name: str, layers: int | None = None) -> Path:
        """A random model of shape ``name`` saved as safetensors with the tokenizer (once per run)."""
        key = (name, layers)
        if key not in self._folders:
            try:
                t = time.perf_counter()
                folder = self.work / f"{name}{'' if layers is None else f'-{layers}layers'}"
                model = build_random(shape_config(name, self.dry, layers), self.device)
                model.save_pretrained(folder)
                self.tokenizer.save_pretrained(folder)
                del model
                free_memory()
                self._folders[key] = folder
                self.save_seconds[folder.name] = round(time.perf_counter() - t, 1)
            except BaseException as exc:  # remembered: a second section asking gets the same error at once
                self._folders[key] = exc
        got = self._folders[key]
        if isinstance(got, BaseException):
            raise RuntimeError(f"saving the random {name} failed earlier: {one_line(got)}")
        return got


def shape_config(name: str, dry: bool, layers: int | None = None):
    """The transformers config of a shipped real shape (shrunk with ``dry``; ``layers`` decoder layers)."""
    from transformers import AutoConfig

    from conceptprobe.models.plan import shipped_configs

    data = json.loads(shipped_configs()[SHAPES[name]].read_text())
    if dry:
        data.update(TINY, num_hidden_layers=TINY_LAYERS)
    if layers is not None:
        data["num_hidden_layers"] = layers
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def build_random(config: Any, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A randomly initialised causal LM of ``config``, built directly on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def make_tokenizer():
    """An offline byte-level BPE tokenizer (vocab 600, <pad>/<bos>/<eos> = 0/1/2, BOS added, digits split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from conceptprobe.prompts import build_prompts
    from conceptprobe.tasks import get_task

    corpus = []
    for name in ("pos", "bitwise"):
        task = get_task(name)
        for concept in task.concepts:
            corpus += [p.text + " " + p.answer + "\n" for p in build_prompts(task, concept, 4, 30, seed=123)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.padding_side = "left"
    return fast


def bitwise_prompts(n: int, shots: int = 4, seed: int = 0) -> list[Any]:
    """``n`` real bitwise prompts (the package's prompt builder), concepts interleaved."""
    from conceptprobe.prompts import build_prompts
    from conceptprobe.tasks import get_task

    task = get_task("bitwise")
    per = math.ceil(n / len(task.concepts))
    groups = [build_prompts(task, c, shots, per, seed=seed) for c in task.concepts]
    out = [p for row in zip(*groups, strict=True) for p in row]
    return out[:n]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mem_allocated(ctx: Context) -> int:
    return torch.cuda.memory_allocated() if ctx.cuda else 0


def reset_peak(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()


def peak_since(ctx: Context, base: int) -> int | None:
    return torch.cuda.max_memory_allocated() - base if ctx.cuda else None


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers as they are stored (packed 4-bit weights as uint8)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def gib(n: float | int | None) -> float | None:
    return None if n is None else round(n / GiB, 3)


def ratio(a: float | int | None, b: float | int | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def guarded(section: str, item: str, fn: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``fn()``'s rows, or one error row (the error text and the last traceback line) when it raises."""
    t = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every failure is a row, the other items still run
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        traceback.print_exc()
        return [
            {
                "section": section,
                "item": item,
                "status": "error",
                "error": one_line(exc) + where,
                "seconds": round(time.perf_counter() - t, 1),
            }
        ]
    finally:
        free_memory()


def skipped(section: str, item: str, why: str) -> dict[str, Any]:
    return {"section": section, "item": item, "status": why}


# ---------------------------------------------------------------------------------------------- capture


def matmul_rate(ctx: Context) -> dict[str, Any]:
    """bf16 matmul TFLOP/s measured here: n x n x n products, timed with CUDA events (perf_counter on CPU)."""
    n, iters = (8192, 100) if ctx.cuda else (256, 5)
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    for _ in range(10 if ctx.cuda else 2):
        a @ b
    sync(ctx.device)
    if ctx.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        seconds = time.perf_counter() - t
    tflops = 2 * n**3 * iters / seconds / 1e12
    return {
        "section": "capture",
        "item": f"bf16 matmul {n}x{n}x{n}",
        "status": "ok",
        "variant": "matmul",
        "seconds": round(seconds, 4),
        "tflops": round(tflops, 3),
    }


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside the input embedding and the (untied) output embedding."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    seen = {id(emb)}
    excluded = emb.numel()
    if head is not None and id(head.weight) not in seen:
        excluded += head.weight.numel()
    return sum(p.numel() for p in model.parameters()) - excluded


def top_kernels(fn: Callable[[], None], ctx: Context, k: int = 5) -> list[tuple[str, float, float]]:
    """(name, share of self time, ms) of the ``k`` kernels (CUDA) or ops (CPU) with the most self time in ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof:
        fn()
        sync(ctx.device)
    keys = ("self_device_time_total", "self_cuda_time_total") if ctx.cuda else ("self_cpu_time_total",)

    def self_us(ev: Any) -> float:
        for key in keys:
            value = getattr(ev, key, None)
            if value is not None:
                return float(value)
        return 0.0

    events = [e for e in prof.key_averages() if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    top = sorted(events, key=self_us, reverse=True)[:k]
    return [(e.key, self_us(e) / total, self_us(e) / 1000) for e in top]


def capture_one(ctx: Context, name: str, matmul_tflops: float | None) -> list[dict[str, Any]]:
    """Floor vs capture vs capture + greedy answer for one shape; peak memory vs plan; top kernels."""
    from conceptprobe.generation import capture_and_generate, encode, position_ids
    from conceptprobe.hooks import ResidualCapture
    from conceptprobe.models.layers import base_model, decoder_layers, logits_from_hidden
    from conceptprobe.models.plan import PlanRequest, plan_memory

    section = "capture"
    free_memory()
    base = mem_allocated(ctx)
    config = shape_config(name, ctx.dry)
    t = time.perf_counter()
    model = build_random(config, ctx.device)
    build_s = time.perf_counter() - t
    tok = ctx.tokenizer
    prompts = bitwise_prompts(ctx.batch_size * ctx.n_batches)
    texts = [p.text for p in prompts]
    batches = [encode(tok, texts[i : i + ctx.batch_size]) for i in range(0, len(texts), ctx.batch_size)]
    padded = sum(b.input_ids.numel() for b in batches)
    real = sum(int(b.attention_mask.sum()) for b in batches)
    seq = max(b.input_ids.shape[1] for b in batches)
    answer_tokens = max(len(tok(" " + p.answer, add_special_tokens=False)["input_ids"]) for p in prompts)
    max_new = answer_tokens + 2  # what a run decodes by default (longest answer + 2)
    n_layers = len(decoder_layers(model))
    nonembed = non_embedding_params(model)
    dev = ctx.device
    body = base_model(model)
    cap = ResidualCapture(model, layers="all", dtype=torch.float32)

    def floor() -> None:
        for b in batches:
            ids, mask = b.input_ids.to(dev), b.attention_mask.to(dev)
            out = body(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
            logits_from_hidden(model, out.last_hidden_state[:, -1, :])
        sync(dev)

    def capture() -> None:
        for b in batches:
            capture_and_generate(model, tok, b, cap, [0], 0)
        sync(dev)

    variants = {"floor": floor, "capture": capture}
    times: dict[str, list[float]] = {k: [] for k in variants}
    reset_peak(ctx)
    with torch.inference_mode(), cap:
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(ctx.repeats):  # round robin, so drift hits both alike
            for key, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
        # greedy answers: one prefill with capture, then KV-cached decoding (no early stop: fixed steps)
        gen_batches = batches[: min(4, len(batches))]
        timer: dict[str, float] = {}
        t = time.perf_counter()
        gen_error = kernel_error = None
        try:
            for b in gen_batches:
                capture_and_generate(model, tok, b, cap, [0], max_new, stop="", timer=timer)
            sync(dev)
        except Exception as exc:  # noqa: BLE001 - the timings above stand without it
            gen_error = one_line(exc)
        gen_total = time.perf_counter() - t
        try:
            kernels = top_kernels(lambda: capture_and_generate(model, tok, batches[0], cap, [0], 0), ctx)
        except Exception as exc:  # noqa: BLE001 - the profiler (CUPTI) is a courtesy
            kernels, kernel_error = [], one_line(exc)
    peak = peak_since(ctx, base)
    med = {k: statistics.median(v) for k, v in times.items()}
    plan = plan_memory(
        config,
        PlanRequest(
            dtype="bfloat16",
            gpus=(ctx.capacity,) if ctx.cuda else (),
            batch_size=ctx.batch_size,
            seq_len=seq + max_new,
            gpu_reserve=0,
            cpu_memory=1 << 50,
        ),
        suggest=False,
    )
    plan_peak = plan.peak_gpu if ctx.cuda else None
    common = {
        "section": section,
        "item": name,
        "status": "ok",
        "device": dev,
        "attention": str(getattr(model.config, "_attn_implementation", "")),
        "layers_captured": len(cap.layers),
        "decoder_layers": n_layers,
        "batch": ctx.batch_size,
        "batches": len(batches),
        "seq_padded": seq,
        "tokens_padded": padded,
        "tokens_real": real,
        "non_embedding_params": nonembed,
    }
    rows = []
    for key, s in med.items():
        flops = 2 * nonembed * padded
        tflops = flops / s / 1e12
        rows.append(
            {
                **common,
                "variant": key,
                "seconds": round(s, 4),
                "tokens_per_s": round(padded / s, 1),
                "ratio_to_floor": round(med["floor"] / s, 3),
                "tflops": round(tflops, 3),
                "share_of_matmul_rate": ratio(tflops, matmul_tflops),
            }
        )
    prefill = timer.get("forward_s", 0.0)
    decode = timer.get("generate_s", 0.0)
    steps = max(1, max_new - 1) * len(gen_batches)
    rows.append(
        {
            **common,
            "status": "error" if gen_error else "ok",
            "error": gen_error,
            "batches": len(gen_batches),
            "variant": f"capture + greedy answer ({max_new} tokens)",
            "seconds": round(gen_total, 4),
            "prefill_s": round(prefill, 4),
            "decode_s": round(decode, 4),
            "ms_per_decode_step": round(1000 * decode / steps, 2),
            "ratio_to_prefill": ratio(gen_total, prefill),
        }
    )
    rows.append(
        {
            **common,
            "variant": "memory",
            "seconds": round(build_s, 2),
            "measured_peak_gib": gib(peak),
            "plan_peak_gib": gib(plan_peak),
            "peak_over_plan": ratio(peak, plan_peak),
            "plan_weights_gib": gib(plan.weights.total),
            "model_gib": gib(model_bytes(model)),
            "note": "peak = max_memory_allocated over the section (CUDA only); plan with gpu_reserve 0",
        }
    )
    if kernel_error:
        rows.append({"section": "kernels", "item": name, "status": "error", "error": kernel_error})
    for rank, (kernel, share, ms) in enumerate(kernels, 1):
        rows.append(
            {
                "section": "kernels",
                "item": name,
                "status": "ok",
                "device": dev,
                "rank": rank,
                "kernel": kernel[:120],
                "share_of_self_time": round(share, 3),
                "ms": round(ms, 3),
                "note": "one captured batch (capture_and_generate, 0 new tokens), torch.profiler self time",
            }
        )
    return rows


def section_capture(ctx: Context) -> list[dict[str, Any]]:
    rows = guarded("capture", "bf16 matmul", lambda: [matmul_rate(ctx)])
    rate = rows[0].get("tflops")
    for name in ("gemma-2-2b", "llama-3.1-8b"):
        if ctx.over_budget():
            rows.append(skipped("capture", name, f"skipped: time budget ({ctx.budget:.0f} s) spent"))
            continue
        rows += guarded("capture", name, lambda name=name: capture_one(ctx, name, rate))
    return rows


# ---------------------------------------------------------------------------------------------- quantized


def quantized_run(ctx: Context, quantize: str | None) -> list[dict[str, Any]]:
    """Load the saved 8B through from_pretrained (``load_model``), then ``conceptprobe.run`` end to end."""
    import numpy as np

    import conceptprobe
    from conceptprobe.config import RunConfig
    from conceptprobe.experiments.probe import preview
    from conceptprobe.models import load_model
    from conceptprobe.models.plan import PlanRequest, plan_memory

    label = quantize or "bfloat16"
    folder = ctx.saved("llama-3.1-8b")
    free_memory()
    base = mem_allocated(ctx)
    reset_peak(ctx)
    t = time.perf_counter()
    loaded = load_model(str(folder), "bfloat16", quantize=quantize)
    load_s = time.perf_counter() - t
    weights = (mem_allocated(ctx) - base) if ctx.cuda else model_bytes(loaded.model)
    peak_load = peak_since(ctx, base)
    where = Counter(str(p.device) for p in loaded.model.parameters())
    reset_peak(ctx)
    cfg = {
        "model": str(folder),
        "task": "bitwise",
        "shots": 4,
        "n": ctx.run_n,
        "dtype": "bfloat16",
        "n_permutations": 20,
        "probe_permutations": 2,  # 0 is accepted by RunConfig but crashes measures/suite.py (np.quantile of [])
        "n_bootstrap": 100,
    }
    t = time.perf_counter()
    result = conceptprobe.run(cfg, out=ctx.work / f"run-{label}", loaded=loaded, progress=False)
    run_s = time.perf_counter() - t
    peak_run = peak_since(ctx, base)
    run = conceptprobe.load_run(ctx.work / f"run-{label}")
    stacks = [run.activations(layer=layer)[0] for layer in run.layers]
    finite = all(bool(np.isfinite(x).all()) for x in stacks)
    knn = result.metrics.query("metric == 'cd_knn' and concept == 'all'")["value"]
    accuracy = result.metrics.query("metric == 'icl_accuracy' and concept == 'all'")["value"]
    # the plan of the same settings: the run's batch size, its preview's sequence length (longest + 8)
    pre = preview(RunConfig.model_validate(cfg))
    longest = max(max(v) for v in pre.tokens.values())
    plan = plan_memory(
        str(folder),
        PlanRequest(
            dtype="bfloat16",
            quantize=quantize,
            gpus=(ctx.capacity,) if ctx.cuda else (),
            batch_size=16,
            seq_len=longest + 8,
            gpu_reserve=0,
            cpu_memory=1 << 50,
        ),
        suggest=False,
    )
    peak = None if peak_run is None else max(peak_run, peak_load or 0)
    plan_peak = plan.peak_gpu if ctx.cuda else None
    del loaded
    return [
        {
            "section": "quantized",
            "item": f"llama-3.1-8b {label}",
            "status": "ok",
            "device": ",".join(f"{k}:{v}" for k, v in sorted(where.items())),
            "load_s": round(load_s, 1),
            "run_s": round(run_s, 1),
            "prompts": int(stacks[0].shape[0]),
            "layers": len(run.layers),
            "vectors_finite": finite,
            "knn_layers": int(knn.notna().sum()),
            "knn_max": round(float(knn.max()), 3) if len(knn) else None,
            "icl_accuracy": round(float(accuracy.iloc[0]), 3) if len(accuracy) else None,
            "measured_weights_gib": gib(weights),
            "plan_weights_gib": gib(plan.weights.total),
            "weights_over_plan": ratio(weights, plan.weights.total),
            "peak_load_gib": gib(peak_load),
            "peak_run_gib": gib(peak_run),
            "plan_peak_gib": gib(plan_peak),
            "peak_over_plan": ratio(peak, plan_peak),
            "within_15pct": None if peak is None or not plan_peak else abs(peak / plan_peak - 1) <= 0.15,
        }
    ]


def section_quantized(ctx: Context) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    for q in ("4bit", "8bit"):
        if not ctx.cuda:
            rows.append(skipped("quantized", f"llama-3.1-8b {q}", NEEDS_CUDA + " and bitsandbytes"))
        elif not has_bnb:
            rows.append(
                skipped("quantized", f"llama-3.1-8b {q}", "skipped: needs bitsandbytes (conceptprobe[gpu])")
            )
        elif ctx.over_budget():
            rows.append(skipped("quantized", f"llama-3.1-8b {q}", "skipped: time budget spent"))
        else:
            rows += guarded("quantized", f"llama-3.1-8b {q}", lambda q=q: quantized_run(ctx, q))
    if ctx.dry:  # the same load -> run -> checks -> plan path, unquantized, so the logic runs on the CPU
        rows += guarded("quantized", "llama-3.1-8b bfloat16", lambda: quantized_run(ctx, None))
    return rows


# ---------------------------------------------------------------------------------------------- split


def section_split(ctx: Context) -> list[dict[str, Any]]:
    return guarded("split", "llama-3.1-8b", lambda: split_run(ctx))


def split_run(ctx: Context) -> list[dict[str, Any]]:
    """The unsplit bf16 load vs a GPU/CPU split (CPU/disk split in --dry-run): captured vectors compared."""
    from conceptprobe.experiments.capture import capture
    from conceptprobe.models import load_model
    from conceptprobe.models.plan import plan_memory

    folder = ctx.saved("llama-3.1-8b")
    prompts = [p.text for p in bitwise_prompts(ctx.split_prompts)]
    kw = dict(layers="all", positions=[0], batch_size=32, max_batch_tokens=None)
    t = time.perf_counter()
    ref = load_model(str(folder), "bfloat16", device_map={"": 0} if ctx.cuda else None)
    with torch.inference_mode():
        want = capture(ref, prompts, **kw).activations
    unsplit_s = time.perf_counter() - t
    n_layers = ref.info.n_layers
    del ref
    free_memory()
    offload = ctx.work / "offload"
    if ctx.cuda:
        weights = plan_memory(str(folder), dtype="bfloat16", suggest=False).weights.total
        max_memory: dict[Any, Any] | None = {0: int(weights * 0.5), "cpu": int(weights * 2)}
        device_map: Any = "auto"
    else:  # no GPU: alternate decoder layers between CPU and disk (accelerate's hooks, as on a GPU split)
        max_memory = None
        device_map = {
            "model.embed_tokens": "cpu",
            "model.rotary_emb": "cpu",
            "model.norm": "cpu",
            "lm_head": "cpu",
        }
        device_map |= {f"model.layers.{i}": ("cpu" if i % 2 == 0 else "disk") for i in range(n_layers)}
    t = time.perf_counter()
    split = load_model(
        str(folder), "bfloat16", device_map=device_map, max_memory=max_memory, offload_folder=offload
    )
    placed = Counter(str(v) for v in split.model.hf_device_map.values())
    with torch.inference_mode():
        got = capture(split, prompts, **kw).activations
    split_s = time.perf_counter() - t
    del split
    shutil.rmtree(offload, ignore_errors=True)
    diff = (got - want).abs()
    scale = want.abs().max().item()
    norms = torch.linalg.vector_norm(got - want, dim=-1) / torch.linalg.vector_norm(want, dim=-1).clamp_min(
        1e-12
    )
    rel = diff.max().item() / scale if scale else float("nan")
    return [
        {
            "section": "split",
            "item": "llama-3.1-8b bf16",
            "status": "ok",
            "placement": ", ".join(f"{k}: {v} modules" for k, v in sorted(placed.items())),
            "max_memory": None if max_memory is None else {str(k): gib(v) for k, v in max_memory.items()},
            "prompts": len(prompts),
            "vectors": int(want.shape[0] * want.shape[1]),
            "unsplit_s": round(unsplit_s, 1),
            "split_s": round(split_s, 1),
            "max_abs_diff": float(f"{diff.max().item():.3g}"),
            "max_abs_value": float(f"{scale:.3g}"),
            "max_diff_over_max_value": float(f"{rel:.3g}"),
            "max_vector_rel_l2": float(f"{norms.max().item():.3g}"),
            "within_bf16": bool(rel <= 1e-2),
            "note": "bf16 tolerance: max |diff| <= 1e-2 x max |value| (bf16 eps 7.8e-3)",
        }
    ]


# ---------------------------------------------------------------------------------------------- 70B plan


def layers_loaded(ctx: Context, folder: Path, layers: int, quantize: str | None) -> int:
    """Bytes of the saved few-layer 70B loaded with ``layers`` decoder layers (the rest of the file unused)."""
    from transformers import AutoModelForCausalLM

    from conceptprobe.models.quantize import build_quantization_config

    free_memory()
    base = mem_allocated(ctx)
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "num_hidden_layers": layers}
    if quantize:
        kwargs["quantization_config"] = build_quantization_config(quantize, torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, **kwargs)
    got = (mem_allocated(ctx) - base) if ctx.cuda else model_bytes(model)
    del model
    free_memory()
    return got


def plan70b(ctx: Context, quantize: str | None) -> list[dict[str, Any]]:
    from conceptprobe.models.layers import decoder_layers
    from conceptprobe.models.plan import Planner, PlanRequest

    name = "llama-3.1-70b"
    folder = ctx.saved(name, layers=4)
    few = {k: layers_loaded(ctx, folder, k, quantize) for k in (2, 4)}
    per_layer = (few[4] - few[2]) / 2
    fixed = few[2] - 2 * per_layer
    depth = int(shape_config(name, False).num_hidden_layers)  # 80, also in --dry-run (only narrower)
    full = shape_config(name, ctx.dry, layers=depth)
    planner = Planner(full, model=SHAPES[name], source="shipped config")
    # the plan's own per-layer bytes: decoder layer 0 of its meta model, in the planned precision
    meta, weights, _ = planner._meta("bfloat16", quantize, True)
    plan_layer = sum(t.numel() * t.element_size() for t in decoder_layers(meta)[0].parameters())
    plan_fixed = weights.total - depth * plan_layer
    extrapolated = fixed + depth * per_layer
    verdict = planner.plan(
        PlanRequest(
            dtype="bfloat16",
            quantize=quantize,
            gpus=(ctx.capacity,) if ctx.cuda else (),
            batch_size=16,
            seq_len=512,
            cpu_memory=1 << 50,
        ),
        suggest=False,
    )
    label = quantize or "bfloat16"
    return [
        {
            "section": "plan70b",
            "item": f"{name} {label}",
            "status": "ok",
            "device": ctx.device,
            "layers_built": "2 and 4",
            "depth": depth,
            "measured_per_layer_mib": round(per_layer / 2**20, 2),
            "plan_per_layer_mib": round(plan_layer / 2**20, 2),
            "per_layer_over_plan": ratio(per_layer, plan_layer),
            "measured_rest_mib": round(fixed / 2**20, 2),
            "plan_rest_mib": round(plan_fixed / 2**20, 2),
            "extrapolated_weights_gib": gib(extrapolated),
            "plan_weights_gib": gib(weights.total),
            "extrapolated_over_plan": ratio(extrapolated, weights.total),
            "plan_fits_here": verdict.fits,
            "plan_peak_gib": gib(verdict.peak_gpu) if ctx.cuda else gib(verdict.cpu_needed),
            "note": "rest = embeddings, lm_head, final norm, buffers; plan peak for batch 16 x 512 (1 GiB reserve)",
        }
    ]


def section_plan70b(ctx: Context) -> list[dict[str, Any]]:
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if ctx.cuda and has_bnb:
        return guarded("plan70b", "llama-3.1-70b 4bit", lambda: plan70b(ctx, "4bit"))
    why = (
        NEEDS_CUDA + " and bitsandbytes"
        if not ctx.cuda
        else "skipped: needs bitsandbytes (conceptprobe[gpu])"
    )
    rows = [skipped("plan70b", "llama-3.1-70b 4bit", why)]
    if ctx.dry:  # the measure -> extrapolate -> compare path, unquantized, so the logic runs on the CPU
        rows += guarded("plan70b", "llama-3.1-70b bfloat16", lambda: plan70b(ctx, None))
    return rows


# ---------------------------------------------------------------------------------------------- output


def environment(ctx: Context) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        device = torch.cuda.get_device_name(0)
        memory = props.total_memory
    else:
        device, memory = "cpu", None
    return {
        "device": device,
        "device_memory_gib": gib(memory),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dry_run": ctx.dry,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if ctx.cuda else None,
        "transformers": version("transformers"),
        "accelerate": version("accelerate"),
        "bitsandbytes": version("bitsandbytes"),
        "conceptprobe": version("conceptprobe"),
        "settings": {
            "batch_size": ctx.batch_size,
            "batches": ctx.n_batches,
            "repeats": ctx.repeats,
            "run_n": ctx.run_n,
            "budget_s": ctx.budget,
        },
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


def markdown(env: dict[str, Any], rows: list[dict[str, Any]], seconds: float) -> str:
    lines = [
        "# bench_gpu" + (" (dry run: tiny shapes on the CPU)" if env["dry_run"] else ""),
        "",
        f"device: {env['device']}"
        + (f" ({env['device_memory_gib']} GiB)" if env["device_memory_gib"] else "")
        + f"; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
        f"accelerate {env['accelerate']}, bitsandbytes {env['bitsandbytes']}; {seconds:.0f} s",
    ]
    for section in (*SECTIONS, "kernels"):
        part = [r for r in rows if r["section"] == section]
        if not part:
            continue
        cols = list(dict.fromkeys(k for r in part for k in r if k != "section"))
        lines += ["", f"## {section}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in part]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, env: dict[str, Any], rows: list[dict[str, Any]], seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.md").write_text(markdown(env, rows, seconds))
    payload = {"environment": env, "seconds": round(seconds, 1), "rows": rows}
    if "save_seconds" in env:
        payload["save_seconds"] = env["save_seconds"]
    (out / "bench_gpu.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    for section in (*SECTIONS, "kernels"):
        part = [r for r in rows if r["section"] == section]
        if not part:
            continue
        cols = ["device_name", *dict.fromkeys(k for r in part for k in r)]
        with (out / f"{section}.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols)
            writer.writeheader()
            for r in part:
                writer.writerow({"device_name": env["device"], **{k: _csv(v) for k, v in r.items()}})


def _csv(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU; CUDA-only parts skipped")
    ap.add_argument("--out", help="output folder [results/gpu; results/gpu/dry-run with --dry-run]")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument(
        "--budget-s", type=float, default=480, help="start no new item after this many seconds [480]"
    )
    ap.add_argument("--batch-size", type=int, help="capture batch [32; 4 with --dry-run]")
    ap.add_argument("--batches", type=int, help="capture batches per variant [16; 2 with --dry-run]")
    ap.add_argument("--repeats", type=int, help="round-robin repeats [3; 1 with --dry-run]")
    ap.add_argument(
        "--run-n", type=int, help="prompts per concept of the quantized runs [20; 8 with --dry-run]"
    )
    ap.add_argument("--work", help="folder for the saved random models (removed afterwards) [a temp folder]")
    ap.add_argument("--keep-work", action="store_true", help="keep the saved models")
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; pass --dry-run to check the logic on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out or ("results/gpu/dry-run" if args.dry_run else "results/gpu"))
    ctx = Context(args)
    env = environment(ctx)
    print(f"# bench_gpu on {env['device']}: torch {env['torch']}, sections {', '.join(chosen)}", flush=True)
    runners = {
        "capture": section_capture,
        "quantized": section_quantized,
        "split": section_split,
        "plan70b": section_plan70b,
    }
    rows: list[dict[str, Any]] = []
    try:
        for section in chosen:
            t = time.perf_counter()
            if ctx.over_budget():
                rows.append(skipped(section, "all", f"skipped: time budget ({ctx.budget:.0f} s) spent"))
            else:
                rows += guarded(section, "all", lambda section=section: runners[section](ctx))
            print(f"## {section}: {time.perf_counter() - t:.1f} s", flush=True)
            env["save_seconds"] = ctx.save_seconds
            write_outputs(out, env, rows, ctx.elapsed())
    finally:
        if not args.keep_work and not args.work:
            shutil.rmtree(ctx.work, ignore_errors=True)
    write_outputs(out, env, rows, ctx.elapsed())
    print(markdown(env, rows, ctx.elapsed()))
    errors = [r for r in rows if r.get("status") == "error"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
