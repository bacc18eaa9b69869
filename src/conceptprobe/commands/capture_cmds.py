"""``conceptprobe capture --model M --prompts FILE``: residual-stream vectors of your own prompts.

Writes ``activations.safetensors`` ``[n, layers, positions, d]``, ``prompts.jsonl`` (with greedy answers
when ``--answer-tokens`` > 0) and ``capture.json`` into ``--out``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def capture_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Packaged alias, .gguf file, folder or hub id."),
    prompts: Path = typer.Option(
        ..., "--prompts", help="A .jsonl file (strings or {prompt: ...}) or .txt (one per line)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the vectors and prompts to."),
    layers: str = typer.Option("all", "--layers", help="'all' or comma-separated residual-stream layers."),
    positions: str = typer.Option(
        "0", "--positions", help="Offsets from each prompt's last token, e.g. 0,-1."
    ),
    answer_tokens: int = typer.Option(0, "--answer-tokens", help="Also decode this many tokens greedily."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto | float32 | bfloat16 | float16 [auto: bf16 where native, else fp32]."
    ),
) -> None:
    """Capture the residual stream of your own prompts (the layers and positions of your choice)."""
    from conceptprobe.experiments.capture import capture, read_prompts, write_captured
    from conceptprobe.models import load_model

    texts = read_prompts(prompts)
    chosen = "all" if layers == "all" else [int(v) for v in layers.split(",") if v.strip()]
    loaded = load_model(model, dtype)
    got = capture(
        loaded,
        texts,
        layers=chosen,
        positions=[int(v) for v in positions.split(",")],
        answer_tokens=answer_tokens,
    )
    write_captured(out, got, texts, loaded.info.to_dict())
    console.print(
        f"{len(texts)} prompts x {len(got.layers)} layers x {len(got.positions)} positions x "
        f"{got.activations.shape[-1]} -> {out}",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add ``capture`` to ``app``."""
    app.command("capture")(capture_cmd)
