"""Prompt assembly: generator tasks unchanged, pooled tasks dealt without replacement, reuse statistics."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from conceptprobe.prompts import Prompt, PromptFormat, build_prompts, reuse_stats
from conceptprobe.tasks import ConceptTask, Example, get_task

ALT = PromptFormat(input_prefix="Q: ", output_prefix="A:", separator="\n\n")

# sha256 (first 16 hex digits) of every concept's prompts, computed with the code before finite pools and
# pos version 2 existed: generator tasks must keep producing exactly these prompts.
BEFORE: dict[tuple[str, str, int, int, int, bool], str] = {
    ("pos", '{"version": 1}', 0, 4, 10, False): "e8c54f5ec65261f7",
    ("pos", '{"version": 1}', 3, 0, 5, False): "df42dbd661a7dd72",
    ("pos", '{"version": 1}', 7, 10, 6, True): "f72d8caaf0a76dca",
    ("pos", '{"version": 1}', 1, 2, 8, False): "883907bfc5368564",
    ("bitwise", "{}", 0, 4, 10, False): "ff5e31e2575990d3",
    ("bitwise", "{}", 3, 0, 5, False): "b84e3477859cc6f7",
    ("bitwise", "{}", 7, 10, 6, True): "bd75f5f553d8e933",
    ("bitwise", "{}", 1, 2, 8, False): "85229c2c5b2c2c98",
    ("bitwise", '{"width": 7}', 0, 4, 10, False): "063692344e8aa726",
    ("bitwise", '{"width": 7}', 7, 10, 6, True): "57e4aec09d25871a",
    ("sparse_regression", "{}", 0, 4, 10, False): "54949dae37778b07",
    ("sparse_regression", "{}", 7, 10, 6, True): "43c4804cff73bbe8",
    ("repeated_segments", "{}", 0, 4, 10, False): "79b9a7f678715024",
    ("repeated_segments", "{}", 7, 10, 6, True): "94edbe17ab5f1483",
}


@pytest.mark.parametrize(("name", "params", "seed", "shots", "n", "alt"), list(BEFORE))
def test_generator_prompts_unchanged(
    name: str, params: str, seed: int, shots: int, n: int, alt: bool
) -> None:
    task = get_task(name, **json.loads(params))
    digest = hashlib.sha256()
    for concept in task.concepts:
        for p in build_prompts(task, concept, shots, n, seed, ALT if alt else None):
            digest.update(json.dumps([p.concept, p.index, p.text, p.answer, p.query, p.shots]).encode())
    assert digest.hexdigest()[:16] == BEFORE[(name, params, seed, shots, n, alt)]


@pytest.mark.parametrize("fmt", [None, ALT])
def test_demos_are_the_prompt_demonstrations(fmt: PromptFormat | None) -> None:
    for task in (get_task("pos"), get_task("bitwise")):
        for p in build_prompts(task, task.concepts[0], 3, 5, seed=2, fmt=fmt):
            assert len(p.demos) == p.shots == 3 and all(isinstance(d, Example) for d in p.demos)
            f = fmt or PromptFormat()
            assert p.text == "".join(f.demo(d) for d in p.demos) + f.query(Example(p.query, p.answer))
            record = json.loads(json.dumps(p.to_dict()))
            assert record["demos"] == [{"input": d.input, "answer": d.answer} for d in p.demos]
    zero = build_prompts(get_task("pos"), "noun", 0, 2, seed=0)
    assert all(p.demos == () for p in zero)


# ---------------------------------------------------------------- reuse statistics


def _prompt(i: int, demos: list[str], query: str) -> Prompt:
    return Prompt("c", i, "", "x", query, len(demos), tuple(Example(d, "x") for d in demos))


def test_reuse_stats_by_hand() -> None:
    prompts = [
        _prompt(0, ["a", "b"], "q1"),
        _prompt(1, ["c", "a"], "q2"),  # "a" reused
        _prompt(2, ["b", "d"], "q1"),  # "b" reused; query q1 reused
        _prompt(3, ["q2", "e"], "f"),  # an earlier query as a demonstration is not a demo reuse
    ]
    stats = reuse_stats(prompts)
    assert stats == {
        "demo_draws": 8,
        "demo_reused": 2,
        "demo_reuse_rate": 0.25,
        "queries": 4,
        "query_reused": 1,
        "query_reuse_rate": 0.25,
        "query_in_demos": 1,  # q2 is a demonstration of prompt 3
    }
    assert reuse_stats([_prompt(0, [], "q")])["demo_reuse_rate"] == 0.0


def test_reuse_stats_of_generator_tasks_is_about_zero() -> None:
    task = get_task("pos")
    stats = reuse_stats(build_prompts(task, "verb", 4, 100, seed=0))
    assert stats["demo_draws"] == 400 and stats["demo_reuse_rate"] < 0.02 and stats["query_reused"] <= 2


# ---------------------------------------------------------------- pooled tasks


class ToyPooled(ConceptTask):
    """Items are words; the answer is the word upper-cased (or reversed); null: a random letter of it."""

    name = "toy-pooled"
    concepts = ("upper", "reverse", "null")

    def __init__(self, demo: list[str], query: list[str] | None) -> None:
        super().__init__()
        self.demo, self.query = demo, query

    def pool(self, role: str) -> list[str] | None:
        return self.demo if role == "demo" else self.query

    def from_pool(self, item: str, concept: str, rng: np.random.Generator) -> Example:
        if concept == "null":
            return Example(item, item[int(rng.integers(len(item)))])
        return Example(item, item.upper() if concept == "upper" else item[::-1])

    def sample(self, concept: str, rng: np.random.Generator) -> Example:
        return self.from_pool(self.query[int(rng.integers(len(self.query)))], concept, rng)


DEMO = [f"demo{i:02d}" for i in range(10)]
QUERY = ["query0", "query1", "query2"]


@pytest.mark.parametrize("concept", ["upper", "null"])
def test_pool_dealt_without_replacement_then_reused(concept: str) -> None:
    task = ToyPooled(DEMO, QUERY)
    prompts = build_prompts(task, concept, 3, 7, seed=1)  # 21 draws from 10: two full permutations
    demos = [d.input for p in prompts for d in p.demos]
    assert sorted(demos[:10]) == DEMO  # the first 10 demonstrations are the whole pool, each once
    assert Counter(demos[:20]) == Counter(DEMO * 2)  # then a second full round before any third use
    for p in prompts:
        inputs = [d.input for d in p.demos] + [p.query]
        assert len(set(inputs)) == len(inputs), "distinct inputs within a prompt"
        assert p.query in QUERY and all(d in DEMO for d in inputs[:-1])
        for d in p.demos:
            if concept == "upper":
                assert d.answer == d.input.upper()
            else:
                assert len(d.answer) == 1 and d.answer in d.input
    stats = reuse_stats(prompts)
    assert stats["demo_draws"] == 21 and stats["demo_reused"] == 11  # every draw after the pool ran out
    assert stats["query_reused"] == 7 - 3 and stats["query_in_demos"] == 0
    assert sorted(p.query for p in prompts[:3]) == QUERY  # queries are dealt the same way


def test_pool_no_reuse_while_it_lasts() -> None:
    task = ToyPooled(DEMO, QUERY)
    stats = reuse_stats(build_prompts(task, "reverse", 2, 5, seed=0))
    assert stats["demo_draws"] == 10 and stats["demo_reused"] == 0
    assert reuse_stats(build_prompts(task, "reverse", 2, 6, seed=0))["demo_reused"] == 2


def test_pooled_prompts_are_seeded() -> None:
    task = ToyPooled(DEMO, QUERY)
    a = build_prompts(task, "upper", 4, 6, seed=3)
    assert a == build_prompts(ToyPooled(DEMO, QUERY), "upper", 4, 6, seed=3)
    assert [p.text for p in a] != [p.text for p in build_prompts(task, "upper", 4, 6, seed=4)]
    assert a[0].text.startswith("Input: demo") and a[0].text.endswith(f"Input: {a[0].query}\nOutput:")


def test_distinct_inputs_when_the_pool_repeats_texts() -> None:
    """A pool with repeated inputs, and the query drawn from the demonstration pool (no query pool)."""
    pool = ["aa", "bb", "cc", "aa", "dd", "bb"]
    task = ToyPooled(pool, None)
    for p in build_prompts(task, "upper", 3, 30, seed=0):
        inputs = [d.input for d in p.demos] + [p.query]
        assert len(set(inputs)) == 4


def test_pool_errors() -> None:
    with pytest.raises(ValueError, match=r"shots=11 but task 'toy-pooled' has only 10 demonstration"):
        build_prompts(ToyPooled(DEMO, QUERY), "upper", 11, 2)
    with pytest.raises(ValueError, match="too few distinct inputs"):
        build_prompts(ToyPooled(["aa", "aa", "aa"], QUERY), "upper", 2, 2)
    with pytest.raises(ValueError, match="empty query pool"):
        build_prompts(ToyPooled(DEMO, []), "upper", 2, 2)
    zero = build_prompts(ToyPooled(DEMO, QUERY), "upper", 0, 3)
    assert [p.demos for p in zero] == [(), (), ()] and sorted(p.query for p in zero) == QUERY
