"""``pos-treebank``: the part-of-speech task on natural sentences from a treebank (Han et al. 2024).

Sentences are read from a CoNLL-U file or folder, or a PTB-style tagged file (:mod:`conceptprobe.tasks.treebank`).
A sentence is kept when it contains all six target tags (noun, verb, adjective, adverb, preposition, pronoun)
and every concept's answer, the FIRST word carrying the concept's tag, is a whole word of the sentence's text
(a sentence whose answer sits inside a multiword token such as "gonna" is dropped). Sentences with the same
text are kept once. The kept sentences are split, by ``split_seed``, into disjoint demonstration (80%) and
query (20%) pools; prompts deal demonstrations from the demonstration pool without replacement while it lasts
(:func:`conceptprobe.prompts.build_prompts`). ``null``: a uniformly chosen word of the sentence, punctuation
excluded.
"""

from __future__ import annotations

from collections.abc import Sequence

from conceptprobe.tasks.base import NULL_CONCEPT
from conceptprobe.tasks.lexical import POS_TAGS
from conceptprobe.tasks.registry import register_task
from conceptprobe.tasks.treebank import TreebankTask


@register_task("pos-treebank")
class PosTreebankTask(TreebankTask):
    """First word of a part of speech in a treebank sentence. Params: ``treebank``, ``tagset``, ...

    See :class:`~conceptprobe.tasks.treebank.TreebankTask` for the parameters.
    """

    version = "1"
    concepts = (*POS_TAGS, NULL_CONCEPT)
    description = (
        "First noun / verb / adjective / adverb / preposition / pronoun of a natural treebank sentence holding "
        "all six (param `treebank`: CoNLL-U or PTB-style); disjoint demo/query pools; null: a random word."
    )
    keep_rule = "sentences holding all six tags, each first one a whole word of the text"

    def answers_of(
        self, forms: Sequence[str], classes: Sequence[str], whole: Sequence[bool]
    ) -> dict[str, str] | None:
        """The first word of each part of speech; None if one is missing or not a whole word of the text."""
        answers = {}
        for tag in POS_TAGS:
            if tag not in classes:
                return None
            i = classes.index(tag)
            if not whole[i]:
                return None
            answers[tag] = forms[i]
        return answers
