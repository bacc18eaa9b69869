"""Task registry: built-ins, the ``conceptprobe.tasks`` entry-point group, and a ``tasks/`` folder.

Discovery is lazy and happens once per process (or per tasks folder). A plugin that fails to import
warns and is skipped; a plugin never replaces a built-in; an unknown name errors with "did you mean".
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
import types
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from conceptprobe.tasks.base import NULL_CONCEPT, ConceptTask

ENTRY_POINT_GROUP = "conceptprobe.tasks"
TASKS_DIR_ENV = "CONCEPTPROBE_TASKS_DIR"
_BUILTIN_MODULES = (
    "conceptprobe.tasks.pos",
    "conceptprobe.tasks.bitwise",
    "conceptprobe.tasks.synthetic",
    "conceptprobe.tasks.pos_treebank",
    "conceptprobe.tasks.first_last",
)

_REGISTRY: dict[str, type[ConceptTask]] = {}
_ORIGIN: dict[str, str] = {}
_current_origin: str | None = None  # the plugin being loaded, if any
_builtins_loaded = False
_entry_points_loaded = False
_folders_loaded: set[Path] = set()
_FAILED: dict[str, str] = {}  # plugin origin -> why it was skipped (named by "unknown task" errors)


class UnknownTaskError(KeyError):
    """A task name that no built-in or plugin registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class PluginWarning(UserWarning):
    """A task plugin was skipped (import failed, or it tried to shadow a built-in)."""


def _validate(cls: type[ConceptTask], name: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, ConceptTask)):
        raise TypeError(f"@register_task({name!r}) must decorate a ConceptTask subclass, got {cls!r}")
    concepts = getattr(cls, "concepts", None)
    if not concepts:
        raise ValueError(f"task {name!r} declares no concepts; set `concepts = (..., 'null')`")
    if NULL_CONCEPT not in concepts:
        raise ValueError(f"task {name!r} must include the {NULL_CONCEPT!r} concept in `concepts`")
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"task {name!r} lists a concept twice: {concepts}")
    pairs = getattr(cls, "pairs", ())
    if not isinstance(pairs, tuple):
        raise ValueError(f"task {name!r}: `pairs` must be a tuple of (concept, concept) pairs, got {pairs!r}")
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(
                f"task {name!r}: each of `pairs` must be a (concept, concept) tuple, got {pair!r}"
            )
        for member in pair:
            if member not in concepts:
                raise ValueError(
                    f"task {name!r}: pair {pair!r} names {member!r}, which is not one of its concepts"
                )
            if member == NULL_CONCEPT:
                raise ValueError(
                    f"task {name!r}: pair {pair!r} includes {NULL_CONCEPT!r}; pairs are of real concepts"
                )
        if pair[0] == pair[1]:
            raise ValueError(f"task {name!r}: pair {pair!r} pairs a concept with itself")


def _origin_of(cls: type) -> str:
    """``builtin`` for the built-in modules, else the plugin being loaded, else the defining module."""
    if cls.__module__ in _BUILTIN_MODULES:
        return "builtin"
    return _current_origin if _current_origin is not None else f"module {cls.__module__}"


def register_task(name: str):
    """Class decorator registering a :class:`ConceptTask` subclass under ``name``."""

    def decorator(cls: type[ConceptTask]) -> type[ConceptTask]:
        _validate(cls, name)
        origin = _origin_of(cls)
        if origin != "builtin":
            _load_builtins()  # built-ins claim their names first, whatever the import order
        if name in _REGISTRY:
            prior = _ORIGIN[name]
            if _REGISTRY[name] is cls or (
                f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}"
                == f"{cls.__module__}.{cls.__qualname__}"
                and prior == origin
            ):
                cls.name = name
                _REGISTRY[name] = cls
                return cls
            warnings.warn(
                f"task plugin {cls.__module__}.{cls.__qualname__} ({origin}) tries to register "
                f"{name!r}, already registered by {prior}; it is skipped. Rename the plugin's task.",
                PluginWarning,
                stacklevel=2,
            )
            return cls
        cls.name = name
        _REGISTRY[name] = cls
        _ORIGIN[name] = origin
        return cls

    return decorator


def _load_with_origin(origin: str, loader) -> None:
    global _current_origin
    previous = _current_origin
    _current_origin = origin
    before = set(_REGISTRY)
    try:
        loader()
    except Exception as exc:  # a broken plugin must not break the tool
        for name in set(_REGISTRY) - before:  # nor leave half of itself registered
            del _REGISTRY[name]
            del _ORIGIN[name]
        _FAILED[origin] = f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:200]}"
        warnings.warn(
            f"task plugin {origin} failed to load and is skipped: {exc!r}", PluginWarning, stacklevel=3
        )
    finally:
        _current_origin = previous


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    _load_builtins()
    for ep in entry_points(group=ENTRY_POINT_GROUP):

        def load(ep=ep) -> None:
            obj = ep.load()  # a module whose import registers its tasks through the decorator is fine
            if isinstance(obj, types.ModuleType) or _REGISTRY.get(ep.name) is obj:
                return
            if not (isinstance(obj, type) and issubclass(obj, ConceptTask)):
                raise TypeError(f"entry point must name a ConceptTask subclass or a module, got {obj!r}")
            register_task(ep.name)(obj)  # warns and skips if the name is taken

        _load_with_origin(f"entry point {ep.name!r} ({ep.value})", load)


def default_tasks_dir() -> Path | None:
    """The plugin folder: ``$CONCEPTPROBE_TASKS_DIR`` if set, else ``./tasks`` if it exists."""
    env = os.environ.get(TASKS_DIR_ENV)
    if env:
        return Path(env)
    here = Path.cwd() / "tasks"
    return here if here.is_dir() else None


def load_tasks_dir(folder: str | Path) -> None:
    """Import every ``*.py`` file (not starting with ``_``) in ``folder`` as a task plugin."""
    folder = Path(folder).resolve()
    if folder in _folders_loaded:
        return
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tasks folder {folder} does not exist; create it or pass another --tasks-dir"
        )
    _folders_loaded.add(folder)
    _load_builtins()
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module_name = f"conceptprobe_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"

        def load(path=path, module_name=module_name) -> None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise

        _load_with_origin(f"file {path}", load)


def discover(tasks_dir: str | Path | None = None) -> None:
    """Load built-ins, entry points and the tasks folder (each once)."""
    _load_builtins()
    _load_entry_points()
    folder = Path(tasks_dir) if tasks_dir is not None else default_tasks_dir()
    if folder is not None:
        load_tasks_dir(folder)


def task_names(tasks_dir: str | Path | None = None) -> list[str]:
    """All registered task names, sorted."""
    discover(tasks_dir)
    return sorted(_REGISTRY)


def task_origin(name: str) -> str:
    """Where a registered task came from: ``builtin``, an entry point or a file."""
    return _ORIGIN[name]


def get_task_class(name: str, tasks_dir: str | Path | None = None) -> type[ConceptTask]:
    """The registered class for ``name``; unknown names suggest the closest registered ones."""
    discover(tasks_dir)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        failed = "".join(f" Plugin {origin} failed to load ({why})." for origin, why in _FAILED.items())
        raise UnknownTaskError(
            f"unknown task {name!r}.{hint} Known tasks: {', '.join(sorted(_REGISTRY))} "
            "(`conceptprobe tasks` lists them; plugins go in ./tasks or the "
            f"{ENTRY_POINT_GROUP!r} entry points).{failed}"
        )
    return _REGISTRY[name]


def get_task(name: str, tasks_dir: str | Path | None = None, **params: Any) -> ConceptTask:
    """Instantiate the task ``name`` with ``params``."""
    return get_task_class(name, tasks_dir)(**params)
