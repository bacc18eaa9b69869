"""Task registry: decorator, entry points, tasks folder, broken and shadowing plugins, did-you-mean."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import conceptprobe.tasks
from conceptprobe.tasks import (
    ConceptTask,
    Example,
    PluginWarning,
    UnknownTaskError,
    discover,
    get_task,
    get_task_class,
    register_task,
    registry,
    task_names,
)
from conceptprobe.tasks.bitwise import BitwiseTask
from conceptprobe.tasks.pos import PosTask

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def registry_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Snapshot and restore the module-global registry; run from an empty folder with no env override."""
    discover(tmp_path)  # built-ins in place before the snapshot
    saved = (
        dict(registry._REGISTRY),
        dict(registry._ORIGIN),
        set(registry._folders_loaded),
        registry._entry_points_loaded,
        registry._builtins_loaded,
        registry._current_origin,
    )
    modules = set(sys.modules)
    monkeypatch.delenv(registry.TASKS_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved[0])
    registry._ORIGIN.clear()
    registry._ORIGIN.update(saved[1])
    registry._folders_loaded.clear()
    registry._folders_loaded.update(saved[2])
    registry._entry_points_loaded, registry._builtins_loaded, registry._current_origin = saved[3:]
    for name in set(sys.modules) - modules:
        if name.startswith(("conceptprobe_plugin_", "cp_test_")):
            del sys.modules[name]


def _task_source(name: str, extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        import numpy as np
        from conceptprobe.tasks import ConceptTask, Example, register_task

        @register_task({name!r})
        class Plugin(ConceptTask):
            concepts = ("echo", "null")

            def sample(self, concept, rng):
                return Example(input="x", answer="x")
        {extra}
        """
    )


def _write(folder: Path, filename: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(source)
    return path


def _unique(prefix: str = "cp_test_") -> str:
    return prefix + uuid.uuid4().hex[:10]


# ---------------------------------------------------------------- built-ins and decorator


def test_builtins_registered() -> None:
    names = task_names()
    assert {"pos", "bitwise"} <= set(names)
    assert get_task_class("pos") is PosTask and get_task_class("bitwise") is BitwiseTask
    assert registry.task_origin("pos") == registry.task_origin("bitwise") == "builtin"


def test_decorator_registers() -> None:
    name = _unique("deco_")

    @register_task(name)
    class Echo(ConceptTask):
        concepts = ("echo", "null")

        def sample(self, concept: str, rng: np.random.Generator) -> Example:
            return Example(input="hi", answer="hi")

    assert Echo.name == name
    task = get_task(name, level=2)
    assert isinstance(task, Echo) and task.params == {"level": 2}
    assert registry.task_origin(name).startswith("module ")
    # Registering the same class again is harmless.
    assert register_task(name)(Echo) is Echo


def test_decorator_validates() -> None:
    class NoNull(ConceptTask):
        concepts = ("a", "b")

        def sample(self, concept: str, rng: np.random.Generator) -> Example:
            raise NotImplementedError

    class Twice(NoNull):
        concepts = ("a", "a", "null")

    with pytest.raises(ValueError, match="must include the 'null' concept"):
        register_task(_unique())(NoNull)
    with pytest.raises(ValueError, match="lists a concept twice"):
        register_task(_unique())(Twice)
    with pytest.raises(TypeError, match="ConceptTask subclass"):
        register_task(_unique())(dict)  # type: ignore[arg-type]


def test_user_code_cannot_shadow_builtin() -> None:
    class FakePos(ConceptTask):
        concepts = ("null",)

        def sample(self, concept: str, rng: np.random.Generator) -> Example:
            raise NotImplementedError

    with pytest.warns(PluginWarning, match="'pos', already registered by builtin"):
        register_task("pos")(FakePos)
    assert get_task_class("pos") is PosTask
    assert FakePos.__dict__.get("name") is None  # a skipped class is left untouched


def test_plugin_before_builtins_does_not_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A plugin loaded before the built-ins were imported must still not take a built-in's name."""
    for mod in ("conceptprobe.tasks.pos", "conceptprobe.tasks.bitwise"):
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(conceptprobe.tasks, "pos", sys.modules.get("conceptprobe.tasks.pos"), raising=False)
    monkeypatch.setattr(conceptprobe.tasks, "bitwise", None, raising=False)
    registry._REGISTRY.clear()
    registry._ORIGIN.clear()
    registry._builtins_loaded = False
    folder = tmp_path / "early"
    _write(folder, "fake_pos.py", _task_source("pos"))
    with pytest.warns(PluginWarning, match="already registered by builtin"):
        registry.load_tasks_dir(folder)
    cls = registry._REGISTRY["pos"]
    assert cls.__module__ == "conceptprobe.tasks.pos" and registry.task_origin("pos") == "builtin"


# ---------------------------------------------------------------- unknown names


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(UnknownTaskError, match="Did you mean 'bitwise'") as info:
        get_task("bitwse")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "unknown task 'bitwse'" in message and "pos" in message and not message.startswith('"')


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(UnknownTaskError) as info:
        get_task("zzzzzzzz")
    assert "Did you mean" not in str(info.value)


# ---------------------------------------------------------------- tasks folder


def test_tasks_folder_loading(tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    name = _unique("folder_")
    _write(folder, "good.py", _task_source(name))
    _write(folder, "_private.py", "raise RuntimeError('files starting with _ are not loaded')")
    _write(folder, "notes.txt", "not python")
    discover(folder)
    task = get_task(name)
    assert task.sample("echo", np.random.default_rng(0)) == Example("x", "x")
    assert registry.task_origin(name) == f"file {(folder / 'good.py').resolve()}"
    discover(folder)  # loading again is a no-op
    assert get_task_class(name) is type(task)


def test_tasks_folder_from_cwd_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cwd_name, env_name = _unique("cwd_"), _unique("env_")
    _write(tmp_path / "tasks", "a.py", _task_source(cwd_name))
    _write(tmp_path / "elsewhere", "b.py", _task_source(env_name))
    assert cwd_name in task_names()  # ./tasks of the current folder
    monkeypatch.setenv(registry.TASKS_DIR_ENV, str(tmp_path / "elsewhere"))
    assert env_name in task_names()


def test_missing_tasks_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "nope")


def test_broken_plugin_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    good, half = _unique("good_"), _unique("half_")
    _write(folder, "a_broken.py", "import numpy as np\nraise RuntimeError('boom')\n")
    _write(folder, "b_syntax.py", "def oops(:\n")
    _write(folder, "c_half.py", _task_source(half, extra="raise ImportError('missing dependency')"))
    _write(folder, "d_good.py", _task_source(good))
    with pytest.warns(PluginWarning) as record:
        discover(folder)
    messages = " ".join(str(w.message) for w in record)
    assert "a_broken.py" in messages and "boom" in messages
    assert "b_syntax.py" in messages and "SyntaxError" in messages
    assert "c_half.py" in messages and "missing dependency" in messages
    assert good in task_names()
    assert half not in task_names()  # a plugin that failed halfway leaves nothing behind
    assert not [m for m in sys.modules if m.startswith("conceptprobe_plugin_a_broken")]


def test_folder_plugin_cannot_shadow_builtin(tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    _write(folder, "shadow.py", _task_source("bitwise"))
    with pytest.warns(PluginWarning, match="'bitwise', already registered by builtin.*skipped"):
        discover(folder)
    assert get_task_class("bitwise") is BitwiseTask
    assert registry.task_origin("bitwise") == "builtin"


def test_two_plugins_same_name(tmp_path: Path) -> None:
    folder = tmp_path / "plugins"
    name = _unique("dup_")
    _write(folder, "first.py", _task_source(name))
    _write(folder, "second.py", _task_source(name))
    with pytest.warns(PluginWarning, match="already registered by file"):
        discover(folder)
    assert registry.task_origin(name).endswith("first.py")


# ---------------------------------------------------------------- entry points (a real dist-info on sys.path)


def _install_dist(
    site: Path, monkeypatch: pytest.MonkeyPatch, entries: dict[str, str], modules: dict
) -> None:
    """Write modules and a ``<dist>.dist-info`` with ``entry_points.txt`` into ``site``, on sys.path."""
    dist = _unique("cp_test_dist_")
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{lines}\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))
    registry._entry_points_loaded = False


def test_entry_point_class(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mod, name = _unique(), _unique("ep_")
    source = _task_source("unused").replace(f"@register_task({'unused'!r})\n", "")
    _install_dist(tmp_path / "site", monkeypatch, {name: f"{mod}:Plugin"}, {mod: source})
    assert name in task_names()
    assert get_task_class(name).__module__ == mod
    assert get_task_class(name).name == name
    assert registry.task_origin(name).startswith(f"entry point {name!r}")


def test_entry_point_module_registering_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mod, name = _unique(), _unique("epmod_")
    _install_dist(tmp_path / "site", monkeypatch, {"anything": mod}, {mod: _task_source(name)})
    assert name in task_names()
    assert registry.task_origin(name).startswith("entry point 'anything'")


def test_entry_point_broken_and_shadowing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ok, broken, shadow, notask = _unique(), _unique(), _unique(), _unique()
    plain = _task_source("unused").replace(f"@register_task({'unused'!r})\n", "")
    _install_dist(
        tmp_path / "site",
        monkeypatch,
        {
            "ok_ep": f"{ok}:Plugin",
            "broken_ep": f"{broken}:Plugin",
            "pos": f"{shadow}:Plugin",
            "notask_ep": f"{notask}:VALUE",
        },
        {ok: plain, broken: "raise RuntimeError('kaput')\n", shadow: plain, notask: "VALUE = 3\n"},
    )
    with pytest.warns(PluginWarning) as record:
        names = task_names()
    messages = " ".join(str(w.message) for w in record)
    assert "broken_ep" in messages and "kaput" in messages
    assert "'pos', already registered by builtin" in messages
    assert "notask_ep" in messages and "ConceptTask subclass" in messages
    assert "ok_ep" in names and "broken_ep" not in names and "notask_ep" not in names
    assert get_task_class("pos") is PosTask and registry.task_origin("pos") == "builtin"


def test_entry_points_read_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mod = _unique()
    plain = _task_source("unused").replace(f"@register_task({'unused'!r})\n", "")
    _install_dist(tmp_path / "site", monkeypatch, {"once_ep": f"{mod}:Plugin"}, {mod: plain})
    discover()
    calls = []
    monkeypatch.setattr(registry, "entry_points", lambda **kw: calls.append(kw) or [])
    discover()
    get_task("once_ep")
    assert calls == []


# ---------------------------------------------------------------- the repo's example plugin


def test_repo_example_plugin_loads_and_samples() -> None:
    discover(REPO / "tasks")
    task = get_task("string_ops")
    assert registry.task_origin("string_ops").endswith("string_ops.py")
    assert task.concepts == ("first_letter", "last_letter", "reverse", "uppercase", "null")
    for seed in range(20):
        ex = {c: task.sample(c, np.random.default_rng(seed)) for c in task.concepts}
        word = ex["reverse"].input
        assert all(e.input == word for e in ex.values())
        assert ex["first_letter"].answer == word[0]
        assert ex["last_letter"].answer == word[-1]
        assert ex["reverse"].answer == word[::-1]
        assert ex["uppercase"].answer == word.upper()
        assert ex["null"].answer != word and ex["null"].answer.isalpha()
