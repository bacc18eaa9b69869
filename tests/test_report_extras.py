"""The report's extra sections: ICL score / induction heads / token-loss PCA and the causal tests.

The result folders are real: ``icl-score``, ``heads`` and ``token-loss-pca`` run through their CLI on two tiny
word-level Llamas; ``run_patching`` (two models at the peak layer, one at two layers) and ``run_finetune``
run on tiny random models. The checks compare every number the HTML shows with the files it came from.
"""

from __future__ import annotations

import atexit
import base64
import io
import json
import re
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from rich.console import Console
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from conceptprobe.report.collect import ReportError, find_run_folders
from helpers import HtmlTables, make_model, make_tokenizer

VOCAB = 40
ICL_MODELS = ("tiny-a", "tiny-b")


def _word_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<bos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", unk_token="<unk>", pad_token="<bos>"
    )


def _cli(*args: str) -> None:
    from conceptprobe.commands.induction_cmds import register

    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)


def _loaded(family: str, ref: str, layers: int):
    from conceptprobe.models import LoadedModel, ModelInfo

    model = make_model(family, layers=layers)
    info = ModelInfo(
        ref=ref, source="local", family=family, architecture=type(model).__name__, n_params=1000 * layers,
        n_layers=layers, hidden_size=32, dtype="float32",
    )  # fmt: skip
    return LoadedModel(model, make_tokenizer(), info)


@cache
def results_tree() -> Path:
    """``<tmp>/results/{icl,heads,token-loss-pca,causal}/...`` written by the package's own writers."""
    from conceptprobe.interventions.finetune import FinetuneConfig, run_finetune
    from conceptprobe.interventions.patching import PatchConfig, run_patching

    root = Path(tempfile.mkdtemp(prefix="cp-report-extras-"))
    atexit.register(shutil.rmtree, root, True)
    res = root / "results"
    texts = root / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        (texts / f"doc{i}.txt").write_text(" ".join(f"w{j}" for j in rng.integers(2, VOCAB, size=130)))
    for seed, name in enumerate(ICL_MODELS):
        model_dir = root / "models" / name
        _word_llama(seed).save_pretrained(model_dir)
        _word_tokenizer().save_pretrained(model_dir)
        _cli(
            "icl-score", "-m", str(model_dir), "--text", str(texts), "-n", "6", "--n-tokens", "60", "--late",
            "50", "--early", "5", "--per-doc", "2", "--dtype", "float32", "--n-boot", "200", "--no-progress",
            "--out", str(res / "icl" / name),
        )  # fmt: skip
        _cli(
            "heads", "--model", str(model_dir), "--text", str(texts / "doc0.txt"), "--n-seqs", "3",
            "--seq-len", "8", "--threshold", "0.05", "--out", str(res / "heads" / name),
        )  # fmt: skip
    _cli("token-loss-pca", *(str(res / "icl" / n) for n in ICL_MODELS), "--out", str(res / "token-loss-pca"))
    quiet = Console(file=io.StringIO())
    causal = res / "causal"
    for family, layers in (("llama", 3), ("qwen2", 4)):
        cfg = PatchConfig(model="x", task="bitwise", shots=1, n=2, seeds=2, n_mean=3, mode="replace",
                          dtype="float32")  # fmt: skip
        run_patching(cfg, causal / f"tiny-{family}_patch", loaded=_loaded(family, f"tiny-{family}", layers),
                     progress=False, console=quiet)  # fmt: skip
    cfg = PatchConfig(model="x", task="bitwise", shots=1, n=2, seeds=2, n_mean=3, layers=[1, 3], mode="add",
                      dtype="float32")  # fmt: skip
    run_patching(cfg, causal / "tiny-llama_patch-layers", loaded=_loaded("llama", "tiny-llama", 3),
                 progress=False, console=quiet)  # fmt: skip
    cfg = FinetuneConfig(model="x", task="bitwise", shots=1, n=5, steps=2, batch_size=4, lr=1e-2, layers="first:2",
                         compare=["last:2"], dtype="float32", eval_batch_size=32)  # fmt: skip
    run_finetune(cfg, causal / "tiny-llama_finetune", loaded=_loaded("llama", "tiny-llama", 4), progress=False,
                 console=quiet)  # fmt: skip
    return res


@cache
def built() -> Path:
    from conceptprobe.report.render import build_report

    res = results_tree()
    out = res.parent / "report" / "report.html"
    build_report([res / "icl", res / "heads", res / "token-loss-pca", res / "causal"], out, cache=None)
    return out


def parse(text: str) -> HtmlTables:
    return HtmlTables.parse(text)


def _v(cell: tuple[str, dict], key: str = "data-value") -> float:
    return float(cell[1][key])


# ------------------------------------------------------------------------------------------------------------


def test_icl_and_heads_table_equals_the_files():
    page = parse(built().read_text())
    (summary,) = page.of("icl-summary")
    rows = {r["_attrs"]["data-model"]: r for r in summary["rows"]}
    assert list(rows) == list(ICL_MODELS)
    res = results_tree()
    for name in ICL_MODELS:
        icl = json.loads((res / "icl" / name / "icl.json").read_text())
        heads = json.loads((res / "heads" / name / "heads.json").read_text())
        metrics = pd.read_parquet(res / "icl" / name / "metrics.parquet")
        row = rows[name]
        assert (
            _v(row["icl_score"]) == icl["score"] == metrics.loc[metrics.metric == "icl_score", "value"].item()
        )
        assert (
            _v(row["icl_score"], "data-lo") == icl["ci_low"]
            and _v(row["icl_score"], "data-hi") == icl["ci_high"]
        )
        assert row["icl_score"][0] == f"{icl['score']:+.3f} [{icl['ci_low']:+.3f}, {icl['ci_high']:+.3f}]"
        w = icl["windowed"]
        assert _v(row["icl_window"]) == w["score"] and _v(row["icl_window"], "data-lo") == w["ci_low"]
        assert (
            _v(row["loss_early"]) == icl["mean_loss_early"] and _v(row["loss_late"]) == icl["mean_loss_late"]
        )
        assert _v(row["n_contexts"]) == icl["n_contexts"] == 6
        assert row["shape"][0] == f"{heads['n_layers']} × {heads['n_heads']}" == "2 × 4"
        assert _v(row["n_above"]) == len(heads["heads_above_threshold"])
        assert _v(row["n_above"], "data-threshold") == heads["settings"]["threshold"] == 0.05
    text = built().read_text()
    assert "windowed ±4 [95% CI]" in text and "loss @ token 5<" in text and "loss @ token 50<" in text

    (top,) = page.of("top-heads")
    for k, row in enumerate(top["rows"]):
        for i, name in enumerate(ICL_MODELS):
            want = json.loads((res / "heads" / name / "heads.json").read_text())["top_heads"][k]
            cell = row[f"m{i}"]
            assert cell[1]["data-model"] == name
            assert _v(cell) == want["prefix_matching"] and _v(cell, "data-copying") == want["copying"]
            assert (int(cell[1]["data-layer"]), int(cell[1]["data-head"])) == (want["layer"], want["head"])
            assert cell[0].startswith(f"L{want['layer']}H{want['head']} · {want['prefix_matching']:.3f}")
    assert len(top["rows"]) == 5

    (pca,) = page.of("token-loss-pca")
    data = json.loads((res / "token-loss-pca" / "token_loss_pca.json").read_text())
    assert data["labels"] == [str(res.parent / "models" / n) for n in ICL_MODELS]  # refs: local folders
    assert [r["label"][0] for r in pca["rows"]] == list(ICL_MODELS)  # shown as the ICL rows name them
    for r, xy, loss in zip(pca["rows"], data["coords"], data["mean_loss"], strict=True):
        assert [_v(r[f"pc{j + 1}"]) for j in range(len(xy))] == xy and _v(r["mean_loss"]) == loss


def test_patching_tables_equal_metrics_and_the_seed_spread():
    page = parse(built().read_text())
    tables = page.of("patch")
    assert sorted(t["attrs"]["data-folder"] for t in tables) == [
        "tiny-llama_patch", "tiny-llama_patch-layers", "tiny-qwen2_patch",
    ]  # fmt: skip
    checked = 0
    for t in tables:
        folder = results_tree() / "causal" / t["attrs"]["data-folder"]
        m = pd.read_parquet(folder / "metrics.parquet")
        per_seed = pd.read_parquet(folder / "per_seed.parquet")
        run = json.loads((folder / "run.json").read_text())
        concepts = [c for c in run["task"]["concepts"] if c != "null"] + ["all"]
        layers = run["layers"]
        assert t["attrs"]["data-mode"] == run["config"]["mode"]
        want_rows = 1 + len(layers) * 4  # baseline, then positive/negative/cross and "follows B" per layer
        assert len(t["rows"]) == want_rows
        for row in t["rows"]:
            ra = row["_attrs"]
            metric, cond = ra["data-metric"], ra["data-condition"]
            layer = int(ra["data-layer"]) if ra["data-layer"] else None
            assert [k for k in row if k not in ("_attrs", "row")] == concepts
            for c in concepts:
                sel = m[(m.metric == metric) & (m.condition == cond) & (m.concept == c)]
                sel = sel[sel.layer.isna()] if layer is None else sel[sel.layer == layer]
                std = m[(m.metric == f"{metric}_std") & (m.condition == cond) & (m.concept == c)]
                std = std[std.layer.isna()] if layer is None else std[std.layer == layer]
                cell = row[c]
                assert _v(cell) == sel["value"].item() and _v(cell, "data-std") == std["value"].item()
                # and it is the mean ± sample std over the evaluation seeds of per_seed.parquet
                ps = per_seed[
                    (per_seed.metric == metric) & (per_seed.condition == cond) & (per_seed.concept == c)
                ]
                ps = ps[ps.layer.isna()] if layer is None else ps[ps.layer == layer]
                assert len(ps) == 2
                assert _v(cell) == pytest.approx(ps["value"].mean(), abs=1e-12)
                assert _v(cell, "data-std") == pytest.approx(ps["value"].std(ddof=1), abs=1e-12)
                sign = "+" if metric != "patch_accuracy" else ""
                assert cell[0] == f"{sel['value'].item():{sign}.2f} ± {std['value'].item():.2f}"
                checked += 1
    assert checked == 7 * (1 + 4) * 2 + 7 * (1 + 2 * 4)


def test_finetune_table_equals_metrics_and_table_md():
    page = parse(built().read_text())
    (t,) = page.of("finetune")
    folder = results_tree() / "causal" / "tiny-llama_finetune"
    run = json.loads((folder / "run.json").read_text())
    m = pd.read_parquet(folder / "metrics.parquet")
    ref = run["peak_layers"]["base"]
    assert int(t["attrs"]["data-ref-layer"]) == ref and t["attrs"]["data-model"] == "tiny-llama"
    md_rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in (folder / "table.md").read_text().splitlines()
        if line.startswith("| ") and line.split("|")[1].strip() in ("base", "first:2", "last:2")
    }
    assert [r["_attrs"]["data-condition"] for r in t["rows"]] == ["base", "first:2", "last:2"]
    for row in t["rows"]:
        cond = row["_attrs"]["data-condition"]
        sel = m[(m.condition == cond) & (m.concept == "all")]
        knn = sel[(sel.metric == "cd_knn")]
        assert _v(row["cd_ref"]) == knn[knn.layer == ref]["value"].item()
        assert (
            _v(row["probe_ref"]) == sel[(sel.metric == "probe_accuracy") & (sel.layer == ref)]["value"].item()
        )
        assert _v(row["cd_max"]) == knn["value"].max()
        assert _v(row["acc"]) == sel[sel.metric == "finetune_accuracy"]["value"].item()
        md = md_rows[cond]  # condition | CD@ref | probe@ref | max (layer) | mean | ICL % | loss
        assert row["cd_ref"][0] == md[0] and row["probe_ref"][0] == md[1] and row["cd_max"][0] == md[2]
        assert f"{100 * _v(row['acc']):.1f}%" == md[4]
        if cond == "base":
            assert row["train_loss"][0] == "–" and row["layers"][0] == "none"
        else:
            assert row["train_loss"][0] == md[5] and row["layers"][0] == (
                "0–1" if cond == "first:2" else "2–3"
            )


def test_page_is_self_contained_with_sections_and_figures():
    out = built()
    text = out.read_text()
    assert not re.search(r"https?://", text, re.IGNORECASE)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    page = parse(text)
    assert {"icl", "causal"} <= set(page.ids) and "table" not in page.ids  # no probe runs: no comparison
    for title in ("In-context learning score and induction heads", "Causal tests", "Concept-vector patching"):
        assert title in text
    want = [
        "icl_loss_curves", "icl_prefix_matching", "icl_token_loss_pca_0", "causal_patch_bitwise_1shot_add_layers",
        "causal_patch_bitwise_1shot_replace", "causal_finetune",
    ]  # fmt: skip
    assert sorted(i.removeprefix("fig-") for i in page.ids if i.startswith("fig-")) == sorted(want)
    assert len(page.images) == len(want)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = out.with_suffix(".md").read_text()
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert sorted(Path(x).stem for x in links) == sorted(want)
    assert all((out.parent / x).is_file() for x in links)
    assert "## In-context learning score and induction heads" in md and "## Causal tests" in md
    assert "| first:2 | 0–1 |" in md


def test_causal_folders_are_not_probe_runs_and_mix_with_them(tmp_path):
    import matplotlib.pyplot as plt

    from conceptprobe.report.render import build_report

    causal = results_tree() / "causal"
    assert find_run_folders(causal) == []  # patching, finetuning and the finetuning's own evaluations
    assert find_run_folders(causal / "tiny-llama_patch") == []
    base = causal / "tiny-llama_finetune" / "base"  # a probe run when named on its own
    assert find_run_folders(base) == [base]
    out = tmp_path / "mixed" / "report.html"
    result = build_report([base, results_tree()], out, umap=False, n_boot=100, cache=None)
    assert len(result.report.data.runs) == 1
    text = out.read_text()
    page = parse(text)
    assert {"table", "decodability", "icl", "causal"} <= set(page.ids)
    assert (
        "other results",
        "2 ICL score, 2 induction heads, 1 token-loss PCA, 3 patching, 1 finetuning",
    ) in (result.report.facts)
    # the probe figures and the extra ones share a model's colour; the others get colours of their own
    colors = result.report.model_colors
    assert colors["tiny-llama"] == plt.get_cmap("tab10")(0)
    assert len({colors[m] for m in ("tiny-llama", "tiny-qwen2", *ICL_MODELS)}) == 4


def test_cli_report_of_extras_and_clear_errors(tmp_path):
    from conceptprobe.commands.report_cmds import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test app."""

    register(app)
    out = tmp_path / "r" / "report.html"
    res = results_tree()
    result = CliRunner().invoke(app, ["report", str(res / "icl"), str(res / "causal"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Causal tests:" in result.output and out.is_file()
    page = parse(out.read_text())
    (summary,) = page.of("icl-summary")
    assert {"icl_score", "icl_window"} <= set(summary["rows"][0]) and "n_above" not in summary["rows"][0]
    assert "heads ≥" not in out.read_text() and not page.of("top-heads")  # heads not given
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="no run folders .* or results"):
        from conceptprobe.report.render import build_report

        build_report([res / "icl", empty], tmp_path / "x.html")
