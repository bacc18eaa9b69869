"""Captured vectors equal what the model computes (output_hidden_states), for every supported family."""

from __future__ import annotations

import pytest
import torch

from conceptprobe.generation import capture_and_generate, encode, position_ids
from conceptprobe.hooks import ResidualCapture, resolve_layers
from conceptprobe.models.layers import final_norm
from helpers import FAMILIES, make_model, make_tokenizer

TEXTS = [
    "Input: the happy teacher painted\nOutput: teacher\nInput: she quickly ate\nOutput:",
    "Input: 10110 01101\nOutput:",
    "Input: under the bridge we sang loudly\nOutput: bridge\nInput: a cat\nOutput:",
]


def reference_hidden_states(model, batch):
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids(batch.attention_mask),
            output_hidden_states=True,
        )
    return out.hidden_states


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("add_bos", [False, True])
def test_capture_equals_output_hidden_states(family, add_bos):
    model = make_model(family)
    tok = make_tokenizer(add_bos)
    batch = encode(tok, TEXTS)
    assert batch.attention_mask[:, 0].min() == 0, "the batch must contain left padding"
    offsets = [0, -1, -3]
    with ResidualCapture(model) as cap:
        acts, _ = capture_and_generate(model, tok, batch, cap, offsets, max_new_tokens=0)
    hs = reference_hidden_states(model, batch)
    n_layers = len(hs) - 1
    assert acts.shape == (len(TEXTS), n_layers + 1, len(offsets), model.config.hidden_size)
    last = batch.last_index
    for b in range(len(TEXTS)):
        for j, off in enumerate(offsets):
            pos = int(last[b]) + off
            for layer in range(n_layers):
                assert torch.equal(acts[b, layer, j], hs[layer][b, pos]), (family, b, layer, off)
            # HF's last entry is after the final norm: compare like with like
            normed = final_norm(model)(acts[b, n_layers, j].unsqueeze(0)).squeeze(0)
            torch.testing.assert_close(normed, hs[n_layers][b, pos], rtol=0, atol=1e-6)
            assert not torch.equal(acts[b, n_layers, j], hs[n_layers][b, pos])


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_invariance(family):
    """A prompt alone or inside a left-padded batch gives the same vectors (1e-5, fp32)."""
    model = make_model(family)
    tok = make_tokenizer(family.startswith("gemma"))
    with ResidualCapture(model) as cap:
        together, texts_together = capture_and_generate(model, tok, encode(tok, TEXTS), cap, [0, -2], 4)
        for i, text in enumerate(TEXTS):
            alone, texts_alone = capture_and_generate(model, tok, encode(tok, [text]), cap, [0, -2], 4)
            torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-5)
            assert texts_alone[0] == texts_together[i]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_selected_layers_and_early_stop(family):
    model = make_model(family, layers=4)
    tok = make_tokenizer()
    batch = encode(tok, TEXTS)
    with ResidualCapture(model) as cap:
        full, _ = capture_and_generate(model, tok, batch, cap, [0], 0)
    calls = []
    handle = model.model.layers[3].register_forward_hook(lambda *a: calls.append(1))
    with ResidualCapture(model, layers=[1, -3]) as cap:
        part, _ = capture_and_generate(model, tok, batch, cap, [0], 0)
    handle.remove()
    assert calls == [], "the forward pass must stop after the last needed layer"
    assert torch.equal(part[:, 0], full[:, 1]) and torch.equal(part[:, 1], full[:, 2])


def test_greedy_generation_matches_hf_generate():
    model = make_model("llama")
    tok = make_tokenizer()
    batch = encode(tok, TEXTS)
    _, ours = capture_and_generate(model, tok, batch, None, [0], max_new_tokens=6, stop="")
    with torch.no_grad():
        ref = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    expected = tok.batch_decode(ref[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert ours == expected


def test_resolve_layers():
    assert resolve_layers(4, "all") == [0, 1, 2, 3, 4]
    assert resolve_layers(4, [-1, 0]) == [0, 4]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers(4, [5])
    with pytest.raises(ValueError, match="duplicates"):
        resolve_layers(4, [1, -4])
