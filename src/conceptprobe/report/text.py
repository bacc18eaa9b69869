"""How the report writes numbers (shared by every section)."""

from __future__ import annotations

import math


def fmt_params(n: float) -> str:
    """A parameter count as ``135M`` / ``1.78B``; ``?`` when unknown."""
    if not n or math.isnan(n):
        return "?"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.2f}{unit}" if v < 10 else f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(int(n))
