# Run: ulfmpy run -n 4 tests/scenarios/apps/swap_heat.py --steps 200
"""A Jacobi heat solver written the way tutorials write it: two buffers swapped
after every step (``u, unew = unew, u``), rows split over the ranks, the state
a property naming the current buffer. ``--grow-at S`` makes the state change
dtype at step S (an error the runtime must name). ``--no-resilience`` is
ulfmpy's plain loop.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

import ulfmpy


class Jacobi:
    def __init__(self, comm, nx: int, ny: int, grow_at: int) -> None:
        self.comm, self.grow_at = comm, grow_at
        rank, size = comm.Get_rank(), comm.Get_size()
        base, extra = divmod(nx, size)
        self.x0 = rank * base + min(rank, extra)
        n = base + (1 if rank < extra else 0)
        self.nx, self.ny = nx, ny
        self.up = rank - 1 if rank > 0 else MPI.PROC_NULL
        self.down = rank + 1 if rank < size - 1 else MPI.PROC_NULL
        rows = np.arange(self.x0 - 1, self.x0 + n + 1, dtype=float)[:, None]
        self.u = np.sin(rows * 0.37 + np.arange(ny) * 0.11) * 0.5 + 0.5
        if rank == 0:
            self.u[0, :] = 1.0       # the hot edge, held fixed
        if rank == size - 1:
            self.u[-1, :] = 0.0
        self.unew = self.u.copy()    # same fixed edges and columns in both buffers
        self.bounds = {"u": (0.0, 1.0)}

    @property
    def state(self):
        return {"u": ulfmpy.Block(self.u[1:-1], (self.nx, self.ny), (self.x0, 0))}

    def step(self, step: int) -> None:
        u, c = self.u, self.comm
        c.Sendrecv(u[1], self.up, 1, u[-1], self.down, 1)
        c.Sendrecv(u[-2], self.down, 2, u[0], self.up, 2)
        self.unew[1:-1, 1:-1] = 0.25 * (u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:])
        self.u, self.unew = self.unew, self.u
        if step + 1 == self.grow_at:
            self.u = self.u.astype(np.float32)  # a new array of another dtype


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nx", type=int, default=96)
    p.add_argument("--ny", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--grow-at", type=int, default=-1)
    args = p.parse_args()
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        for step, app in rt.loop(lambda c: Jacobi(c, args.nx, args.ny, args.grow_at),
                                 steps=args.steps):
            app.step(step)
        if rt.rank == 0:
            print(rt.summary["fingerprint"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
