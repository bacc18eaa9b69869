"""ICL score: constructed loss matrices, per-token losses against the model's own loss, corpus, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conceptprobe.corpus import CorpusError, Document, iter_corpus, python_prose
from conceptprobe.measures.icl_score import (
    ContextLengthError,
    build_contexts,
    check_context_length,
    icl_score,
    loss_curve,
    per_token_losses,
    special_prefix,
)

VOCAB = 40


def tiny_llama(max_positions: int = 1024, seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def word_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<bos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", unk_token="<unk>", pad_token="<bos>"
    )


def words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(2, VOCAB, size=n))


# ------------------------------------------------------------------ the score on constructed losses


def test_icl_score_exact_on_constructed_losses():
    n_ctx, n_tok = 40, 512
    t = np.arange(1, n_tok + 1)
    offsets = np.linspace(2.0, 4.0, n_ctx)[:, None]  # per-context level: cancels in the difference
    losses = offsets - 0.3 * np.log(t)[None, :]
    bumps = np.linspace(-0.1, 0.1, n_ctx)
    losses[:, 499] += bumps  # the 500th token (1-based) gets a per-context deviation with mean 0
    losses[:, 500] += 5.0  # the 501st token (a 0-based reading of "500") would be far off
    losses[:, 50] -= 5.0  # likewise the 51st
    res = icl_score(losses, n_boot=1000, seed=0)
    expected = -0.3 * (math.log(500) - math.log(50))
    assert res.score == pytest.approx(expected, abs=1e-12)
    assert res.per_context == pytest.approx((bumps + expected).tolist())
    assert res.mean_loss_early == pytest.approx(3.0 - 0.3 * math.log(50))
    assert res.ci_low < expected < res.ci_high and res.ci_high - res.ci_low < 0.1
    assert res.late == 500 and res.early == 50 and res.n_contexts == n_ctx
    # works on torch input and custom indices; rejects indices out of range
    assert icl_score(torch.tensor(losses), late=100, early=10).score == pytest.approx(-0.3 * math.log(10))
    with pytest.raises(ValueError, match="1-based"):
        icl_score(losses, late=513)
    # window: each token's loss replaced by the mean over t-w..t+w (1-based, inclusive)
    w = icl_score(losses, late=100, early=10, window=3, n_boot=0)
    expect_w = (losses[:, 96:103].mean(1) - losses[:, 6:13].mean(1)).mean()
    assert w.score == pytest.approx(expect_w) and w.window == 3
    with pytest.raises(ValueError, match="window"):
        icl_score(losses, late=100, early=3, window=3)
    nan_losses = losses.copy()
    nan_losses[3, 49] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        icl_score(nan_losses)


def test_bootstrap_interval_matches_normal_theory():
    rng = np.random.default_rng(0)
    diffs = rng.normal(-0.4, 0.5, size=400)
    losses = np.zeros((400, 512))
    losses[:, 499] = diffs
    res = icl_score(losses, n_boot=4000, seed=1)
    half = 1.96 * diffs.std() / math.sqrt(400)
    assert res.score == pytest.approx(diffs.mean())
    assert res.ci_low == pytest.approx(diffs.mean() - half, abs=0.01)
    assert res.ci_high == pytest.approx(diffs.mean() + half, abs=0.01)
    assert icl_score(losses, n_boot=4000, seed=1).ci_low == res.ci_low  # seeded


def test_loss_curve_derivative_per_log_index():
    t = np.arange(1, 513)
    losses = np.tile(3.0 - 0.25 * np.log(t), (5, 1))
    losses[:, 0] = np.nan  # no prediction for token 1 without a BOS
    curve = loss_curve(losses, n_bins=16)
    assert curve["mean_loss"][0] is None and curve["mean_loss"][9] == pytest.approx(3.0 - 0.25 * math.log(10))
    bins = curve["log_bins"]
    assert len(bins["centre"]) >= 10 and bins["centre"][0] >= 2
    assert bins["dloss_dlog_index"] == pytest.approx([-0.25] * len(bins["centre"]), abs=1e-9)
    assert bins["mean_loss"] == pytest.approx([3.0 - 0.25 * math.log(c) for c in bins["centre"]], abs=1e-9)


# ------------------------------------------------------------------ per-token losses from a model


@pytest.mark.parametrize("n_prefix", [1, 0])
def test_per_token_losses_equal_the_models_own_cross_entropy(n_prefix):
    model = tiny_llama()
    ids = torch.randint(2, VOCAB, (5, 30), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0 if n_prefix else ids[:, 0]
    got = per_token_losses(model, ids, n_prefix, batch_size=2, rows_per_chunk=7)
    assert got.shape == (5, 30 - n_prefix)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # nll[:, p] = loss of the token at position p+1
    if n_prefix:
        torch.testing.assert_close(got, nll, rtol=1e-4, atol=1e-5)
    else:
        assert torch.isnan(got[:, 0]).all()
        torch.testing.assert_close(got[:, 1:], nll, rtol=1e-4, atol=1e-5)


def test_model_with_known_per_position_loss_gives_known_score():
    """Uniform logits except a known per-position boost of the true next token: loss(t) is exact."""
    model = tiny_llama(hidden=VOCAB)
    n, late, early = 64, 60, 6
    ids = torch.randint(2, VOCAB, (6, n + 1), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 0
    boost = torch.linspace(0.0, 3.0, n)  # logit margin of the correct token at 1-based text token t

    class Body(torch.nn.Module):  # hidden row p = one-hot of the token at p + 1, scaled by boost[p]
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(VOCAB, VOCAB)  # only so HF finds the output embeddings

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            b, t = input_ids.shape
            nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)
            scale = torch.cat([boost, torch.zeros(t - n)])[None, :, None].expand(b, -1, 1)
            hidden = torch.zeros(b, t, VOCAB).scatter_(2, nxt[..., None], scale)
            return type("Out", (), {"last_hidden_state": hidden})()

    model.model = Body()  # base_model(model) is model.model
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.eye(VOCAB))
    losses = per_token_losses(model, ids, n_prefix=1)
    # loss at text token t = log(V - 1 + e^b) - b with b = boost of the position predicting it
    expected = torch.log(VOCAB - 1 + torch.exp(boost)) - boost
    torch.testing.assert_close(losses, expected.expand(6, -1), rtol=1e-5, atol=1e-6)
    res = icl_score(losses, late=late, early=early)
    assert res.score == pytest.approx(float(expected[late - 1] - expected[early - 1]), abs=1e-5)


def test_context_length_check():
    check_context_length(tiny_llama(max_positions=513), 513)
    with pytest.raises(ContextLengthError, match="maximum context of 256"):
        check_context_length(tiny_llama(max_positions=256), 513, name="tiny")


# ------------------------------------------------------------------ contexts and corpus


def test_build_contexts_prefix_windows_and_skips():
    docs = [
        Document("a", words(10, 0)),  # too short: skipped
        Document("b", words(300, 1)),  # three windows of 100 words, two taken (per_doc=2)
        Document("c", words(150, 2)),
    ]
    tok = word_tokenizer()
    ctx = build_contexts(tok, docs, n_contexts=3, n_tokens=100, per_doc=2, min_chars_per_token=2)
    assert ctx.n_prefix == 1 and ctx.input_ids.shape == (3, 101)
    assert ctx.doc_ids == ["b#0", "b#1", "c#0"]
    b_ids = tok(docs[1].text, add_special_tokens=False)["input_ids"]
    assert ctx.input_ids[1, 1:].tolist() == b_ids[100:200] and (ctx.input_ids[:, 0] == 0).all()
    assert special_prefix(word_tokenizer(bos=False)) == []
    with pytest.raises(CorpusError, match="only 3 contexts"):
        build_contexts(tok, docs, n_contexts=5, n_tokens=100, per_doc=2, min_chars_per_token=2)


def test_python_prose_and_default_corpus_order():
    src = (
        '"""Module doc."""\n# first comment\n# continued\nx = 1\n\n\n'
        'def f():\n    """Function doc."""\n    return 2  # trailing\n'
    )
    assert python_prose(src) == "Module doc.\n\nfirst comment continued\n\nFunction doc.\n\ntrailing"
    first = [d.doc_id for _, d in zip(range(3), iter_corpus("stdlib-docs", seed=0), strict=False)]
    again = [d.doc_id for _, d in zip(range(3), iter_corpus("stdlib-docs", seed=0), strict=False)]
    other = [d.doc_id for _, d in zip(range(3), iter_corpus("stdlib-docs", seed=1), strict=False)]
    assert first == again and first != other and all(i.startswith("stdlib-docs:") for i in first)
    with pytest.raises(CorpusError, match="unknown corpus"):
        next(iter_corpus("nope"))


# ------------------------------------------------------------------ CLI


def _app():
    import typer

    from conceptprobe.commands.induction_cmds import register

    app = typer.Typer()
    register(app)
    return app


def test_icl_score_cli_writes_results(tmp_path):
    import pandas as pd
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    model_dir, texts, out = tmp_path / "model", tmp_path / "texts", tmp_path / "icl"
    tiny_llama().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    texts.mkdir()
    for i in range(4):
        (texts / f"doc{i}.txt").write_text(words(130, i))
    args = [
        "icl-score",
        "-m",
        str(model_dir),
        "--text",
        str(texts),
        "-n",
        "6",
        "--n-tokens",
        "60",
        "--late",
        "50",
        "--early",
        "5",
        "--per-doc",
        "2",
        "--dtype",
        "float32",
        "--no-progress",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((out / "icl.json").read_text())
    tensors = load_file(out / "token_losses.safetensors")
    assert tensors["losses"].shape == (6, 60) and tensors["input_ids"].shape == (6, 61)
    assert data["score"] == pytest.approx(icl_score(tensors["losses"], late=50, early=5).score, abs=1e-6)
    assert data["ci_low"] <= data["score"] <= data["ci_high"]
    assert data["windowed"]["window"] == 4  # clipped from 10 so that token 5 - 4 >= 1
    assert data["doc_ids"][:2] == [f"file:{texts / 'doc0.txt'}#0", f"file:{texts / 'doc0.txt'}#1"]
    assert data["corpus"]["name"] == "text" and data["corpus"]["special_prefix"] == [0]
    assert data["model"]["dtype"] == "float32" and len(data["curve"]["mean_loss"]) == 60
    assert (out / "loss_curve.png").stat().st_size > 1000
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert metrics.loc[metrics.metric == "icl_score", "value"].item() == pytest.approx(data["score"])

    short_dir = tmp_path / "short"
    tiny_llama(max_positions=32).save_pretrained(short_dir)
    word_tokenizer().save_pretrained(short_dir)
    bad = CliRunner().invoke(
        _app(),
        [
            "icl-score",
            "-m",
            str(short_dir),
            "--text",
            str(texts),
            "-n",
            "2",
            "--n-tokens",
            "60",
            "--late",
            "50",
            "--early",
            "5",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert isinstance(bad.exception, ContextLengthError) and "maximum context of 32" in str(bad.exception)
