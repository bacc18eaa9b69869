"""Sweeps: expand a config into units (model x task x shots x seed) and run them, resumably.

``load_sweep_config`` -> :class:`SweepConfig`; ``expand`` -> :class:`SweepPlan` of :class:`Unit` s (no
model loaded); ``run_sweep`` runs the plan in this process (each model loaded once).
"""

import sys
import types
from typing import Any

from conceptprobe.sweep.config import ModelEntry, SweepConfig, TaskEntry, apply_overrides, load_sweep_config
from conceptprobe.sweep.plan import SweepPlan, Unit, UnitState, expand, plan_states, unit_state


class _SweepModule(types.ModuleType):
    """``conceptprobe.sweep`` is both this package and the API function :func:`conceptprobe.sweep.entry.sweep`:
    once the package is imported, ``conceptprobe.sweep(...)`` still runs a sweep."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from conceptprobe.sweep.entry import sweep

        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _SweepModule


def __getattr__(name: str):  # the executor imports torch/transformers: only when asked for
    if name in ("run_sweep", "SweepResult", "preflight", "model_problem"):
        from conceptprobe.sweep import local

        return getattr(local, name)
    raise AttributeError(name)


__all__ = [
    "ModelEntry",
    "SweepConfig",
    "SweepPlan",
    "SweepResult",
    "TaskEntry",
    "Unit",
    "UnitState",
    "apply_overrides",
    "expand",
    "load_sweep_config",
    "model_problem",
    "plan_states",
    "preflight",
    "run_sweep",
    "unit_state",
]
