"""Layer-restricted LoRA on tiny random models: which weights change, the loss mask, the results folder, the CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from conceptprobe.commands import causal_cmds
from conceptprobe.interventions.finetune import (
    IGNORE,
    FinetuneConfig,
    answer_loss,
    collate,
    parse_layer_spec,
    run_finetune,
    tokenize_examples,
    train_lora,
)
from conceptprobe.models import LoadedModel, ModelInfo
from conceptprobe.prompts import PromptFormat, build_prompts
from conceptprobe.store import METRIC_COLUMNS
from conceptprobe.tasks import get_task
from helpers import make_model, make_tokenizer


def _examples(tok, task_name: str = "bitwise", n: int = 4, shots: int = 1):
    task = get_task(task_name)
    prompts = [p for c in task.concepts if c != "null" for p in build_prompts(task, c, shots, n, seed=7)]
    return prompts, tokenize_examples(tok, prompts, PromptFormat())


def test_parse_layer_spec():
    assert parse_layer_spec("first:3", 10) == [0, 1, 2]
    assert parse_layer_spec("last:3", 10) == [7, 8, 9]
    assert parse_layer_spec("2,0,5", 10) == [0, 2, 5]
    assert parse_layer_spec("all", 4) == [0, 1, 2, 3]
    for bad in ("first:0", "last:11", "middle:2", "3,12", "first:x"):
        with pytest.raises(ValueError):
            parse_layer_spec(bad, 10)


@pytest.mark.parametrize("gemma", [False, True])
def test_loss_mask_covers_only_the_answer_tokens(gemma):
    tok = make_tokenizer(add_bos=gemma)
    prompts, examples = _examples(tok, "pos")
    batch = collate(examples[:5], tok.pad_token_id)
    for row, (p, e) in enumerate(zip(prompts[:5], examples[:5], strict=True)):
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        supervised = (labels != IGNORE).nonzero().flatten().tolist()
        n_prompt = len(e.prompt_ids)
        assert supervised == list(range(n_prompt, n_prompt + len(e.completion_ids)))
        assert tok.decode(ids[supervised]) == " " + p.answer + "\n"
        assert tok.decode(ids[:n_prompt], skip_special_tokens=True) == p.text
        assert ids[:n_prompt].tolist() == tok(p.text)["input_ids"]  # tokenized exactly as at evaluation
        assert (labels[mask == 0] == IGNORE).all()
        if gemma:
            assert ids[0] == tok.bos_token_id and labels[0] == IGNORE


def test_answer_loss_equals_masked_full_logits_loss():
    model = make_model("gemma3", layers=2)
    tok = make_tokenizer(add_bos=True)
    _, examples = _examples(tok)
    batch = collate(examples[:4], tok.pad_token_id)
    with torch.no_grad():
        got = answer_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE,
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "spec"), [("llama", "first:2"), ("qwen2", "last:2"), ("gemma3", "1")])
def test_lora_changes_no_weight_outside_its_layers(family, spec):
    model = make_model(family, layers=4)
    tok = make_tokenizer(family.startswith("gemma"))
    _, examples = _examples(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = parse_layer_spec(spec, 4)
    cfg = FinetuneConfig(
        model="tiny", task="bitwise", steps=3, batch_size=4, lr=1e-2, layers=spec, compare=[]
    )
    peft_model, losses = train_lora(model, examples, cfg, layers, tok.pad_token_id)
    assert len(losses) == 3
    lora = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert {int(n.split(".layers.")[1].split(".")[0]) for n in lora} == set(layers)
    merged = peft_model.merge_and_unload()
    after = merged.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training steps should change the merged weights of the adapted layers"
    for key in changed:
        assert ".layers." in key and int(key.split(".layers.")[1].split(".")[0]) in layers, key
    for layer in layers:  # every adapted layer moved
        assert any(f".layers.{layer}." in k for k in changed)


def test_unload_restores_the_base_weights_exactly():
    model = make_model("llama", layers=3)
    tok = make_tokenizer()
    _, examples = _examples(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(model="tiny", task="bitwise", steps=2, batch_size=4, lr=1e-2, compare=[])
    peft_model, _ = train_lora(model, examples, cfg, [0, 2], tok.pad_token_id)
    restored = peft_model.unload()
    after = restored.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def _loaded() -> LoadedModel:
    model = make_model("llama", layers=4)
    info = ModelInfo(
        ref="tiny", source="local", family="llama", architecture="LlamaForCausalLM", n_params=1, n_layers=4,
        hidden_size=32, dtype="float32",
    )  # fmt: skip
    return LoadedModel(model, make_tokenizer(), info)


def test_run_finetune_results_folder(tmp_path):
    cfg = FinetuneConfig(
        model="tiny", task="bitwise", shots=1, n=5, steps=3, batch_size=4, lr=1e-2, layers="first:2",
        compare=["last:2"], dtype="float32",
    )  # fmt: skip
    loaded = _loaded()
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = run_finetune(cfg, tmp_path, loaded=loaded, progress=False)
    m = pd.read_parquet(tmp_path / "metrics.parquet")
    assert list(m.columns[: len(METRIC_COLUMNS) + 1]) == METRIC_COLUMNS + ["condition"]
    assert set(m.condition) == {"base", "first:2", "last:2"}
    assert {"finetune_accuracy", "cd_knn", "probe_accuracy", "finetune_train_loss"} <= set(m.metric)
    assert "icl_accuracy" not in set(m.metric)
    knn = m[(m.metric == "cd_knn") & (m.concept == "all")]
    assert knn.groupby("condition").size().to_dict() == {"base": 5, "first:2": 5, "last:2": 5}
    for spec in ("first-2", "last-2"):
        weights = load_file(str(tmp_path / "adapters" / spec / "adapter_model.safetensors"))
        layers = {int(k.split(".layers.")[1].split(".")[0]) for k in weights}
        assert layers == ({0, 1} if spec == "first-2" else {2, 3})
        sub = json.loads((tmp_path / spec / "run.json").read_text())
        assert (
            sub["adapter"]["spec"] == spec.replace("-", ":")
            and not (tmp_path / spec / "activations").exists()
        )
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["kind"] == "finetune" and run["train_seed"] == 20_000 and run["eval_seed"] == 0
    assert len(run["training"]["first:2"]["losses"]) == 3
    assert "| first:2 |" in result.table and (tmp_path / "table.md").read_text() == result.table
    assert (tmp_path / "finetune.png").stat().st_size > 1000
    # the base weights are back to the original after both conditions
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_training_prompts_are_disjoint_from_evaluation_queries():
    from conceptprobe.interventions.finetune import _training_prompts

    task = get_task("bitwise")
    cfg = FinetuneConfig(model="tiny", task="bitwise", shots=1, n=40, steps=50, batch_size=8)
    evals = {c: {p.query for p in build_prompts(task, c, 1, 40, 0)} for c in task.concepts}
    train = _training_prompts(task, cfg, evals)
    assert train and all(p.query not in evals[p.concept] for p in train)
    assert "null" not in {p.concept for p in train}
    assert len(train) < 50 * 8 // 6 * 6 + 6  # some overlaps with the 1024 possible inputs were dropped


def test_finetune_cli_smoke(tmp_path):
    folder = tmp_path / "tiny"
    make_model("llama", layers=3).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    app = typer.Typer()
    causal_cmds.register(app)
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(folder), "--task", "pos", "--shots", "1", "--layers", "first:1"]
    args += ["--compare", "last:1", "--steps", "2", "--batch-size", "2", "--n", "5", "--dtype", "float32"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| last:1 |" in result.output
    assert (out / "adapters" / "first-1" / "adapter_model.safetensors").is_file()
