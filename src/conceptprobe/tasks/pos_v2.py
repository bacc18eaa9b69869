"""Version 2 of the ``pos`` generator: grammatical sentences whose words' part of speech depends on their slot.

Version 1 drew every part of speech from its own disjoint word list, so the concept of a prompt equalled the
lexical class of its answers. Here most content words belong to two or more classes and are tagged by the
role they fill, following the Universal Dependencies (UD) conventions:

- noun / verb: "watch", "train", "park", ... ("the guard will watch the train" vs "the watch");
- adjective / adverb: "fast", "hard", "late", ... ("the late train" vs "they will work late");
- adjective / verb: "clean", "open", "dry", ... ("the clean box" vs "she will clean the box");
- adverb / preposition: "up", "inside", "around", ... without an object an adverb ("they will wait
  inside"), with one a preposition ("inside the ship").

Modals ("will", "can", ...) and the copula "be" are auxiliaries, not verbs; "the", "a"/"an", "this" are
determiners and "and" a conjunction: none of them is ever a part-of-speech answer. Verbs are in the base
form (after a modal, or imperative), nouns are singular. Sentences are lowercase words joined by single
spaces, without punctuation, and no content word appears twice in one sentence.

Placement rules keep the tags unambiguous in context: a locative adverb (``ADVL``) only ends a clause (never
before a noun phrase, where it would be a preposition), and only after a verb; a post-verbal adverb
(``ADVM``) is never followed by a noun phrase (where it would read as an adjective); an object pronoun is
never followed by a noun (where "her" would be a possessive).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from conceptprobe.tasks.lexical import POS_TAGS

# ---------------------------------------------------------------- words

NOUN_VERB: tuple[str, ...] = (
    "watch", "light", "train", "park", "plant", "ship", "book", "guard", "fish", "paint", "walk", "cook",
    "visit", "call", "dance", "drink", "film", "land", "lock", "mark", "pack", "print", "race", "ring",
    "row", "sail", "sign", "shop", "smile", "stamp", "test", "wash", "wave", "water", "brush", "cover",
    "drum", "file", "hammer", "iron", "mop", "ride", "swim", "jump", "kick", "wrap", "nail", "sketch",
    "coach", "judge", "guide", "host", "nurse", "spy", "duck", "seal", "dream", "help", "climb", "hide",
)  # fmt: skip
"""Words used both as a noun and as a verb."""

ADJ_ADV: tuple[str, ...] = (
    "fast", "hard", "late", "early", "straight", "high", "low", "deep", "daily", "weekly", "loud", "long",
    "wrong", "close",
)  # fmt: skip
"""Words used both as an adjective and as an adverb ("close" is also a verb)."""

ADJ_VERB: tuple[str, ...] = (
    "clean", "open", "dry", "warm", "empty", "clear", "free", "calm", "cool", "wet", "slow", "smooth",
    "tidy", "quiet", "brown", "narrow",
)  # fmt: skip
"""Words used both as an adjective and as a verb."""

ADV_PREP: tuple[str, ...] = (
    "up", "down", "inside", "outside", "around", "behind", "over", "near", "along", "across", "below",
    "above", "past", "underneath",
)  # fmt: skip
"""Words used as an adverb without an object and as a preposition with one."""

ADJ_ADV_PREVERBAL: tuple[str, ...] = ("still", "just", "only", "even")
"""Words used as an adjective ("the still lake") and as an adverb before the verb ("she will still paint")."""

# A few single-class words in each pool, so the pools are not all ambiguous; most answers are ambiguous words.
NOUNS_ONLY: tuple[str, ...] = ("girl", "teacher", "kitchen", "river", "garden", "window", "apple", "uncle")
VERBS_ONLY: tuple[str, ...] = ("eat", "read", "write", "sing", "follow", "carry")
ADJECTIVES_ONLY: tuple[str, ...] = ("old", "new", "big", "small", "happy", "red", "angry", "easy")
ADVERBS_AFTER_VERB: tuple[str, ...] = ("slowly", "quickly", "quietly", "together", "again")
ADVERBS_LOCATIVE: tuple[str, ...] = ("nearby", "ahead", "upstairs", "downstairs")
ADVERBS_FRONTED: tuple[str, ...] = ("later", "still", "then", "soon", "sometimes", "often")
ADVERBS_PREVERBAL: tuple[str, ...] = (*ADJ_ADV_PREVERBAL, "never", "always", "also", "often")
PREPOSITIONS_ONLY: tuple[str, ...] = (
    "in", "on", "at", "with", "for", "from", "to", "into", "through", "without", "under", "like", "by",
)  # fmt: skip

SUBJECT_PRONOUNS: tuple[str, ...] = (
    "he", "she", "we", "they", "you", "it", "someone", "everyone", "nobody", "somebody", "everybody",
)  # fmt: skip

OBJECT_PRONOUNS: tuple[str, ...] = (
    "him", "her", "us", "them", "me", "you", "it", "someone", "everyone", "something", "everything",
    "nothing", "somebody", "everybody", "anyone", "anything",
)  # fmt: skip

DETERMINERS: tuple[str, ...] = ("the", "a", "this")  # "a" becomes "an" before a vowel letter
MODALS: tuple[str, ...] = ("will", "can", "should", "must", "might", "could", "would", "may")

POOLS: dict[str, tuple[str, ...]] = {
    "noun": NOUN_VERB + NOUNS_ONLY,
    "verb": NOUN_VERB + ADJ_VERB + ("close",) + VERBS_ONLY,
    "adjective": ADJ_ADV + ADJ_VERB + ADJ_ADV_PREVERBAL + ("later",) + ADJECTIVES_ONLY,
    "adverb_after_verb": ADJ_ADV + ADVERBS_AFTER_VERB,
    "adverb_locative": ADV_PREP + ADVERBS_LOCATIVE,
    "adverb_fronted": ADVERBS_FRONTED,
    "adverb_preverbal": ADVERBS_PREVERBAL,
    "preposition": ADV_PREP + PREPOSITIONS_ONLY,
    "subject_pronoun": SUBJECT_PRONOUNS,
    "object_pronoun": OBJECT_PRONOUNS,
}
"""Word pools by role (one word can sit in several). Most words of the noun, verb, adjective, adverb and
preposition pools belong to two classes, so the answers of different concepts are often the same words."""

# ---------------------------------------------------------------- slots and templates

# Slot code -> (part-of-speech tag, or None for a function word; word pool).
SLOTS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "N": ("noun", POOLS["noun"]),
    "V": ("verb", POOLS["verb"]),
    "ADJ": ("adjective", POOLS["adjective"]),
    "ADVM": ("adverb", POOLS["adverb_after_verb"]),
    "ADVL": ("adverb", POOLS["adverb_locative"]),
    "ADVF": ("adverb", POOLS["adverb_fronted"]),
    "ADVP": ("adverb", POOLS["adverb_preverbal"]),
    "P": ("preposition", POOLS["preposition"]),
    "PS": ("pronoun", POOLS["subject_pronoun"]),
    "PO": ("pronoun", POOLS["object_pronoun"]),
    "DET": (None, DETERMINERS),
    "MOD": (None, MODALS),
    "BE": (None, ("be",)),
    "AND": (None, ("and",)),
}

TEMPLATES: tuple[tuple[str, ...], ...] = tuple(
    tuple(t.split())
    for t in (
        "PS MOD V DET ADJ N P DET N ADVM",  # she will paint the clean box near the park early
        "DET N MOD V PO P DET ADJ N ADVM",  # the guard will call them from the warm train late
        "P DET ADJ N PS MOD V DET N ADVM",  # inside the dry ship we can cook the fish fast
        "DET ADJ N MOD V ADVL AND PS MOD V DET N P PO",  # the old cook will wait inside and she will ...
        "PS MOD V DET N AND V DET ADJ N P PO ADVM",  # they will watch the train and clean the dry ship ...
        "ADVF PS MOD V P DET ADJ N AND V PO",  # soon we will dance near the warm park and call them
        "DET N P DET ADJ N MOD V PO ADVM",  # the guard near the open park will call her early
        "PS MOD V DET ADJ ADJ N ADVM P PO",  # you should clean the dry warm box fast for me
        "DET ADJ N MOD V ADVM AND ADVM P PO",  # the old guard will work hard and late for them
        "PS MOD V ADVL AND PS MOD V DET ADJ N P DET N",  # we will stay inside and they will paint ...
        "ADVF DET ADJ N MOD V DET N P DET N P PO",  # often the old cook will watch the train near ...
        "V DET ADJ N P PO ADVM",  # paint the dry box for me early
        "PS MOD V ADVM P DET ADJ N AND V DET N",  # she will swim fast across the cold lake and watch ...
        "P PO DET ADJ N MOD V ADVL",  # behind them the old guard will wait outside
        "DET N MOD BE ADJ P DET N AND PS MOD V ADVL",  # the train will be late for the park and we ...
        "PS MOD ADVP V DET ADJ N P DET N",  # she will often paint the old box near the park
        "DET ADJ N MOD V DET N P PO AND V ADVL",  # the old guard will paint the box for them and wait ...
        "P DET N PS MOD V DET ADJ N AND V ADVM",  # near the park we will clean the dry ship and dance late
        "DET N P DET ADJ N MOD V ADVM AND V PO",  # the cook behind the red train will work hard and ...
        "V PO P DET ADJ N AND V DET N ADVM",  # call them from the old ship and paint the box early
    )
)
"""Sentence templates as slot codes (keys of :data:`SLOTS`)."""


def sample_template(rng: np.random.Generator) -> tuple[tuple[str, ...], list[str]]:
    """One sentence: its template (slot codes) and its words, one per slot.

    Content words are drawn uniformly from their slot's pool without repeating a word in the sentence;
    determiners, modals and "and" may repeat. The draws depend only on ``rng``.
    """
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    used: set[str] = set()
    words: list[str] = []
    for slot in template:
        tag, pool = SLOTS[slot]
        if tag is None:
            word = pool[int(rng.integers(len(pool)))]
        else:
            choices = [w for w in pool if w not in used]
            word = choices[int(rng.integers(len(choices)))]
            used.add(word)
        words.append(word)
    for i, word in enumerate(words[:-1]):  # the indefinite article, now that the next word is known
        if word == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return template, words


def sample_tagged(rng: np.random.Generator) -> list[tuple[str, str | None]]:
    """One sentence as ``(word, tag)`` pairs; ``tag`` is a part of speech, or None for a function word."""
    template, words = sample_template(rng)
    return [(word, SLOTS[slot][0]) for slot, word in zip(template, words, strict=True)]


def _most_frequent_tags() -> dict[str, str]:
    """Each word's most frequent tag in the generator's own usage (expected slot fills; ties: tag order)."""
    usage: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for template in TEMPLATES:
        for slot in template:
            tag, pool = SLOTS[slot]
            for word in pool:
                usage[word][tag or "other"] += 1.0 / len(pool)
    usage["an"]["other"] += 1.0
    order = (*POS_TAGS, "other")
    return {
        word: max(counts, key=lambda t: (counts[t], -order.index(t)))
        for word, counts in sorted(usage.items())
    }


MOST_FREQUENT_TAG: dict[str, str] = _most_frequent_tags()
"""Word -> its most frequent tag over the templates' slots (``"other"`` for function words)."""
