"""One run: task prompts -> model -> captured residual stream + greedy answers -> measures -> folder.

Everything that can be checked before loading weights (config, task, concepts, prompts, output folder)
is checked first. Each concept's captures and predictions are written as one shard as soon as it is
done, so an interrupted run resumes where it stopped, recomputing nothing finished.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from conceptprobe import __version__
from conceptprobe.capture import ResidualCapture, resolve_layers
from conceptprobe.config import RunConfig
from conceptprobe.generation import capture_and_generate, encode
from conceptprobe.measures.decodability import decodability_peak, knn_decodability, probe_accuracy
from conceptprobe.models import LoadedModel, load_model
from conceptprobe.prompts import Prompt, build_prompts
from conceptprobe.store import RunStore, git_revision, now, package_versions
from conceptprobe.tasks import get_task
from conceptprobe.tasks.base import ConceptTask


@dataclass
class RunResult:
    folder: Path
    metrics: pd.DataFrame
    predictions: list[dict[str, Any]]
    table: str
    resumed_concepts: list[str]


def answer_matches(prediction: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == answer.strip()


def plan_prompts(
    config: RunConfig, tasks_dir: str | Path | None = None
) -> tuple[ConceptTask, dict[str, list[Prompt]]]:
    """The task and its prompts per concept (no model needed)."""
    task = get_task(config.task, tasks_dir=tasks_dir, **config.task_params)
    prompts = {
        concept: build_prompts(task, concept, config.shots, config.n, config.seed, config.prompt_format)
        for concept in task.concepts
    }
    return task, prompts


def _max_new_tokens(config: RunConfig, loaded: LoadedModel, prompts: dict[str, list[Prompt]]) -> int:
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    tok = loaded.tokenizer
    answers = sorted({config.prompt_format.answer_prefix + p.answer for ps in prompts.values() for p in ps})
    longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return longest + 2


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("prompts"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def collect(
    config: RunConfig,
    loaded: LoadedModel,
    prompts: dict[str, list[Prompt]],
    store: RunStore,
    layers: list[int],
    console: Console,
    progress: bool = True,
) -> list[str]:
    """Capture and generate for every concept without a complete shard; returns the concepts resumed."""
    resumed = [c for c in prompts if store.has_shard(c, len(prompts[c]), layers, config.positions)]
    todo = [c for c in prompts if c not in resumed]
    if not todo:
        return resumed
    max_new = _max_new_tokens(config, loaded, prompts)
    total = sum(len(prompts[c]) for c in todo)
    dtype = torch.float32
    with (
        _progress(console, progress) as bar,
        ResidualCapture(loaded.model, layers=layers, dtype=dtype) as cap,
    ):
        job = bar.add_task(f"{loaded.info.ref} · {config.task} · {config.shots}-shot", total=total)
        for concept in todo:
            items = prompts[concept]
            order = sorted(range(len(items)), key=lambda i: len(items[i].text))  # less padding per batch
            acts = torch.empty(len(items), len(layers), len(config.positions), cap.hidden_size, dtype=dtype)
            preds: list[dict[str, Any]] = [{} for _ in items]
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                batch = encode(loaded.tokenizer, [items[i].text for i in idx])
                got, texts = capture_and_generate(
                    loaded.model, loaded.tokenizer, batch, cap, config.positions, max_new
                )
                assert got is not None
                for j, i in enumerate(idx):
                    acts[i] = got[j]
                    p = items[i]
                    preds[i] = {
                        "concept": concept,
                        "index": p.index,
                        "prompt": p.text,
                        "answer": p.answer,
                        "prediction": texts[j].strip(),
                        "correct": answer_matches(texts[j], p.answer),
                    }
                bar.advance(job, len(idx))
            store.write_shard(concept, acts, preds, layers, config.positions)
    return resumed


def measure(
    config: RunConfig, loaded_info: dict[str, Any], task: ConceptTask, store: RunStore, layers: list[int]
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """ICL accuracy, k-NN decodability and probe accuracy from the shards, in long form."""
    concepts = list(task.concepts)
    acts, labels, predictions = [], [], []
    for concept in concepts:
        a, meta = store.read_shard(concept)
        acts.append(a)
        labels += [concept] * a.shape[0]
        predictions += meta["predictions"]
    X = torch.cat(acts)  # [N, L, P, d]
    base = {
        "model": loaded_info["ref"],
        "family": loaded_info["family"],
        "n_params": int(loaded_info["n_params"]),
        "task": task.name,
        "shots": config.shots,
        "seed": config.seed,
    }
    rows: list[dict[str, Any]] = []

    def add(concept: str, layer: int | None, position: int | None, metric: str, value: float) -> None:
        rows.append(
            {
                **base,
                "concept": concept,
                "layer": layer,
                "position": position,
                "metric": metric,
                "value": float(value),
            }
        )

    correct = pd.Series([p["correct"] for p in predictions], index=[p["concept"] for p in predictions])
    for concept in concepts:
        add(concept, None, None, "icl_accuracy", correct[concept].mean())
    add("all", None, None, "icl_accuracy", correct.mean())
    for pi, position in enumerate(config.positions):
        per_layer = X[:, :, pi, :].permute(1, 0, 2).contiguous()  # [L, N, d]
        knn = knn_decodability(
            per_layer, labels, k=config.knn_k, metric=config.knn_metric, standardize=config.standardize
        )
        probe = probe_accuracy(
            per_layer, labels, folds=config.probe_folds, seed=config.seed, standardize=config.standardize
        )
        for li, layer in enumerate(layers):
            add("all", layer, position, "cd_knn", knn.overall[li])
            add("all", layer, position, "probe_accuracy", probe.overall[li])
            for concept in concepts:
                add(concept, layer, position, "cd_knn", knn.per_concept[concept][li])
                add(concept, layer, position, "probe_accuracy", probe.per_concept[concept][li])
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["position"] = frame["position"].astype("Int64")
    return frame, predictions


def summary_table(frame: pd.DataFrame, position: int = 0) -> tuple[str, int]:
    """The printed summary (per-layer CD, then per concept at the peak layer) and the peak layer."""
    from rich.table import Table

    sel = frame[(frame["position"] == position) | frame["position"].isna()]
    layer_rows = sel[(sel["concept"] == "all") & sel["layer"].notna()]
    knn = layer_rows[layer_rows["metric"] == "cd_knn"].set_index("layer")["value"].sort_index()
    probe = layer_rows[layer_rows["metric"] == "probe_accuracy"].set_index("layer")["value"].sort_index()
    peak = int(knn.index[decodability_peak(knn.to_numpy())])
    console = Console(record=True, width=100, file=io.StringIO(), color_system=None)
    t1 = Table(title="Concept decodability per layer (all concepts)")
    t1.add_column("layer", justify="right")
    t1.add_column("cd_knn", justify="right")
    t1.add_column("probe", justify="right")
    t1.add_column("", justify="left")
    for layer in knn.index:
        mark = "◀ peak" if layer == peak else ""
        t1.add_row(
            str(layer),
            f"{knn[layer]:.3f}",
            f"{probe[layer]:.3f}",
            ("█" * round(knn[layer] * 30)) + " " + mark,
        )
    t2 = Table(title=f"Per concept: ICL accuracy, and decodability at the peak layer ({peak})")
    for col in ("concept", "icl_accuracy", "cd_knn", "probe"):
        t2.add_column(col, justify="right" if col != "concept" else "left")
    acc = sel[sel["metric"] == "icl_accuracy"].set_index("concept")["value"]
    at_peak = sel[sel["layer"] == peak]
    cd = at_peak[at_peak["metric"] == "cd_knn"].set_index("concept")["value"]
    pr = at_peak[at_peak["metric"] == "probe_accuracy"].set_index("concept")["value"]
    for concept in [c for c in acc.index if c != "all"] + ["all"]:
        t2.add_row(concept, f"{acc[concept]:.2f}", f"{cd[concept]:.3f}", f"{pr[concept]:.3f}")
    console.print(t1)
    console.print(t2)
    return console.export_text(), peak


def run(
    config: RunConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    tasks_dir: str | Path | None = None,
    loaded: LoadedModel | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> RunResult:
    """Run ``config`` into the folder ``out`` (resuming a previous run of the same config)."""
    console = console or Console(stderr=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    task, prompts = plan_prompts(config, tasks_dir)
    store = RunStore(out, config, overwrite=overwrite)
    previous = store.prepare()
    if loaded is None:
        loaded = load_model(config.model, config.dtype, trust_remote_code=config.trust_remote_code)
    timings["load_s"] = round(time.perf_counter() - t0, 2)
    layers = resolve_layers(loaded.info.n_layers, config.layers)
    _check_positions(config, loaded, prompts)
    record: dict[str, Any] = {
        "conceptprobe": __version__,
        "status": "running",
        "created": (previous or {}).get("created", now()),
        "updated": now(),
        "fingerprint": config.fingerprint(),
        "config": config.model_dump(mode="json"),
        "model": loaded.info.to_dict(),
        "task": task.info(),
        "layers": layers,
        "layer_convention": "0 = embeddings (input to decoder layer 0); i = output of decoder layer i-1, "
        "before the final norm",
        "versions": package_versions(),
        "git": git_revision(),
        "torch_threads": torch.get_num_threads(),
    }
    store.write_run_json(record)
    t1 = time.perf_counter()
    resumed = collect(config, loaded, prompts, store, layers, console, progress)
    timings["capture_generate_s"] = round(time.perf_counter() - t1, 2)
    t2 = time.perf_counter()
    frame, predictions = measure(config, loaded.info.to_dict(), task, store, layers)
    timings["measures_s"] = round(time.perf_counter() - t2, 2)
    store.write_metrics(frame)
    store.write_predictions(predictions)
    table, peak = summary_table(frame, config.positions[0])
    (store.folder / "table.txt").write_text(table)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    record.update(
        status="complete",
        updated=now(),
        timings=timings,
        resumed_concepts=resumed,
        peak_layer=peak,
        n_prompts=len(predictions),
    )
    store.write_run_json(record)
    return RunResult(Path(out), frame, predictions, table, resumed)


def _check_positions(config: RunConfig, loaded: LoadedModel, prompts: dict[str, list[Prompt]]) -> None:
    """Offsets must stay inside the shortest prompt; prompts must fit the model's context."""
    tok = loaded.tokenizer
    lengths = [len(tok(p.text)["input_ids"]) for ps in prompts.values() for p in ps]
    shortest, longest = int(np.min(lengths)), int(np.max(lengths))
    if -min(config.positions) >= shortest:
        raise ValueError(
            f"position offset {min(config.positions)} reaches before the start of the shortest prompt "
            f"({shortest} tokens); use offsets > {-shortest}"
        )
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit and longest > limit:
        raise ValueError(
            f"the longest prompt has {longest} tokens, more than the model's context of {limit}; use fewer --shots"
        )
