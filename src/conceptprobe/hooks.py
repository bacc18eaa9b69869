"""The residual-stream hooks: capture (:class:`ResidualCapture`), patching (:class:`ResidualPatch`) and the
one primitive both use (:func:`on_layer`), also used by training and head ablation.

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
