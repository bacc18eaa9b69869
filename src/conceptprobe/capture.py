"""Capture the residual stream at chosen token positions, every layer, with forward hooks.

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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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

    def _pre_hook(self, slot: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._store(slot, hidden)

        return hook

    def _post_hook(self, slot: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self._store(slot, hidden)  # type: ignore[arg-type]

        return hook

    def __enter__(self) -> ResidualCapture:
        for slot, layer in enumerate(self.layers):
            if layer == 0:
                handle = self.blocks[0].register_forward_pre_hook(self._pre_hook(slot), with_kwargs=True)
            else:
                handle = self.blocks[layer - 1].register_forward_hook(self._post_hook(slot))
            self._handles.append(handle)
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


@contextmanager
def capturing(model: nn.Module, **kwargs: object) -> Iterator[ResidualCapture]:
    """``with capturing(model, layers=[...]) as cap: ...`` — shorthand for :class:`ResidualCapture`."""
    with ResidualCapture(model, **kwargs) as cap:  # type: ignore[arg-type]
        yield cap
