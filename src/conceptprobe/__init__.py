"""conceptprobe: how pretrained language models encode and decode concepts in context.

The public API, imported lazily (``import conceptprobe`` loads neither torch nor transformers)::

    import conceptprobe as cp
    result = cp.run({"model": "smollm2-135m", "task": "bitwise", "shots": 4, "n": 40}, out="runs/b4")
    run = cp.load_run("runs/b4")
    X, labels = run.activations(layer=21)          # in run.json's order: the run's own folds
    frame = cp.load_runs(["runs"])                  # every result folder's metrics, stacked
    got = cp.capture(cp.load_model("smollm2-135m"), ["Input: 1 1\\nOutput:"], layers=[21])

Experiments: :func:`run`, :func:`sweep`, :func:`icl_score`, :func:`head_scores`, :func:`patch`,
:func:`finetune`, :func:`ablate`, :func:`checkpoint_sweep`, :func:`capture`. Results: :func:`load_run`, :func:`load_runs`. Models and tasks:
:func:`load_model`, :func:`get_task`, :func:`register_task`, :func:`build_prompts`. Measures:
:func:`knn_decodability`, :func:`probe_accuracy`, :func:`decodability_suite`, :func:`surface_features`,
:func:`bootstrap_interval`, :func:`knn_permutation_null`, :func:`heldout_peak`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API: dict[str, tuple[str, str]] = {
    # experiments (config -> function -> result)
    "run": ("conceptprobe.api", "run"),
    "sweep": ("conceptprobe.sweep.entry", "sweep"),
    "patch": ("conceptprobe.api", "patch"),
    "finetune": ("conceptprobe.api", "finetune"),
    "icl_score": ("conceptprobe.api", "icl_score"),
    "head_scores": ("conceptprobe.api", "head_scores"),
    "ablate": ("conceptprobe.api", "ablate"),
    "checkpoint_sweep": ("conceptprobe.api", "checkpoint_sweep"),
    "capture": ("conceptprobe.experiments.capture", "capture"),
    # their configs
    "RunConfig": ("conceptprobe.config", "RunConfig"),
    "SweepConfig": ("conceptprobe.sweep.config", "SweepConfig"),
    "IclScoreConfig": ("conceptprobe.experiments.icl", "IclScoreConfig"),
    "HeadsConfig": ("conceptprobe.experiments.heads", "HeadsConfig"),
    "AblationConfig": ("conceptprobe.experiments.ablation", "AblationConfig"),
    "CheckpointSweepConfig": ("conceptprobe.experiments.checkpoint_config", "CheckpointSweepConfig"),
    "PatchConfig": ("conceptprobe.interventions.patching", "PatchConfig"),
    "FinetuneConfig": ("conceptprobe.interventions.finetune", "FinetuneConfig"),
    # results
    "load_run": ("conceptprobe.results", "load_run"),
    "load_runs": ("conceptprobe.results", "load_runs"),
    # models, tasks, prompts
    "load_model": ("conceptprobe.models", "load_model"),
    "get_task": ("conceptprobe.tasks", "get_task"),
    "register_task": ("conceptprobe.tasks", "register_task"),
    "ConceptTask": ("conceptprobe.tasks", "ConceptTask"),
    "Example": ("conceptprobe.tasks", "Example"),
    "build_prompts": ("conceptprobe.prompts", "build_prompts"),
    # measures and their controls
    "knn_decodability": ("conceptprobe.measures.decodability", "knn_decodability"),
    "probe_accuracy": ("conceptprobe.measures.decodability", "probe_accuracy"),
    "decodability_suite": ("conceptprobe.measures.suite", "decodability_suite"),
    "surface_features": ("conceptprobe.measures.surface", "surface_features"),
    "bootstrap_interval": ("conceptprobe.measures.controls", "bootstrap_interval"),
    "knn_permutation_null": ("conceptprobe.measures.controls", "knn_permutation_null"),
    "heldout_peak": ("conceptprobe.measures.controls", "heldout_peak"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'conceptprobe' has no attribute {name!r}") from None
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
