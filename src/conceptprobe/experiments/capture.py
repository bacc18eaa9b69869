"""Residual-stream vectors (and optionally greedy answers) for any prompts you write.

    from conceptprobe import capture, load_model
    model = load_model("smollm2-135m", dtype="float32")
    got = capture(model, ["Input: cat\\nOutput:", "Input: run\\nOutput:"], layers=[0, 21], positions=[0, -1])
    got.activations.shape   # [2 prompts, 2 layers, 2 positions, 576]

``layers`` are residual-stream indices (0 = embeddings, i = output of decoder block i-1, before the final
norm; ``"all"`` = 0..n_layers); ``positions`` are offsets from each prompt's last token (0 = the last).
The same hooks, batching and padding as ``conceptprobe run``: a prompt alone and inside a padded batch
give the same vectors (fp32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Captured:
    """``activations`` ``[n, layers, positions, d]`` (float32), the layers and positions captured, and the
    greedy continuation of each prompt (cut at the first newline) when asked for."""

    activations: torch.Tensor
    layers: list[int]
    positions: list[int]
    answers: list[str] | None = None

    def at(self, layer: int, position: int = 0) -> torch.Tensor:
        """``[n, d]``: every prompt's vector at one layer and position."""
        return self.activations[:, self.layers.index(layer), self.positions.index(position)]


def capture(
    model: Any,
    prompts: Sequence[str],
    *,
    layers: Sequence[int] | str = "all",
    positions: Sequence[int] = (0,),
    answer_tokens: int = 0,
    dtype: str = "auto",
    batch_size: int = 16,
    max_batch_tokens: int | str | None = "auto",
) -> Captured:
    """Capture the residual stream of ``model`` (a :class:`~conceptprobe.models.LoadedModel`, or a reference
    :func:`~conceptprobe.models.load_model` takes, loaded in ``dtype``; ``auto``: bf16 where native, else fp32) for ``prompts``.

    ``answer_tokens`` > 0 also decodes that many tokens greedily after each prompt (stopping at a newline).
    ``max_batch_tokens`` bounds each prefill batch (``auto``: sized from the available memory, see
    :func:`~conceptprobe.batching.batch_budget`); answers are decoded in wide batches of merged KV caches.
    """
    from conceptprobe.batching import batch_budget, plan_batches
    from conceptprobe.config import choose_dtype
    from conceptprobe.generation import capture_prompts
    from conceptprobe.hooks import ResidualCapture, resolve_layers
    from conceptprobe.models import LoadedModel, load_model

    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if not prompts:
        raise ValueError("no prompts given")
    offsets = [int(p) for p in positions]
    if not offsets or any(p > 0 for p in offsets):
        raise ValueError("positions are offsets <= 0 from each prompt's last token (0, -1, ...)")
    loaded = model if isinstance(model, LoadedModel) else load_model(str(model), choose_dtype(dtype))
    chosen = resolve_layers(loaded.info.n_layers, layers)
    lengths = [len(ids) for ids in loaded.tokenizer(list(prompts))["input_ids"]]
    if min(lengths) + min(offsets) < 1:
        raise ValueError(
            f"offset {min(offsets)} reaches before the start of the shortest prompt ({min(lengths)} tokens)"
        )
    with ResidualCapture(loaded.model, layers=chosen, dtype=torch.float32) as cap:
        budget = batch_budget(loaded.model, max_batch_tokens)
        batches = plan_batches(lengths, batch_size, budget.max_batch_tokens, extra=answer_tokens)
        out, answers = capture_prompts(
            loaded.model, loaded.tokenizer, list(prompts), batches, cap, offsets, answer_tokens,
            decode_bytes=budget.decode_bytes,
        )  # fmt: skip
    return Captured(out, chosen, offsets, answers if answer_tokens else None)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: JSON lines (a string, or an object with ``prompt``) or plain text, one prompt per
    line with ``\\n`` standing for a newline inside a prompt."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist; pass a .jsonl or .txt file")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    prompts = []
    for i, line in enumerate(lines, 1):
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}, line {i}: not JSON ({exc.msg}); write one JSON string per line"
                ) from None
            text = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ValueError(f'{path}, line {i}: expected a string or {{"prompt": ...}}')
            prompts.append(text)
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def write_captured(folder: str | Path, got: Captured, prompts: Sequence[str], model: dict[str, Any]) -> Path:
    """``activations.safetensors`` (``[n, layers, positions, d]``, layers and positions in its metadata),
    ``prompts.jsonl`` (each prompt and its greedy answer) and ``capture.json`` (model, settings)."""
    import json

    from conceptprobe.store import atomic_write_bytes, atomic_write_text, package_versions, safetensors_bytes

    folder = Path(folder)
    meta = {"layers": json.dumps(got.layers), "positions": json.dumps(got.positions)}
    atomic_write_bytes(
        folder / "activations.safetensors", safetensors_bytes("activations", got.activations, meta)
    )
    rows = [
        {"index": i, "prompt": p, "answer": None if got.answers is None else got.answers[i]}
        for i, p in enumerate(prompts)
    ]
    atomic_write_text(
        folder / "prompts.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    record = {
        "kind": "capture",
        "model": model,
        "layers": got.layers,
        "positions": got.positions,
        "n_prompts": len(prompts),
        "layer_convention": "0 = embeddings (input to decoder block 0); i = output of block i-1, before the final norm",
        "versions": package_versions(),
    }
    atomic_write_text(folder / "capture.json", json.dumps(record, indent=2, default=str) + "\n")
    return folder
