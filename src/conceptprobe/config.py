"""Typed run configuration: YAML in, CLI flags override, validated before any weight is loaded."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from conceptprobe.prompts import PromptFormat


class ConfigError(ValueError):
    """A configuration problem, with the file, the key and what is allowed."""


class RunConfig(BaseModel):
    """Everything that determines one run's results (a fingerprint of it names the run's identity)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="packaged alias, .gguf file, local folder or hub id")
    task: str
    task_params: dict[str, Any] = Field(default_factory=dict)
    shots: int = Field(4, ge=0, le=256)
    n: int = Field(100, ge=2, description="prompts per concept")
    seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    layers: Literal["all"] | list[int] = "all"
    positions: list[int] = Field(
        default_factory=lambda: [0], description="offsets from the token before the answer"
    )
    batch_size: int = Field(16, ge=1)
    max_batch_tokens: int | None = Field(
        1024,
        ge=1,
        description="cap on rows x (longest prompt + new tokens) per batch; keeps peak memory flat as prompts "
        "grow (None: batch_size alone)",
    )
    max_new_tokens: int | None = Field(None, ge=1, description="default: longest answer in tokens + 2")
    knn_k: int = Field(10, ge=1)
    knn_metric: Literal["euclidean", "cosine"] = "euclidean"
    standardize: bool = True
    probe_folds: int = Field(
        5, ge=2, description="cross-validation folds of the probe (fewer when a concept has fewer prompts)"
    )
    n_permutations: int = Field(
        100, ge=1, le=100_000, description="label permutations of the k-NN null, per layer"
    )
    probe_permutations: int = Field(
        10, ge=0, le=10_000, description="label permutations of the probe null (refitted each time)"
    )
    probe_null_layers: int = Field(
        3, ge=1, description="evenly spaced layers (plus the probe's peaks) that get a probe null"
    )
    n_bootstrap: int = Field(1000, ge=10, le=1_000_000, description="bootstrap resamples of the intervals")
    prompt_format: PromptFormat = Field(default_factory=PromptFormat)
    save_activations: bool = True

    @model_validator(mode="before")
    @classmethod
    def _no_flag_only_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trust_remote_code" in data:
            raise ValueError(
                "trust_remote_code is not a run setting: pass --trust-remote-code on the command line, or "
                "trust_remote_code=True to conceptprobe's run()"
            )
        return data

    @field_validator("positions")
    @classmethod
    def _positions(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError(
                "positions must list at least one offset (0 = the token right before the answer)"
            )
        if any(p > 0 for p in value):
            raise ValueError("positions are offsets <= 0 from the token right before the answer (0, -1, ...)")
        if len(set(value)) != len(value):
            raise ValueError("positions has duplicates")
        return value

    def fingerprint(self) -> str:
        """A hash of the fields that change what is captured (:data:`CAPTURE_FIELDS`): the run's identity.

        Fields left at None are omitted, so an optional setting added later does not change the fingerprints
        of earlier runs. Measure settings (:data:`MEASURE_FIELDS`) are not part of it: changing them makes
        a rerun recompute the measures from the stored activations, without the model.
        """
        dump = self.model_dump(mode="json")
        data = {k: dump[k] for k in CAPTURE_FIELDS if dump[k] is not None}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def measure_settings(self) -> dict[str, Any]:
        """The settings of the measures computed from the captured activations."""
        dump = self.model_dump(mode="json")
        return {k: dump[k] for k in MEASURE_FIELDS}


#: RunConfig fields that change the prompts, the captured activations or the predictions.
CAPTURE_FIELDS = (
    "model",
    "task",
    "task_params",
    "shots",
    "n",
    "seed",
    "dtype",
    "layers",
    "positions",
    "max_new_tokens",
    "prompt_format",
)
#: RunConfig fields that change only the measures computed from the activations.
MEASURE_FIELDS = (
    "knn_k",
    "knn_metric",
    "standardize",
    "probe_folds",
    "n_permutations",
    "probe_permutations",
    "probe_null_layers",
    "n_bootstrap",
)


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: key {key!r}: {msg}" if key else f"{source}: {msg}")
    return "; ".join(lines)


def _unknown_key_hints(exc: ValidationError) -> str:
    """For each unknown key: a near allowed name, if any, and the allowed keys of its mapping."""
    hints = []
    for err in exc.errors():
        if err["type"] != "extra_forbidden":
            continue
        loc = err["loc"]
        fields = (
            PromptFormat.model_fields
            if loc[0] == "prompt_format" and len(loc) == 2
            else RunConfig.model_fields
        )
        close = difflib.get_close_matches(str(loc[-1]), list(fields), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        hints.append(f"{hint}allowed keys: {', '.join(fields)}")
    return "; " + "; ".join(dict.fromkeys(hints)) if hints else ""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file and line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); pass a YAML config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}"
        )
    return data


#: Settings that only the command line (or an API argument) may give: a file must never switch them on.
FLAG_ONLY = {"trust_remote_code": "--trust-remote-code"}


def _flag_only_keys(data: Any, where: str = "") -> list[str]:
    """Paths of flag-only keys anywhere in a nested mapping (``models.0.trust_remote_code``)."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{where}.{key}" if where else str(key)
            if key in FLAG_ONLY:
                found.append(path)
            found += _flag_only_keys(value, path)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += _flag_only_keys(value, f"{where}.{i}" if where else str(i))
    return found


def refuse_flag_only_keys(data: dict[str, Any], source: str) -> None:
    """Refuse a config file that sets a flag-only key (running a model's own code is the user's choice)."""
    found = _flag_only_keys(data)
    if found:
        key = found[0].rsplit(".", 1)[-1]
        raise ConfigError(
            f"{source}: key {found[0]!r}: a config file cannot switch on {key} (it would run a model's own "
            f"Python code); remove the key and pass {FLAG_ONLY[key]} on the command line if you trust that code"
        )


def load_run_config_file(path: str | Path) -> dict[str, Any]:
    """A run config mapping from a YAML file, or from a run folder's ``run.json`` (its ``config``).

    A YAML file that sets a flag-only key (``trust_remote_code``) is refused; in a ``run.json`` being
    rerun the key is dropped, with a warning when it was on: only the command-line flag turns it on.
    """
    import warnings

    data = load_yaml(path)
    if isinstance(data.get("config"), dict) and "fingerprint" in data:
        config = dict(data["config"])  # a run.json: rerun exactly what it ran
        for key, flag in FLAG_ONLY.items():
            if config.pop(key, False) is True or data.get(key) is True:
                warnings.warn(
                    f"{path}: the run it records had {key} on; it is ignored here: pass {flag} if you "
                    "trust that model's code",
                    stacklevel=2,
                )
        return config
    refuse_flag_only_keys(data, str(path))
    return data


def make_run_config(base: dict[str, Any], overrides: dict[str, Any], source: str = "run config") -> RunConfig:
    """Merge CLI overrides (None = not given) onto a base mapping and validate."""
    merged = dict(base)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source) + _unknown_key_hints(exc)) from None
