# Run: ulfmpy run -n 4 tests/scenarios/apps/raise_on_rank.py RANK STEP
"""A loop whose body raises on one rank: the job must end, not hang."""

import sys

from mpi4py import MPI

import ulfmpy
from apps.stencil import Heat2D


def main() -> int:
    bad_rank, bad_step = int(sys.argv[1]), int(sys.argv[2])
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        for step, grid in rt.loop(lambda comm: Heat2D(comm, 40, 40), steps=50):
            if step == bad_step and rt.rank == bad_rank:
                raise ValueError(f"user code failed at step {step}")
            grid.step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
