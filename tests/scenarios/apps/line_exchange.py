# Run: ulfmpy run -n 3 --spares 1 tests/scenarios/apps/line_exchange.py --stall-rank 0 --stall-step 10
"""Ranks on a line pass a message to the right with ``Sendrecv``.

Rank r sends to r+1 and receives from r-1, both ``MPI.PROC_NULL`` at the
ends of the line: the pattern of every stencil at the domain boundary (see
``apps/stencil.py``). The message is ``--words`` float64 values (default
128, i.e. 1 KiB: above Open MPI's inline-send size, below its eager limit).

``--stall-rank R --stall-step S --stall-seconds T``: logical rank R sleeps T
seconds before the ``Sendrecv`` of the first execution of step S. With
``kill:rank=1,step=S-1`` the last rank's receive from the dead middle rank
fails at step S and revokes the communicator while rank 0 sleeps; rank 0
then calls ``Sendrecv(dest=1, source=PROC_NULL)`` on a revoked communicator,
deterministically.

The state is this rank's block of a global array; the fingerprint depends on
the rank count (the line is the decomposition), so compare runs with equal -n.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from mpi4py import MPI

import ulfmpy
from ulfmpy.state import Block


class Line:
    """One rank's block and its message buffers."""

    def __init__(self, comm, m: int, words: int) -> None:
        self.comm = comm
        rank, size = comm.Get_rank(), comm.Get_size()
        self.right = rank + 1 if rank + 1 < size else MPI.PROC_NULL
        self.left = rank - 1 if rank > 0 else MPI.PROC_NULL
        self.x = (np.arange(m, dtype=np.float64) + m * rank) / (m * size)
        self.state = {"x": Block(self.x, (m * size,), (m * rank,))}
        # x stays in [0.125, 0.875] once stepped: 0.5 x + 0.25 in + 0.125.
        self.bounds = {"x": (0.0, 1.0)}
        self.out = np.empty(words)
        self.inp = np.zeros(words)

    def step(self) -> None:
        self.out[:] = self.x[-1]
        self.inp[:] = 0.0
        self.comm.Sendrecv(self.out, self.right, 5, self.inp, self.left, 5)
        self.x *= 0.5
        self.x += 0.25 * self.inp[0] + 0.125


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=8, help="values per rank")
    p.add_argument("--words", type=int, default=128, help="float64 values per message")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--stall-rank", type=int, default=-1)
    p.add_argument("--stall-step", type=int, default=-1)
    p.add_argument("--stall-seconds", type=float, default=1.5)
    args = p.parse_args()
    stalled = False
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        for step, line in rt.loop(lambda comm: Line(comm, args.m, args.words), steps=args.steps):
            if step == args.stall_step and rt.rank == args.stall_rank and not stalled:
                stalled = True
                time.sleep(args.stall_seconds)
            line.step()
        if rt.rank == 0 and rt.summary:
            print(json.dumps({"fingerprint": rt.summary["fingerprint"], "ranks": rt.summary["ranks"]}))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
