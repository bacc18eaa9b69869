"""Robustness (issue 16): task names, plugin isolation, corrupt records, sweeps checked up front, locks.

Each class is table-driven where it has several cases. The CLI runs in-process through
:func:`conceptprobe.cli.run_cli` (stderr captured), as in ``test_bad_inputs.py``, whose fixtures (the tiny
model, the isolated task registry, the recorder of weight loads) are reused here; two concurrent sweeps run
as real processes. Plugins that loop stop by themselves after 20 s, so that a reverted time limit makes a
test fail instead of hang.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import test_bad_inputs as bad
from conceptprobe.cli import error_line
from conceptprobe.config import RunConfig
from conceptprobe.store import RunStore, safetensors_bytes
from conceptprobe.sweep import expand, load_sweep_config, unit_state
from conceptprobe.tasks import get_task, registry
from test_bad_inputs import Env, assert_one_line_error, cli, task_source

# the fixtures of test_bad_inputs.py: the tiny model, the isolated task registry (autouse), weight loads
tiny, _isolated, weight_loads = bad.tiny, bad._isolated, bad.weight_loads

DEAD_PID = 4_000_000  # above Linux's pid_max: never alive


def run_args(tiny: Path, out: Path, *extra: str, task: str = "bitwise", n: int = 6) -> list[str]:
    base = ["run", "--model", str(tiny), "--task", task, "--shots", "1", "--n", str(n)]
    return [*base, "--out", str(out), "--no-progress", *extra]


def sweep_yaml(path: Path, models: list, **extra) -> Path:
    data = {"name": "r", "models": models, "tasks": ["bitwise"], "shots": [1], "n": 4, **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------- 1. task names


@pytest.mark.parametrize("name", ["../evil", "my/task", ".hidden", "/abs/x", "a b"])
def test_plugin_task_names_that_would_leave_the_folder_are_refused(tiny, tmp_path, capsys, name):
    plugins = Env(tiny, tmp_path, None).plugin(task_source(name), "evil.py")  # type: ignore[arg-type]
    before = files_under(tmp_path)
    # no --out: the default run folder would be named after the task
    code, _, err = cli(capsys, "run", "--model", tiny, "--task", name, "--tasks-dir", plugins, "--n", "4")
    assert code == 2, err
    assert_one_line_error(err, (f"unknown task {name!r}", "evil.py failed to load", "cannot name a folder"))
    [warning] = warning_lines(err)
    assert "evil.py failed to load and is skipped" in warning and "cannot name a folder" in warning
    assert files_under(tmp_path) == before  # nothing created, inside the working folder or out of it
    assert not (tmp_path.parent / "evil").exists()
    registry._folders_loaded.clear()  # `conceptprobe tasks`, as a new command: the plugin is skipped again
    code, out, err = cli(capsys, "tasks", "--tasks-dir", plugins)
    assert code == 0 and name not in registry._REGISTRY and len(warning_lines(err)) == 1


def test_sweep_task_names_are_checked_too(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "models": ["smollm2-135m"], "tasks": ["../evil"]}))
    code, _, err = cli(capsys, "sweep", path, "--dry-run")
    assert code == 2
    assert_one_line_error(err, ("key 'tasks.0.name'", "'../evil' is not a task name"))


# ---------------------------------------------------------------- 2. bounds


def test_a_huge_n_fails_before_any_prompt_is_built(tiny, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("prompts were built for n=10**12")

    monkeypatch.setattr("conceptprobe.prompts.build_prompts", never)
    code, _, err = cli(capsys, *run_args(tiny, tmp_path / "out", "--n", "1000000000000"))
    assert code == 2
    assert_one_line_error(err, ("key 'n'", "less than or equal to 100000"))
    path = sweep_yaml(tmp_path / "s.yaml", [str(tiny)], n=10**12)
    code, _, err = cli(capsys, "sweep", path, "--dry-run")
    assert code == 2
    assert_one_line_error(err, ("key 'n'", "less than or equal to 100000"))


# ---------------------------------------------------------------- 3. plugin isolation

LOOP = "import time\n_t = time.monotonic()\nwhile time.monotonic() - _t < 20:\n    pass\n"
#: (file, code run at import before the task registers, task name): each fails the plugin's import
BAD_IMPORTS = [
    ("loop_import.py", LOOP, "loopimp"),
    ("exit_import.py", "import sys\nsys.exit(0)\n", "exitimp"),
    (
        "argparse_import.py",
        "import argparse\n_p = argparse.ArgumentParser(prog='foreign')\n"
        "_p.add_argument('--lexicon', required=True)\n_p.parse_args()\n",
        "argimp",
    ),
    ("kbint_import.py", "raise KeyboardInterrupt\n", "kbimp"),
]
LOOPING_SAMPLE = task_source(
    "loopsample",
    pre="LOOPED = []",
    body="import time\n            _t = time.monotonic()\n"
    "            while not LOOPED and time.monotonic() - _t < 20:  # the first call only\n"
    "                pass\n            LOOPED.append(1)\n            return Example('x' + str(rng.integers(99)), 'x')",
)


@pytest.fixture
def bad_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(registry.PLUGIN_TIMEOUT_ENV, "1")
    folder = tmp_path / "plugins"
    folder.mkdir()
    for filename, pre, name in BAD_IMPORTS:
        (folder / filename).write_text(pre + textwrap.dedent(task_source(name)))
    (folder / "loop_sample.py").write_text(textwrap.dedent(LOOPING_SAMPLE))
    return folder


def _check_builtin_ran(err: str, out: str, folder: Path) -> None:
    warnings = warning_lines(err)
    for filename, _, _ in BAD_IMPORTS:  # each bad plugin named in exactly one warning line
        assert len([w for w in warnings if filename in w]) == 1, err
    assert len(warnings) == len(BAD_IMPORTS), err
    assert "usage:" not in err + out  # the plugin's argparse usage text is not shown
    assert json.loads((folder / "run.json").read_text())["status"] == "complete"


def test_bad_plugins_never_stop_a_run_or_sweep_of_a_builtin_task(tiny, tmp_path, capsys, bad_plugins):
    started = time.monotonic()
    code, out, err = cli(capsys, *run_args(tiny, tmp_path / "run", "--tasks-dir", bad_plugins))
    assert code == 0, err
    _check_builtin_ran(err, out, tmp_path / "run")
    by_file = {f: w for w in warning_lines(err) for f, _, _ in BAD_IMPORTS if f in w}
    assert "did not finish within 1 s" in by_file["loop_import.py"]
    assert "sys.exit(0)" in by_file["exit_import.py"]
    assert "sys.exit(2)" in by_file["argparse_import.py"] and "--lexicon" in by_file["argparse_import.py"]
    assert "KeyboardInterrupt" in by_file["kbint_import.py"]
    registry._folders_loaded.clear()  # the sweep discovers the folder again, as a new command would
    registry._FAILED.clear()
    path = sweep_yaml(tmp_path / "s.yaml", [{"ref": str(tiny), "label": "tiny"}], out=str(tmp_path / "sweep"))
    code, out, err = cli(capsys, "sweep", path, "--tasks-dir", bad_plugins, "--no-progress")
    assert code == 0, err
    _check_builtin_ran(err, out, tmp_path / "sweep" / "tiny" / "bitwise_1shot_seed0")
    assert time.monotonic() - started < 60  # no loop ran its 20 s


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("loopimp", ("loop_import.py failed to load", "did not finish within 1 s")),
        ("exitimp", ("exit_import.py failed to load", "sys.exit(0)")),
        ("argimp", ("argparse_import.py failed to load", "sys.exit(2)")),
        ("kbimp", ("kbint_import.py failed to load", "KeyboardInterrupt")),
        ("loopsample", ("task 'loopsample'", "loop_sample.py", "did not return within 1 s")),
    ],
)
def test_asking_for_a_bad_plugin_names_it(tiny, tmp_path, capsys, bad_plugins, weight_loads, task, expected):
    started = time.monotonic()
    code, out, err = cli(capsys, *run_args(tiny, tmp_path / "run", "--tasks-dir", bad_plugins, task=task))
    assert code == 2, err
    assert_one_line_error(err, expected)
    assert "usage:" not in err + out
    assert weight_loads == [] and time.monotonic() - started < 20


# ---------------------------------------------------------------- 4. corrupt records


@pytest.fixture(scope="module")
def done_sweep(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """A complete sweep of two units (bitwise, 1 and 2 shots) of the tiny model: (its YAML, its folder)."""
    root = tmp_path_factory.mktemp("done-sweep")
    out = root / "sweep"
    path = sweep_yaml(root / "s.yaml", [{"ref": str(tiny), "label": "tiny"}], shots=[1, 2], out=str(out))
    from conceptprobe.cli import run_cli

    here = os.getcwd()
    os.chdir(root)  # no ./tasks
    try:
        assert run_cli(["sweep", str(path), "--no-progress"]) == 0
    finally:
        os.chdir(here)
    return path, out


def _copy_sweep(done_sweep: tuple[Path, Path], tmp: Path) -> tuple[Path, Path]:
    path, out = done_sweep
    copy = tmp / "sweep"
    shutil.copytree(out, copy)
    return path, copy


CORRUPT_JSON: list[tuple[str, bytes]] = [
    ("binary", bytes(range(256)) * 4),
    ("truncated", b'{"units": [{"id": '),
    ("a-list", b"[1, 2, 3]"),
    ("units-not-a-list", b'{"units": 5}'),
    ("unit-id-a-list", b'{"units": [{"id": [1], "fingerprint": 3}]}'),
]


@pytest.mark.parametrize(("kind", "garbage"), CORRUPT_JSON, ids=[c[0] for c in CORRUPT_JSON])
def test_a_corrupt_sweep_json_is_set_aside_and_rebuilt(
    done_sweep, tmp_path, capsys, monkeypatch, kind, garbage
):
    path, out = _copy_sweep(done_sweep, tmp_path)
    before = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_bytes(garbage)
    code, listing, err = cli(capsys, "sweep", path, "--out", out, "--dry-run")  # the plan still shows
    assert code == 0, err
    assert "2 units: 2 complete" in " ".join(listing.split())

    def boom(*args, **kwargs):
        raise AssertionError("a complete sweep loaded a model")

    monkeypatch.setattr("conceptprobe.sweep.local.load_model", boom)
    code, _, err = cli(capsys, "sweep", path, "--out", out, "--no-progress")
    assert code == 0, err
    [warning] = [w for w in warning_lines(err) if "sweep.json" in w]
    assert "was corrupt" in warning and "set aside as sweep.json.corrupt-" in warning
    [aside] = list(out.glob("sweep.json.corrupt-*"))
    assert aside.read_bytes() == garbage
    manifest = json.loads((out / "sweep.json").read_text())
    assert [u["action"] for u in manifest["units"]] == ["skipped", "skipped"]
    for old, new in zip(before["units"], manifest["units"], strict=True):  # timings from the units' run.json
        assert new["metrics_sha256"] == old["metrics_sha256"] and new["seconds"] > 0
    assert "looks like a bug" not in err and "codec" not in err


BAD_RECORDS: list[tuple[str, bytes, tuple[str, ...]]] = [
    ("binary", bytes(range(256)) * 4, ("run.json is not valid json", "not utf-8 text", "--overwrite")),
    ("truncated", b'{"fingerprint": "ab', ("run.json is not valid json", "line 1", "--overwrite")),
    ("a-list", b"[1, 2]", ("run.json is not a run record", "json list", "--overwrite")),
    ("config-a-string", b'{"fingerprint": "x", "config": "x"}', ("not a run record", "key 'config'")),
    ("fingerprint-a-number", b'{"fingerprint": 5}', ("not a run record", "key 'fingerprint'")),
    ("shards-a-list", b'{"fingerprint": "x", "shards": [1]}', ("not a run record", "key 'shards'")),
    ("layers-strings", b'{"fingerprint": "x", "layers": ["a"]}', ("not a run record", "'layers'")),
]


@pytest.mark.parametrize(("kind", "garbage", "expected"), BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_a_corrupt_run_json_is_named_with_the_fix(
    tiny, tmp_path, capsys, weight_loads, kind, garbage, expected
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_bytes(garbage)
    code, _, err = cli(capsys, *run_args(tiny, out))
    assert code == 2, err
    assert_one_line_error(err, expected)
    assert "looks like a bug" not in err and "codec" not in err and weight_loads == []
    # the same in a sweep unit: refused up front, naming the unit's run.json
    sweep = tmp_path / "sweep"
    (sweep / "tiny" / "bitwise_1shot_seed0").mkdir(parents=True)
    (sweep / "tiny" / "bitwise_1shot_seed0" / "run.json").write_bytes(garbage)
    path = sweep_yaml(tmp_path / "s.yaml", [{"ref": str(tiny), "label": "tiny"}], out=str(sweep))
    code, _, err = cli(capsys, "sweep", path, "--no-progress")
    assert code == 2, err
    assert_one_line_error(err, ("bitwise_1shot_seed0/run.json", "--overwrite"))
    assert "looks like a bug" not in err and "codec" not in err and weight_loads == []


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (folder / "activations").iterdir()}


def test_an_unreadable_run_json_is_rebuilt_from_its_shards(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert cli(capsys, *run_args(tiny, out))[0] == 0
    metrics = (out / "metrics.parquet").read_bytes()
    shards = _mtimes(out)

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded to rebuild a run whose shards are all there")

    monkeypatch.setattr("conceptprobe.experiments.probe.load_model", boom)
    (out / "run.json").write_bytes(b"\x00\xff garbage")
    code, _, err = cli(capsys, *run_args(tiny, out))
    assert code == 0, err
    [warning] = warning_lines(err)
    assert (
        f"{out / 'run.json'} is not valid JSON" in warning
        and "rebuilt the record from its 7 shard(s)" in warning
    )
    assert "--overwrite" not in err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["model"]["n_layers"] == 2
    assert record["fingerprint"] == RunConfig(model=str(tiny), task="bitwise", shots=1, n=6).fingerprint()
    assert (out / "metrics.parquet").read_bytes() == metrics  # measures recomputed: the same bytes
    assert _mtimes(out) == shards  # no shard rewritten
    monkeypatch.undo()

    # a shard missing too: only that concept is recomputed (the model is loaded for it)
    (out / "run.json").write_text("{")
    (out / "activations" / "xor.safetensors").unlink()
    code, _, err = cli(capsys, *run_args(tiny, out))
    assert code == 0, err
    assert "rebuilt the record from its 6 shard(s)" in err
    after = _mtimes(out)
    assert {k for k in after if after.get(k) != shards.get(k)} == {"xor.safetensors"}
    assert (out / "metrics.parquet").read_bytes() == metrics
    concepts = [c for c in get_task("bitwise").concepts if c != "xor"]
    assert json.loads((out / "run.json").read_text())["resumed_concepts"] == concepts

    # shards of another config are not taken for this one's: refused as before
    (out / "run.json").write_text("{")
    code, _, err = cli(capsys, *run_args(tiny, out, n=5))
    assert code == 2
    assert_one_line_error(err, ("run.json is not valid json", "--overwrite"))
    # nor shards written before they carried their run's record
    for shard in (out / "activations").iterdir():
        with safe_open(str(shard), framework="pt") as fh:
            meta = fh.metadata()
        old = {k: meta[k] for k in ("concept", "layers", "positions", "predictions")}
        shard.write_bytes(safetensors_bytes("activations", load_file(str(shard))["activations"], old))
    code, _, err = cli(capsys, *run_args(tiny, out))
    assert code == 2
    assert_one_line_error(err, ("run.json is not valid json", "--overwrite"))


def test_a_sweep_unit_with_an_unreadable_run_json_resumes_from_its_shards(done_sweep, tmp_path, capsys):
    path, out = _copy_sweep(done_sweep, tmp_path)
    unit = out / "tiny" / "bitwise_2shot_seed0"
    metrics = (unit / "metrics.parquet").read_bytes()
    (unit / "run.json").write_bytes(b"\x89PNG garbage")
    plan = expand(load_sweep_config(path, {"out": str(out)}), str(path))
    state = unit_state(next(u for u in plan.units if u.folder == unit))
    assert state.status == "partial" and "rebuilt from its shards" in state.detail
    code, _, err = cli(capsys, "sweep", path, "--out", out, "--no-progress")
    assert code == 0, err
    assert json.loads((unit / "run.json").read_text())["status"] == "complete"
    assert (unit / "metrics.parquet").read_bytes() == metrics


def test_the_report_skips_unreadable_runs_with_a_note(done_sweep, tmp_path):
    from conceptprobe.report.collect import collect

    _, out = _copy_sweep(done_sweep, tmp_path)
    (out / "tiny" / "bitwise_1shot_seed0" / "metrics.parquet").write_bytes(b"PAR1 garbage PAR1")
    (out / "sweep.json").write_bytes(bytes(range(256)))
    data = collect([out])
    assert [r.folder.name for r in data.runs] == ["bitwise_2shot_seed0"]
    notes = " ".join(data.skipped)
    assert "bitwise_1shot_seed0: metrics.parquet unreadable" in notes
    (out / "tiny" / "bitwise_2shot_seed0" / "run.json").write_text('{"config": 1, "model": 2, "task": 3}')
    (out / "tiny" / "bitwise_1shot_seed0" / "run.json").write_text("{")
    shutil.copytree(done_sweep[1] / "tiny", out / "good")
    data = collect([out])
    assert {r.folder.parent.name for r in data.runs} == {"good"}
    notes = " ".join(data.skipped)
    assert (
        "bitwise_1shot_seed0: run.json unreadable" in notes
        and "bitwise_2shot_seed0: run.json is not" in notes
    )


# ---------------------------------------------------------------- 5. sweeps checked before any model loads


def _short_context(env: Env) -> str:
    return str(env.model_copy("short", max_position_embeddings=40))


def _broken_config(env: Env) -> str:
    folder = env.model_copy("badjson")
    (folder / "config.json").write_text("{")
    return str(folder)


# (id, the second model of the sweep, sweep settings, expected parts of the error line)
SWEEP_CASES: list[tuple[str, Callable[[Env], str], dict, tuple[str, ...]]] = [
    ("layer-out-of-range", lambda e: str(e.tiny), {"layers": [0, 7]}, ("layer 7 is out of range", "0..2")),
    ("misspelt-model", lambda e: "smollm2-135", {}, ("'smollm2-135'", "did you mean 'smollm2-135m'")),
    (
        "prompts-over-context",
        _short_context,
        {"shots": [8]},
        ("8shot", "more than the model's context of 40"),
    ),
    ("knn-k-too-large", lambda e: str(e.tiny), {"knn_k": 500}, ("knn_k=500", "lower --knn-k")),
    ("broken-config", _broken_config, {}, ("config.json is not valid json",)),
    (
        "negative-position",
        lambda e: str(e.tiny),
        {"positions": [0, -500]},
        ("offset -500", "shortest prompt"),
    ),
]


@pytest.mark.parametrize(
    ("build", "settings", "expected"), [c[1:] for c in SWEEP_CASES], ids=[c[0] for c in SWEEP_CASES]
)
def test_sweep_units_are_checked_before_the_first_model_loads(
    tiny, tmp_path, capsys, monkeypatch, weight_loads, build, settings, expected
):
    env = Env(tiny, tmp_path, monkeypatch)
    second = build(env)
    models = [{"ref": str(tiny), "label": "first"}, {"ref": second, "label": "second"}]
    path = sweep_yaml(tmp_path / "s.yaml", models, out=str(tmp_path / "sweep"), **settings)
    code, _, err = cli(capsys, "sweep", path, "--no-progress")
    assert code == 2, err
    assert_one_line_error(err, expected)
    assert weight_loads == [], f"weights were loaded before refusing: {weight_loads}"
    assert not (tmp_path / "sweep" / "sweep.json").exists()


def test_sweep_checks_load_no_tokenizer_when_prompts_surely_fit(tiny, tmp_path, monkeypatch):
    from conceptprobe.sweep.plan import check_units

    calls: list[str] = []
    monkeypatch.setattr("conceptprobe.models.load.load_tokenizer", lambda ref, *a: calls.append(ref))
    plan = expand(load_sweep_config(sweep_yaml(tmp_path / "s.yaml", [str(tiny)], shots=[1, 8])))
    check_units(plan, plan.units)
    assert calls == []  # 8-shot bitwise prompts have far fewer bytes than the 1024 positions


# ---------------------------------------------------------------- 6. messages


def test_answers_with_a_newline_get_one_warning(tiny, tmp_path, capsys, monkeypatch):
    plugins = Env(tiny, tmp_path, monkeypatch).plugin(
        task_source("lines", body="return Example('x' + str(rng.integers(1000)), 'a\\nb')")
    )
    code, _, err = cli(capsys, *run_args(tiny, tmp_path / "out", "--tasks-dir", plugins, task="lines", n=6))
    assert code == 0, err
    [warning] = warning_lines(err)
    assert "task 'lines'" in warning and "contain a newline" in warning and "can never match" in warning


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENAMETOOLONG, "File name too long", "x" * 5000), ("path too long", "5000 characters")),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "y" * 5000), ("No such file", "yyy…")),
        (
            PermissionError(errno.EACCES, "Permission denied", "z" * 5000),
            ("Permission denied", "permissions"),
        ),
    ],
)
def test_long_paths_in_os_errors_are_cut(exc, expected):
    line = error_line(exc)
    assert len(line) < 300 and "\n" not in line
    for part in expected:
        assert part in line, line


# ---------------------------------------------------------------- 7. locks


def test_a_live_lock_refuses_and_a_dead_ones_is_taken_over(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    alive = os.getppid()
    (out / ".run.lock").write_text(f"{alive}\n")
    code, _, err = cli(capsys, *run_args(tiny, out))
    assert code == 2
    assert_one_line_error(err, ("in use by another conceptprobe process", f"pid {alive}", ".run.lock"))
    assert (out / ".run.lock").read_text() == f"{alive}\n" and not (out / "run.json").exists()
    (out / ".run.lock").write_text(f"{DEAD_PID}\n")
    code, _, err = cli(capsys, *run_args(tiny, out))
    assert code == 0, err
    assert f"took over the lock {out / '.run.lock'} of process {DEAD_PID}" in err
    assert not (out / ".run.lock").exists()  # released at the end


def test_a_sweep_takes_over_stale_locks_and_a_unit_holding_one_is_pending(tiny, tmp_path, capsys):
    out = tmp_path / "sweep"
    unit = out / "tiny" / "bitwise_1shot_seed0"
    unit.mkdir(parents=True)
    (out / ".sweep.lock").write_text(f"{DEAD_PID}\n")
    (unit / ".run.lock").write_text(f"{DEAD_PID}\n")  # a sweep killed before the unit started
    path = sweep_yaml(tmp_path / "s.yaml", [{"ref": str(tiny), "label": "tiny"}], out=str(out))
    plan = expand(load_sweep_config(path), str(path))
    assert unit_state(plan.units[0]).status == "pending"
    code, _, err = cli(capsys, "sweep", path, "--no-progress")
    assert code == 0, err
    assert f"took over the lock {out / '.sweep.lock'} of process {DEAD_PID}" in err
    assert "took over 1 unit lock(s)" in err
    assert not list(out.rglob("*.lock"))
    assert json.loads((unit / "run.json").read_text())["status"] == "complete"
    # a live process's sweep lock: refused, naming it
    (out / ".sweep.lock").write_text(f"{os.getppid()}\n")
    code, _, err = cli(capsys, "sweep", path, "--no-progress")
    assert code == 2
    assert_one_line_error(err, ("in use by another conceptprobe process", f"pid {os.getppid()}"))


GATE = """
import os, time
from conceptprobe.tasks import ConceptTask, Example, register_task

@register_task("gate")
class Gate(ConceptTask):
    concepts = ("echo", "null")

    def sample(self, concept, rng):
        t = time.monotonic()
        while not os.path.exists(os.environ["GATE_FILE"]) and time.monotonic() - t < 120:
            time.sleep(0.05)
        return Example("x" + str(rng.integers(1000)), "x")
"""


def test_two_concurrent_sweeps_one_computes_the_other_refuses(tiny, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "gate.py").write_text(GATE)
    out = tmp_path / "sweep"
    models = [{"ref": str(tiny), "label": "tiny"}]
    config = sweep_yaml(tmp_path / "s.yaml", models, tasks=["gate"], n=6, out=str(out))
    gate = tmp_path / "go"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "GATE_FILE": str(gate),
        registry.PLUGIN_TIMEOUT_ENV: "300",  # the first sweep waits in the gate's sample() for the second
    }
    argv = [sys.executable, "-m", "conceptprobe.cli", "sweep", str(config), "--tasks-dir", str(plugins)]
    first = subprocess.Popen(
        [*argv, "--no-progress"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / ".sweep.lock").exists():  # the first holds the lock, and waits at the gate
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first sweep never took its lock"
            time.sleep(0.2)
        second = subprocess.run(
            [*argv, "--no-progress"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 2, second.stderr
        assert_one_line_error(second.stderr, ("in use by another conceptprobe process", f"pid {first.pid}"))
        assert not (out / "sweep.json").exists()  # the refused sweep wrote nothing
        gate.write_text("go")
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    manifest = json.loads((out / "sweep.json").read_text())
    [unit] = manifest["units"]
    assert unit["status"] == "complete" and unit["action"] == "ran" and unit["seconds"] > 0
    assert unit["started"] and unit["finished"]
    assert not list(out.rglob("*.lock"))


def test_run_store_ignores_lock_files(tiny, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".run.lock").write_text(f"{DEAD_PID}\n")
    store = RunStore(folder, RunConfig(model=str(tiny), task="bitwise", n=4))
    assert store.check() is None  # a folder holding only a lock holds no run and nothing else
