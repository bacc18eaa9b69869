"""Checkpoint sweeps: the same measures at every training checkpoint of a model, keyed by training step.

    from conceptprobe.experiments.checkpoints import checkpoint_sweep, load_checkpoint_config
    result = checkpoint_sweep(load_checkpoint_config("probes/checkpoints-induction-cpu.yaml"), out="ck")
    result.metrics  # long form with a step column

Checkpoints come from a ``conceptprobe train`` folder or from model entries (hub ``ref`` + ``revision``,
local ``ref`` + ``step``; :mod:`.checkpoint_config`). Every checkpoint loads through
:func:`conceptprobe.models.load_model` (training checkpoints through its documented adapter,
:mod:`conceptprobe.models.training_checkpoint`).

**Measures.** Head rows are per decoder block: ``layer`` = block b (0-based; it reads residual-stream layer b
and writes b + 1), ``head`` = its query head (labels ``L<b>H<h>``).

- *Training checkpoints* are measured by the trainer's own tracker
  (:class:`conceptprobe.training.tracking.InductionTracker`) on the run's evaluation data and settings, so
  the numbers are the ones ``conceptprobe train`` tracked at the same step: ``loss``, ``loss_copy``,
  ``loss_fresh``, ``icl_score`` (loss of token ``round(T*500/512)`` minus token ``round(T*50/512)``; 95%
  bootstrap interval over the run's ``n_contexts`` sequences, 500 resamples), ``prefix_matching`` and
  ``copying_in_context`` per head (the trainer's column ``copying``), plus Olsson's ``copying`` from the
  weights (:func:`conceptprobe.measures.induction.ov_copying_scores`). They are measured in float32.
- *Pretrained LMs*: the ICL score of :func:`conceptprobe.experiments.icl.icl_score` (corpus contexts,
  ``late``/``early`` tokens), the head scores of :func:`conceptprobe.experiments.heads.head_scores` and, per
  concept task, a probe run (:func:`conceptprobe.experiments.probe.run`): ``icl_accuracy`` (without null)
  and k-NN decodability at the run's held-out peak layer (``cd_knn_heldout_peak``), each with its 95%
  bootstrap interval, and their controls (``cd_knn_null_p95``, ``cd_knn_heldout_selectivity``,
  ``surface_best``), plus ``cd_knn`` at every layer.

Summaries of the heads, per checkpoint: ``prefix_matching_max`` (best head; its block and head in ``layer``
and ``head``), ``prefix_matching_top_mean`` (mean of the ``top_heads`` best), ``copying_best_head`` and
``copying_top_mean`` (Olsson's copying of those heads), ``n_prefix_matching_heads`` (prefix matching >=
``threshold``) and ``n_induction_heads`` (and copying >= ``copying_threshold``). Interval columns
``ci_low``/``ci_high`` and the count ``n`` ride along where a value has them.

**Folder** (``out``): ``checkpoints.json`` (the record: config, checkpoints with their summaries, the phase
summary, the check against the trainer's tracked values), ``metrics.parquet`` (long form, ``step`` and
``checkpoint`` columns) and ``checkpoints.png``. While the sweep runs, each measured checkpoint is kept in
``steps/<checkpoint>/`` (``metrics.parquet``, then ``checkpoint.json``, each written atomically), removed
once the record holds them all. Rerunning skips every checkpoint already measured with the same settings
(in ``steps/`` or in the record), so an interrupted sweep resumes and a finished one can be extended.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conceptprobe.experiments.checkpoint_config import (
    Checkpoint,
    CheckpointSweepConfig,
    load_checkpoint_config,
    plan_checkpoints,
    validate_checkpoint_config,
)
from conceptprobe.experiments.common import metrics_frame, model_columns, set_threads

RECORD = "checkpoints.json"
DONE = "checkpoint.json"
EXTRA_COLUMNS = ("step", "checkpoint", "head", "ci_low", "ci_high", "n")
HEAD_METRICS = ("prefix_matching", "copying", "copying_in_context")
#: The measures compared with the trainer's tracked values (sweep name, trainer name).
TRACKED = (
    ("icl_score", "icl_score"),
    ("icl_score_ci_low", "icl_score_ci_low"),
    ("icl_score_ci_high", "icl_score_ci_high"),
    ("prefix_matching", "prefix_matching"),
    ("copying_in_context", "copying"),
    ("loss", "loss"),
)

__all__ = [
    "CheckpointSweepConfig",
    "CheckpointSweepResult",
    "checkpoint_sweep",
    "load_checkpoint_config",
    "validate_checkpoint_config",
]


@dataclass
class CheckpointSweepResult:
    """The long-form metrics of every checkpoint and the record written as ``checkpoints.json``."""

    metrics: Any
    record: dict[str, Any]
    folder: Path | None = None
    measured: list[str] | None = None  # labels measured by this call (the others were read back)


def _head_summaries(pm: Any, copying: Any, config: CheckpointSweepConfig, threshold: float) -> list[dict]:
    """Summary rows of ``pm`` and ``copying`` (``[blocks, heads]`` arrays; copying may be None)."""
    import numpy as np

    pm = np.asarray(pm, dtype=float)
    cp = None if copying is None else np.asarray(copying, dtype=float)
    order = np.argsort(-pm, axis=None, kind="stable")
    k = min(config.top_heads, pm.size)
    top = [np.unravel_index(i, pm.shape) for i in order[:k]]
    best = top[0]
    rows = [
        {
            "metric": "prefix_matching_max",
            "value": float(pm[best]),
            "layer": int(best[0]),
            "head": int(best[1]),
        },
        {"metric": "prefix_matching_top_mean", "value": float(np.mean([pm[t] for t in top])), "n": k},
        {"metric": "n_prefix_matching_heads", "value": float((pm >= threshold).sum())},
    ]
    if cp is not None:
        rows += [
            {
                "metric": "copying_best_head",
                "value": float(cp[best]),
                "layer": int(best[0]),
                "head": int(best[1]),
            },
            {"metric": "copying_top_mean", "value": float(np.mean([cp[t] for t in top])), "n": k},
            {
                "metric": "n_induction_heads",
                "value": float(((pm >= threshold) & (cp >= config.copying_threshold)).sum()),
            },
        ]
    return rows


def _head_rows(name: str, matrix: Any) -> list[dict[str, Any]]:
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    return [
        {"metric": name, "layer": b, "head": h, "value": float(m[b, h])}
        for b in range(m.shape[0])
        for h in range(m.shape[1])
    ]


class _TrainingMeasure:
    """The trainer's tracker of each run folder, built once."""

    def __init__(self) -> None:
        self.trackers: dict[str, tuple[Any, Any]] = {}

    def tracker(self, run_folder: str) -> tuple[Any, Any]:
        if run_folder not in self.trackers:
            import torch

            from conceptprobe.training.tracking import InductionTracker
            from conceptprobe.training.trainer import TrainConfig

            cfg = TrainConfig(**json.loads((Path(run_folder) / "train.json").read_text())["config"])
            self.trackers[run_folder] = (cfg, InductionTracker(cfg, cfg.data_spec(), torch.device("cpu")))
        return self.trackers[run_folder]

    def __call__(self, ck: Checkpoint, loaded: Any, config: CheckpointSweepConfig) -> list[dict[str, Any]]:
        from conceptprobe.measures.induction import THRESHOLD, ov_copying_scores
        from conceptprobe.training.model import n_parameters

        info = loaded.info
        cfg, tracker = self.tracker(info.extra["train_folder"])
        rows, _tensors, _summary = tracker.measure(loaded.model, ck.step)
        base = {  # the columns the trainer gives its own rows
            "model": cfg.name,
            "family": cfg.model_spec().arch,
            "n_params": n_parameters(loaded.model),
            "task": cfg.task,
            "concept": "all",
            "shots": None,
            "position": None,
            "seed": cfg.seed,
        }
        out, ci = [], {}
        for r in rows:
            if r["metric"] in ("icl_score_ci_low", "icl_score_ci_high"):
                ci[r["metric"].removeprefix("icl_score_")] = r["value"]
                continue
            name = "copying_in_context" if r["metric"] == "copying" else r["metric"]
            out.append({**base, **r, "metric": name})
        for r in out:
            if r["metric"] == "icl_score":
                r.update(ci_low=ci["ci_low"], ci_high=ci["ci_high"], n=len(tracker.ids))
        try:
            ov = ov_copying_scores(loaded.model)
        except NotImplementedError:
            ov = None
        if ov is not None:
            out += [{**base, **r} for r in _head_rows("copying", ov)]
        pm = _matrix(out, "prefix_matching")
        out += [{**base, **r} for r in _head_summaries(pm, ov, config, THRESHOLD)]
        return out


def _matrix(rows: list[dict[str, Any]], metric: str) -> Any:
    import numpy as np

    sel = [r for r in rows if r["metric"] == metric]
    n_b = 1 + max(int(r["layer"]) for r in sel)
    n_h = 1 + max(int(r["head"]) for r in sel)
    m = np.full((n_b, n_h), np.nan)
    for r in sel:
        m[int(r["layer"]), int(r["head"])] = r["value"]
    return m


def _measure_pretrained(
    ck: Checkpoint, loaded: Any, config: CheckpointSweepConfig, tasks_dir: Any, progress: bool
) -> list[dict[str, Any]]:
    """ICL score, head scores and concept tasks of a pretrained LM checkpoint."""
    from conceptprobe.config import RunConfig
    from conceptprobe.experiments.heads import HeadsConfig, head_scores
    from conceptprobe.experiments.icl import IclScoreConfig, icl_score
    from conceptprobe.experiments.probe import headline
    from conceptprobe.experiments.probe import run as probe_run

    c = config
    info = loaded.info
    base = {**model_columns(info, c.seed)}
    icl = icl_score(
        IclScoreConfig(
            model=ck.ref,
            revision=ck.revision,
            corpus=c.corpus,
            n_contexts=c.n_contexts,
            n_tokens=c.n_tokens,
            late=c.late,
            early=c.early,
            batch_size=c.icl_batch_size,
            dtype=c.dtype,
            seed=c.seed,
            n_boot=c.n_bootstrap,
            window=0,
        ),
        loaded=loaded,
        progress=False,
    ).score
    rows: list[dict[str, Any]] = [
        {**base, "task": "icl", "concept": "all", "metric": "icl_score", "value": icl.score,
         "ci_low": icl.ci_low, "ci_high": icl.ci_high, "n": icl.n_contexts},
        {**base, "task": "icl", "concept": "all", "metric": f"loss_token_{c.early}", "value": icl.mean_loss_early,
         "n": icl.n_contexts},
        {**base, "task": "icl", "concept": "all", "metric": f"loss_token_{c.late}", "value": icl.mean_loss_late,
         "n": icl.n_contexts},
    ]  # fmt: skip
    heads = head_scores(
        HeadsConfig(
            model=ck.ref,
            revision=ck.revision,
            n_seqs=c.n_seqs,
            seq_len=c.seq_len,
            repeats=c.repeats,
            threshold=c.threshold,
            copying_threshold=c.copying_threshold,
            dtype=c.dtype,
            seed=c.seed,
        ),
        loaded=loaded,
        progress=False,
    )
    hbase = {**base, "task": "induction", "concept": "all", "n": c.n_seqs}
    for name, matrix in (
        ("prefix_matching", heads.prefix_matching),
        ("copying", heads.copying),
        ("copying_in_context", heads.copying_in_context),
    ):
        if matrix is not None:
            rows += [{**hbase, **r} for r in _head_rows(name, matrix)]
    rows += [{**hbase, **r} for r in _head_summaries(heads.prefix_matching, heads.copying, c, c.threshold)]
    with tempfile.TemporaryDirectory(prefix="conceptprobe-checkpoint-") as tmp:
        for task in c.tasks:
            run_cfg = RunConfig(
                model=ck.ref, revision=ck.revision, task=task.name, task_params=task.params, shots=c.shots,
                n=c.n, seed=c.seed, dtype=c.dtype, layers="all", batch_size=c.batch_size, knn_k=c.knn_k,
                n_permutations=c.n_permutations, probe_permutations=0, probe_null_layers=1,
                n_bootstrap=c.n_bootstrap, tasks_dir=str(tasks_dir) if tasks_dir else None,
            )  # fmt: skip
            got = probe_run(
                run_cfg, Path(tmp) / str(task.label), loaded=loaded, progress=progress, tasks_dir=tasks_dir
            )
            rows += _task_rows(
                got.metrics, headline(got.metrics), {**base, "task": task.label, "shots": c.shots}
            )
    return rows


def _task_rows(frame: Any, head: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy and decodability of one probe run, with intervals and controls."""
    acc = head["icl_accuracy"]
    rows = [
        {**base, "concept": acc["concepts"], "metric": "icl_accuracy", "value": acc["value"],
         "ci_low": acc["ci"][0], "ci_high": acc["ci"][1], "n": acc["n"]},
    ]  # fmt: skip
    held = head.get("cd_knn_heldout_peak")
    if held is not None:
        layer = head["heldout_peak_layer"]
        rows += [
            {**base, "concept": "all", "layer": layer, "metric": "cd_knn_heldout_peak", "value": held["value"],
             "ci_low": held["ci"][0], "ci_high": held["ci"][1], "n": held["n"]},
            {**base, "concept": "all", "layer": layer, "metric": "cd_knn_null_p95", "value": held["null_p95"]},
            {**base, "concept": "all", "layer": layer, "metric": "cd_knn_heldout_selectivity",
             "value": held["selectivity"], "ci_low": held["selectivity_ci"][0],
             "ci_high": held["selectivity_ci"][1]},
        ]  # fmt: skip
    surface = head.get("surface_baseline")
    if surface is not None:
        rows.append({**base, "concept": "all", "metric": "surface_best", "value": surface["value"]})
    pos = frame["position"].isna() | (frame["position"] == 0)
    knn = frame[pos & (frame["metric"] == "cd_knn") & (frame["concept"] == "all") & frame["layer"].notna()]
    n = int(knn["n"].iloc[0]) if "n" in knn.columns and len(knn) and knn["n"].notna().any() else None
    rows += [
        {
            **base,
            "concept": "all",
            "layer": int(r["layer"]),
            "metric": "cd_knn",
            "value": float(r["value"]),
            "n": n,
        }
        for _, r in knn.iterrows()
    ]
    return rows


def _read_done(folder: Path, fingerprint: str) -> Any:
    """``(metrics, entry)`` of a checkpoint measured before with the same settings (its ``steps/`` folder of
    an unfinished sweep), else None."""
    import pandas as pd

    marker, path = folder / DONE, folder / "metrics.parquet"
    try:
        done = json.loads(marker.read_text())
        if done.get("fingerprint") != fingerprint:
            return None
        return pd.read_parquet(path), done
    except Exception:  # noqa: BLE001 - missing, partial or damaged: measure again
        return None


def _finished(folder: Path) -> dict[str, tuple[Any, dict[str, Any]]]:
    """The checkpoints of a finished sweep in ``folder`` (its record and metrics), by label."""
    import pandas as pd

    try:
        record = json.loads((folder / RECORD).read_text())
        metrics = pd.read_parquet(folder / "metrics.parquet")
        return {
            e["label"]: (metrics[metrics["checkpoint"] == e["label"]].reset_index(drop=True), e)
            for e in record["checkpoints"]
        }
    except Exception:  # noqa: BLE001 - none, or damaged: nothing to read back
        return {}


def checkpoint_sweep(
    config: CheckpointSweepConfig,
    out: str | Path | None = None,
    *,
    tasks_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> CheckpointSweepResult:
    """Measure every checkpoint of ``config`` into ``out`` (default ``config.out_dir``), resuming: a
    checkpoint measured before with the same settings is read back, not measured again."""
    from conceptprobe.models import load_model
    from conceptprobe.progress import progress_bar
    from conceptprobe.store import (
        FolderLock,
        atomic_write_parquet,
        atomic_write_text,
        git_revision,
        package_versions,
    )

    say = log or (lambda _msg: None)
    threads = set_threads(config.threads)
    checkpoints = plan_checkpoints(config)
    folder = Path(out) if out is not None else config.out_dir
    started = time.perf_counter()
    training = _TrainingMeasure()
    frames, entries, measured = [], [], []
    with FolderLock(folder, ".checkpoints.lock"), progress_bar(None, progress, unit="checkpoints") as bar:
        task = bar.add_task(config.name, total=len(checkpoints))
        finished = _finished(folder)
        for ck in checkpoints:
            sub = folder / "steps" / ck.label
            fp = ck.fingerprint(config)
            previous = _read_done(sub, fp)
            if previous is None and ck.label in finished and finished[ck.label][1].get("fingerprint") == fp:
                previous = finished[ck.label]
            if previous is not None:
                frame, done = previous
                say(f"{ck.label}: measured before, read back")
            else:
                t0 = time.perf_counter()
                m = ck.entry
                dtype = "float32" if ck.training else ((m.dtype if m else None) or config.dtype)
                loaded = load_model(
                    ck.ref,
                    dtype,
                    revision=ck.revision,
                    device_map=m.device_map if m else None,
                    max_memory=m.max_memory if m else None,
                    quantize=m.quantize if m else None,
                )
                if ck.training:
                    rows = training(ck, loaded, config)
                else:
                    rows = _measure_pretrained(ck, loaded, config, tasks_dir, progress=False)
                for r in rows:
                    r.update(step=ck.step, checkpoint=ck.label)
                frame = metrics_frame(rows, EXTRA_COLUMNS)
                done = {
                    "label": ck.label,
                    "step": ck.step,
                    "ref": ck.ref,
                    "revision": ck.revision,
                    "training": ck.training,
                    "fingerprint": fp,
                    "model": loaded.info.to_dict(),
                    "summary": checkpoint_summary(frame),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                sub.mkdir(parents=True, exist_ok=True)
                atomic_write_parquet(sub / "metrics.parquet", frame)
                atomic_write_text(sub / DONE, json.dumps(done, indent=2, default=str) + "\n")
                measured.append(ck.label)
                del loaded
                say(f"{ck.label}: {summary_line(done['summary'])}")
            frames.append(frame)
            entries.append(done)
            bar.advance(task)
        import pandas as pd

        metrics = pd.concat(frames, ignore_index=True)
        for col in ("layer", "head", "position", "shots", "step", "n"):
            metrics[col] = pd.array([None if pd.isna(v) else int(v) for v in metrics[col]], dtype="Int64")
        from conceptprobe.experiments.checkpoint_figure import phase_summary, plot_checkpoints

        record = {
            "kind": "checkpoints",
            "measure": "checkpoint_sweep",
            "name": config.name,
            "description": config.description,
            "source": "train_folder" if config.train_folder is not None else "models",
            "head_numbering": "L<b>H<h>: decoder block b (0-based), head h; block b reads residual-stream layer b "
            "and writes layer b+1 (metrics: layer = block)",
            "definitions": definitions(config, checkpoints),
            "config": config.model_dump(mode="json"),
            "checkpoints": entries,
            "steps": [ck.step for ck in checkpoints],
            "phase": phase_summary(metrics),
            "tracked_check": tracked_check(metrics, config),
            "settings": {"threads": threads, "dtype": config.dtype, "seed": config.seed},
            "seconds": {"total": round(time.perf_counter() - started, 2), "measured_now": measured},
            "versions": package_versions(),
            "git": git_revision(),
        }
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_parquet(folder / "metrics.parquet", metrics)
        plot_checkpoints(metrics, record, folder / "checkpoints.png")
        atomic_write_text(folder / RECORD, json.dumps(record, indent=2, default=str) + "\n")
        shutil.rmtree(
            folder / "steps", ignore_errors=True
        )  # the record and metrics now hold every checkpoint
    return CheckpointSweepResult(metrics, record, folder, measured)


def checkpoint_summary(frame: Any) -> dict[str, Any]:
    """The headline numbers of one checkpoint's metrics (value, interval, n, head where they have one)."""
    out: dict[str, Any] = {}
    keep = (
        "icl_score", "prefix_matching_max", "prefix_matching_top_mean", "copying_best_head", "copying_top_mean",
        "n_prefix_matching_heads", "n_induction_heads", "icl_accuracy", "cd_knn_heldout_peak",
    )  # fmt: skip
    for _, r in frame[frame["metric"].isin(keep)].iterrows():
        cell: dict[str, Any] = {"value": float(r["value"])}
        if r.get("ci_low") is not None and r["ci_low"] == r["ci_low"]:
            cell["ci"] = [float(r["ci_low"]), float(r["ci_high"])]
        if r.get("n") is not None and r["n"] == r["n"]:
            cell["n"] = int(r["n"])
        if r["metric"] in ("prefix_matching_max", "copying_best_head"):
            cell["head"] = f"L{int(r['layer'])}H{int(r['head'])}"
        if r["metric"] == "cd_knn_heldout_peak":
            cell["layer"] = int(r["layer"])
        key = r["metric"] if r["metric"] in keep[:7] else f"{r['task']}/{r['metric']}"
        out[key] = cell
    return out


def summary_line(summary: dict[str, Any]) -> str:
    """One line of a checkpoint's summary: ICL score [CI], best prefix matching (head), induction heads."""
    parts = []
    icl = summary.get("icl_score")
    if icl:
        lo, hi = icl.get("ci", [float("nan")] * 2)
        parts.append(f"ICL score {icl['value']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    pm = summary.get("prefix_matching_max")
    if pm:
        parts.append(f"prefix matching {pm['value']:.3f} ({pm['head']})")
    if "n_induction_heads" in summary:
        parts.append(f"{int(summary['n_induction_heads']['value'])} induction heads")
    for key, cell in summary.items():
        if "/" in key:
            parts.append(f"{key} {cell['value']:.3f}")
    return "; ".join(parts)


def definitions(config: CheckpointSweepConfig, checkpoints: list[Checkpoint]) -> dict[str, str]:
    """What each metric of the sweep means, as the record states it."""
    c = config
    out = {
        "step": "the training step of the checkpoint (a training folder's step_<n>, a model entry's step, or "
        "the number in a revision like step1000)",
        "prefix_matching": "per head: attention from each token in repeats 2..n of a repeated random sequence "
        "to the positions that follow its earlier copies; mean over queries and sequences",
        "copying": "per head, Olsson et al. 2022: sum Re(eig) / sum |eig| of the OV circuit through the "
        "embedding and unembedding over the full vocabulary (from the weights)",
        "copying_in_context": "per head: the direct effect of the head's OV path on the logits of the "
        "in-context random tokens (the trainer's `copying` column)",
        "prefix_matching_max": "the best head's prefix matching (its block and head in layer and head)",
        "prefix_matching_top_mean": f"mean prefix matching of the {c.top_heads} best heads",
        "copying_best_head": "Olsson's copying of the head with the best prefix matching",
        "copying_top_mean": f"mean Olsson copying of the {c.top_heads} heads with the best prefix matching",
        "n_prefix_matching_heads": "heads with prefix matching >= the threshold",
        "n_induction_heads": "heads with prefix matching >= the threshold and copying >= copying_threshold",
        "ci_low/ci_high": "95% percentile bootstrap interval (over contexts, or prompts for the concept tasks)",
    }
    if any(ck.training for ck in checkpoints):
        out["training checkpoints"] = (
            "measured by the trainer's tracker with the run's own data and settings (train.json tracking): "
            "icl_score = loss of token round(T*500/512) minus token round(T*50/512) of T tokens after BOS, "
            "over the run's n_contexts evaluation sequences, 500 bootstrap resamples; head scores on head_seqs "
            "sequences of min(25, T//4) random tokens repeated 4 times after BOS; threshold 0.4, "
            f"copying_threshold {c.copying_threshold}"
        )
    if any(not ck.training for ck in checkpoints):
        out["pretrained checkpoints"] = (
            f"icl_score = loss(token {c.late}) - loss(token {c.early}) over {c.n_contexts} {c.corpus} contexts "
            f"of {c.n_tokens} tokens; heads on {c.n_seqs} sequences of {c.seq_len} random tokens x {c.repeats}; "
            f"threshold {c.threshold}, copying_threshold {c.copying_threshold}"
            + (
                f"; tasks {', '.join(str(t.label) for t in c.tasks)} at {c.shots} shots, n={c.n} per concept: "
                "icl_accuracy without null, cd_knn_heldout_peak (k-NN decodability at the held-out peak layer), "
                "cd_knn_null_p95 (label-permutation null), cd_knn_heldout_selectivity (minus the surface "
                "baseline), surface_best"
                if c.tasks
                else ""
            )
        )
    return out


def tracked_check(metrics: Any, config: CheckpointSweepConfig) -> dict[str, Any] | None:
    """For a train folder: the largest difference between this sweep and the trainer's ``metrics.parquet``
    at the same steps, per measure (None when there is no tracked file)."""
    import pandas as pd

    if config.train_folder is None:
        return None
    path = Path(config.train_folder) / "metrics.parquet"
    if not path.is_file():
        return None
    tracked = pd.read_parquet(path)
    out: dict[str, Any] = {"file": str(path), "max_abs_diff": {}, "compared": {}}
    ours = metrics.copy()
    ci = ours[ours.metric == "icl_score"]
    ours = pd.concat(
        [
            ours,
            ci.assign(metric="icl_score_ci_low", value=ci["ci_low"]),
            ci.assign(metric="icl_score_ci_high", value=ci["ci_high"]),
        ],
        ignore_index=True,
    )
    key = ["step", "layer", "head"]
    for mine, theirs in TRACKED:
        a = ours[ours.metric == mine][[*key, "value"]]
        b = tracked[tracked.metric == theirs][[*key, "value"]]
        a, b = _keyed(a), _keyed(b)
        both = a.merge(b, on=key, suffixes=("", "_tracked"))
        if len(both):
            out["max_abs_diff"][mine] = float((both["value"] - both["value_tracked"]).abs().max())
            out["compared"][mine] = len(both)
    return out


def _keyed(frame: Any) -> Any:
    """``step``, ``layer`` and ``head`` as plain integers (-1 for none), to join on."""
    return frame.assign(
        step=frame["step"].astype("int64"),
        layer=frame["layer"].astype("Int64").fillna(-1).astype("int64"),
        head=frame["head"].astype("Int64").fillna(-1).astype("int64"),
    )
