"""Concept-vector patching: add to or replace the query's residual stream with a concept's mean representation.

The intervention. :class:`ResidualPatch` hooks the same module as :class:`~conceptprobe.hooks.ResidualCapture`
for layer ``l`` (a forward hook on ``decoder_layers(model)[l - 1]``, or a forward pre-hook on decoder layer 0
for ``l = 0``), so "layer" means the same thing for capture and patching, in every architecture and with
layers on different devices (the vectors are moved to each hidden state's device and dtype). It changes one
row per prompt, the prompt's last token (the position right before the answer, where concept decodability is
measured), and only in the first forward pass after :meth:`ResidualPatch.arm`, i.e. the prefill:

- ``replace``: ``h_l[last] = v``;  ``add``: ``h_l[last] = h_l[last] + v``.
- Decoding then runs unpatched, but the keys and values that decoder layers ``l .. L-1`` computed for the
  patched position during the prefill sit in the KV cache, so every generated token attends to the patched
  state (decoder layers ``0 .. l-1`` keep the original state's keys and values). This equals running the
  whole sequence in one pass with the patch at that single position (tested).

The experiment (:func:`run_patching`). Concept means at every layer come from prompts of a seed disjoint from
the evaluation seeds (``mean_seed``), captured at the last prompt token. For each evaluation seed (a fresh
draw of demonstrations and queries) and each non-null concept A:

- ``baseline``: no patch;
- ``positive``: A's mean;  ``negative``: the ``null`` mean;
- ``cross``: the mean of another concept B (B cycles over the other non-null concepts across A's prompts);
  an answer *follows B* when it equals B's answer on A's query input.

What ``v`` is: in ``replace`` mode the concept mean itself; in ``add`` mode ``scale * (mean_c - centre)``
with ``centre`` the average of all concepts' means (null included), a difference-of-means steering vector.
Adding the raw mean would also add the large component every concept shares and roughly double the row's
norm, which is not a concept-specific intervention.

B's answer on A's input. Built-in tasks draw the input from the random stream independently of the concept
(the task docs say so). Prompts are built through a thin recording wrapper around the task that saves the
generator state before every ``sample`` call, so B's answer is ``task.sample(B, rng_at_that_state).answer``;
its input is checked against A's query (a task whose inputs depend on the concept gets a clear error).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from torch import nn
from transformers import PreTrainedTokenizerBase

from conceptprobe import __version__
from conceptprobe.config import Dtype
from conceptprobe.experiments.probe import answer_matches
from conceptprobe.generation import capture_and_generate, encode
from conceptprobe.hooks import ResidualCapture, ResidualPatch, resolve_layers
from conceptprobe.measures.decodability import decodability_peak, knn_decodability
from conceptprobe.models import LoadedModel, load_model
from conceptprobe.models.layers import decoder_layers
from conceptprobe.progress import progress_bar
from conceptprobe.prompts import Prompt, PromptFormat, build_prompts
from conceptprobe.store import METRIC_COLUMNS, atomic_write_text, git_revision, now, package_versions
from conceptprobe.tasks import NULL_CONCEPT, get_task
from conceptprobe.tasks.base import ConceptTask, Example

PatchMode = Literal["add", "replace"]
CONDITIONS = ("baseline", "positive", "negative", "cross")

__all__ = [
    "CONDITIONS",
    "PatchConfig",
    "PatchResult",
    "answer_under",
    "build_prompts_with_states",
    "concept_means",
    "patch_vectors",
    "patched_generate",
    "run_patching",
]


# --------------------------------------------------------------------------------------------------------------
# The intervention


def patched_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    patch: ResidualPatch | None,
    vectors: torch.Tensor | None,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers of ``texts`` (one prefill, then cached decoding), patching each prompt's last token."""
    batch = encode(tokenizer, texts)
    if patch is not None and vectors is not None:
        patch.arm(batch.last_index, vectors)
    _, out = capture_and_generate(model, tokenizer, batch, None, [0], max_new_tokens)
    if patch is not None and vectors is not None and not patch.fired:
        raise RuntimeError(f"the patch at layer {patch.layer} did not run during the prefill")
    return out


# --------------------------------------------------------------------------------------------------------------
# Concept means and the answers of other concepts


class _RecordingTask:
    """Wraps a task; records how every example was drawn (the generator state, and the pool item for a task
    with finite pools), so the same input can be redrawn under another concept."""

    def __init__(self, task: ConceptTask) -> None:
        self._task = task
        self.calls: list[tuple[dict[str, Any], Example]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def sample(self, concept: str, rng: np.random.Generator) -> Example:
        state = copy.deepcopy(rng.bit_generator.state)
        ex = self._task.sample(concept, rng)
        self.calls.append(({"rng": state}, ex))
        return ex

    def from_pool(self, item: Any, concept: str, rng: np.random.Generator) -> Example:
        state = copy.deepcopy(rng.bit_generator.state)
        ex = self._task.from_pool(item, concept, rng)
        self.calls.append(({"rng": state, "item": item}, ex))
        return ex


def build_prompts_with_states(
    task: ConceptTask, concept: str, shots: int, n: int, seed: int, fmt: PromptFormat | None = None
) -> tuple[list[Prompt], list[dict[str, Any]]]:
    """``build_prompts`` (identical prompts) plus how each prompt's query was drawn."""
    rec = _RecordingTask(task)
    prompts = build_prompts(rec, concept, shots, n, seed, fmt)  # type: ignore[arg-type]
    states, k = [], 0
    for p in prompts:  # the query is the first later call that drew this prompt's query example
        while not (rec.calls[k][1].input == p.query and rec.calls[k][1].answer == p.answer):
            k += 1
        states.append(rec.calls[k][0])
        k += 1
    return prompts, states


def answer_under(task: ConceptTask, state: dict[str, Any], concept: str, query: str) -> str:
    """The answer of ``concept`` on the query drawn as ``state`` records (the input must not change)."""
    rng_state = state["rng"]
    rng = np.random.Generator(getattr(np.random, rng_state["bit_generator"])())
    rng.bit_generator.state = rng_state
    ex = task.from_pool(state["item"], concept, rng) if "item" in state else task.sample(concept, rng)
    if ex.input != query:
        raise ValueError(
            f"task {task.name!r} draws a different input under concept {concept!r} from the same random state "
            f"({ex.input!r} vs {query!r}); cross-concept patching needs inputs independent of the concept"
        )
    return ex.answer


def _max_new_tokens(tokenizer: PreTrainedTokenizerBase, answers: Sequence[str], fmt: PromptFormat) -> int:
    longest = max(
        len(tokenizer(fmt.answer_prefix + a, add_special_tokens=False)["input_ids"]) for a in answers
    )
    return longest + 2


def _sorted_batches(prompts: Sequence[Prompt], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].text))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def concept_means(
    loaded: LoadedModel,
    prompts: dict[str, list[Prompt]],
    layers: Sequence[int] | str = "all",
    batch_size: int = 16,
) -> tuple[torch.Tensor, list[str], list[int]]:
    """Capture every prompt's last-token residual at ``layers`` (float32, no generation).

    Returns the captures ``[n_prompts, n_layers, d]``, their concept labels and the layer indices; the mean
    of a concept is ``acts[labels == c].mean(0)``.
    """
    labels: list[str] = []
    chunks: list[torch.Tensor] = []
    with ResidualCapture(loaded.model, layers=layers, dtype=torch.float32) as cap:
        for concept, items in prompts.items():
            acts = torch.empty(len(items), len(cap.layers), cap.hidden_size)
            for idx in _sorted_batches(items, batch_size):
                batch = encode(loaded.tokenizer, [items[i].text for i in idx])
                got, _ = capture_and_generate(loaded.model, loaded.tokenizer, batch, cap, [0], 0)
                assert got is not None
                acts[idx] = got[:, :, 0]
            chunks.append(acts)
            labels += [concept] * len(items)
        layer_ids = list(cap.layers)
    return torch.cat(chunks), labels, layer_ids


def patch_vectors(
    acts: torch.Tensor, labels: Sequence[str], concepts: Sequence[str], mode: PatchMode, scale: float = 1.0
) -> torch.Tensor:
    """The vector each concept patches with, per layer: ``[n_layers, n_concepts, d]``.

    ``replace``: the concept's mean; ``add``: ``scale * (mean - centre)``, ``centre`` = mean of the means.
    """
    lab = np.asarray(labels)
    means = torch.stack([acts[torch.from_numpy(lab == c)].mean(0) for c in concepts], dim=1)  # [L, C, d]
    if mode == "replace":
        return means
    return scale * (means - means.mean(dim=1, keepdim=True))


# --------------------------------------------------------------------------------------------------------------
# The experiment


class PatchConfig(BaseModel):
    """Everything that determines a patching experiment."""

    model_config = ConfigDict(extra="forbid")

    model: str
    task: str
    task_params: dict[str, Any] = Field(default_factory=dict)
    shots: int = Field(4, ge=0)
    n: int = Field(20, ge=1, description="evaluation prompts per concept and seed")
    seeds: int = Field(5, ge=1, description="evaluation seeds: seed, seed+1, ...")
    seed: int = 0
    n_mean: int = Field(20, ge=1, description="prompts per concept for the concept means")
    mean_seed: int | None = Field(None, description="seed of the mean prompts [seed + 10000]")
    layers: Literal["peak", "all"] | list[int] = "peak"
    mode: PatchMode = "add"
    scale: float = 1.0
    conditions: list[str] = Field(default_factory=lambda: list(CONDITIONS))
    dtype: Dtype = Field(
        "auto", validate_default=True, description="auto: bfloat16 where native, else float32"
    )
    batch_size: int = Field(16, ge=1)
    knn_k: int = Field(10, ge=1)
    peak_from: str | None = Field(None, description="run folder whose run.json gives the peak layer")
    prompt_format: PromptFormat = Field(default_factory=PromptFormat)

    def resolved_mean_seed(self) -> int:
        return self.seed + 10_000 if self.mean_seed is None else self.mean_seed

    def eval_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


@dataclass
class PatchResult:
    folder: Path
    metrics: pd.DataFrame
    per_seed: pd.DataFrame
    layers: list[int]
    peak_layer: int
    peak_source: str


def _peak_layer(cfg: PatchConfig, knn_overall: np.ndarray, layer_ids: list[int]) -> tuple[int, str]:
    if cfg.peak_from:
        path = Path(cfg.peak_from) / "run.json"
        data = json.loads(path.read_text())
        if "peak_layer" not in data:
            raise ValueError(f"{path} has no peak_layer (an incomplete run?); drop --peak-from")
        return int(data["peak_layer"]), f"{path} (cd_knn peak of that run)"
    peak = layer_ids[decodability_peak(knn_overall)]
    return (
        peak,
        f"cd_knn peak over the {cfg.n_mean} mean prompts per concept (seed {cfg.resolved_mean_seed()})",
    )


def resolve_patch_layers(spec: str | list[int], n_layers: int, peak: int) -> list[int]:
    """``peak``, ``all`` or explicit layer indices (0..n_layers, negatives from the end)."""
    if spec == "peak":
        return [peak]
    if spec == "all":
        return list(range(n_layers + 1))
    return resolve_layers(n_layers, list(spec))  # type: ignore[arg-type]


def run_patching(
    cfg: PatchConfig,
    out: str | Path,
    *,
    loaded: LoadedModel | None = None,
    tasks_dir: str | Path | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> PatchResult:
    """Run the patching experiment of ``cfg`` into the folder ``out`` (metrics, predictions, figures)."""
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    bad = [c for c in cfg.conditions if c not in CONDITIONS]
    if bad:
        raise ValueError(f"unknown condition(s) {bad}; choose from {', '.join(CONDITIONS)}")
    task = get_task(cfg.task, tasks_dir=tasks_dir, **cfg.task_params)
    if NULL_CONCEPT not in task.concepts:
        raise ValueError(f"task {task.name!r} has no {NULL_CONCEPT!r} concept, needed for the negative patch")
    concepts = [c for c in task.concepts if c != NULL_CONCEPT]
    all_concepts = list(task.concepts)
    fmt = cfg.prompt_format
    mean_prompts = {
        c: build_prompts(task, c, cfg.shots, cfg.n_mean, cfg.resolved_mean_seed(), fmt) for c in all_concepts
    }
    eval_prompts: dict[int, dict[str, tuple[list[Prompt], list[dict[str, Any]]]]] = {
        s: {c: build_prompts_with_states(task, c, cfg.shots, cfg.n, s, fmt) for c in concepts}
        for s in cfg.eval_seeds()
    }
    if loaded is None:
        loaded = load_model(cfg.model, cfg.dtype)
    timings["load_s"] = round(time.perf_counter() - t0, 2)
    model, tok = loaded.model, loaded.tokenizer
    n_layers = len(decoder_layers(model))

    # Concept means (and decodability, for the peak) at every layer from the disjoint mean seed.
    t1 = time.perf_counter()
    acts, labels, layer_ids = concept_means(loaded, mean_prompts, "all", cfg.batch_size)
    knn = knn_decodability(acts.permute(1, 0, 2), labels, k=min(cfg.knn_k, len(labels) - 1))
    peak, peak_source = _peak_layer(cfg, knn.overall, layer_ids)
    layers = resolve_patch_layers(cfg.layers, n_layers, peak)
    vectors = patch_vectors(acts, labels, all_concepts, cfg.mode, cfg.scale)  # [L+1, C, d]
    cidx = {c: i for i, c in enumerate(all_concepts)}
    timings["means_s"] = round(time.perf_counter() - t1, 2)

    answers = [p.answer for s in eval_prompts.values() for ps, _ in s.values() for p in ps]
    max_new = _max_new_tokens(tok, answers, fmt)
    cross_of: dict[tuple[int, str], list[tuple[str, str]]] = {}
    for s, per in eval_prompts.items():
        for a, (ps, states) in per.items():
            others = [c for c in concepts if c != a] or [a]
            pairs = []
            for i, (p, st) in enumerate(zip(ps, states, strict=True)):
                b = others[(i + s) % len(others)]
                pairs.append((b, answer_under(task, st, b, p.query)))
            cross_of[(s, a)] = pairs

    patched_conditions = [c for c in cfg.conditions if c != "baseline"]
    preds: list[dict[str, Any]] = []
    t2 = time.perf_counter()
    with progress_bar(console, progress) as bar, contextlib.ExitStack() as stack:
        patches = {layer: stack.enter_context(ResidualPatch(model, layer, cfg.mode)) for layer in layers}
        # every (prompt, condition, layer) of a seed in one list, batched by prompt length: one prefill and
        # one decoding loop per batch, each row patched (or not) at its own layer by that layer's hook
        jobs_of = {
            s: [
                (a, i, cond, layer)
                for a, (ps, _) in per.items()
                for i in range(len(ps))
                for cond, layer in [("baseline", None)]
                + [(c, lay) for lay in layers for c in patched_conditions]
            ]
            for s, per in eval_prompts.items()
        }
        total = sum(len(j) for j in jobs_of.values())
        job = bar.add_task(f"patch · {loaded.info.alias or loaded.info.ref} · {cfg.task}", total=total)
        for s, per in eval_prompts.items():
            jobs = jobs_of[s]
            text_of = [per[a][0][i].text for a, i, _, _ in jobs]
            order = sorted(range(len(jobs)), key=lambda j: (len(text_of[j]), text_of[j]))
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                batch = encode(tok, [text_of[j] for j in idx])
                armed = []
                for layer, patch in patches.items():
                    rows = torch.tensor([jobs[j][3] == layer for j in idx])
                    if not rows.any():
                        continue
                    targets = [
                        _target(jobs[j][2], jobs[j][0], cross_of[(s, jobs[j][0])][jobs[j][1]][0]) for j in idx
                    ]
                    vec = vectors[layer, [cidx[t] for t in targets]]
                    patch.arm(batch.last_index, vec, rows)
                    armed.append(patch)
                _, texts = capture_and_generate(model, tok, batch, None, [0], max_new)
                if not all(p.fired for p in armed):
                    raise RuntimeError("a patch did not run during the prefill")
                for k, j in enumerate(idx):
                    a, i, condition, layer = jobs[j]
                    p = per[a][0][i]
                    b, b_answer = cross_of[(s, a)][i]
                    pred = texts[k].strip()
                    preds.append(
                        {
                            "seed": s,
                            "concept": a,
                            "index": p.index,
                            "condition": condition,
                            "layer": layer,
                            "patched_concept": None if layer is None else _target(condition, a, b),
                            "answer": p.answer,
                            "prediction": pred,
                            "correct": answer_matches(pred, p.answer),
                            "cross_concept": b,
                            "cross_answer": b_answer,
                            "follows_cross": answer_matches(pred, b_answer),
                        }
                    )
                bar.advance(job, len(idx))
    timings["generate_s"] = round(time.perf_counter() - t2, 2)
    per_seed, metrics = summarise_patching(preds, cfg, loaded, task.name, layers)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    record = {
        "kind": "patch",
        "conceptprobe": __version__,
        "status": "complete",
        "created": now(),
        "config": cfg.model_dump(mode="json"),
        "model": loaded.info.to_dict(),
        "task": task.info(),
        "layers": layers,
        "peak_layer": peak,
        "peak_source": peak_source,
        "mean_seed": cfg.resolved_mean_seed(),
        "eval_seeds": cfg.eval_seeds(),
        "mean_prompts_cd_knn": {
            str(layer): float(v) for layer, v in zip(layer_ids, knn.overall, strict=True)
        },
        "layer_convention": "0 = embeddings (input to decoder layer 0); i = output of decoder layer i-1, "
        "before the final norm",
        "semantics": _semantics(cfg),
        "max_new_tokens": max_new,
        "n_generations": len(preds),
        "versions": package_versions(),
        "git": git_revision(),
        "torch_threads": torch.get_num_threads(),
        "timings": timings,
    }
    write_results(folder, metrics, record, preds, per_seed=per_seed)
    title = f"{loaded.info.alias or loaded.info.ref} · {task.name} · {cfg.shots}-shot · {cfg.mode}"
    plot_patching(
        metrics, folder, title=title, cross_layer=peak if peak in layers else layers[0], concepts=concepts
    )
    return PatchResult(folder, metrics, per_seed, layers, peak, peak_source)


def _target(condition: str, concept: str, cross: str) -> str:
    """The concept whose vector a row of ``condition`` gets (baseline rows are not patched)."""
    return {"positive": concept, "negative": NULL_CONCEPT, "cross": cross}.get(condition, concept)


def _semantics(cfg: PatchConfig) -> str:
    vec = (
        f"{cfg.scale} * (concept mean - mean of all concept means)"
        if cfg.mode == "add"
        else "the concept mean"
    )
    return (
        f"{cfg.mode}: the residual stream at layer l, last prompt token, prefill only, "
        f"{'plus' if cfg.mode == 'add' else 'replaced by'} {vec}; decoding attends to the patched position "
        "through the KV cache (decoder layers >= l)"
    )


def summarise_patching(
    preds: list[dict[str, Any]], cfg: PatchConfig, loaded: LoadedModel, task: str, layers: list[int]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-seed rows and their aggregate over seeds (mean, sample std with ddof=1 when >= 2 seeds)."""
    df = pd.DataFrame(preds)
    base = {
        "model": loaded.info.alias or loaded.info.ref,
        "family": loaded.info.family,
        "n_params": int(loaded.info.n_params),
        "task": task,
        "shots": cfg.shots,
        "position": 0,
        "mode": cfg.mode,
    }
    rows: list[dict[str, Any]] = []
    key = ["seed", "concept"]
    baseline = df[df.condition == "baseline"].groupby(key)[["correct", "follows_cross"]].mean()
    for (seed, concept), r in baseline.iterrows():
        for metric, value in (("patch_accuracy", r.correct), ("patch_follow_rate", r.follows_cross)):
            rows.append(
                {**base, "seed": seed, "concept": concept, "layer": None, "condition": "baseline",
                 "patched_concept": None, "metric": metric, "value": float(value)}
            )  # fmt: skip
    patched = df[df.condition != "baseline"]
    for (seed, concept, condition, layer), g in patched.groupby(["seed", "concept", "condition", "layer"]):
        acc, follow = g.correct.mean(), g.follows_cross.mean()
        b_acc, b_follow = baseline.loc[(seed, concept)]
        pc = {"positive": concept, "negative": NULL_CONCEPT, "cross": "other"}[condition]
        vals = [("patch_accuracy", acc), ("patch_delta_accuracy", acc - b_acc)]
        if condition == "cross":
            vals += [("patch_follow_rate", follow), ("patch_follow_delta", follow - b_follow)]
        for metric, value in vals:
            rows.append(
                {**base, "seed": seed, "concept": concept, "layer": int(layer), "condition": condition,
                 "patched_concept": pc, "metric": metric, "value": float(value)}
            )  # fmt: skip
    per_seed = pd.DataFrame(rows)
    # "all": the mean over concepts (equal prompts per concept), per seed
    keys = ["seed", "layer", "condition", "metric"]
    allc = per_seed.groupby(keys, dropna=False)["value"].mean().reset_index()
    allc["concept"] = "all"
    allc["patched_concept"] = allc["condition"].map(
        {"positive": "own", "negative": NULL_CONCEPT, "cross": "other"}
    )
    per_seed = pd.concat([per_seed, allc.assign(**base)], ignore_index=True)
    # cross pairs: the follow rate per (A, B), pooled over seeds
    cross = patched[patched.condition == "cross"]
    pair_rows = []
    for (concept, layer, b), g in cross.groupby(["concept", "layer", "patched_concept"]):
        pair_rows.append(
            {**base, "seed": cfg.seed, "concept": concept, "layer": int(layer), "condition": "cross",
             "patched_concept": b, "metric": "patch_follow_rate_pair", "value": float(g.follows_cross.mean()),
             "n_seeds": len(set(g.seed)), "n_prompts": len(g)}
        )  # fmt: skip
    agg_keys = ["concept", "layer", "condition", "patched_concept", "metric"]
    grouped = per_seed.groupby(agg_keys, dropna=False)["value"]
    agg = grouped.agg(["mean", "std", "count"]).reset_index()
    out_rows = []
    for _, r in agg.iterrows():
        common = {**base, "seed": cfg.seed, "concept": r.concept, "layer": r.layer, "condition": r.condition,
                  "patched_concept": r.patched_concept, "n_seeds": int(r["count"]), "n_prompts": cfg.n}  # fmt: skip
        out_rows.append({**common, "metric": r.metric, "value": float(r["mean"])})
        std = float(r["std"]) if r["count"] > 1 else float("nan")
        out_rows.append({**common, "metric": f"{r.metric}_std", "value": std})
    metrics = pd.DataFrame(out_rows + pair_rows)
    for frame in (metrics, per_seed):
        frame["layer"] = frame["layer"].astype("Int64")
        frame["position"] = frame["position"].astype("Int64")
    per_seed = _ordered(per_seed)
    metrics = _ordered(metrics)
    return per_seed, metrics


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    front = METRIC_COLUMNS + ["condition"]
    return frame[front + [c for c in frame.columns if c not in front]].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------
# Results folder and figures (shared with finetune)


def write_results(
    folder: Path,
    metrics: pd.DataFrame,
    record: dict[str, Any],
    predictions: list[dict[str, Any]] | None = None,
    per_seed: pd.DataFrame | None = None,
) -> None:
    """``metrics.parquet`` (METRIC_COLUMNS + condition first), ``run.json``, ``predictions.jsonl``, atomically."""

    folder.mkdir(parents=True, exist_ok=True)
    missing = [c for c in METRIC_COLUMNS + ["condition"] if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics frame lacks columns {missing}")
    for name, frame in (("metrics.parquet", metrics), ("per_seed.parquet", per_seed)):
        if frame is None:
            continue
        from conceptprobe.store import atomic_write_parquet

        atomic_write_parquet(folder / name, _ordered(frame))
    if predictions is not None:
        text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in predictions)
        atomic_write_text(folder / "predictions.jsonl", text)
    atomic_write_text(folder / "run.json", json.dumps(record, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return str(obj)


def plot_patching(
    metrics: pd.DataFrame,
    folder: Path,
    title: str = "",
    cross_layer: int | None = None,
    concepts: Sequence[str] | None = None,
) -> list[Path]:
    """``patch_heatmap.png``: accuracy change (mean over seeds, ± std) per concept x layer, one panel per
    condition; ``patch_cross.png``: the share of answers following the patched concept B, per (A, B)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written: list[Path] = []
    delta = metrics[metrics.metric == "patch_delta_accuracy"]
    std = metrics[metrics.metric == "patch_delta_accuracy_std"]
    conds = [c for c in ("positive", "negative", "cross") if c in set(delta.condition)]
    if not conds:
        return written
    present = set(delta.concept)
    order = [c for c in (concepts or sorted(present - {"all"})) if c in present]
    concepts = order + (["all"] if "all" in present else [])
    layers = sorted(int(v) for v in set(delta.layer.dropna()))
    width = 1.2 + len(conds) * (0.5 * len(layers) + 0.6)
    fig, axes = plt.subplots(
        1, len(conds), figsize=(width + 1.5, 0.42 * len(concepts) + 1.4), squeeze=False, sharey=True
    )
    for ax, cond in zip(axes[0], conds, strict=True):
        d = delta[delta.condition == cond].pivot_table(index="concept", columns="layer", values="value")
        s = std[std.condition == cond].pivot_table(index="concept", columns="layer", values="value")
        d = d.reindex(index=concepts, columns=layers)
        s = s.reindex(index=concepts, columns=layers)
        im = ax.imshow(d.to_numpy(float), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(layers)), [str(v) for v in layers])
        ax.set_yticks(range(len(concepts)), concepts)
        ax.set_xlabel("layer")
        ax.set_title({"negative": "negative (null)", "cross": "cross (other B)"}.get(cond, cond), fontsize=9)
        ax.grid(False)
        if len(layers) <= 12:
            for i in range(len(concepts)):
                for j in range(len(layers)):
                    v, e = d.iat[i, j], s.iat[i, j]
                    if np.isfinite(v):
                        label = f"{v:+.2f}" + (f"\n±{e:.2f}" if np.isfinite(e) else "")
                        ax.text(j, i, label, ha="center", va="center", fontsize=6.5)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="patched − baseline accuracy")
    fig.suptitle(f"{title}\nΔ ICL accuracy (patched − baseline), mean ± std over seeds", fontsize=9)
    path = folder / "patch_heatmap.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

    pairs = metrics[metrics.metric == "patch_follow_rate_pair"]
    if len(pairs):
        layer = cross_layer if cross_layer in layers else layers[0]
        m = pairs[pairs.layer == layer].pivot_table(
            index="concept", columns="patched_concept", values="value"
        )
        cross_concepts = [c for c in concepts if c != "all" and c in set(pairs.concept)]
        m = m.reindex(index=cross_concepts, columns=cross_concepts)
        fig, ax = plt.subplots(figsize=(0.6 * len(cross_concepts) + 2.2, 0.5 * len(cross_concepts) + 1.4))
        im = ax.imshow(m.to_numpy(float), cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(cross_concepts)), cross_concepts, rotation=45, ha="right")
        ax.set_yticks(range(len(cross_concepts)), cross_concepts)
        ax.set_xlabel("patched concept B")
        ax.set_ylabel("prompt concept A")
        for i in range(len(cross_concepts)):
            for j in range(len(cross_concepts)):
                v = m.iat[i, j]
                if np.isfinite(v):
                    ax.text(
                        j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k"
                    )
        ax.set_title(f"answers following B (layer {layer})", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
        path = folder / "patch_cross.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
