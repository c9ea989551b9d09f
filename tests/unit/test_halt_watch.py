"""Halting on request (docs/architecture.md, "Halting"): the pure parts and one process's watch."""

import datetime as dt
import os
import signal
import subprocess
import time

import pytest
from hypothesis import given, strategies as st

from ulfmpy.config import Config
from ulfmpy.errors import ConfigError
from ulfmpy.halt import (HaltWatch, deadline, halt_times, parse_signals, read_slurm_end,
                         slurm_end_time)
from ulfmpy.planner import BoundaryPlanner, Schedule


def test_signal_names_with_or_without_sig_and_none():
    assert parse_signals("USR1,TERM") == (signal.SIGUSR1, signal.SIGTERM)
    assert parse_signals("sigusr2, usr2") == (signal.SIGUSR2,)
    assert parse_signals("none") == () and parse_signals("") == ()


@pytest.mark.parametrize("bad", ["KILL", "STOP", "LUNCH"])
def test_a_signal_that_cannot_be_caught_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=bad):
        parse_signals(f"USR1,{bad}")
    with pytest.raises(ConfigError, match=bad):
        Config(halt_signal=bad)


def test_squeue_end_times():
    utc = dt.timezone.utc
    assert slurm_end_time("2026-12-02T01:23:45\n", tz=utc) == \
        dt.datetime(2026, 12, 2, 1, 23, 45, tzinfo=utc).timestamp()
    for none in ("Unlimited", "N/A", "", "\n", "garbage"):
        assert slurm_end_time(none) is None


def test_the_end_time_is_read_once_from_squeue_for_this_job():
    calls = []

    def run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "2030-01-01T00:00:00\n", "")

    assert read_slurm_end({"SLURM_JOB_ID": "42"}, run=run) == \
        dt.datetime(2030, 1, 1).timestamp()
    assert calls == [["squeue", "-h", "-j", "42", "-o", "%e"]]
    assert read_slurm_end({}, run=run) is None and len(calls) == 1  # not in a Slurm job


@given(st.floats(0, 1e9), st.floats(1, 1e6), st.floats(0, 1e3))
def test_walltime_wins_and_the_halt_comes_before_the_end(start, wall, before):
    halt, end = deadline(start=start, walltime=wall, halt_before=before, slurm_end=start + 5)
    assert end == start + wall
    assert halt == pytest.approx(end - min(before, wall / 2), rel=1e-12, abs=1e-6)
    assert start + wall / 2 <= halt + 1e-6 * max(1.0, start) and halt <= end
    assert deadline(start=start, walltime=0, halt_before=before, slurm_end=None) == (None, None)
    halt, end = deadline(start=start, walltime=0, halt_before=before, slurm_end=start + 7)
    assert end == start + 7
    assert halt == pytest.approx(start + 7 - min(before, 3.5), rel=1e-12, abs=1e-6)


def test_halt_times_from_the_settings():
    halt, end = halt_times(Config(walltime=60, halt_before=10), now=1000.0)
    assert (halt, end) == (1050.0, 1060.0)


def test_a_signal_requests_a_halt_and_a_second_one_escalates():
    escalated = []
    w = HaltWatch((signal.SIGUSR1,), on_escalate=escalated.append)
    w.install()
    try:
        assert w.possible and w.due() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert w.due() == "signal SIGUSR1" and not escalated
        os.kill(os.getpid(), signal.SIGUSR1)  # the same request delivered twice
        time.sleep(0.01)
        assert not escalated
        w.requested_at -= 10
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert escalated and "second halt signal (SIGUSR1)" in escalated[0]
    finally:
        w.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_once_the_halt_is_done_a_signal_changes_nothing():
    escalated = []
    w = HaltWatch((signal.SIGUSR2,), on_escalate=escalated.append)
    w.install()
    try:
        w.request("another rank asked")
        w.requested_at -= 10
        w.done = True
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.01)
        assert not escalated
    finally:
        w.uninstall()


def test_the_deadline_requests_a_halt_and_the_end_escalates():
    escalated = []
    now = time.time()
    w = HaltWatch((), halt_at=now + 100, end_at=now + 1.2, on_escalate=escalated.append)
    assert w.possible and w.due(now) is None and w.due(now + 100) == "deadline"
    w.install()
    try:
        time.sleep(0.6)
        assert escalated == ["the job's end time came before the halt was done"]
    finally:
        w.uninstall()


def test_no_signals_and_no_deadline_means_no_halt():
    w = HaltWatch(())
    assert not w.possible and w.due() is None


def _planner(cap):
    p = BoundaryPlanner(Schedule(steps=100_000, segment_steps=1000, max_segment_s=cap))
    p.start(0, 0.0)
    for _ in range(3):  # 10 ms per step
        p.observe_segment(10.0, 1000, clean=True, log_bytes=0, state_bytes=1)
    return p


def test_segments_are_bounded_in_time_while_a_halt_can_come():
    # 1000-step segments of 10 s: with a halt possible, at most 2 s each.
    assert _planner(0.0).boundary(1000, 1.0).next_end == 2000
    assert _planner(2.0).boundary(1000, 1.0).next_end == 1200


def test_the_halt_window_stretches_to_the_policys_length_up_to_its_limit():
    # Steps of 26 ms and a policy length of 150 steps (3.9 s): a 2 s window
    # would cut every segment at 76 steps, doubling the boundaries' cost.
    def planner(stretch):
        p = BoundaryPlanner(Schedule(steps=100_000, segment_steps=150, max_segment_s=2.0,
                                     max_segment_stretch_s=stretch))
        p.start(0, 0.0)
        for _ in range(3):
            p.observe_segment(0.026 * 150, 150, clean=True, log_bytes=0, state_bytes=1)
        return p

    assert planner(0.0).boundary(150, 1.0).next_end == 150 + 76
    assert planner(10.0).boundary(150, 1.0).next_end == 300
    assert planner(3.0).boundary(150, 1.0).next_end == 150 + 115  # the limit holds
