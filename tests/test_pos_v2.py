"""``pos`` version 2 (ambiguous words tagged by their slot), version 1 kept exactly, and ``first-last``."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conceptprobe.prompts import build_prompts
from conceptprobe.tasks import NULL_CONCEPT, get_task
from conceptprobe.tasks import pos_v2 as v2
from conceptprobe.tasks.first_last import FirstLastTask
from conceptprobe.tasks.pos import POS_CONCEPTS, PosTask

REPO = Path(__file__).resolve().parents[1]
V1_RUN = REPO / "results" / "runs" / "smollm2-135m_pos_4shot_seed0" / "predictions.jsonl"
SEEDS = st.integers(min_value=0, max_value=2**63 - 1)
PROPERTY = settings(max_examples=150, deadline=None)

# Written here, independently of the generator's slot table: slot code -> part of speech (None: function word).
SLOT_TAG: dict[str, str | None] = {
    "N": "noun",
    "V": "verb",
    "ADJ": "adjective",
    "ADVM": "adverb",
    "ADVL": "adverb",
    "ADVF": "adverb",
    "ADVP": "adverb",
    "P": "preposition",
    "PS": "pronoun",
    "PO": "pronoun",
    "DET": None,
    "MOD": None,
    "BE": None,
    "AND": None,
}
FUNCTION_WORDS = {
    "the",
    "a",
    "an",
    "this",
    "and",
    "be",
    "will",
    "can",
    "should",
    "must",
    "might",
    "could",
    "would",
}

# Words that must occur under two or more parts of speech (noun/verb, adjective/adverb, adjective/verb,
# adverb/preposition).
AMBIGUOUS = (
    "watch", "light", "train", "park", "plant", "ship", "book", "guard", "fish", "paint", "walk", "cook",
    "visit", "call", "dance", "fast", "hard", "late", "early", "straight", "clean", "open", "dry", "warm",
    "up", "down", "inside", "outside", "around", "behind", "over", "near",
)  # fmt: skip


def retag(template: tuple[str, ...], words: list[str]) -> list[str | None]:
    """Tags from the template's slots, checking each word belongs to its slot's pool."""
    assert len(template) == len(words)
    tags = []
    for slot, word in zip(template, words, strict=True):
        pool = v2.SLOTS[slot][1]
        assert word in pool or (word == "an" and "a" in pool), (slot, word)
        tags.append(SLOT_TAG[slot])
    return tags


def first_of(words: list[str], tags: list[str | None], tag: str) -> str:
    return words[tags.index(tag)]


# ---------------------------------------------------------------- sentences


def test_templates_are_varied() -> None:
    assert len(v2.TEMPLATES) >= 12 and len(set(v2.TEMPLATES)) == len(v2.TEMPLATES)
    first_index: dict[str, set[int]] = defaultdict(set)
    repeated: set[str] = set()
    for template in v2.TEMPLATES:
        tags = [SLOT_TAG[s] for s in template]
        assert set(POS_CONCEPTS) <= set(tags), template
        for tag in POS_CONCEPTS:
            first_index[tag].add(tags.index(tag))
        repeated |= {t for t, n in Counter(t for t in tags if t).items() if n > 1}
    assert all(len(first_index[t]) >= 3 for t in POS_CONCEPTS), dict(first_index)
    assert repeated == set(POS_CONCEPTS), "every tag should occur twice in some template"
    assert {t[0] for t in v2.TEMPLATES} >= {"PS", "DET", "P", "V", "ADVF"}  # varied openings


@PROPERTY
@given(seed=SEEDS)
def test_answers_are_exact(seed: int) -> None:
    template, words = v2.sample_template(np.random.default_rng(seed))
    tags = retag(template, words)
    sentence = " ".join(words)
    assert set(POS_CONCEPTS) <= set(tags), sentence
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words), sentence
    content = [w for w, t in zip(words, tags, strict=True) if t]
    assert len(set(content)) == len(content), f"repeated word in {sentence!r}"
    for i, word in enumerate(words[:-1]):
        if word in ("a", "an"):
            assert (word == "an") == (words[i + 1][0] in "aeiou"), sentence
    task = PosTask()
    for concept in task.concepts:
        ex = task.sample(concept, np.random.default_rng(seed))
        assert ex.input == sentence
        if concept == NULL_CONCEPT:
            assert ex.answer in words
        else:
            assert ex.answer == first_of(words, tags, concept)
        assert ex.answer in ex.input.split(" ")  # one whitespace token of the input, exactly


def test_ud_conventions_in_context() -> None:
    """Modals are never verbs; an adverb/preposition word is a preposition exactly when an object follows."""
    rng = np.random.default_rng(11)
    object_start = {"the", "a", "an", "this"} | set(v2.OBJECT_PRONOUNS)
    for _ in range(2000):
        template, words = v2.sample_template(rng)
        tags = retag(template, words)
        nxt = [*words[1:], None]
        for word, tag, following in zip(words, tags, nxt, strict=True):
            if word in v2.MODALS or word == "be":
                assert tag is None
            if tag == "preposition":
                assert following in object_start, (words, word)
            if tag == "adverb" and word in v2.ADV_PREP:
                assert following is None or following not in object_start, (words, word)
            if tag == "adjective" and word in v2.ADJ_ADV:  # before a noun phrase's noun, or after "be"
                i = words.index(word)
                assert tags[i + 1 : i + 2] in (["noun"], ["adjective"]) or words[i - 1] == "be", words
            if tag == "pronoun" and word == "her":  # never a possessive: no noun right after
                assert following is None or tags[words.index(word) + 1] != "noun", words


def test_ambiguous_words_occur_under_several_tags() -> None:
    task = PosTask()
    rng = np.random.default_rng(5)
    seen: dict[str, set[str]] = defaultdict(set)
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    for _ in range(3000):
        tagged = task.sample_tagged(rng)
        for word, tag in tagged:
            if tag:
                seen[word].add(tag)
        for tag in POS_CONCEPTS:
            answers[tag][next(w for w, t in tagged if t == tag)] += 1
    missing = {w: sorted(seen[w]) for w in AMBIGUOUS if len(seen[w]) < 2}
    assert not missing, f"not ambiguous in use: {missing}"
    multi = {w for w, tags in seen.items() if len(tags) >= 2}
    for tag in ("noun", "verb", "adjective", "adverb", "preposition"):  # most answers are ambiguous words
        share = sum(n for w, n in answers[tag].items() if w in multi) / sum(answers[tag].values())
        assert share > 0.5, (tag, share)
    # the same word answers different concepts
    assert len(set(answers["noun"]) & set(answers["verb"])) >= 30
    assert len(set(answers["adjective"]) & set(answers["adverb"])) >= 10
    assert len(set(answers["adverb"]) & set(answers["preposition"])) >= 10


def test_null_is_any_word() -> None:
    task = PosTask()
    rng = np.random.default_rng(3)
    nulls = [task.sample(NULL_CONCEPT, rng) for _ in range(600)]
    assert len(Counter(ex.input.split(" ").index(ex.answer) for ex in nulls)) >= 8
    assert any(ex.answer in FUNCTION_WORDS for ex in nulls)


# ---------------------------------------------------------------- versions


@pytest.mark.parametrize(("given_version", "expected"), [(1, "1"), ("1", "1"), (2, "2"), ("2", "2")])
def test_version_param(given_version: object, expected: str) -> None:
    task = get_task("pos", version=given_version)
    assert task.version == task.info()["version"] == expected
    assert task.params == {"version": int(expected)}


@pytest.mark.parametrize("bad", [0, 3, "3", "v2", 1.0, True, None])
def test_bad_version(bad: object) -> None:
    with pytest.raises(ValueError, match="`version` must be 1 or 2"):
        get_task("pos", version=bad)


def test_default_is_v2_and_differs_from_v1() -> None:
    task = get_task("pos")
    assert task.version == "2" and task.params == {} and task.info()["params"] == {}
    a = build_prompts(task, "noun", 4, 5, seed=0)
    b = build_prompts(get_task("pos", version=1), "noun", 4, 5, seed=0)
    assert [p.text for p in a] != [p.text for p in b]
    assert build_prompts(get_task("pos", version=2), "noun", 4, 5, seed=0) == a


def test_v1_reproduces_the_committed_run() -> None:
    """The committed smollm2 pos run (n=100, 4 shots, seed 0) was made by version 1: same prompts, same answers."""
    rows = [json.loads(line) for line in V1_RUN.read_text().splitlines()]
    task = get_task("pos", version=1)
    for concept in task.concepts:
        committed = [r for r in rows if r["concept"] == concept]
        assert len(committed) == 100
        ours = build_prompts(task, concept, 4, 100, seed=0)
        for p, r in list(zip(ours, committed, strict=True))[:10]:
            assert (p.index, p.text, p.answer) == (r["index"], r["prompt"], r["answer"])


# ---------------------------------------------------------------- lexical features


def test_v2_most_frequent_tag_is_the_usage_majority() -> None:
    """The lexicon table agrees with the tags the generator actually uses, counted over a sample."""
    rng = np.random.default_rng(0)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for _ in range(4000):
        for word, tag in v2.sample_tagged(rng):
            counts[word][tag or "other"] += 1
    for word, c in counts.items():
        assert v2.MOST_FREQUENT_TAG[word] in c, word  # never a tag the word is not used with
        (top, n1), *rest = c.most_common(2) + [("", 0)]
        if n1 > 1.3 * rest[0][1] + 10:  # a clear majority in the sample
            assert v2.MOST_FREQUENT_TAG[word] == top, (word, c)


def test_v2_lexical_features_hand_made() -> None:
    task = PosTask()
    feats = task.lexical_features(["girl", "eat", "happy", "slowly", "in", "she", "the", "zebra"])
    assert set(feats) == {*POS_CONCEPTS, "other"}
    assert all(feats[t] == pytest.approx(1 / 8) for t in POS_CONCEPTS), feats
    assert feats["other"] == pytest.approx(2 / 8)  # a function word and an unknown word
    # an ambiguous word reads as its most frequent tag, whatever its tag in the prompt
    assert task.lexical_features(["watch", "watch"]) == {**dict.fromkeys(feats, 0.0), "noun": 1.0}
    assert task.lexical_features([]) == dict.fromkeys(feats, 0.0)
    assert sum(task.lexical_features(["up", "fast", "clean"]).values()) == pytest.approx(1.0)


# ---------------------------------------------------------------- first-last (synthetic)


def _first_last_reference(seed: int) -> tuple[str, dict[str, str]]:
    """Redraw the first-last sentence from the seed: pos v2 sentences until two nouns and two verbs."""
    rng = np.random.default_rng(seed)
    while True:
        template, words = v2.sample_template(rng)
        tags = retag(template, words)
        nouns = [w for w, t in zip(words, tags, strict=True) if t == "noun"]
        verbs = [w for w, t in zip(words, tags, strict=True) if t == "verb"]
        if len(set(nouns)) >= 2 and len(set(verbs)) >= 2:
            answers = {
                "first_noun": nouns[0],
                "last_noun": nouns[-1],
                "first_verb": verbs[0],
                "last_verb": verbs[-1],
            }
            return " ".join(words), answers


@PROPERTY
@given(seed=SEEDS)
def test_first_last_answers_are_exact(seed: int) -> None:
    sentence, answers = _first_last_reference(seed)
    task = FirstLastTask()
    for concept in task.concepts:
        ex = task.sample(concept, np.random.default_rng(seed))
        assert ex.input == sentence
        if concept == NULL_CONCEPT:
            assert ex.answer in sentence.split(" ")
        else:
            assert ex.answer == answers[concept]
    assert answers["first_noun"] != answers["last_noun"] and answers["first_verb"] != answers["last_verb"]


def test_first_last_pairs_share_the_answer_class() -> None:
    """Within a pair the answers' lexical histograms have the same support and nearly the same mass."""
    task = get_task("first-last")
    mean = {}
    for concept in ("first_noun", "last_noun", "first_verb", "last_verb"):
        prompts = build_prompts(task, concept, 4, 100, seed=0)
        rows = [task.lexical_features([d.answer for d in p.demos]) for p in prompts]
        mean[concept] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        for p in prompts:
            assert all(d.answer in d.input.split(" ") for d in p.demos)
    for a, b in task.pairs:
        support_a = {k for k, v in mean[a].items() if v > 0}
        support_b = {k for k, v in mean[b].items() if v > 0}
        assert support_a == support_b, (a, b, mean[a], mean[b])
        assert sum(abs(mean[a][k] - mean[b][k]) for k in mean[a]) < 0.15, (a, b, mean[a], mean[b])
    # ... while the pairs themselves differ (nouns vs verbs read differently)
    assert sum(abs(mean["first_noun"][k] - mean["first_verb"][k]) for k in mean["first_noun"]) > 0.2


def test_first_last_first_differs_from_last() -> None:
    task = get_task("first-last")
    rng = np.random.default_rng(1)
    for _ in range(300):
        tagged = task.sample_tagged(rng)
        nouns = [w for w, t in tagged if t == "noun"]
        verbs = [w for w, t in tagged if t == "verb"]
        assert nouns[0] != nouns[-1] and verbs[0] != verbs[-1]
    positions = Counter(
        ex.input.split(" ").index(ex.answer) for ex in (task.sample("last_noun", rng) for _ in range(300))
    )
    assert len(positions) >= 4  # the last noun is not at one index
