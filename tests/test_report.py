"""The comparison report: collecting runs, the table vs metrics.parquet, R² statistics, HTML and Markdown.

The run tree is real: ``conceptprobe.experiments.probe.run`` on tiny random models of 2 families x 2 tasks x shots 1, 2
(n=5 per concept), laid out as a sweep writes it. A random model answers nothing right, so the fixture then
gives each concept a distinct ICL accuracy in ``metrics.parquet`` (the report reads nothing else for
accuracy) so that R² is defined.
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
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from conceptprobe.report.collect import ReportError, collect, find_run_folders
from conceptprobe.report.stats import bootstrap_r2, fit, r_squared
from helpers import HtmlTables, make_model, make_tokenizer

FAMILIES = ("llama", "qwen2")
TASKS = ("pos", "bitwise")
SHOTS = (1, 2)


@cache
def run_tree() -> Path:
    """``<tmp>/sweep/tiny-<family>/<task>_<shots>shot_seed0/`` run folders (built once per test process)."""
    from conceptprobe.config import RunConfig
    from conceptprobe.experiments.probe import run

    root = Path(tempfile.mkdtemp(prefix="cp-report-"))
    atexit.register(shutil.rmtree, root, True)
    quiet = Console(file=io.StringIO())
    for family in FAMILIES:
        model_dir = root / "models" / f"tiny-{family}"
        make_model(family, layers=3).save_pretrained(model_dir)
        make_tokenizer().save_pretrained(model_dir)
        for task in TASKS:
            for shots in SHOTS:
                cfg = RunConfig(model=str(model_dir), task=task, shots=shots, n=5, max_new_tokens=1)
                folder = root / "sweep" / f"tiny-{family}" / f"{task}_{shots}shot_seed0"
                run(cfg, folder, progress=False, console=quiet)
                _give_accuracies(folder, seed=len(family) * 10 + shots + (task == "pos"))
    return root / "sweep"


def _give_accuracies(folder: Path, seed: int) -> None:
    metrics = pd.read_parquet(folder / "metrics.parquet")
    icl = metrics["metric"] == "icl_accuracy"
    acc = icl & ~metrics["concept"].isin(["all", "all_but_null"])
    rng = np.random.default_rng(seed)
    metrics.loc[acc, "value"] = rng.integers(0, 6, int(acc.sum())) / 5  # n=5 prompts per concept
    metrics.loc[icl & (metrics["concept"] == "all"), "value"] = metrics.loc[acc, "value"].mean()
    real = acc & (metrics["concept"] != "null")
    metrics.loc[icl & (metrics["concept"] == "all_but_null"), "value"] = metrics.loc[real, "value"].mean()
    metrics.to_parquet(folder / "metrics.parquet", index=False)


@cache
def built_report() -> Path:
    """The HTML report of :func:`run_tree` (UMAP included), built once per test process."""
    from conceptprobe.report.render import build_report

    out = run_tree().parent / "report" / "report.html"
    build_report([run_tree()], out, cache=run_tree().parent / "umap-cache", n_boot=500)
    return out


def parse(html_text: str) -> SimpleNamespace:
    """Cells of the comparison tables: ``tables`` = {task: [{col: (text, td attrs)}]}; ``images``: every src."""
    page = HtmlTables.parse(html_text)
    tables = {
        t["attrs"]["data-task"]: [{k: v for k, v in r.items() if k != "_attrs"} for r in t["rows"]]
        for t in page.of("comparison")
    }
    return SimpleNamespace(tables=tables, images=page.images)


# ------------------------------------------------------------------------------------------------------------


def test_collect_finds_every_run_of_a_tree():
    tree = run_tree()
    data = collect([tree])
    assert len(data.runs) == len(FAMILIES) * len(TASKS) * len(SHOTS)
    assert data.tasks == sorted(TASKS)
    assert set(data.models["model"]) == {f"tiny-{f}" for f in FAMILIES}
    assert data.shots() == list(SHOTS)
    total = sum(len(pd.read_parquet(f / "metrics.parquet")) for f in find_run_folders(tree))
    assert len(data.metrics) == total  # one position per run: nothing dropped, nothing doubled
    assert data.metrics["rel_layer"].dropna().between(0, 1).all()
    # a run folder itself, its run.json, and overlapping paths give each run once
    one = tree / "tiny-llama" / "pos_1shot_seed0"
    assert len(collect([one]).runs) == 1
    assert len(collect([one / "run.json"]).runs) == 1
    assert len(collect([tree, one]).runs) == len(data.runs)


def test_collect_skips_incomplete_runs_with_a_note(tmp_path):
    src = run_tree() / "tiny-qwen2"
    dst = tmp_path / "tree"
    shutil.copytree(src, dst / "tiny-qwen2", ignore=shutil.ignore_patterns("activations"))
    record = json.loads((dst / "tiny-qwen2" / "pos_2shot_seed0" / "run.json").read_text())
    record["status"] = "running"
    (dst / "tiny-qwen2" / "pos_2shot_seed0" / "run.json").write_text(json.dumps(record))
    data = collect([dst])
    assert len(data.runs) == len(TASKS) * len(SHOTS) - 1
    assert any("pos_2shot_seed0" in s and "not complete" in s for s in data.skipped)


def _at(m: pd.DataFrame, metric: str, concept: str = "all", layer: int | None = None) -> float:
    sel = m[(m.metric == metric) & (m.concept == concept)]
    sel = sel[sel.layer.isna()] if layer is None else sel[sel.layer == layer]
    assert len(sel) == 1, (metric, concept, layer)
    return float(sel["value"].iloc[0])


def test_table_matches_metrics_parquet():
    """Every number of the comparison table is the run's own row of metrics.parquet (one seed each)."""
    html_text = built_report().read_text()
    tables = parse(html_text).tables
    assert set(tables) == set(TASKS)
    checked = 0
    for folder in find_run_folders(run_tree()):
        record = json.loads((folder / "run.json").read_text())
        m = pd.read_parquet(folder / "metrics.parquet")
        m = m[m["position"].isna() | (m["position"] == 0)]
        curve = m[(m.metric == "cd_knn") & (m.concept == "all")].sort_values("layer")
        peak = int(curve["layer"].iloc[int(np.argmax(curve["value"].to_numpy()))])
        assert peak == record["peak_layer"]
        held = m[(m.metric == "cd_knn_heldout_peak") & (m.concept == "all")]
        layer = int(held["layer"].item())
        assert layer == record["headline"]["heldout_peak_layer"]
        surfaces = m[m.metric.str.match(r"^surface_[a-z]+_(knn|probe)$") & (m.concept == "all")]
        concepts = [c for c in record["task"]["concepts"] if c != "null"]
        at_layer = m[(m.metric == "cd_knn") & (m.layer == layer)].set_index("concept")["value"]
        acc = m[m.metric == "icl_accuracy"].set_index("concept")["value"]
        x, y = at_layer[concepts].to_numpy(), acc[concepts].to_numpy()
        explain = len(x) >= 4 and np.ptp(x) >= 0.1 and np.ptp(y) >= 0.05
        r2 = np.corrcoef(x, y)[0, 1] ** 2 if explain else np.nan

        label = folder.parent.name
        rows = [
            r
            for r in tables[record["task"]["name"]]
            if r["model"][0] == label and int(r["shots"][0]) == record["config"]["shots"]
        ]
        assert len(rows) == 1, (label, record["config"]["shots"])
        row = rows[0]
        value = {k: float(v[1]["data-value"]) for k, v in row.items() if "data-value" in v[1]}
        assert value["held_layer"] == layer and row["held_layer"][0] == f"{layer} / 3"
        assert value["held_cd"] == pytest.approx(float(held["value"].item()), abs=1e-12)
        lo, hi = (
            _at(m, "cd_knn_heldout_peak_ci_low", layer=layer),
            _at(m, "cd_knn_heldout_peak_ci_high", layer=layer),
        )
        assert row["held_cd"][0] == f"{float(held['value'].item()):.3f} [{lo:.2f}, {hi:.2f}]"
        assert value["null_p95"] == pytest.approx(_at(m, "cd_knn_null_p95", layer=layer))
        assert value["surface"] == pytest.approx(surfaces["value"].max())
        assert value["sel"] == pytest.approx(_at(m, "cd_knn_heldout_selectivity", layer=layer))
        assert value["peak_cd"] == pytest.approx(float(curve["value"].max()), abs=1e-12)
        assert value["icl_acc"] == pytest.approx(_at(m, "icl_accuracy", "all_but_null"), abs=1e-12)
        assert value["n_params"] == record["model"]["n_params"]
        if np.isnan(r2):
            assert np.isnan(value["r2"]) and row["r2"][0] == "n/a"
        else:
            assert value["r2"] == pytest.approx(r2, abs=1e-9)
            assert row["r2"][0].startswith(f"{r2:.2f} [") and row["r2"][0].endswith(f"(n={len(x)})")
            lo, hi = float(row["r2"][1]["data-lo"]), float(row["r2"][1]["data-hi"])
            assert 0 <= lo <= hi <= 1
        checked += 1
    assert checked == len(FAMILIES) * len(TASKS) * len(SHOTS)


def test_r2_and_bootstrap_on_known_cases():
    x = np.linspace(0, 1, 8)
    assert r_squared(x, 0.3 + 0.5 * x) == pytest.approx(1.0)
    f = fit(x, 0.3 + 0.5 * x, seed=0)
    assert f.r2 == pytest.approx(1.0) and f.slope == pytest.approx(0.5) and f.intercept == pytest.approx(0.3)
    assert f.lo > 0.999 and f.hi == pytest.approx(1.0)  # every resample lies on the line

    # no linear relation by construction: y is a parabola symmetric about mean(x), so r = 0 exactly
    xs = np.linspace(-1, 1, 9)
    f0 = fit(xs, xs**2, seed=0)
    assert f0.r2 == pytest.approx(0.0, abs=1e-12) and f0.lo < 0.01 < f0.hi
    rng = np.random.default_rng(0)
    xn, yn = rng.random(300), rng.random(300)
    fn = fit(xn, yn, seed=0)
    assert fn.r2 < 0.03 and fn.lo < fn.r2 < fn.hi < 0.1
    assert fit(xn, yn, seed=0) == fn  # seeded
    assert bootstrap_r2(xn, yn, seed=1) != bootstrap_r2(xn, yn, seed=2)
    xn, yn = xn[:40], yn[:40]

    # strong but imperfect: interval brackets the estimate and excludes 0
    yl = xn + rng.normal(0, 0.1, 40)
    fl = fit(xn, yl, seed=0)
    assert 0.8 < fl.r2 < 1 and fl.lo < fl.r2 < fl.hi and fl.lo > 0.6

    # constant accuracy, decodability at the ceiling, or too few concepts: no R², and the reason said
    assert np.isnan(r_squared(x, np.zeros_like(x)))
    assert fit(x, np.zeros_like(x)).label() == "R² n/a (accuracy equal for all)"
    assert fit(np.ones_like(x), x).label() == "R² n/a (decodability equal for all)"
    assert np.isnan(r_squared(x[:2], x[:2])) and "< 3" in fit(x[:2], x[:2]).label()

    # grouped bootstrap (shots pooled): concepts resampled with all their points
    groups = np.repeat(np.arange(8), 3)
    xg = np.tile(x, 3)
    lo, hi, valid = bootstrap_r2(xg, 2 * xg + 1, groups=groups, n_boot=300, seed=0)
    assert lo > 0.999 and valid == 300
    lo_u, hi_u, _ = bootstrap_r2(
        xg[:-1], 2 * xg[:-1], groups=groups[:-1], n_boot=200, seed=0
    )  # unequal groups
    assert lo_u > 0.999


def test_html_is_self_contained_with_embedded_figures():
    out = built_report()
    text = out.read_text()
    assert not re.search(r"https?://", text, re.IGNORECASE), "the report must not reference the network"
    assert "<script" not in text.lower() and "<link" not in text.lower()
    srcs = parse(text).images
    # per task: controls, decodability, per concept, vs size, CD vs accuracy, UMAP, vs shots
    assert len(srcs) == 7 * len(TASKS)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for word in ("tiny-llama", "tiny-qwen2", "pos v2", "bitwise v1", "Comparison", "UMAP"):
        assert word in text
    for word in ("permutation null", "surface baseline", "held-out", "weights"):
        assert word in text


def test_markdown_and_figure_files_are_written():
    out = built_report()
    md = out.with_suffix(".md")
    text = md.read_text()
    assert text.startswith("# conceptprobe report")
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", text)
    assert len(links) == 7 * len(TASKS)
    for link in links:
        assert (md.parent / link).is_file()
        svg = (md.parent / link).with_suffix(".svg")
        assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    assert "| model | params | shots | layer (held-out) |" in text and "tiny-qwen2" in text
    names = sorted(Path(x).name for x in links) + sorted(Path(x).with_suffix(".svg").name for x in links)
    assert sorted(p.name for p in (out.parent / "figures").iterdir()) == sorted(names)


def test_umap_is_skipped_with_a_note_when_activations_are_absent(tmp_path):
    from conceptprobe.report.render import assemble

    dst = tmp_path / "tree"
    shutil.copytree(
        run_tree() / "tiny-llama", dst / "tiny-llama", ignore=shutil.ignore_patterns("activations")
    )
    report = assemble(collect([dst]), n_boot=200, cache=None)
    assert not [f for f in report.figures if f.section == "umap"]
    assert any("UMAP skipped" in n and "no activations" in n for n in report.notes)
    assert {f.section for f in report.figures} == {
        "controls",
        "decodability",
        "concepts",
        "cd_vs_acc",
        "shots",
    }


def _cli() -> typer.Typer:
    from conceptprobe.commands.report_cmds import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test app."""

    register(app)
    return app


def test_cli_report_and_clear_errors(tmp_path):
    out = tmp_path / "r" / "report.html"
    result = CliRunner().invoke(
        _cli(), ["report", str(run_tree()), "--out", str(out), "--no-umap", "--n-boot", "200"]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert "comparison" in result.output and "tiny-llama" in result.output

    missing = tmp_path / "no-such-folder"
    result = CliRunner().invoke(_cli(), ["report", str(missing), "--out", str(tmp_path / "x.html")])
    assert result.exit_code != 0
    assert isinstance(result.exception, ReportError) and "does not exist" in str(result.exception)

    with pytest.raises(ReportError, match="no run folders"):
        collect([tmp_path / "r"])  # a folder without runs
    with pytest.raises(ReportError, match="is a file"):
        collect([out])
    with pytest.raises(ReportError, match="should name an .html file"):
        from conceptprobe.report.render import build_report

        build_report([run_tree()], tmp_path / "report.pdf")


def test_pairs_table_shows_decodability_within_each_pair_beside_its_controls(tmp_path):
    """A task with concept pairs: the report's pairs table is the runs' pair rows of metrics.parquet."""
    from conceptprobe.config import RunConfig
    from conceptprobe.experiments.probe import run
    from conceptprobe.report.render import build_report

    model_dir = run_tree().parent / "models" / "tiny-llama"
    folder = tmp_path / "sweep" / "tiny-llama" / "first-last_2shot_seed0"
    cfg = RunConfig(model=str(model_dir), task="first-last", shots=2, n=12, max_new_tokens=1)
    run(cfg, folder, progress=False, console=Console(file=io.StringIO()))
    out = build_report(
        [tmp_path / "sweep", run_tree()], tmp_path / "r" / "report.html", umap=False, n_boot=200
    )
    page = HtmlTables.parse(out.html.read_text())
    assert len(page.of("pairs")) == 1  # only the task with pairs has a pairs table
    rows = page.of("pairs")[0]["rows"]
    m = pd.read_parquet(folder / "metrics.parquet")
    assert {r["pair"][0] for r in rows} == {"first_noun|last_noun", "first_verb|last_verb"}
    for r in rows:
        pair = r["pair"][0]
        held = m[(m.metric == "cd_knn_heldout_peak") & (m.concept == pair)]
        assert float(r["held_cd"][1]["data-value"]) == pytest.approx(float(held["value"].item()))
        assert float(r["wordclass"][1]["data-value"]) == pytest.approx(_at(m, "surface_lexical_knn", pair))
        assert int(r["held_n"][0]) == int(held["n"].item()) == 12  # half of the pair's 24 prompts
    assert any(f.section == "pairs" for f in out.report.figures)
