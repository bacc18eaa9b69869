"""One run: task prompts -> model -> captured residual stream + greedy answers -> measures -> folder.

Everything that can be checked before loading weights is checked first (:mod:`conceptprobe.validate`):
config, task and prompts, output folder, model reference and layers; prompts against the context and
position offsets right after the tokenizer, before the weights. Each concept's captures and predictions
are written as one shard as soon as it is done, its sha256 recorded in ``run.json``; an interrupted run
resumes where it stopped, recomputing nothing finished, and a complete run whose outputs match their
checksums is not recomputed at all.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.console import Console

from conceptprobe import __version__
from conceptprobe.batching import batch_budget, plan_batches
from conceptprobe.config import RunConfig
from conceptprobe.generation import capture_prompts
from conceptprobe.hooks import ResidualCapture
from conceptprobe.measures.decodability import decodability_peak
from conceptprobe.models import LoadedModel, load_model
from conceptprobe.progress import progress_bar
from conceptprobe.prompts import Prompt
from conceptprobe.store import RunStore, git_revision, now, package_versions, same_measures, sha256_of
from conceptprobe.tasks.base import ConceptTask
from conceptprobe.validate import check_layers, check_model_ref, check_prompts, check_task


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


@dataclass
class Preview:
    """What a run would do, without its weights: the task, its prompts, their token counts and the memory
    plan (token counts and plan need the model's tokenizer and config, which load in seconds)."""

    task: ConceptTask
    prompts: dict[str, list[Prompt]]
    tokens: dict[str, list[int]] | None
    reuse: dict[str, dict[str, float | int]]
    plan: Any = None
    plan_error: str | None = None


def preview(config: RunConfig, tasks_dir: str | Path | None = None, *, model: bool = True) -> Preview:
    """The run of ``config`` as it would start: prompts, token counts and memory plan; no weights loaded."""
    from conceptprobe.prompts import reuse_stats

    task, prompts = check_task(config, tasks_dir)
    reuse = {c: reuse_stats(ps) for c, ps in prompts.items()}
    if not model:
        return Preview(task, prompts, None, reuse)
    from conceptprobe.models.load import load_tokenizer
    from conceptprobe.models.plan import plan_memory

    tok = load_tokenizer(config.model, revision=config.revision)
    tokens = {c: [len(ids) for ids in tok([p.text for p in ps])["input_ids"]] for c, ps in prompts.items()}
    longest = max(max(t) for t in tokens.values())
    try:
        plan = plan_memory(
            config.model,
            revision=config.revision,
            dtype=config.dtype,
            batch_size=config.batch_size,
            seq_len=longest + (config.max_new_tokens or 8),
            layers=config.layers if config.layers == "all" else tuple(config.layers),
            positions=len(config.positions),
        )
        return Preview(task, prompts, tokens, reuse, plan)
    except Exception as exc:  # noqa: BLE001 - the plan is a courtesy: the preview stands without it
        return Preview(task, prompts, tokens, reuse, None, f"{exc.__class__.__name__}: {exc}")


def _max_new_tokens(config: RunConfig, loaded: LoadedModel, prompts: dict[str, list[Prompt]]) -> int:
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    tok = loaded.tokenizer
    answers = sorted({config.prompt_format.answer_prefix + p.answer for ps in prompts.values() for p in ps})
    longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return longest + 2


def collect(
    config: RunConfig,
    loaded: LoadedModel | None,
    prompts: dict[str, list[Prompt]],
    store: RunStore,
    layers: list[int],
    console: Console,
    progress: bool = True,
    record: dict[str, Any] | None = None,
    timer: dict[str, float] | None = None,
) -> list[str]:
    """Capture and generate for every concept without a complete shard; returns the concepts resumed.

    With ``record`` (the run's ``run.json`` data), shards are verified against the checksums in its
    ``shards`` mapping, and each new shard's checksum is added and ``run.json`` rewritten. ``timer``
    accumulates the seconds spent in prefills (``forward_s``) and in decoding steps (``generate_s``).
    """
    sums: dict[str, str] = record.setdefault("shards", {}) if record is not None else {}
    resumed = []
    for concept, items in prompts.items():
        state = store.shard_state(concept, len(items), layers, config.positions, sums.get(concept))
        if state == "complete":
            resumed.append(concept)
            if concept not in sums:  # killed between the shard's rename and its record
                sums[concept] = sha256_of(store.shard_path(concept))
        else:
            sums.pop(concept, None)
            if concept in store.corrupt:
                why = store.corrupt.pop(concept)
                console.print(
                    f"warning: {store.shard_path(concept)} was corrupt: {why}; recomputing concept {concept!r}",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )
    todo = [c for c in prompts if c not in resumed]
    if not todo:
        return resumed
    if loaded is None:
        raise RuntimeError(f"concepts {todo} need computing but no model was loaded")
    max_new = _max_new_tokens(config, loaded, prompts)
    budget = batch_budget(loaded.model, config.max_batch_tokens)
    if record is not None:
        record["batching"] = {"batch_size": config.batch_size, **budget.to_dict()}
        store.write_run_json(record)
    total = sum(len(prompts[c]) for c in todo)
    dtype = torch.float32
    with (
        progress_bar(console, progress, unit="prompts") as bar,
        ResidualCapture(loaded.model, layers=layers, dtype=dtype) as cap,
    ):
        job = bar.add_task(f"{loaded.info.ref} · {config.task} · {config.shots}-shot", total=total)
        for concept in todo:
            items = prompts[concept]
            lengths = [len(ids) for ids in loaded.tokenizer([p.text for p in items])["input_ids"]]
            batches = plan_batches(lengths, config.batch_size, budget.max_batch_tokens, extra=max_new)
            if record is not None:  # what the forward passes ran: the benchmark's floor counts these
                tokens = record.setdefault("tokens", {"prompt": 0, "padded": 0, "batches": 0})
                tokens["prompt"] += sum(lengths)
                tokens["padded"] += sum(len(idx) * max(lengths[i] for i in idx) for idx in batches)
                tokens["batches"] += len(batches)
            acts, texts = capture_prompts(  # shortest prompts first: little padding per batch
                loaded.model,
                loaded.tokenizer,
                [p.text for p in items],
                batches,
                cap,
                config.positions,
                max_new,
                decode_bytes=budget.decode_bytes,
                timer=timer,
                on_prefill=lambda rows: bar.advance(job, rows),
            )
            if not torch.isfinite(acts).all():
                row, li = (~torch.isfinite(acts)).nonzero()[0].tolist()[:2]
                raise FloatingPointError(
                    f"NaN/inf in the activations of model {config.model} (concept {concept!r}, prompt "
                    f"{items[row].index}, layer {layers[li]}, dtype {config.dtype}); the model is "
                    "numerically unstable here: try --dtype float32, or check its weights"
                )
            preds = [
                {
                    "concept": concept,
                    "index": p.index,
                    "prompt": p.text,
                    "answer": p.answer,
                    "prediction": text.strip(),
                    "correct": answer_matches(text, p.answer),
                }
                for p, text in zip(items, texts, strict=True)
            ]
            sha = store.write_shard(concept, acts, preds, layers, config.positions, provenance=record)
            if record is not None:
                sums[concept] = sha
                store.write_run_json(record)
    return resumed


def measure(
    config: RunConfig,
    loaded_info: dict[str, Any],
    task: ConceptTask,
    store: RunStore,
    layers: list[int],
    prompts: dict[str, list[Prompt]],
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """ICL accuracy and the decodability suite with its controls, from the shards, in long form.

    See :mod:`conceptprobe.measures.suite` for the decodability metrics; here the run adds ICL accuracy per
    concept, over every prompt (``all``) and without ``null`` (``all_but_null``, the headline), with
    bootstrap intervals, and the demonstration reuse rates of the prompts (``demo_reuse_rate``,
    ``query_reuse_rate``).
    """
    import numpy as np

    from conceptprobe.measures.controls import bootstrap_interval
    from conceptprobe.measures.suite import SuiteSettings, decodability_suite
    from conceptprobe.measures.surface import surface_features
    from conceptprobe.prompts import reuse_stats
    from conceptprobe.tasks.base import NULL_CONCEPT

    concepts = list(task.concepts)
    acts, labels, predictions = [], [], []
    for concept in concepts:
        a, meta = store.read_shard(concept)
        acts.append(a)
        labels += [concept] * a.shape[0]
        predictions += meta["predictions"]
    X = torch.cat(acts)  # [N, L, P, d]
    ordered = [p for c in concepts for p in prompts[c]]
    base = {
        "model": loaded_info["ref"],
        "family": loaded_info["family"],
        "n_params": int(loaded_info["n_params"]),
        "task": task.name,
        "shots": config.shots,
        "seed": config.seed,
    }
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any], position: int | None) -> None:
        rows.append({**base, **row, "position": position})

    def scalar(concept: str, metric: str, value: float, n: int) -> None:
        add({"concept": concept, "layer": None, "metric": metric, "value": float(value), "n": n}, None)

    correct = np.array([bool(p["correct"]) for p in predictions], dtype=float)
    y = np.array([concepts.index(c) for c in labels])
    for concept in concepts:
        mask = np.asarray(labels) == concept
        scalar(concept, "icl_accuracy", correct[mask].mean(), int(mask.sum()))
    for name, mask in (
        ("all", np.ones(len(labels), dtype=bool)),
        ("all_but_null", np.asarray(labels) != NULL_CONCEPT),
    ):
        if not mask.any():
            continue
        low, high = bootstrap_interval(correct[mask], y[mask], config.n_bootstrap, seed=config.seed)
        scalar(name, "icl_accuracy", correct[mask].mean(), int(mask.sum()))
        scalar(name, "icl_accuracy_ci_low", low, int(mask.sum()))
        scalar(name, "icl_accuracy_ci_high", high, int(mask.sum()))
    for concept in concepts:
        stats = reuse_stats(prompts[concept])
        scalar(concept, "demo_reuse_rate", stats["demo_reuse_rate"], int(stats["demo_draws"]))
        scalar(concept, "query_reuse_rate", stats["query_reuse_rate"], len(prompts[concept]))
    draws = [reuse_stats(prompts[c]) for c in concepts]
    total = sum(d["demo_draws"] for d in draws)
    scalar("all", "demo_reuse_rate", sum(d["demo_reused"] for d in draws) / total if total else 0.0, total)

    settings = SuiteSettings(
        k=config.knn_k,
        metric=config.knn_metric,
        standardize=config.standardize,
        folds=config.probe_folds,
        seed=config.seed,
        n_permutations=config.n_permutations,
        probe_permutations=config.probe_permutations,
        probe_null_layers=config.probe_null_layers,
        n_bootstrap=config.n_bootstrap,
    )
    surface = surface_features(ordered, task)
    pairs = tuple(getattr(task, "pairs", ()) or ())
    for pi, position in enumerate(config.positions):
        per_layer = X[:, :, pi, :].permute(1, 0, 2).contiguous()  # [L, N, d]
        suite = decodability_suite(
            per_layer, labels, layers, surface=surface if pi == 0 else None, pairs=pairs, settings=settings
        )
        for row in suite:  # surface baselines do not depend on the position: stored once, without one
            add(row, None if row["layer"] is None and row["metric"].startswith("surface_") else position)
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["position"] = frame["position"].astype("Int64")
    frame["n"] = frame["n"].astype("int64")
    return frame, predictions


def _metric_at(frame: pd.DataFrame, metric: str, concept: str = "all", layer: int | None = None) -> float:
    """One value of the long-form frame (NaN when absent); ``layer`` None selects layer-free rows."""
    sel = frame[(frame["metric"] == metric) & (frame["concept"] == concept)]
    sel = sel[sel["layer"].isna()] if layer is None else sel[sel["layer"] == layer]
    return float(sel["value"].iloc[0]) if len(sel) else float("nan")


def headline(frame: pd.DataFrame, position: int = 0) -> dict[str, Any]:
    """The numbers a run is quoted by, each with its interval, control and n (stored in ``run.json``)."""
    sel = frame[(frame["position"] == position) | frame["position"].isna()]
    knn = sel[(sel["metric"] == "cd_knn") & (sel["concept"] == "all") & sel["layer"].notna()]
    knn = knn.set_index("layer")["value"].sort_index()
    held = sel[(sel["metric"] == "cd_knn_heldout_peak") & (sel["concept"] == "all")]
    out: dict[str, Any] = {
        "position": position,
        "peak_layer_in_sample": int(knn.index[decodability_peak(knn.to_numpy())]),
        "cd_knn_peak_in_sample": float(knn.max()),
    }
    acc = "all_but_null" if (sel["concept"] == "all_but_null").any() else "all"
    out["icl_accuracy"] = {
        "concepts": acc,
        "value": _metric_at(sel, "icl_accuracy", acc),
        "ci": [_metric_at(sel, "icl_accuracy_ci_low", acc), _metric_at(sel, "icl_accuracy_ci_high", acc)],
        "n": int(sel[(sel["metric"] == "icl_accuracy") & (sel["concept"] == acc)]["n"].iloc[0]),
        "with_null": _metric_at(sel, "icl_accuracy", "all"),
    }
    if len(held):
        layer = int(held["layer"].iloc[0])
        out["heldout_peak_layer"] = layer
        out["cd_knn_heldout_peak"] = {
            "value": float(held["value"].iloc[0]),
            "ci": [
                _metric_at(sel, "cd_knn_heldout_peak_ci_low", layer=layer),
                _metric_at(sel, "cd_knn_heldout_peak_ci_high", layer=layer),
            ],
            "n": int(held["n"].iloc[0]),
            "null_p95": _metric_at(sel, "cd_knn_null_p95", layer=layer),
            "p_value": _metric_at(sel, "cd_knn_p_value", layer=layer),
            "selectivity": _metric_at(sel, "cd_knn_heldout_selectivity", layer=layer),
            "selectivity_ci": [
                _metric_at(sel, "cd_knn_heldout_selectivity_ci_low", layer=layer),
                _metric_at(sel, "cd_knn_heldout_selectivity_ci_high", layer=layer),
            ],
        }
    surface = sel[sel["metric"].str.match(r"^surface_[a-z]+_(knn|probe)$") & (sel["concept"] == "all")]
    if len(surface):
        best = surface.loc[surface["value"].idxmax()]
        out["surface_baseline"] = {
            "value": float(best["value"]),
            "reader": best["metric"].removeprefix("surface_"),
        }
    return out


def summary_table(frame: pd.DataFrame, position: int = 0) -> tuple[str, int]:
    """The printed summary (per-layer decodability with its controls, per concept at the held-out peak
    layer, then the headline numbers) and the in-sample peak layer."""
    from rich.table import Table

    sel = frame[(frame["position"] == position) | frame["position"].isna()]
    head = headline(frame, position)
    peak = head["peak_layer_in_sample"]
    chosen = head.get("heldout_peak_layer", peak)
    layer_ids = sorted(
        int(v) for v in sel[(sel["metric"] == "cd_knn") & sel["layer"].notna()]["layer"].unique()
    )
    console = Console(record=True, width=110, file=io.StringIO(), color_system=None)
    t1 = Table(title="Concept decodability per layer (all concepts; [95% CI]; null = label permutations)")
    for col in ("layer", "cd_knn [CI]", "null p95", "probe", "cd_knn − surface", ""):
        t1.add_column(col, justify="left" if col == "" else "right")
    for layer in layer_ids:
        mark = " ◀ peak (in-sample)" if layer == peak else ""
        mark += " ◀ held-out choice" if layer == chosen else ""
        value = _metric_at(sel, "cd_knn", layer=layer)
        t1.add_row(
            str(layer),
            f"{value:.3f} [{_metric_at(sel, 'cd_knn_ci_low', layer=layer):.2f}, "
            f"{_metric_at(sel, 'cd_knn_ci_high', layer=layer):.2f}]",
            f"{_metric_at(sel, 'cd_knn_null_p95', layer=layer):.3f}",
            f"{_metric_at(sel, 'probe_accuracy', layer=layer):.3f}",
            f"{_metric_at(sel, 'cd_knn_selectivity', layer=layer):+.3f}",
            ("█" * round(value * 30)) + mark,
        )
    t2 = Table(title=f"Per concept: ICL accuracy, and decodability at the held-out peak layer ({chosen})")
    for col in ("concept", "n", "icl_accuracy", "cd_knn", "probe"):
        t2.add_column(col, justify="right" if col != "concept" else "left")
    acc = sel[(sel["metric"] == "icl_accuracy")].set_index("concept")
    per = [c for c in acc.index if c not in ("all", "all_but_null")]
    for concept in [*per, "all_but_null", "all"]:
        if concept not in acc.index:
            continue
        cd = _metric_at(sel, "cd_knn", concept, chosen) if concept != "all_but_null" else float("nan")
        pr = _metric_at(sel, "probe_accuracy", concept, chosen) if concept != "all_but_null" else float("nan")
        t2.add_row(
            concept,
            str(int(acc.loc[concept, "n"])),
            f"{acc.loc[concept, 'value']:.2f}",
            f"{cd:.3f}",
            f"{pr:.3f}",
        )
    console.print(t1)
    console.print(t2)
    pairs = sorted(c for c in sel["concept"].unique() if "|" in c)
    if pairs:
        t3 = Table(title="Concept pairs sharing an answer class (chance 0.5): held-out peak vs controls")
        for col in ("pair", "layer", "cd_knn [CI]", "null p95", "surface baseline", "n"):
            t3.add_column(col, justify="left" if col == "pair" else "right")
        for pair in pairs:
            held = sel[(sel["metric"] == "cd_knn_heldout_peak") & (sel["concept"] == pair)]
            if not len(held):
                continue
            layer = int(held["layer"].iloc[0])
            t3.add_row(
                pair,
                str(layer),
                f"{held['value'].iloc[0]:.3f} [{_metric_at(sel, 'cd_knn_heldout_peak_ci_low', pair, layer):.2f}, "
                f"{_metric_at(sel, 'cd_knn_heldout_peak_ci_high', pair, layer):.2f}]",
                f"{_metric_at(sel, 'cd_knn_null_p95', pair, layer):.3f}",
                f"{_metric_at(sel, 'surface_baseline', pair):.3f}",
                str(int(held["n"].iloc[0])),
            )
        console.print(t3)
    lines = [
        f"ICL accuracy ({head['icl_accuracy']['concepts']}): {head['icl_accuracy']['value']:.3f} "
        f"[{head['icl_accuracy']['ci'][0]:.3f}, {head['icl_accuracy']['ci'][1]:.3f}], n={head['icl_accuracy']['n']} "
        f"(with null: {head['icl_accuracy']['with_null']:.3f})",
    ]
    if "cd_knn_heldout_peak" in head:
        h = head["cd_knn_heldout_peak"]
        lines.append(
            f"cd_knn at the held-out peak layer {chosen}: {h['value']:.3f} [{h['ci'][0]:.3f}, {h['ci'][1]:.3f}], "
            f"n={h['n']}; permutation null p95 {h['null_p95']:.3f} (p={h['p_value']:.3f}); in-sample peak "
            f"{head['cd_knn_peak_in_sample']:.3f} at layer {peak} (optimistic)"
        )
    if "surface_baseline" in head:
        sb = head["surface_baseline"]
        h = head.get("cd_knn_heldout_peak", {})
        lines.append(
            f"surface baseline (strongest model-free reader: {sb['reader']}): {sb['value']:.3f}; cd_knn − baseline "
            f"at the held-out peak: {h.get('selectivity', float('nan')):+.3f} "
            f"[{h.get('selectivity_ci', [float('nan')] * 2)[0]:+.3f}, {h.get('selectivity_ci', [float('nan')] * 2)[1]:+.3f}]"
        )
    reuse = _metric_at(sel, "demo_reuse_rate")
    if reuse == reuse:
        lines.append(f"demonstration reuse across prompts of a concept: {reuse:.1%}")
    console.print("\n".join(lines), highlight=False, markup=False)
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
    trust_remote_code: bool = False,
) -> RunResult:
    """Run ``config`` into the folder ``out`` (resuming a previous run of the same config).

    ``trust_remote_code`` lets a hub or folder model run its own Python code; it is never read from a
    config file, only from this argument (the CLI's ``--trust-remote-code``).
    Checks everything it can before loading weights. Without ``loaded``, a complete run whose outputs
    match the checksums in its ``run.json`` is returned as it is, loading and recomputing nothing, and
    a run whose shards are all complete recomputes its measures without loading the model.
    The run holds ``<out>/.run.lock`` throughout: another process working in ``out`` is refused.
    """
    import warnings

    from conceptprobe.store import FolderLock

    folder = Path(out)
    if folder.exists() and not folder.is_dir():  # refused by the folder check, with its message
        return _run(config, out, overwrite, tasks_dir, loaded, progress, console, trust_remote_code)
    with FolderLock(folder) as lock:
        if lock.stale is not None:
            warnings.warn(lock.note(lock.stale), stacklevel=2)
        return _run(config, out, overwrite, tasks_dir, loaded, progress, console, trust_remote_code)


def _run(
    config: RunConfig,
    out: str | Path,
    overwrite: bool,
    tasks_dir: str | Path | None,
    loaded: LoadedModel | None,
    progress: bool,
    console: Console | None,
    trust_remote_code: bool,
) -> RunResult:
    console = console or Console(stderr=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    task, prompts = check_task(config, tasks_dir)
    store = RunStore(out, config, overwrite=overwrite)
    previous = store.check()
    if (
        loaded is None
        and previous is not None
        and same_measures(previous, config)
        and not store.verify_outputs(previous)
    ):
        return _stored_result(store, task)  # complete and verified (a caller passing a model wants it run)
    model_info: dict[str, Any] | None = None
    if loaded is None and _shards_complete(store, previous, prompts, config):
        assert previous is not None  # only measures are missing: the model is not needed
        model_info, layers = previous["model"], list(previous["layers"])
    else:
        if loaded is None:
            loaded = _load_checked(config, prompts, trust_remote_code)
        else:
            check_prompts(
                config,
                loaded.tokenizer,
                prompts,
                getattr(loaded.model.config, "max_position_embeddings", None),
                config.model,
            )
        layers = check_layers(config, loaded.info.n_layers, config.model)
        model_info = loaded.info.to_dict()
    timings["load_s"] = round(time.perf_counter() - t0, 2)
    previous = store.prepare()
    record: dict[str, Any] = {
        "conceptprobe": __version__,
        "status": "running",
        "created": (previous or {}).get("created", now()),
        "updated": now(),
        "fingerprint": config.fingerprint(),
        "config": config.model_dump(mode="json"),
        "trust_remote_code": trust_remote_code,
        "rerun": "conceptprobe run --config <this run.json> --out <folder>",
        "model": model_info,
        "model_files": model_files(loaded) if loaded is not None else (previous or {}).get("model_files"),
        "task": {**task.info(), **task_source(config.task)},
        "layers": layers,
        "layer_convention": "0 = embeddings (input to decoder layer 0); i = output of decoder layer i-1, "
        "before the final norm",
        "versions": package_versions(),
        "git": git_revision(),
        "torch_threads": torch.get_num_threads(),
        "shards": dict((previous or {}).get("shards") or {}),
    }
    store.write_run_json(record)
    t1 = time.perf_counter()
    split: dict[str, float] = {"forward_s": 0.0, "generate_s": 0.0}
    resumed = collect(config, loaded, prompts, store, layers, console, progress, record=record, timer=split)
    timings["capture_generate_s"] = round(time.perf_counter() - t1, 2)
    timings.update({k: round(v, 2) for k, v in split.items()})  # the two parts of capture_generate_s
    t2 = time.perf_counter()
    frame, predictions = measure(config, model_info, task, store, layers, prompts)
    timings["measures_s"] = round(time.perf_counter() - t2, 2)
    table, peak = summary_table(frame, config.positions[0])
    outputs = {
        "metrics.parquet": store.write_metrics(frame),
        "predictions.jsonl": store.write_predictions(predictions),
        "table.txt": store.write_table(table),
    }
    outputs.update({f"activations/{c}.safetensors": record["shards"][c] for c in task.concepts})
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    record.update(
        status="complete",
        updated=now(),
        timings=timings,
        resumed_concepts=resumed,
        peak_layer=peak,
        headline=headline(frame, config.positions[0]),
        n_prompts=len(predictions),
        outputs=outputs,
    )
    store.write_run_json(record)
    return RunResult(Path(out), frame, predictions, table, resumed)


def _load_checked(
    config: RunConfig, prompts: dict[str, list[Prompt]], trust_remote_code: bool = False
) -> LoadedModel:
    """Check the model reference and layers, load the tokenizer and check the prompts, then the weights."""
    ref = check_model_ref(config.model, trust_remote_code, config.revision)
    if ref.n_layers is not None:
        check_layers(config, ref.n_layers, config.model)
    checked = []

    def before_weights(tokenizer: Any) -> None:
        check_prompts(config, tokenizer, prompts, ref.max_positions, config.model)
        checked.append(True)

    loaded = load_model(
        config.model,
        config.dtype,
        revision=config.revision,
        trust_remote_code=trust_remote_code,
        on_tokenizer=before_weights,
    )
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if not checked or (limit and limit != ref.max_positions):
        check_prompts(config, loaded.tokenizer, prompts, limit, config.model)
    return loaded


def _shards_complete(
    store: RunStore, previous: dict[str, Any] | None, prompts: dict[str, list[Prompt]], config: RunConfig
) -> bool:
    """Whether a previous run of this config left every shard complete (only its measures are missing)."""
    if not previous or not isinstance(previous.get("model"), dict) or not previous.get("layers"):
        return False
    sums = previous.get("shards") or {}
    layers = list(previous["layers"])
    return all(
        store.shard_state(c, len(ps), layers, config.positions, sums.get(c)) == "complete"
        for c, ps in prompts.items()
    )


def _stored_result(store: RunStore, task: ConceptTask) -> RunResult:
    """The result of a complete, verified run folder, read back (nothing is recomputed)."""
    frame = pd.read_parquet(store.folder / "metrics.parquet")
    lines = (store.folder / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines if line.strip()]
    table = (store.folder / "table.txt").read_text()
    return RunResult(store.folder, frame, predictions, table, list(task.concepts))


def task_source(name: str) -> dict[str, Any]:
    """Where the task came from (``builtin``, an entry point or a file) and the plugin file's sha256."""
    from conceptprobe.tasks.registry import task_origin

    origin = task_origin(name)
    out: dict[str, Any] = {"origin": origin}
    if origin.startswith("file "):
        path = Path(origin.removeprefix("file "))
        if path.is_file():
            out["source_sha256"] = sha256_of(path)
    return out


_HASH_LIMIT = 8 << 30  # weights of local folders are hashed up to this total size (memoised by mtime)


def model_files(loaded: LoadedModel) -> dict[str, Any]:
    """sha256 of the model's files: the GGUF file, or a local folder's weights, config and tokenizer."""
    info = loaded.info
    if info.file_sha256:
        return {Path(info.file or info.ref).name: info.file_sha256}
    if info.source != "local" or not info.file:
        return {"revision": info.revision}
    from conceptprobe.models.load import cached_sha256

    folder = Path(info.file)
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".model")
    )
    if sum(p.stat().st_size for p in files) > _HASH_LIMIT:
        return {p.name: f"{p.stat().st_size} bytes (not hashed: folder over 8 GiB)" for p in files}
    return {p.name: cached_sha256(p) for p in files}
