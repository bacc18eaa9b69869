"""Run a sweep on Ray: each (model, unit group) is one Ray task that reserves the GPUs its plan needs.

The driver (this process) owns ``<out>/sweep.json`` and is its only writer; each task loads its model once
and writes its units' run folders through the same pipeline as the local executor
(:func:`conceptprobe.experiments.probe.run`: atomic writes, resumable per concept), so ``<out>`` must be on a filesystem
every node sees at the same path (on one machine it always is). A task whose worker dies (crash, OOM
kill, lost node) is retried by Ray (``max_retries``); the retry skips the units already complete and
resumes the others, so a retry never corrupts or duplicates results. A unit that raises is recorded as
failed and the rest of its group goes on, as with the local executor.

GPUs per task: ``gpus_per_task`` when given (an int, or per model label), else from the memory plan of
each model (:mod:`conceptprobe.models.plan`) on GPUs of ``gpu_memory``: the fewest that fit. Tasks
with GPUs load with ``device_map="auto"`` over the GPUs Ray assigned (``CUDA_VISIBLE_DEVICES``) unless the
model entry sets its own ``device_map``. On a cluster without GPUs every task takes ``cpus_per_task``.

    from conceptprobe.sweep.ray_executor import run_sweep_ray
    result = run_sweep_ray(plan, address="auto")   # a cluster started with `ray start`
    result = run_sweep_ray(plan)                    # a private local Ray instance on this machine
"""

from __future__ import annotations

import contextlib
import io
import socket
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from conceptprobe.config import ConfigError

if TYPE_CHECKING:
    from conceptprobe.sweep.config import ModelEntry
    from conceptprobe.sweep.local import SweepResult
    from conceptprobe.sweep.plan import SweepPlan, Unit


class RayUnavailable(ConfigError):
    """``--executor ray`` was asked for where Ray is not installed."""


def _ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable(
            "--executor ray needs the ray package, which is not installed; install it with: pip install 'ray>=2.9' "
            "(or use --executor local)"
        ) from None
    return ray


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------- in the task


def run_group(
    units: list[Unit],
    out: str,
    tasks_dir: str | None,
    overwrite: bool,
    use_gpus: bool,
    trust_remote_code: bool = False,
) -> list[tuple[str, dict[str, Any]]]:
    """Run one model's units (in a Ray worker, or anywhere): ``[(unit id, manifest fields), ...]``.

    Units already complete on disk (a retry after a crash) are reported as skipped, not rerun.
    """
    from conceptprobe.store import sha256_of
    from conceptprobe.sweep import local
    from conceptprobe.sweep.plan import stale_temp_files, unit_state

    host = socket.gethostname()
    if not (Path(out) / "sweep.json").is_file():
        message = (
            f"the sweep folder {out} is not visible on node {host}: put --out on a filesystem shared by "
            "every Ray node (same path), e.g. NFS or the cluster's scratch"
        )
        return [(u.id, _failure(message, None, host)) for u in units]
    results: list[tuple[str, dict[str, Any]]] = []
    pending = []
    for unit in units:
        if unit_state(unit).status == "complete":
            results.append(
                (
                    unit.id,
                    {
                        "status": "complete",
                        "action": "skipped",
                        "metrics_sha256": sha256_of(unit.folder / "metrics.parquet"),
                        "node": host,
                    },
                )
            )
        else:
            pending.append(unit)
    if not pending:
        return results
    model: ModelEntry = pending[0].model
    if use_gpus and model.device_map is None:
        model = model.model_copy(update={"device_map": "auto"})
    try:
        loaded = local.load_for(model, pending[0].config, trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - every unit of the group fails with the load's message
        message = f"loading {model.ref}: {_one_line(exc)}"
        return results + [(u.id, _failure(message, exc, host)) for u in pending]
    try:
        for unit in pending:
            if not (unit.folder / "run.json").is_file():
                for tmp in stale_temp_files(unit.folder):
                    tmp.unlink(missing_ok=True)
            start = time.perf_counter()
            started = _now()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    local.run(
                        unit.config,
                        unit.folder,
                        overwrite=overwrite,
                        tasks_dir=tasks_dir,
                        loaded=loaded,
                        progress=False,
                        console=Console(file=io.StringIO()),
                        trust_remote_code=trust_remote_code,
                    )
            except Exception as exc:  # noqa: BLE001 - one failing unit must not stop its group
                fields = _failure(_one_line(exc), exc, host)
                fields.update(started=started, seconds=round(time.perf_counter() - start, 2))
                results.append((unit.id, fields))
                continue
            results.append(
                (
                    unit.id,
                    {
                        "status": "complete",
                        "action": "ran",
                        "started": started,
                        "finished": _now(),
                        "seconds": round(time.perf_counter() - start, 2),
                        "metrics_sha256": sha256_of(unit.folder / "metrics.parquet"),
                        "error": None,
                        "traceback": None,
                        "node": host,
                    },
                )
            )
    finally:
        del loaded
        local._release_memory()
    return results


def _now() -> str:
    from conceptprobe.store import now

    return now()


def _failure(message: str, exc: BaseException | None, host: str | None = None) -> dict[str, Any]:
    return {
        "status": "failed",
        "action": "failed",
        "error": message,
        "traceback": "".join(traceback.format_exception(exc)) if exc is not None else None,
        "finished": _now(),
        "node": host,
    }


# ---------------------------------------------------------------------------------------------- resources


def gpus_for(model: ModelEntry, dtype: str, gpu_memory: int, batch_size: int = 16, limit: int = 64) -> int:
    """The fewest GPUs of ``gpu_memory`` bytes that ``model`` fits on (its memory plan); 1 if it cannot be planned."""
    from conceptprobe.models.plan import PlanError, Planner, PlanRequest

    try:
        planner = Planner.for_ref(model.ref)
        request = PlanRequest(
            dtype=dtype, quantize=model.quantize, batch_size=batch_size, allow_offload=False
        )
        best = planner.min_gpus(request, gpu_memory, limit=limit)
    except (PlanError, OSError, ValueError):
        return 1
    return len(best.request.gpus) if best is not None else limit


def _resources(
    plan: SweepPlan,
    gpus_per_task: int | dict[str, int] | None,
    gpu_memory: int,
    cluster_gpus: float,
    largest_node_gpus: float,
) -> dict[str, int]:
    need: dict[str, int] = {}
    for model, units in plan.by_model():
        label = model.label or model.ref
        if isinstance(gpus_per_task, dict) and label in gpus_per_task:
            need[label] = int(gpus_per_task[label])
        elif isinstance(gpus_per_task, int):
            need[label] = gpus_per_task
        elif cluster_gpus <= 0:
            need[label] = 0
        else:
            cfg = units[0].config if units else None
            dtype = cfg.dtype if cfg is not None else "bfloat16"
            batch = getattr(cfg, "batch_size", 16) if cfg is not None else 16
            need[label] = gpus_for(
                model, dtype, gpu_memory, batch_size=batch, limit=int(largest_node_gpus) + 1
            )
    return need


def _node_gpus(ray: Any) -> float:
    return max((n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


# ---------------------------------------------------------------------------------------------- the driver


def run_sweep_ray(
    plan: SweepPlan,
    *,
    address: str | None = None,
    tasks_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    console: Console | None = None,
    gpus_per_task: int | dict[str, int] | None = None,
    gpu_memory: str | int = "80GiB",
    cpus_per_task: int = 1,
    max_retries: int = 2,
    init_kwargs: dict[str, Any] | None = None,
) -> SweepResult:
    """Run every unit of ``plan`` not complete yet as Ray tasks, one per model; same folders and manifest as local.

    ``address``: None starts a private Ray instance on this machine; ``"auto"`` or ``"ray://host:10001"``
    joins a running cluster. The Ray instance is shut down at the end only if this call started it.
    ``progress`` is accepted for symmetry with the local executor (tasks print nothing; one line per unit).
    """
    from conceptprobe.sweep.local import hold_sweep_lock

    ray = _ray()
    console = console or Console(stderr=True)
    lock = hold_sweep_lock(plan, console)  # the driver holds the sweep's lock; each run takes its own
    try:
        return _run_sweep_ray(
            ray,
            plan,
            address,
            tasks_dir,
            overwrite,
            console,
            gpus_per_task,
            gpu_memory,
            cpus_per_task,
            max_retries,
            init_kwargs,
        )
    finally:
        lock.release()


def _run_sweep_ray(
    ray: Any,
    plan: SweepPlan,
    address: str | None,
    tasks_dir: str | Path | None,
    overwrite: bool,
    console: Console,
    gpus_per_task: int | dict[str, int] | None,
    gpu_memory: str | int,
    cpus_per_task: int,
    max_retries: int,
    init_kwargs: dict[str, Any] | None,
) -> SweepResult:
    from conceptprobe.models.plan import parse_size
    from conceptprobe.sweep.local import Manifest, SweepResult
    from conceptprobe.sweep.plan import plan_states, read_manifest

    read_manifest(plan.out, set_aside=True)  # a corrupt sweep.json is set aside and rebuilt
    states = plan_states(plan)
    conflicts = [u for u in plan.units if states[u.id].status == "conflict"]
    if conflicts and not overwrite:
        first = conflicts[0]
        raise ConfigError(
            f"{len(conflicts)} unit folder(s) hold something else, e.g. {first.folder}: {states[first.id].detail}; "
            "pass --overwrite to replace them, or choose another --out"
        )
    todo_ids = {u.id for u in plan.units if states[u.id].status != "complete"}
    manifest = Manifest(plan, states)
    manifest.data["executor"] = {"name": "ray", "address": address}
    manifest.write("running")

    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        kwargs.update(init_kwargs or {})
        ray.init(address=address, **kwargs)
    try:
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        largest = _node_gpus(ray) if cluster_gpus else 0.0
        need = _resources(plan, gpus_per_task, parse_size(gpu_memory), cluster_gpus, largest)
        manifest.data["executor"].update(cluster=_plain(ray.cluster_resources()), gpus_per_task=need)
        remote = ray.remote(run_group)
        futures: dict[Any, list[Unit]] = {}
        total = len(plan.units)
        done = total - len(todo_ids)
        for model, units in plan.by_model():
            pending = [u for u in units if u.id in todo_ids]
            if not pending:
                continue
            label = model.label or model.ref
            n_gpus = need.get(label, 0)
            if n_gpus > largest and cluster_gpus:
                message = (
                    f"{label} needs {n_gpus} GPUs of {gpu_memory} on one node (its memory plan) and the largest "
                    f"node has {int(largest)}; quantize it, or set gpus_per_task"
                )
                for unit in pending:
                    manifest.update(unit, **_failure(message, None))
                    done += 1
                    console.print(
                        f"[red]failed[/] [{done}/{total}] {unit.id}: {escape(message)}", highlight=False
                    )
                continue
            options = {
                "num_cpus": cpus_per_task,
                "num_gpus": n_gpus,
                "max_retries": max_retries,
                "name": f"conceptprobe:{label}",
            }
            ref = remote.options(**options).remote(
                pending,
                str(plan.out),
                None if tasks_dir is None else str(tasks_dir),
                overwrite,
                n_gpus > 0,
                plan.trust_remote_code,
            )
            futures[ref] = pending
            for unit in pending:
                manifest.update(unit, status="queued", action=None, error=None, gpus=n_gpus)
        waiting = list(futures)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            for ref in ready:
                units = futures[ref]
                try:
                    outcomes = dict(ray.get(ref))
                except Exception as exc:  # noqa: BLE001 - retries exhausted: the group's units fail
                    message = f"Ray task failed after {max_retries} retries: {_one_line(exc)}"
                    outcomes = {u.id: _failure(message, exc) for u in units}
                for unit in units:
                    fields = outcomes.get(unit.id) or _failure("the Ray task returned no result for it", None)
                    manifest.update(unit, **fields)
                    done += 1
                    if fields["status"] == "complete":
                        how = (
                            "skipped (complete)"
                            if fields["action"] == "skipped"
                            else f"in {fields['seconds']:.1f} s"
                        )
                        console.print(
                            f"[green]done[/] [{done}/{total}] {unit.id} {how} on {fields.get('node')}"
                        )
                    else:
                        console.print(
                            f"[red]failed[/] [{done}/{total}] {unit.id}: {escape(str(fields['error']))}",
                            highlight=False,
                        )
    except KeyboardInterrupt:
        manifest.write("interrupted")
        console.print("interrupted: finished units and concepts are saved; rerun to resume")
        raise
    finally:
        if started_here:
            ray.shutdown()
    failed = any(u["status"] == "failed" for u in manifest.data["units"])
    manifest.write("failed" if failed else "complete")
    return SweepResult(
        out=plan.out,
        manifest=manifest.path,
        units=[dict(u) for u in manifest.data["units"]],
        wall_s=manifest.data["invocation"]["wall_s"],
    )


def _plain(resources: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if not k.startswith("node:")}


def slurm_hint() -> str:
    """How to start Ray on a SLURM allocation (also in the README)."""
    return (
        "head: ray start --head --port=6379 --num-gpus=$SLURM_GPUS_ON_NODE; workers (srun on the other nodes): "
        "ray start --address=$HEAD:6379 --num-gpus=$SLURM_GPUS_ON_NODE --block; then on the head: "
        "conceptprobe sweep CONFIG --executor ray --address auto"
    )


__all__ = ["RayUnavailable", "gpus_for", "run_group", "run_sweep_ray", "slurm_hint"]
