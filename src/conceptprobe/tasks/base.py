"""The concept-task interface: a family of latent concepts, each a generator of (input, answer) pairs."""

from __future__ import annotations

from abc import ABC, abstractmethod
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
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    concepts: ClassVar[tuple[str, ...]]
    description: ClassVar[str] = ""
    min_shots: ClassVar[int] = 0  # fewest demonstrations a prompt may have (runs with fewer are refused)

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = dict(params)

    @abstractmethod
    def sample(self, concept: str, rng: np.random.Generator) -> Example:
        """Draw one example of ``concept``; the answer must be exact by construction."""

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
