"""Figure basics shared by the report and the training figures: style, colours, legends, PNG/SVG output.

Colours: one per model (in the given order) and one per concept (in the task's concept order, ``null``
always grey), the same in every figure. Matplotlib runs on the Agg backend.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg", force=False)

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from conceptprobe.tasks.base import NULL_CONCEPT  # noqa: E402

TAB10 = [plt.get_cmap("tab10")(i) for i in range(10)]
_CONCEPT_BASE = [TAB10[i] for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]
NULL_GREY = "#9a9a9a"
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DPI = 110

STYLE = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "figure.facecolor": "white",
}


def model_colors(models: Sequence[str]) -> dict[str, tuple]:
    """A colour per model label, in the given order (tab10, then tab20)."""
    cmap = TAB10 if len(models) <= 10 else [plt.get_cmap("tab20")(i % 20) for i in range(len(models))]
    return {m: cmap[i % len(cmap)] for i, m in enumerate(models)}


def concept_colors(concepts: Sequence[str]) -> dict[str, object]:
    """A colour per concept in task order; ``null`` grey."""
    real = [c for c in concepts if c != NULL_CONCEPT]
    base = _CONCEPT_BASE if len(real) <= len(_CONCEPT_BASE) else [plt.get_cmap("tab20")(i) for i in range(20)]
    out: dict[str, object] = {c: base[i % len(base)] for i, c in enumerate(real)}
    out[NULL_CONCEPT] = NULL_GREY
    return out


LAYER_AXIS = "layer (residual stream; 0 = embeddings, i = output of block i-1)"
SURFACE = "0.1"  # near-black, dash-dot: no model colour (tab10) can be mistaken for it
NULL_BAND = "0.55"


def to_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (and closed)."""
    png, _ = render(fig, dpi)
    return png


def render(fig: Figure, dpi: int = DPI) -> tuple[bytes, bytes]:
    """The figure as PNG and SVG bytes (and closed); the SVG carries no date, so equal figures are equal."""
    out = []
    for fmt, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.08, metadata=meta)
        out.append(buf.getvalue())
    plt.close(fig)
    return out[0], out[1]


def legend_top(
    fig: Figure, handles: list, labels: list[str], ncol: int | None = None, y: float = 1.0
) -> None:
    fig.legend(
        handles,
        labels,
        loc="lower center",
        bbox_to_anchor=(0.5, y),
        ncol=ncol or min(len(labels), 8),
        handlelength=1.6,
        columnspacing=1.4,
        fontsize=9,
    )
