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
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console()


def _slug(ref: str, alias: str | None = None) -> str:
    if alias:
        return alias
    path = Path(ref)
    if ref.endswith(".gguf"):
        return path.stem
    if path.exists():
        return path.resolve().name
    return ref.replace("/", "--")


def _set_threads(threads: int | None) -> None:
    """Set torch's CPU threads (on a busy shared CPU, 1 thread can be many times faster than 2)."""
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from conceptprobe.store import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _versions() -> dict[str, str]:
    from conceptprobe.store import package_versions

    return package_versions()


def _write_metrics(folder: Path, rows: list[dict[str, Any]]) -> None:
    """``metrics.parquet`` in the run-folder long form (plus a ``head`` column), written atomically."""
    import os

    import pandas as pd

    from conceptprobe.store import METRIC_COLUMNS

    frame = pd.DataFrame(rows)
    for col in METRIC_COLUMNS + ["head"]:
        if col not in frame.columns:
            frame[col] = None
    frame = frame[
        METRIC_COLUMNS + ["head"] + [c for c in frame.columns if c not in METRIC_COLUMNS + ["head"]]
    ]
    tmp = folder / f".metrics.parquet.tmp{os.getpid()}"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, folder / "metrics.parquet")


def _model_cols(info: Any, seed: int) -> dict[str, Any]:
    return {
        "model": info.alias or info.ref,
        "family": info.family,
        "n_params": info.n_params,
        "seed": seed,
        "concept": None,
        "shots": None,
        "position": None,
    }


def icl_score_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Packaged alias, .gguf file, folder or hub id."),
    text: list[Path] | None = typer.Option(
        None,
        "--text",
        help="Text file or folder (repeat the option for several); default: the built-in corpus.",
    ),
    corpus: str = typer.Option(
        "stdlib-docs", "--corpus", help="Built-in corpus: stdlib-docs | stdlib-source | licenses."
    ),
    n_contexts: int = typer.Option(64, "--n-contexts", "-n", help="Contexts to average over."),
    n_tokens: int = typer.Option(512, "--n-tokens", help="Text tokens per context."),
    late: int = typer.Option(500, "--late", help="Later token (1-based index within the context's text)."),
    early: int = typer.Option(50, "--early", help="Earlier token (1-based)."),
    per_doc: int = typer.Option(
        1, "--per-doc", help="Most contexts taken from one document (consecutive windows)."
    ),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Contexts per forward pass."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32 | bfloat16 | float16."),
    seed: int = typer.Option(0, "--seed", help="Seed of the corpus order and the bootstrap."),
    n_boot: int = typer.Option(2000, "--n-boot", help="Bootstrap resamples for the 95% interval."),
    window: int = typer.Option(
        10, "--window", help="Also report the lower-variance score on token windows +-W [0 = off]."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Result folder [results/icl/<model>]."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads [torch's default]."),
) -> None:
    """ICL score: loss of the 500th token minus the 50th, over contexts of 512 tokens, and the loss curve."""
    from conceptprobe.corpus import describe_corpus, iter_corpus, iter_text_paths
    from conceptprobe.measures.icl_score import (
        build_contexts,
        check_context_length,
        icl_score,
        loss_curve,
        per_token_losses,
        plot_loss_curve,
        special_prefix,
    )
    from conceptprobe.measures.token_loss import write_token_losses
    from conceptprobe.models import load_model

    if not 1 <= early < late <= n_tokens:
        raise typer.BadParameter(f"need 1 <= --early ({early}) < --late ({late}) <= --n-tokens ({n_tokens})")
    _set_threads(threads)
    started = time.perf_counter()
    loaded = load_model(model, dtype=dtype)
    info = loaded.info
    prefix = special_prefix(loaded.tokenizer)
    check_context_length(loaded.model, len(prefix) + n_tokens, name=model)
    documents = iter_text_paths(text) if text else iter_corpus(corpus, seed)
    contexts = build_contexts(loaded.tokenizer, documents, n_contexts, n_tokens, per_doc=per_doc)
    t0 = time.perf_counter()
    losses = per_token_losses(
        loaded.model, contexts.input_ids, contexts.n_prefix, batch_size=batch_size, progress=not no_progress
    )
    forward_s = time.perf_counter() - t0
    score = icl_score(losses, late=late, early=early, n_boot=n_boot, seed=seed)
    window = max(0, min(window, early - 1, n_tokens - late))  # clipped to fit inside the context
    windowed = icl_score(losses, late, early, n_boot, seed=seed, window=window) if window else None
    curve = loss_curve(losses)
    folder = out or Path("results") / "icl" / _slug(model, info.alias)
    folder.mkdir(parents=True, exist_ok=True)
    write_token_losses(folder, losses, contexts.input_ids, contexts.n_prefix, contexts.doc_ids)
    plot_loss_curve(curve, score, folder / "loss_curve.png", f"{info.alias or model} ({info.dtype})")
    corpus_info = describe_corpus(None if text else corpus, [str(p) for p in text] if text else None, seed)
    corpus_info.update(
        {
            "documents_read": contexts.n_documents_read,
            "contexts": len(contexts.doc_ids),
            "per_doc": per_doc,
            "tokens_per_context": n_tokens,
            "special_prefix": prefix,
            "tokens_scored": int(losses.isfinite().sum()),
        }
    )
    result = {
        "measure": "icl_score",
        "definition": (
            f"mean over contexts of loss(token {late}) - loss(token {early}); tokens are 1-based "
            "positions in the context's text after the tokenizer's own special prefix; "
            "loss = -ln p(x_t | prefix, x_<t) in nats; "
            f"{int(score.ci * 100)}% percentile bootstrap over contexts"
        ),
        **{k: v for k, v in score.to_dict().items() if k != "per_context"},
        "per_context": score.per_context,
        "windowed": None
        if windowed is None
        else {k: v for k, v in windowed.to_dict().items() if k in ("score", "ci_low", "ci_high", "window")}
        | {"definition": f"mean loss over tokens t-{window}..t+{window} in place of the single token t"},
        "curve": curve,
        "model": info.to_dict(),
        "corpus": corpus_info,
        "doc_ids": contexts.doc_ids,
        "settings": {
            "batch_size": batch_size,
            "dtype": dtype,
            "seed": seed,
            "n_boot": n_boot,
            "threads": _threads(),
        },
        "seconds": {
            "load": info.load_seconds,
            "forward": round(forward_s, 2),
            "total": round(time.perf_counter() - started, 2),
        },
        "versions": _versions(),
    }
    _write_json(folder / "icl.json", result)
    base = {**_model_cols(info, seed), "task": "icl", "layer": None, "head": None}
    _write_metrics(
        folder,
        [
            {
                **base,
                "metric": "icl_score",
                "value": score.score,
                "ci_low": score.ci_low,
                "ci_high": score.ci_high,
            },
            {**base, "metric": f"loss_token_{early}", "value": score.mean_loss_early},
            *(
                []
                if windowed is None
                else [
                    {
                        **base,
                        "metric": f"icl_score_window{window}",
                        "value": windowed.score,
                        "ci_low": windowed.ci_low,
                        "ci_high": windowed.ci_high,
                    }
                ]
            ),
            {**base, "metric": f"loss_token_{late}", "value": score.mean_loss_late},
        ],
    )
    console.print(
        f"{info.alias or model} ({info.dtype}): ICL score {score.score:+.4f} nats "
        f"[{score.ci_low:+.4f}, {score.ci_high:+.4f}] (loss token {late} {score.mean_loss_late:.3f} - "
        f"token {early} {score.mean_loss_early:.3f}; {score.n_contexts} contexts of {n_tokens} tokens; "
        f"forward {forward_s:.1f} s)",
        highlight=False,
    )
    if windowed is not None:
        console.print(
            f"  windowed (tokens +-{window}): {windowed.score:+.4f} [{windowed.ci_low:+.4f}, {windowed.ci_high:+.4f}]",
            highlight=False,
        )
    console.print(f"results: {folder}")


def heads_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Packaged alias, .gguf file, folder or hub id."),
    n_seqs: int = typer.Option(10, "--n-seqs", help="Random sequences to average over."),
    seq_len: int = typer.Option(25, "--seq-len", help="Distinct random tokens per repeat."),
    repeats: int = typer.Option(4, "--repeats", help="Times each sequence is repeated."),
    threshold: float = typer.Option(
        0.4, "--threshold", help="Prefix-matching score that marks an induction head."
    ),
    copy_over: str = typer.Option(
        "context",
        "--copy-over",
        help="Copying candidates: context (the sequence's tokens) | vocab (whole vocabulary; slower).",
    ),
    text: list[Path] | None = typer.Option(
        None, "--text", help="Text to count token frequencies on (default: the stdlib-docs corpus)."
    ),
    freq_docs: int = typer.Option(
        200, "--freq-docs", help="Documents of the built-in corpus for token frequencies."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random token sequences."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Result folder [results/heads/<model>]."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads [torch's default]."),
) -> None:
    """Induction heads: prefix-matching and copying scores per layer and head, heatmaps, top heads."""
    from itertools import islice

    from conceptprobe.corpus import iter_corpus, iter_text_paths
    from conceptprobe.measures.icl_score import special_prefix
    from conceptprobe.measures.induction import candidate_token_ids, induction_head_scores, plot_heatmap
    from conceptprobe.models import load_model

    if copy_over not in ("context", "vocab"):
        raise typer.BadParameter(f"--copy-over takes context or vocab, got {copy_over!r}")
    _set_threads(threads)
    started = time.perf_counter()
    loaded = load_model(model, dtype=dtype)
    info, tok = loaded.info, loaded.tokenizer
    docs = iter_text_paths(text) if text else islice(iter_corpus("stdlib-docs", seed), freq_docs)
    texts = [d.text for d in docs]
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    candidates = candidate_token_ids(tok, texts, vocab_size=min(vocab, len(tok)))
    prefix = special_prefix(tok)
    t0 = time.perf_counter()
    with console.status("scoring heads", spinner="dots"):
        scores = induction_head_scores(
            loaded.model, candidates, prefix, n_seqs, seq_len, repeats, seed=seed, copy_over=copy_over
        )
    score_s = time.perf_counter() - t0
    folder = out or Path("results") / "heads" / _slug(model, info.alias)
    folder.mkdir(parents=True, exist_ok=True)
    above = scores.heads_above(threshold)
    pm = scores.prefix_matching
    order = pm.flatten().argsort(descending=True)[:10].tolist()
    n_heads = pm.shape[1]
    top = [
        {
            "layer": i // n_heads,
            "head": i % n_heads,
            "prefix_matching": float(pm.flatten()[i]),
            "copying": None if scores.copying is None else float(scores.copying.flatten()[i]),
        }
        for i in order
    ]
    name = f"{info.alias or model} ({info.dtype})"
    marks = [(r["layer"], r["head"]) for r in above]
    plot_heatmap(
        pm,
        folder / "prefix_matching.png",
        f"prefix matching: {name}\nboxes: >= {threshold}",
        0.0,
        1.0,
        marks=marks,
    )
    if scores.copying is not None:
        plot_heatmap(
            scores.copying,
            folder / "copying.png",
            f"copying ({copy_over} candidates)\n{name}",
            -1.0,
            1.0,
            cmap="RdBu_r",
            marks=marks,
        )
    first = scores.ids[0, scores.n_prefix : scores.n_prefix + seq_len].tolist()
    result = {
        "measure": "induction_heads",
        "definitions": {
            "prefix_matching": "attention from each token in repeats 2..n to the positions that follow its "
            "earlier copies, summed over those positions; mean over queries and sequences",
            "copying": "direct path input-norm -> V (kv head = head // (n_heads // n_kv_heads)) -> O slice "
            "-> [post-attention norm] -> final norm -> unembedding on each source token's first-repeat "
            "residual; "
            "c = logits - mean over candidates; score = ReLU(c_s)/sum ReLU(c) - ReLU(-c_s)/sum ReLU(-c); "
            "mean over source tokens",
        },
        "model": info.to_dict(),
        "settings": {
            **scores.settings,
            "threshold": threshold,
            "dtype": dtype,
            "threads": _threads(),
            "frequency_text": [str(p) for p in text] if text else f"stdlib-docs, first {freq_docs} documents",
        },
        "n_layers": pm.shape[0],
        "n_heads": n_heads,
        "prefix_matching": pm.tolist(),
        "copying": None if scores.copying is None else scores.copying.tolist(),
        "heads_above_threshold": above,
        "top_heads": top,
        "example_tokens": tok.convert_ids_to_tokens(first),
        "seconds": {
            "load": info.load_seconds,
            "score": round(score_s, 2),
            "total": round(time.perf_counter() - started, 2),
        },
        "versions": _versions(),
    }
    _write_json(folder / "heads.json", result)
    base = {**_model_cols(info, seed), "task": "induction"}
    rows = []
    for layer in range(pm.shape[0]):
        for head in range(n_heads):
            rows.append(
                {
                    **base,
                    "layer": layer,
                    "head": head,
                    "metric": "prefix_matching",
                    "value": float(pm[layer, head]),
                }
            )
            if scores.copying is not None:
                rows.append(
                    {
                        **base,
                        "layer": layer,
                        "head": head,
                        "metric": "copying",
                        "value": float(scores.copying[layer, head]),
                    }
                )
    _write_metrics(folder, rows)
    listing = ", ".join(f"L{r['layer']}H{r['head']} {r['prefix_matching']:.2f}" for r in above[:12]) or "none"
    console.print(
        f"{name}: {len(above)} heads with prefix matching >= {threshold}: {listing}", highlight=False
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
    from conceptprobe.measures.token_loss import plot_token_loss_pca, read_token_losses, token_loss_pca

    runs = [read_token_losses(f) for f in folders]
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.folder.name})"
    result = token_loss_pca(runs, positions=positions, seed=seed)
    result["trajectory"] = trajectory
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "token_loss_pca.json", result)
    plot_token_loss_pca(result, out / "token_loss_pca.png", trajectory=trajectory)
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
