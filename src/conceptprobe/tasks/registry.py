"""Task registry: built-ins, the ``conceptprobe.tasks`` entry-point group, and a ``tasks/`` folder.

Discovery is lazy and happens once per process (or per tasks folder). A plugin that fails to import
warns and is skipped; a plugin never replaces a built-in; an unknown name errors with "did you mean".

Plugins are isolated from the tool: a plugin's import runs under a time limit (``$CONCEPTPROBE_PLUGIN_TIMEOUT``
seconds, default 10) with its stdout and stderr captured, and anything it raises, ``SystemExit`` and
``KeyboardInterrupt`` included, makes it a skipped plugin, never the CLI's own exit. Task names follow the
same rule as concepts and labels (they name folders): letters, digits and ``. _ + -``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import io
import os
import signal
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from conceptprobe.names import SAFE_NAME
from conceptprobe.tasks.base import NULL_CONCEPT, ConceptTask, Example

ENTRY_POINT_GROUP = "conceptprobe.tasks"
TASKS_DIR_ENV = "CONCEPTPROBE_TASKS_DIR"
#: Seconds a plugin's import, or one call of a plugin task's code (its constructor, sample()), may take.
PLUGIN_TIMEOUT_ENV = "CONCEPTPROBE_PLUGIN_TIMEOUT"
DEFAULT_PLUGIN_TIMEOUT = 10.0
#: Task names name folders (default run folders, sweep units): no separators, no leading dot.
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


class PluginTimeout(BaseException):
    """A plugin's code ran past the time limit.

    A ``BaseException``, like ``KeyboardInterrupt``: a plugin's own ``except Exception`` does not swallow it.
    """


def plugin_timeout() -> float:
    """The time limit on plugin code, in seconds: ``$CONCEPTPROBE_PLUGIN_TIMEOUT`` or 10."""
    raw = os.environ.get(PLUGIN_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_PLUGIN_TIMEOUT
    except ValueError:
        return DEFAULT_PLUGIN_TIMEOUT
    return value if value > 0 else DEFAULT_PLUGIN_TIMEOUT


class Watchdog:
    """A time limit on plugin code in the main thread: a ``SIGALRM`` timer ticks and, once the code being
    timed has run longer than ``seconds``, raises :class:`PluginTimeout` in it.

    ``running=True`` times the whole ``with`` block (a plugin's import); otherwise only the calls made
    through :meth:`call` (each call gets ``seconds``). A Ctrl-C of the user during the block sets
    :attr:`interrupted`, so callers can tell it from a ``KeyboardInterrupt`` raised by the plugin. Off the
    main thread (or without ``SIGALRM``) nothing is timed.
    """

    def __init__(self, seconds: float, running: bool = False) -> None:
        self.seconds = seconds
        self.running = running
        self.interrupted = False
        self._deadline: float | None = None
        self._active = False

    def __enter__(self) -> Watchdog:
        self._active = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        if self.running:
            self._deadline = time.monotonic() + self.seconds
        if self._active:
            tick = min(0.25, self.seconds / 4)
            self._entered = time.monotonic()
            self._old_alarm = signal.signal(signal.SIGALRM, self._on_alarm)
            self._old_int = signal.signal(signal.SIGINT, self._on_interrupt)
            self._old_timer = signal.setitimer(signal.ITIMER_REAL, tick, tick)
        return self

    def __exit__(self, *exc: object) -> None:
        self._deadline = None
        if not self._active:
            return
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old_alarm)
        signal.signal(signal.SIGINT, self._old_int)
        delay, interval = self._old_timer
        if delay > 0:  # someone else's timer was running: re-arm what is left of it
            left = delay - (time.monotonic() - self._entered)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001), interval)

    def _on_alarm(self, signum: int, frame: object) -> None:
        if self._deadline is not None and time.monotonic() > self._deadline:
            self._deadline = time.monotonic() + 1.0  # raised again if the plugin swallows it
            raise PluginTimeout(f"did not finish within {self.seconds:g} s")

    def _on_interrupt(self, signum: int, frame: object) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, under the time limit."""
        self._deadline = time.monotonic() + self.seconds
        try:
            return fn(*args, **kwargs)
        finally:
            self._deadline = None


def time_limit_note() -> str:
    """How to change the time limit on plugin code (for messages)."""
    return f"${PLUGIN_TIMEOUT_ENV} sets the limit, now {plugin_timeout():g} s"


class TimedTask:
    """A plugin task whose ``sample()``, ``from_pool()`` and ``pool()`` calls run under a :class:`Watchdog`,
    their results checked (an :class:`Example` of two strings); every other attribute is the task's."""

    def __init__(self, task: ConceptTask, watchdog: Watchdog) -> None:
        self._task = task
        self._watchdog = watchdog

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def sample(self, concept: str, rng: Any) -> Example:
        return _checked_example("sample", self._watchdog.call(self._task.sample, concept, rng))

    def from_pool(self, item: Any, concept: str, rng: Any) -> Example:
        return _checked_example("from_pool", self._watchdog.call(self._task.from_pool, item, concept, rng))

    def pool(self, role: str) -> Any:
        return self._watchdog.call(self._task.pool, role)


def _checked_example(method: str, value: Any) -> Example:
    if not (isinstance(value, Example) and isinstance(value.input, str) and isinstance(value.answer, str)):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:80] + "…"
        raise TypeError(f"{method}() returned {shown}, not an Example(input=str, answer=str)")
    return value


def describe_failure(exc: BaseException, captured: str = "") -> str:
    """A plugin failure in words, one line (``captured``: what the plugin printed, its last line is quoted)."""
    printed = [line.strip() for line in captured.splitlines() if line.strip()]
    said = f" (it printed: {printed[-1][:120]!r})" if printed else ""
    if isinstance(exc, PluginTimeout):
        return f"its import did not finish within {plugin_timeout():g} s (a loop?); {time_limit_note()}"
    if isinstance(exc, SystemExit):
        return (
            f"it called sys.exit({exc.code!r}) while being imported (e.g. argparse reading the command line "
            f"at import){said}; a plugin must not exit"
        )
    if isinstance(exc, KeyboardInterrupt):
        return f"it raised KeyboardInterrupt while being imported{said}"
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:200]}" if text else exc.__class__.__name__


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
    """Class decorator registering a :class:`ConceptTask` subclass under ``name``.

    ``name`` names folders (run and sweep folders), so it must be letters, digits and ``. _ + -`` only.
    """
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:80] + "…"
        raise ValueError(
            f"task name {shown} cannot name a folder: use letters, digits and . _ + - only (not starting "
            "with . or containing /); rename the task"
        )

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


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """The plugin's stdout and stderr captured (e.g. argparse's usage text), its warnings held back.

    PluginWarnings raised while loading (a plugin shadowing a built-in) are re-issued afterwards; the
    plugin's own warnings and output are dropped.
    """
    buffer = io.StringIO()
    caught: list[warnings.WarningMessage] = []
    try:
        with (
            warnings.catch_warnings(record=True) as caught,  # type: ignore[assignment]
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
        ):
            warnings.simplefilter("always")
            yield buffer
    finally:
        for w in caught:
            if issubclass(w.category, PluginWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _load_with_origin(origin: str, loader) -> None:
    """Run ``loader`` (a plugin's import) under the time limit, output captured; any failure skips it."""
    global _current_origin
    previous = _current_origin
    _current_origin = origin
    before = set(_REGISTRY)
    watchdog = Watchdog(plugin_timeout(), running=True)
    captured = ""
    try:
        with _quiet() as output:
            try:
                with watchdog:
                    loader()
            finally:
                captured = output.getvalue()
    except BaseException as exc:  # a broken plugin must not break (or exit, or hang) the tool
        if watchdog.interrupted:  # the user's Ctrl-C, not the plugin's
            raise
        for name in set(_REGISTRY) - before:  # nor leave half of itself registered
            del _REGISTRY[name]
            del _ORIGIN[name]
        why = describe_failure(exc, captured)
        _FAILED[origin] = why
        warnings.warn(
            f"task plugin {origin} failed to load and is skipped: {why}", PluginWarning, stacklevel=3
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
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"tasks folder {folder} is a file, not a folder; pass the folder that holds the plugin .py files "
            "as --tasks-dir"
        )
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
