"""The boundary planner (docs/architecture.md, "Who decides where a segment ends"): where segments end and when to save. Pure."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ulfmpy.planner import BoundaryPlanner, Schedule
from ulfmpy.policy import IntervalPolicy


def drive(planner: BoundaryPlanner, start: int, *, seed: int = 0, step_time: float = 1e-3,
          boundary_s: float = 1e-3, write_boundaries: int = 2, delta: float = 0.01,
          jitter: float = 0.0, write_s: float = 0.02):
    """Run the planner as rank 0's runtime does; returns (segments, saves, boundaries).

    A save's δ reaches the planner at the next boundary (the agreement's
    maximum), and its write commits ``write_boundaries`` boundaries later.
    """
    rng = random.Random(seed)
    now = 0.0
    step, end = start, planner.start(start, now)
    segments, saves, bounds = [], [], []
    delta_due = False
    commit_in = None
    steps = planner.schedule.steps
    while step < steps:
        assert step < end <= steps, (step, end)
        n = end - step
        t = n * step_time * (1 + jitter * rng.uniform(-1, 1))
        now += t
        planner.observe_segment(t, n, clean=True, log_bytes=100 * n, state_bytes=10_000)
        planner.observe_boundary(boundary_s)
        b = planner.boundary(end, now)
        bounds.append(b)
        segments.append((step, end))
        if delta_due:
            planner.observe_save(delta)
            delta_due = False
        if commit_in is not None:
            commit_in -= 1
            if commit_in <= 0:
                planner.observe_write(write_s)
                commit_in = None
        if b.save:
            saves.append(end)
            delta_due = True
            if planner.schedule.async_writes:
                commit_in = write_boundaries
        step, end = end, b.next_end
    return segments, saves, bounds


@given(every=st.integers(1, 120), steps=st.integers(1, 1500), start=st.integers(0, 300),
       fixed=st.sampled_from([0, 1, 3, 10, 37, 500]), seed=st.integers(0, 10**6))
@settings(max_examples=300, deadline=None)
def test_ckpt_every_saves_exactly_at_its_multiples(every, steps, start, fixed, seed):
    start = min(start, steps)
    p = BoundaryPlanner(Schedule(steps=steps, segment_steps=fixed, ckpt_every=every,
                                 checkpoints=True))
    segs, saves, _ = drive(p, start, seed=seed, jitter=0.5)
    assert saves == [s for s in range(start + 1, steps) if s % every == 0]
    # the segments tile the run, none longer than the policy's length
    assert [a for a, _ in segs] == [start] + [b for _, b in segs[:-1]] if segs else start == steps
    if fixed:
        assert all(b - a <= fixed for a, b in segs)


def test_default_length_grows_but_still_lands_on_every_multiple():
    p = BoundaryPlanner(Schedule(steps=10_000, ckpt_every=50, checkpoints=True))
    segs, saves, bounds = drive(p, 0, step_time=1e-3, boundary_s=1e-3)  # ideal k = 400
    assert saves == list(range(50, 10_000, 50))
    assert p.k > 50, "the automatic length grew past the checkpoint interval"
    # Learning goes on at boundaries that save: k was proposed more than once.
    decisions = [e for b in bounds for e in b.events if e[0] == "segment_decision"]
    assert decisions and any(b.save for b in bounds)


def test_without_checkpoints_the_length_is_the_policy_s():
    p = BoundaryPlanner(Schedule(steps=5000, segment_steps=0))
    segs, saves, _ = drive(p, 0)
    assert not saves
    assert segs[0] == (0, 10) and max(b - a for a, b in segs) > 100


@given(steps=st.integers(50, 4000), mtbf=st.floats(0.5, 50.0), delta=st.floats(1e-4, 0.05),
       step_time=st.floats(1e-4, 5e-3), jitter=st.sampled_from([0.0, 0.3, 0.9]),
       fixed=st.sampled_from([0, 5, 10, 100]), model=st.sampled_from(["exact", "young", "daly",
                                                                       "saxena"]),
       seed=st.integers(0, 10**6))
@settings(max_examples=200, deadline=None)
def test_mtbf_checkpoints_land_on_each_decision(steps, mtbf, delta, step_time, jitter, fixed,
                                                model, seed):
    pol = IntervalPolicy(mtbf=mtbf, model=model, recovery_estimate=1.0)
    p = BoundaryPlanner(Schedule(steps=steps, segment_steps=fixed, checkpoints=True,
                                 interval=pol))
    _, saves, bounds = drive(p, 0, seed=seed, step_time=step_time, delta=delta, jitter=jitter)
    decisions = [f for b in bounds for name, f in b.events if name == "interval_decision"]
    revised = {d["revises"] for d in decisions if "revises" in d}
    for d in decisions:
        # τ (in steps through the measured step time) from the last save,
        # or the boundary itself when the decision came late.
        assert d["next_step"] == max(d["last_save_step"] + d["steps"], d["at_step"])
        if d["next_step"] < steps and d["next_step"] not in revised:
            assert d["next_step"] in saves, (d, saves)
    # Every save after the first (which measures δ) is where a decision said.
    assert set(saves[1:]) <= {d["next_step"] for d in decisions}


@pytest.mark.parametrize("fixed", [0, 500])
def test_mtbf_saves_keep_their_interval_while_the_last_save_s_delta_is_unknown(fixed):
    # τ ≈ 140 steps; a write takes 500 steps, so the segments after a save
    # are long: the save's δ arrives late, and the held decision keeps the
    # next save at its interval (before, it landed 500 steps on).
    pol = IntervalPolicy(mtbf=2.0, recovery_estimate=0.1)
    p = BoundaryPlanner(Schedule(steps=6000, segment_steps=fixed, checkpoints=True, interval=pol))
    _, saves, bounds = drive(p, 0, step_time=1e-3, delta=0.005, write_s=0.5)
    decisions = [f for b in bounds for n, f in b.events if n == "interval_decision"]
    longest = max(d["steps"] for d in decisions)
    assert 100 < longest < 200
    gaps = [b - a for a, b in zip(saves[1:], saves[2:])]
    assert len(gaps) > 20 and max(gaps) <= longest, gaps
    assert any(d.get("held") for d in decisions)


def test_mtbf_first_save_waits_for_a_measured_step_time():
    pol = IntervalPolicy(mtbf=10.0)
    p = BoundaryPlanner(Schedule(steps=1000, segment_steps=10, checkpoints=True, interval=pol))
    _, saves, bounds = drive(p, 0)
    # Segment 0-10 is the warm-up (its time is not used); 10-20 gives the step time.
    assert saves[0] == 20
    first = next(f for b in bounds for n, f in b.events if n == "interval_decision")
    assert first["step_time"] == pytest.approx(1e-3)


def test_ckpt_seconds_become_steps_through_the_step_time():
    p = BoundaryPlanner(Schedule(steps=3000, ckpt_seconds=0.5, checkpoints=True))
    _, saves, _ = drive(p, 0, step_time=1e-3)
    gaps = [b - a for a, b in zip(saves, saves[1:])]
    assert gaps and all(abs(g - 500) <= 1 for g in gaps)


@given(steps=st.integers(20, 3000), halt=st.integers(1, 2999), fixed=st.sampled_from([0, 7]))
@settings(max_examples=100, deadline=None)
def test_a_halt_step_ends_a_segment(steps, halt, fixed):
    p = BoundaryPlanner(Schedule(steps=steps, segment_steps=fixed))
    p.request_halt(halt)
    segs, _, bounds = drive(p, 0)
    if halt < steps:
        assert halt in [b for _, b in segs]
        assert [b.step for b in bounds if b.halt] == [halt]


def test_pending_write_shortens_segments_until_it_commits():
    p = BoundaryPlanner(Schedule(steps=100_000, ckpt_every=20_000, checkpoints=True))
    segs, saves, _ = drive(p, 0, write_boundaries=3)
    after = [b - a for a, b in segs if saves[0] <= a < saves[0] + 200]
    # Polled soon after the save (no write time known yet: 10 steps), each
    # wait twice the last while the write is unfinished; the commit came at
    # the third boundary, so the fourth segment was still planned short.
    assert after[:4] == [10, 20, 40, 80]
    assert max(b - a for a, b in segs) > 100  # and long again once committed


def test_the_way_to_the_next_save_is_cut_once_for_the_commit():
    """The next checkpoint comes soon: one poll once the write should be done
    (20 steps: the last write took 0.02 s), so the commit lands before the
    save; no more boundaries than that."""
    p = BoundaryPlanner(Schedule(steps=3000, ckpt_every=100, checkpoints=True))
    segs, saves, _ = drive(p, 0, write_boundaries=1)
    assert saves == list(range(100, 3000, 100))
    late = [(a, b) for a, b in segs if a >= 1000]
    assert all(b - a == 20 if a % 100 == 0 else (a % 100, b % 100) == (20, 0) for a, b in late)


def test_start_is_the_same_everywhere():
    sched = Schedule(steps=500, ckpt_every=7, checkpoints=True)
    a, b = BoundaryPlanner(sched), BoundaryPlanner(sched)
    drive(a, 0)  # a has measurements, b none: the first segment still agrees
    assert a.start(43, 1.0) == b.start(43, 99.0) == 49


def test_bench_planner_counts_landed_and_revised_decisions(load_script):
    bench = load_script("bench_planner")
    decisions = [{"next_step": 100}, {"next_step": 150, "revises": 100}, {"next_step": 400},
                 {"next_step": 900}]
    got = bench.decisions_landed(decisions, [20, 150, 400], steps=800)
    assert (got["revised"], got["due_in_run"], got["held"], got["held_and_landed"]) == (1, 3, 2, 2)
    assert got["checkpoints_off_decision"] == []
    assert bench.decisions_landed(decisions, [20, 170], steps=800)["checkpoints_off_decision"] == [170]


def test_a_commit_inside_the_next_save_leaves_that_save_pending():
    """A save first commits the write before it: that commit is not the new write's."""
    p = BoundaryPlanner(Schedule(steps=10_000, ckpt_every=100, checkpoints=True))
    drive(p, 0, write_boundaries=1)  # measurements: step time, a write time
    p.start(0, 0.0)
    b = p.boundary(100, 0.0)
    assert b.save and p._pending
    p.observe_write(0.02, step=0)  # the save at 100 committed an older write
    assert p._pending
    p.observe_write(0.02, step=100)
    assert not p._pending


@given(every=st.integers(1, 90), steps=st.integers(1, 1200), start=st.integers(0, 200),
       fixed=st.sampled_from([0, 1, 7, 50, 500]), seed=st.integers(0, 10**6))
@settings(max_examples=150, deadline=None)
def test_a_segment_ends_at_every_multiple_of_the_diagnostics_period(every, steps, start, fixed,
                                                                    seed):
    """``--diagnose NAME:every=N`` runs at a boundary: one falls on every multiple of N."""
    start = min(start, steps)
    p = BoundaryPlanner(Schedule(steps=steps, segment_steps=fixed, diagnose_every=every))
    segs, _, _ = drive(p, start, seed=seed, jitter=0.5)
    ends = {b for _, b in segs}
    assert {s for s in range(start + 1, steps) if s % every == 0} <= ends
