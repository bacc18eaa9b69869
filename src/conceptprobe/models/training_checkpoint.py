"""Checkpoints written by ``conceptprobe train``, loaded through :func:`conceptprobe.models.load_model`.

A training run folder holds ``train.json`` (the config) and ``checkpoints/step_<7 digits>/`` folders with
``model.safetensors`` and ``state.json`` (complete once ``state.json`` exists). Either loads::

    load_model("results/local/train-induction-cpu/checkpoints/step_0000850")   # one checkpoint folder
    load_model("results/local/train-induction-cpu", revision="step850")         # a run folder + its step

(a run folder without ``revision`` loads its latest complete checkpoint; ``revision`` may be ``step850``,
``step_0000850`` or ``850``). The architecture is rebuilt from ``train.json`` (``model`` and ``data``:
:func:`conceptprobe.models.small_lm.build_lm` with the run's vocabulary and sequence length) and the weights
are read from safetensors, after checking that the checkpoint's ``fingerprint`` is the run's. Only token
models (task ``repeated_segments``) are causal LMs; a regression run is refused.

**Tokenizer stand-in.** The models read integer tokens, not text. :func:`integer_tokenizer` is a
``PreTrainedTokenizerFast`` over that vocabulary: token ``i`` is the word ``"i"`` (decimal), token 0 is
``<bos>`` (also EOS and padding, as in the model's config), and the tokenizer puts ``<bos>`` before a text
as training did: ``tok("5 17 3").input_ids == [0, 5, 17, 3]``. Any other word becomes ``<unk>``, id
``vocab_size``, which is outside the model's embedding: the stand-in is for sequences of integers only
(prompts of words do not apply to these models).

**Info.** ``source`` is ``"training"``, ``revision`` the checkpoint's folder name (``step_0000850``) and
``extra`` holds ``step``, ``train_folder``, ``fingerprint``, ``task`` and ``tokenizer`` (what the stand-in
is).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conceptprobe.models.errors import ModelLoadError

TRAIN_JSON = "train.json"
STATE_JSON = "state.json"
WEIGHTS = "model.safetensors"
CHECKPOINT_DIR = re.compile(r"^step_(\d+)$")
REVISION = re.compile(r"^(?:step[-_]?)?0*(\d+)$")
TOKENIZER_NOTE = (
    "integer stand-in: token i is the word 'i', 0 is <bos> (put before every text); other words are <unk> "
    "(id vocab_size, outside the model)"
)


@dataclass
class TrainingCheckpoint:
    """A checkpoint folder of ``conceptprobe train`` and what its run's ``train.json`` says about it."""

    folder: Path
    run_folder: Path
    step: int
    config: dict[str, Any]  # train.json's "config"
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return int(self.config["data"]["vocab_size"])

    @property
    def n_positions(self) -> int:
        """BOS plus the run's ``seq_len`` tokens."""
        return int(self.config["data"]["seq_len"]) + 1

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.config.get("model") or {})


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at ``step`` (``step_0000850``)."""
    return f"step_{step:07d}"


def saved_steps(run_folder: str | Path) -> list[int]:
    """Steps of the complete checkpoints (``model.safetensors`` and ``state.json``) of a run folder."""
    root = Path(run_folder) / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        got = CHECKPOINT_DIR.match(d.name)
        if got and (d / STATE_JSON).is_file() and (d / WEIGHTS).is_file():
            steps.append(int(got.group(1)))
    return sorted(steps)


def is_training_run(path: str | Path) -> bool:
    """Whether ``path`` is a run folder of ``conceptprobe train`` (``train.json`` and ``checkpoints/``)."""
    path = Path(path)
    return (path / TRAIN_JSON).is_file() and (path / "checkpoints").is_dir()


def is_training_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder of ``conceptprobe train`` (``step_<n>`` holding
    ``model.safetensors`` and ``state.json``, two levels below the run's ``train.json``)."""
    path = Path(path)
    return (
        CHECKPOINT_DIR.match(path.name) is not None
        and (path / WEIGHTS).is_file()
        and (path / STATE_JSON).is_file()
        and (path.parent.parent / TRAIN_JSON).is_file()
    )


def is_training_folder(path: str | Path) -> bool:
    """A training run folder or one of its checkpoint folders."""
    return is_training_checkpoint(path) or is_training_run(path)


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{what} {path} is unreadable ({exc.__class__.__name__}); rerun `conceptprobe train` to rewrite it"
        ) from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} {path} is not a JSON object; rerun `conceptprobe train` to rewrite it")
    return data


def parse_step(revision: str) -> int:
    """``step850``, ``step_0000850`` or ``850`` -> 850."""
    got = REVISION.match(str(revision).strip())
    if not got:
        raise ModelLoadError(
            f"revision {revision!r} of a training run is not a step: write step850, step_0000850 or 850"
        )
    return int(got.group(1))


def resolve_checkpoint(path: str | Path, revision: str | None = None) -> TrainingCheckpoint:
    """The checkpoint a training folder names: a checkpoint folder itself (``revision`` must then agree
    with its step, or be None), or a run folder at step ``revision`` (default: its latest)."""
    path = Path(path).expanduser()
    if is_training_checkpoint(path):
        folder, run_folder = path, path.parent.parent
        step = int(CHECKPOINT_DIR.match(path.name).group(1))  # type: ignore[union-attr]
        if revision is not None and parse_step(revision) != step:
            raise ModelLoadError(
                f"{path} is the checkpoint of step {step}, not revision {revision!r}; drop the revision or "
                "pass the run folder with it"
            )
    elif is_training_run(path):
        run_folder = path
        steps = saved_steps(path)
        if not steps:
            raise ModelLoadError(
                f"training run {path} has no complete checkpoint; train it first (`conceptprobe train`)"
            )
        step = steps[-1] if revision is None else parse_step(revision)
        if step not in steps:
            raise ModelLoadError(
                f"training run {path} saved no checkpoint at step {step}; saved steps: {_steps_text(steps)}"
            )
        folder = path / "checkpoints" / checkpoint_name(step)
    else:
        raise ModelLoadError(
            f"{path} is not a `conceptprobe train` run folder (train.json + checkpoints/) or one of its "
            "checkpoints/step_<n> folders"
        )
    train = _read(run_folder / TRAIN_JSON, "training record")
    config = train.get("config")
    if not isinstance(config, dict) or not {"data", "model", "task"} <= config.keys():
        raise ModelLoadError(
            f"{run_folder / TRAIN_JSON} has no training config (data, model, task); rerun `conceptprobe train`"
        )
    if config["task"] != "repeated_segments":
        raise ModelLoadError(
            f"{folder} is a {config['task']} model, not a causal LM over tokens; load it with "
            "conceptprobe.training.trainer.load_model_at"
        )
    state = _read(folder / STATE_JSON, "checkpoint state")
    fingerprint = str(train.get("fingerprint"))
    if state.get("fingerprint") != fingerprint:
        raise ModelLoadError(
            f"{folder} was written by another config than {run_folder / TRAIN_JSON} (fingerprint "
            f"{state.get('fingerprint')} != {fingerprint}); retrain the run or use its own folder"
        )
    if int(state.get("step", step)) != step:
        raise ModelLoadError(
            f"{folder / STATE_JSON} records step {state.get('step')}, not {step}; retrain it"
        )
    return TrainingCheckpoint(folder, run_folder, step, config, fingerprint)


def _steps_text(steps: list[int]) -> str:
    return (
        ", ".join(map(str, steps))
        if len(steps) <= 12
        else f"{len(steps)} steps from {steps[0]} to {steps[-1]}"
    )


def integer_tokenizer(vocab_size: int) -> Any:
    """The tokenizer stand-in of a training checkpoint (see the module doc)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, **{str(i): i for i in range(1, vocab_size)}, "<unk>": vocab_size}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 0)]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins the words with spaces
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", pad_token="<bos>", unk_token="<unk>"
    )
    out.padding_side = "left"
    out.integer_vocabulary = vocab_size  # marks the stand-in (see refuse_text)
    return out


def refuse_text(tokenizer: Any, ref: str, what: str) -> None:
    """Refuse, in one line, a measure on text (``what``) for a model whose tokenizer is the integer stand-in."""
    if getattr(tokenizer, "integer_vocabulary", None) is not None:
        raise ModelLoadError(
            f"model {ref} is a `conceptprobe train` checkpoint over integer tokens, so {what} on text does not "
            "apply; measure it on its own data with `conceptprobe checkpoints` (ICL score and head scores)"
        )


def load_training_checkpoint(ckpt: TrainingCheckpoint, dtype: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a resolved checkpoint: the run's architecture with the saved weights (eval
    mode, CPU, ``dtype``) and :func:`integer_tokenizer`."""
    from safetensors.torch import load_model

    from conceptprobe.models.small_lm import ModelSpec, build_lm

    try:
        spec = ModelSpec(**ckpt.model)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{ckpt.run_folder / TRAIN_JSON}: model: {exc}") from None
    model = build_lm(spec, ckpt.vocab_size, ckpt.n_positions)
    try:
        load_model(model, str(ckpt.folder / WEIGHTS))
    except (RuntimeError, OSError) as exc:
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelLoadError(
            f"{ckpt.folder / WEIGHTS} does not fit the architecture of {ckpt.run_folder / TRAIN_JSON} ({line}); "
            "retrain the run"
        ) from None
    return model.to(dtype).eval(), integer_tokenizer(ckpt.vocab_size)


def checkpoint_extra(ckpt: TrainingCheckpoint) -> dict[str, Any]:
    """What :class:`~conceptprobe.models.load.ModelInfo` ``extra`` records about a training checkpoint."""
    return {
        "step": ckpt.step,
        "train_folder": str(ckpt.run_folder),
        "fingerprint": ckpt.fingerprint,
        "task": ckpt.config["task"],
        "run_name": ckpt.config.get("name"),
        "tokenizer": TOKENIZER_NOTE,
    }
