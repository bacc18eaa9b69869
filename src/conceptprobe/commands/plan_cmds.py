"""``conceptprobe plan``: will a model fit, where does each layer go, and if not, what would.

``conceptprobe plan --model meta-llama/Llama-3.1-70B --quantize 4bit --gpus 1x80GiB``
``conceptprobe plan --model google/gemma-2-27b --dtype bfloat16 --gpus 1x24GiB --batch-size 16 --seq-len 512``

Works offline for the paper's five models and the packaged aliases (their configs ship with the
package), for local folders and .gguf files; any other hub id reads its config from the hub.
Exit status 0 when it fits, 1 when it does not (the options are printed either way).
"""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _layers(value: str) -> str | tuple[int, ...]:
    if value.strip() == "all":
        return "all"
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"--layers takes 'all' or comma-separated integers, got {value!r}") from None


def _device_table(plan: Any) -> Table:
    from conceptprobe.models.plan import fmt_bytes

    table = Table(title="Planned peak memory per device")
    for col in (
        "device",
        "layers",
        "weights",
        "KV cache",
        "activations",
        "runtime",
        "capture",
        "total",
        "capacity",
        "free",
    ):
        table.add_column(col, justify="left" if col == "device" else "right")
    for d in plan.devices:
        if d.device == "disk":
            cap, free = "-", "-"
        else:
            cap = fmt_bytes(d.capacity or 0)
            free = fmt_bytes(d.free or 0)
            free = f"[red]{free}[/]" if d.over else free
        span = f"{min(d.layers)}-{max(d.layers)}" if d.layers else ""
        table.add_row(
            d.device,
            span,
            fmt_bytes(d.weights),
            fmt_bytes(d.kv_cache),
            fmt_bytes(d.activations),
            fmt_bytes(d.runtime),
            fmt_bytes(d.capture),
            fmt_bytes(d.total),
            cap,
            free,
        )
    return table


def _options_table(plan: Any) -> Table:
    from conceptprobe.models.plan import fmt_bytes

    table = Table(
        title="Configurations that fit (searched: smaller batch, more GPUs, 8-bit, 4-bit, CPU offload)"
    )
    for col in ("option", "change", "peak GPU", "CPU", "on your GPUs", "note"):
        table.add_column(col, overflow="fold")
    best = plan.recommendation()
    for opt in plan.options:
        mark = " (recommended)" if opt is best else ""
        table.add_row(
            opt.label + mark,
            opt.flag,
            fmt_bytes(opt.peak_gpu) if opt.peak_gpu else "-",
            fmt_bytes(opt.cpu_needed),
            "yes" if opt.fits_given_gpus else "no",
            opt.note,
        )
    return table


def print_plan(plan: Any, show_map: bool = False) -> None:
    """The plan as rich text: model, bytes, the device table, the verdict, the options."""
    from conceptprobe.models.plan import fmt_bytes

    req, w, s = plan.request, plan.weights, plan.shape
    console.print(
        f"[bold]{plan.model}[/] ({plan.source}): {plan.architecture}, {s.n_layers} layers, d={s.hidden}, "
        f"{s.heads} heads ({s.kv_heads} KV, head_dim {s.head_dim}), vocab {s.vocab:,}, attention {plan.attention}",
        highlight=False,
    )
    quant = ""
    if w.n_quantized:
        kind = "4-bit NF4 + double quant" if req.quantize == "4bit" else "8-bit LLM.int8"
        quant = f"; {w.n_quantized:,} of them in {w.n_quantized_modules} Linear layers as {kind}"
    console.print(f"parameters: {w.n_params:,} ({w.n_params / 1e9:.2f}B){quant}", highlight=False)
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in w.by_kind.items() if v)
    console.print(
        f"weights: {fmt_bytes(w.total)} ({w.total / 1e9:.1f} GB): {parts}"
        + (f", buffers {fmt_bytes(w.buffer_bytes)}" if w.buffer_bytes >= 1024 else ""),
        highlight=False,
    )
    layers = "all" if req.layers == "all" else ",".join(map(str, req.layers))
    console.print(
        f"batch {req.batch_size} x {req.seq_len} tokens: KV cache {fmt_bytes(plan.kv_cache)}, peak activations of "
        f"one layer {fmt_bytes(plan.layer_activations)}, logits of the gathered rows {fmt_bytes(plan.logits)}; "
        f"capture buffers ({plan.captured_layers} layers ({layers}) x {req.positions} position x {s.hidden}, fp32) "
        f"{fmt_bytes(plan.capture)} on the CPU",
        highlight=False,
        markup=False,
    )
    console.print(_device_table(plan))
    if show_map:
        console.print("device map: " + json.dumps(plan.to_dict()["device_map"]), highlight=False)
    lines = plan.explain()
    style = "bold green" if plan.fits else "bold red"
    console.print(f"[{style}]{lines[0]}[/]", highlight=False)
    for line in lines[1:]:
        console.print(line, highlight=False, markup=False)
    if plan.options:
        console.print(_options_table(plan))
    console.print(
        "assumptions: runtime reserve per GPU "
        f"{fmt_bytes(req.gpu_reserve)}, host {fmt_bytes(req.cpu_reserve)}; layers run one at a time; the "
        "memory model is described in the docstring of conceptprobe.models.plan",
        style="dim",
        highlight=False,
    )


def plan(
    model: str = typer.Option(
        ..., "--model", "-m", help="Hub id, packaged alias, local folder or .gguf file."
    ),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32 | bfloat16 | float16 (compute dtype)."),
    quantize: str | None = typer.Option(None, "--quantize", "-q", help="4bit (NF4) | 8bit (LLM.int8)."),
    gpus: str | None = typer.Option(
        None, "--gpus", help="GPUs to plan for, e.g. 2x80GiB or 1x24GiB,1x48GiB [none: CPU only]."
    ),
    cpu_memory: str | None = typer.Option(
        None, "--cpu-memory", help="CPU memory for offload and capture buffers [this machine's RAM]."
    ),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Prompts per forward pass."),
    seq_len: int = typer.Option(512, "--seq-len", help="Positions per prompt, prompt plus generated tokens."),
    layers: str = typer.Option("all", "--layers", help="Captured layers: 'all' or comma-separated indices."),
    positions: int = typer.Option(1, "--positions", help="Captured positions per prompt."),
    gpu_reserve: str = typer.Option(
        "1GiB", "--gpu-reserve", help="Per-GPU runtime reserve (CUDA context etc.)."
    ),
    revision: str | None = typer.Option(None, "--revision", help="Hub revision (hub ids only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    show_map: bool = typer.Option(False, "--show-map", help="Print the device map."),
) -> None:
    """Plan memory before loading: per-device bytes, device map, whether it fits, and what would."""
    from conceptprobe.models.plan import PlanRequest, local_cpu_memory, parse_gpus, parse_size, plan_memory
    from conceptprobe.models.quantize import normalize_quantize

    try:
        quant = normalize_quantize(quantize)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    request = PlanRequest(
        dtype=dtype,
        quantize=quant,
        gpus=tuple(parse_gpus(gpus)),
        cpu_memory=parse_size(cpu_memory) if cpu_memory else local_cpu_memory(),
        batch_size=batch_size,
        seq_len=seq_len,
        layers=_layers(layers),
        positions=positions,
        gpu_reserve=parse_size(gpu_reserve),
    )
    result = plan_memory(model, request, revision=revision)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_plan(result, show_map=show_map)
    if not result.fits:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``plan`` to the CLI."""
    app.command("plan")(plan)
