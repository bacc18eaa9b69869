"""Typed sweep configuration: models x tasks x shots x seeds, plus run defaults applied to every unit.

A sweep YAML holds the sweep axes (``models``, ``tasks``, ``shots``, ``seeds``) and, at the top level,
any :class:`~conceptprobe.config.RunConfig` field (``n``, ``dtype``, ``layers``, ``positions``,
``batch_size``, ...) as a default for every unit. A model entry may override ``dtype``.

    name: offline-smoke
    models: [smollm2-135m, {ref: gemma3-270m, dtype: float32}]
    tasks: [pos, {name: bitwise, params: {width: 4}, label: bitwise4}]
    shots: [1, 4]
    seeds: [0]
    n: 40
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from conceptprobe.config import (
    ConfigError,
    Dtype,
    RunConfig,
    check_seed,
    format_validation_error,
    load_yaml,
    path_too_long,
    refuse_flag_only_keys,
)
from conceptprobe.names import SAFE_NAME

#: RunConfig fields that a sweep sets per unit (the others are defaults for every unit).
UNIT_KEYS = ("model", "task", "task_params", "shots", "seed")
#: RunConfig fields a sweep config accepts at its top level.
RUN_DEFAULT_KEYS = tuple(k for k in RunConfig.model_fields if k not in UNIT_KEYS)
#: Run keys a user may write by habit, and what a sweep takes instead.
_RENAMED = {
    "model": "models: [<alias or hub id>, ...]",
    "task": "tasks: [pos, bitwise, ...]",
    "task_params": "tasks: [{name: <task>, params: {...}}]",
    "seed": "seeds: [0, ...]",
}

# A base class holding every RunConfig field but the per-unit ones, with the same types and defaults.
_RunDefaults: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "_RunDefaults",
    __config__=ConfigDict(extra="forbid"),
    **{k: (RunConfig.model_fields[k].annotation, RunConfig.model_fields[k]) for k in RUN_DEFAULT_KEYS},
)


def default_label(ref: str, quantize: str | None = None, revision: str | None = None) -> str:
    """A folder-safe label: the alias, the GGUF file's stem, or the last part of a hub id or path, with the
    revision (a checkpoint) and the quantization appended."""
    base = Path(ref.rstrip("/")).stem if ref.endswith(".gguf") else Path(ref.rstrip("/")).name
    base = re.sub(r"[^A-Za-z0-9._+-]+", "-", base).strip("-.") or "model"
    if revision:
        base += "+" + (re.sub(r"[^A-Za-z0-9._+-]+", "-", revision).strip("-.") or "rev")
    return f"{base}-{quantize}" if quantize else base


class ModelEntry(BaseModel):
    """One model of a sweep; a plain string in YAML is its ``ref``."""

    model_config = ConfigDict(extra="forbid")

    ref: str = Field(min_length=1, description="packaged alias, .gguf file, local folder or hub id")
    label: str | None = Field(None, description="folder and report name [alias / hub name / file stem]")
    dtype: Dtype | None = Field(None, description="overrides the sweep dtype (auto: bf16 where native)")
    revision: str | None = Field(None, description="hub branch, tag or commit (e.g. a training checkpoint)")
    step: int | None = Field(
        None, ge=0, description="training step of this checkpoint [read from a revision like step1000]"
    )
    quantize: Literal["4bit", "8bit"] | None = Field(
        None, description="bitsandbytes quantization (CUDA only)"
    )
    device_map: str | dict[str, Any] | None = Field(None, description="Hugging Face device_map, e.g. auto")
    max_memory: dict[str, Any] | None = Field(None, description="Hugging Face max_memory per device")

    @field_validator("label")
    @classmethod
    def _safe_label(cls, value: str | None) -> str | None:
        if value is not None and not SAFE_NAME.match(value):
            raise ValueError(
                f"label {value!r} is used as a folder name: use letters, digits and . _ + - only"
            )
        return value

    @field_validator("ref")
    @classmethod
    def _ref_length(cls, value: str) -> str:
        problem = path_too_long(value)
        if problem:
            raise ValueError(f"{problem}; pass a packaged alias, a shorter path or a hub id")
        return value

    @model_validator(mode="after")
    def _fill_label(self) -> ModelEntry:
        if self.label is None:
            self.label = default_label(self.ref, self.quantize, self.revision)
        return self

    @property
    def training_step(self) -> int | None:
        """The checkpoint's training step: ``step``, else the number in a revision such as ``step1000``."""
        if self.step is not None:
            return self.step
        found = re.fullmatch(r"(?:step|global_step|ckpt|checkpoint)[-_]?(\d+)", self.revision or "")
        return int(found.group(1)) if found else None


class TaskEntry(BaseModel):
    """One task family of a sweep; a plain string in YAML is its ``name``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = Field(None, description="folder name prefix [the task name]")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not SAFE_NAME.match(value):
            shown = value if len(value) <= 80 else value[:80] + "…"
            raise ValueError(
                f"task name {shown!r} is not a task name: tasks are named with letters, digits and . _ + -"
            )
        return value

    @field_validator("label")
    @classmethod
    def _safe_label(cls, value: str | None) -> str | None:
        if value is not None and not SAFE_NAME.match(value):
            raise ValueError(f"label {value!r} is used in folder names: use letters, digits and . _ + - only")
        return value

    @model_validator(mode="after")
    def _fill_label(self) -> TaskEntry:
        if self.label is None:
            self.label = self.name
        return self


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


def _entries(value: Any, key: str) -> Any:
    if isinstance(value, (str, dict)):
        value = [value]
    if isinstance(value, list):
        return [{key: v} if isinstance(v, str) else v for v in value]
    return value


class SweepConfig(_RunDefaults):  # type: ignore[misc, valid-type]
    """A sweep: every model x task x shots x seed is one unit (one run folder)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the sweep's name; default output folder results/<name>")
    description: str | None = None
    out: str | None = Field(None, description="output folder [results/<name>]")
    models: list[ModelEntry] = Field(min_length=1)
    tasks: list[TaskEntry] = Field(min_length=1)
    shots: list[int] = Field(default_factory=lambda: [4], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    extra_seeds: dict[int, list[int]] = Field(
        default_factory=dict,
        description="more seeds for some shots values only, e.g. {4: [1, 2]} (a seed spread where it matters)",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not SAFE_NAME.match(value):
            raise ValueError(f"name {value!r} names the output folder: use letters, digits and . _ + - only")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        return _entries(value, "ref")

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, value: Any) -> Any:
        return _entries(value, "name")

    @field_validator("shots", "seeds", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("shots")
    @classmethod
    def _shots(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if not 0 <= s <= 256]
        if bad:
            raise ValueError(f"shots must be between 0 and 256, got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"shots lists a value twice: {value}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        for seed in value:
            check_seed(seed, "--seeds")
        if len(set(value)) != len(value):
            raise ValueError(f"seeds lists a value twice: {value}")
        return value

    @field_validator("out")
    @classmethod
    def _out_length(cls, value: str | None) -> str | None:
        problem = path_too_long(value) if value is not None else None
        if problem:
            raise ValueError(f"{problem}; choose a shorter --out")
        return value

    @model_validator(mode="after")
    def _extra_seeds(self) -> SweepConfig:
        for shots, seeds in self.extra_seeds.items():
            for seed in seeds:
                check_seed(seed, "extra_seeds")
            if shots not in self.shots:
                raise ValueError(f"extra_seeds has shots {shots}, which is not in shots {self.shots}")
            repeated = sorted(set(seeds) & set(self.seeds)) or sorted(
                {s for s in seeds if seeds.count(s) > 1}
            )
            if repeated:
                raise ValueError(f"extra_seeds for {shots} shots repeats seed(s) {repeated}")
        return self

    def seeds_for(self, shots: int) -> list[int]:
        """The seeds of the units with ``shots`` demonstrations."""
        return [*self.seeds, *self.extra_seeds.get(shots, [])]

    @model_validator(mode="after")
    def _unique(self) -> SweepConfig:
        seen: dict[str, ModelEntry] = {}
        for i, m in enumerate(self.models):
            assert m.label is not None
            if m.label in seen:
                same = seen[m.label].model_dump() == m.model_dump()
                why = "is listed twice" if same else f"has the same label as another entry ({m.label!r})"
                fix = "remove one" if same else "give one of them a distinct `label:`"
                raise ValueError(f"models[{i}] ({m.ref}) {why}; {fix}")
            seen[m.label] = m
        labels: set[str] = set()
        for i, t in enumerate(self.tasks):
            assert t.label is not None
            if t.label in labels:
                raise ValueError(
                    f"tasks[{i}] ({t.name}) is listed twice (label {t.label!r}); remove it, or give "
                    "entries with different params distinct `label:`s"
                )
            labels.add(t.label)
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("results") / self.name

    def run_defaults(self) -> dict[str, Any]:
        """The RunConfig fields set at the sweep's top level (every unit gets them)."""
        return {k: getattr(self, k) for k in RUN_DEFAULT_KEYS}


def _format(exc: ValidationError, source: str) -> str:
    """Pydantic errors as one line; unknown keys get the allowed keys and a near name."""
    text = format_validation_error(exc, source)
    hints = []
    for err in exc.errors():
        if err["type"] != "extra_forbidden":
            continue
        loc = err["loc"]
        bad = str(loc[-1])
        if bad in _RENAMED and len(loc) == 1:
            hints.append(f"a sweep takes {_RENAMED[bad]} instead of {bad!r}")
            continue
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(bad, allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        hints.append(f"{hint}allowed keys for {bad!r}'s mapping: {', '.join(allowed)}")
    return text + ("; " + "; ".join(hints) if hints else "")


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    if loc and loc[0] == "models":
        return list(ModelEntry.model_fields)
    if loc and loc[0] == "tasks":
        return list(TaskEntry.model_fields)
    if loc and loc[0] == "prompt_format":
        return list(RunConfig.model_fields["prompt_format"].annotation.model_fields)  # type: ignore[union-attr]
    return list(SweepConfig.model_fields)


def _matches(item: Any, name: str, key: str) -> bool:
    if isinstance(item, str):
        return item == name or (key == "ref" and default_label(item) == name)
    if isinstance(item, dict):
        if name in (item.get("label"), item.get(key)):
            return True
        ref = item.get(key)
        return key == "ref" and isinstance(ref, str) and default_label(ref, item.get("quantize")) == name
    return False


def _select(items: Any, names: list[str], key: str) -> list[Any]:
    """Entries of ``items`` named (by label or ref/name) in ``names``; a new entry for a name not found."""
    items = items if isinstance(items, list) else [items] if items is not None else []
    chosen = []
    for name in names:
        found = [it for it in items if _matches(it, name, key)]
        chosen.append(found[0] if found else name)
    return chosen


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge CLI flags (None = not given) into a raw sweep mapping.

    ``models``/``tasks`` select entries by label or ref/name (keeping their settings) and add the others;
    ``dtype`` applies to every model, replacing per-model dtypes.
    """
    merged = dict(raw)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "models":
            merged["models"] = _select(raw.get("models"), value, "ref")
        elif key == "tasks":
            merged["tasks"] = _select(raw.get("tasks"), value, "name")
        else:
            merged[key] = value
    if overrides.get("dtype") is not None and isinstance(merged.get("models"), list):
        merged["models"] = [
            {k: v for k, v in m.items() if k != "dtype"} if isinstance(m, dict) else m
            for m in merged["models"]
        ]
    return merged


def validate_sweep(data: dict[str, Any], source: str) -> SweepConfig:
    """Validate a raw sweep mapping; errors name ``source``, the key and what is allowed."""
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None


def load_sweep_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and validate a sweep YAML, then apply CLI overrides (None values = not given)."""
    raw = load_yaml(path)
    refuse_flag_only_keys(raw, str(path))
    config = validate_sweep(raw, str(path))
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if not given:
        return config
    flags = ", ".join("--" + k.replace("_", "-") for k in given)
    return validate_sweep(apply_overrides(raw, given), f"{path} with {flags}")
