"""k-shot prompt assembly. A prompt is k demonstrations of one concept plus a query, in plain text.

The prompt text ends exactly where the query's answer starts, so the position right before the
answer is the prompt's last token (offset 0 in ``positions``).

Generator tasks draw every example from the task's sampler. Tasks with finite pools (``task.pool("demo")``
not None, e.g. treebank sentences) deal their examples like cards: for each concept, demonstrations come from
a seeded permutation of the demonstration pool, without replacement across all of that concept's prompts, and
only when the pool is exhausted does a fresh permutation start (reuse begins); queries likewise from the
query pool. :func:`reuse_stats` measures how much a list of prompts reuses its inputs.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

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
    """One k-shot prompt: its text (ending right before the answer), the answer and its concept.

    ``demos`` are the demonstrations in prompt order (what a surface reader of the prompt sees).
    """

    concept: str
    index: int
    text: str
    answer: str
    query: str
    shots: int
    demos: tuple[Example, ...] = ()

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

    Within a prompt, demonstrations and the query have distinct inputs. A task with finite pools deals its
    demonstrations (and queries) without replacement across the ``n`` prompts while its pool lasts.
    """
    task.check_concept(concept)
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if n < 1:
        raise ValueError(f"n (prompts per concept) must be >= 1, got {n}")
    fmt = fmt or PromptFormat()
    rng = concept_rng(seed, task.name, concept)
    pool = getattr(task, "pool", None)
    demo_pool = pool("demo") if pool is not None else None
    if demo_pool is not None:
        examples = _deal_from_pools(task, concept, shots, n, rng, demo_pool, pool("query"))  # type: ignore[misc]
    else:
        examples = [_sample_examples(task, concept, shots, rng) for _ in range(n)]
    prompts = []
    for i, (demos, query) in enumerate(examples):
        text = "".join(fmt.demo(d) for d in demos) + fmt.query(query)
        prompts.append(
            Prompt(
                concept=concept,
                index=i,
                text=text,
                answer=query.answer,
                query=query.input,
                shots=shots,
                demos=tuple(demos),
            )
        )
    return prompts


def _sample_examples(
    task: ConceptTask, concept: str, shots: int, rng: np.random.Generator
) -> tuple[list[Example], Example]:
    """A generator task's demonstrations and query for one prompt (distinct inputs, within reason)."""
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
    return demos, query


class _Deck:
    """Indices of a pool dealt from seeded permutations; a fresh permutation starts when one runs out.

    A card refused for the current prompt (its input is already there) is held and dealt first to the
    next prompt, so no card of a permutation is lost.
    """

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.order: list[int] = []
        self.held: deque[int] = deque()

    def deal(self, k: int, accept) -> list[Any]:
        """``k`` results of ``accept(index)`` (None: refused, the card is held for later)."""
        out: list[Any] = []
        refused: list[int] = []
        fresh = 0
        while len(out) < k:
            if self.held:
                index = self.held.popleft()
            else:
                if fresh > 2 * self.size:  # a whole permutation seen: no card left that fits this prompt
                    raise ValueError(
                        f"the pool has too few distinct inputs ({self.size} items) for this prompt; "
                        "use fewer shots or a larger pool"
                    )
                if not self.order:
                    self.order = [int(i) for i in self.rng.permutation(self.size)][::-1]
                index = self.order.pop()
                fresh += 1
            result = accept(index)
            if result is None:
                refused.append(index)
                continue
            out.append(result)
        self.held.extendleft(reversed(refused))
        return out


def _deal_from_pools(
    task: ConceptTask,
    concept: str,
    shots: int,
    n: int,
    rng: np.random.Generator,
    demo_pool: Sequence[Any],
    query_pool: Sequence[Any] | None,
) -> list[tuple[list[Example], Example]]:
    """Demonstrations and a query per prompt, dealt without replacement from the pools while they last."""
    query_pool = demo_pool if query_pool is None else query_pool
    if shots and not demo_pool:
        raise ValueError(f"task {task.name!r} has an empty demonstration pool")
    if not query_pool:
        raise ValueError(f"task {task.name!r} has an empty query pool")
    if shots > len(demo_pool):
        raise ValueError(
            f"shots={shots} but task {task.name!r} has only {len(demo_pool)} demonstration(s) in its pool; "
            "a prompt's demonstrations must be distinct: use fewer shots or a larger pool"
        )
    demo_deck, query_deck = _Deck(len(demo_pool), rng), _Deck(len(query_pool), rng)
    out = []
    for _ in range(n):
        taken: set[str] = set()

        def accept(index: int, pool: Sequence[Any], taken: set[str] = taken) -> Example | None:
            ex = task.from_pool(pool[index], concept, rng)
            if ex.input in taken:
                return None
            taken.add(ex.input)
            return ex

        demos = demo_deck.deal(shots, lambda i: accept(i, demo_pool))
        (query,) = query_deck.deal(1, lambda i: accept(i, query_pool))
        out.append((demos, query))
    return out


def reuse_stats(prompts: Sequence[Prompt]) -> dict[str, float | int]:
    """How much one concept's prompts (in order) reuse inputs, by input text.

    - ``demo_draws``: demonstrations in all; ``demo_reused``: those whose input already was a demonstration
      of an EARLIER prompt; ``demo_reuse_rate``: their fraction (0 without demonstrations);
    - ``queries``; ``query_reused``: queries whose input was an earlier prompt's query;
      ``query_reuse_rate``: their fraction;
    - ``query_in_demos``: queries whose input is a demonstration of any prompt of the list.
    """
    demo_seen: set[str] = set()
    query_seen: set[str] = set()
    all_demos = {d.input for p in prompts for d in p.demos}
    draws = demo_reused = query_reused = query_in_demos = 0
    for p in prompts:
        inputs = [d.input for d in p.demos]
        draws += len(inputs)
        demo_reused += sum(1 for x in inputs if x in demo_seen)
        query_reused += p.query in query_seen
        query_in_demos += p.query in all_demos
        demo_seen.update(inputs)
        query_seen.add(p.query)
    return {
        "demo_draws": draws,
        "demo_reused": demo_reused,
        "demo_reuse_rate": demo_reused / draws if draws else 0.0,
        "queries": len(prompts),
        "query_reused": query_reused,
        "query_reuse_rate": query_reused / len(prompts) if prompts else 0.0,
        "query_in_demos": query_in_demos,
    }
