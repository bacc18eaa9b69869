"""Typed run configuration: YAML in, CLI flags override, validated before any weight is loaded."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from conceptprobe.prompts import PromptFormat


class ConfigError(ValueError):
    """A configuration problem, with the file, the key and what is allowed."""


#: Most prompts per concept a run may ask for (a typo such as ``--n 1000000000000`` fails at once).
MAX_N = 100_000
#: Seeds are 0 <= seed < 2**32 (numpy's and scikit-learn's seeds must fit in 32 bits).
SEED_LIMIT = 2**32
#: Most bytes a YAML config may have (configs are a few KB; a larger file is not a config).
MAX_YAML_BYTES = 4 << 20
#: Most characters of a path echoed in an error (the rest is cut, with its length named).
ECHO_LIMIT = 80
_NAME_MAX = 255  # bytes per file or folder name (Linux, macOS)
_PATH_MAX = 4096  # bytes per path (Linux)


def short(text: object, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to its first ``limit`` characters and an ellipsis, for error lines."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}…"


def path_too_long(value: str | Path) -> str | None:
    """Why ``value`` cannot be a path on this system (a name over 255 bytes, a path over 4096), or None."""
    text = str(value)
    longest = max((len(part.encode()) for part in Path(text).parts), default=0)
    if longest > _NAME_MAX or len(text.encode()) > _PATH_MAX:
        return (
            f"path too long: {short(text)!r} has {len(text)} characters (file and folder names may have at "
            f"most {_NAME_MAX} bytes, a path {_PATH_MAX})"
        )
    return None


def os_error_line(exc: OSError) -> str:
    """An OSError as one short line: a name or path over the system's limits says "path too long", and a
    long path in the message is cut (a 5 KB path is not echoed)."""
    import errno

    name = str(exc.filename or "")
    if exc.errno == errno.ENAMETOOLONG:
        return f"path too long: {short(name)!r} has {len(name)} characters; choose a shorter path (or --out)"
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = f"{exc.strerror or exc.__class__.__name__}: {short(name)!r}" if name else short(text, 300)
    return text


def check_seed(value: int, flag: str = "--seed") -> int:
    """A seed in 0 <= seed < 2**32, or a ValueError naming ``flag`` and the range."""
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(
            f"seed {short(value, 30)} is out of range: seeds are 0 <= seed < 2**32 ({SEED_LIMIT - 1}); "
            f"pass {flag} 0 or another seed in that range"
        )
    return value


def native_bf16() -> bool:
    """Whether this machine computes bfloat16 matmuls natively: a CUDA GPU with bf16, or (without CUDA) a CPU
    with AVX512-BF16 or AMX (oneDNN's check). False when unsure."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_dtype(name: str) -> str:
    """``auto`` -> ``bfloat16`` where the hardware computes it natively, else ``float32``; other names pass.

    Why: on a CPU without bf16 units (AVX2 only) a bf16 matmul falls back to a slow path, measured 1.2 vs
    65 GFLOP/s for float32 on one core (a 512x576 @ 576x1536 product); with them bf16 is 3-4x faster than
    float32. Configs store the chosen dtype, so a run's fingerprint and ``run.json`` name what was computed.
    """
    return ("bfloat16" if native_bf16() else "float32") if name == "auto" else name


Dtype = Annotated[Literal["auto", "float32", "bfloat16", "float16"], AfterValidator(choose_dtype)]
"""A dtype setting: ``auto`` (see :func:`choose_dtype`) or an explicit one; validated configs hold the choice."""


class RunConfig(BaseModel):
    """Everything that determines one run's results (a fingerprint of it names the run's identity)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="packaged alias, .gguf file, local folder or hub id")
    revision: str | None = Field(None, description="hub branch, tag or commit (a training checkpoint)")
    task: str
    task_params: dict[str, Any] = Field(default_factory=dict)
    shots: int = Field(4, ge=0, le=256)
    n: int = Field(100, ge=2, le=MAX_N, description="prompts per concept")
    seed: int = Field(0, description="0 <= seed < 2**32")
    dtype: Dtype = Field(
        "auto",
        validate_default=True,
        description="auto (the default of every command): bfloat16 where the hardware computes it natively "
        "(3-4x faster than float32 there), else float32 (bf16 is ~50x slower on AVX2-only CPUs); float32 "
        "for exactness checks",
    )
    layers: Literal["all"] | list[int] = "all"
    positions: list[int] = Field(
        default_factory=lambda: [0], description="offsets from the token before the answer"
    )
    batch_size: int = Field(16, ge=1)
    max_batch_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto",
        description="cap on rows x (longest prompt + new tokens) per prefill batch; keeps peak memory flat as "
        "prompts grow. auto: sized from the available memory (conceptprobe.batching.batch_budget; the "
        "value used is in run.json); None: batch_size alone",
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
    tasks_dir: str | None = Field(None, description="folder of task plugins [./tasks]")

    @model_validator(mode="before")
    @classmethod
    def _no_flag_only_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trust_remote_code" in data:
            raise ValueError(
                "trust_remote_code is not a run setting: pass --trust-remote-code on the command line, or "
                "trust_remote_code=True to conceptprobe's run()"
            )
        return data

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int) -> int:
        return check_seed(value)

    @field_validator("model")
    @classmethod
    def _model_path(cls, value: str) -> str:
        problem = path_too_long(value)
        if problem:
            raise ValueError(f"--model: {problem}; pass a packaged alias, a shorter path or a hub id")
        return value

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
    "revision",
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


def format_validation_error(exc: ValidationError, source: str) -> str:
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


class YAMLRefused(yaml.MarkedYAMLError):
    """YAML that conceptprobe does not accept (anchors and aliases, duplicate keys), with its line."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases (no alias expansion, however nested) and
    duplicate keys (the second silently replacing the first)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias" if isinstance(event, yaml.AliasEvent) else "anchor"
            raise YAMLRefused(
                problem=f"YAML {kind} {'*' if kind == 'alias' else '&'}{short(event.anchor, 40)} is not "
                "accepted (no anchors or aliases in conceptprobe configs); write the values out",
                problem_mark=event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                try:
                    key = self.construct_object(key_node, deep=True)
                    seen = key in first
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
                line = key_node.start_mark.line + 1
                if seen:
                    raise YAMLRefused(
                        problem=f"duplicate key {short(key, 40)!r} (first at line {first[key]}); keep one of them",
                        problem_mark=key_node.start_mark,
                    )
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """Parse YAML text with :class:`StrictLoader` (raises ``yaml.YAMLError``, :class:`YAMLRefused` included)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file and line.

    Files over :data:`MAX_YAML_BYTES`, anchors and aliases, and duplicate keys are refused.
    """
    path = Path(path)
    problem = path_too_long(path)
    if problem:
        raise ConfigError(f"config file: {problem}; pass a shorter path")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(
            f"{path}: {size} bytes, more than the {MAX_YAML_BYTES >> 20} MiB a config file may have; "
            "pass the YAML config itself (a few KB)"
        )
    try:
        data = parse_yaml(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); pass a YAML config") from None
    except YAMLRefused as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        raise ConfigError(f"{path}: {where}: {exc.problem}") from None
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
        for key in OBSOLETE_KEYS:  # settings earlier versions recorded that no longer exist
            config.pop(key, None)
        task = data.get("task") if isinstance(data.get("task"), dict) else {}
        params = dict(config.get("task_params") or {})
        if task.get("name") == "pos" and str(task.get("version")) == "1" and "version" not in params:
            config["task_params"] = {**params, "version": 1}  # pos became version 2: rerun version 1
        return config
    refuse_flag_only_keys(data, str(path))
    return data


#: Run settings earlier versions recorded in run.json and that a rerun ignores.
OBSOLETE_KEYS = ("save_activations",)


def make_run_config(base: dict[str, Any], overrides: dict[str, Any], source: str = "run config") -> RunConfig:
    """Merge CLI overrides (None = not given) onto a base mapping and validate."""
    merged = dict(base)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source) + _unknown_key_hints(exc)) from None
