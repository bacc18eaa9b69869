"""The residual-stream hooks: capture (:class:`ResidualCapture`), patching (:class:`ResidualPatch`) and the
one primitive both use (:func:`on_layer`), also used by training; and head ablation (:class:`HeadAblation`,
:func:`head_output_means`), which hooks the input of each block's attention output projection.

Layer numbering (the same everywhere in conceptprobe): layer 0 is the input of the first decoder
layer (the token embeddings, after any embedding scaling, e.g. Gemma's sqrt(d)); layer i >= 1 is the
output of decoder layer i-1, i.e. the residual stream *before* the model's final norm. This matches
``output_hidden_states`` entries 0..L-1 exactly; Hugging Face's last entry L is taken after the final
norm, so ``hidden_states[L] == final_norm(layer L)``.

Only the requested rows are kept: each hook gathers ``hidden[b, positions[b]]`` into a preallocated
buffer and copies it to CPU, so memory does not grow with sequence length. Hooks work when layers
sit on different devices (rows are moved to the buffer's device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from conceptprobe.models.layers import decoder_layers


class StopForward(Exception):
    """Raised by the last needed hook when the caller needs no output past that layer."""


def resolve_layers(n_layers: int, layers: Sequence[int] | str | None) -> list[int]:
    """Layer indices 0..n_layers (``None``/"all" = every one); negative indices count from the end."""
    total = n_layers + 1
    if layers is None or layers == "all":
        return list(range(total))
    if isinstance(layers, str):
        raise ValueError(f"layers must be 'all' or a list of integers, got {layers!r}")
    out = []
    for layer in layers:
        idx = layer + total if layer < 0 else layer
        if not 0 <= idx < total:
            raise ValueError(
                f"layer {layer} is out of range: this model has layers 0..{n_layers} "
                f"(0 = embeddings, {n_layers} = last decoder layer)"
            )
        out.append(idx)
    if len(set(out)) != len(out):
        raise ValueError(f"layers list has duplicates: {list(layers)}")
    return sorted(out)


def on_layer(
    blocks: nn.ModuleList, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(hidden)`` on residual-stream ``layer`` (0 = the input of block 0, i = the output of block
    i-1) in every forward pass; a tensor ``fn`` returns replaces the stream there. Returns the handle."""
    if layer == 0:

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            new = fn(hidden)
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return blocks[0].register_forward_pre_hook(pre, with_kwargs=True)

    def post(module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return blocks[layer - 1].register_forward_hook(post)


class ResidualCapture:
    """Forward hooks that copy the residual stream at given positions into a CPU buffer.

    Use as a context manager around forward passes; call :meth:`set_positions` before each batch
    with a ``[batch, n_positions]`` index tensor. After the forward pass, :attr:`buffer` holds
    ``[batch, n_selected_layers, n_positions, hidden]``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] | str | None = None,
        dtype: torch.dtype = torch.float32,
        stop_after_last: bool = False,
    ) -> None:
        self.model = model
        self.blocks = decoder_layers(model)
        self.layers = resolve_layers(len(self.blocks), layers)
        self.dtype = dtype
        self.stop_after_last = stop_after_last
        self.hidden_size = int(model.config.hidden_size)
        self.enabled = True
        self._positions: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._seen: set[int] = set()

    @property
    def buffer(self) -> torch.Tensor:
        if self._buffer is None:
            raise RuntimeError("no batch captured yet: call set_positions() and run a forward pass")
        return self._buffer

    def set_positions(self, positions: torch.Tensor) -> None:
        """Positions to keep for the next forward pass, ``[batch, n_positions]`` (long)."""
        if positions.dim() != 2:
            raise ValueError(f"positions must be [batch, n_positions], got shape {tuple(positions.shape)}")
        batch, n_pos = positions.shape
        shape = (batch, len(self.layers), n_pos, self.hidden_size)
        if self._buffer is None or self._buffer.shape[0] < batch or self._buffer.shape[2] != n_pos:
            self._buffer = torch.empty(shape, dtype=self.dtype)
        self._buffer_view = self._buffer[:batch]
        self._positions = positions.long()
        self._rows = torch.arange(batch).unsqueeze(1).expand(batch, n_pos)
        self._seen = set()

    def _store(self, slot: int, hidden: torch.Tensor) -> None:
        if not self.enabled or self._positions is None:
            return
        pos = self._positions.to(hidden.device)
        rows = self._rows.to(hidden.device)  # type: ignore[union-attr]
        picked = hidden[rows, pos]  # [batch, n_pos, d]
        self._buffer_view[:, slot].copy_(picked.detach().to("cpu", self.dtype))
        self._seen.add(slot)
        if self.stop_after_last and slot == len(self.layers) - 1:
            raise StopForward

    def _keeper(self, slot: int) -> Callable[[torch.Tensor], None]:
        return lambda hidden: self._store(slot, hidden)

    def __enter__(self) -> ResidualCapture:
        self._handles = [
            on_layer(self.blocks, layer, self._keeper(slot)) for slot, layer in enumerate(self.layers)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def complete(self) -> bool:
        """Whether every selected layer was captured in the last forward pass."""
        return len(self._seen) == len(self.layers)

    def take(self) -> torch.Tensor:
        """A copy of the captured rows of the last batch ``[batch, layers, positions, d]``."""
        if not self.complete():
            missing = sorted(set(range(len(self.layers))) - self._seen)
            raise RuntimeError(
                f"layers {[self.layers[i] for i in missing]} were not captured in the last pass"
            )
        return self._buffer_view.clone()


class ResidualPatch:
    """A hook that adds to or replaces the residual stream at ``layer`` (capture's numbering), one row per prompt.

    Use as a context manager; before each forward pass to patch call :meth:`arm` with the position and the
    vector of every row. The hook patches the first forward pass after ``arm`` only (the prefill) and then
    disarms itself; :attr:`fired` tells whether it ran.
    """

    def __init__(self, model: nn.Module, layer: int, mode: Literal["add", "replace"] = "replace") -> None:
        if mode not in ("add", "replace"):
            raise ValueError(f"mode must be 'add' or 'replace', got {mode!r}")
        self.blocks = decoder_layers(model)
        self.layer = resolve_layers(len(self.blocks), [layer])[0]
        self.mode = mode
        self.fired = False
        self._positions: torch.Tensor | None = None
        self._vectors: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def arm(self, positions: torch.Tensor, vectors: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Patch row ``b`` at ``positions[b]`` with ``vectors[b]`` (``[batch]``, ``[batch, d]``) in the next pass;
        ``rows`` (bool ``[batch]``) limits the patch to some rows, leaving the others untouched."""
        if positions.dim() != 1 or vectors.dim() != 2 or vectors.shape[0] != positions.shape[0]:
            raise ValueError(
                f"positions must be [batch] and vectors [batch, d]; got {tuple(positions.shape)} and "
                f"{tuple(vectors.shape)}"
            )
        if rows is not None and rows.shape != positions.shape:
            raise ValueError(f"rows must be a bool mask of shape {tuple(positions.shape)}")
        self._positions = positions.long()
        self._vectors = vectors
        self._rows = None if rows is None else rows.bool()
        self.fired = False

    def disarm(self) -> None:
        self._positions = self._vectors = self._rows = None

    def _apply(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self._positions is None or self._vectors is None:
            return None
        if hidden.shape[0] != self._positions.shape[0]:
            raise RuntimeError(
                f"patch armed for a batch of {self._positions.shape[0]} rows, got {hidden.shape[0]}"
            )
        every = self._rows is None
        rows = torch.arange(hidden.shape[0]) if every else self._rows.nonzero().flatten()  # type: ignore[union-attr]
        pos = self._positions[rows].to(hidden.device)
        vec = self._vectors[rows].to(hidden.device, hidden.dtype)
        rows = rows.to(hidden.device)
        out = hidden.clone()
        out[rows, pos] = out[rows, pos] + vec if self.mode == "add" else vec
        self.disarm()
        self.fired = True
        return out

    def __enter__(self) -> ResidualPatch:
        self._handle = on_layer(self.blocks, self.layer, self._apply)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.disarm()


# ------------------------------------------------------------------ attention heads


def _o_proj(block: nn.Module) -> nn.Linear:
    attn = getattr(block, "self_attn", None)
    proj = getattr(attn, "o_proj", None)
    if not isinstance(proj, nn.Linear):
        raise ValueError(
            f"decoder block {type(block).__name__} has no self_attn.o_proj; head ablation supports the "
            "llama, mistral, qwen2, gemma2 and gemma3 layouts"
        )
    return proj


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(n_blocks, n_heads, head_dim)`` of the query heads, checked against the output projection's width."""
    blocks = decoder_layers(model)
    n_heads = int(model.config.num_attention_heads)
    width = _o_proj(blocks[0]).in_features
    if width % n_heads:
        raise ValueError(f"o_proj input width {width} is not a multiple of the {n_heads} attention heads")
    return len(blocks), n_heads, width // n_heads


def check_heads(model: nn.Module, heads: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``heads`` as ``(block, head)`` int pairs, each checked against the model (one-line ValueError)."""
    n_blocks, n_heads, _ = head_layout(model)
    out = []
    for item in heads:
        block, head = (int(v) for v in item)
        if not (0 <= block < n_blocks and 0 <= head < n_heads):
            raise ValueError(
                f"head L{block}H{head} is out of range: this model has blocks 0..{n_blocks - 1} and heads "
                f"0..{n_heads - 1}; take heads from this model's heads.json (conceptprobe heads --model ...)"
            )
        out.append((block, head))
    if len(set(out)) != len(out):
        raise ValueError(f"heads list has duplicates: {out}")
    return out


class HeadAblation:
    """Zero- or mean-ablate attention heads: a forward pre-hook on each chosen block's ``self_attn.o_proj``
    overwrites the head's slice ``[head * d_head, (head + 1) * d_head)`` of the concatenated head outputs
    before the output projection, in every forward pass (prefill and each decoding step).

    Heads are ``(block, head)`` query heads (under grouped-query attention each query head has its own
    slice). ``mode="mean"`` needs ``means``: a ``[n_blocks, n_heads, d_head]`` tensor (see
    :func:`head_output_means`). Use as a context manager; the hooks are removed on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: Sequence[tuple[int, int]],
        mode: Literal["zero", "mean"] = "zero",
        means: torch.Tensor | None = None,
    ) -> None:
        if mode not in ("zero", "mean"):
            raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
        self.blocks = decoder_layers(model)
        self.heads = check_heads(model, heads)
        self.n_blocks, self.n_heads, self.head_dim = head_layout(model)
        if mode == "mean":
            want = (self.n_blocks, self.n_heads, self.head_dim)
            if means is None or tuple(means.shape) != want:
                got = None if means is None else tuple(means.shape)
                raise ValueError(
                    f"mode 'mean' needs means of shape {want} (head_output_means(model, ...)), got {got}"
                )
        self.mode = mode
        self.means = means
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, block: int, heads: list[int]) -> Callable[..., Any]:
        d = self.head_dim

        def pre(module: nn.Module, args: tuple) -> Any:
            x = args[0].clone()
            for h in heads:
                if self.mode == "zero":
                    x[..., h * d : (h + 1) * d] = 0
                else:
                    assert self.means is not None
                    x[..., h * d : (h + 1) * d] = self.means[block, h].to(x.device, x.dtype)
            return (x, *args[1:])

        return pre

    def __enter__(self) -> HeadAblation:
        by_block: dict[int, list[int]] = {}
        for block, head in self.heads:
            by_block.setdefault(block, []).append(head)
        self._handles = [
            _o_proj(self.blocks[b]).register_forward_pre_hook(self._hook(b, hs)) for b, hs in by_block.items()
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@torch.inference_mode()
def head_output_means(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The mean of every head's output before the output projection, ``[n_blocks, n_heads, d_head]``
    (float32, CPU), over every non-padding token of ``input_ids`` ``[n, T]``: the reference of mean ablation."""
    n_blocks, n_heads, d = head_layout(model)
    blocks = decoder_layers(model)
    sums = torch.zeros(n_blocks, n_heads * d, dtype=torch.float64)
    count = [0]
    mask_now: list[torch.Tensor] = []

    def keeper(block: int) -> Callable[..., None]:
        def pre(module: nn.Module, args: tuple) -> None:
            x = args[0].float()
            m = mask_now[0].to(x.device, x.dtype).unsqueeze(-1)
            sums[block] += (x * m).sum(dim=(0, 1)).double().cpu()

        return pre

    handles = [_o_proj(blocks[b]).register_forward_pre_hook(keeper(b)) for b in range(n_blocks)]
    device = next(model.parameters()).device
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = (
                torch.ones_like(ids)
                if attention_mask is None
                else attention_mask[start : start + batch_size].to(device)
            )
            mask_now[:] = [mask]
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
            count[0] += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count[0], 1)).float().view(n_blocks, n_heads, d)
