"""The segment protocol (ulfmpy.segments) on 4 ranks: only the ranks corruption reached redo work.

Run: mpirun -n 4 python -m mpi4py -m pytest --with-mpi tests/mpi
"""

import numpy as np
import pytest
from mpi4py import MPI

from tests.segment_app import Corrupt, free, reference, run_segment, setup

from conftest import all_true  # noqa: E402

pytestmark = pytest.mark.mpi(min_size=4)




@pytest.mark.parametrize("step,index,expect", [(15, 3, [1]), (19, 0, [1]), (18, 0, [1, 2])],
                         ids=["local", "sent-nothing-yet", "reached-the-next-rank"])
def test_rollback_reaches_only_the_contaminated_ranks(step, index, expect):
    world = MPI.COMM_WORLD
    runner, me, work, events = setup(world, hooks=Corrupt(victim=1, step=step, index=index))
    for first in (0, 10, 20):
        run_segment(runner, me, work, first, first + 10)
    rbs = runner.rollbacks
    all_true(world, len(rbs) == 1 and rbs[0]["step"] == 10, "one rollback of segment 10")
    all_true(world, rbs[0]["reexecuted_ranks"] == expect, f"S == {expect}")
    all_true(world, np.array_equal(work.state["u"], reference(MPI.COMM_WORLD, 30)), "exact final state")
    free(me)


def test_rank_0_plan_reaches_every_rank():
    world = MPI.COMM_WORLD
    runner, me, work, _ = setup(world)
    mine = (1, 23, 8, 0, 0, 0) if me.rank == 0 else (0, 0, 0, 100 * me.rank, int(me.rank == 2),
                                                     int(me.rank == 3))
    agreed = run_segment(runner, me, work, 0, 10, plan=lambda t: np.array(mine))
    all_true(world, (agreed.save, agreed.next_end, agreed.k) == (True, 23, 8), "rank 0 decides")
    all_true(world, agreed.delta_ns == 300 and not agreed.writes_ready, "max over ranks")
    all_true(world, agreed.halt, "a halt asked by any rank reaches every rank")
    free(me)
