"""Answers decoded in wide batches (merged KV caches) equal greedy decoding of each prompt alone."""

from __future__ import annotations

import pytest
import torch

import conceptprobe.generation as generation
from conceptprobe.batching import AUTO_MAX_TOKENS, AUTO_MIN_TOKENS, batch_budget, plan_batches
from conceptprobe.generation import capture_and_generate, capture_and_generate_batches, encode, kv_bytes
from conceptprobe.hooks import ResidualCapture
from helpers import FAMILIES, make_model, make_tokenizer

# lengths from a few tokens to well past the tiny Gemma models' 16-token sliding window
PROMPTS = [
    "Input: cat\nOutput:",
    "Input: 10110 01101\nOutput:",
    "Input: the happy teacher painted\nOutput: teacher\nInput: she quickly ate\nOutput:",
    "Input: a\nOutput:",
    "Input: under the bridge we sang loudly\nOutput: bridge\nInput: a cat sat on the mat\nOutput:",
    "Input: 1 0\nOutput: 1\nInput: 0 0\nOutput:",
    "Input: red green blue\nOutput: red\nInput: one two three four five six seven\nOutput:",
    "Input: x\nOutput: x\nInput: y\nOutput:",
]


def _alone(model, tok, stop: str, new: int):
    with ResidualCapture(model) as cap:
        got = [
            capture_and_generate(model, tok, encode(tok, [p]), cap, [0, -1], new, stop=stop) for p in PROMPTS
        ]
    return torch.cat([a for a, _ in got]), [t[0] for _, t in got]


def _wide(model, tok, stop: str, new: int, decode_bytes: int | None, max_tokens: int = 60):
    lengths = [len(ids) for ids in tok(PROMPTS)["input_ids"]]
    batches = plan_batches(lengths, 3, max_tokens, extra=new)
    assert len(batches) >= 3  # several prefill batches of different padded lengths get merged
    with ResidualCapture(model) as cap:
        done = capture_and_generate_batches(
            model,
            tok,
            [encode(tok, [PROMPTS[i] for i in b]) for b in batches],
            cap,
            [0, -1],
            new,
            stop=stop,
            decode_bytes=decode_bytes,
        )
    acts = torch.empty(len(PROMPTS), *done[0][0].shape[1:])
    texts = [""] * len(PROMPTS)
    for idx, (a, t) in zip(batches, done, strict=True):
        for j, i in enumerate(idx):
            acts[i], texts[i] = a[j], t[j]
    return acts, texts


@pytest.fixture
def decode_rows(monkeypatch):
    """The row count of every decoding batch."""
    rows: list[int] = []
    real = generation.decode

    def spy(model, tokenizer, state, *args, **kwargs):
        rows.append(state.rows)
        return real(model, tokenizer, state, *args, **kwargs)

    monkeypatch.setattr(generation, "decode", spy)
    return rows


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stop", ["", "\n"])
def test_wide_decoding_equals_one_prompt_at_a_time(family, stop, decode_rows):
    model = make_model(family)
    tok = make_tokenizer(family.startswith("gemma"))
    ref_acts, ref_texts = _alone(model, tok, stop, 6)
    decode_rows.clear()
    acts, texts = _wide(model, tok, stop, 6, decode_bytes=None)
    assert decode_rows == [len(PROMPTS)], "all prefill batches decode as one batch"
    assert texts == ref_texts
    assert any(ref_texts)  # the comparison is not between empty strings
    torch.testing.assert_close(acts, ref_acts, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_decode_budget_splits_decoding_batches(family, decode_rows):
    model = make_model(family)
    tok = make_tokenizer(family.startswith("gemma"))
    _, ref_texts = _alone(model, tok, "", 5)
    with ResidualCapture(model) as cap:
        _, state = generation.prefill(model, encode(tok, PROMPTS[:3]), cap, [0])
    budget = kv_bytes(state.cache)  # about one prefill batch's cache
    assert budget > 0
    decode_rows.clear()
    _, texts = _wide(model, tok, "", 5, decode_bytes=budget)
    assert len(decode_rows) > 1 and sum(decode_rows) == len(PROMPTS)
    assert texts == ref_texts


def test_unmergeable_caches_decode_batch_by_batch(monkeypatch, decode_rows):
    model = make_model("gemma3")
    tok = make_tokenizer(True)
    _, ref_texts = _alone(model, tok, "", 5)
    monkeypatch.setattr(generation, "_mergeable", lambda cache: False)
    decode_rows.clear()
    _, texts = _wide(model, tok, "", 5, decode_bytes=None)
    assert len(decode_rows) >= 3 and sum(decode_rows) == len(PROMPTS)
    assert texts == ref_texts


def test_zero_new_tokens_decodes_nothing(decode_rows):
    model = make_model("llama")
    tok = make_tokenizer()
    acts, texts = _wide(model, tok, "\n", 0, decode_bytes=None)
    assert decode_rows == [] and texts == [""] * len(PROMPTS)
    ref, _ = _alone(model, tok, "\n", 0)
    torch.testing.assert_close(acts, ref, rtol=0, atol=1e-5)


def test_batch_budget_auto_and_explicit():
    model = make_model("qwen2")
    auto = batch_budget(model, "auto")
    assert AUTO_MIN_TOKENS <= auto.max_batch_tokens <= AUTO_MAX_TOKENS
    assert auto.decode_bytes and auto.available_bytes and auto.bytes_per_token
    assert auto.rule.startswith("auto:") and "per prompt token" in auto.rule
    assert batch_budget(model, 300).max_batch_tokens == 300
    assert batch_budget(model, None).max_batch_tokens is None


def test_bytes_per_token_follows_the_model_shape():
    from conceptprobe.batching import prefill_bytes_per_token

    small, deep = make_model("llama", layers=2), make_model("llama", layers=6)
    assert prefill_bytes_per_token(deep.config, 4) > prefill_bytes_per_token(small.config, 4)
    assert prefill_bytes_per_token(small.config, 4) > prefill_bytes_per_token(small.config, 2)
