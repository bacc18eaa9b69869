"""``conceptprobe report PATH [PATH ...] --out report.html``: one self-contained HTML comparison report.

Writes the HTML file, a Markdown summary beside it (same name, ``.md``) and the figures as PNG files in
``figures/`` beside it. Paths are run folders or folders holding runs (a sweep's output folder), and/or
result folders of ``icl-score``, ``heads``, ``token-loss-pca``, ``patch`` and ``finetune`` (or folders
holding them, e.g. ``results/icl results/heads results/causal``): each kind found adds its own section.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def _default_out(paths: list[Path]) -> Path:
    first = paths[0]
    if first.is_dir() and not (first / "run.json").is_file():
        return first / "report.html"
    return Path("report.html")


def report_cmd(
    paths: list[Path] = typer.Argument(
        ...,
        help="Run folders, or folders holding runs (e.g. a sweep's output), and/or icl-score, heads, "
        "token-loss-pca, patch and finetune result folders (or folders holding them).",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="HTML file to write (default: <first PATH>/report.html); report.md and figures/ go beside it.",
    ),
    umap: bool = typer.Option(
        True, "--umap/--no-umap", help="Draw the UMAP figures (needs saved activations)."
    ),
    include_null: bool = typer.Option(
        False,
        "--include-null",
        help="Count the null concept in the CD-vs-accuracy fits (left out by default).",
    ),
    n_boot: int = typer.Option(2000, "--n-boot", min=100, help="Bootstrap resamples for the R² interval."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and of UMAP."),
    title: str | None = typer.Option(None, "--title", help="Page title (default: conceptprobe report)."),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Recompute UMAP embeddings instead of reusing cached ones."
    ),
) -> None:
    """Compare runs: decodability per layer, CD vs ICL accuracy (R²), UMAPs and a comparison table; plus ICL
    score / induction heads and causal-test sections when such result folders are given."""

    from conceptprobe.report.render import build_report, cell_text

    target = out or _default_out(paths)
    result = build_report(
        list(paths),
        target,
        umap=umap,
        include_null=include_null,
        n_boot=n_boot,
        seed=seed,
        title=title,
        cache=not no_cache,
        log=lambda msg: err_console.print(msg, style="dim", highlight=False),
    )
    report = result.report
    for task in report.data.tasks:
        console.print(f"{task}: comparison (CD at the held-out peak layer)", style="bold", highlight=False)
        for _, row in report.table[report.table["task"] == task].iterrows():
            console.print(
                f"  {row['model']} · {row['shots']}-shot: CD {cell_text('held_cd', row)} at layer "
                f"{cell_text('held_layer', row)} (null p95 {cell_text('null_p95', row)}); surface "
                f"{cell_text('surface', row)}; CD − surface {cell_text('sel', row)}; ICL acc. "
                f"{cell_text('icl_acc', row)}; R² {cell_text('r2', row)}",
                highlight=False,
                markup=False,
            )
    from conceptprobe.report.extra_sections import Table as ExtraTable

    for section in report.extras:
        n_tables = sum(isinstance(b, ExtraTable) for b in section.blocks)
        console.print(f"{section.title}: {n_tables} tables, {len(section.figures)} figures", highlight=False)
    for note in report.notes:
        err_console.print(f"note: {note}", style="yellow", highlight=False)
    console.print(f"report: {result.html}\nsummary: {result.markdown}\nfigures: {result.figures_dir}")


def register(app: typer.Typer) -> None:
    """Add ``report`` to ``app``."""
    app.command("report")(report_cmd)
