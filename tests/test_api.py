"""The Python API: config -> function -> result, the readers, capture of custom prompts, and the CLI helpers
that preview a run (``run --dry-run``, ``tasks --show``) and capture prompts from a file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import conceptprobe as cp
from conceptprobe.cli import app
from helpers import make_model, make_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", layers=3).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def probe_run(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "bitwise"
    cp.run(
        {"model": str(tiny), "task": "bitwise", "shots": 2, "n": 12, "dtype": "float32"},
        out=out,
        progress=False,
    )
    return out


def test_the_api_is_the_same_functions_whichever_modules_were_imported():
    import conceptprobe.experiments.probe  # noqa: F401 - importing the modules must not shadow the API
    import conceptprobe.hooks  # noqa: F401
    import conceptprobe.sweep.config  # noqa: F401

    assert callable(cp.run) and callable(cp.capture) and callable(cp.sweep)


def test_run_without_out_returns_the_data_and_leaves_no_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cp.run({"model": str(tiny), "task": "bitwise", "shots": 1, "n": 6}, progress=False)
    assert result.folder is None and len(result.predictions) == 7 * 6
    assert {"cd_knn", "cd_knn_heldout_peak", "surface_baseline"} <= set(result.metrics["metric"])
    assert list(tmp_path.iterdir()) == []


def test_load_run_gives_activations_in_the_runs_own_order(probe_run):
    run = cp.load_run(probe_run)
    assert run.kind == "probe" and run.concepts[0] == "and"
    layer = run.layers[2]
    X, labels = run.activations(layer=layer)
    assert X.shape == (7 * 12, 32) and list(labels[:12]) == ["and"] * 12
    stored = run.metrics.query("metric == 'cd_knn' and concept == 'all' and layer == @layer")["value"].item()
    again = cp.knn_decodability(X, list(labels)).overall[0]
    assert again == pytest.approx(stored)  # the same order: the same neighbours, the same score
    shuffled = np.random.default_rng(0).permutation(len(labels))
    assert cp.knn_decodability(X[shuffled], list(labels[shuffled])).overall[0] == pytest.approx(stored)
    with pytest.raises(ValueError, match="was not captured"):
        run.activations(layer=99)


def test_load_runs_stacks_every_kind_and_skips_unreadable_folders(probe_run, tmp_path):
    bad = probe_run.parent / "broken"
    bad.mkdir(exist_ok=True)
    (bad / "run.json").write_text("{not json")
    frame = cp.load_runs([probe_run.parent])
    assert set(frame["kind"]) == {"probe"} and str(probe_run.resolve()) in set(frame["folder"])
    assert any("broken" in s for s in frame.attrs["skipped"])


def test_capture_equals_the_models_own_hidden_states(tiny):
    model = cp.load_model(str(tiny), dtype="float32")
    prompts = ["Input: 1 0\nOutput: 1\nInput: 0 0\nOutput:", "Input: 11 10\nOutput:"]
    got = cp.capture(model, prompts, layers=[0, 2], positions=[0, -1], answer_tokens=3)
    assert got.activations.shape == (2, 2, 2, 32) and len(got.answers) == 2
    for i, text in enumerate(prompts):
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = model.model(ids, output_hidden_states=True).hidden_states
        for li, layer in enumerate((0, 2)):
            torch.testing.assert_close(got.activations[i, li, 0], hs[layer][0, -1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.activations[i, li, 1], hs[layer][0, -2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.at(2, -1), got.activations[:, 1, 1])


def test_capture_cli_reads_a_prompts_file_and_writes_the_vectors(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps("Input: 1 1\nOutput:") + "\n" + json.dumps({"prompt": "Input: 0 1\nOutput:"}) + "\n"
    )
    out = tmp_path / "captured"
    result = CliRunner().invoke(
        app,
        ["capture", "--model", str(tiny), "--prompts", str(prompts), "--out", str(out), "--layers", "1,3"],
    )
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    acts = load_file(str(out / "activations.safetensors"))["activations"]
    assert acts.shape == (2, 2, 1, 32)
    assert [json.loads(line)["prompt"] for line in (out / "prompts.jsonl").read_text().splitlines()][1] == (
        "Input: 0 1\nOutput:"
    )


def test_run_dry_run_loads_no_weights_and_writes_nothing(tiny, tmp_path, monkeypatch):
    import conceptprobe.models.load as load_mod

    monkeypatch.setattr(
        load_mod.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights")
    )
    out = tmp_path / "never"
    result = CliRunner().invoke(
        app, ["run", "--model", str(tiny), "--task", "bitwise", "--n", "8", "--dry-run", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and "tokens" in result.output and "Output:" in result.output
    assert not out.exists()


def test_tasks_show_prints_example_prompts_with_answers():
    result = CliRunner().invoke(app, ["tasks", "--show", "bitwise", "--shots", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.count("Input:") == 2 * 7 and "--- xnor" in result.output


def test_small_n_works_with_fewer_folds(tiny, tmp_path):
    result = cp.run({"model": str(tiny), "task": "bitwise", "shots": 1, "n": 3, "knn_k": 2}, progress=False)
    assert result.metrics.query("metric == 'probe_accuracy' and concept == 'all'")["value"].notna().all()


def test_token_loss_pca_folders_load_as_long_form_metrics(tmp_path):
    """A token-loss PCA folder written before it had a metrics.parquet reads from its record; a training
    folder that holds its checkpoints' PCA stays a training folder."""
    train = Path(__file__).parents[1] / "results" / "train-induction-cpu"
    from conceptprobe.results import kind_of

    assert kind_of(train) == "train"
    folder = tmp_path / "pca"
    folder.mkdir()
    record = {
        "labels": ["step100", "step200", "step400"],
        "coords": [[-1.5, 0.2], [0.1, -0.4], [1.4, 0.2]],
        "mean_loss": [3.1, 2.4, 1.9],
        "explained_variance_ratio": [0.9, 0.1],
        "n_positions": 640,
    }
    (folder / "token_loss_pca.json").write_text(json.dumps(record))
    frame = cp.load_runs([folder])
    assert frame.attrs["skipped"] == []
    assert set(frame.kind) == {"token-loss-pca"}
    assert sorted(frame.model.unique()) == sorted(record["labels"])
    pc1 = frame[(frame.metric == "pc1")].set_index("model").value
    for label, xy in zip(record["labels"], record["coords"], strict=True):
        assert pc1[label] == pytest.approx(xy[0])
    assert (frame.n == record["n_positions"]).all()


def test_every_committed_result_folder_loads():
    """Every result folder committed under results/ loads through load_runs: none is skipped."""
    import subprocess

    from conceptprobe.results import RECORDS

    root = Path(__file__).parents[1]
    tracked = subprocess.run(
        ["git", "ls-files", "results"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    names = {"run.json", *RECORDS} - {"sweep.json"}
    folders = sorted({(root / p).parent for p in tracked if Path(p).name in names})
    assert len(folders) > 20
    frame = cp.load_runs(folders)
    assert frame.attrs["skipped"] == []
    assert {"probe", "heads", "icl", "patch", "finetune", "train"} <= set(frame.kind)
