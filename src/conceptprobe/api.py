"""The experiments as plain functions: a config (or a mapping of its fields) in, a result out.

Each function writes the same folder as its CLI command when given ``out``; without ``out`` it works in a
temporary folder, removed afterwards, and returns the data in memory (metrics, predictions, tables).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _config(cls: type, config: Any) -> Any:
    if isinstance(config, cls):
        return config
    if isinstance(config, dict):
        from pydantic import ValidationError

        from conceptprobe.config import ConfigError, format_validation_error

        try:
            return cls.model_validate(config)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls.__name__)) from None
    raise TypeError(f"expected a {cls.__name__} or a mapping of its fields, got {type(config).__name__}")


def _in_folder(out: str | Path | None, call: Callable[[Path], Any]) -> Any:
    if out is not None:
        return call(Path(out))
    with tempfile.TemporaryDirectory(prefix="conceptprobe-") as tmp:
        result = call(Path(tmp) / "run")
        if hasattr(result, "folder"):
            result.folder = None  # the temporary folder is gone: the data are in the result
        return result


def run(config: Any, out: str | Path | None = None, **kwargs: Any) -> Any:
    """One probe run (:class:`~conceptprobe.config.RunConfig`): ICL accuracy and decodability with controls.

    Returns :class:`~conceptprobe.experiments.probe.RunResult` (``metrics``, ``predictions``, ``table``). Keywords go to
    :func:`conceptprobe.experiments.probe.run` (``tasks_dir``, ``loaded``, ``progress``, ``trust_remote_code``, ...).
    """
    from conceptprobe.config import RunConfig
    from conceptprobe.experiments.probe import run as run_job

    cfg = _config(RunConfig, config)
    return _in_folder(out, lambda folder: run_job(cfg, folder, **kwargs))


def patch(config: Any, out: str | Path | None = None, **kwargs: Any) -> Any:
    """Concept-mean patching (:class:`~conceptprobe.interventions.patching.PatchConfig`)."""
    from conceptprobe.interventions.patching import PatchConfig, run_patching

    cfg = _config(PatchConfig, config)
    return _in_folder(out, lambda folder: run_patching(cfg, folder, **kwargs))


def finetune(config: Any, out: str | Path | None = None, **kwargs: Any) -> Any:
    """LoRA on the first vs the last layers (:class:`~conceptprobe.interventions.finetune.FinetuneConfig`)."""
    from conceptprobe.interventions.finetune import FinetuneConfig, run_finetune

    cfg = _config(FinetuneConfig, config)
    return _in_folder(out, lambda folder: run_finetune(cfg, folder, **kwargs))


def icl_score(config: Any, out: str | Path | None = None, **kwargs: Any) -> Any:
    """The ICL score (:class:`~conceptprobe.experiments.icl.IclScoreConfig`)."""
    from conceptprobe.experiments.icl import IclScoreConfig
    from conceptprobe.experiments.icl import icl_score as measure

    return measure(_config(IclScoreConfig, config), out, **kwargs)


def head_scores(config: Any, out: str | Path | None = None, **kwargs: Any) -> Any:
    """Prefix matching and copying of every head (:class:`~conceptprobe.experiments.heads.HeadsConfig`)."""
    from conceptprobe.experiments.heads import HeadsConfig
    from conceptprobe.experiments.heads import head_scores as measure

    return measure(_config(HeadsConfig, config), out, **kwargs)


def ablate(config: Any, out: str | Path | None = None, **kwargs: Any) -> Any:
    """Head ablation: the top-k induction heads against random control heads
    (:class:`~conceptprobe.experiments.ablation.AblationConfig`); ICL score, concept-task accuracy and
    decodability per condition, with intervals. Keywords go to
    :func:`conceptprobe.experiments.ablation.ablate` (``loaded``, ``tasks_dir``, ``progress``)."""
    from conceptprobe.experiments.ablation import AblationConfig
    from conceptprobe.experiments.ablation import ablate as measure

    return measure(_config(AblationConfig, config), out, **kwargs)


def checkpoint_sweep(
    config: Any, out: str | Path | None = None, *, report: bool = True, **kwargs: Any
) -> Any:
    """A sweep over training checkpoints
    (:class:`~conceptprobe.experiments.checkpoint_config.CheckpointSweepConfig`, a mapping of its fields or
    the path of its YAML): head scores, ICL score and concept tasks at every checkpoint, keyed by step.

    With ``out`` the folder also gets ``report.html``, ``report.md`` and ``figures/`` (``report=False``
    skips them); rerunning into it skips the checkpoints already measured. Keywords go to
    :func:`conceptprobe.experiments.checkpoints.checkpoint_sweep` (``tasks_dir``, ``progress``, ``log``)."""
    from conceptprobe.experiments.checkpoint_config import CheckpointSweepConfig, load_checkpoint_config
    from conceptprobe.experiments.checkpoints import checkpoint_sweep as measure

    if isinstance(config, (str, Path)):
        cfg = load_checkpoint_config(config)
    else:
        cfg = _config(CheckpointSweepConfig, config)

    def call(folder: Path) -> Any:
        result = measure(cfg, folder, **kwargs)
        if report and out is not None:
            from conceptprobe.report import build_report

            build_report([folder], folder / "report.html", umap=False)
        return result

    return _in_folder(out, call)
