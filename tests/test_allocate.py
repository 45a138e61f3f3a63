"""Rank and scale allocation: invariants (hypothesis), worked examples, errors."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lowrank_rs
from lowrank_rs.linalg import allocate_alphas, allocate_ranks

scores_st = st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=1, max_size=30).filter(lambda s: sum(s) > 0)


@settings(max_examples=200, deadline=None)
@given(scores=scores_st, per=st.integers(0, 40), min_rank=st.integers(0, 4), mult=st.sampled_from([1, 2, 4, 8]))
def test_invariants(scores, per, min_rank, mult):
    n = len(scores)
    budget = per * n * mult
    lo = -(-min_rank // mult) * mult
    assume(lo * n <= budget)
    ranks = allocate_ranks(scores, budget, min_rank=min_rank, multiple_of=mult)
    assert len(ranks) == n
    assert sum(ranks) == budget
    assert all(r >= min_rank and r % mult == 0 for r in ranks)
    # Proportional up to rounding: no module is more than one unit (plus the floor) away from its share.
    order = np.argsort(scores)
    for i, j in zip(order[:-1], order[1:]):
        if scores[j] > scores[i]:
            assert ranks[j] >= ranks[i] or ranks[i] == lo


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=30),
    caps_seed=st.integers(0, 2**31),
    mult=st.sampled_from([1, 8]),
)
def test_per_module_caps(scores, caps_seed, mult):
    # Positive scores: a zero-score module stays at min_rank by design, so caps alone bound the budget.
    rng = np.random.default_rng(caps_seed)
    caps = [int(c) * mult for c in rng.integers(1, 20, size=len(scores))]
    budget = int(rng.integers(len(scores), sum(caps) // mult + 1)) * mult
    ranks = allocate_ranks(scores, budget, min_rank=mult, max_rank=caps, multiple_of=mult)
    assert sum(ranks) == budget
    assert all(mult <= r <= c for r, c in zip(ranks, caps))


def test_worked_examples():
    assert allocate_ranks([1, 1, 1, 1], 32) == [8, 8, 8, 8]
    assert allocate_ranks([3, 1], 8, min_rank=0) == [6, 2]
    # 10·(0.5, 0.3, 0.2) = 5, 3, 2 exactly
    assert allocate_ranks([5, 3, 2], 10) == [5, 3, 2]
    # shares 3.33…: floors 3,3,3, the leftover unit to the largest remainder — equal, so the larger score wins
    assert allocate_ranks([1, 1, 1.0000001], 10) == [3, 3, 4]
    # a cap moves the excess to the others, proportionally
    assert allocate_ranks([8, 1, 1], 20, max_rank=10) == [10, 5, 5]
    # rank 0 means no adapter
    assert allocate_ranks([0, 1], 4, min_rank=0) == [0, 4]
    assert allocate_ranks([100, 1, 1], 48, min_rank=8, multiple_of=8) == [32, 8, 8]


def test_zero_score_modules_stay_at_min_rank():
    assert allocate_ranks([0, 1, 3], 9, min_rank=1) == [1, 2, 6]
    with pytest.raises(lowrank_rs.InfeasibleError, match="score 0"):
        allocate_ranks([0.0, 1.0], 16, max_rank=[10, 10])


def test_infeasible_and_invalid():
    with pytest.raises(lowrank_rs.InfeasibleError, match="budget"):
        allocate_ranks([1, 1, 1], 2, min_rank=1)
    with pytest.raises(lowrank_rs.InfeasibleError):
        allocate_ranks([1, 1], 30, max_rank=10)
    with pytest.raises(lowrank_rs.InfeasibleError, match="multiple"):
        allocate_ranks([1, 1], 30, multiple_of=8)
    with pytest.raises(lowrank_rs.InfeasibleError):
        allocate_ranks([1, 1], 16, min_rank=8, max_rank=[16, 4])
    with pytest.raises(lowrank_rs.EmptyInputError):
        allocate_ranks([], 4)
    with pytest.raises(lowrank_rs.NonFiniteError):
        allocate_ranks([1, float("nan")], 4)
    with pytest.raises(lowrank_rs.LowRankError, match="negative|-1"):
        allocate_ranks([1, -1], 4)
    with pytest.raises(lowrank_rs.LowRankError, match="zero"):
        allocate_ranks([0, 0], 4)
    with pytest.raises(lowrank_rs.ShapeError):
        allocate_ranks([1, 2], 4, max_rank=[4])
    with pytest.raises(lowrank_rs.LowRankError):
        allocate_ranks([1, 2], 4, multiple_of=0)
    with pytest.raises(lowrank_rs.LowRankError):
        allocate_ranks([1, 2], -4)
    with pytest.raises(lowrank_rs.ShapeError):
        allocate_ranks([[1, 2]], 4)


def py_round(x):
    return float(round(x))


@settings(max_examples=200, deadline=None)
@given(scores=scores_st, alpha=st.sampled_from([1.0, 8.0, 16.0, 32.0, 128.0]))
def test_alphas_formula(scores, alpha):
    n, total = len(scores), sum(scores)
    expected = [max(alpha, py_round(n * alpha * s / total)) for s in scores]
    assert allocate_alphas(scores, alpha) == expected


def test_alphas_round_half_to_even():
    # N·α·s/Σs = 2·1·(1.25/1) … choose scores so the shares hit .5 exactly: n=2, α=5 → 10·s/Σs
    assert allocate_alphas([0.25, 0.75], 5.0) == [5.0, 8.0]  # 2.5 → max(5, 2); 7.5 → 8 (even)
    assert allocate_alphas([0.45, 0.55], 5.0) == [5.0, 6.0]  # 5.5 → 6 (even), 4.5 → 4 → max 5
    with pytest.raises(lowrank_rs.LowRankError):
        allocate_alphas([1, 2], 0.0)
    with pytest.raises(lowrank_rs.LowRankError):
        allocate_alphas([1, 2], "8")
