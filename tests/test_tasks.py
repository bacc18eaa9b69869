"""Built-in task families: lexicon, templates, exact answers, determinism and parameter errors.

The lexicon and template tests here are of ``pos`` version 1 (disjoint word lists); version 2 is tested in
``test_pos_v2.py``, the treebank tasks in ``test_treebank.py``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conceptprobe.tasks import NULL_CONCEPT, ConceptTask, Example, get_task
from conceptprobe.tasks import pos_lexicon as lex
from conceptprobe.tasks.bitwise import BitwiseTask
from conceptprobe.tasks.pos import _SLOTS, POS_CONCEPTS, TEMPLATES, PosTask
from conceptprobe.tasks.registry import _validate

SEEDS = st.integers(min_value=0, max_value=2**63 - 1)
PROPERTY = settings(max_examples=150, deadline=None)

# An independent tagger: word -> tag, built from the lexicon alone (not from the generator's slots).
WORD_TAG: dict[str, str] = {w: tag for tag, words in lex.LEXICON.items() for w in words}


# ---------------------------------------------------------------- lexicon and templates


def test_lexicon_tags_are_the_pos_concepts() -> None:
    assert tuple(lex.LEXICON) == POS_CONCEPTS
    assert PosTask.concepts == (*POS_CONCEPTS, NULL_CONCEPT)


@pytest.mark.parametrize("tag", POS_CONCEPTS)
def test_lexicon_sizes_and_form(tag: str) -> None:
    words = lex.LEXICON[tag]
    assert len(words) >= 40, f"{tag}: only {len(words)} words"
    duplicates = [w for w, n in Counter(words).items() if n > 1]
    assert not duplicates, f"{tag}: duplicates {duplicates}"
    for w in words:
        assert w.isascii() and w.isalpha() and w.islower(), w
        assert w not in lex.FUNCTION_WORDS


def test_lexicon_is_disjoint() -> None:
    seen: dict[str, str] = {}
    for tag, words in lex.LEXICON.items():
        for w in words:
            assert w not in seen, f"{w!r} is both {seen[w]} and {tag}"
            seen[w] = tag
    assert len(WORD_TAG) == sum(len(ws) for ws in lex.LEXICON.values())


def test_pronoun_pools() -> None:
    assert set(lex.PRONOUNS) == set(lex.SUBJECT_PRONOUNS) | set(lex.OBJECT_PRONOUNS)
    for pool in (lex.SUBJECT_PRONOUNS, lex.OBJECT_PRONOUNS):
        assert len(set(pool)) == len(pool)
    # Case-marked forms stay in their slot.
    assert not {"he", "she", "we", "they"} & set(lex.OBJECT_PRONOUNS)
    assert not {"me", "him", "us", "them", "himself"} & set(lex.SUBJECT_PRONOUNS)


def test_known_ambiguous_words_are_excluded() -> None:
    ambiguous = {"run", "light", "fast", "well", "up", "down", "like", "near", "past", "his", "her", "mine"}
    assert not ambiguous & set(WORD_TAG)


def test_templates_cover_all_tags_and_vary() -> None:
    first_index: dict[str, set[int]] = {tag: set() for tag in POS_CONCEPTS}
    repeated: set[str] = set()
    for template in TEMPLATES:
        tags = [_SLOTS[slot][0] for slot in template]
        assert set(POS_CONCEPTS) <= set(tags), template
        for tag in POS_CONCEPTS:
            first_index[tag].add(tags.index(tag))
        repeated |= {tag for tag, n in Counter(t for t in tags if t).items() if n > 1}
        for i, slot in enumerate(template):  # determiners only precede a noun phrase
            if slot == "DET":
                assert template[i + 1] in ("ADJ", "NOUN"), template
    for tag, indices in first_index.items():
        assert len(indices) >= 3, f"first {tag} is always at one of {indices}"
    assert repeated == set(POS_CONCEPTS), "every tag should appear twice in some template"


# ---------------------------------------------------------------- pos: exact answers


def _check_pos_example(ex: Example, concept: str) -> None:
    tokens = ex.input.split(" ")
    assert " ".join(tokens) == ex.input and all(tokens), "words joined by single spaces"
    tags = []
    for i, tok in enumerate(tokens):
        if tok in lex.FUNCTION_WORDS:
            tags.append(None)
            if tok in ("a", "an"):
                assert (tok == "an") == (tokens[i + 1][0] in "aeiou"), ex.input
        else:
            assert tok in WORD_TAG, f"{tok!r} of {ex.input!r} is not in the lexicon"
            tags.append(WORD_TAG[tok])
    assert set(POS_CONCEPTS) <= set(tags), ex.input
    content = [t for t, tag in zip(tokens, tags, strict=True) if tag]
    assert len(set(content)) == len(content), f"repeated word in {ex.input!r}"
    if concept == NULL_CONCEPT:
        assert ex.answer in tokens
    else:
        assert ex.answer == tokens[tags.index(concept)]


@PROPERTY
@given(seed=SEEDS)
def test_pos_answers_are_exact(seed: int) -> None:
    task = PosTask(version=1)
    for concept in task.concepts:
        _check_pos_example(task.sample(concept, np.random.default_rng(seed)), concept)


def test_pos_distribution() -> None:
    task = PosTask(version=1)
    rng = np.random.default_rng(0)
    samples = [task.sample("noun", rng) for _ in range(600)]
    positions = Counter(ex.input.split(" ").index(ex.answer) for ex in samples)
    assert len(positions) >= 3
    lengths = Counter(len(ex.input.split(" ")) for ex in samples)
    assert len(lengths) >= 4  # several templates in use
    nulls = [task.sample(NULL_CONCEPT, rng) for _ in range(600)]
    null_positions = Counter(ex.input.split(" ").index(ex.answer) for ex in nulls)
    assert len(null_positions) >= 8
    assert len({ex.answer for ex in nulls}) > 100


def test_pos_example() -> None:
    ex = PosTask().sample("verb", np.random.default_rng(123))
    assert isinstance(ex, Example) and isinstance(ex.input, str) and isinstance(ex.answer, str)


# ---------------------------------------------------------------- bitwise: exact answers


def _reference(concept: str, x: str, y: str, width: int) -> str:
    a, b, mask = int(x, 2), int(y, 2), (1 << width) - 1
    value = {
        "and": a & b,
        "nand": ~(a & b) & mask,
        "or": a | b,
        "nor": ~(a | b) & mask,
        "xor": a ^ b,
        "xnor": ~(a ^ b) & mask,
    }[concept]
    return format(value, f"0{width}b")


@PROPERTY
@given(seed=SEEDS, width=st.integers(min_value=1, max_value=12))
def test_bitwise_answers_are_exact(seed: int, width: int) -> None:
    task = BitwiseTask(width=width)
    for concept in task.concepts:
        ex = task.sample(concept, np.random.default_rng(seed))
        x, y = ex.input.split(" ")
        assert len(x) == len(y) == len(ex.answer) == width
        assert set(x + y + ex.answer) <= {"0", "1"}
        if concept != NULL_CONCEPT:
            assert ex.answer == _reference(concept, x, y, width)


def test_bitwise_defaults_and_info() -> None:
    task = get_task("bitwise")
    assert task.params == {"width": 5}
    assert task.info()["params"] == {"width": 5} and task.info()["version"] == "1"
    assert task.concepts == ("and", "nand", "or", "nor", "xor", "xnor", "null")
    ex = task.sample("and", np.random.default_rng(0))
    assert len(ex.input) == 11 and len(ex.answer) == 5
    assert get_task("bitwise", width=np.int64(3)).params == {"width": 3}


def test_bitwise_null_is_random_bits() -> None:
    task = BitwiseTask(width=5)
    rng = np.random.default_rng(1)
    answers = {task.sample(NULL_CONCEPT, rng).answer for _ in range(400)}
    assert len(answers) == 32  # every 5-bit string shows up


def test_bitwise_leading_zeros_kept() -> None:
    task = BitwiseTask(width=8)
    rng = np.random.default_rng(2)
    assert any(task.sample("and", rng).answer.startswith("0") for _ in range(50))


# ---------------------------------------------------------------- shared properties


@pytest.mark.parametrize(
    ("name", "params"), [("pos", {}), ("pos", {"version": 1}), ("bitwise", {}), ("first-last", {})]
)
@PROPERTY
@given(seed=SEEDS)
def test_same_seed_same_examples(name: str, params: dict, seed: int) -> None:
    task = get_task(name, **params)
    for concept in task.concepts:
        a = [task.sample(concept, rng) for rng in [np.random.default_rng(seed)] for _ in range(3)]
        b = [task.sample(concept, rng) for rng in [np.random.default_rng(seed)] for _ in range(3)]
        assert a == b
    # The input depends only on the seed, not on the concept.
    inputs = {task.sample(c, np.random.default_rng(seed)).input for c in task.concepts}
    assert len(inputs) == 1


@pytest.mark.parametrize("name", ["pos", "bitwise", "first-last"])
def test_different_seeds_differ(name: str) -> None:
    task = get_task(name)
    inputs = {task.sample(task.concepts[0], np.random.default_rng(s)).input for s in range(50)}
    assert len(inputs) > 25


@pytest.mark.parametrize(
    ("name", "concept"),
    [("pos", c) for c in PosTask.concepts] + [("bitwise", c) for c in BitwiseTask.concepts],
)
def test_every_concept_sampleable(name: str, concept: str) -> None:
    ex = get_task(name).sample(concept, np.random.default_rng(7))
    assert ex.input and ex.answer


@pytest.mark.parametrize("name", ["pos", "bitwise", "first-last"])
def test_unknown_concept(name: str) -> None:
    with pytest.raises(ValueError, match="has no concept 'bogus'.*null"):
        get_task(name).sample("bogus", np.random.default_rng(0))


@pytest.mark.parametrize("width", [0, -3, 2.5, "5", True, None])
def test_bitwise_bad_width(width: object) -> None:
    with pytest.raises(ValueError, match=r"`width` must be an integer from 1 to 64"):
        BitwiseTask(width=width)  # type: ignore[arg-type]


def test_bad_params() -> None:
    with pytest.raises(ValueError, match="only parameter is `width`"):
        get_task("bitwise", widht=4)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['width'\].*only parameter is `version`"):
        get_task("pos", width=4)
    with pytest.raises(ValueError, match="takes no parameters"):
        get_task("first-last", treebank="x")


def test_versions_and_names() -> None:
    assert (PosTask.name, PosTask.version) == ("pos", "2")  # the class attribute is the default version
    assert (BitwiseTask.name, BitwiseTask.version) == ("bitwise", "1")
    assert PosTask().info()["params"] == {} and PosTask().info()["version"] == "2"
    v1 = get_task("pos", version=1)
    assert v1.info()["version"] == v1.version == "1" and v1.params == {"version": 1}
    assert PosTask.version == "2"  # an instance's version does not change the class's


# ---------------------------------------------------------------- lexical features and pairs


def test_bitwise_lexical_features() -> None:
    task = BitwiseTask(width=3)
    feats = task.lexical_features(["101", "001", "111", "000"])
    assert feats == {"ones@0": 0.5, "ones@1": 0.25, "ones@2": 0.75, "ones": 0.5}
    assert task.lexical_features([]) == {"ones@0": 0.0, "ones@1": 0.0, "ones@2": 0.0, "ones": 0.0}
    # an operator's answers have its signature: AND is mostly zeros, OR mostly ones
    rng = np.random.default_rng(0)
    wide = BitwiseTask(width=5)
    ones = {
        c: wide.lexical_features([wide.sample(c, rng).answer for _ in range(400)])["ones"]
        for c in ("and", "or")
    }
    assert ones["and"] < 0.35 < 0.65 < ones["or"]


def test_pos_v1_lexical_features_are_the_word_lists() -> None:
    task = PosTask(version=1)
    feats = task.lexical_features(["elephant", "ate", "happy", "quickly", "about", "she", "the", "zzz"])
    assert set(feats) == {*POS_CONCEPTS, "other"}
    assert all(feats[t] == 1 / 8 for t in POS_CONCEPTS) and feats["other"] == 2 / 8
    assert task.lexical_features([]) == dict.fromkeys((*POS_CONCEPTS, "other"), 0.0)


def test_generator_tasks_have_no_pools() -> None:
    for name in ("pos", "bitwise", "first-last"):
        task = get_task(name)
        assert task.pool("demo") is None and task.pool("query") is None
        with pytest.raises(NotImplementedError, match="no finite pools"):
            task.from_pool("x", task.concepts[0], np.random.default_rng(0))
    assert get_task("bitwise").pairs == ()
    assert get_task("first-last").pairs == (("first_noun", "last_noun"), ("first_verb", "last_verb"))


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        ((("a", "zz"),), "'zz', which is not one of its concepts"),
        ((("a", "null"),), "includes 'null'"),
        ((("a", "a"),), "with itself"),
        ((("a",),), r"must be a \(concept, concept\) tuple"),
        ([("a", "b")], "must be a tuple"),
    ],
)
def test_registry_checks_pairs(pairs: object, match: str) -> None:
    class Paired(ConceptTask):
        concepts = ("a", "b", "null")

        def sample(self, concept: str, rng: np.random.Generator) -> Example:
            raise NotImplementedError

    Paired.pairs = pairs  # type: ignore[assignment]
    with pytest.raises(ValueError, match=match):
        _validate(Paired, "paired")
    Paired.pairs = (("a", "b"),)
    _validate(Paired, "paired")
