"""The config of a checkpoint sweep, and the checkpoints it names.

A checkpoint sweep measures one model at several training steps. Its YAML gives the checkpoints one of two
ways:

- ``train_folder``: a ``conceptprobe train`` run folder; ``steps: all`` (default) or a list of saved steps;
- ``models``: model entries (the sweep's :class:`~conceptprobe.sweep.config.ModelEntry`): ``ref`` (hub id)
  with ``revision`` (a hub branch such as Pythia's ``step1000``: the step is read from it, or given as
  ``step``), or ``ref`` (a local folder, e.g. a training checkpoint folder) with ``step``.

The other keys are the measures' settings (head scores, ICL score, concept tasks; see
:class:`CheckpointSweepConfig`). Training checkpoints are measured with their run's own settings (the
trainer's tracker), so the head and ICL-score settings here apply to pretrained models only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from conceptprobe.config import (
    ConfigError,
    Dtype,
    check_seed,
    format_validation_error,
    load_yaml,
    path_too_long,
)
from conceptprobe.names import SAFE_NAME
from conceptprobe.sweep.config import ModelEntry, TaskEntry

#: Settings that change no measured value (left out of each checkpoint's fingerprint).
NOT_MEASURED = ("name", "description", "out", "threads", "train_folder", "steps", "models", "x_scale")


class CheckpointSweepConfig(BaseModel):
    """A sweep over training checkpoints (the YAML of ``conceptprobe checkpoints``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the sweep's name; default output folder results/<name>")
    description: str | None = None
    out: str | None = Field(None, description="output folder [results/<name>]")
    train_folder: str | None = Field(None, description="a `conceptprobe train` run folder")
    steps: Literal["all"] | list[int] = Field(
        "all", description="train_folder's steps to measure [all saved]"
    )
    models: list[ModelEntry] | None = Field(
        None, description="checkpoints as model entries: ref + revision (hub) or ref + step (local folder)"
    )
    dtype: Dtype = Field(
        "auto",
        validate_default=True,
        description="of pretrained models (auto: bf16 where native, else fp32); training checkpoints: float32",
    )
    seed: int = Field(0, description="seed of contexts, sequences, prompts and bootstraps")
    threads: int | None = Field(None, ge=1, description="torch CPU threads [torch's default]")
    # head scores (pretrained models)
    n_seqs: int = Field(20, ge=1, le=10_000, description="repeated random-token sequences (prefix matching)")
    seq_len: int = Field(25, ge=2, le=4096, description="distinct random tokens per repeat")
    repeats: int = Field(4, ge=2, le=64, description="times each sequence is repeated")
    threshold: float = Field(0.4, ge=0, le=1, description="prefix matching of an induction head")
    copying_threshold: float = Field(0.5, ge=-1, le=1, description="OV copying of an induction head")
    top_heads: int = Field(5, ge=1, description="heads averaged in the top-heads summaries")
    # ICL score (pretrained models)
    n_contexts: int = Field(32, ge=2, le=100_000, description="corpus contexts of the ICL score")
    n_tokens: int = Field(512, ge=2, le=1_000_000, description="text tokens per context")
    late: int = Field(500, ge=2, description="the later token (1-based)")
    early: int = Field(50, ge=1, description="the earlier token (1-based)")
    corpus: Literal["stdlib-docs", "stdlib-source", "licenses"] = "stdlib-docs"
    icl_batch_size: int = Field(4, ge=1)
    n_bootstrap: int = Field(1000, ge=10, le=1_000_000, description="bootstrap resamples of every interval")
    # concept tasks (pretrained models)
    tasks: list[TaskEntry] = Field(default_factory=list, description="concept tasks (probe runs)")
    shots: int = Field(4, ge=0, le=256)
    n: int = Field(20, ge=2, le=100_000, description="prompts per concept")
    batch_size: int = Field(16, ge=1)
    knn_k: int = Field(10, ge=1)
    n_permutations: int = Field(20, ge=1, le=100_000, description="label permutations of the k-NN null")
    # report
    x_scale: Literal["linear", "log"] = Field("linear", description="step axis of the figure (log: symlog)")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not SAFE_NAME.match(value):
            raise ValueError(f"name {value!r} names the output folder: use letters, digits and . _ + - only")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        return check_seed(value)

    @field_validator("out", "train_folder")
    @classmethod
    def _path_length(cls, value: str | None) -> str | None:
        problem = path_too_long(value) if value is not None else None
        if problem:
            raise ValueError(f"{problem}; choose a shorter path")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        return [{"ref": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        return [{"name": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _check(self) -> CheckpointSweepConfig:
        if (self.train_folder is None) == (self.models is None):
            raise ValueError(
                "give either train_folder (a `conceptprobe train` run folder) or models (checkpoints with "
                "ref + revision or ref + step), not both or neither"
            )
        if isinstance(self.steps, list):
            if self.train_folder is None:
                raise ValueError("steps selects a train_folder's checkpoints; give each model entry its step")
            if not self.steps or len(set(self.steps)) != len(self.steps) or min(self.steps) < 0:
                raise ValueError(f"steps must be distinct steps >= 0, got {self.steps}")
        if self.models is not None:
            if not self.models:
                raise ValueError("models is empty; list the checkpoints (ref + revision or ref + step)")
            labels: set[str] = set()
            for i, m in enumerate(self.models):
                if m.training_step is None:
                    raise ValueError(
                        f"models[{i}] ({m.ref}) has no training step: give step: N, or a revision like step1000"
                    )
                assert m.label is not None
                if m.label in labels:
                    raise ValueError(
                        f"models[{i}] ({m.ref}) repeats label {m.label!r}; give it its own label"
                    )
                labels.add(m.label)
        if self.tasks and self.train_folder is not None:
            raise ValueError(
                "tasks need a pretrained LM that reads text; a train_folder's models read integer tokens: "
                "remove tasks"
            )
        names = [t.label for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks lists a task twice ({names}); give repeated tasks distinct labels")
        if not 1 <= self.early < self.late <= self.n_tokens:
            raise ValueError(
                f"need 1 <= early ({self.early}) < late ({self.late}) <= n_tokens ({self.n_tokens})"
            )
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("results") / self.name

    def measured(self) -> dict[str, Any]:
        """The settings that determine the measured values."""
        return self.model_dump(mode="json", exclude=set(NOT_MEASURED))


def validate_checkpoint_config(data: Any, source: str) -> CheckpointSweepConfig:
    """Validate a raw mapping; errors are one line naming ``source`` and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level")
    try:
        return CheckpointSweepConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_checkpoint_config(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> CheckpointSweepConfig:
    """Read and validate a checkpoint-sweep YAML; ``overrides`` (None values = not given) replace its keys."""
    raw = load_yaml(path)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return validate_checkpoint_config({**raw, **given}, str(path))


@dataclass
class Checkpoint:
    """One checkpoint of a sweep: its label (folder name), step, how to load it and its identity."""

    label: str
    step: int
    ref: str
    revision: str | None
    training: bool  # a `conceptprobe train` checkpoint (measured with its run's own settings)
    entry: ModelEntry | None = None
    identity: str = ""  # the run's fingerprint (training) or ref@revision

    def fingerprint(self, config: CheckpointSweepConfig) -> str:
        """Hash of what determines this checkpoint's measures (its identity and the measure settings)."""
        data = {
            "checkpoint": [self.label, self.step, self.ref, self.revision, self.identity],
            "settings": {} if self.training else config.measured(),
            "entry": None if self.entry is None else self.entry.model_dump(mode="json"),
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_checkpoints(config: CheckpointSweepConfig) -> list[Checkpoint]:
    """The checkpoints of ``config``, in step order; a missing folder or unsaved step is a one-line error."""
    from conceptprobe.models.errors import ModelLoadError
    from conceptprobe.models.training_checkpoint import (
        checkpoint_name,
        is_training_folder,
        is_training_run,
        resolve_checkpoint,
        saved_steps,
    )

    out: list[Checkpoint] = []
    if config.train_folder is not None:
        folder = Path(config.train_folder).expanduser()
        if not folder.is_dir():
            raise ConfigError(
                f"train_folder {folder} does not exist; train it first (conceptprobe train --preset <name> "
                f"--out {folder}) or fix the path"
            )
        if not is_training_run(folder):
            raise ConfigError(
                f"train_folder {folder} is not a `conceptprobe train` run folder (no train.json and "
                "checkpoints/); pass the --out folder of conceptprobe train"
            )
        saved = saved_steps(folder)
        steps = saved if config.steps == "all" else sorted(config.steps)
        missing = [s for s in steps if s not in saved]
        if missing:
            shown = (
                ", ".join(map(str, saved))
                if len(saved) <= 20
                else f"{len(saved)} from {saved[0]} to {saved[-1]}"
            )
            raise ConfigError(
                f"train_folder {folder} saved no checkpoint at step {', '.join(map(str, missing))}; "
                f"saved steps: {shown or 'none'}"
            )
        for step in steps:
            try:
                ckpt = resolve_checkpoint(folder, str(step))
            except ModelLoadError as exc:
                raise ConfigError(f"train_folder {folder}: {exc}") from None
            out.append(
                Checkpoint(checkpoint_name(step), step, str(ckpt.folder), None, True, None, ckpt.fingerprint)
            )
        return out
    assert config.models is not None
    for i, m in enumerate(config.models):
        path = Path(m.ref).expanduser()
        step = m.training_step
        assert step is not None and m.label is not None
        if is_training_folder(path):
            try:
                ckpt = resolve_checkpoint(path, m.revision)
            except ModelLoadError as exc:
                raise ConfigError(f"models[{i}] ({m.ref}): {exc}") from None
            if ckpt.step != step:
                raise ConfigError(
                    f"models[{i}] ({m.ref}) is the checkpoint of step {ckpt.step}, not step {step}; fix its step"
                )
            out.append(Checkpoint(m.label, step, m.ref, m.revision, True, m, ckpt.fingerprint))
            continue
        looks_local = m.ref.startswith(("/", "./", "../", "~")) or m.ref.count("/") > 1
        if looks_local and not path.exists():
            raise ConfigError(f"models[{i}] ({m.ref}): folder {path} does not exist; check the path")
        out.append(Checkpoint(m.label, step, m.ref, m.revision, False, m, f"{m.ref}@{m.revision}"))
    return sorted(out, key=lambda c: (c.step, c.label))
