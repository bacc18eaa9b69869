"""CLI commands for the causal tests: concept-vector patching, layer-restricted LoRA finetuning, head ablation.

``conceptprobe patch --model M --task T [--layers peak|all|L1,L2] [--mode add|replace] [--seeds 5] [--n 20]``
    -> metrics.parquet, per_seed.parquet, predictions.jsonl, run.json, patch_heatmap.png, patch_cross.png in
    ``--out`` (default ``results/causal/<model>_<task>_<k>shot_patch-<mode>``).
``conceptprobe finetune --model M --task T --layers first:10 --compare last:10 [--steps 100]``
    -> metrics.parquet, run.json, table.md, finetune.png, adapters/<spec>/ (safetensors) and one run folder
    per condition in ``--out`` (default ``results/causal/<model>_<task>_<k>shot_finetune``).
``conceptprobe ablate --model M --heads-folder results/heads/M [--k 5] [--draws 5] [--tasks bitwise,pos]``
    -> ablation.json, metrics.parquet, predictions.jsonl, ablation.png in ``--out`` (default
    ``results/ablation/<model>_<mode>``).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def _slug(ref: str) -> str:
    if ref.endswith(".gguf"):
        return Path(ref).stem
    path = Path(ref)
    return path.resolve().name if path.exists() else ref.replace("/", "--")


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _patch_layers(value: str) -> str | list[int]:
    if value in ("peak", "all"):
        return value
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"--layers takes peak, all or comma-separated integers, got {value!r}"
        ) from None


def _check_out(folder: Path, overwrite: bool) -> None:
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise typer.BadParameter(
            f"output folder {folder} is not empty; choose another --out or pass --overwrite"
        )


def patch_summary(metrics: object) -> str:
    """Per layer and concept: baseline accuracy, then Δ accuracy ± std of each condition, and the follow-B rate."""
    import pandas as pd

    m: pd.DataFrame = metrics  # type: ignore[assignment]

    def cell(concept: str, layer: object, cond: str, metric: str) -> str:
        sel = m[(m.concept == concept) & (m.condition == cond)]
        sel = sel[sel.layer.isna()] if layer is None else sel[sel.layer == layer]
        mean = sel[sel.metric == metric]["value"]
        std = sel[sel.metric == f"{metric}_std"]["value"]
        if mean.empty:
            return ""
        text = f"{mean.iloc[0]:+.2f}" if metric.endswith("delta_accuracy") else f"{mean.iloc[0]:.2f}"
        return text + (f" ± {std.iloc[0]:.2f}" if len(std) and pd.notna(std.iloc[0]) else "")

    conds = [c for c in ("positive", "negative", "cross") if c in set(m.condition)]
    concepts = [c for c in dict.fromkeys(m[m.condition == "baseline"].concept) if c != "all"] + ["all"]
    head = ["layer", "concept", "baseline acc", *[f"Δ {c}" for c in conds]]
    if "cross" in conds:
        head += ["follows B (baseline)"]
    rows = [head]
    for layer in sorted(int(v) for v in m.layer.dropna().unique()):
        for concept in concepts:
            row = [str(layer), concept, cell(concept, None, "baseline", "patch_accuracy")]
            row += [cell(concept, layer, c, "patch_delta_accuracy") for c in conds]
            if "cross" in conds:
                base = cell(concept, None, "baseline", "patch_follow_rate")
                row += [f"{cell(concept, layer, 'cross', 'patch_follow_rate')} ({base.split(' ')[0]})"]
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows)


def patch_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Packaged alias, .gguf file, folder or hub id."),
    task: str = typer.Option(..., "--task", "-t", help="Task family (see `conceptprobe tasks`)."),
    shots: int = typer.Option(4, "--shots", "-k", help="Demonstrations per prompt."),
    layers: str = typer.Option("peak", "--layers", help="peak | all | comma-separated layer indices."),
    mode: str = typer.Option("add", "--mode", help="add (difference-of-means vector) | replace (the mean)."),
    scale: float = typer.Option(1.0, "--scale", help="Multiplier of the added vector (add mode)."),
    seeds: int = typer.Option(5, "--seeds", help="Evaluation seeds (demonstration draws) for the std."),
    seed: int = typer.Option(0, "--seed", help="First evaluation seed."),
    n: int = typer.Option(20, "--n", help="Evaluation prompts per concept and seed."),
    n_mean: int = typer.Option(20, "--n-mean", help="Prompts per concept for the concept means."),
    mean_seed: int | None = typer.Option(None, "--mean-seed", help="Seed of the mean prompts [seed+10000]."),
    conditions: str = typer.Option(
        "positive,negative,cross", "--conditions", help="Patched conditions (baseline always runs)."
    ),
    peak_from: Path | None = typer.Option(
        None, "--peak-from", help="Run folder whose run.json gives the peak layer [computed here]."
    ),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto | float32 | bfloat16 | float16 [auto: bf16 where native, else fp32]."
    ),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Prompts per forward pass."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Result folder [results/causal/...]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
    tasks_dir: Path | None = typer.Option(None, "--tasks-dir", help="Folder of task plugins."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads [torch's default]."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Patch concept means into the query's residual stream; ICL accuracy change per concept (± std)."""
    from conceptprobe.interventions.patching import PatchConfig, run_patching

    _set_threads(threads)
    conds = ["baseline"] + [c.strip() for c in conditions.split(",") if c.strip() and c.strip() != "baseline"]
    cfg = PatchConfig(
        model=model, task=task, shots=shots, n=n, seeds=seeds, seed=seed, n_mean=n_mean, mean_seed=mean_seed,
        layers=_patch_layers(layers), mode=mode, scale=scale, conditions=conds, dtype=dtype,
        batch_size=batch_size, peak_from=str(peak_from) if peak_from else None,
    )  # fmt: skip
    folder = out or Path("results") / "causal" / f"{_slug(model)}_{task}_{shots}shot_patch-{mode}"
    _check_out(folder, overwrite)
    result = run_patching(cfg, folder, tasks_dir=tasks_dir, progress=not no_progress)
    console.print(f"peak layer {result.peak_layer} ({result.peak_source}); patched layers {result.layers}")
    console.print(patch_summary(result.metrics), highlight=False, markup=False)
    console.print(f"results: {folder}")


def finetune_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Packaged alias, .gguf file, folder or hub id."),
    task: str = typer.Option(..., "--task", "-t", help="Task family (see `conceptprobe tasks`)."),
    layers: str = typer.Option(
        "first:10", "--layers", help="Decoder layers to adapt: first:K | last:K | i,j,..."
    ),
    compare: list[str] = typer.Option(["last:10"], "--compare", help="Other layer spec(s) to compare with."),
    shots: int = typer.Option(4, "--shots", "-k", help="Demonstrations per prompt."),
    steps: int = typer.Option(100, "--steps", help="Optimiser steps per condition."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Training prompts per step."),
    lr: float = typer.Option(5e-4, "--lr", help="AdamW learning rate (linear warm-up then decay)."),
    rank: int = typer.Option(16, "--rank", help="LoRA rank."),
    alpha: float = typer.Option(16, "--alpha", help="LoRA alpha."),
    dropout: float = typer.Option(0.1, "--dropout", help="LoRA dropout."),
    n: int = typer.Option(50, "--n", help="Evaluation prompts per concept."),
    seed: int = typer.Option(0, "--seed", help="Evaluation seed (training uses seed+20000)."),
    train_seed: int | None = typer.Option(None, "--train-seed", help="Seed of the training prompts."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto | float32 | bfloat16 | float16 (base weights) [auto]."
    ),
    eval_batch_size: int = typer.Option(16, "--eval-batch-size", help="Prompts per evaluation pass."),
    keep_activations: bool = typer.Option(
        False, "--keep-activations", help="Keep each condition's captures."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Result folder [results/causal/...]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
    tasks_dir: Path | None = typer.Option(None, "--tasks-dir", help="Folder of task plugins."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads [torch's default]."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """LoRA on the first vs last decoder layers; decodability and ICL accuracy before and after (Table 1)."""
    from conceptprobe.interventions.finetune import FinetuneConfig, run_finetune

    _set_threads(threads)
    cfg = FinetuneConfig(
        model=model, task=task, shots=shots, layers=layers, compare=compare, steps=steps, batch_size=batch_size,
        lr=lr, rank=rank, alpha=alpha, dropout=dropout, n=n, seed=seed, train_seed=train_seed, dtype=dtype,
        eval_batch_size=eval_batch_size, keep_activations=keep_activations,
    )  # fmt: skip
    folder = out or Path("results") / "causal" / f"{_slug(model)}_{task}_{shots}shot_finetune"
    _check_out(folder, overwrite)
    result = run_finetune(cfg, folder, tasks_dir=tasks_dir, progress=not no_progress)
    console.print(result.table, highlight=False, markup=False)
    console.print(f"results: {folder}")


def ablate_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Packaged alias, .gguf file, folder or hub id."),
    heads_folder: Path | None = typer.Option(
        None, "--heads-folder", help="Folder of `conceptprobe heads` for this model [scored here]."
    ),
    heads: str | None = typer.Option(None, "--heads", help="Explicit heads instead, e.g. L3H1,L4H0."),
    k: int | None = typer.Option(None, "--k", help="Top-k heads of the ranking to ablate [5]."),
    control: str | None = typer.Option(None, "--control", help="random | layer-matched [random]."),
    draws: int | None = typer.Option(None, "--draws", help="Random control sets [5]."),
    mode: str | None = typer.Option(None, "--mode", help="zero | mean [zero]."),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated concept tasks [bitwise,pos]."),
    shots: int | None = typer.Option(None, "--shots", help="Demonstrations per prompt [4]."),
    n: int | None = typer.Option(None, "--n", help="Prompts per concept [20]."),
    n_contexts: int | None = typer.Option(None, "--n-contexts", help="ICL-score contexts [16]."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of prompts, contexts, draws, bootstrap [0]."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="auto | float32 | bfloat16 | float16 [auto: bf16 where native, else fp32]."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Prompts per forward pass [16]."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Result folder [results/ablation/...]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
    tasks_dir: Path | None = typer.Option(None, "--tasks-dir", help="Folder of task plugins."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads [torch's default]."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Ablate the top-k induction heads and k random control heads; ICL score, accuracy, decodability."""
    from pydantic import ValidationError

    from conceptprobe.config import ConfigError, format_validation_error
    from conceptprobe.experiments.ablation import AblationConfig, ablate, summary_table

    given = dict(
        model=model, heads_folder=str(heads_folder) if heads_folder else None, k=k, control=control, draws=draws,
        mode=mode, shots=shots, n=n, n_contexts=n_contexts, seed=seed, dtype=dtype, batch_size=batch_size,
        threads=threads, heads=[h.strip() for h in heads.split(",") if h.strip()] if heads else None,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None,
    )  # fmt: skip
    try:
        cfg = AblationConfig.model_validate({key: v for key, v in given.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "ablate options")) from None
    folder = out or Path("results") / "ablation" / f"{_slug(model)}_{cfg.mode}"
    _check_out(folder, overwrite)
    result = ablate(cfg, folder, tasks_dir=tasks_dir, progress=not no_progress)
    console.print(
        f"ablated {', '.join(result.record['ablated'])}; control sets {result.record['control_sets']}"
    )
    console.print(summary_table(result.record), highlight=False, markup=False)
    console.print(f"results: {folder}")


def register(app: typer.Typer) -> None:
    """Add ``patch``, ``finetune`` and ``ablate`` to ``app``."""
    app.command("patch")(patch_cmd)
    app.command("finetune")(finetune_cmd)
    app.command("ablate")(ablate_cmd)
