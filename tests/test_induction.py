"""Induction-head scores: hand-built attention patterns, a hand-wired induction circuit, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conceptprobe.measures.induction import (
    attention_and_residuals,
    candidate_token_ids,
    copying_from_logits,
    copying_scores,
    induction_head_scores,
    kv_head,
    prefix_matching_scores,
    prefix_matching_targets,
    repeated_random_tokens,
)
from helpers import make_model

# ------------------------------------------------------------------ a hand-wired induction circuit
# Residual stream (d=100): E = one-hot token (dims 0-31), P = previous token (32-63), C = constant (64),
# OUT = prediction (65-96). Layer 0 head 1 (kv head 0) is a previous-token head built from RoPE's
# high-frequency pairs: it copies E of position i-1 into P of i. Layer 1 head 2 (kv head 1; a wrong
# GQA mapping head % n_kv would give kv head 0) is the induction head: query = E, key = P, matched in
# RoPE's near-zero-frequency pairs (rope_theta 1e12), and its OV copies the attended E into OUT, which
# the unembedding reads. Other weights are small noise; MLPs are switched off.
V, D, H, KV, DH = 32, 100, 4, 2, 64
E, P, C, OUT = 0, 32, 64, 65
PREV_HEAD, IND_HEAD = 1, 2


def induction_model(noise: float = 0.02, seed: int = 0, max_positions: int = 1024) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=KV,
        head_dim=DH,
        intermediate_size=16,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 1e12},
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, noise) if p.dim() > 1 else p.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[torch.arange(V), E + torch.arange(V)] = 1.0
        emb[:, C] = 1.0
        l0, l1 = model.model.layers
        l0.input_layernorm.weight.fill_(math.sqrt(2 / D))  # makes the normed residual equal the residual
        l1.input_layernorm.weight.fill_(math.sqrt(3 / D))
        for layer in (l0, l1):
            layer.mlp.down_proj.weight.zero_()
        theta = 1e12 ** (-torch.arange(DH // 2).double() * 2 / DH)
        a = math.sqrt(20 * math.sqrt(DH))  # each pair adds 20 * cos((i - j - 1) * theta) to the score
        att0 = l0.self_attn
        kv0 = kv_head(PREV_HEAD, H, KV) * DH
        for f in range(6):
            att0.q_proj.weight[PREV_HEAD * DH + f, C] = a
            att0.q_proj.weight[PREV_HEAD * DH + f + DH // 2, C] = 0.0
            att0.k_proj.weight[kv0 + f, C] = a * math.cos(theta[f])
            att0.k_proj.weight[kv0 + f + DH // 2, C] = a * math.sin(theta[f])
        att1 = l1.self_attn
        kv1 = kv_head(IND_HEAD, H, KV) * DH
        slots = list(range(12, 32)) + list(range(44, 64))  # RoPE pairs rotating < 0.004 rad over 100 tokens
        b = math.sqrt(16 * math.sqrt(DH))
        for t in range(V):
            att0.v_proj.weight[kv0 + t] = 0.0
            att0.v_proj.weight[kv0 + t, E + t] = 1.0
            att0.o_proj.weight[:, PREV_HEAD * DH + t] = 0.0
            att0.o_proj.weight[P + t, PREV_HEAD * DH + t] = 1.0
            s = slots[t]
            att1.q_proj.weight[IND_HEAD * DH + s] = 0.0
            att1.q_proj.weight[IND_HEAD * DH + s, E + t] = b
            att1.k_proj.weight[kv1 + s] = 0.0
            att1.k_proj.weight[kv1 + s, P + t] = b
            att1.v_proj.weight[kv1 + t] = 0.0
            att1.v_proj.weight[kv1 + t, E + t] = 1.0
            att1.o_proj.weight[:, IND_HEAD * DH + t] = 0.0
            att1.o_proj.weight[OUT + t, IND_HEAD * DH + t] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[torch.arange(V), OUT + torch.arange(V)] = 3.0
    return model


def word_tokenizer(n: int = V) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: 0 <bos> (prepended), 1 <unk>, 2..n-1 words w2..w{n-1}."""
    vocab = {"<bos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, n)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", unk_token="<unk>", pad_token="<bos>"
    )


# ------------------------------------------------------------------ pure functions


def test_prefix_matching_targets_small_case():
    ids = torch.tensor([[9, 1, 2, 3, 1, 2, 3, 1]])
    targets, queries = prefix_matching_targets(ids, first_query=4)
    assert queries[0].tolist() == [False] * 4 + [True] * 4
    got = {q: targets[0, q].nonzero().flatten().tolist() for q in range(4, 8)}
    # token at q follows earlier copies at ...; the targets are the positions right after those copies
    assert got == {4: [2], 5: [3], 6: [4], 7: [2, 5]}


def _expected_pattern_score(pattern: np.ndarray, ids: list[int], first_query: int) -> float:
    """Reference: loop over queries, sum attention on positions after earlier copies of the query token."""
    vals = []
    for q in range(first_query, len(ids)):
        tgt = [j + 1 for j in range(q) if ids[j] == ids[q] and j + 1 <= q]
        if tgt:
            vals.append(sum(pattern[q, k] for k in tgt))
    return float(np.mean(vals))


def test_prefix_matching_on_hand_built_attention():
    seq = [5, 7, 3, 8, 6]
    ids = [0] + seq * 3  # BOS then 3 repeats
    t, first_query = len(ids), 1 + len(seq)
    induction = np.zeros((t, t))
    previous = np.zeros((t, t))
    uniform = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    half = np.zeros((t, t))
    for q in range(t):
        previous[q, max(q - 1, 0)] = 1.0
        tgt = [j + 1 for j in range(q) if ids[j] == ids[q]]
        if tgt:
            induction[q, tgt] = 1.0 / len(tgt)
            half[q, tgt[0]] = 0.5  # half on the first earlier copy's successor, half on BOS
            half[q, 0] = 0.5
        else:
            induction[q, 0] = half[q, 0] = 1.0
    attn = torch.tensor(np.stack([induction, previous, uniform, half]))[None].float()  # [1, 4, T, T]
    ids_t = torch.tensor([ids])
    scores = prefix_matching_scores(attn, ids_t, first_query)
    # exact values, independently of the implementation's masks
    expected_uniform = np.mean([sum(1 for j in range(q) if ids[j] == ids[q]) / (q + 1) for q in range(6, t)])
    assert scores.tolist() == pytest.approx([1.0, 0.0, expected_uniform, 0.5], abs=1e-6)
    for k, pattern in enumerate((induction, previous, uniform, half)):
        assert scores[k].item() == pytest.approx(_expected_pattern_score(pattern, ids, first_query), abs=1e-6)
    # a [layers, batch, heads, T, T] stack gives one row per layer
    stacked = prefix_matching_scores(torch.stack([attn, attn.flip(1)]), ids_t, first_query)
    assert stacked.shape == (2, 4)
    assert stacked[1].tolist() == pytest.approx(scores.flip(0).tolist(), abs=1e-6)


def test_copying_from_logits_values():
    logits = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0]]
    )
    got = copying_from_logits(logits, torch.tensor([0, 1, 2, 0]))
    assert got.tolist() == pytest.approx([1.0, -1 / 3, 0.5, 0.0])
    # scale-invariant (why norms only matter through their gains) and shift-invariant
    assert copying_from_logits(5 * logits + 2, torch.tensor([0, 1, 2, 0])).tolist() == pytest.approx(
        got.tolist()
    )


def test_repeated_random_tokens_and_candidates():
    ids = repeated_random_tokens(list(range(10, 60)), n_seqs=3, seq_len=25, n_repeats=4, prefix=[1], seed=3)
    assert ids.shape == (3, 101)
    assert (ids[:, 0] == 1).all()
    for row in ids:
        first = row[1:26]
        assert len(set(first.tolist())) == 25 and all(10 <= x < 60 for x in first.tolist())
        assert torch.equal(row[1:], first.repeat(4))
    assert not torch.equal(ids, repeated_random_tokens(list(range(10, 60)), 3, 25, 4, [1], seed=4))

    tok = word_tokenizer(120)
    # word i appears 200 - i times: w2 most frequent ... w109 least; w110..w119 never
    text = " ".join(f"w{i} " * (200 - i) for i in range(2, 110))
    cands = candidate_token_ids(tok, [text], drop_frac=0.04)
    seen = list(range(2, 110))  # 108 seen tokens, ceil(0.04 * 108) = 5 dropped at each end
    assert cands.tolist() == seen[5:-5]
    fallback = candidate_token_ids(tok, None)  # no text: ids without specials, 4% trimmed each end
    assert 0 not in fallback and 1 not in fallback and fallback[0] == 2 + math.ceil(0.04 * 118)


# ------------------------------------------------------------------ the hand-wired model


def test_hand_wired_induction_head_scores_highest():
    model = induction_model()
    scores = induction_head_scores(model, list(range(1, V)), prefix=[0], n_seqs=10, seq_len=25, n_repeats=4)
    pm, cp = scores.prefix_matching, scores.copying
    assert pm.shape == (2, H) and cp is not None
    assert divmod(int(pm.argmax()), H) == (1, IND_HEAD)
    assert pm[1, IND_HEAD] > 0.95
    others = pm.clone()
    others[1, IND_HEAD] = 0
    assert others.max() < 0.1  # uniform-ish heads ~0.03, the previous-token head ~0
    assert pm[0, PREV_HEAD] < 0.01
    assert divmod(int(cp.argmax()), H) == (1, IND_HEAD)
    assert cp[1, IND_HEAD] > 0.95 and cp.flatten().sort().values[-2] < 0.2
    assert [(r["layer"], r["head"]) for r in scores.heads_above(0.4)] == [(1, IND_HEAD)]
    assert model.config._attn_implementation != "eager"  # restored after scoring


def test_previous_token_head_and_vocab_copying():
    model = induction_model()
    ids = repeated_random_tokens(list(range(1, V)), n_seqs=2, seq_len=25, n_repeats=4, prefix=[0], seed=1)
    attn, residuals = attention_and_residuals(model, ids)
    assert attn.shape == (2, 2, H, 101, 101)
    assert attn[0, :, PREV_HEAD].diagonal(offset=-1, dim1=-2, dim2=-1).mean() > 0.99
    vocab = copying_scores(model, ids, residuals, range(1, 26), candidates="vocab")
    assert vocab[1, IND_HEAD] > 0.95 and divmod(int(vocab.argmax()), H) == (1, IND_HEAD)


# ------------------------------------------------------------------ CLI


def test_heads_cli(tmp_path):
    import pandas as pd
    import typer
    from typer.testing import CliRunner

    from conceptprobe.commands.induction_cmds import register

    model_dir = tmp_path / "model"
    induction_model().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "freq.txt"
    text.write_text(" ".join(f"w{i % 30 + 2}" for i in range(300)))
    app = typer.Typer()
    register(app)
    out = tmp_path / "heads"
    result = CliRunner().invoke(
        app, ["heads", "--model", str(model_dir), "--text", str(text), "--n-seqs", "4", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((out / "heads.json").read_text())
    assert [(r["layer"], r["head"]) for r in data["heads_above_threshold"]] == [(1, IND_HEAD)]
    assert data["top_heads"][0]["copying"] > 0.95
    assert data["settings"]["prefix"] == [0] and data["n_layers"] == 2 and data["n_heads"] == H
    assert (out / "prefix_matching.png").stat().st_size > 1000 and (out / "copying.png").is_file()
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert len(metrics) == 2 * 3 * H
    assert set(metrics["metric"]) == {"prefix_matching", "copying", "copying_in_context"}
    assert [(r["block"], r["head"]) for r in data["induction_heads"]] == [(1, IND_HEAD)]
    assert (
        data["induction_heads"][0]["label"] == f"L1H{IND_HEAD}"
        and data["induction_heads"][0]["writes_layer"] == 2
    )
    row = metrics[
        (metrics.metric == "prefix_matching") & (metrics.layer == 1) & (metrics["head"] == IND_HEAD)
    ]
    assert float(row["value"].iloc[0]) > 0.95


# ---------------------------------------------------------------- Olsson's OV copying score


def _brute_force_ov_score(model, layer: int, head: int) -> float:
    """Eigenvalues of the full vocab x vocab OV circuit W_U D_f D_post W_O^h W_V^h D_in W_E^T."""
    from conceptprobe.measures.induction import _normed_attention_output, head_shape, kv_head
    from conceptprobe.models.layers import decoder_layers, final_norm

    n_heads, n_kv, dh = head_shape(model)
    blk = decoder_layers(model)[layer]
    d = model.config.hidden_size
    ones = torch.ones(1, d)
    gain_in = blk.input_layernorm(ones)[0].double()
    gain_f = final_norm(model)(ones)[0].double()
    gain_post = (
        blk.post_attention_layernorm(ones)[0].double() if _normed_attention_output(blk) else torch.ones(d)
    )
    w_e = model.get_input_embeddings().weight.double()
    w_u = model.get_output_embeddings().weight.double()
    w_v = blk.self_attn.v_proj.weight.double().view(n_kv, dh, d)[kv_head(head, n_heads, n_kv)]
    w_o = blk.self_attn.o_proj.weight.double().view(d, n_heads, dh)[:, head]
    m = w_u @ torch.diag(gain_f * gain_post.double()) @ w_o @ w_v @ torch.diag(gain_in) @ w_e.T
    lam = torch.linalg.eigvals(m.detach())
    return float(lam.real.sum() / lam.abs().sum())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_ov_copying_equals_the_full_vocabulary_eigenvalues(family):
    from conceptprobe.measures.induction import ov_copying_scores

    model = make_model(family, vocab_size=120, layers=2)
    with torch.no_grad():  # non-trivial norm gains, so folding them in is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    scores = ov_copying_scores(model)
    assert scores.shape == (2, 4)
    for layer, head in ((0, 0), (1, 3)):
        assert scores[layer, head].item() == pytest.approx(
            _brute_force_ov_score(model, layer, head), abs=1e-6
        )


def test_ov_copying_is_plus_one_for_a_copying_head_and_minus_one_for_an_anti_copying_head():
    from conceptprobe.measures.induction import head_shape, ov_copying_scores

    model = make_model("llama", vocab_size=120, layers=1)
    n_heads, n_kv, dh = head_shape(model)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)  # W_U = W_E: G is positive semi-definite
        w_v = attn.v_proj.weight.view(n_kv, dh, -1)
        w_o = attn.o_proj.weight.view(-1, n_heads, dh)
        w_o[:, 0] = w_v[0].T  # head 0 reads kv head 0: W_O = W_V^T -> a PSD circuit
        w_o[:, 1] = -w_v[0].T  # head 1 too, negated
    scores = ov_copying_scores(model)
    assert scores[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert scores[0, 1].item() == pytest.approx(-1.0, abs=1e-6)
    assert -1 < scores[0, 2].item() < 1
