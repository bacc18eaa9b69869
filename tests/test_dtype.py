"""dtype ``auto``: bfloat16 where the hardware computes it natively, float32 elsewhere; configs hold the choice."""

from __future__ import annotations

import pytest
import torch

import conceptprobe.config as config_module
from conceptprobe.config import RunConfig, choose_dtype


@pytest.mark.parametrize(("native", "want"), [(True, "bfloat16"), (False, "float32")])
def test_auto_follows_the_hardware(monkeypatch, native, want):
    from conceptprobe.experiments.heads import HeadsConfig
    from conceptprobe.models.load import resolve_dtype
    from conceptprobe.sweep.config import SweepConfig

    monkeypatch.setattr(config_module, "native_bf16", lambda: native)
    assert choose_dtype("auto") == want
    assert choose_dtype("float16") == "float16" and choose_dtype("float32") == "float32"
    run = RunConfig(model="smollm2-135m", task="pos")
    assert run.dtype == want and run.model_dump()["dtype"] == want
    assert RunConfig(model="smollm2-135m", task="pos", dtype="bfloat16").dtype == "bfloat16"
    assert HeadsConfig(model="smollm2-135m").dtype == want
    sweep = SweepConfig(name="s", models=[{"ref": "smollm2-135m", "dtype": "auto"}], tasks=["pos"])
    assert sweep.dtype == want and sweep.models[0].dtype == want
    assert resolve_dtype("auto") == getattr(torch, want)


def test_the_fingerprint_names_the_chosen_dtype(monkeypatch):
    """A run made under auto on a bf16 machine is not resumed as a float32 run on another machine."""
    monkeypatch.setattr(config_module, "native_bf16", lambda: True)
    on_bf16 = RunConfig(model="smollm2-135m", task="pos").fingerprint()
    monkeypatch.setattr(config_module, "native_bf16", lambda: False)
    on_avx2 = RunConfig(model="smollm2-135m", task="pos").fingerprint()
    assert on_bf16 != on_avx2
    assert on_avx2 == RunConfig(model="smollm2-135m", task="pos", dtype="float32").fingerprint()


def test_native_bf16_answers_without_error():
    assert isinstance(config_module.native_bf16(), bool)
