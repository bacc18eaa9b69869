"""Checks that run before any weight is loaded: task and prompts, model reference, layers, context.

Each check raises :class:`~conceptprobe.config.ConfigError` with one line naming the input, the problem
and the fix. Model references are checked from what is on disk or in small config files only: a GGUF
file's header (magic, version, metadata, tensor table, and the size it implies), a safetensors file's
header and size, a folder's ``config.json``, a packaged alias's packages and shipped config.
"""

from __future__ import annotations

import difflib
import json
import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conceptprobe.config import ConfigError, RunConfig, os_error_line
from conceptprobe.names import SAFE_NAME

if TYPE_CHECKING:
    from conceptprobe.prompts import Prompt
    from conceptprobe.tasks.base import ConceptTask

#: Shipped model configs (the paper's hub ids and the packaged aliases), read without importing transformers.
CONFIG_DIR = Path(__file__).parent / "models" / "configs"
#: Names that become file or folder names (concepts, labels): no separators, no leading dot.

_GGUF_MAGIC = b"GGUF"
# GGUF metadata value types -> struct format (8 = string, 9 = array)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# GGUF architecture names that differ from transformers' model_type
_GGUF_MODEL_TYPE = {"gemma3": "gemma3_text"}


@dataclass
class ModelRef:
    """What is known about a model reference before loading it."""

    ref: str
    source: str  # packaged | gguf | local | hub
    path: Path | None = None
    model_type: str | None = None
    architecture: str | None = None
    n_layers: int | None = None
    max_positions: int | None = None
    config_from: str = ""
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- file headers


@dataclass
class GGUFHeader:
    """The metadata of a GGUF file (scalars and strings only) and the file size its tensor table implies."""

    version: int
    metadata: dict[str, Any]
    n_tensors: int
    expected_size: int


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise EOFError
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise EOFError
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def skip_string(self) -> None:
        n = self.take("Q")
        self.pos += n
        if self.pos > len(self.buf):
            raise EOFError

    def value(self, kind: int, keep: bool) -> Any:
        if kind in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.take("I"), self.take("Q")
            if item in _GGUF_SCALARS:  # fixed-size items: skip in one step
                self.pos += count * struct.calcsize("<" + _GGUF_SCALARS[item])
                if self.pos > len(self.buf):
                    raise EOFError
            else:
                for _ in range(count):
                    if item == 8:
                        self.skip_string()
                    else:
                        self.value(item, keep=False)
            return None
        raise ValueError(f"unknown metadata value type {kind}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse a GGUF file's header and tensor table without reading any tensor data.

    Raises ``ValueError`` (wrong magic, unsupported version, unknown types) or ``EOFError`` (the file
    ends inside its header).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as fh:
        size = path.stat().st_size
        if size < 24:
            head = fh.read(4)
            if head != _GGUF_MAGIC:
                raise ValueError(f"starts with {head!r}, not {_GGUF_MAGIC!r}")
            raise EOFError
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != _GGUF_MAGIC:
                raise ValueError(f"starts with {bytes(buf[:4])!r}, not {_GGUF_MAGIC!r}")
            r = _Reader(buf)
            r.pos = 4
            version = r.take("I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
            n_tensors, n_kv = r.take("Q"), r.take("Q")
            if n_tensors > 1_000_000 or n_kv > 1_000_000:
                raise ValueError(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                kind = r.take("I")
                value = r.value(kind, keep=True)
                if value is not None:
                    meta[key] = value
            end = 0
            for _ in range(n_tensors):
                r.skip_string()
                n_dims = r.take("I")
                if n_dims > 8:
                    raise ValueError(f"a tensor with {n_dims} dimensions")
                dims = [r.take("Q") for _ in range(n_dims)]
                kind, offset = r.take("I"), r.take("Q")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                except (ValueError, KeyError):
                    raise ValueError(f"unknown tensor type {kind}") from None
                end = max(end, offset + math.prod(dims) // block * type_size)
            align = int(meta.get("general.alignment", 32)) or 32
            start = -(-r.pos // align) * align
    return GGUFHeader(version=version, metadata=meta, n_tensors=n_tensors, expected_size=start + end)


def check_gguf_file(path: Path, what: str, fix: str, fix_missing: str = "check the path") -> GGUFHeader:
    """The header of a GGUF file, or a one-line error: missing, not GGUF, truncated."""
    if not path.exists():
        raise ConfigError(f"{what}: GGUF file {path} does not exist; {fix_missing}")
    if not path.is_file():
        raise ConfigError(f"{what}: {path} is not a file; pass a .gguf file")
    size = path.stat().st_size
    try:
        header = read_gguf_header(path)
    except EOFError:
        raise ConfigError(
            f"{what}: GGUF file {path} is truncated ({size} bytes, it ends inside its header); {fix}"
        ) from None
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{what}: {path} is not a valid GGUF file ({exc}); {fix}") from None
    if size < header.expected_size:
        raise ConfigError(
            f"{what}: GGUF file {path} is truncated ({size} bytes, its tensor table needs "
            f"{header.expected_size}); {fix}"
        )
    return header


def check_safetensors_file(path: Path, what: str, fix: str) -> None:
    """A safetensors file's header parses and the file is as long as its header says."""
    size = path.stat().st_size
    problem = None
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                problem = f"only {size} bytes"
            else:
                (n,) = struct.unpack("<Q", raw)
                if n > min(size - 8, 100_000_000):
                    problem = f"its header claims {n} bytes, the file has {size}"
                else:
                    header = json.loads(fh.read(n))
                    ends = [
                        int(v["data_offsets"][1])
                        for k, v in header.items()
                        if k != "__metadata__" and isinstance(v, dict)
                    ]
                    need = 8 + n + max(ends, default=0)
                    if size != need:
                        problem = f"{size} bytes, its header describes {need}"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        problem = f"unreadable header: {exc.__class__.__name__}"
    if problem:
        raise ConfigError(f"{what}: weights file {path} is corrupt or truncated ({problem}); {fix}")


# ---------------------------------------------------------------- model references


def _supported_model_types() -> dict[str, str]:
    from conceptprobe.models.layers import MODEL_TYPES

    return MODEL_TYPES


def _supported_list() -> str:
    from conceptprobe.models.layers import SUPPORTED

    return ", ".join(SUPPORTED)


def _architecture(ref: str, data: dict[str, Any], where: str) -> str:
    """The supported architecture named by a config mapping, or a one-line refusal."""
    from conceptprobe.models.layers import ARCHITECTURES

    archs = [a for a in data.get("architectures") or () if isinstance(a, str)]
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    model_type = data.get("model_type")
    types = _supported_model_types()
    if model_type in types:
        return types[model_type]
    name = archs[0] if archs else f"model_type {model_type!r}"
    raise ConfigError(
        f"model {ref}: architecture {name} ({where}) is not supported; supported: {_supported_list()}. "
        "Use a model of a supported family, or add it to conceptprobe.models.layers.ARCHITECTURES"
    )


def _dims(data: dict[str, Any]) -> tuple[int | None, int | None]:
    """(n_layers, max_position_embeddings) from a config mapping (text_config for multimodal ones)."""
    if isinstance(data.get("text_config"), dict):
        data = {**data["text_config"], **{k: v for k, v in data.items() if k != "text_config"}}
    layers = data.get("num_hidden_layers", data.get("n_layer"))
    ctx = data.get("max_position_embeddings", data.get("n_positions"))
    return (int(layers) if isinstance(layers, int) else None, int(ctx) if isinstance(ctx, int) else None)


def _from_gguf_header(info: ModelRef, header: GGUFHeader) -> None:
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ConfigError(
            f"model {info.ref}: GGUF file {info.path} names no general.architecture; it is not a model file"
        )
    model_type = _GGUF_MODEL_TYPE.get(arch, arch)
    types = _supported_model_types()
    if model_type not in types:
        raise ConfigError(
            f"model {info.ref}: GGUF architecture {arch!r} is not supported; supported: {_supported_list()}. "
            "Use a GGUF file of a supported family"
        )
    info.model_type, info.architecture = model_type, types[model_type]
    blocks, ctx = header.metadata.get(f"{arch}.block_count"), header.metadata.get(f"{arch}.context_length")
    info.n_layers = int(blocks) if isinstance(blocks, int) else None
    info.max_positions = int(ctx) if isinstance(ctx, int) else None
    info.config_from = f"GGUF metadata of {info.path}"


def _check_training_folder(ref: str, folder: Path, revision: str | None) -> ModelRef:
    """A ``conceptprobe train`` run or checkpoint folder: its train.json, state.json and weights header."""
    from conceptprobe.models.errors import ModelLoadError
    from conceptprobe.models.training_checkpoint import WEIGHTS, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(folder, revision)
    except ModelLoadError as exc:
        raise ConfigError(f"model {ref}: {exc}") from None
    arch = ckpt.model.get("arch", "gpt2")
    info = ModelRef(
        ref=ref,
        source="training",
        path=ckpt.folder,
        model_type=arch,
        architecture="LlamaForCausalLM" if arch == "llama" else "GPT2LMHeadModel",
        n_layers=int(ckpt.model.get("n_layer", 4)),
        max_positions=ckpt.n_positions,
        config_from=str(ckpt.run_folder / "train.json"),
        notes=[f"training checkpoint at step {ckpt.step}"],
    )
    check_safetensors_file(ckpt.folder / WEIGHTS, f"model {ref}", "retrain the run (conceptprobe train)")
    return info


def _check_folder(ref: str, folder: Path, trust_remote_code: bool, revision: str | None = None) -> ModelRef:
    from conceptprobe.models.training_checkpoint import is_training_folder

    if is_training_folder(folder):
        return _check_training_folder(ref, folder, revision)
    info = ModelRef(ref=ref, source="local", path=folder, config_from=f"{folder}/config.json")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f"it holds {ggufs[0].name}: pass that file instead" if ggufs else "pass a model folder"
        raise ConfigError(f"model {ref}: folder {folder} has no config.json, so it is not a model; {hint}")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"model {ref}: {cfg_path} is not valid JSON ({exc}); repair or re-download it"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"model {ref}: {cfg_path} must hold a JSON object; repair or re-download it")
    if (
        data.get("auto_map")
        and not trust_remote_code
        and data.get("model_type") not in _supported_model_types()
    ):
        raise ConfigError(
            f"model {ref}: its config.json asks to run the model's own Python code (auto_map), which "
            "conceptprobe never does unless you pass --trust-remote-code (only for code you trust)"
        )
    _check_tokenizer_code(ref, folder, trust_remote_code)
    info.architecture = _architecture(ref, data, str(cfg_path))
    info.model_type = data.get("model_type")
    info.n_layers, info.max_positions = _dims(data)
    weights = sorted(folder.glob("*.safetensors"))
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if not weights:
        what = f"only PyTorch pickle files ({', '.join(pickled[:3])})" if pickled else "no weights"
        raise ConfigError(
            f"model {ref}: folder {folder} holds {what}; conceptprobe loads safetensors or GGUF weights "
            "only (it never unpickles files): save the model with save_pretrained(safe_serialization=True)"
        )
    for path in weights:
        check_safetensors_file(path, f"model {ref}", "re-download or re-save the model")
    return info


def _check_tokenizer_code(ref: str, folder: Path, trust_remote_code: bool) -> None:
    """Refuse a tokenizer that would run its own Python code (``auto_map`` naming a class transformers
    does not have), unless ``--trust-remote-code`` was passed."""
    path = folder / "tokenizer_config.json"
    if trust_remote_code or not path.is_file():
        return
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return  # the tokenizer's own loading reports it
    auto = data.get("auto_map") if isinstance(data, dict) else None
    if not auto or (isinstance(auto, dict) and "AutoTokenizer" not in auto):
        return
    name = data.get("tokenizer_class")
    if isinstance(name, str) and name:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        try:
            if tokenizer_class_from_name(name) is not None:
                return  # transformers has the class itself: the auto_map is not used
        except Exception:  # noqa: BLE001 - an odd name: treat it as unknown
            pass
    raise ConfigError(
        f"model {ref}: its tokenizer_config.json asks to run the tokenizer's own Python code (auto_map), which "
        "conceptprobe never does unless you pass --trust-remote-code (only for code you trust)"
    )


def _shipped_configs() -> dict[str, Path]:
    return {p.stem.replace("--", "/"): p for p in sorted(CONFIG_DIR.glob("*.json"))}


def _near_alias(ref: str) -> list[str]:
    from conceptprobe.models.packaged import PACKAGED

    names = list(dict.fromkeys([*PACKAGED, *_shipped_configs()]))
    return difflib.get_close_matches(ref, names, n=2, cutoff=0.6)


def check_model_ref(ref: str, trust_remote_code: bool = False, revision: str | None = None) -> ModelRef:
    """Resolve ``ref`` (packaged alias, .gguf file, folder, hub id) and check it, loading no weight."""
    from conceptprobe.models.packaged import PACKAGED

    if ref in PACKAGED:
        return _check_packaged(ref)
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        info = ModelRef(ref=ref, source="gguf", path=path)
        known = ", ".join(PACKAGED)
        header = check_gguf_file(
            path,
            f"model {ref}",
            "the file is incomplete or not a model: download it again",
            f"check the path, or use a packaged alias ({known})",
        )
        _from_gguf_header(info, header)
        return info
    if path.is_dir():
        return _check_folder(ref, path, trust_remote_code, revision)
    if path.exists():
        raise ConfigError(
            f"model {ref}: {path} is a file but not a .gguf file; pass a .gguf file, a model folder, a "
            "packaged alias or a hub id"
        )
    looks_local = ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1
    if looks_local:
        raise ConfigError(f"model {ref}: folder {path} does not exist; check the path")
    close = _near_alias(ref)
    if close and "/" not in ref:
        raise ConfigError(
            f"model {ref!r} is not a packaged alias, file or folder; did you mean {' or '.join(map(repr, close))}? "
            f"(`conceptprobe models` lists the aliases)"
        )
    return _check_hub(ref, trust_remote_code, revision)


def _check_packaged(ref: str) -> ModelRef:
    from conceptprobe.models.packaged import PACKAGED, PackagedModelMissing, cache_dir, chunk_paths, gguf_path

    spec = PACKAGED[ref]
    info = ModelRef(ref=ref, source="packaged", architecture=spec.architecture, n_layers=spec.n_layers)
    fix = f"reinstall it with: {spec.install_command} --force-reinstall"
    try:
        if spec.single_file:
            info.path = gguf_path(spec)
            check_gguf_file(info.path, f"model {ref}", fix)
        else:
            parts = chunk_paths(spec)
            joined = cache_dir() / "gguf" / spec.gguf_name
            if joined.is_file() and joined.stat().st_size == sum(p.stat().st_size for p in parts):
                info.path = joined
                check_gguf_file(
                    joined, f"model {ref}", f"delete {joined} so that the chunks are joined again"
                )
            else:  # the first chunk starts the file; the join checks the whole file's sha256
                info.path = parts[0]
                with parts[0].open("rb") as fh:
                    head = fh.read(4)
                if head != _GGUF_MAGIC:
                    raise ConfigError(
                        f"model {ref}: chunk {parts[0]} does not start a GGUF file (starts with {head!r}); {fix}"
                    )
    except PackagedModelMissing as exc:
        raise ConfigError(str(exc)) from None
    shipped = CONFIG_DIR / f"{ref}.json"
    if shipped.is_file():
        data = json.loads(shipped.read_text())
        info.n_layers, info.max_positions = _dims(data)
        info.model_type = data.get("model_type")
        info.config_from = f"shipped config {shipped.name}"
    return info


def _check_hub(ref: str, trust_remote_code: bool, revision: str | None) -> ModelRef:
    from conceptprobe.models.packaged import PACKAGED

    info = ModelRef(ref=ref, source="hub")
    shipped = {k.lower(): p for k, p in _shipped_configs().items()}
    if ref.lower() in shipped:
        data = json.loads(shipped[ref.lower()].read_text())
        info.config_from = f"shipped config of {ref}"
    else:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
        except Exception as exc:  # offline, gated, misspelt, remote code refused
            text = str(exc)
            if "trust_remote_code" in text and not trust_remote_code:
                raise ConfigError(
                    f"model {ref}: its config needs the model's own Python code, which conceptprobe never "
                    "runs unless you pass --trust-remote-code (only for code you trust)"
                ) from None
            raise ConfigError(
                f"could not load {ref!r}: not a packaged alias ({', '.join(PACKAGED)}), a .gguf file or a local "
                f"folder, and the hub did not serve its config ({exc.__class__.__name__}). Check the name, or "
                "that this machine can reach the hub and you have access to the model"
            ) from None
        data = config.to_dict()
        info.config_from = f"hub config of {ref}"
    info.architecture = _architecture(ref, data, info.config_from)
    info.model_type = data.get("model_type")
    info.n_layers, info.max_positions = _dims(data)
    return info


# ---------------------------------------------------------------- run checks


def check_layers(config: RunConfig, n_layers: int, ref: str) -> list[int]:
    """The run's layer indices, or a one-line error naming the valid range."""
    from conceptprobe.hooks import resolve_layers

    try:
        return resolve_layers(n_layers, config.layers)
    except ValueError as exc:
        raise ConfigError(
            f"layers {config.layers}: {exc} for model {ref}; use indices 0..{n_layers} "
            f"or -{n_layers + 1}..-1, or 'all'"
        ) from None


def check_task(
    config: RunConfig, tasks_dir: str | Path | None = None
) -> tuple[ConceptTask, dict[str, list[Prompt]]]:
    """The task and its prompts per concept; plugin and parameter problems become one-line errors.

    A plugin task's constructor and each call of its ``sample()`` run under the plugin time limit
    (:class:`~conceptprobe.tasks.registry.Watchdog`), and what ``sample()`` returns is checked.
    """
    import contextlib
    import warnings

    from conceptprobe.prompts import build_prompts
    from conceptprobe.tasks import UnknownTaskError, get_task_class

    tasks_dir = tasks_dir if tasks_dir is not None else config.tasks_dir
    from conceptprobe.tasks.registry import (
        PluginTimeout,
        TimedTask,
        Watchdog,
        plugin_timeout,
        task_origin,
        time_limit_note,
    )

    try:
        cls = get_task_class(config.task, tasks_dir=tasks_dir)
    except UnknownTaskError as exc:
        raise ConfigError(f"task: {exc}") from None
    except OSError as exc:  # the tasks folder is missing, or a file
        raise ConfigError(os_error_line(exc)) from None
    origin = task_origin(config.task)
    plugin = origin != "builtin"
    watchdog = Watchdog(plugin_timeout()) if plugin else None

    def failed(exc: BaseException, what: str, fix: str) -> ConfigError:
        """The one-line error for a plugin's code that raised or ran past the time limit."""
        if isinstance(exc, KeyboardInterrupt) and (watchdog is None or watchdog.interrupted):
            raise exc  # the user's Ctrl-C
        if isinstance(exc, PluginTimeout):
            why, fix = (
                f"it did not return within {plugin_timeout():g} s (a loop?)",
                f"{fix}; {time_limit_note()}",
            )
        elif isinstance(exc, SystemExit):
            why = f"it called sys.exit({exc.code!r})"
        else:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            why = f"{exc.__class__.__name__}: {text}"
        return ConfigError(f"task {config.task!r} ({origin}) {what}: {why}; {fix}")

    with watchdog or contextlib.nullcontext():
        try:
            task = watchdog.call(cls, **config.task_params) if watchdog else cls(**config.task_params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"task_params for task {config.task!r}: {exc}") from None
        except BaseException as exc:  # noqa: BLE001 - a plugin's constructor may raise anything
            if not plugin:
                raise
            raise failed(exc, "failed to start", "fix the task's __init__()") from None
        for concept in task.concepts:
            if not isinstance(concept, str) or not SAFE_NAME.match(concept):
                raise ConfigError(
                    f"task {config.task!r} ({origin}) has a concept named {concept!r}, which cannot name a file: "
                    "use letters, digits and . _ + - only (not starting with . or containing /)"
                )
        total = config.n * len(task.concepts)
        if config.knn_k >= total:
            raise ConfigError(
                f"knn_k={config.knn_k}: k-NN decodability needs more than k prompts in all, and n={config.n} x "
                f"{len(task.concepts)} concepts of task {config.task!r} gives {total}; raise --n or lower --knn-k"
            )
        min_shots = int(getattr(task, "min_shots", 0) or 0)
        if config.shots < min_shots:
            raise ConfigError(
                f"shots={config.shots}: task {config.task!r} needs at least {min_shots} demonstration(s) per "
                f"prompt; pass --shots {min_shots} or more"
            )
        sampler = TimedTask(task, watchdog) if watchdog else task
        prompts = {}
        for concept in task.concepts:
            try:
                prompts[concept] = build_prompts(
                    sampler,  # type: ignore[arg-type]
                    concept,
                    config.shots,
                    config.n,
                    config.seed,
                    config.prompt_format,
                )
            except BaseException as exc:  # noqa: BLE001 - a plugin's sampler may raise anything
                if not plugin and not isinstance(exc, Exception):
                    raise
                plain = isinstance(exc, (TypeError, PluginTimeout, SystemExit, KeyboardInterrupt))
                fix = "fix the task's sample()" + ("" if plain else " (e.g. an empty word list)")
                raise failed(exc, f"failed to generate examples of concept {concept!r}", fix) from exc
            bad = [p for p in prompts[concept] if not p.answer.strip()]
            if bad:
                raise ConfigError(
                    f"task {config.task!r} ({origin}) generated an empty answer for concept {concept!r} "
                    f"(input {bad[0].query!r}); exact-match accuracy needs a non-empty answer: fix its sample()"
                )
    multiline = [p for ps in prompts.values() for p in ps if "\n" in p.answer.strip()]
    if multiline:
        warnings.warn(
            f"task {config.task!r} ({origin}): {len(multiline)} answer(s) contain a newline (e.g. concept "
            f"{multiline[0].concept!r}: {multiline[0].answer[:40]!r}); they can never match, since generation "
            "stops at a newline: fix the task's sample()",
            stacklevel=2,
        )
    return task, prompts


def check_prompts(
    config: RunConfig,
    tokenizer: Any,
    prompts: dict[str, list[Prompt]],
    max_positions: int | None,
    ref: str,
) -> None:
    """Prompts fit the model's context and every position offset stays inside the shortest prompt."""
    from conceptprobe.models.errors import ModelLoadError
    from conceptprobe.models.training_checkpoint import refuse_text

    try:
        refuse_text(tokenizer, ref, f"task {config.task}")
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from None
    texts = [p.text for ps in prompts.values() for p in ps]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    shortest, longest = min(lengths), max(lengths)
    if -min(config.positions) >= shortest:
        raise ConfigError(
            f"positions {config.positions}: offset {min(config.positions)} reaches before the start of the "
            f"shortest prompt ({shortest} tokens); use offsets > {-shortest}"
        )
    if max_positions and longest > max_positions:
        raise ConfigError(
            f"shots={config.shots}: the longest prompt has {longest} tokens, more than the model's context of "
            f"{max_positions} ({ref}); use fewer --shots"
        )
