"""Surface readers: what a context-free, model-free reader of a prompt has, as feature vectors.

The surface baseline of a run is the same k-NN and probe as the model's decodability, run on these features
instead of the residual stream (Hewitt & Liang 2019, "Designing and Interpreting Probes with Control
Tasks"). They are deliberately simple, lexical readers: a reader that *solves* the demonstrations would
reach 100% on any well-posed task, and the question a baseline answers is whether the model goes beyond
lexical cues.

Readers (``READERS``):

- ``answers``: a bag of the demonstration answers' words (how often each word is an answer in the prompt);
- ``prompt``: a bag of all the prompt's words (demonstrations, answers and query);
- ``lexical``: the task's own context-free lexical features of the demonstration answers
  (:meth:`~conceptprobe.tasks.base.ConceptTask.lexical_features`; for part of speech, each answer word's
  most frequent tag in the lexicon or treebank, never its gold tag in context). Tasks without it skip it.

Words are ``\\w+`` runs and single punctuation marks, case kept. Bag features keep only words that occur in
at least two prompts: a word seen once cannot make two prompts neighbours or inform a held-out fold.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["READERS", "bag_of_words", "surface_features", "words"]

READERS = ("answers", "prompt", "lexical")
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """The words of ``text``: runs of word characters and single punctuation marks."""
    return _WORD.findall(text)


def bag_of_words(docs: Sequence[Sequence[str]], min_df: int = 2) -> tuple[np.ndarray, list[str]]:
    """Count matrix ``[n_docs, n_words]`` (float32) over words occurring in at least ``min_df`` documents."""
    df = Counter(w for doc in docs for w in set(doc))
    vocab = sorted(w for w, c in df.items() if c >= min_df)
    index = {w: i for i, w in enumerate(vocab)}
    out = np.zeros((len(docs), max(1, len(vocab))), dtype=np.float32)
    for i, doc in enumerate(docs):
        for w in doc:
            j = index.get(w)
            if j is not None:
                out[i, j] += 1.0
    return out, vocab


def _lexical(task: Any, prompts: Sequence[Any]) -> np.ndarray | None:
    rows = [task.lexical_features([d.answer for d in p.demos]) for p in prompts]
    if any(r is None for r in rows):
        return None
    keys = sorted({k for r in rows for k in r})
    if not keys:
        return None
    return np.array([[float(r.get(k, 0.0)) for k in keys] for r in rows], dtype=np.float32)


def surface_features(prompts: Sequence[Any], task: Any = None) -> dict[str, np.ndarray]:
    """Features ``[n, f]`` of each reader for ``prompts`` (objects with ``text`` and ``demos``), in order."""
    out = {
        "answers": bag_of_words([[w for d in p.demos for w in words(d.answer)] for p in prompts])[0],
        "prompt": bag_of_words([words(p.text) for p in prompts])[0],
    }
    lexical = _lexical(task, prompts) if task is not None else None
    if lexical is not None:
        out["lexical"] = lexical
    return out
