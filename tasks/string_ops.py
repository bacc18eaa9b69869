"""Example task plugin: simple string operations on short words.

How plugins work: every ``*.py`` file in a ``tasks/`` folder (``./tasks``, ``$CONCEPTPROBE_TASKS_DIR`` or
``--tasks-dir``; files starting with ``_`` are ignored) is imported when tasks are first looked up, and each
``@register_task("name")`` class in it becomes available as ``get_task("name")`` and in ``conceptprobe
tasks``. A package can instead expose its class in the ``conceptprobe.tasks`` entry-point group::

    [project.entry-points."conceptprobe.tasks"]
    string_ops = "my_package.string_ops:StringOpsTask"

A task subclasses ``ConceptTask``: it names its concepts (always including ``"null"``), a ``version`` to
bump whenever the examples change, and ``sample(concept, rng)`` returning an ``Example(input, answer)``
whose answer is exact. Draw every random choice from ``rng`` so a seed reproduces the examples. A plugin
that fails to import is skipped with a warning, and a plugin can never replace a built-in task.
"""

from __future__ import annotations

import numpy as np

from conceptprobe.tasks import ConceptTask, Example, register_task

WORDS: tuple[str, ...] = (
    "apple", "bread", "cloud", "dance", "eagle", "flame", "grape", "house", "juice", "knife",
    "lemon", "mouse", "night", "ocean", "piano", "queen", "river", "stone", "table", "uncle",
    "voice", "water", "yacht", "zebra", "chair", "plant", "smile", "train", "beach", "storm",
)  # fmt: skip


@register_task("string_ops")
class StringOpsTask(ConceptTask):
    """First letter / last letter / reversal / uppercase of a short word; null: another random word."""

    version = "1"
    concepts = ("first_letter", "last_letter", "reverse", "uppercase", "null")
    description = "String operations on a short lowercase word (example plugin)."

    def sample(self, concept: str, rng: np.random.Generator) -> Example:
        self.check_concept(concept)
        i = int(rng.integers(len(WORDS)))
        word = WORDS[i]
        if concept == "first_letter":
            answer = word[0]
        elif concept == "last_letter":
            answer = word[-1]
        elif concept == "reverse":
            answer = word[::-1]
        elif concept == "uppercase":
            answer = word.upper()
        else:  # null: a different word, unrelated to the input
            answer = WORDS[(i + 1 + int(rng.integers(len(WORDS) - 1))) % len(WORDS)]
        return Example(input=word, answer=answer)
