"""A sweep SIGKILLed at many random points resumes to exactly the results of an uninterrupted sweep.

Real processes, killed with SIGKILL: each attempt of the sweep is a process forked from a small server
that imported conceptprobe, torch and transformers once (a fresh interpreter spends seconds importing
them, which would leave little time for kills that land inside the work). The kill delays are drawn
from a seeded generator, spread over the duration of an uninterrupted sweep, so kills land during
start-up, inside a concept, between shards, while measures are computed and while files are written.
After every kill the test checks that nothing complete was rewritten; at the end, that every unit is
complete, with metrics, predictions and tables byte-identical to the uninterrupted sweep.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import make_model, make_tokenizer

MIN_KILLS = 20

SERVER = r"""
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
import conceptprobe.cli as cli
import conceptprobe.experiments.probe, conceptprobe.sweep.local  # noqa: F401 - imported once, before any fork
from conceptprobe.models import load_model
load_model(sys.argv[1])  # warms transformers' lazy imports of the model and tokenizer classes
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "start":
        pid = os.fork()
        if pid == 0:
            # a forked child inherits torch's thread pool marked unusable; rebuilding it here, on one
            # thread, keeps transformers' loader threads from racing to rebuild it ("Invalid thread pool!")
            torch.set_num_threads(1)
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            try:
                code = cli.run_cli(req["argv"])
            except BaseException:
                traceback.print_exc()
                code = 99
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkServer:
    """A Python process that forks a CLI run per request; the test kills the forked children."""

    def __init__(self, model: Path, log: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(model)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        assert self._read() == "ready"

    def _read(self) -> str:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line, f"the fork server died: {Path(self.log.name).read_text()[-2000:]}"
        return line.strip()

    def _ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self._read())

    def start(self, argv: list[str], log: Path) -> int:
        return self._ask(op="start", argv=argv, log=str(log))["pid"]

    def wait(self, pid: int) -> int:
        return self._ask(op="wait", pid=pid)["code"]

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=30)
        self.log.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _complete_units(out: Path) -> dict[str, dict[str, tuple[int, str]]]:
    """Units whose run.json says complete: every file of theirs, with mtime and sha256."""
    found = {}
    for run_json in out.glob("*/*/run.json"):
        if json.loads(run_json.read_text()).get("status") == "complete":
            folder = run_json.parent
            found[str(folder.relative_to(out))] = {
                str(p.relative_to(folder)): (p.stat().st_mtime_ns, _sha(p))
                for p in folder.rglob("*")
                if p.is_file()
            }
    return found


def _shards(out: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(out)): (p.stat().st_mtime_ns, _sha(p))
        for p in out.glob("*/*/activations/*.safetensors")
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    model = root / "tiny-llama"
    make_model("llama", layers=2).save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    config = root / "kill.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "kill",
                "models": [{"ref": str(model), "label": "tiny"}],
                "tasks": ["bitwise", {"name": "bitwise", "params": {"width": 3}, "label": "bitwise3"}],
                "shots": [1, 2],
                "n": 6,
                "batch_size": 1,
                "max_new_tokens": 3,
            }
        )
    )
    server = ForkServer(model, root / "server.log")
    yield root, config, server
    server.close()


def test_sigkill_at_random_points_loses_nothing(setup):
    root, config, server = setup
    started = time.monotonic()

    def sweep(out: Path, log: Path) -> int:
        return server.start(["sweep", str(config), "--out", str(out), "--no-progress"], log)

    # the uninterrupted reference, timed: kill delays are spread over its duration
    reference = root / "reference"
    t0 = time.monotonic()
    assert server.wait(sweep(reference, root / "reference.log")) == 0, (root / "reference.log").read_text()
    duration = time.monotonic() - t0
    units = sorted(str(p.parent.relative_to(reference)) for p in reference.glob("*/*/run.json"))
    assert len(units) == 4

    rng = random.Random(20240531)
    kills, rounds, attempts = 0, 0, 0
    states: set[tuple[str, int, int]] = set()  # (round, complete units, shards) seen after a kill
    while kills < MIN_KILLS:
        rounds += 1
        out = root / f"killed{rounds}"
        complete: dict[str, dict[str, tuple[int, str]]] = {}
        shards: dict[str, tuple[int, str]] = {}
        while True:
            attempts += 1
            assert attempts < 400, "the sweep makes no progress between kills"
            log = root / f"attempt{attempts}.log"
            pid = sweep(out, log)
            if kills < MIN_KILLS:  # enough kills: the last attempt of the round runs to the end
                time.sleep(rng.uniform(0.0, duration * 0.6))
                os.kill(pid, signal.SIGKILL)
            code = server.wait(pid)
            if code == -signal.SIGKILL:
                kills += 1
            else:
                assert code == 0, log.read_text()[-3000:]
            # nothing complete was rewritten: complete units and finished shards are untouched
            now_complete = _complete_units(out)
            for unit, files in complete.items():
                assert now_complete.get(unit) == files, (
                    f"complete unit {unit} changed after attempt {attempts}"
                )
            now_shards = _shards(out)
            for shard, stamp in shards.items():
                if shard.split("/activations/")[0] not in complete:  # shards of complete units checked above
                    assert now_shards.get(shard) == stamp, (
                        f"finished shard {shard} rewritten in attempt {attempts}"
                    )
            complete.update(now_complete)
            shards.update(now_shards)
            if code != 0:
                states.add((out.name, len(now_complete), len(now_shards)))
            if code == 0:
                break
        # nothing lost: every unit complete, results byte-identical to the uninterrupted sweep
        manifest = json.loads((out / "sweep.json").read_text())
        assert manifest["status"] == "complete", manifest
        assert sorted(u["folder"] for u in manifest["units"] if u["status"] == "complete") == units
        for unit in units:
            for name in ("metrics.parquet", "predictions.jsonl", "table.txt"):
                assert (out / unit / name).read_bytes() == (reference / unit / name).read_bytes(), (
                    unit,
                    name,
                )
            record = json.loads((out / unit / "run.json").read_text())
            for rel, sha in record["outputs"].items():
                assert _sha(out / unit / rel) == sha
        assert not [p for p in out.rglob("*") if ".tmp" in p.name], "temporary files left behind"
    assert len(states) >= MIN_KILLS // 4, f"kills landed at too few distinct points: {sorted(states)}"
    elapsed = time.monotonic() - started
    print(
        f"{kills} kills in {attempts} attempts over {rounds} sweeps at {len(states)} distinct points; "
        f"reference {duration:.1f} s; {elapsed:.0f} s"
    )
