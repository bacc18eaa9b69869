"""Controlled finetuning: LoRA restricted to the first or last k decoder layers, then decodability and accuracy.

The paper's Table 1 (Han et al. 2024): finetuning the *first* layers (where the concept gets encoded) should
raise concept decodability and ICL accuracy more than finetuning the *last* ones.

- Adapters: peft LoRA (rank 16, alpha 16, dropout 0.1 by default) on every ``nn.Linear`` inside the chosen
  decoder layers (``layers_to_transform``; decoder-layer indices ``0..L-1``, so ``first:k`` changes the
  residual stream from layer 1 on and ``last:k`` from layer ``L-k+1`` on, in capture's numbering).
- Data: k-shot prompts of the task's non-null concepts from ``train_seed`` (disjoint from the evaluation
  seed; training prompts whose query also appears as an evaluation query of the same concept are dropped).
  ``null`` answers are random by construction, so there is nothing to learn from them; null stays in the
  evaluation as decodability's Null class.
- Loss: cross-entropy on the completion only, i.e. the tokens of ``answer_prefix + answer + separator``
  (the answer and the newline that ends it, which greedy decoding stops at); prompt tokens and padding are
  masked. The prompt is tokenized exactly as at evaluation (with the tokenizer's BOS), the completion
  separately without special tokens. Logits are computed only for the positions that predict a completion
  token (the unembedding of a 262k vocabulary over whole sequences is the memory cost otherwise).
- Optimiser: AdamW on the LoRA parameters (fp32 even on a bf16 base model), linear warm-up over 10% of the
  steps then linear decay, gradient norm clipped at 1.
- Evaluation: the run pipeline itself (:func:`conceptprobe.experiments.probe.run`: greedy ICL accuracy, k-NN and probe
  decodability at every layer) on the base model and on each adapted model, with the adapters active and
  unmerged (merging into bf16 weights would round small updates away). After each condition the adapters are
  unloaded, which leaves the base weights bit-identical, and saved as safetensors.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from torch import nn
from transformers import PreTrainedTokenizerBase

from conceptprobe import __version__
from conceptprobe.config import Dtype, RunConfig
from conceptprobe.experiments.probe import run as run_pipeline
from conceptprobe.interventions.patching import write_results
from conceptprobe.models import LoadedModel, load_model
from conceptprobe.models.layers import base_model, decoder_layers, logits_from_hidden, spec_for
from conceptprobe.progress import progress_bar
from conceptprobe.prompts import Prompt, PromptFormat, build_prompts
from conceptprobe.store import git_revision, now, package_versions
from conceptprobe.tasks import NULL_CONCEPT, get_task

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "TrainExample",
    "answer_loss",
    "collate",
    "lora_config",
    "parse_layer_spec",
    "run_finetune",
    "tokenize_examples",
    "train_lora",
]

IGNORE = -100


def parse_layer_spec(spec: str, n_layers: int) -> list[int]:
    """Decoder-layer indices (0..n_layers-1) of ``first:k``, ``last:k``, ``all`` or ``i,j,...``."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers))
    if ":" in spec:
        where, _, k_text = spec.partition(":")
        try:
            k = int(k_text)
        except ValueError:
            raise ValueError(f"layer spec {spec!r}: expected first:K or last:K with an integer K") from None
        if not 1 <= k <= n_layers:
            raise ValueError(f"layer spec {spec!r}: K must be in 1..{n_layers} (the model's decoder layers)")
        if where == "first":
            return list(range(k))
        if where == "last":
            return list(range(n_layers - k, n_layers))
        raise ValueError(f"layer spec {spec!r}: use first:K, last:K, all or comma-separated indices")
    try:
        idx = sorted({int(v) for v in spec.split(",") if v.strip()})
    except ValueError:
        raise ValueError(
            f"layer spec {spec!r}: use first:K, last:K, all or comma-separated indices"
        ) from None
    if not idx or idx[0] < 0 or idx[-1] >= n_layers:
        raise ValueError(f"layer spec {spec!r}: decoder-layer indices must lie in 0..{n_layers - 1}")
    return idx


def _slug(spec: str) -> str:
    return spec.replace(":", "-").replace(",", "_")


def target_linear_names(model: nn.Module) -> list[str]:
    """Names (last attribute) of the ``nn.Linear`` modules inside a decoder layer: the LoRA targets."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, mod in decoder_layers(model)[0].named_modules()
        if isinstance(mod, nn.Linear)
    }
    if not names:
        raise ValueError("found no nn.Linear inside the decoder layers to attach LoRA to")
    return sorted(names)


def lora_config(
    model: nn.Module,
    layers: Sequence[int],
    rank: int = 16,
    alpha: float = 16,
    dropout: float = 0.1,
    target_modules: Sequence[str] | None = None,
):
    """A peft ``LoraConfig`` restricted to decoder layers ``layers`` of ``model``."""
    from peft import LoraConfig

    pattern = spec_for(model).layers.rsplit(".", 1)[-1]  # "layers" (most), "h" (GPT-2)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules or target_linear_names(model)),
        layers_to_transform=list(layers),
        layers_pattern=pattern,
        bias="none",
    )


# --------------------------------------------------------------------------------------------------------------
# Data and loss


@dataclass(frozen=True)
class TrainExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    concept: str


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], fmt: PromptFormat
) -> list[TrainExample]:
    """Prompt tokens as at evaluation (special tokens included) + completion tokens (none)."""
    texts = [p.text for p in prompts]
    comps = [fmt.answer_prefix + p.answer + fmt.separator for p in prompts]
    p_ids = tokenizer(texts)["input_ids"]
    c_ids = tokenizer(comps, add_special_tokens=False)["input_ids"]
    return [TrainExample(list(a), list(b), p.concept) for a, b, p in zip(p_ids, c_ids, prompts, strict=True)]


def collate(examples: Sequence[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE except on completion tokens)."""
    length = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        seq = e.prompt_ids + e.completion_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(e.prompt_ids) : len(seq)] = torch.tensor(e.completion_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over completion tokens; logits only for the positions that predict them."""
    device = model.get_input_embeddings().weight.device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    hidden = base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    rows = hidden[:, :-1][keep]  # [n_targets, d], contiguous
    logits = logits_from_hidden(model, rows).float()
    return F.cross_entropy(logits, target[keep])


# --------------------------------------------------------------------------------------------------------------
# Training


class FinetuneConfig(BaseModel):
    """Everything that determines a controlled-finetuning comparison."""

    model_config = ConfigDict(extra="forbid")

    model: str
    task: str
    task_params: dict[str, Any] = Field(default_factory=dict)
    shots: int = Field(4, ge=0)
    layers: str = "first:10"
    compare: list[str] = Field(default_factory=lambda: ["last:10"])
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = 0.0
    warmup: float = Field(0.1, ge=0, le=1, description="warm-up share of the steps")
    max_grad_norm: float = 1.0
    rank: int = Field(16, ge=1)
    alpha: float = 16
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] | None = None
    train_null: bool = False
    n_train: int | None = Field(None, ge=1, description="training prompts per concept [steps*batch/concepts]")
    train_seed: int | None = Field(None, description="seed of the training prompts [seed + 20000]")
    seed: int = Field(0, description="seed of the evaluation prompts (and probe folds)")
    n: int = Field(50, ge=5, description="evaluation prompts per concept")
    dtype: Dtype = Field(
        "auto", validate_default=True, description="auto: bfloat16 where native, else float32"
    )
    eval_batch_size: int = Field(16, ge=1)
    knn_k: int = Field(10, ge=1)
    keep_activations: bool = False
    prompt_format: PromptFormat = Field(default_factory=PromptFormat)

    def resolved_train_seed(self) -> int:
        return self.seed + 20_000 if self.train_seed is None else self.train_seed

    def specs(self) -> list[str]:
        return [self.layers, *[c for c in self.compare if c != self.layers]]


def train_lora(
    model: nn.Module,
    examples: Sequence[TrainExample],
    cfg: FinetuneConfig,
    layers: Sequence[int],
    pad_id: int,
    *,
    seed: int = 0,
    progress: bool = False,
    console: Console | None = None,
    description: str = "LoRA",
) -> tuple[Any, list[float]]:
    """Wrap ``model`` with LoRA on ``layers`` and train ``cfg.steps`` steps; returns the peft model and losses.

    Batches are drawn without replacement from a seeded shuffle of ``examples`` (reshuffled each epoch).
    """
    from peft import get_peft_model

    config = lora_config(model, layers, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(round(cfg.warmup * cfg.steps))) if cfg.warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses: list[float] = []
    peft_model.train()
    with progress_bar(console or Console(stderr=True), progress) as bar:
        job = bar.add_task(description, total=cfg.steps)
        for _ in range(cfg.steps):
            if len(order) < cfg.batch_size:
                order += rng.permutation(len(examples)).tolist()
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            loss = answer_loss(peft_model.get_base_model(), collate([examples[i] for i in idx], pad_id))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.advance(job)
    peft_model.eval()
    return peft_model, losses


# --------------------------------------------------------------------------------------------------------------
# The experiment


@dataclass
class FinetuneResult:
    folder: Path
    metrics: pd.DataFrame
    table: str
    conditions: dict[str, list[int]]


def _training_prompts(task: Any, cfg: FinetuneConfig, eval_queries: dict[str, set[str]]) -> list[Prompt]:
    concepts = [c for c in task.concepts if cfg.train_null or c != NULL_CONCEPT]
    per = cfg.n_train or math.ceil(cfg.steps * cfg.batch_size / len(concepts))
    out: list[Prompt] = []
    for c in concepts:
        ps = build_prompts(task, c, cfg.shots, per, cfg.resolved_train_seed(), cfg.prompt_format)
        out += [p for p in ps if p.query not in eval_queries.get(c, set())]
    return out


def _run_config(cfg: FinetuneConfig) -> RunConfig:
    return RunConfig(
        model=cfg.model,
        task=cfg.task,
        task_params=cfg.task_params,
        shots=cfg.shots,
        n=cfg.n,
        seed=cfg.seed,
        dtype=cfg.dtype,
        batch_size=cfg.eval_batch_size,
        knn_k=cfg.knn_k,
        prompt_format=cfg.prompt_format,
    )


def _evaluate(
    loaded: LoadedModel, cfg: FinetuneConfig, folder: Path, tasks_dir: str | Path | None, progress: bool
) -> tuple[pd.DataFrame, int, dict[str, Any]]:
    if folder.exists():
        shutil.rmtree(folder)  # a different adapter may have produced what is there: never resume from it
    result = run_pipeline(
        _run_config(cfg), folder, loaded=loaded, tasks_dir=tasks_dir, progress=progress, overwrite=True
    )
    import json

    record = json.loads((folder / "run.json").read_text())
    if not cfg.keep_activations:
        shutil.rmtree(folder / "activations", ignore_errors=True)
    return result.metrics, int(record["peak_layer"]), record.get("timings", {})


def run_finetune(
    cfg: FinetuneConfig,
    out: str | Path,
    *,
    loaded: LoadedModel | None = None,
    tasks_dir: str | Path | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> FinetuneResult:
    """Base model, then LoRA on each layer spec (``cfg.layers`` and ``cfg.compare``): train, evaluate, save."""
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task, tasks_dir=tasks_dir, **cfg.task_params)
    eval_queries = {
        c: {p.query for p in build_prompts(task, c, cfg.shots, cfg.n, cfg.seed, cfg.prompt_format)}
        for c in task.concepts
    }
    train_prompts = _training_prompts(task, cfg, eval_queries)
    if loaded is None:
        loaded = load_model(cfg.model, cfg.dtype)
    model, tok = loaded.model, loaded.tokenizer
    n_layers = len(decoder_layers(model))
    conditions = {spec: parse_layer_spec(spec, n_layers) for spec in cfg.specs()}
    specs = list(conditions)
    for i, a in enumerate(specs):
        for b in specs[i + 1 :]:
            shared = sorted(set(conditions[a]) & set(conditions[b]))
            if shared:
                console.print(
                    f"[yellow]note:[/] {a} and {b} share decoder layers {shared} of this {n_layers}-layer model"
                )
    examples = tokenize_examples(tok, train_prompts, cfg.prompt_format)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    timings: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 2)}

    frames: list[pd.DataFrame] = []
    peaks: dict[str, int] = {}
    logs: dict[str, Any] = {}
    t1 = time.perf_counter()
    metrics, peaks["base"], _ = _evaluate(loaded, cfg, folder / "base", tasks_dir, progress)
    frames.append(metrics.assign(condition="base"))
    timings["eval_base_s"] = round(time.perf_counter() - t1, 2)
    for k, (spec, layers) in enumerate(conditions.items()):
        t2 = time.perf_counter()
        peft_model, losses = train_lora(
            model, examples, cfg, layers, pad_id, seed=cfg.seed + k, progress=progress, console=console,
            description=f"LoRA {spec} · {loaded.info.alias or loaded.info.ref} · {cfg.task}",
        )  # fmt: skip
        train_s = time.perf_counter() - t2
        trainable = int(sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n))
        adapter_dir = folder / "adapters" / _slug(spec)
        peft_model.save_pretrained(adapter_dir)  # adapter_model.safetensors + adapter_config.json
        t3 = time.perf_counter()
        adapted = LoadedModel(peft_model.get_base_model(), tok, loaded.info)
        sub = folder / _slug(spec)
        metrics, peaks[spec], _ = _evaluate(adapted, cfg, sub, tasks_dir, progress)
        _note_adapter(sub, spec, layers, adapter_dir)
        frames.append(metrics.assign(condition=spec))
        model = peft_model.unload()  # adapters removed, base weights untouched
        loaded = LoadedModel(model, tok, loaded.info)
        tail = losses[-max(1, len(losses) // 10) :]
        logs[spec] = {
            "decoder_layers": layers,
            "trainable_params": trainable,
            "loss_first": losses[0],
            "loss_last_10pct": float(np.mean(tail)),
            "losses": [round(v, 5) for v in losses],
            "train_s": round(train_s, 2),
            "eval_s": round(time.perf_counter() - t3, 2),
        }
        frames.append(_loss_rows(frames[0], spec, float(np.mean(tail))))
    metrics = pd.concat(frames, ignore_index=True)
    metrics.loc[metrics.metric == "icl_accuracy", "metric"] = "finetune_accuracy"
    metrics["layer"] = metrics["layer"].astype("Int64")
    metrics["position"] = metrics["position"].astype("Int64")
    metrics["train_seed"] = cfg.resolved_train_seed()
    table = comparison_table(metrics, peaks["base"], list(conditions))
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    record = {
        "kind": "finetune",
        "conceptprobe": __version__,
        "status": "complete",
        "created": now(),
        "config": cfg.model_dump(mode="json"),
        "model": loaded.info.to_dict(),
        "task": task.info(),
        "conditions": {spec: {"decoder_layers": layers} for spec, layers in conditions.items()},
        "n_train_prompts": len(train_prompts),
        "train_seed": cfg.resolved_train_seed(),
        "eval_seed": cfg.seed,
        "peak_layers": peaks,
        "layer_convention": "decoder layers 0..L-1 get adapters; metrics use capture's residual numbering "
        "(0 = embeddings, i = output of decoder layer i-1)",
        "training": logs,
        "versions": package_versions() | {"peft": _peft_version()},
        "git": git_revision(),
        "torch_threads": torch.get_num_threads(),
        "timings": timings,
    }
    write_results(folder, metrics, record)
    (folder / "table.md").write_text(table)
    plot_finetune(
        metrics,
        folder,
        list(conditions),
        peaks["base"],
        title=f"{loaded.info.alias or loaded.info.ref} · {cfg.task}",
    )
    return FinetuneResult(folder, metrics, table, conditions)


def _note_adapter(sub: Path, spec: str, layers: list[int], adapter_dir: Path) -> None:
    """Record in the condition's run.json that it evaluated the base model plus a LoRA adapter."""
    import json

    from conceptprobe.store import atomic_write_text

    record = json.loads((sub / "run.json").read_text())
    record["adapter"] = {"spec": spec, "decoder_layers": layers, "path": str(adapter_dir), "merged": False}
    atomic_write_text(sub / "run.json", json.dumps(record, indent=2, default=str) + "\n")


def _loss_rows(like: pd.DataFrame, spec: str, value: float) -> pd.DataFrame:
    row = like.iloc[[0]].copy()
    row["concept"], row["layer"], row["position"] = "all", pd.NA, pd.NA
    row["metric"], row["value"], row["condition"] = "finetune_train_loss", value, spec
    return row


def _peft_version() -> str:
    import peft

    return str(peft.__version__)


def comparison_table(metrics: pd.DataFrame, base_peak: int, specs: list[str]) -> str:
    """A Markdown table in the style of the paper's Table 1, overall then per concept."""
    conds = ["base", *specs]

    def val(cond: str, metric: str, concept: str = "all", layer: int | None = None) -> float:
        sel = metrics[(metrics.condition == cond) & (metrics.metric == metric) & (metrics.concept == concept)]
        sel = sel[sel.layer == layer] if layer is not None else sel[sel.layer.isna()]
        return float(sel["value"].iloc[0]) if len(sel) else float("nan")

    def best(cond: str) -> tuple[float, int, float]:
        sel = metrics[(metrics.condition == cond) & (metrics.metric == "cd_knn") & (metrics.concept == "all")]
        r = sel.loc[sel["value"].idxmax()]
        return float(r["value"]), int(r["layer"]), float(sel["value"].mean())

    lines = [
        f"| condition | CD k-NN @ layer {base_peak} | probe @ {base_peak} | max CD k-NN (layer) | "
        "mean CD k-NN over layers | ICL accuracy | train loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in conds:
        mx, at, mean = best(c)
        loss = val(c, "finetune_train_loss")
        lines.append(
            f"| {c} | {val(c, 'cd_knn', layer=base_peak):.3f} | {val(c, 'probe_accuracy', layer=base_peak):.3f} | "
            f"{mx:.3f} ({at}) | {mean:.3f} | {100 * val(c, 'finetune_accuracy'):.1f}% | "
            f"{'' if np.isnan(loss) else f'{loss:.3f}'} |"
        )
    concepts = [
        c for c in dict.fromkeys(metrics[metrics.metric == "finetune_accuracy"].concept) if c != "all"
    ]
    lines += ["", f"Per concept: ICL accuracy / CD k-NN at layer {base_peak}", ""]
    lines.append("| concept | " + " | ".join(conds) + " |")
    lines.append("|---|" + "---|" * len(conds))
    for concept in concepts:
        cells = [
            f"{100 * val(c, 'finetune_accuracy', concept):.0f}% / {val(c, 'cd_knn', concept, base_peak):.2f}"
            for c in conds
        ]
        lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_finetune(
    metrics: pd.DataFrame, folder: Path, specs: list[str], base_peak: int, title: str = ""
) -> Path:
    """``finetune.png``: CD (k-NN) per layer for each condition, and accuracy per concept (Table-1 view)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    conds = ["base", *specs]
    colors = dict(zip(conds, ["#555555", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"], strict=False))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for c in conds:
        sel = metrics[(metrics.condition == c) & (metrics.metric == "cd_knn") & (metrics.concept == "all")]
        sel = sel.sort_values("layer")
        ax1.plot(sel.layer.astype(int), sel.value, marker=".", label=c, color=colors.get(c))
    ax1.axvline(base_peak, color="grey", lw=0.8, ls=":")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("CD (k-NN)")
    ax1.set_ylim(0, 1.02)
    ax1.legend(frameon=False, fontsize=8)
    ax1.set_title("concept decodability per layer", fontsize=9)
    acc = metrics[(metrics.metric == "finetune_accuracy")]
    concepts = list(dict.fromkeys(acc.concept))
    width = 0.8 / len(conds)
    for i, c in enumerate(conds):
        sel = acc[acc.condition == c].set_index("concept").reindex(concepts)
        ax2.bar(np.arange(len(concepts)) + i * width, sel.value, width, label=c, color=colors.get(c))
    ax2.set_xticks(np.arange(len(concepts)) + 0.4 - width / 2, concepts, rotation=30, ha="right", fontsize=8)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("ICL accuracy")
    ax2.set_title("ICL accuracy per concept", fontsize=9)
    fig.suptitle(title, fontsize=9)
    path = folder / "finetune.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
