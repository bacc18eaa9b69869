"""Deletes stay inside the run: --overwrite and temp clean-up remove only files the run itself wrote.

Each case builds a run folder (a finished run of another config), plants something that is not the run's
(a symlinked activations folder, a linked output, temporaries of other writers, files of the user), runs
``conceptprobe run --overwrite`` and checks what survived.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from conceptprobe.cli import run_cli
from conceptprobe.store import stale_temps
from helpers import make_model, make_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", layers=2).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def _run(tiny: Path, out: Path, n: int, *extra: str) -> int:
    args = [
        "run",
        "--model",
        str(tiny),
        "--task",
        "bitwise",
        "--shots",
        "1",
        "--n",
        str(n),
        "--out",
        str(out),
    ]
    return run_cli([*args, "--no-progress", *extra])


def _dead_pid() -> int:
    pid = 4_000_000  # above Linux's pid_max: never alive
    return pid


@pytest.fixture
def finished(tiny, tmp_path) -> Path:
    """A complete run (n=4) in tmp/run; the cases then overwrite it with n=5."""
    out = tmp_path / "run"
    assert _run(tiny, out, 4) == 0
    return out


def _symlinked_activations(run: Path, tmp: Path) -> tuple[list[Path], list[str]]:
    outside = tmp / "elsewhere"
    (run / "activations").rename(outside)
    (run / "activations").symlink_to(outside, target_is_directory=True)
    return sorted(outside.glob("*.safetensors")), ["symbolic link"]


def _linked_output(run: Path, tmp: Path) -> tuple[list[Path], list[str]]:
    target = tmp / "precious.parquet"
    target.write_bytes(b"mine")
    (run / "metrics.parquet").unlink()
    (run / "metrics.parquet").symlink_to(target)
    return [target], []


def _foreign_temps(run: Path, tmp: Path) -> tuple[list[Path], list[str]]:
    sub = run / "notes"
    sub.mkdir()
    keep = [
        sub / f".draft.txt.tmp{_dead_pid()}",  # in a sub-folder: not the run's
        run / f".my-notes.txt.tmp{_dead_pid()}",  # not a name the run writes
        run / f".metrics.parquet.tmp{os.getppid()}",  # a live writer's (another process)
    ]
    for path in keep:
        path.write_text("x")
    return keep, []


def _user_files(run: Path, tmp: Path) -> tuple[list[Path], list[str]]:
    keep = [run / "notes.txt", run / "activations" / "README.txt", run / "activations" / "other.safetensors"]
    for path in keep:
        path.write_text("mine")
    return keep, []


CASES: list[tuple[str, Callable[[Path, Path], tuple[list[Path], list[str]]], int]] = [
    ("symlinked-activations", _symlinked_activations, 2),
    ("linked-output", _linked_output, 0),
    ("foreign-temps", _foreign_temps, 0),
    ("user-files", _user_files, 0),
]


@pytest.mark.parametrize(("build", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_overwrite_deletes_only_the_runs_own_files(tiny, tmp_path, finished, capsys, build, code):
    keep, expect = build(finished, tmp_path)
    before = {p: p.read_bytes() for p in keep}
    got = _run(tiny, finished, 5, "--overwrite")
    err = capsys.readouterr().err
    assert got == code, err
    assert all(part in err for part in expect), err
    for path, data in before.items():
        assert path.is_file() and path.read_bytes() == data, f"{path} was deleted or changed"
    if code == 0:
        assert json.loads((finished / "run.json").read_text())["config"]["n"] == 5


def test_a_dead_writers_temporary_of_the_run_is_removed_and_a_live_ones_kept(tiny, tmp_path, finished):
    dead = finished / f".run.json.tmp{_dead_pid()}"
    live = finished / f".run.json.tmp{os.getppid()}"
    dead.write_text("x")
    live.write_text("x")
    assert stale_temps(finished) == [dead]
    (finished / "metrics.parquet").unlink()
    assert _run(tiny, finished, 4) == 0  # the same config: resumes (measures only), cleaning up first
    assert not dead.exists() and live.exists()


def test_overwrite_never_replaces_a_folder_that_holds_no_run(tiny, tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "table.txt").write_text("my table")
    (home / "metrics.parquet").write_text("my data")
    assert _run(tiny, home, 4, "--overwrite") == 2
    assert "holds no run" in capsys.readouterr().err
    assert (home / "table.txt").read_text() == "my table"
    assert (home / "metrics.parquet").read_text() == "my data"
