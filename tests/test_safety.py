"""Safety: nothing is unpickled, no remote code runs unless asked, plugins load only from where the user
said, and names taken from configs or plugins cannot make a write escape the output folder."""

from __future__ import annotations

import ast
import inspect
import json
import pickle
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import conceptprobe.models.load as load_mod
from conceptprobe.cli import _default_out, run_cli
from conceptprobe.config import ConfigError, RunConfig
from conceptprobe.models import load_model
from conceptprobe.store import RunStore
from conceptprobe.sweep import expand, load_sweep_config
from conceptprobe.tasks import registry
from helpers import make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", layers=2).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    registry.discover(tmp_path)
    saved = (dict(registry._REGISTRY), dict(registry._ORIGIN), set(registry._folders_loaded))
    failed, eps = dict(registry._FAILED), registry._entry_points_loaded
    monkeypatch.delenv(registry.TASKS_DIR_ENV, raising=False)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved[0])
    registry._ORIGIN.clear()
    registry._ORIGIN.update(saved[1])
    registry._folders_loaded.clear()
    registry._folders_loaded.update(saved[2])
    registry._FAILED.clear()
    registry._FAILED.update(failed)
    registry._entry_points_loaded = eps


# ---------------------------------------------------------------- no pickle


def _calls(tree: ast.AST) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def _kw(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_no_pickle_loads_in_the_package():
    """Every module of the package and the example plugins: no pickle-based loading anywhere."""
    problems = []
    files = sorted((ROOT / "src" / "conceptprobe").rglob("*.py")) + sorted((ROOT / "tasks").glob("*.py"))
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                bad = {n.split(".")[0] for n in names if n} & {
                    "pickle",
                    "dill",
                    "cloudpickle",
                    "shelve",
                    "marshal",
                }
                if bad:
                    problems.append(f"{where}:{node.lineno} imports {bad}")
        for func, call in _calls(tree):
            line = f"{where}:{call.lineno} {func}"
            if func.endswith("torch.load") and _kw(call, "weights_only") is not True:
                problems.append(f"{line} without weights_only=True")
            if func in ("joblib.load", "pd.read_pickle", "pandas.read_pickle") or func.endswith(
                ".read_pickle"
            ):
                problems.append(line)
            if func in ("np.load", "numpy.load") and _kw(call, "allow_pickle") not in (None, False):
                problems.append(f"{line} with allow_pickle")
            if func.endswith("from_pretrained") and _kw(call, "use_safetensors") is False:
                problems.append(f"{line} with use_safetensors=False")
    assert not problems, problems


def test_a_pickle_in_the_model_folder_is_never_opened(tiny, tmp_path):
    """A malicious pytorch_model.bin next to model.safetensors: weights come from safetensors only."""
    folder = tmp_path / "model"
    shutil.copytree(tiny, folder)
    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    loaded = load_model(str(folder))
    assert loaded.info.n_layers == 2
    assert not marker.exists()


# ---------------------------------------------------------------- remote code


def test_trust_remote_code_is_off_unless_passed(tiny, tmp_path, monkeypatch):
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert "trust_remote_code" not in RunConfig.model_fields  # a run setting could come from a file
    seen: list[tuple[str, object]] = []
    for name in ("AutoTokenizer", "AutoModelForCausalLM"):
        real = getattr(load_mod, name)

        class Recording:
            @staticmethod
            def from_pretrained(ref, *args, _real=real, _name=name, **kwargs):
                seen.append((_name, kwargs.get("trust_remote_code")))
                return _real.from_pretrained(ref, *args, **kwargs)

        monkeypatch.setattr(load_mod, name, Recording)
    args = ["run", "--model", str(tiny), "--task", "bitwise", "--shots", "1", "--n", "5", "--no-progress"]
    assert run_cli([*args, "--out", str(tmp_path / "a")]) == 0
    assert seen == [("AutoTokenizer", False), ("AutoModelForCausalLM", False)]
    seen.clear()
    assert run_cli([*args, "--out", str(tmp_path / "b"), "--trust-remote-code"]) == 0
    assert seen == [("AutoTokenizer", True), ("AutoModelForCausalLM", True)]
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert record["trust_remote_code"] is True and "trust_remote_code" not in record["config"]


def test_model_code_in_a_folder_never_runs_without_the_flag(tiny, tmp_path, capsys):
    """A folder whose config names its own Python code (auto_map): never imported without the flag."""
    marker = tmp_path / "EXECUTED"
    for name, model_type in (("custom", "evilthing"), ("known", "llama")):
        folder = tmp_path / name
        shutil.copytree(tiny, folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type=model_type, auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})
        (folder / "config.json").write_text(json.dumps(cfg))
        (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        args = ["run", "--model", str(folder), "--task", "bitwise", "--shots", "1", "--n", "5"]
        code = run_cli([*args, "--out", str(tmp_path / f"out-{name}"), "--no-progress"])
        err = capsys.readouterr().err
        if model_type == "evilthing":  # an architecture only its own code implements: refused
            assert code == 2 and "--trust-remote-code" in err, err
        else:  # a known architecture: loaded with the library's own code, auto_map ignored
            assert code == 0, err
        assert not marker.exists()


def _evil_folder(tiny: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A llama folder whose config also names its own Python code (auto_map): importing it leaves a marker."""
    marker = tmp_path / "EXECUTED"
    folder = tmp_path / "evil-model"
    shutil.copytree(tiny, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.Cfg", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder, marker


def _yaml_file(path: Path, data: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return str(path)


def _run_yaml(folder: Path, tmp: Path) -> list[str]:
    cfg = {"model": str(folder), "task": "bitwise", "shots": 1, "n": 5, "trust_remote_code": True}
    return ["run", "--config", _yaml_file(tmp / "run.yaml", cfg), "--out", str(tmp / "out"), "--no-progress"]


def _sweep(folder: Path, tmp: Path, where: str, dry_run: bool = False) -> list[str]:
    model: object = {"ref": str(folder), "trust_remote_code": True} if where == "model" else str(folder)
    cfg = {"name": "s", "models": [model], "tasks": ["bitwise"], "shots": [1], "n": 5}
    if where == "top":
        cfg["trust_remote_code"] = True
    args = ["sweep", _yaml_file(tmp / "sweep.yaml", cfg), "--out", str(tmp / "sweep"), "--no-progress"]
    return args + (["--dry-run"] if dry_run else [])


def _rerun_json(folder: Path, tmp: Path) -> list[str]:
    """A run.json someone sends you, whose run had remote code on: rerunning it must not switch it on."""
    record = {
        "fingerprint": "0" * 16,
        "trust_remote_code": True,
        "config": {"model": str(folder), "task": "bitwise", "shots": 1, "n": 5, "trust_remote_code": True},
    }
    (tmp / "sent").mkdir()
    (tmp / "sent" / "run.json").write_text(json.dumps(record))
    return ["run", "--config", str(tmp / "sent" / "run.json"), "--out", str(tmp / "out"), "--no-progress"]


# (id, CLI args, exit code, expected parts of stderr)
_REMOTE_CODE_FILES = [
    ("run-yaml", _run_yaml, 2, ("key 'trust_remote_code'", "--trust-remote-code")),
    ("sweep-yaml-top", lambda f, t: _sweep(f, t, "top"), 2, ("trust_remote_code", "--trust-remote-code")),
    ("sweep-yaml-model", lambda f, t: _sweep(f, t, "model"), 2, ("models.0.trust_remote_code",)),
    ("sweep-dry-run", lambda f, t: _sweep(f, t, "top", dry_run=True), 2, ("--trust-remote-code",)),
    ("rerun-run-json", _rerun_json, 0, ("warning", "ignored", "--trust-remote-code")),
]


@pytest.mark.parametrize(
    ("build", "code", "expect"),
    [c[1:] for c in _REMOTE_CODE_FILES],
    ids=[c[0] for c in _REMOTE_CODE_FILES],
)
def test_no_config_file_can_switch_on_remote_code(tiny, tmp_path, capsys, build, code, expect):
    """Only the flag turns remote code on: YAML files are refused, a rerun run.json's setting is ignored."""
    folder, marker = _evil_folder(tiny, tmp_path)
    got = run_cli(build(folder, tmp_path))
    err = capsys.readouterr().err
    assert got == code, err
    assert all(part in err for part in expect), err
    assert len([line for line in err.splitlines() if line.startswith("error")]) <= 1, err
    assert not marker.exists()


def test_the_flag_still_switches_remote_code_on(tiny, tmp_path, capsys):
    """The control of the test above: with --trust-remote-code the same folder's code does run."""
    folder, marker = _evil_folder(tiny, tmp_path)
    run_cli(
        [
            "run",
            "--model",
            str(folder),
            "--task",
            "bitwise",
            "--shots",
            "1",
            "--n",
            "5",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            "--trust-remote-code",
        ]
    )
    assert "own Python code may run" in capsys.readouterr().err
    assert marker.exists()


def test_the_api_refuses_remote_code_as_a_run_setting():
    with pytest.raises(ValueError, match="pass --trust-remote-code"):
        RunConfig(model="m", task="pos", trust_remote_code=True)


# ---------------------------------------------------------------- plugins


def _plugin(folder: Path, name: str, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            open({str(marker)!r}, "a").write({name!r} + "\\n")
            from conceptprobe.tasks import ConceptTask, Example, register_task

            @register_task({name!r})
            class T(ConceptTask):
                concepts = ("a", "null")

                def sample(self, concept, rng):
                    return Example("x", "x")
            """
        )
    )


def test_plugins_load_only_from_the_named_folder_and_the_entry_point_group(tiny, tmp_path, monkeypatch):
    marker = tmp_path / "IMPORTED"
    named = tmp_path / "mine"
    _plugin(named, "named_task", marker)
    (named / "sub").mkdir()
    _plugin(named / "sub", "nested_task", marker)  # subfolders are not scanned
    _plugin(named, "_private_task", marker)  # files starting with _ are not plugins
    work = tmp_path / "work"
    _plugin(work / "tasks", "cwd_task", marker)  # ./tasks is the default only when no folder is named
    _plugin(work, "stray_task", marker)  # a .py file in the working folder
    out = tmp_path / "out"
    _plugin(out / "activations", "output_task", marker)  # inside the output folder
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    _plugin(model, "model_task", marker)  # inside the model folder
    groups: list[str] = []
    real = registry.entry_points

    def recording(*args, **kwargs):
        groups.append(kwargs.get("group"))
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "entry_points", recording)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    args = ["run", "--model", str(model), "--task", "named_task", "--shots", "1", "--n", "6"]
    assert run_cli([*args, "--out", str(tmp_path / "run"), "--tasks-dir", str(named), "--no-progress"]) == 0
    assert marker.read_text().split() == ["named_task"]
    assert groups == [registry.ENTRY_POINT_GROUP]
    assert "cwd_task" not in registry._REGISTRY and "stray_task" not in registry._REGISTRY


# ---------------------------------------------------------------- writes stay inside the output folder


@pytest.mark.parametrize("concept", ["../evil", "/etc/passwd", ".hidden", "a/b", "..", ""])
def test_store_refuses_names_that_leave_the_folder(tmp_path, concept):
    store = RunStore(tmp_path / "run", RunConfig(model="m", task="pos"))
    with pytest.raises(ConfigError, match="cannot name a file"):
        store.shard_path(concept)


def test_sweep_unit_folders_stay_inside_the_sweep_folder(tmp_path):
    refs = ["../../etc/weights.gguf", "/abs/models/x", "org/../../y", "./local/../z", "~/m", ".."]
    config = tmp_path / "s.yaml"
    config.write_text(json.dumps({"name": "s", "models": refs, "tasks": ["pos"], "out": str(tmp_path / "o")}))
    plan = expand(load_sweep_config(config), str(config))
    out = (tmp_path / "o").resolve()
    assert len(plan.units) == len(refs)
    for unit in plan.units:
        assert unit.folder.resolve().is_relative_to(out) and unit.folder.resolve() != out, unit.folder
    for bad in ("../up", "a/b", ".hidden"):
        config.write_text(
            json.dumps({"name": "s", "models": ["m"], "tasks": [{"name": "pos", "label": bad}]})
        )
        with pytest.raises(ConfigError, match="folder name"):
            expand(load_sweep_config(config), str(config))


@pytest.mark.parametrize("model", ["../../x", "..", "/abs/m.gguf", "../up/m.gguf", "org/name", "./"])
def test_default_run_folder_stays_under_results(model):
    folder = _default_out(model, "pos", 4, 0)
    root = (Path("results") / "runs").resolve()
    assert folder.resolve().parent == root, folder


def test_no_module_imports_at_cli_start_run_user_code(tmp_path, monkeypatch):
    """Listing tasks with no folder named and no ./tasks imports nothing from the working folder."""
    marker = tmp_path / "IMPORTED"
    _plugin(tmp_path, "here_task", marker)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["tasks"]) == 0
    assert not marker.exists() and "here_task" not in sys.modules
