"""Concept-vector patching on tiny random models: exactness of the intervention, its KV-cache semantics,
the answers of other concepts, sharded models, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from conceptprobe.commands import causal_cmds
from conceptprobe.generation import Encoded, encode, position_ids
from conceptprobe.hooks import ResidualCapture, ResidualPatch
from conceptprobe.interventions.patching import (
    PatchConfig,
    answer_under,
    build_prompts_with_states,
    patch_vectors,
    patched_generate,
    run_patching,
)
from conceptprobe.models import LoadedModel, ModelInfo
from conceptprobe.prompts import build_prompts
from conceptprobe.store import METRIC_COLUMNS
from conceptprobe.tasks import get_task
from conceptprobe.tasks.bitwise import OPERATORS
from helpers import make_model, make_tokenizer

FAMILIES = ["llama", "gemma3", "qwen2"]
TEXT = "Input: 10110 01101\nOutput: 00100\nInput: she quickly ate the tiny apple\nOutput:"


def _pair(tok, family_bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of two prompts of equal length that differ only in their last token."""
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 7) % 500 + 3  # a different ordinary token
    assert other[0, -1] != ids[0, -1]
    return ids, other


@torch.inference_mode()
def _logits(model, ids: torch.Tensor, patch: ResidualPatch | None = None, vec: torch.Tensor | None = None):
    if patch is not None:
        patch.arm(torch.full((ids.shape[0],), ids.shape[1] - 1), vec)
    return model(input_ids=ids).logits[:, -1].float()


@torch.inference_mode()
def _capture(model, ids: torch.Tensor) -> torch.Tensor:
    """The last token's residual at every layer, [layers, d]."""
    with ResidualCapture(model) as cap:
        cap.set_positions(torch.full((ids.shape[0], 1), ids.shape[1] - 1))
        model(input_ids=ids)
        return cap.take()[0, :, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_with_other_prompts_representation_reproduces_its_output(family):
    """Prompts differing only in the last token: replacing A's last-token residual at layer l with B's (captured
    at l) gives B's next-token logits and B's residuals at every later layer, for every l."""
    model = make_model(family, layers=3)
    tok = make_tokenizer(family.startswith("gemma"))
    a, b = _pair(tok, family.startswith("gemma"))
    ref_a, ref_b = _logits(model, a), _logits(model, b)
    assert not torch.allclose(ref_a, ref_b, atol=1e-3)
    reps_b = _capture(model, b)
    for layer in range(4):
        with ResidualPatch(model, layer, "replace") as patch, ResidualCapture(model) as cap:
            patch.arm(torch.tensor([a.shape[1] - 1]), reps_b[layer : layer + 1])
            cap.set_positions(torch.tensor([[a.shape[1] - 1]]))
            with torch.inference_mode():
                out = model(input_ids=a).logits[:, -1].float()
            assert patch.fired
            torch.testing.assert_close(out, ref_b, rtol=0, atol=1e-5)
            torch.testing.assert_close(cap.take()[0, layer:, 0], reps_b[layer:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_at_last_layer_reproduces_any_other_prompt(family):
    """Two unrelated prompts of equal length: at the last layer only the final norm and the head follow."""
    model = make_model(family, layers=3)
    tok = make_tokenizer(family.startswith("gemma"))
    a = tok(TEXT, return_tensors="pt")["input_ids"]
    b = a.clone()
    start = 1 if family.startswith("gemma") else 0  # keep the BOS
    b[0, start:] = torch.randint(3, 600, (a.shape[1] - start,))
    rep_b = _capture(model, b)[-1:]
    with ResidualPatch(model, 3, "replace") as patch:
        torch.testing.assert_close(_logits(model, a, patch, rep_b), _logits(model, b), rtol=0, atol=1e-5)


def test_replace_at_layer_zero_reproduces_the_whole_generation():
    """At layer 0 (the embeddings) the patched prompt *is* the other prompt: the whole greedy answer matches."""
    model = make_model("llama", layers=3)
    tok = make_tokenizer()
    a, b = _pair(tok, False)
    rep_b = _capture(model, b)[:1]
    ones = torch.ones_like(a)
    with ResidualPatch(model, 0, "replace") as patch:
        patched = patched_generate_ids(model, tok, Encoded(a, ones), patch, rep_b, 6)
    assert patched == patched_generate_ids(model, tok, Encoded(b, ones), None, None, 6)


def patched_generate_ids(model, tok, batch: Encoded, patch, vec, steps: int) -> list[list[int]]:
    from conceptprobe.generation import capture_and_generate

    if patch is not None:
        patch.arm(batch.last_index, vec)
    _, texts = capture_and_generate(model, tok, batch, None, [0], steps, stop="")
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_zero_add_changes_nothing_and_patch_is_prefill_only(mode):
    model = make_model("llama", layers=3)
    tok = make_tokenizer()
    texts = [TEXT, "Input: 10110 01101\nOutput:", "Input: under the bridge we sang\nOutput:"]
    plain = patched_generate(model, tok, texts, None, None, 5)
    if mode == "add":
        with ResidualPatch(model, 2, "add") as patch:
            assert patched_generate(model, tok, texts, patch, torch.zeros(3, 32), 5) == plain
            batch = encode(tok, texts)
            with torch.inference_mode():
                ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                patch.arm(batch.last_index, torch.zeros(3, 32))
                got = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            assert torch.equal(ref, got)
    # the hook is one-shot: after the prefill, the next forward pass is untouched
    with ResidualPatch(model, 2, mode) as patch:
        patched_generate(model, tok, texts, patch, torch.randn(3, 32), 5)
        assert patch.fired
        assert patched_generate(model, tok, texts, None, None, 5) == plain
    # and outside the context no hook is left behind
    assert patched_generate(model, tok, texts, None, None, 5) == plain


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_decoding_equals_full_recompute_with_the_patch(family):
    """The KV cache carries the patched state: greedy decoding with the cache equals recomputing the whole
    sequence each step with the patch applied at the prompt's last position (left-padded batch)."""
    model = make_model(family, layers=3)
    tok = make_tokenizer(family.startswith("gemma"))
    texts = [TEXT, "Input: 10110 01101\nOutput:", "Input: under the bridge\nOutput:"]
    vec = 3 * torch.randn(3, 32)
    steps = 5
    with ResidualPatch(model, 2, "add") as patch:
        cached = patched_generate_ids(model, tok, encode(tok, texts), patch, vec, steps)
        batch = encode(tok, texts)
        ids, mask, last = batch.input_ids, batch.attention_mask, batch.last_index
        ref: list[list[int]] = [[] for _ in texts]
        with torch.inference_mode():
            for _ in range(steps):
                patch.arm(last, vec)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
                token = logits[:, -1].argmax(-1)
                for row in range(len(texts)):
                    ref[row].append(int(token[row]))
                ids = torch.cat([ids, token[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    eos = tok.eos_token_id
    expected = [r[: r.index(eos)] if eos in r else r for r in ref]
    expected = [
        tok(tok.decode(r, skip_special_tokens=True), add_special_tokens=False)["input_ids"] for r in expected
    ]
    assert cached == expected
    unpatched = patched_generate_ids(model, tok, encode(tok, texts), None, None, steps)
    assert unpatched != cached, "the patch should change the answers of a random model"


def test_sharded_model_patches_like_the_unsharded_one(tmp_path):
    from conceptprobe.models.load import load_model

    folder = tmp_path / "tiny"
    make_model("llama", layers=4).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    plain = load_model(str(folder), "float32")
    device_map = {
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu",
    }  # fmt: skip
    sharded = load_model(str(folder), "float32", device_map=device_map, offload_folder=tmp_path / "off")
    texts = [TEXT, "Input: 10110 01101\nOutput:"]
    vec = 2 * torch.randn(2, 32)
    for layer in (0, 2, 4):
        outs = []
        for loaded in (plain, sharded):
            with ResidualPatch(loaded.model, layer, "add") as patch:
                outs.append(patched_generate(loaded.model, loaded.tokenizer, texts, patch, vec, 4))
        assert outs[0] == outs[1]


@pytest.mark.parametrize("task_name", ["pos", "bitwise"])
def test_prompts_with_states_and_answers_of_other_concepts(task_name):
    task = get_task(task_name)
    for concept in task.concepts:
        prompts, states = build_prompts_with_states(task, concept, 4, 12, seed=3)
        assert prompts == build_prompts(task, concept, 4, 12, seed=3)
        for p, st in zip(prompts, states, strict=True):
            assert answer_under(task, st, concept, p.query) == p.answer
            for other in task.concepts:
                ans = answer_under(task, st, other, p.query)
                if task_name == "bitwise" and other != "null":
                    a, b = (np.array([int(c) for c in x]) for x in p.query.split())
                    assert ans == "".join(str(int(v)) for v in OPERATORS[other](a, b))
                if task_name == "pos" and other != "null":
                    assert ans in p.query.split()


def test_patch_vectors_modes():
    acts = torch.randn(12, 3, 5)
    labels = ["a"] * 4 + ["b"] * 4 + ["null"] * 4
    rep = patch_vectors(acts, labels, ["a", "b", "null"], "replace")
    torch.testing.assert_close(rep[:, 0], acts[:4].mean(0))
    add = patch_vectors(acts, labels, ["a", "b", "null"], "add", scale=2.0)
    torch.testing.assert_close(add[:, 1], 2 * (acts[4:8].mean(0) - rep.mean(1)))
    torch.testing.assert_close(add.sum(1), torch.zeros(3, 5), atol=1e-5, rtol=0)


def _loaded(family: str = "llama") -> LoadedModel:
    model = make_model(family, layers=3)
    info = ModelInfo(
        ref="tiny", source="local", family=family, architecture=type(model).__name__, n_params=1, n_layers=3,
        hidden_size=32, dtype="float32",
    )  # fmt: skip
    return LoadedModel(model, make_tokenizer(family.startswith("gemma")), info)


def test_run_patching_results_folder(tmp_path):
    cfg = PatchConfig(
        model="tiny", task="bitwise", shots=1, n=3, seeds=2, n_mean=4, layers=[1, 3], dtype="float32"
    )
    result = run_patching(cfg, tmp_path, loaded=_loaded(), progress=False)
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert list(m.columns[: len(METRIC_COLUMNS) + 1]) == METRIC_COLUMNS + ["condition"]
    assert {"patch_accuracy", "patch_delta_accuracy", "patch_delta_accuracy_std", "patch_follow_rate"} <= set(
        m.metric
    )
    assert set(m.condition) == {"baseline", "positive", "negative", "cross"}
    delta = m[(m.metric == "patch_delta_accuracy") & (m.concept != "all")]
    assert sorted(set(delta.layer)) == [1, 3] and set(delta.n_seeds) == {2}
    # the delta is the mean over seeds of (patched - baseline) accuracy
    per_seed = pd.read_parquet(tmp_path / "per_seed.parquet")
    preds = pd.read_json(tmp_path / "predictions.jsonl", lines=True)
    assert len(preds) == 6 * 3 * 2 * (1 + 2 * 3)
    row = delta[(delta.concept == "and") & (delta.condition == "negative") & (delta.layer == 3)]
    mine = preds[preds.concept == "and"]
    base = mine[mine.condition == "baseline"].groupby("seed").correct.mean()
    neg = mine[(mine.condition == "negative") & (mine.layer == 3)].groupby("seed").correct.mean()
    want = (neg - base).mean()
    assert row.value.item() == pytest.approx(want)
    assert len(per_seed[per_seed.metric == "patch_delta_accuracy"]) == 2 * 2 * 3 * 7
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["kind"] == "patch" and run["layers"] == [1, 3] and run["eval_seeds"] == [0, 1]
    assert run["mean_seed"] == 10_000 and "KV cache" in run["semantics"]
    assert (tmp_path / "patch_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "patch_cross.png").is_file()
    assert result.peak_layer in range(4)
    # cross predictions carry B and B's answer on A's input
    cross = preds[preds.condition == "cross"]
    assert (cross.patched_concept == cross.cross_concept).all() and (
        cross.cross_concept != cross.concept
    ).all()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", layers=3).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_patch_cli_smoke(tiny_model_dir, tmp_path):
    app = typer.Typer()
    causal_cmds.register(app)
    out = tmp_path / "patch"
    args = [
        "patch",
        "--model",
        str(tiny_model_dir),
        "--task",
        "pos",
        "--shots",
        "1",
        "--n",
        "2",
        "--seeds",
        "2",
    ]
    args += [
        "--n-mean",
        "3",
        "--layers",
        "peak",
        "--mode",
        "replace",
        "--dtype",
        "float32",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, [*args, "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "peak layer" in result.output
    run = json.loads((out / "run.json").read_text())
    assert run["layers"] == [run["peak_layer"]] and run["config"]["mode"] == "replace"
    again = CliRunner().invoke(app, [*args, "--no-progress"])
    assert again.exit_code != 0 and "not empty" in again.output


def test_mixed_batch_patches_each_row_at_its_own_layer():
    """Rows patched at different layers, and unpatched rows, in one batch equal each prompt run alone."""
    model = make_model("llama", layers=3)
    tok = make_tokenizer()
    texts = [TEXT, "Input: 10110 01101\nOutput:", "Input: under the bridge\nOutput:", TEXT]
    plan = [1, None, 3, 0]  # layer of each row (None: unpatched)
    vec = 2 * torch.randn(4, 32)
    batch = encode(tok, texts)
    with (
        ResidualPatch(model, 0, "add") as p0,
        ResidualPatch(model, 1, "add") as p1,
        ResidualPatch(model, 3, "add") as p3,
    ):
        patches = {0: p0, 1: p1, 3: p3}
        with torch.inference_mode():
            for layer, patch in patches.items():
                patch.arm(batch.last_index, vec, torch.tensor([lay == layer for lay in plan]))
            mixed = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1]
            assert all(p.fired for p in patches.values())
            for row, (text, layer) in enumerate(zip(texts, plan, strict=True)):
                ids = tok(text, return_tensors="pt")["input_ids"]
                if layer is not None:
                    patches[layer].arm(torch.tensor([ids.shape[1] - 1]), vec[row : row + 1])
                alone = model(input_ids=ids).logits[:, -1]
                torch.testing.assert_close(mixed[row], alone[0], rtol=0, atol=1e-4)


def test_cross_concept_answers_on_a_pooled_task():
    """A task with finite pools: the same query sentence answered under another concept."""
    from pathlib import Path

    from conceptprobe.interventions.patching import answer_under, build_prompts_with_states
    from conceptprobe.tasks import get_task

    ewt = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"
    if not ewt.is_dir():
        pytest.skip("the UD English EWT files are not in ../shared/data")
    task = get_task("first-last-treebank", treebank=str(ewt))
    assert task.pool("demo") is not None
    prompts, states = build_prompts_with_states(task, "first_noun", 2, 5, 0)
    for p, st in zip(prompts, states, strict=True):
        assert answer_under(task, st, "first_noun", p.query) == p.answer
        last = answer_under(task, st, "last_noun", p.query)
        assert last != p.answer and last in p.query
