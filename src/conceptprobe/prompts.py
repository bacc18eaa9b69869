"""k-shot prompt assembly. A prompt is k demonstrations of one concept plus a query, in plain text.

The prompt text ends exactly where the query's answer starts, so the position right before the
answer is the prompt's last token (offset 0 in ``positions``).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from conceptprobe.tasks.base import ConceptTask, Example


class PromptFormat(BaseModel):
    """``{input_prefix}{input}{between}{output_prefix} {answer}{separator}`` per demonstration."""

    model_config = ConfigDict(extra="forbid")

    input_prefix: str = "Input: "
    between: str = "\n"
    output_prefix: str = "Output:"
    answer_prefix: str = " "
    separator: str = "\n"

    def demo(self, ex: Example) -> str:
        return f"{self.input_prefix}{ex.input}{self.between}{self.output_prefix}{self.answer_prefix}{ex.answer}{self.separator}"

    def query(self, ex: Example) -> str:
        return f"{self.input_prefix}{ex.input}{self.between}{self.output_prefix}"


@dataclass(frozen=True)
class Prompt:
    """One k-shot prompt: its text (ending right before the answer), the answer and its concept."""

    concept: str
    index: int
    text: str
    answer: str
    query: str
    shots: int

    def to_dict(self) -> dict:
        return asdict(self)


def concept_rng(seed: int, task: str, concept: str) -> np.random.Generator:
    """A generator that depends only on (seed, task name, concept), stable across runs and machines."""
    key = [seed, zlib.crc32(task.encode()), zlib.crc32(concept.encode())]
    return np.random.default_rng(np.random.SeedSequence(key))


def build_prompts(
    task: ConceptTask,
    concept: str,
    shots: int,
    n: int,
    seed: int = 0,
    fmt: PromptFormat | None = None,
) -> list[Prompt]:
    """``n`` prompts of ``concept``, each ``shots`` demonstrations and a query; same seed, same prompts.

    Within a prompt, demonstrations and the query have distinct inputs.
    """
    task.check_concept(concept)
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if n < 1:
        raise ValueError(f"n (prompts per concept) must be >= 1, got {n}")
    fmt = fmt or PromptFormat()
    rng = concept_rng(seed, task.name, concept)
    prompts = []
    for i in range(n):
        examples: list[Example] = []
        seen: set[str] = set()
        tries = 0
        while len(examples) < shots + 1:
            ex = task.sample(concept, rng)
            tries += 1
            if ex.input in seen and tries < 50 * (shots + 1):
                continue
            seen.add(ex.input)
            examples.append(ex)
        *demos, query = examples
        text = "".join(fmt.demo(d) for d in demos) + fmt.query(query)
        prompts.append(
            Prompt(concept=concept, index=i, text=text, answer=query.answer, query=query.input, shots=shots)
        )
    return prompts
