"""The sweep as a function: ``conceptprobe.sweep(config, out=None, ...)`` (see :func:`sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def sweep(config: Any, out: str | Path | None = None, **kwargs: Any) -> Any:
    """A sweep: a YAML path, a :class:`~conceptprobe.sweep.SweepConfig` or a mapping of its fields.

    ``out`` overrides the config's output folder. Keywords go to :func:`conceptprobe.sweep.run_sweep`
    (``tasks_dir``, ``overwrite``, ``progress``); ``trust_remote_code`` to the plan.
    """
    from pydantic import ValidationError

    from conceptprobe.config import ConfigError, format_validation_error
    from conceptprobe.sweep.config import SweepConfig, load_sweep_config
    from conceptprobe.sweep.local import run_sweep
    from conceptprobe.sweep.plan import expand

    overrides = {"out": str(out)} if out is not None else {}
    if isinstance(config, (str, Path)):
        cfg, source = load_sweep_config(config, overrides), str(config)
    else:
        if isinstance(config, SweepConfig):
            cfg = config
        else:
            try:
                cfg = SweepConfig.model_validate(dict(config))
            except ValidationError as exc:
                raise ConfigError(format_validation_error(exc, "SweepConfig")) from None
        cfg = cfg.model_copy(update=overrides) if overrides else cfg
        source = "python"
    trust = bool(kwargs.pop("trust_remote_code", False))
    plan = expand(cfg, source, tasks_dir=kwargs.get("tasks_dir"), trust_remote_code=trust)
    return run_sweep(plan, **kwargs)
