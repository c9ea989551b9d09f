"""Segment length by overhead budget (the default, --segment-steps auto). Pure."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ulfmpy.seglength import K_MAX, K_MIN, K_START, LOG_FLOOR, SegmentBudget


def feed(p: SegmentBudget, boundary: float, step: float, *, n: int = 5, steps: int = 10,
         log_bytes: int = 0, state_bytes: int = 0) -> None:
    for _ in range(n):
        p.observe_boundary(boundary)
        p.observe_segment(step * steps, steps, log_bytes=log_bytes, state_bytes=state_bytes)


def test_no_data_no_proposal():
    p = SegmentBudget()
    assert p.ideal() is None and p.propose() is None and p.k == K_START
    p.observe_boundary(0.002)
    assert p.propose() is None  # no step time yet


def test_picks_the_shortest_segment_within_budget():
    p = SegmentBudget(budget=0.01)
    feed(p, boundary=0.002, step=0.002)  # a boundary costs one step
    d = p.propose()
    assert d is not None and d["steps"] == 100 and p.k == 100
    assert d["overhead"] == pytest.approx(0.01)
    assert d["old"] == K_START and d["policy"] == "budget"


def test_hysteresis_keeps_k_when_close():
    p = SegmentBudget(budget=0.01, k=100)
    feed(p, boundary=0.0022, step=0.002)  # ideal 110: within a quarter of 100
    assert p.ideal() == 110 and p.propose() is None and p.k == 100


def test_log_memory_caps_k():
    p = SegmentBudget(budget=0.001)
    # 1 MiB logged per step, 64 MiB of state: at most 64 steps of log.
    feed(p, boundary=0.002, step=0.002, log_bytes=10 << 20, state_bytes=64 << 20)
    assert p.ideal() == 64
    # A small state may still log up to LOG_FLOOR.
    p = SegmentBudget(budget=0.001)
    feed(p, boundary=0.002, step=0.002, log_bytes=10 << 20, state_bytes=1 << 20)
    assert p.ideal() == LOG_FLOOR // (1 << 20)


def test_median_ignores_one_outlier():
    p = SegmentBudget(budget=0.01)
    feed(p, boundary=0.002, step=0.002, n=4)
    p.observe_boundary(5.0)  # one boundary that waited on something else
    assert p.ideal() == 100


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="segment budget"):
        SegmentBudget(budget=0.0)


@settings(max_examples=200, deadline=None)
@given(boundary=st.floats(1e-6, 10.0), step=st.floats(1e-6, 10.0),
       budget=st.floats(1e-4, 0.5), log=st.integers(0, 1 << 28), state=st.integers(0, 1 << 30))
def test_choice_is_within_bounds_and_budget(boundary, step, budget, log, state):
    p = SegmentBudget(budget=budget)
    feed(p, boundary, step, steps=1, log_bytes=log, state_bytes=state)
    k = p.ideal()
    assert K_MIN <= k <= K_MAX
    room = max(state, LOG_FLOOR)
    cap = max(K_MIN, room // log) if log else K_MAX
    if K_MIN < k < min(K_MAX, cap):
        # Smallest within budget: k meets it, k - 1 does not.
        assert boundary / (k * step) <= budget * (1 + 1e-9)
        assert boundary / ((k - 1) * step) > budget * (1 - 1e-9)
    if log and room // log >= K_MIN:
        assert k * log <= room
    assert k == max(K_MIN, min(math.ceil(boundary / (budget * step)), K_MAX, cap))
