"""The concept-task interface: a family of latent concepts, each a generator of (input, answer) pairs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

NULL_CONCEPT = "null"


@dataclass(frozen=True)
class Example:
    """One input and its exact answer under a concept."""

    input: str
    answer: str


class ConceptTask(ABC):
    """A task family: named latent concepts (always including ``null``) and a sampler per concept.

    Subclasses set ``name``, ``version``, ``concepts`` and ``description`` as class attributes and
    implement :meth:`sample`. Keyword parameters given to the constructor (e.g. ``width`` for bitwise)
    are kept in :attr:`params` and recorded in every result.

    Optional, with defaults that keep a plain generator task working unchanged:

    - ``pairs``: pairs of concepts that share an answer class and differ only in how the answer relates to
      the input (e.g. first noun vs last noun); neither member is ``null``.
    - :meth:`lexical_features`: a context-free, model-free reading of the demonstration answers (the
      surface baseline); None when the task has none.
    - :meth:`pool` and :meth:`from_pool`: a task drawn from finite pools of items (e.g. treebank
      sentences) returns its demonstration and query pools; prompts then deal demonstrations without
      replacement (:func:`conceptprobe.prompts.build_prompts`). Such a task still implements
      :meth:`sample` (e.g. a random query-pool item).
    - An instance may set its own ``version`` (a task with a ``version`` parameter); :meth:`info` reports
      the instance's.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    concepts: ClassVar[tuple[str, ...]]
    description: ClassVar[str] = ""
    min_shots: ClassVar[int] = 0  # fewest demonstrations a prompt may have (runs with fewer are refused)
    pairs: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = dict(params)

    @abstractmethod
    def sample(self, concept: str, rng: np.random.Generator) -> Example:
        """Draw one example of ``concept``; the answer must be exact by construction."""

    def lexical_features(self, answers: Sequence[str]) -> dict[str, float] | None:
        """Context-free features of the demonstration answers (never their gold tag in context), or None."""
        return None

    def pool(self, role: str) -> Sequence[Any] | None:
        """The finite pool of items for ``role`` (``"demo"`` or ``"query"``), or None for a generator task."""
        return None

    def from_pool(self, item: Any, concept: str, rng: np.random.Generator) -> Example:
        """The example of ``concept`` on one pool item (``rng`` for any random choice, e.g. under null)."""
        raise NotImplementedError(f"task {self.name!r} has no finite pools (pool() returns None)")

    def check_concept(self, concept: str) -> None:
        """Raise a clear error for a concept this family does not have."""
        if concept not in self.concepts:
            raise ValueError(
                f"task {self.name!r} has no concept {concept!r}; its concepts are: "
                + ", ".join(self.concepts)
            )

    def info(self) -> dict[str, Any]:
        """Name, version, concepts and parameters: what a result records about its task."""
        return {
            "name": self.name,
            "version": self.version,
            "concepts": list(self.concepts),
            "params": self.params,
            "description": self.description,
        }
