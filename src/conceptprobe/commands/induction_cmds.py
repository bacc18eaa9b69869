"""CLI commands for the ICL score, induction heads and per-token loss PCA.

``conceptprobe icl-score --model M [--text PATH ...]``  -> icl.json, token_losses.safetensors,
loss_curve.png, metrics.parquet in ``--out`` (default ``results/icl/<model>``).
``conceptprobe heads --model M``  -> heads.json, prefix_matching.png, copying.png, metrics.parquet in
``--out`` (default ``results/heads/<model>``).
``conceptprobe token-loss-pca DIR DIR ...``  -> token_loss_pca.json and .png
(default ``results/token-loss-pca``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console()


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave (None = not given: the config class's default applies)."""
    return {k: v for k, v in options.items() if v is not None}


def _config(cls: Any, options: dict[str, Any], what: str) -> Any:
    from pydantic import ValidationError

    from conceptprobe.config import ConfigError, format_validation_error

    try:
        return cls.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, what)) from None


def icl_score_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Packaged alias, .gguf file, folder or hub id."),
    revision: str | None = typer.Option(None, "--revision", help="Hub branch, tag or commit."),
    text: list[Path] | None = typer.Option(
        None,
        "--text",
        help="Text file or folder (repeat the option for several); default: the built-in corpus.",
    ),
    corpus: str | None = typer.Option(
        None, "--corpus", help="Built-in corpus: stdlib-docs | stdlib-source | licenses."
    ),
    n_contexts: int | None = typer.Option(None, "--n-contexts", "-n", help="Contexts to average over [64]."),
    n_tokens: int | None = typer.Option(None, "--n-tokens", help="Text tokens per context [512]."),
    late: int | None = typer.Option(
        None, "--late", help="Later token (1-based index within the text) [500]."
    ),
    early: int | None = typer.Option(None, "--early", help="Earlier token (1-based) [50]."),
    per_doc: int | None = typer.Option(None, "--per-doc", help="Most contexts from one document [1]."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Contexts per forward pass [4]."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="auto | float32 | bfloat16 | float16 [auto: bf16 where native, else fp32]."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the corpus order and the bootstrap [0]."),
    n_boot: int | None = typer.Option(
        None, "--n-boot", help="Bootstrap resamples for the 95% interval [2000]."
    ),
    window: int | None = typer.Option(
        None, "--window", help="Also the score on token windows +-W [10; 0 = off]."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Result folder [results/icl/<model>]."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads [torch's default]."),
) -> None:
    """ICL score: loss of the 500th token minus the 50th, over contexts of 512 tokens, and the loss curve."""
    from conceptprobe.experiments.common import model_slug
    from conceptprobe.experiments.icl import IclScoreConfig, icl_score
    from conceptprobe.models.packaged import PACKAGED

    options = _given(
        model=model,
        revision=revision,
        text=[str(t) for t in text] if text else None,
        corpus=corpus,
        n_contexts=n_contexts,
        n_tokens=n_tokens,
        late=late,
        early=early,
        per_doc=per_doc,
        batch_size=batch_size,
        dtype=dtype,
        seed=seed,
        n_boot=n_boot,
        window=window,
        threads=threads,
    )
    cfg = _config(IclScoreConfig, options, "icl-score")
    folder = out or Path("results") / "icl" / model_slug(model, model if model in PACKAGED else None)
    result = icl_score(cfg, folder, progress=not no_progress)
    s, w, r = result.score, result.windowed, result.record
    console.print(
        f"{r['model'].get('alias') or model} ({r['model']['dtype']}): ICL score {s.score:+.4f} nats "
        f"[{s.ci_low:+.4f}, {s.ci_high:+.4f}] (loss token {cfg.late} {s.mean_loss_late:.3f} - "
        f"token {cfg.early} {s.mean_loss_early:.3f}; {s.n_contexts} contexts of {cfg.n_tokens} tokens; "
        f"forward {r['seconds']['forward']:.1f} s)",
        highlight=False,
    )
    if w is not None:
        console.print(
            f"  windowed (tokens +-{w.window}): {w.score:+.4f} [{w.ci_low:+.4f}, {w.ci_high:+.4f}]",
            highlight=False,
        )
    console.print(f"results: {folder}")


def heads_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Packaged alias, .gguf file, folder or hub id."),
    revision: str | None = typer.Option(None, "--revision", help="Hub branch, tag or commit."),
    n_seqs: int | None = typer.Option(None, "--n-seqs", help="Random sequences to average over [10]."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Distinct random tokens per repeat [25]."),
    repeats: int | None = typer.Option(None, "--repeats", help="Times each sequence is repeated [4]."),
    threshold: float | None = typer.Option(
        None, "--threshold", help="Prefix matching of an induction head [0.4]."
    ),
    copying_threshold: float | None = typer.Option(
        None, "--copying-threshold", help="OV copying score an induction head must also reach [0.5]."
    ),
    copy_over: str | None = typer.Option(
        None, "--copy-over", help="In-context copying candidates: context | vocab [context]."
    ),
    text: list[Path] | None = typer.Option(None, "--text", help="Text to count token frequencies on."),
    freq_docs: int | None = typer.Option(
        None, "--freq-docs", help="Corpus documents for token frequencies [200]."
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="auto | float32 | bfloat16 | float16 [auto: bf16 where native, else fp32]."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the random token sequences [0]."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Result folder [results/heads/<model>]."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads [torch's default]."),
) -> None:
    """Induction heads: prefix matching and copying per decoder block and head, heatmaps, induction heads."""
    from conceptprobe.experiments.common import model_slug
    from conceptprobe.experiments.heads import HeadsConfig, head_scores
    from conceptprobe.models.packaged import PACKAGED

    options = _given(
        model=model,
        revision=revision,
        n_seqs=n_seqs,
        seq_len=seq_len,
        repeats=repeats,
        threshold=threshold,
        copying_threshold=copying_threshold,
        copy_over=copy_over,
        text=[str(t) for t in text] if text else None,
        freq_docs=freq_docs,
        dtype=dtype,
        seed=seed,
        threads=threads,
    )
    cfg = _config(HeadsConfig, options, "heads")
    folder = out or Path("results") / "heads" / model_slug(model, model if model in PACKAGED else None)
    with console.status("scoring heads", spinner="dots"):
        result = head_scores(cfg, folder)
    name = f"{result.record['model'].get('alias') or model} ({result.record['model']['dtype']})"
    listing = ", ".join(
        f"{r['label']} (prefix {r['prefix_matching']:.2f}, copying {r['copying']:.2f})"
        for r in result.induction_heads[:12]
    )
    console.print(
        f"{name}: {len(result.record['heads_above_threshold'])} heads with prefix matching >= {cfg.threshold}; "
        f"{len(result.induction_heads)} also copy (OV copying >= {cfg.copying_threshold}): {listing or 'none'} "
        "(L<b>H<h> = block b, which writes layer b+1)",
        highlight=False,
    )
    console.print(f"results: {folder}")


def token_loss_pca_cmd(
    folders: list[Path] = typer.Argument(..., help="Result folders written by icl-score (two or more)."),
    out: Path = typer.Option(Path("results") / "token-loss-pca", "--out", "-o", help="Output folder."),
    trajectory: bool = typer.Option(
        False, "--trajectory", help="Folders are checkpoints in order: draw a path."
    ),
    positions: int = typer.Option(
        0, "--positions", help="Random (context, token) positions to use [0 = all]."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the position subset."),
) -> None:
    """PCA of per-token loss vectors of several models or checkpoints."""
    from conceptprobe.experiments.common import metrics_frame
    from conceptprobe.measures.token_loss import (
        pca_metrics,
        plot_token_loss_pca,
        read_token_losses,
        token_loss_pca,
    )
    from conceptprobe.store import atomic_write_parquet, atomic_write_text

    runs = [read_token_losses(f) for f in folders]
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.folder.name})"
    result = token_loss_pca(runs, positions=positions, seed=seed)
    result["trajectory"] = trajectory
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "token_loss_pca.json", json.dumps(result, indent=2, default=str) + "\n")
    plot_token_loss_pca(result, out / "token_loss_pca.png", trajectory=trajectory)
    atomic_write_parquet(out / "metrics.parquet", metrics_frame(pca_metrics(result), extra=("n",)))
    evr = ", ".join(f"{100 * v:.1f}%" for v in result["explained_variance_ratio"])
    console.print(
        f"{len(runs)} folders, {result['n_positions']} positions ({result['n_contexts']} contexts, "
        f"same tokens: {result['same_tokens']}); explained variance {evr}",
        highlight=False,
    )
    for label, xy in zip(result["labels"], result["coords"], strict=True):
        console.print(f"  {label}: " + ", ".join(f"{v:+.3f}" for v in xy), highlight=False)
    console.print(f"results: {out}")


def register(app: typer.Typer) -> None:
    """Add ``icl-score``, ``heads`` and ``token-loss-pca`` to ``app``."""
    app.command("icl-score")(icl_score_cmd)
    app.command("heads")(heads_cmd)
    app.command("token-loss-pca")(token_loss_pca_cmd)
