"""Token-budget batching: every prompt once, rows and padded tokens bounded, results independent of it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conceptprobe.batching import plan_batches


@given(
    st.lists(st.integers(1, 400), min_size=0, max_size=80),
    st.integers(1, 20),
    st.one_of(st.none(), st.integers(1, 3000)),
    st.integers(0, 8),
)
def test_batches_cover_every_prompt_within_the_limits(lengths, batch_size, budget, extra):
    batches = plan_batches(lengths, batch_size, budget, extra)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(b for b in batches)
    assert [lengths[i] for i in flat] == sorted(lengths)  # shortest first: little padding
    for b in batches:
        assert len(b) <= batch_size
        if budget is not None and len(b) > 1:
            assert len(b) * (max(lengths[i] for i in b) + extra) <= budget


def test_budget_halves_rows_when_prompts_double():
    short = plan_batches([100] * 64, 16, max_tokens=1000)
    long = plan_batches([200] * 64, 16, max_tokens=1000)
    assert {len(b) for b in short} == {10, 4} and max(len(b) for b in long) == 5


def test_a_prompt_over_the_budget_gets_its_own_batch():
    assert plan_batches([5, 50, 6], 4, max_tokens=20) == [[0, 2], [1]]


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches([1], 0)
    with pytest.raises(ValueError, match="max_tokens"):
        plan_batches([1], 2, max_tokens=0)
