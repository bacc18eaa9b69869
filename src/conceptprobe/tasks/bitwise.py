"""The paper's bitwise task: apply a latent Boolean operator to two binary numbers.

Input: two ``width``-digit binary strings separated by one space (``"10110 01101"``); answer: the bitwise
result as a ``width``-digit string, leading zeros kept (AND -> ``"00100"``). ``null``: ``width`` random bits.
The operands depend only on the random stream, so one seed gives the same input under every concept
(``null`` then draws its bits after the operands).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from conceptprobe.tasks.base import NULL_CONCEPT, ConceptTask, Example
from conceptprobe.tasks.registry import register_task

OPERATORS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "and": lambda a, b: a & b,
    "nand": lambda a, b: 1 - (a & b),
    "or": lambda a, b: a | b,
    "nor": lambda a, b: 1 - (a | b),
    "xor": lambda a, b: a ^ b,
    "xnor": lambda a, b: 1 - (a ^ b),
}
"""Concept name -> elementwise operator on 0/1 integer arrays."""


#: Most digits per number (a prompt holds 3 x width digits per demonstration).
MAX_WIDTH = 64


def _bits(bits: np.ndarray) -> str:
    return "".join("1" if b else "0" for b in bits)


@register_task("bitwise")
class BitwiseTask(ConceptTask):
    """AND/NAND/OR/NOR/XOR/XNOR of two binary numbers. Params: ``width`` (digits per number, default 5)."""

    version = "1"
    concepts = (*OPERATORS, NULL_CONCEPT)
    description = (
        "Bitwise AND / NAND / OR / NOR / XOR / XNOR of two `width`-digit binary numbers given as "
        "'a b'; null: `width` random bits."
    )

    def __init__(self, width: int = 5, **unknown: Any) -> None:
        if unknown:
            raise ValueError(
                f"task 'bitwise' got unknown parameter(s) {sorted(unknown)}; its only parameter is `width`"
            )
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or not 1 <= width <= MAX_WIDTH:
            raise ValueError(
                f"bitwise `width` must be an integer from 1 to {MAX_WIDTH} (digits per number, it sets the "
                f"prompt length), got {str(width)[:40]!r}"
            )
        super().__init__(width=int(width))
        self.width = int(width)

    def sample(self, concept: str, rng: np.random.Generator) -> Example:
        """Two random operands and the operator's result (or random bits for null)."""
        self.check_concept(concept)
        a, b = rng.integers(0, 2, size=(2, self.width))
        null = concept == NULL_CONCEPT
        result = rng.integers(0, 2, size=self.width) if null else OPERATORS[concept](a, b)
        return Example(input=f"{_bits(a)} {_bits(b)}", answer=_bits(result))

    def lexical_features(self, answers: Sequence[str]) -> dict[str, float]:
        """Fraction of ones in the answers at each digit position (``ones@0`` first) and overall (``ones``).

        A position an answer does not reach counts as a zero there; no answers give all zeros.
        """
        keys = [f"ones@{i}" for i in range(self.width)]
        out = dict.fromkeys([*keys, "ones"], 0.0)
        if not answers:
            return out
        for i, key in enumerate(keys):
            out[key] = sum(a[i : i + 1] == "1" for a in answers) / len(answers)
        digits = sum(len(a) for a in answers)
        out["ones"] = sum(a.count("1") for a in answers) / digits if digits else 0.0
        return out
