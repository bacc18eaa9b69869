"""Train a small transformer on a synthetic task with seeded data, safetensors checkpoints and exact resume.

**Config.** :class:`TrainConfig` (YAML presets in ``probes/train-<preset>.yaml``; see
:func:`load_train_config`). ``task`` is ``sparse_regression`` (MSE on every ``y``) or ``repeated_segments``
(next-token cross-entropy); ``data`` holds the generator's parameters, ``model`` the architecture.

**Determinism.** Model init uses ``torch.manual_seed(seed)``; training batch ``s`` is drawn from
``numpy.random.default_rng([seed, s, 0])``; there is no dropout; the learning rate is a function of the step.
So the state of a run at step ``s`` is its weights and AdamW's moments, nothing else, and a run resumed
from a checkpoint reproduces the uninterrupted run exactly (same threads and device).

**Folder** (``--out``)::

    train.json                   config, fingerprint, model size, versions, git, timings, status
    train_log.csv                step, mean training loss since the previous row, lr, seconds
    metrics.parquet              every tracked measure at every checkpoint (long form, ``step`` column)
    checkpoints/step_<s>/        model.safetensors (+ optimizer.safetensors for the latest), state.json
    tracking/step_<s>.safetensors  vectors kept for the report (representations, per-token losses)
    controls/<name>/             the same for each control run (e.g. a 1-layer model)

Checkpoint steps: 0, ``log_points`` log-spaced steps, every ``every`` steps, and the last. A checkpoint
is complete when its ``state.json`` exists (written last); resuming starts from the latest complete one
and drops later rows of the log and of the metrics. Only the latest checkpoint keeps optimizer state.
Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conceptprobe.progress import progress_bar
from conceptprobe.tasks.synthetic_data import RegressionSpec, SegmentSpec
from conceptprobe.training.model import ModelSpec

TASKS = ("sparse_regression", "repeated_segments")
TRAIN_JSON = "train.json"
LOG_CSV = "train_log.csv"
METRICS = "metrics.parquet"


class TrainConfigError(ValueError):
    """A training config problem, with the file and the key."""


class CheckpointConfig(BaseModel):
    """When to checkpoint (and track): step 0, ``log_points`` log-spaced steps, every ``every`` steps."""

    model_config = ConfigDict(extra="forbid")
    every: int = Field(500, ge=1)
    log_points: int = Field(12, ge=0)
    keep_weights: bool = Field(
        True, description="keep model weights of every checkpoint (else only the last)"
    )


class TrackingConfig(BaseModel):
    """What is measured at every checkpoint (see :mod:`conceptprobe.training.tracking`)."""

    model_config = ConfigDict(extra="forbid")
    n_per_concept: int = Field(100, ge=6, description="evaluation sequences per concept (regression)")
    include_null: bool = Field(False, description="add null sequences to the decodability evaluation")
    knn_k: int = Field(10, ge=1)
    probe: bool = True
    probe_folds: int = Field(5, ge=2)
    umap_layer: int | Literal["auto"] = Field(
        "auto", description="layer of the UMAP snapshots; auto: the layer of highest final k-NN CD"
    )
    umap_snapshots: int = Field(6, ge=1, le=12)
    n_contexts: int = Field(256, ge=2, description="evaluation sequences (induction)")
    n_token_loss_contexts: int = Field(32, ge=1, description="contexts kept as per-token loss vectors")
    head_seqs: int = Field(20, ge=1, description="repeated random sequences for prefix matching")
    icl_window: int = Field(0, ge=0, description="tokens each side averaged into the ICL score's losses")


class TrainConfig(BaseModel):
    """One training run (a preset file is this, as YAML)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "train"
    description: str = ""
    task: Literal["sparse_regression", "repeated_segments"]
    data: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    steps: int = Field(ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = 0
    threads: int | None = Field(1, ge=1, description="torch CPU threads (1 was fastest on a busy 2-core box)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, ge=1)
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    controls: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="name -> overrides of this config, each trained as a control run"
    )

    def data_spec(self) -> RegressionSpec | SegmentSpec:
        try:
            if self.task == "sparse_regression":
                data = dict(self.data)
                if data.get("weights") is not None:
                    data["weights"] = tuple(float(w) for w in data["weights"])
                return RegressionSpec(**data)
            return SegmentSpec(**self.data)
        except TypeError as exc:
            raise TrainConfigError(f"data: {exc}") from None

    def model_spec(self) -> ModelSpec:
        try:
            return ModelSpec(**self.model)
        except TypeError as exc:
            raise TrainConfigError(f"model: {exc}") from None

    def fingerprint(self) -> str:
        """Hash of everything that determines the trained weights (not tracking; not the step count under a
        constant schedule, so a finished run can be extended with a larger ``--steps``)."""
        keep = self.model_dump(exclude={"name", "description", "tracking", "controls", "threads"})
        if self.schedule == "constant":  # the step count changes nothing before the end: runs can be extended
            keep.pop("steps")
        keep["checkpoints"] = None  # when to save does not change the weights
        keep["log_every"] = None
        text = json.dumps(keep, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def control(self, name: str) -> TrainConfig:
        """The control run ``name``: this config with its overrides merged in (and no controls)."""
        base = self.model_dump()
        base["controls"] = {}
        merged = _deep_merge(base, self.controls[name])
        merged["name"] = f"{self.name}/{name}"
        return TrainConfig(**merged)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def repo_probes_dir() -> Path:
    """``probes/`` of the source checkout this package runs from (editable installs)."""
    return Path(__file__).resolve().parents[3] / "probes"


def resolve_preset(ref: str | Path) -> Path:
    """A preset name (``concepts-cpu`` -> ``probes/train-concepts-cpu.yaml``) or a YAML path."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise TrainConfigError(f"preset file {path} does not exist")
        return path
    for folder in (Path.cwd() / "probes", repo_probes_dir()):
        candidate = folder / f"train-{ref}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted(
        {
            p.stem.removeprefix("train-")
            for d in (Path.cwd() / "probes", repo_probes_dir())
            for p in d.glob("train-*.yaml")
        }
    )
    raise TrainConfigError(
        f"unknown preset {ref!r}: no probes/train-{ref}.yaml here or in the checkout; "
        f"known: {', '.join(known) or 'none'} (or pass a YAML path)"
    )


def load_train_config(ref: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a preset (name or path), merge ``overrides`` (nested dicts merge), validate."""
    from conceptprobe.config import MAX_YAML_BYTES, parse_yaml

    path = resolve_preset(ref)
    if path.stat().st_size > MAX_YAML_BYTES:
        raise TrainConfigError(f"{path}: larger than {MAX_YAML_BYTES >> 20} MiB; pass the YAML preset itself")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: expected a mapping at the top level")
    merged = _deep_merge(raw, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        cfg = TrainConfig(**merged)
        cfg.data_spec()
        cfg.model_spec()
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise TrainConfigError(f"{path}: {where}: {err['msg']}") from None
    except ValueError as exc:
        raise TrainConfigError(f"{path}: {exc}") from None
    return cfg


# ---------------------------------------------------------------- schedule


def checkpoint_steps(steps: int, every: int, log_points: int) -> list[int]:
    """0, ``log_points`` log-spaced steps in [1, steps], multiples of ``every``, and ``steps``."""
    out = {0, steps}
    if log_points:
        out |= {int(round(v)) for v in np.logspace(0, math.log10(steps), log_points)}
    out |= set(range(every, steps + 1, every))
    return sorted(s for s in out if 0 <= s <= steps)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of update ``step`` (0-based): linear warmup, then constant or cosine decay."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))


# ---------------------------------------------------------------- optimizer state in safetensors


def optimizer_tensors(optimizer: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """AdamW's state as flat tensors (``state.<param>.<key>``) plus JSON metadata (param groups)."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def load_optimizer_tensors(optimizer: Any, tensors: dict[str, Any], meta: dict[str, str]) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in json.loads(meta.get("scalars", "{}")).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = json.loads(meta["param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------- the run


@dataclass
class TrainResult:
    """What :func:`train` did."""

    folder: Path
    resumed_from: int | None
    final_step: int
    seconds: float
    complete: bool
    controls: dict[str, TrainResult]


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    from conceptprobe.store import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _ckpt_dir(folder: Path, step: int) -> Path:
    return folder / "checkpoints" / f"step_{step:07d}"


def complete_checkpoints(folder: Path) -> list[int]:
    """Steps of the complete checkpoints (those with ``state.json``), ascending."""
    root = folder / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for d in root.glob("step_*"):
        if (d / "state.json").is_file() and (d / "model.safetensors").is_file():
            with contextlib.suppress(ValueError):
                steps.append(int(d.name.removeprefix("step_")))
    return sorted(steps)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("device: cuda asked for but torch sees no CUDA device; use device: cpu")
    return name


class Run:
    """A training run bound to its folder: model, optimizer, tracker, data, and their persistence."""

    def __init__(self, cfg: TrainConfig, folder: Path, device: str | None = None) -> None:
        import torch

        from conceptprobe.training.model import build_lm, build_regression_model
        from conceptprobe.training.tracking import make_tracker

        self.cfg = cfg
        self.folder = Path(folder)
        self.device = torch.device(device or resolve_device(cfg.device))
        self.spec = cfg.data_spec()
        self.model_spec = cfg.model_spec()
        torch.manual_seed(cfg.seed)
        if cfg.task == "sparse_regression":
            assert isinstance(self.spec, RegressionSpec)
            from conceptprobe.tasks.synthetic_data import concept_bases

            self.bases = concept_bases(self.spec)
            self.model = build_regression_model(self.model_spec, self.spec.token_dim, self.spec.seq_len)
        else:
            assert isinstance(self.spec, SegmentSpec)
            self.model = build_lm(self.model_spec, self.spec.vocab_size, self.spec.total_len)
        self.model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
            foreach=False,
        )
        self.tracker = make_tracker(cfg, self.spec, self.model_spec, self.device)
        self.log_rows: list[dict[str, Any]] = []
        self.metric_rows: list[dict[str, Any]] = []
        self.loss_sum = 0.0
        self.loss_count = 0

    # -------------------------------------------------------------- one update

    def batch_loss(self, step: int) -> Any:
        import torch
        import torch.nn.functional as F

        from conceptprobe.tasks.synthetic_data import regression_train_batch, sample_segments, step_rng

        rng = step_rng(self.cfg.seed, step)
        if isinstance(self.spec, RegressionSpec):
            batch = regression_train_batch(self.spec, self.cfg.batch_size, rng, self.bases)
            tokens = torch.from_numpy(batch.tokens(self.spec.y_tokens)).to(self.device)
            y = torch.from_numpy(batch.y).float().to(self.device)
            return F.mse_loss(self.model(tokens)[:, 0::2], y)
        ids = torch.from_numpy(sample_segments(self.spec, self.cfg.batch_size, rng).ids).to(self.device)
        logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def update(self, step: int) -> float:
        import torch

        lr = learning_rate(self.cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.batch_loss(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    # -------------------------------------------------------------- persistence

    def save_checkpoint(self, step: int, elapsed: float, previous: int | None) -> None:
        from safetensors.torch import save_file, save_model

        d = _ckpt_dir(self.folder, step)
        if d.exists():
            shutil.rmtree(d)
        tmp = d.with_name(f".{d.name}.tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_model(self.model, str(tmp / "model.safetensors"), metadata={"step": str(step)})
        tensors, meta = optimizer_tensors(self.optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=meta)
        state = {
            "step": step,
            "fingerprint": self.cfg.fingerprint(),
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "elapsed_s": elapsed,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, d)
        if previous is not None:
            prev = _ckpt_dir(self.folder, previous)
            (prev / "optimizer.safetensors").unlink(missing_ok=True)
            if not self.cfg.checkpoints.keep_weights:
                shutil.rmtree(prev, ignore_errors=True)

    def load_checkpoint(self, step: int) -> dict[str, Any]:
        from safetensors import safe_open
        from safetensors.torch import load_file, load_model

        d = _ckpt_dir(self.folder, step)
        state = json.loads((d / "state.json").read_text())
        if state.get("fingerprint") != self.cfg.fingerprint():
            raise TrainConfigError(
                f"{d} was written by a different config (fingerprint {state.get('fingerprint')} != "
                f"{self.cfg.fingerprint()}); use another --out or --fresh"
            )
        load_model(self.model, str(d / "model.safetensors"), device=str(self.device))
        opt_path = d / "optimizer.safetensors"
        with safe_open(str(opt_path), framework="pt") as fh:
            meta = fh.metadata() or {}
        load_optimizer_tensors(self.optimizer, load_file(str(opt_path), device=str(self.device)), meta)
        self.loss_sum = float(state["loss_sum"])
        self.loss_count = int(state["loss_count"])
        return state

    def write_tables(self) -> None:
        import pandas as pd

        from conceptprobe.store import METRIC_COLUMNS, atomic_write_text

        lines = ["step,loss,lr,elapsed_s"] + [
            f"{r['step']},{r['loss']:.6g},{r['lr']:.6g},{r['elapsed_s']:.2f}" for r in self.log_rows
        ]
        atomic_write_text(self.folder / LOG_CSV, "\n".join(lines) + "\n")
        frame = pd.DataFrame(self.metric_rows)
        extra = ["step", "head"]
        for col in METRIC_COLUMNS + extra:
            if col not in frame.columns:
                frame[col] = None
        frame = frame[METRIC_COLUMNS + extra]
        for col in ("layer", "head", "position", "shots"):  # nullable integers, the same on every write
            frame[col] = pd.array(
                [None if pd.isna(v) else int(v) for v in frame[col]],
                dtype="Int64",
            )
        frame["value"] = frame["value"].astype("float64")
        from conceptprobe.store import atomic_write_parquet

        atomic_write_parquet(self.folder / METRICS, frame)

    def read_tables(self, upto: int) -> None:
        import pandas as pd

        log = self.folder / LOG_CSV
        if log.is_file():
            frame = pd.read_csv(log)
            self.log_rows = [r for r in frame.to_dict("records") if int(r["step"]) <= upto]
            for r in self.log_rows:
                r["step"] = int(r["step"])
        metrics = self.folder / METRICS
        if metrics.is_file():
            frame = pd.read_parquet(metrics)
            frame = frame[frame["step"] <= upto]
            self.metric_rows = frame.to_dict("records")

    def track(self, step: int) -> str:
        """Measure at ``step``; keep the rows and save the tracked tensors. Returns a one-line summary."""
        from safetensors.torch import save

        from conceptprobe.store import atomic_write_bytes

        was_training = self.model.training
        self.model.eval()
        try:
            rows, tensors, summary = self.tracker.measure(self.model, step)
        finally:
            self.model.train(was_training)
        n_params = _n_params(self.model)
        for r in rows:
            r.setdefault("model", self.cfg.name)
            r.setdefault("family", self.model_spec.arch)
            r.setdefault("n_params", n_params)
            r.setdefault("task", self.cfg.task)
            r.setdefault("layer", None)
            r.setdefault("shots", None)
            r.setdefault("position", None)
            r.setdefault("seed", self.cfg.seed)
            r["step"] = step
        self.metric_rows = [r for r in self.metric_rows if r["step"] != step] + rows
        if tensors:
            path = self.folder / "tracking" / f"step_{step:07d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"step": str(step)})
            atomic_write_bytes(path, data)
        return summary


def _n_params(model: Any) -> int:
    from conceptprobe.training.model import n_parameters

    return n_parameters(model)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def train(
    cfg: TrainConfig,
    folder: str | Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    log: Callable[[str], None] | None = None,
    controls: bool = True,
    device: str | None = None,
) -> TrainResult:
    """Train ``cfg`` into ``folder``, resuming from its latest complete checkpoint unless ``fresh``.

    ``stop_at``: return after the checkpoint at this step (an interruption, for tests and time-boxed runs).
    Controls (``cfg.controls``) are trained afterwards into ``folder/controls/<name>``.
    """
    folder = Path(folder)
    say = log or (lambda _msg: None)
    _set_threads(cfg.threads)
    if fresh and folder.exists():
        for sub in ("checkpoints", "tracking", "controls"):
            shutil.rmtree(folder / sub, ignore_errors=True)
        for name in (TRAIN_JSON, LOG_CSV, METRICS):
            (folder / name).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    for tmp in list(folder.rglob(".*.tmp*")):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    previous = _read_train_json(folder)
    if previous and previous.get("fingerprint") != cfg.fingerprint():
        raise TrainConfigError(
            f"{folder} holds a run of a different config ({previous.get('config', {}).get('name')!r}, "
            f"fingerprint {previous.get('fingerprint')}); use another --out or pass --fresh to replace it"
        )
    run = Run(cfg, folder, device)
    schedule = checkpoint_steps(cfg.steps, cfg.checkpoints.every, cfg.checkpoints.log_points)
    done = [s for s in complete_checkpoints(folder) if s <= cfg.steps]
    start, resumed_from, elapsed0 = 0, None, 0.0
    if done:
        resumed_from = done[-1]
        state = run.load_checkpoint(resumed_from)
        start, elapsed0 = resumed_from, float(state.get("elapsed_s", 0.0))
        run.read_tables(resumed_from)
        say(f"resuming {cfg.name} from step {resumed_from}")
    info = _train_info(cfg, run, folder, previous, status="running")
    _atomic_json(folder / TRAIN_JSON, info)

    t0 = time.perf_counter() - elapsed0
    cpu0 = time.process_time()
    last_ckpt = resumed_from
    complete = True
    if resumed_from is None:  # step 0: untrained weights
        summary = run.track(0)
        run.write_tables()
        run.save_checkpoint(0, time.perf_counter() - t0, None)
        last_ckpt = 0
        say(f"step 0: {summary}")
    pending = [s for s in schedule if s > start]
    with progress_bar(None, progress, extra="loss {task.fields[loss]}") as bar:
        task = bar.add_task(cfg.name, total=cfg.steps, completed=start, loss="-")
        for step in range(start, cfg.steps):
            loss = run.update(step)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step + 1}; lower lr")
            run.loss_sum += loss
            run.loss_count += 1
            done_steps = step + 1
            if done_steps % cfg.log_every == 0 or done_steps == cfg.steps or done_steps in pending:
                mean = run.loss_sum / max(1, run.loss_count)
                run.log_rows.append(
                    {
                        "step": done_steps,
                        "loss": mean,
                        "lr": learning_rate(cfg, step),
                        "elapsed_s": time.perf_counter() - t0,
                    }
                )
                run.loss_sum, run.loss_count = 0.0, 0
                bar.update(task, loss=f"{mean:.4f}")
            bar.update(task, completed=done_steps)
            if pending and done_steps == pending[0]:
                pending.pop(0)
                summary = run.track(done_steps)
                run.write_tables()
                run.save_checkpoint(done_steps, time.perf_counter() - t0, last_ckpt)
                last_ckpt = done_steps
                if progress:
                    bar.console.log(f"step {done_steps}: {summary}", highlight=False, markup=False)
                else:
                    say(f"step {done_steps}: {summary}")
                if stop_at is not None and done_steps >= stop_at and done_steps < cfg.steps:
                    complete = False
                    break
    seconds = time.perf_counter() - t0
    info = _train_info(cfg, run, folder, previous, status="complete" if complete else "interrupted")
    info["timings"] = {
        "train_and_track_s": round(seconds, 2),
        "cpu_s_this_process": round(time.process_time() - cpu0, 2),
        "resumed_from": resumed_from,
    }
    _atomic_json(folder / TRAIN_JSON, info)
    results: dict[str, TrainResult] = {}
    if complete and controls:
        for name in cfg.controls:
            say(f"control run {name!r}")
            results[name] = train(
                cfg.control(name),
                folder / "controls" / name,
                fresh=fresh,
                progress=progress,
                log=log,
                controls=False,
                device=device,
            )
    return TrainResult(folder, resumed_from, last_ckpt or 0, seconds, complete, results)


def _read_train_json(folder: Path) -> dict[str, Any] | None:
    path = folder / TRAIN_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _train_info(
    cfg: TrainConfig, run: Run, folder: Path, previous: dict[str, Any] | None, status: str
) -> dict[str, Any]:
    import torch

    from conceptprobe.store import git_revision, package_versions

    info = {
        "kind": "conceptprobe-train",
        "status": status,
        "config": cfg.model_dump(mode="json"),
        "fingerprint": cfg.fingerprint(),
        "n_params": _n_params(run.model),
        "device": str(run.device),
        "threads": torch.get_num_threads(),
        "checkpoint_steps": checkpoint_steps(cfg.steps, cfg.checkpoints.every, cfg.checkpoints.log_points),
        "versions": package_versions(),
        "git": git_revision(),
        "started": (previous or {}).get("started") or time.strftime("%Y-%m-%dT%H:%M:%S"),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if previous and "timings" in previous:
        info["previous_timings"] = previous["timings"]
    return info


def load_model_at(folder: str | Path, step: int, cfg: TrainConfig | None = None) -> Any:
    """The model of a run folder at a saved checkpoint ``step`` (eval mode, CPU)."""
    from safetensors.torch import load_model

    from conceptprobe.training.model import build_lm, build_regression_model

    folder = Path(folder)
    if cfg is None:
        cfg = TrainConfig(**json.loads((folder / TRAIN_JSON).read_text())["config"])
    spec, mspec = cfg.data_spec(), cfg.model_spec()
    if isinstance(spec, RegressionSpec):
        model = build_regression_model(mspec, spec.token_dim, spec.seq_len)
    else:
        model = build_lm(mspec, spec.vocab_size, spec.total_len)
    load_model(model, str(_ckpt_dir(folder, step) / "model.safetensors"))
    return model.eval()
