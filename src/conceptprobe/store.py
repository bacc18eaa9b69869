"""A run folder: provenance (``run.json``), per-concept shards, metrics (Parquet), predictions (JSONL).

Layout::

    <run>/run.json                        config, fingerprint, model/task info, versions, git, timings
    <run>/metrics.parquet                 long form: model, family, n_params, task, concept, shots,
                                          layer, position, metric, value, seed
    <run>/predictions.jsonl               one line per prompt
    <run>/table.txt                       the table `conceptprobe run` printed
    <run>/activations/<concept>.safetensors
        tensor "activations" [n_prompts, n_layers, n_positions, d] (float32); metadata holds the
        layers, positions and the predictions of that concept (the unit of resumption)

Every file is written to a temporary name, fsync'd and renamed, so a killed run leaves either the old
file or the new one, never half of one. ``run.json`` records the sha256 of each shard as it is written
(``shards``) and, once the run is complete, of every output (``outputs``): a resumed run verifies them
and recomputes only what is missing or corrupt. A write that fails (a full disk) removes its temporary
file and raises :class:`StoreError` naming the file and the fix. Nothing is pickled.

Each shard's metadata also carries the run's fingerprint, its capture settings and the model's info, so a
run whose ``run.json`` became unreadable is rebuilt from its shards (:meth:`RunStore.recovered_record`)
instead of recomputed. A process working in a run folder holds ``<run>/.run.lock`` (a sweep also
``<sweep>/.sweep.lock``): a second process on the same folder is refused, naming the holder's pid; the
lock of a process that is gone is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import platform
import re
import struct
import subprocess
import time
import warnings
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conceptprobe.config import CAPTURE_FIELDS, ConfigError, RunConfig, short
from conceptprobe.names import SAFE_NAME

if TYPE_CHECKING:  # torch, pandas and safetensors are imported where used: checking a folder needs none
    import pandas as pd
    import torch

METRIC_COLUMNS = [
    "model",
    "family",
    "n_params",
    "task",
    "concept",
    "shots",
    "layer",
    "position",
    "metric",
    "value",
    "seed",
]
#: Probe runs add ``n``: the number of prompts each value rests on.
PROBE_METRIC_COLUMNS = [*METRIC_COLUMNS, "n"]
_VERSIONED = (
    "conceptprobe",
    "torch",
    "transformers",
    "numpy",
    "scikit-learn",
    "safetensors",
    "gguf",
    "tokenizers",
)


class StoreError(RuntimeError):
    """A run folder could not be written (disk full, permissions); the message names the file and the fix."""


# ---------------------------------------------------------------- locks

#: The lock files of a run folder and of a sweep folder (they are not results: state checks ignore them).
RUN_LOCK = ".run.lock"
SWEEP_LOCK = ".sweep.lock"
LOCK_NAMES = (RUN_LOCK, SWEEP_LOCK)
_HELD: dict[tuple[str, int], int] = {}  # (lock path, pid) -> how many times this process holds it


class LockedError(ConfigError):
    """Another live process holds the lock of a run or sweep folder."""


def _lock_pid(path: Path) -> int | None:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class FolderLock:
    """``<folder>/<name>`` holding this process's pid, created with ``O_CREAT | O_EXCL``.

    Re-entrant within a process (a sweep holds its units' locks and the run inside takes them again). The
    lock of a process that is gone is taken over (:meth:`acquire` returns that pid, for a note); a live
    holder is refused with :class:`LockedError` naming its pid. :meth:`release` removes the file, and the
    folders the lock created when they are still empty (a run refused before writing leaves nothing).
    """

    def __init__(self, folder: str | Path, name: str = RUN_LOCK) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self._key = (os.path.abspath(self.path), os.getpid())
        self._created: list[Path] = []
        self._held = False
        self.stale: int | None = None  # the pid of the gone process whose lock was taken over (0: no pid)

    def acquire(self) -> int | None:
        """Take the lock; returns :attr:`stale`. Raises :class:`LockedError` when a live process holds it."""
        self.stale = self._acquire()
        return self.stale

    def _acquire(self) -> int | None:
        if self._held:
            return None
        if _HELD.get(self._key):
            _HELD[self._key] += 1
            self._held = True
            return None
        self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]  # deepest first
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_failed(self.path, exc) from exc
        stale = None
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                taken = self._take_over()
                stale = stale if taken is None else taken
                continue
            except OSError as exc:
                self._remove_created()
                raise _write_failed(self.path, exc) from exc
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            _HELD[self._key] = 1
            self._held = True
            return stale
        self._remove_created()
        raise LockedError(f"could not take the lock {self.path} (other processes keep taking it); try again")

    def _refuse(self, holder: int | str) -> LockedError:
        self._remove_created()
        return LockedError(
            f"{self.folder} is in use by another conceptprobe process (pid {holder}, lock {self.path}); wait "
            f"for it to finish, or, if no such process is running, delete {self.path.name} and rerun"
        )

    def _take_over(self) -> int | None:
        """Move a dead holder's lock aside (atomically) and return its pid; refuse a live holder."""
        holder = _lock_pid(self.path)
        if holder is None:  # just created by another process, its pid not written yet (or not a lock)
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            if age < 5:
                time.sleep(0.05)
                if _lock_pid(self.path) is None and time.time() - self.path.stat().st_mtime < 5:
                    raise self._refuse("unknown, taking the lock right now")
                return None
        elif holder != os.getpid() and _pid_alive(holder):
            raise self._refuse(holder)
        aside = self.path.with_name(f"{self.path.name}.stale{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return None
        moved = _lock_pid(aside)
        if moved != holder and moved is not None and _pid_alive(moved):  # another process took it meanwhile
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # put it back (unless yet another lock is there)
            aside.unlink(missing_ok=True)
            raise self._refuse(moved)
        aside.unlink(missing_ok=True)
        return holder if holder is not None else 0

    def note(self, stale: int) -> str:
        """The note on a taken-over lock (``stale``: what :meth:`acquire` returned)."""
        whose = f"process {stale}, which is gone" if stale else "no process (it held no pid)"
        return f"took over the lock {self.path} of {whose}"

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        count = _HELD.get(self._key, 0)
        if count > 1:
            _HELD[self._key] = count - 1
            return
        _HELD.pop(self._key, None)
        if _lock_pid(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # the deepest first; only empty ones
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created = []

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------- records


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (``a string``, ``a list``, ...)."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = ((str, "a string"), ((int, float), "a number"), (list, "a JSON list"), (dict, "an object"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


def record_problem(data: Any) -> str | None:
    """Why ``data`` (a parsed ``run.json``) is not a run record, or None."""
    if not isinstance(data, dict):
        return f"it holds {_json_kind(data)}, not a JSON object"
    kinds = {
        "fingerprint": str,
        "config": dict,
        "status": str,
        "shards": dict,
        "outputs": dict,
        "model": dict,
        "model_files": dict,
        "layers": list,
        "created": str,
    }
    for key, kind in kinds.items():
        if data.get(key) is not None and not isinstance(data[key], kind):
            return f"key {key!r} holds {_json_kind(data[key])}, not {_json_kind(kind())}"
    for key in ("shards", "outputs"):
        for name, value in (data.get(key) or {}).items():
            if not isinstance(value, str):
                return f"{key}[{short(name, 40)!r}] is not a checksum"
    if any(isinstance(v, bool) or not isinstance(v, int) for v in data.get("layers") or ()):
        return "key 'layers' is not a list of integers"
    return None


def read_record(path: Path, fix: str = "move the folder away or pass --overwrite") -> dict[str, Any] | None:
    """A run folder's ``run.json`` (None when missing); unreadable or wrong-shaped, a one-line ConfigError."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    except json.JSONDecodeError as exc:
        why = f"JSON syntax error at line {exc.lineno}, column {exc.colno}"
    except OSError as exc:
        raise ConfigError(f"{path} could not be read ({os.strerror(exc.errno or 0)}); {fix}") from None
    else:
        problem = record_problem(data)
        if problem is None:
            return data
        raise ConfigError(f"{path} is not a run record ({problem}); {fix}")
    raise ConfigError(f"{path} is not valid JSON ({why}); {fix}")


def _write_failed(path: Path, exc: OSError) -> StoreError:
    why = os.strerror(exc.errno) if exc.errno else str(exc)
    fix = (
        "free disk space or choose another --out"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT)
        else "check the folder's permissions or choose another --out"
    )
    return StoreError(
        f"could not write {path}: {why} (errno {exc.errno}); {fix}, then rerun the same command: "
        "finished work is kept and resumed"
    )


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under before its rename (``.<name>.tmp<pid>``)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # alive (another user's), or not a pid at all
        return True
    return True


def stale_temps(folder: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Temporary files ``.<name>.tmp<pid>`` directly in ``folder`` whose writer (``pid``) is gone.

    With ``names``, only temporaries of those file names. Symbolic links are never listed; nothing below
    ``folder`` is searched.
    """
    if not folder.is_dir() or folder.is_symlink():
        return []
    allowed = set(names) if names is not None else None
    found = []
    for entry in folder.iterdir():
        m = _TEMP.match(entry.name)
        if not m or entry.is_symlink() or not entry.is_file():
            continue
        if allowed is not None and m["name"] not in allowed:
            continue
        if not _pid_alive(int(m["pid"])):
            found.append(entry)
    return sorted(found)


def remove_stale_temps(folder: Path, names: Iterable[str] | None = None) -> None:
    """Delete :func:`stale_temps` of ``folder`` (a killed writer's leftovers; never a live writer's)."""
    for tmp in stale_temps(folder, names):
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and a rename; on failure nothing is left."""
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _write_failed(path, exc) from exc
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_parquet(path: Path, frame: Any) -> None:
    """A DataFrame as Parquet (no index), written atomically."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def git_revision() -> dict[str, Any] | None:
    """The git commit of the conceptprobe checkout (None when installed from a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": rev, "dirty": bool(dirty)}


OUTPUTS = ("metrics.parquet", "predictions.jsonl", "table.txt")


def safetensors_bytes(name: str, tensor: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """One float32 tensor in the safetensors format, with a deterministic header (sorted keys).

    ``safetensors.torch.save`` orders metadata by a per-process hash, so equal shards would differ in
    bytes (and checksums) between processes; this writes the same simple format, reproducibly.
    """
    import numpy as np

    array = np.ascontiguousarray(tensor.detach().to("cpu").float().numpy(), dtype="<f4")
    data = array.tobytes()
    header = {
        "__metadata__": dict(sorted(metadata.items())),
        name: {"dtype": "F32", "shape": list(array.shape), "data_offsets": [0, len(data)]},
    }
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw + data


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Capture settings (the fingerprint's fields) whose values differ between two config dumps."""
    return sorted(k for k in CAPTURE_FIELDS if old.get(k) != new.get(k))


def same_measures(record: dict[str, Any], config: RunConfig) -> bool:
    """Whether a run record's measures were computed with ``config``'s measure settings."""
    stored = record.get("config") or {}
    defaults = RunConfig.model_fields
    current = config.measure_settings()
    return all(stored.get(k, defaults[k].default) == v for k, v in current.items())


class RunStore:
    """One run's folder. Refuses (with the fix) a folder holding a run of a different config."""

    def __init__(self, folder: str | Path, config: RunConfig, overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.config = config
        self.overwrite = overwrite
        self._verified: dict[str, tuple[int, int, str | None]] = {}  # concept -> (mtime_ns, size, sha256)
        self.corrupt: dict[str, str] = {}  # concept -> why its shard was deleted (reported by the run)
        self._replaced: dict[str, Any] | None = None  # the run.json of a run --overwrite replaces
        self._unreadable = False  # its run.json could not be read
        self._recovered: dict[str, Any] | None = None  # a record rebuilt from the shards
        self._warned = False  # the rebuild was reported

    @property
    def run_json(self) -> Path:
        return self.folder / "run.json"

    @property
    def shard_dir(self) -> Path:
        return self.folder / "activations"

    def shard_path(self, concept: str) -> Path:
        if not SAFE_NAME.match(concept):
            raise ConfigError(
                f"concept {concept!r} cannot name a file inside {self.shard_dir}: use letters, digits and "
                ". _ + - only"
            )
        return self.shard_dir / f"{concept}.safetensors"

    def read_run_json(self) -> dict[str, Any] | None:
        return read_record(self.run_json)

    def recovered_record(self) -> dict[str, Any] | None:
        """A record rebuilt from the shards when every shard in ``activations/`` carries this config's
        fingerprint and the model's info (written by :meth:`write_shard`); None otherwise (no shard, or one
        of another config, or shards written before they carried it)."""
        if self._recovered is not None:
            return self._recovered
        if not self.shard_dir.is_dir() or self.shard_dir.is_symlink():
            return None
        metas = [m for p in sorted(self.shard_dir.glob("*.safetensors")) if (m := _shard_meta(p)) is not None]
        fingerprint = self.config.fingerprint()
        if not metas or any(m.get("fingerprint") != fingerprint for m in metas):
            return None
        try:
            model = json.loads(metas[0]["model"])
            layers = json.loads(metas[0]["layers"])
            files = json.loads(metas[0].get("model_files") or "null")
        except (KeyError, TypeError, ValueError):
            return None
        record = {
            "status": "running",
            "created": now(),
            "fingerprint": fingerprint,
            "config": self.config.model_dump(mode="json"),
            "model": model,
            "model_files": files,
            "layers": layers,
            "shards": {},  # no checksums: each shard is checked by parsing it and its shape
            "recovered_from_shards": len(metas),
        }
        if record_problem(record) or not isinstance(model, dict) or not layers:
            return None
        self._recovered = record
        return record

    def check(self) -> dict[str, Any] | None:
        """Check the folder against this config without changing anything; the previous run.json, if any.

        With ``overwrite`` a run of another config (or one whose run.json is unreadable) is accepted (and
        returns None): :meth:`prepare` clears it later, once everything else has been checked. A folder that
        holds other things but no run is never overwritten, and an ``activations`` link is refused: a run
        writes and deletes only inside its own folder.
        """
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"output path {self.folder} exists and is not a folder; choose another --out")
        if self.shard_dir.is_symlink() or (self.shard_dir.exists() and not self.shard_dir.is_dir()):
            raise ConfigError(
                f"{self.shard_dir} is a symbolic link or not a folder; a run writes and deletes only inside its "
                "own folder: remove it, or choose another --out"
            )
        try:
            previous = self.read_run_json()
        except ConfigError as exc:
            if self.overwrite:
                self._unreadable = True
                return None
            recovered = self._recovered or self.recovered_record()
            if recovered is None:
                raise
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"{str(exc).split('; ')[0]}; rebuilt the record from its {recovered['recovered_from_shards']} "
                    "shard(s), which carry this config's fingerprint: only what is missing is recomputed",
                    stacklevel=2,
                )
            return recovered
        if previous is None:
            stray = sorted(
                p.name
                for p in (self.folder.iterdir() if self.folder.is_dir() else ())
                if not _TEMP.match(p.name) and p.name not in LOCK_NAMES
            )
            if stray:
                raise ConfigError(
                    f"output folder {self.folder} is not empty and holds no run ({', '.join(stray[:5])}); "
                    "choose another --out (--overwrite replaces only an earlier run)"
                )
            return None
        if previous.get("fingerprint") != self.config.fingerprint():
            if not self.overwrite:
                diff = config_diff(previous.get("config") or {}, self.config.model_dump(mode="json"))
                raise ConfigError(
                    f"output folder {self.folder} holds a run of a different config (differs in: "
                    f"{', '.join(diff) or 'fingerprint'}); choose another --out, or pass --overwrite to replace it"
                )
            self._replaced = previous
            return None
        return previous

    def prepare(self) -> dict[str, Any] | None:
        """Check the folder, remove temporaries of killed writers, clear it where ``overwrite`` allows."""
        previous = self.check()
        remove_stale_temps(self.folder, ("run.json", *OUTPUTS))  # a killed writer's leftovers, never results
        remove_stale_temps(self.shard_dir)
        if previous is None and self.overwrite and self.folder.is_dir():
            self.clear()
        return previous

    def _own_files(self) -> list[Path]:
        """The files of the run being replaced: its records, outputs and the shards it lists.

        When its run.json could not be read, the shards are those in ``activations/`` that carry a
        conceptprobe shard header (a ``concept`` and ``layers`` in their metadata).
        """
        files = [self.folder / name for name in ("run.json", *OUTPUTS)]
        record = getattr(self, "_replaced", None) or {}
        listed = set(record.get("shards") or {}) | {
            rel.removeprefix("activations/").removesuffix(".safetensors")
            for rel in record.get("outputs") or {}
            if rel.startswith("activations/")
        }
        if getattr(self, "_unreadable", False) and self.shard_dir.is_dir():
            listed |= {p.stem for p in self.shard_dir.glob("*.safetensors") if _is_shard(p)}
        files += [self.shard_dir / f"{c}.safetensors" for c in sorted(listed) if SAFE_NAME.match(c)]
        return files

    def clear(self) -> None:
        """Delete the replaced run's own files (never through a symbolic link, never anything else)."""
        for path in self._own_files():
            if path.is_symlink():
                path.unlink()  # the link itself, never its target
            elif path.is_file():
                path.unlink()

    def write_run_json(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.run_json, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")

    def shard_state(
        self, concept: str, n: int, layers: list[int], positions: list[int], sha256: str | None = None
    ) -> str:
        """``complete``, ``missing`` or ``corrupt: <why>`` (a corrupt shard is deleted).

        With ``sha256`` (recorded when the shard was written) the file must match it; without (a kill
        between the shard's rename and the record) it must parse and have the expected shape.
        """
        path = self.shard_path(concept)
        if not path.is_file():
            return "missing"
        stat = path.stat()
        if self._verified.get(concept) == (stat.st_mtime_ns, stat.st_size, sha256):
            return "complete"  # verified already by this process, unchanged since
        from safetensors import SafetensorError

        why = None
        if sha256 is not None and sha256_of(path) != sha256:
            why = "checksum mismatch"
        else:
            try:
                acts, meta = self.read_shard(concept)
            except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
                why = f"unreadable ({exc.__class__.__name__})"
            else:
                if not (
                    acts.shape[0] == n
                    and meta["layers"] == layers
                    and meta["positions"] == positions
                    and len(meta["predictions"]) == n
                ):
                    why = "wrong shape or layers"
        if why is None:
            self._verified[concept] = (stat.st_mtime_ns, stat.st_size, sha256)
            return "complete"
        path.unlink(missing_ok=True)
        self.corrupt[concept] = why
        return f"corrupt: {why}"

    def has_shard(self, concept: str, n: int, layers: list[int], positions: list[int]) -> bool:
        """Whether a complete, readable shard for ``concept`` exists (a corrupt one is deleted)."""
        return self.shard_state(concept, n, layers, positions) == "complete"

    def write_shard(
        self,
        concept: str,
        activations: torch.Tensor,
        predictions: list[dict[str, Any]],
        layers: list[int],
        positions: list[int],
        provenance: dict[str, Any] | None = None,
    ) -> str:
        """Write a concept's shard atomically; returns its sha256.

        Its metadata holds, besides the layers, positions and predictions, the run's fingerprint and capture
        settings and, from ``provenance`` (the run record), the model's info and files: enough to rebuild
        ``run.json``. Nothing that varies between equal runs (load times) is kept: equal runs, equal bytes.
        """
        import torch

        if not torch.isfinite(activations).all():
            bad = (~torch.isfinite(activations)).nonzero()[0].tolist()
            raise FloatingPointError(
                f"NaN/inf in captured activations of concept {concept!r} (prompt {bad[0]}, layer "
                f"{layers[bad[1]]}); try --dtype float32, the model is numerically unstable in this dtype"
            )
        path = self.shard_path(concept)
        dump = self.config.model_dump(mode="json")
        meta = {
            "concept": concept,
            "layers": json.dumps(layers),
            "positions": json.dumps(positions),
            "predictions": json.dumps(predictions),
            "fingerprint": self.config.fingerprint(),
            "config": json.dumps({k: dump[k] for k in CAPTURE_FIELDS}, sort_keys=True),
        }
        model = (provenance or {}).get("model")
        if isinstance(model, dict):
            steady = {k: v for k, v in model.items() if k != "load_seconds"}
            meta["model"] = json.dumps(steady, sort_keys=True, default=str)
            meta["model_files"] = json.dumps(
                (provenance or {}).get("model_files"), sort_keys=True, default=str
            )
        data = safetensors_bytes("activations", activations, meta)
        atomic_write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()

    def read_shard(self, concept: str) -> tuple[torch.Tensor, dict[str, Any]]:
        path = self.shard_path(concept)
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
        acts = load_file(str(path))["activations"]
        meta = {
            "concept": raw["concept"],
            "layers": json.loads(raw["layers"]),
            "positions": json.loads(raw["positions"]),
            "predictions": json.loads(raw["predictions"]),
        }
        return acts, meta

    def write_metrics(self, frame: pd.DataFrame) -> str:
        """Write ``metrics.parquet`` (deterministic bytes for equal frames); returns its sha256."""
        missing = [c for c in METRIC_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"metrics frame lacks columns {missing}")
        frame = frame[METRIC_COLUMNS + [c for c in frame.columns if c not in METRIC_COLUMNS]]
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        return self._write("metrics.parquet", buf.getvalue())

    def write_predictions(self, rows: Iterable[dict[str, Any]]) -> str:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return self._write("predictions.jsonl", text.encode())

    def write_table(self, table: str) -> str:
        return self._write("table.txt", table.encode())

    def _write(self, name: str, data: bytes) -> str:
        atomic_write_bytes(self.folder / name, data)
        return hashlib.sha256(data).hexdigest()

    def verify_outputs(self, record: dict[str, Any]) -> list[str]:
        """Problems with a complete run's outputs against the checksums in its ``run.json`` (empty = fine)."""
        outputs = record.get("outputs")
        if record.get("status") != "complete" or not isinstance(outputs, dict) or not outputs:
            return ["the run is not complete"]
        problems = []
        for rel, expected in outputs.items():
            path = self.folder / rel
            if not path.is_file():
                if not rel.startswith("activations/"):  # shards may be deleted on purpose to save space
                    problems.append(f"{rel} is missing")
            elif sha256_of(path) != expected:
                problems.append(f"{rel} is corrupt (checksum mismatch)")
        return problems


def _shard_meta(path: Path) -> dict[str, Any] | None:
    """The metadata of a conceptprobe shard (a regular safetensors file with a concept and layers), or None."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        with path.open("rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            if size > 1 << 26:
                return None
            header = json.loads(fh.read(size))
    except (OSError, struct.error, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    ok = isinstance(meta, dict) and "concept" in meta and "layers" in meta
    return meta if ok else None


def _is_shard(path: Path) -> bool:
    """Whether ``path`` is a conceptprobe shard: a regular safetensors file with a concept and layers."""
    return _shard_meta(path) is not None


def read_metrics(folder: str | Path) -> pd.DataFrame:
    """The metrics of a run folder, with a clear error if the run is incomplete."""
    path = Path(folder) / "metrics.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no metrics.parquet: the run is incomplete or this is not a run folder"
        )
    import pandas as pd

    return pd.read_parquet(path)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
