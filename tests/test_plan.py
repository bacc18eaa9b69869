"""Memory plans from configs alone: parameter counts, byte counts, the issue's three verdicts, quantization refusal."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from conceptprobe.models.plan import (
    GiB,
    PlanError,
    Planner,
    PlanRequest,
    Shape,
    ensure_fits,
    parse_gpus,
    parse_size,
    plan_memory,
    quantized_linear_bytes,
    resolve_config,
    shipped_configs,
)
from conceptprobe.models.quantize import (
    QuantizationUnavailable,
    build_quantization_config,
    missing_for_quantization,
)
from helpers import FAMILIES, make_model

KNOWN_PARAMS = {
    "google/gemma-2-2b": 2_614_341_888,
    "google/gemma-2-9b": 9_241_705_984,
    "google/gemma-2-27b": 27_227_128_320,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
}
LLAMA70_LINEAR = 80 * (8192 * (8192 + 1024 + 1024 + 8192) + 3 * 8192 * 28672)  # q,k,v,o + gate,up,down


@pytest.fixture(scope="module")
def llama70() -> Planner:
    return Planner.for_ref("meta-llama/Llama-3.1-70B")


@pytest.fixture(scope="module")
def gemma27() -> Planner:
    return Planner.for_ref("google/gemma-2-27b")


# ------------------------------------------------------------------------------------------ configs, counts


def test_shipped_configs_cover_paper_models_and_aliases():
    from conceptprobe.models.packaged import PACKAGED

    shipped = shipped_configs()
    assert set(KNOWN_PARAMS) <= set(shipped)
    assert set(PACKAGED) <= set(shipped)


@pytest.mark.parametrize("ref", sorted(KNOWN_PARAMS))
def test_parameter_counts_of_shipped_configs(ref):
    plan = plan_memory(ref, PlanRequest(), suggest=False)
    assert abs(plan.weights.n_params - KNOWN_PARAMS[ref]) / KNOWN_PARAMS[ref] < 0.01
    assert plan.weights.n_params == KNOWN_PARAMS[ref]  # exact, in fact
    assert plan.source.startswith("shipped config")
    assert plan.weights.param_bytes == 2 * KNOWN_PARAMS[ref]  # bfloat16


def test_refs_are_case_insensitive_and_aliases_resolve_offline():
    config, source = resolve_config("META-LLAMA/llama-3.1-8b")
    assert config.num_hidden_layers == 32 and "Llama-3.1-8B" in source
    # packaged aliases: the counts of the GGUF-loaded models (134.5M, 268M, 630M, 1.78B)
    for alias, expected in [
        ("smollm2-135m", 134_515_008),
        ("gemma3-270m", 268_098_176),
        ("qwen2.5-0.5b", 630e6),
        ("qwen2.5-1.5b", 1.78e9),
    ]:
        n = plan_memory(alias, PlanRequest(), suggest=False).weights.n_params
        assert abs(n - expected) / expected < 0.005, (alias, n)


def test_unknown_hub_id_offline_is_one_clear_error(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("we are offline")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(PlanError, match="not a shipped config.*hub did not serve it"):
        resolve_config("someone/unknown-model")


def test_local_folder_config(tmp_path):
    model = make_model("llama")
    model.config.save_pretrained(tmp_path)
    plan = plan_memory(str(tmp_path), PlanRequest(dtype="float32"), suggest=False)
    assert plan.weights.n_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_bytes_equal_real_tensors(family, dtype):
    model = make_model(family).to(dtype)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    name = str(dtype).removeprefix("torch.")
    plan = Planner(model.config).plan(PlanRequest(dtype=name), suggest=False)
    assert plan.weights.param_bytes == real
    assert plan.weights.n_params == sum(p.numel() for p in model.parameters())
    assert plan.weights.by_kind == {name: real}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_tiny_model_quantized_bytes(family):
    """4/8-bit: Linear layers of the decoder quantized, lm_head/embeddings/norms kept in the compute dtype."""
    model = make_model(family).to(torch.bfloat16)
    linears = {
        n: m
        for n, m in model.named_modules()
        if type(m) is torch.nn.Linear and n != "lm_head"  # lm_head is kept (tied or last module)
    }
    kept = sum(p.numel() * 2 for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in linears)
    for scheme in ("4bit", "8bit"):
        plan = Planner(model.config).plan(PlanRequest(dtype="bfloat16", quantize=scheme), suggest=False)
        quant = sum(quantized_linear_bytes(m.out_features, m.in_features, scheme) for m in linears.values())
        assert plan.weights.param_bytes == kept + quant, scheme
        assert plan.weights.n_quantized == sum(m.weight.numel() for m in linears.values())
        assert plan.weights.n_quantized_modules == len(linears)


def test_quantized_linear_bytes_formula():
    # 4096 x 4096 NF4, double quant: 8 MiB packed + 1 byte per 64 weights + fp32 per 256 blocks + tables
    n = 4096 * 4096
    blocks = n // 64
    assert quantized_linear_bytes(4096, 4096, "4bit") == n // 2 + blocks + 4 * (blocks // 256) + 1024 + 4 + 64
    assert quantized_linear_bytes(4096, 4096, "4bit", double_quant=False) == n // 2 + 4 * blocks + 64
    assert quantized_linear_bytes(4096, 1024, "8bit") == 4096 * 1024 + 4 * 4096
    # about 4.13 bits per weight with double quant, 4.5 without
    assert 4.12 < 8 * quantized_linear_bytes(4096, 4096, "4bit") / n < 4.14


# ------------------------------------------------------------------------------------------ the issue's commands


def _act_by_hand(batch, seq, d, heads, kv, hd, inter, dbytes, eager):
    t = batch * seq
    residual = 3 * t * d * dbytes
    kv_elems = 2 * t * kv * hd + (2 * t * heads * hd if eager and kv != heads else 0)
    scores = batch * heads * seq * seq * ((4 + dbytes) if eager else dbytes)
    attention = (2 * t * heads * hd + kv_elems) * dbytes + scores
    mlp = 3 * t * inter * dbytes
    return residual + max(attention, mlp) + batch * seq * seq * dbytes


def test_llama70b_4bit_fits_one_80gib(llama70):
    plan = llama70.plan(PlanRequest(quantize="4bit", gpus=tuple(parse_gpus("1x80GiB"))))
    w = plan.weights
    assert plan.fits and not plan.options
    assert w.n_quantized == LLAMA70_LINEAR
    # embeddings, lm_head and norms stay in bfloat16
    assert w.by_kind["bfloat16"] == 2 * (KNOWN_PARAMS["meta-llama/Llama-3.1-70B"] - LLAMA70_LINEAR)
    assert w.by_kind["nf4 weights (packed)"] == LLAMA70_LINEAR // 2
    assert 0.015 < w.by_kind["nf4 block statistics"] / LLAMA70_LINEAR < 0.0165  # ~1/64 byte per weight
    assert 39e9 < w.total < 40e9  # ~39.5 GB
    assert set(plan.device_map.values()) == {0}
    (gpu,) = plan.gpu_devices
    kv = 2 * 80 * 16 * 512 * 8 * 128 * 2
    assert plan.kv_cache == kv == gpu.kv_cache
    act = (
        _act_by_hand(16, 512, 8192, 64, 8, 128, 28672, 2, eager=False) + 8192 * 28672 * 2
    )  # + dequant scratch
    assert plan.layer_activations == act
    assert gpu.total == w.total + kv + act + plan.logits + GiB
    assert 40 * GiB < gpu.total < 45 * GiB and gpu.free > 35 * GiB
    assert plan.headline().startswith("FITS")


def test_llama70b_bf16_on_two_80gib(llama70):
    """141 GB of bf16 weights + KV cache + activations against 2 x 80 GiB (171.8 GB): it fits, ~10 GiB spare each."""
    plan = llama70.plan(PlanRequest(dtype="bfloat16", gpus=tuple(parse_gpus("2x80GiB"))))
    weights = 2 * KNOWN_PARAMS["meta-llama/Llama-3.1-70B"]
    assert plan.weights.param_bytes == weights  # 141.1 GB = 131.4 GiB
    kv = 2 * 80 * 16 * 512 * 8 * 128 * 2  # 2.7 GB
    act = _act_by_hand(16, 512, 8192, 64, 8, 128, 28672, 2, eager=False)  # 1.8 GB while one layer runs
    logits = 16 * 128256 * (4 + 2)
    by_hand = weights + kv + 2 * (act + GiB) + logits  # activations and runtime reserve on both GPUs
    assert 149e9 < by_hand < 150e9 < 160 * GiB
    assert plan.fits
    assert sum(d.total for d in plan.gpu_devices) == by_hand + plan.weights.buffer_bytes
    assert {v for v in plan.device_map.values()} == {0, 1}
    for gpu in plan.gpu_devices:
        assert len(gpu.layers) == 40  # balanced, as device_map="auto" would
        assert gpu.total <= 80 * GiB and gpu.free > 8 * GiB
    # decimal "80GB" GPUs (2 x 74.5 GiB) still hold it
    assert llama70.plan(PlanRequest(gpus=tuple(parse_gpus("2x80GB"))), suggest=False).fits
    # a single 80 GiB GPU cannot
    assert not llama70.plan(PlanRequest(gpus=(80 * GiB,)), suggest=False).fits


def test_gemma27b_bf16_on_24gib_does_not_fit_and_says_what_would(gemma27):
    plan = gemma27.plan(PlanRequest(dtype="bfloat16", gpus=tuple(parse_gpus("1x24GiB"))))
    assert not plan.fits
    assert plan.weights.total > 54e9  # 54.5 GB of bf16 weights against a 24 GiB card
    assert plan.offloaded > 30 * GiB  # device_map="auto" would push most of it to CPU/disk
    text = "\n".join(plan.explain())
    assert "DOES NOT FIT" in text and "54.5 GB" in text
    by_label = {o.request.quantize: o for o in plan.options if not o.label.startswith("CPU")}
    # keeping bf16 needs 3 cards (54.5 GB / ~21 GiB usable each), 8-bit 2, 4-bit fits the card you have
    assert len(by_label[None].request.gpus) == 3
    assert len(by_label["8bit"].request.gpus) == 2
    four = by_label["4bit"]
    assert len(four.request.gpus) == 1 and four.fits_given_gpus and four.peak_gpu <= 24 * GiB
    assert plan.recommendation() is four
    assert "--quantize 4bit" in text
    offload = [o for o in plan.options if o.label.startswith("CPU offload")]
    assert offload and offload[0].cpu_needed > 30 * GiB and "slow" in offload[0].note
    # every suggested configuration really fits when planned
    for opt in plan.options:
        if not opt.label.startswith("CPU"):
            assert gemma27.plan(opt.request, suggest=False).fits, opt.label


def test_smaller_batch_is_offered_when_only_activations_overflow(gemma27):
    four = PlanRequest(quantize="4bit", gpus=(20 * GiB,), batch_size=64, seq_len=1024)
    plan = gemma27.plan(four)
    assert not plan.fits
    best = plan.recommendation()
    assert (
        best.label.startswith("batch size")
        and best.request.batch_size < 64
        and best.request.quantize == "4bit"
    )


def test_gemma_sliding_window_caps_kv():
    shape = Shape.of(resolve_config("google/gemma-2-2b")[0])
    full = sum(shape.kv_bytes(i, 1, 4096, 2) for i in range(shape.n_layers))
    long = sum(shape.kv_bytes(i, 1, 8192, 2) for i in range(shape.n_layers))
    assert long == pytest.approx(1.5 * full)  # half the layers are sliding (4096 positions)


def test_cpu_only_plan_and_disk_spill():
    plan = plan_memory("google/gemma-2-2b", PlanRequest(cpu_memory=64 * GiB))
    assert plan.fits and set(plan.device_map.values()) == {"cpu"}
    small = plan_memory("google/gemma-2-2b", PlanRequest(cpu_memory=4 * GiB))
    assert not small.fits and "disk" in small.device_map.values()
    assert small.options and small.options[0].cpu_needed > 4 * GiB


def test_parse_sizes_and_gpus():
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("1.5 TiB") == int(1.5 * 1024 * GiB)
    assert parse_gpus("2x80GiB") == [80 * GiB] * 2
    assert parse_gpus("1x24GiB,2x48GiB") == [24 * GiB, 48 * GiB, 48 * GiB]
    assert parse_gpus(None) == [] and parse_gpus("0") == []
    with pytest.raises(PlanError, match="80GiB"):
        parse_gpus("two big ones")


def test_ensure_fits_refuses_with_the_explanation(tmp_path):
    model = make_model("llama")
    model.config.save_pretrained(tmp_path)
    with pytest.raises(PlanError, match="DOES NOT FIT.*CPU memory"):
        ensure_fits(str(tmp_path), "float32", max_memory={"cpu": 1000})
    assert ensure_fits(str(tmp_path), "float32", max_memory={"cpu": "8GiB"}).fits


# ------------------------------------------------------------------------------------------ quantization refusal


needs_no_bnb_gpu = pytest.mark.skipif(
    not missing_for_quantization(), reason="this machine can run bitsandbytes (CUDA + bitsandbytes)"
)


@needs_no_bnb_gpu
@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantization_refused_clearly_without_cuda_or_bitsandbytes(quantize):
    with pytest.raises(QuantizationUnavailable) as err:
        build_quantization_config(quantize, torch.bfloat16)
    message = str(err.value)
    assert "bitsandbytes and a CUDA GPU" in message and "fix:" in message
    if torch.version.cuda is None:
        assert "CPU-only" in message
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        assert "pip install bitsandbytes" in message


@needs_no_bnb_gpu
def test_load_refuses_quantization_before_loading_anything(tmp_path, monkeypatch):
    import transformers

    from conceptprobe.models.load import ModelLoadError, load_model

    def must_not_load(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", must_not_load)
    with pytest.raises(ModelLoadError, match="CUDA"):
        load_model(str(tmp_path), "bfloat16", quantize="4bit")
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        load_model(str(tmp_path), "bfloat16", quantize="3bit")


def test_quantization_config_fields(monkeypatch):
    import conceptprobe.models.quantize as q

    monkeypatch.setattr(q, "missing_for_quantization", lambda: [])
    four = build_quantization_config("nf4", torch.bfloat16)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    eight = build_quantization_config("int8")
    assert eight.load_in_8bit and not eight.load_in_4bit


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def plan_app():
    import typer

    from conceptprobe.commands import plan_cmds

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    plan_cmds.register(app)
    return app


@pytest.mark.parametrize(
    "args,verdict,code",
    [
        (["--model", "meta-llama/Llama-3.1-70B", "--quantize", "4bit", "--gpus", "1x80GiB"], "FITS", 0),
        (["--model", "meta-llama/Llama-3.1-70B", "--dtype", "bfloat16", "--gpus", "2x80GiB"], "FITS", 0),
        (["--model", "google/gemma-2-27b", "--dtype", "bfloat16", "--gpus", "1x24GiB"], "DOES NOT FIT", 1),
    ],
)
def test_cli_issue_commands(plan_app, args, verdict, code):
    result = CliRunner().invoke(plan_app, ["plan", *args, "--cpu-memory", "64GiB"], env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    assert verdict in result.output
    assert "Planned peak memory per device" in result.output and "cuda:0" in result.output
    if code:
        assert "smallest change that fits" in result.output and "--quantize 4bit" in result.output


def test_cli_json(plan_app):
    import json

    result = CliRunner().invoke(
        plan_app, ["plan", "-m", "google/gemma-2-2b", "--gpus", "1x24GiB", "--json", "--cpu-memory", "64GiB"]
    )
    data = json.loads(result.output)
    assert data["fits"] and data["n_params"] == KNOWN_PARAMS["google/gemma-2-2b"]
    assert data["devices"][0]["device"] == "cuda:0" and math.isclose(
        data["weight_bytes"], 2 * KNOWN_PARAMS["google/gemma-2-2b"], rel_tol=1e-6
    )


def test_load_model_check_memory(tmp_path, monkeypatch):
    import transformers

    from conceptprobe.models.load import load_model
    from helpers import make_tokenizer

    model = make_model("llama")
    model.save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    assert load_model(str(tmp_path), "float32", check_memory=True).info.n_params == model.num_parameters()

    def must_not_load(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    with pytest.raises(PlanError, match="DOES NOT FIT"):
        load_model(str(tmp_path), "float32", check_memory=True, max_memory={"cpu": 1000})
    with pytest.raises(PlanError, match="DOES NOT FIT"):
        load_model(str(tmp_path), "float32", check_memory=True, max_memory={"cuda:0": 1000, "cpu": 1000})
