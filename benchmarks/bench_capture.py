"""Capture overhead, generation cost and memory, measured side by side in one run (issue: Performance).

    python benchmarks/bench_capture.py [--model smollm2-135m] [--dtype float32] [--quick]

Prints tokens/s of each variant divided by tokens/s of the floor (decoder-only forward + lm_head on the
gathered rows), with variants interleaved round-robin so machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from conceptprobe.batching import plan_batches
from conceptprobe.generation import capture_and_generate, capture_and_generate_batches, encode, position_ids
from conceptprobe.hooks import ResidualCapture
from conceptprobe.models import load_model
from conceptprobe.models.layers import base_model, logits_from_hidden
from conceptprobe.prompts import build_prompts
from conceptprobe.tasks import get_task


def prompts_for(n: int, shots: int) -> list[str]:
    task = get_task("pos")
    out: list[str] = []
    for concept in task.concepts:
        out += [
            p.text for p in build_prompts(task, concept, shots, max(1, n // len(task.concepts) + 1), seed=0)
        ]
    return out[:n]


def variants(lm, batches) -> dict[str, Callable[[], None]]:
    model, body = lm.model, base_model(lm.model)

    def floor() -> None:
        for b in batches:
            out = body(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                position_ids=position_ids(b.attention_mask),
            )
            logits_from_hidden(model, out.last_hidden_state[:, -1, :])

    cap = ResidualCapture(model)

    def ours() -> None:
        with cap:
            for b in batches:
                cap.set_positions(b.last_index.unsqueeze(1))
                out = body(
                    input_ids=b.input_ids,
                    attention_mask=b.attention_mask,
                    position_ids=position_ids(b.attention_mask),
                )
                logits_from_hidden(model, out.last_hidden_state[:, -1, :])
                cap.take()

    def hf_hidden_states() -> None:
        for b in batches:
            out = model(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                position_ids=position_ids(b.attention_mask),
                output_hidden_states=True,
            )
            torch.stack([h[:, -1, :] for h in out.hidden_states], 1).cpu()

    def plain_full_logits() -> None:
        for b in batches:
            model(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                position_ids=position_ids(b.attention_mask),
            )

    return {
        "floor": floor,
        "ours": ours,
        "hf_output_hidden_states": hf_hidden_states,
        "plain_full_logits": plain_full_logits,
    }


def bench_overhead(lm, n: int, batch_size: int, shots: int, repeats: int) -> dict[str, float]:
    texts = prompts_for(n, shots)
    batches = [encode(lm.tokenizer, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    fns = variants(lm, batches)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\n## Capture overhead ({lm.info.ref}, {lm.info.dtype}, {len(texts)} prompts, {tokens} tokens, "
        f"batch {batch_size}, median of {repeats})"
    )
    print("| variant | s | tokens/s | ratio to floor |\n|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {tokens / v:.0f} | {med['floor'] / v:.3f} |")
    return {k: med["floor"] / v for k, v in med.items()}


def bench_generation(lm, n: int, batch_size: int, shots: int) -> None:
    texts = prompts_for(n, shots)
    batches = [encode(lm.tokenizer, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    body = base_model(lm.model)
    with torch.inference_mode(), ResidualCapture(lm.model) as cap:
        capture_and_generate(lm.model, lm.tokenizer, batches[0], cap, [0], 4)  # warm-up
        t = time.perf_counter()
        for b in batches:
            body(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                position_ids=position_ids(b.attention_mask),
            )
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for b in batches:
            capture_and_generate(lm.model, lm.tokenizer, b, cap, [0], 4)
        full = time.perf_counter() - t
    print(f"\n## Generation ({len(texts)} prompts, 4 new tokens max, KV cache reused)")
    print("| | s per prompt | ratio |\n|---|---|---|")
    print(f"| prefill only | {prefill / len(texts):.4f} | 1.00 |")
    print(f"| capture + greedy answer | {full / len(texts):.4f} | {full / prefill:.2f} |")


def _vm(key: str) -> float:
    """A /proc/self/status memory field in MB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


#: KV cache held for wide decoding in the memory measurement (a run holds up to 25% of available memory).
DECODE_MB = 64


def _memory_child(
    model: str, dtype: str, n: int, shots: int, batch_size: int, max_tokens: int | None
) -> None:
    import gc

    lm = load_model(model, dtype)
    texts = prompts_for(n, shots)
    with torch.inference_mode(), ResidualCapture(lm.model) as cap:  # page every weight in first
        capture_and_generate(lm.model, lm.tokenizer, encode(lm.tokenizer, texts[:1]), cap, [0], 1)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    base = _vm("VmRSS")
    new_tokens = 4
    lengths = [len(ids) for ids in lm.tokenizer(texts)["input_ids"]]
    batches = plan_batches(lengths, batch_size, max_tokens, extra=new_tokens)  # as a run batches
    # as a run does: prefill batches within the token budget, answers decoded together within a KV budget
    decode_bytes = None if max_tokens is None else DECODE_MB * 2**20
    with torch.inference_mode(), ResidualCapture(lm.model) as cap:
        encoded = [encode(lm.tokenizer, [texts[i] for i in idx]) for idx in batches]
        capture_and_generate_batches(
            lm.model, lm.tokenizer, encoded, cap, [0], new_tokens, decode_bytes=decode_bytes
        )
    peak = _vm("VmHWM")
    seq = round(statistics.mean(lengths))
    rows = max(len(b) for b in batches)
    print(
        json.dumps({"n": n, "shots": shots, "seq": seq, "rows": rows, "after_load_mb": base, "peak_mb": peak})
    )


def bench_memory(lm, model: str, dtype: str, batch_size: int, quick: bool, max_tokens: int) -> None:
    cfg = lm_config(lm)
    # one decoder layer's activations for one batch at the longer length (residual in/out, attention
    # q/k/v/o, MLP gate/up/act): what the target allows doubling the length to add
    print(f"\n## Peak RSS ({model}, {dtype}; one process per row)")
    grid = [(32, 2), (32, 8)] if quick else [(64, 4), (64, 10), (128, 4), (128, 10)]
    for budget in (None, max_tokens):
        what = f"batch {batch_size}" + (
            f", token budget {budget}, decoding KV budget {DECODE_MB} MB"
            if budget
            else ", no token budget, every answer decoded in one batch"
        )
        print(f"\n### {what}\n")
        print(
            "| prompts | shots | tokens/prompt | rows/batch | RSS after load MB | peak RSS MB | growth MB |\n"
            "|---|---|---|---|---|---|---|"
        )
        growth: dict[tuple[int, int], float] = {}
        seqs: dict[int, tuple[int, int]] = {}
        for n, shots in grid:
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--memory-child",
                        json.dumps([model, dtype, n, shots, batch_size, budget]),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            growth[n, shots] = r["peak_mb"] - r["after_load_mb"]
            seqs[shots] = (r["seq"], r["rows"])
            print(
                f"| {n} | {shots} | {r['seq']} | {r['rows']} | {r['after_load_mb']:.0f} | {r['peak_mb']:.0f} | "
                f"{growth[n, shots]:.0f} |"
            )
        n0 = grid[0][0]
        (s_short, _), (s_long, rows_long) = seqs[grid[0][1]], seqs[grid[1][1]]
        layer_mb = one_layer_activation_mb(cfg, rows_long, s_long)
        delta = growth[n0, grid[1][1]] - growth[n0, grid[0][1]]
        print(
            f"\nlonger prompts ({s_short} -> {s_long} tokens) add {delta:.0f} MB of peak memory; one layer's "
            f"activations for one batch ({rows_long} x {s_long} tokens) are {layer_mb:.0f} MB: target "
            f"{'met' if delta < layer_mb else 'NOT met'}"
        )


def lm_config(lm) -> dict[str, int]:
    """Hidden size, MLP width and bytes per element of a loaded model."""
    c = lm.model.config
    size = next(lm.model.parameters()).element_size()
    return {"d": c.hidden_size, "ffn": c.intermediate_size, "bytes": size}


def one_layer_activation_mb(cfg: dict[str, int], rows: int, seq: int) -> float:
    """One decoder layer's activations for one batch: residual in and out, q/k/v/attention output (4 x d),
    MLP gate, up and activation (3 x ffn)."""
    per_token = 2 * cfg["d"] + 4 * cfg["d"] + 3 * cfg["ffn"]
    return rows * seq * per_token * cfg["bytes"] / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, one repeat")
    ap.add_argument("--n", type=int, default=128, help="prompts per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-batch-tokens", type=int, default=1024, help="token budget compared with none")
    ap.add_argument("--only", choices=["overhead", "generation", "memory"], help="run one part")
    ap.add_argument("--memory-child")
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(*json.loads(args.memory_child))
        return
    torch.manual_seed(0)
    lm = load_model(args.model, args.dtype)
    n, repeats = (16, 1) if args.quick else (args.n, args.repeats)
    print(f"# bench_capture: torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "overhead"):
        bench_overhead(lm, n, 16, 4, repeats)
    if args.only in (None, "generation"):
        bench_generation(lm, n, 16, 4)
    if args.only in (None, "memory"):
        bench_memory(lm, args.model, args.dtype, 16, args.quick, args.max_batch_tokens)


if __name__ == "__main__":
    main()
