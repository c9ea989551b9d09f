"""The segment protocol (ulfmpy.segments) on one rank, COMM_SELF, in plain pytest."""

import numpy as np
import pytest
from mpi4py import MPI

from tests.segment_app import Corrupt, free, reference, run_segment, setup
from ulfmpy.errors import GlobalRollback


def test_clean_segment_passes_the_plan_through_the_agreement():
    runner, me, work, events = setup(MPI.COMM_SELF)
    agreed = run_segment(runner, me, work, 0, 10, plan=lambda t: np.array((1, 17, 9, 5, 0, 0)))
    assert (agreed.save, agreed.next_end, agreed.k, agreed.delta_ns, agreed.writes_ready,
            agreed.halt) == (True, 17, 9, 5, True, False)
    t = agreed.timing
    assert (t.first, t.end, t.clean) == (0, 10, True) and t.t_steps_end >= t.t_start
    assert runner.counters["segments"] == 1 and not runner.rollbacks
    assert [e["end"] for e in events.of("segment")] == [10]
    free(me)


def test_detected_corruption_is_re_executed_and_the_state_is_exact():
    runner, me, work, events = setup(MPI.COMM_SELF, hooks=Corrupt(victim=0, step=13))
    for first in (0, 10, 20):
        agreed = run_segment(runner, me, work, first, first + 10)
    [rb] = runner.rollbacks
    assert rb["step"] == 10 and rb["reexecuted_ranks"] == [0] and rb["reexecuted_rank_steps"] == 10
    assert agreed.timing.clean
    assert runner.counters["injected_faults"] == 1 and runner.counters["escaped_faults"] == 0
    assert np.array_equal(work.state["u"], reference(MPI.COMM_SELF, 30))
    free(me)


def test_a_persistent_fault_escalates_to_a_global_rollback():
    runner, me, work, events = setup(MPI.COMM_SELF, hooks=Corrupt(0, 4, times=100), max_retries=2)
    with pytest.raises(GlobalRollback) as info:
        run_segment(runner, me, work, 0, 10)
    assert info.value.first == 0 and "3 re-executions" in str(info.value)
    assert len(events.of("rollback_round")) == 3
    free(me)


def test_per_step_detection_catches_up_alone():
    runner, me, work, events = setup(MPI.COMM_SELF, hooks=Corrupt(0, 2), detect_every=1)
    run_segment(runner, me, work, 0, 10)
    [c] = events.of("catch_up")
    assert (c["first"], c["last"]) == (0, 2) and not c["detected_again"]
    assert runner.rollbacks[0]["reexecuted_rank_steps"] == 3
    assert np.array_equal(work.state["u"], reference(MPI.COMM_SELF, 10))
    free(me)
