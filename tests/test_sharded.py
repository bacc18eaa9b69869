"""Sharded loading: layers split across CPU and disk offload (the CPU stand-in for several devices)
capture exactly what the unsharded model captures, with greedy decoding unchanged."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conceptprobe.generation import capture_and_generate, encode
from conceptprobe.hooks import ResidualCapture
from conceptprobe.models.load import load_model
from helpers import make_model, make_tokenizer

TEXTS = [
    "Input: the happy teacher painted\nOutput: teacher\nInput: she quickly ate\nOutput:",
    "Input: 10110 01101\nOutput:",
    "Input: under the bridge we sang loudly\nOutput: bridge\nInput: a cat\nOutput:",
]
OFFSETS = [0, -1]


def _save(tmp_path, family: str, layers: int = 4):
    model = make_model(family, layers=layers)
    tok = make_tokenizer(family.startswith("gemma"))
    folder = tmp_path / f"{family}-tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _capture(loaded, max_new_tokens: int = 3):
    batch = encode(loaded.tokenizer, TEXTS)
    with ResidualCapture(loaded.model) as cap:
        acts, texts = capture_and_generate(
            loaded.model, loaded.tokenizer, batch, cap, OFFSETS, max_new_tokens=max_new_tokens
        )
    return acts, texts


def _hooked(model) -> bool:
    return any(hasattr(m, "_hf_hook") for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cpu_and_disk_offload_capture_equals_unsharded(tmp_path, family):
    folder = _save(tmp_path, family)
    plain = load_model(str(folder), "float32")
    ref_acts, ref_texts = _capture(plain)

    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.layers.3": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    offload = tmp_path / "offload"
    sharded = load_model(str(folder), "float32", device_map=device_map, offload_folder=offload)
    assert _hooked(sharded.model), "accelerate hooks expected on a disk-offloaded model"
    assert set(sharded.model.hf_device_map.values()) == {"cpu", "disk"}
    assert sharded.info.extra["device_map"]["model.layers.1"] == "disk"
    # the disk-offloaded weights are really not in memory
    assert sharded.model.model.layers[1].mlp.up_proj.weight.device.type == "meta"

    acts, texts = _capture(sharded)
    assert acts.shape == ref_acts.shape
    torch.testing.assert_close(acts, ref_acts, rtol=0, atol=1e-6)
    assert texts == ref_texts


def test_auto_device_map_spills_to_disk(tmp_path):
    """device_map='auto' with a small CPU budget puts later layers on disk; captures still match."""
    folder = _save(tmp_path, "llama", layers=6)
    plain = load_model(str(folder), "float32")
    ref_acts, _ = _capture(plain, max_new_tokens=0)
    layer_bytes = sum(p.numel() * p.element_size() for p in plain.model.model.layers[0].parameters())
    embed_bytes = plain.model.model.embed_tokens.weight.numel() * 4
    budget = 2 * embed_bytes + 3 * layer_bytes  # embeddings, lm_head, a few layers
    sharded = load_model(
        str(folder), "float32", device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "off"
    )
    placed = set(sharded.model.hf_device_map.values())
    assert "disk" in placed and "cpu" in placed, sharded.model.hf_device_map
    acts, _ = _capture(sharded, max_new_tokens=0)
    torch.testing.assert_close(acts, ref_acts, rtol=0, atol=1e-6)


def test_explicit_device_map_dict_all_cpu(tmp_path):
    folder = _save(tmp_path, "llama", layers=3)
    plain = load_model(str(folder), "float32")
    ref_acts, ref_texts = _capture(plain)
    device_map = {"model": "cpu", "lm_head": "cpu"}
    loaded = load_model(str(folder), "float32", device_map=device_map)
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    acts, texts = _capture(loaded)
    assert torch.equal(acts, ref_acts)
    assert texts == ref_texts


def test_plan_device_map_loads(tmp_path):
    """The device map a plan makes (CPU budget too small: the rest on disk) is one from_pretrained takes."""
    from conceptprobe.models.plan import Planner, PlanRequest

    folder = _save(tmp_path, "llama", layers=6)
    plain = load_model(str(folder), "float32")
    ref_acts, _ = _capture(plain, max_new_tokens=0)
    planner = Planner.for_ref(str(folder))
    request = PlanRequest(dtype="float32", cpu_memory=1 << 40, batch_size=3, seq_len=32, cpu_reserve=0)
    full = planner.plan(request)
    assert full.fits and set(full.device_map.values()) == {"cpu"}
    small = planner.plan(replace(request, cpu_memory=full.cpu_needed - full.weights.total // 2))
    assert not small.fits and "disk" in small.device_map.values()
    loaded = load_model(str(folder), "float32", device_map=small.device_map, offload_folder=tmp_path / "off")
    acts, _ = _capture(loaded, max_new_tokens=0)
    torch.testing.assert_close(acts, ref_acts, rtol=0, atol=1e-6)
