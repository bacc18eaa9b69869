"""Head ablation: knock out the top-k induction heads, and k random heads as the control, and measure what
changes (Olsson et al. 2022's ablation evidence, extended to the concept tasks).

    from conceptprobe.experiments.ablation import AblationConfig, ablate
    result = ablate(AblationConfig(model="smollm2-135m", heads_folder="results/heads/smollm2-135m"), out="abl")
    result.metrics  # long form: condition, draw, heads, metric, value, ci_low, ci_high, std, delta

Conditions: ``baseline`` (nothing ablated), ``induction`` (the top-k heads of the heads folder's ranking:
the induction heads by both scores first, in order of prefix matching, then the other heads by prefix
matching) and ``control``: ``draws`` sets of k heads drawn at random, either uniformly over every head but
the ablated induction heads (``control="random"``) or one head from the same block as each ablated head
(``"layer-matched"``). Each ablation overwrites the head's slice of the attention output before the output
projection (:class:`conceptprobe.hooks.HeadAblation`) with zeros or with the head's mean output over the
ICL-score contexts, in every forward pass, generation included.

Measures of each condition, through the package's own experiments run under the ablation:

- ICL score (:func:`conceptprobe.experiments.icl.icl_score`) on ``n_contexts`` corpus contexts (default 16,
  which keeps one condition of a 135M model to seconds on a CPU; the 95% interval is a bootstrap over
  contexts);
- prefix matching (:mod:`conceptprobe.measures.induction`) on ``n_seqs`` repeated random-token sequences: the
  mean over the top-k ranked heads (a fixed set: the baseline's top k, whether or not this condition ablates
  them; a head's attention pattern changes only through the heads upstream of it) and the best head this
  condition leaves intact; 95% bootstrap interval over sequences;
- per concept task, the probe run (:func:`conceptprobe.experiments.probe.run`) at ``shots`` (default 4) with
  ``n`` prompts per concept: ICL accuracy without the ``null`` concept, bootstrap interval over prompts, and
  k-NN decodability ``cd_knn`` of every concept at the baseline's held-out peak layer (chosen on the
  unablated run, then kept fixed), bootstrap interval over prompts.

The control's summary rows (``condition="control"``, ``draw`` empty) hold the mean over draws and its
``std``; ``delta`` is each row's value minus the baseline's. With ``out`` the folder holds ``ablation.json``
(the record), ``metrics.parquet``, ``predictions.jsonl`` and ``ablation.png``.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from conceptprobe.config import Dtype
from conceptprobe.experiments.common import metrics_frame, model_columns, set_threads

HEAD_LABEL = re.compile(r"^L(\d+)H(\d+)$")
CONDITIONS = ("baseline", "induction", "control")
EXTRA_COLUMNS = ("condition", "draw", "heads", "n", "std", "delta")


def parse_head(label: str) -> tuple[int, int]:
    """``"L18H6"`` -> ``(18, 6)`` (block, head)."""
    got = HEAD_LABEL.match(str(label).strip())
    if not got:
        raise ValueError(f"head {label!r} is not a label like L18H6 (decoder block 18, head 6)")
    return int(got.group(1)), int(got.group(2))


def head_label(block: int, head: int) -> str:
    return f"L{block}H{head}"


class AblationConfig(BaseModel):
    """Settings of a head ablation (the defaults of ``conceptprobe ablate``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="packaged alias, .gguf file, local folder or hub id")
    revision: str | None = Field(None, description="hub branch, tag or commit")
    dtype: Dtype = Field(
        "auto", validate_default=True, description="auto: bfloat16 where native, else float32"
    )
    heads_folder: str | None = Field(
        None, description="folder of `conceptprobe heads` for this model (its heads.json ranks the heads)"
    )
    heads: list[str] | None = Field(None, description="explicit heads to ablate, e.g. ['L3H1', 'L4H0']")
    k: int = Field(5, ge=1, description="heads ablated: the top k of the ranking (explicit heads: all)")
    control: Literal["random", "layer-matched"] = "random"
    draws: int = Field(5, ge=1, le=1000, description="random control sets")
    mode: Literal["zero", "mean"] = "zero"
    seed: int = Field(0, ge=0, lt=2**32)
    n_contexts: int = Field(
        16, ge=1, le=100_000, description="ICL-score contexts (and mean-ablation reference)"
    )
    n_tokens: int = Field(512, ge=2, le=1_000_000, description="text tokens per ICL-score context")
    late: int = Field(500, ge=2)
    early: int = Field(50, ge=1)
    corpus: Literal["stdlib-docs", "stdlib-source", "licenses"] = "stdlib-docs"
    icl_batch_size: int = Field(4, ge=1)
    n_seqs: int = Field(
        20, ge=2, le=10_000, description="repeated random-token sequences for prefix matching"
    )
    seq_len: int = Field(25, ge=2, le=4096, description="distinct random tokens per repeat")
    repeats: int = Field(4, ge=2, le=64, description="times each sequence is repeated")
    tasks: list[str] = Field(default_factory=lambda: ["bitwise", "pos"], description="concept tasks")
    shots: int = Field(4, ge=0, le=256)
    n: int = Field(20, ge=2, description="prompts per concept")
    batch_size: int = Field(16, ge=1)
    knn_k: int = Field(10, ge=1)
    n_permutations: int = Field(20, ge=1, description="k-NN null permutations of the baseline's layer scan")
    n_bootstrap: int = Field(1000, ge=10, description="bootstrap resamples of every interval")
    threads: int | None = Field(None, ge=1)

    @field_validator("heads")
    @classmethod
    def _labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("heads is empty: list heads like L3H1, or leave it out to use heads_folder")
            for label in value:
                parse_head(label)
        return value

    @model_validator(mode="after")
    def _check(self) -> AblationConfig:
        if self.heads is not None and self.heads_folder is not None:
            raise ValueError("give heads_folder or explicit heads, not both")
        if not 1 <= self.early < self.late <= self.n_tokens:
            raise ValueError(
                f"need 1 <= early ({self.early}) < late ({self.late}) <= n_tokens ({self.n_tokens})"
            )
        return self


@dataclass
class AblationResult:
    """The long-form metrics, the record written as ``ablation.json`` and every prediction."""

    metrics: Any
    record: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    folder: Path | None = None


# ------------------------------------------------------------------ which heads


def read_heads_record(folder: str | Path) -> dict[str, Any]:
    """``heads.json`` of a heads folder (or the file itself)."""
    path = Path(folder)
    path = path / "heads.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist; run `conceptprobe heads --model M --out {path.parent}` first"
        )
    return json.loads(path.read_text())


def rank_heads(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every head of a heads record, ranked: the induction heads (both scores over their thresholds) first,
    in the record's order (prefix matching, descending), then the others by prefix matching."""
    pm = record["prefix_matching"]
    copying = record.get("copying")
    induction = [(int(r["block"]), int(r["head"])) for r in record.get("induction_heads") or []]
    rest = sorted(
        ((b, h) for b in range(len(pm)) for h in range(len(pm[b])) if (b, h) not in induction),
        key=lambda bh: -pm[bh[0]][bh[1]],
    )
    return [
        {
            "label": head_label(b, h),
            "block": b,
            "head": h,
            "prefix_matching": float(pm[b][h]),
            "copying": None if copying is None else float(copying[b][h]),
            "induction_head": (b, h) in induction,
        }
        for b, h in [*induction, *rest]
    ]


def control_sets(
    ablated: list[tuple[int, int]],
    n_blocks: int,
    n_heads: int,
    kind: str,
    draws: int,
    seed: int,
) -> list[list[tuple[int, int]]]:
    """``draws`` control sets of ``len(ablated)`` heads, never containing an ablated head; distinct sets
    while the pool allows. ``random``: uniform over every other head; ``layer-matched``: for each ablated
    head one other head of its block."""
    import numpy as np

    taken = set(ablated)
    k = len(ablated)
    pool = [(b, h) for b in range(n_blocks) for h in range(n_heads) if (b, h) not in taken]
    if kind == "random" and len(pool) < k:
        raise ValueError(f"only {len(pool)} heads are left for a random control of {k}; lower k")
    if kind == "layer-matched":
        for b in {b for b, _ in ablated}:
            need = sum(1 for bb, _ in ablated if bb == b)
            if sum(1 for bb, _ in pool if bb == b) < need:
                raise ValueError(
                    f"block {b} has too few other heads for a layer-matched control; use control random"
                )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xAB1A7E]))
    out: list[list[tuple[int, int]]] = []
    seen: set[frozenset[tuple[int, int]]] = set()
    for _ in range(draws):
        for _attempt in range(100):
            if kind == "random":
                picked = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
            else:
                picked = []
                for b, _h in ablated:
                    options = [p for p in pool if p[0] == b and p not in picked]
                    picked.append(options[int(rng.integers(len(options)))])
            if frozenset(picked) not in seen:
                break
        seen.add(frozenset(picked))
        out.append(sorted(picked))
    return out


# ------------------------------------------------------------------ prefix matching under ablation


def prefix_matching_per_sequence(model: Any, ids: Any, first_query: int) -> Any:
    """Prefix matching of every head on each sequence separately: ``[n_seqs, n_blocks, n_heads]`` (numpy)."""
    import numpy as np

    from conceptprobe.measures.induction import attention_and_residuals, prefix_matching_scores

    out = []
    for i in range(ids.shape[0]):
        attn, _ = attention_and_residuals(model, ids[i : i + 1])
        out.append(prefix_matching_scores(attn, ids[i : i + 1], first_query).numpy())
    return np.stack(out)


def mean_with_interval(values: Any, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean of ``values`` ``[n]`` and its 95% percentile bootstrap interval over the ``n`` items."""
    import numpy as np

    from conceptprobe.measures.controls import bootstrap_interval

    v = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_interval(v, np.zeros(len(v), dtype=int), n_boot=n_boot, seed=seed)
    return float(v.mean()), float(low), float(high)


# ------------------------------------------------------------------ the experiment


def ablate(
    config: AblationConfig,
    out: str | Path | None = None,
    *,
    loaded: Any = None,
    tasks_dir: str | Path | None = None,
    progress: bool = True,
) -> AblationResult:
    """Run the baseline, the induction-head ablation and the control draws; write ``out`` when given."""
    from conceptprobe.config import RunConfig
    from conceptprobe.corpus import iter_corpus
    from conceptprobe.experiments.heads import HeadsConfig, head_scores, sequence_tokens
    from conceptprobe.experiments.icl import IclScoreConfig, icl_score
    from conceptprobe.experiments.probe import headline
    from conceptprobe.experiments.probe import run as probe_run
    from conceptprobe.hooks import HeadAblation, check_heads, head_layout, head_output_means
    from conceptprobe.measures.icl_score import build_contexts
    from conceptprobe.models import load_model
    from conceptprobe.store import package_versions

    c = config
    threads = set_threads(c.threads)
    started = time.perf_counter()
    loaded = loaded or load_model(c.model, dtype=c.dtype, revision=c.revision)
    info, model = loaded.info, loaded.model
    n_blocks, n_heads, head_dim = head_layout(model)

    # the heads: explicit, from a heads folder, or scored here
    if c.heads is not None:
        chosen = check_heads(model, [parse_head(h) for h in c.heads])
        ranking, source = None, "explicit"
    else:
        if c.heads_folder is not None:
            heads_record, source = read_heads_record(c.heads_folder), str(c.heads_folder)
        else:
            scored = head_scores(
                HeadsConfig(model=c.model, dtype=c.dtype, seed=c.seed), loaded=loaded, progress=False
            )
            heads_record, source = scored.record, "scored here (conceptprobe heads defaults)"
        rec_shape = (int(heads_record.get("n_blocks", len(heads_record["prefix_matching"]))),)
        rec_shape += (int(heads_record.get("n_heads", len(heads_record["prefix_matching"][0]))),)
        if rec_shape != (n_blocks, n_heads):
            raise ValueError(
                f"{source} scores a model with {rec_shape[0]} blocks x {rec_shape[1]} heads; {c.model} has "
                f"{n_blocks} x {n_heads}: pass the heads folder of this model (conceptprobe heads --model {c.model})"
            )
        ranking = rank_heads(heads_record)
        chosen = check_heads(model, [(r["block"], r["head"]) for r in ranking[: c.k]])
    controls = control_sets(chosen, n_blocks, n_heads, c.control, c.draws, c.seed)
    conditions: list[tuple[str, int | None, list[tuple[int, int]]]] = [
        ("baseline", None, []),
        ("induction", None, chosen),
        *[("control", d, heads) for d, heads in enumerate(controls)],
    ]

    from conceptprobe.measures.induction import repeated_random_tokens

    candidates, pm_prefix = sequence_tokens(loaded, None, 200, c.seed)
    pm_ids = repeated_random_tokens(candidates, c.n_seqs, c.seq_len, c.repeats, pm_prefix, c.seed)
    pm_first = len(pm_prefix) + c.seq_len
    top_k = chosen if ranking is None else [(r["block"], r["head"]) for r in ranking[: c.k]]

    means = None
    if c.mode == "mean":
        contexts = build_contexts(loaded.tokenizer, iter_corpus(c.corpus, c.seed), c.n_contexts, c.n_tokens)
        means = head_output_means(model, contexts.input_ids, batch_size=c.icl_batch_size)

    icl_cfg = IclScoreConfig(
        model=c.model, revision=c.revision, corpus=c.corpus, n_contexts=c.n_contexts, n_tokens=c.n_tokens,
        late=c.late, early=c.early, batch_size=c.icl_batch_size, dtype=c.dtype, seed=c.seed,
        n_boot=c.n_bootstrap, window=0,
    )  # fmt: skip

    def run_config(task: str, layers: Any) -> RunConfig:
        return RunConfig(
            model=c.model, revision=c.revision, task=task, shots=c.shots, n=c.n, seed=c.seed, dtype=c.dtype,
            layers=layers, batch_size=c.batch_size, knn_k=c.knn_k, n_permutations=c.n_permutations,
            probe_permutations=0, probe_null_layers=1, n_bootstrap=c.n_bootstrap,
            tasks_dir=str(tasks_dir) if tasks_dir else None,
        )  # fmt: skip

    base_cols = {**model_columns(info, c.seed), "position": None}
    rows: list[dict[str, Any]] = []
    predictions: list[dict[str, Any]] = []
    per_condition: list[dict[str, Any]] = []
    peaks: dict[str, int] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="conceptprobe-ablation-") as tmp:
        for condition, draw, heads in conditions:
            t0 = time.perf_counter()
            name = condition if draw is None else f"{condition}{draw}"
            labels = [head_label(b, h) for b, h in heads]
            tag = {"condition": condition, "draw": draw, "heads": ",".join(labels)}
            entry: dict[str, Any] = {**tag, "heads": labels, "tasks": {}}
            with HeadAblation(model, heads, c.mode, means):
                icl = icl_score(icl_cfg, loaded=loaded, progress=False).score
                entry["icl_score"] = {
                    "value": icl.score,
                    "ci": [icl.ci_low, icl.ci_high],
                    "n": icl.n_contexts,
                }
                rows.append(
                    {**base_cols, **tag, "task": "icl", "layer": None, "metric": "icl_score", "value": icl.score,
                     "ci_low": icl.ci_low, "ci_high": icl.ci_high, "n": icl.n_contexts}
                )  # fmt: skip
                pm = prefix_matching_per_sequence(model, pm_ids, pm_first)  # [seq, block, head]
                intact = [(b, h) for b in range(n_blocks) for h in range(n_heads) if (b, h) not in set(heads)]
                best = max(intact, key=lambda bh: float(pm[:, bh[0], bh[1]].mean()))
                pm_values = {
                    "prefix_matching_top_k": pm[:, [b for b, _ in top_k], [h for _, h in top_k]].mean(axis=1),
                    "prefix_matching_best_intact": pm[:, best[0], best[1]],
                }
                entry["induction"] = {}
                for metric, per_seq in pm_values.items():
                    value, low, high = mean_with_interval(per_seq, c.n_bootstrap, c.seed)
                    cell = {"value": value, "ci": [low, high], "n": c.n_seqs}
                    if metric == "prefix_matching_best_intact":
                        cell["head"] = head_label(*best)
                    entry["induction"][metric] = cell
                    rows.append(
                        {**base_cols, **tag, "task": "induction", "layer": None, "metric": metric, "value": value,
                         "ci_low": low, "ci_high": high, "n": c.n_seqs}
                    )  # fmt: skip
                for task in c.tasks:
                    layers = "all" if condition == "baseline" else [peaks[task]]
                    got = probe_run(
                        run_config(task, layers), Path(tmp) / name / task, loaded=loaded, progress=progress,
                        tasks_dir=tasks_dir,
                    )  # fmt: skip
                    head = headline(got.metrics)
                    if condition == "baseline":
                        peaks[task] = int(head.get("heldout_peak_layer", head["peak_layer_in_sample"]))
                    peak = peaks[task]
                    frame = got.metrics
                    acc = head["icl_accuracy"]
                    knn = frame[(frame.metric.str.startswith("cd_knn")) & (frame.concept == "all")]
                    knn = knn[knn.layer == peak].set_index("metric")["value"]
                    cd = {"value": float(knn["cd_knn"]), "ci": [float(knn["cd_knn_ci_low"]),
                          float(knn["cd_knn_ci_high"])], "layer": peak, "n": len(got.predictions)}  # fmt: skip
                    entry["tasks"][task] = {"icl_accuracy": acc, "cd_knn": cd}
                    common = {**base_cols, **tag, "task": task, "shots": c.shots}
                    rows.append(
                        {**common, "concept": acc["concepts"], "layer": None, "metric": "icl_accuracy",
                         "value": acc["value"], "ci_low": acc["ci"][0], "ci_high": acc["ci"][1], "n": acc["n"]}
                    )  # fmt: skip
                    rows.append(
                        {**common, "concept": "all", "layer": peak, "metric": "cd_knn", "value": cd["value"],
                         "ci_low": cd["ci"][0], "ci_high": cd["ci"][1], "n": cd["n"]}
                    )  # fmt: skip
                    predictions += [{**tag, "task": task, **p} for p in got.predictions]
            seconds[name] = round(time.perf_counter() - t0, 2)
            entry["seconds"] = seconds[name]
            per_condition.append(entry)
    metrics = _with_summary(rows)
    record = {
        "kind": "ablation",
        "measure": "head_ablation",
        "head_numbering": "L<b>H<h>: decoder block b (0-based), query head h; block b reads residual-stream "
        "layer b and writes layer b+1",
        "definitions": {
            "ablation": f"{c.mode}-ablation: the head's slice of the attention output before o_proj is set to "
            + ("zero" if c.mode == "zero" else "its mean over every token of the ICL-score contexts")
            + " in every forward pass",
            "induction": "the top k heads of the ranking: induction heads (prefix matching and copying over "
            "their thresholds) first, then the other heads by prefix matching"
            if c.heads is None
            else "the explicit heads of the config",
            "control": "k heads drawn uniformly from every head but the ablated ones"
            if c.control == "random"
            else "for each ablated head, one other head of the same block, drawn uniformly",
            "icl_score": f"loss(token {c.late}) - loss(token {c.early}) over {c.n_contexts} contexts; 95% "
            "bootstrap interval over contexts",
            "prefix_matching_top_k": f"mean prefix matching of the ranking's top {c.k} heads (a fixed set) on "
            f"{c.n_seqs} sequences of {c.seq_len} random tokens x {c.repeats}; 95% bootstrap interval over "
            "sequences",
            "prefix_matching_best_intact": "prefix matching of the best head this condition does not ablate "
            "(chosen per condition); 95% bootstrap interval over sequences",
            "icl_accuracy": f"{c.shots}-shot greedy exact match over every concept but null; 95% bootstrap "
            "interval over prompts",
            "cd_knn": "k-NN decodability of every concept at the baseline's held-out peak layer (fixed for "
            "every condition); 95% bootstrap interval over prompts",
            "control summary": "rows with condition control and no draw: mean over draws, std across draws",
            "delta": "value minus the baseline's value",
            "paired_accuracy": "accuracy change from the baseline over the same prompts: induction with a 95% "
            "bootstrap interval of the paired per-prompt differences; control: each draw's change, mean and std",
        },
        "model": info.to_dict(),
        "config": c.model_dump(mode="json"),
        "heads_source": source,
        "n_blocks": n_blocks,
        "n_heads": n_heads,
        "head_dim": head_dim,
        "ablated": [head_label(b, h) for b, h in chosen],
        "ablated_detail": None if ranking is None else ranking[: len(chosen)],
        "n_induction_heads": None if ranking is None else sum(r["induction_head"] for r in ranking),
        "control_sets": [[head_label(b, h) for b, h in s] for s in controls],
        "peak_layers": peaks,
        "conditions": per_condition,
        "summary": summary(metrics),
        "paired_accuracy": paired_accuracy_changes(predictions, c.n_bootstrap, c.seed),
        "settings": {"threads": threads, "dtype": c.dtype, "seed": c.seed},
        "seconds": {
            "load": info.load_seconds,
            "conditions": seconds,
            "total": round(time.perf_counter() - started, 2),
        },
        "versions": package_versions(),
    }
    result = AblationResult(metrics, record, predictions)
    if out is not None:
        result.folder = write_ablation_folder(Path(out), result, f"{info.alias or c.model} ({info.dtype})")
    return result


def _with_summary(rows: list[dict[str, Any]]) -> Any:
    """The per-condition rows, the control's mean and std over draws, and each row's delta to baseline."""
    import pandas as pd

    frame = metrics_frame(rows, EXTRA_COLUMNS)
    key = ["task", "concept", "layer", "metric"]
    ctrl = frame[frame.condition == "control"]
    if len(ctrl):
        groups = ctrl.groupby(key, dropna=False, sort=False)
        summ = groups.first().reset_index()
        summ["value"] = groups["value"].mean().to_numpy()
        summ["std"] = groups["value"].std(ddof=1).to_numpy() if ctrl.draw.nunique() > 1 else float("nan")
        summ["ci_low"] = summ["ci_high"] = float("nan")
        summ["draw"] = None
        summ["heads"] = None
        summ["n_draws"] = groups.size().to_numpy()
        frame = pd.concat([frame, summ[frame.columns.intersection(summ.columns).tolist() + ["n_draws"]]])
    ids = pd.Index(["|".join(map(str, row)) for row in frame[key].itertuples(index=False)])
    base = pd.Series(frame["value"].to_numpy(), index=ids)[(frame.condition == "baseline").to_numpy()]
    frame["delta"] = frame["value"].to_numpy() - base.reindex(ids).to_numpy()
    frame["std"] = pd.to_numeric(frame["std"], errors="coerce").astype(float)
    frame["draw"] = frame["draw"].astype("Int64")
    frame["layer"] = frame["layer"].astype("Int64")
    return frame.reset_index(drop=True)


def summary(metrics: Any) -> list[dict[str, Any]]:
    """One entry per measure: baseline and induction with their intervals, the control's mean and std."""
    import pandas as pd

    out = []
    sel = metrics[metrics.draw.isna()]
    for (task, metric), group in sel.groupby(["task", "metric"], sort=False):
        entry: dict[str, Any] = {"task": task, "metric": metric}
        for _, row in group.iterrows():
            cell = {"value": float(row.value), "delta": float(row.delta)}
            if row.condition == "control":
                cell |= {"std": float(row["std"]), "draws": int(row.get("n_draws", 0) or 0)}
            else:
                cell["ci"] = [float(row.ci_low), float(row.ci_high)]
            if pd.notna(row.layer):
                entry["layer"] = int(row.layer)
            entry[row.condition] = cell
        out.append(entry)
    return out


def paired_accuracy_changes(
    predictions: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Per task, the change in accuracy (without ``null``) from the baseline, paired over the same prompts.

    ``induction``: the mean of (ablated - intact) correctness per prompt with its 95% bootstrap interval
    (prompts resampled within their concept); ``control``: each draw's paired change, their mean and std.
    Pairing removes the prompts' own difficulty from the interval, which the per-condition intervals keep.
    """
    import numpy as np

    from conceptprobe.measures.controls import bootstrap_interval

    def outcomes(cond: str, task: str, draw: Any = None) -> dict[tuple[str, int], float]:
        return {
            (p["concept"], int(p["index"])): float(bool(p["correct"]))
            for p in predictions
            if p["condition"] == cond
            and p["task"] == task
            and p.get("draw") == draw
            and p["concept"] != "null"
        }

    out = []
    for task in dict.fromkeys(p["task"] for p in predictions):
        base = outcomes("baseline", task)
        keys = sorted(base)
        if not keys:
            continue
        y = np.array([k[0] for k in keys])
        entry: dict[str, Any] = {"task": task, "metric": "icl_accuracy", "n": len(keys)}
        ablated = outcomes("induction", task)
        if set(ablated) == set(keys):
            diff = np.array([ablated[k] - base[k] for k in keys])
            low, high = bootstrap_interval(diff, y, n_boot, seed=seed)
            entry["induction"] = {"delta": float(diff.mean()), "ci": [float(low), float(high)]}
        draws = sorted({p["draw"] for p in predictions if p["condition"] == "control" and p["task"] == task})
        deltas = []
        for draw in draws:
            ctrl = outcomes("control", task, draw)
            if set(ctrl) == set(keys):
                deltas.append(float(np.mean([ctrl[k] - base[k] for k in keys])))
        if deltas:
            sd = float(np.std(deltas, ddof=1)) if len(deltas) > 1 else float("nan")
            entry["control"] = {
                "delta": float(np.mean(deltas)),
                "std": sd,
                "draws": len(deltas),
                "each": deltas,
            }
        out.append(entry)
    return out


def add_paired_changes(folder: str | Path, n_boot: int = 1000) -> dict[str, Any]:
    """Compute :func:`paired_accuracy_changes` from a folder's ``predictions.jsonl`` and store them in its
    ``ablation.json`` (``paired_accuracy``); returns the updated record."""
    from conceptprobe.store import atomic_write_text

    folder = Path(folder)
    record = json.loads((folder / "ablation.json").read_text())
    lines = (folder / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines if line.strip()]
    seed = int(record.get("config", {}).get("seed", 0))
    record["paired_accuracy"] = paired_accuracy_changes(predictions, n_boot, seed)
    atomic_write_text(folder / "ablation.json", json.dumps(record, indent=2, default=str) + "\n")
    return record


def measure_name(task: str, metric: str) -> str:
    names = {
        "icl_score": "ICL score",
        "prefix_matching_top_k": "prefix matching, top-k heads",
        "prefix_matching_best_intact": "prefix matching, best intact head",
    }
    return names.get(metric) or f"{task} {metric.replace('icl_accuracy', 'accuracy')}"


def summary_table(record: dict[str, Any]) -> str:
    """Plain-text table: measure x condition, with intervals (control: mean ± std over draws)."""
    head = ["measure", "baseline [95% CI]", "induction [95% CI]", f"control ({record['config']['control']})"]
    lines = [head]
    for e in record["summary"]:
        row = [measure_name(e["task"], e["metric"])]
        for cond in ("baseline", "induction"):
            cell = e.get(cond)
            row.append(f"{cell['value']:.3f} [{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]" if cell else "")
        ctrl = e.get("control")
        row.append(f"{ctrl['value']:.3f} ± {ctrl['std']:.3f} (n={ctrl['draws']})" if ctrl else "")
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in lines)


def ablation_figure(record: dict[str, Any], title: str) -> Any:
    """One panel per measure of an ``ablation.json`` record: baseline and induction bars with their 95%
    intervals, the control's mean over draws with ± std and each draw as a dot (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    entries = record["summary"]
    draws: dict[tuple[str, str], list[float]] = {}
    for cond in record["conditions"]:
        if cond["condition"] != "control":
            continue
        draws.setdefault(("icl", "icl_score"), []).append(cond["icl_score"]["value"])
        for metric, got in (cond.get("induction") or {}).items():
            draws.setdefault(("induction", metric), []).append(got["value"])
        for task, got in cond["tasks"].items():
            for metric in ("icl_accuracy", "cd_knn"):
                draws.setdefault((task, metric), []).append(got[metric]["value"])
    cols = min(4, len(entries))
    rows_n = -(-len(entries) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.0 * cols + 0.4, 3.1 * rows_n), squeeze=False)
    for ax in axes.flat[len(entries) :]:
        ax.set_visible(False)
    colours = {"baseline": "#777777", "induction": "#d62728", "control": "#1f77b4"}
    for ax, e in zip(axes.flat, entries, strict=False):
        for x, cond in enumerate(CONDITIONS):
            cell = e.get(cond)
            if not cell:
                continue
            if cond == "control":
                err = [[cell["std"]], [cell["std"]]] if cell["std"] == cell["std"] else None
                pts = draws.get((e["task"], e["metric"]), [])
                ax.scatter([x] * len(pts), pts, s=10, color="black", zorder=3)
            else:
                err = [[cell["value"] - cell["ci"][0]], [cell["ci"][1] - cell["value"]]]
            ax.bar(x, cell["value"], color=colours[cond], yerr=err, capsize=4)
        ablated = (
            "ablated" if record["heads_source"] == "explicit" else f"top-{len(record['ablated'])}\ninduction"
        )
        ax.set_xticks(range(3), ["baseline", ablated, "control"])
        ax.set_title(
            measure_name(e["task"], e["metric"]) + (f" (layer {e['layer']})" if "layer" in e else ""),
            fontsize=9,
        )
        ax.axhline(0, color="black", lw=0.5)
    fig.suptitle(
        f"{title}: {record['config']['mode']}-ablation of {len(record['ablated'])} heads", fontsize=10
    )
    fig.tight_layout()
    return fig


def plot_ablation(record: dict[str, Any], path: str | Path, title: str) -> None:
    """:func:`ablation_figure` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = ablation_figure(record, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_ablation_folder(folder: Path, result: AblationResult, title: str) -> Path:
    """``ablation.json``, ``metrics.parquet``, ``predictions.jsonl`` and ``ablation.png`` in ``folder``."""
    from conceptprobe.store import atomic_write_parquet, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    plot_ablation(result.record, folder / "ablation.png", title)
    atomic_write_parquet(folder / "metrics.parquet", result.metrics)
    lines = "".join(json.dumps(p, default=str) + "\n" for p in result.predictions)
    atomic_write_text(folder / "predictions.jsonl", lines)
    atomic_write_text(folder / "ablation.json", json.dumps(result.record, indent=2, default=str) + "\n")
    return folder
