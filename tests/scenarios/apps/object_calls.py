# Run: ulfmpy run -n 4 tests/scenarios/apps/object_calls.py --steps 300
"""A 1D periodic diffusion written with mpi4py's lowercase (pickled object)
calls, as tutorials write it: each step a ``sendrecv`` of one edge value with
each neighbour and an ``allreduce`` (MAX, so the result does not depend on the
rank count) of the local maximum. State: one ``Block`` of the global array,
so it restores onto any rank count (shrink).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

import ulfmpy


class Rod:
    def __init__(self, comm, n: int) -> None:
        self.comm = comm
        rank, size = comm.Get_rank(), comm.Get_size()
        base, extra = divmod(n, size)
        x0 = rank * base + min(rank, extra)
        count = base + (1 if rank < extra else 0)
        self.u = np.sin(np.arange(x0, x0 + count) * 0.05) + 1.0
        self.left, self.right = (rank - 1) % size, (rank + 1) % size
        self.state = {"u": ulfmpy.Block(self.u, (n,), (x0,))}

    def step(self) -> None:
        u, c = self.u, self.comm
        from_left = c.sendrecv(float(u[-1]), dest=self.right, sendtag=1, source=self.left,
                               recvtag=1)
        from_right = c.sendrecv(float(u[0]), dest=self.left, sendtag=2, source=self.right,
                                recvtag=2)
        peak = c.allreduce(float(u.max()), op=MPI.MAX)
        padded = np.concatenate(([from_left], u, [from_right]))
        u += 0.2 * (padded[:-2] - 2 * u + padded[2:])
        u *= 1.0 / (1.0 + 1e-4 * peak)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        for step, rod in rt.loop(lambda c: Rod(c, args.n), steps=args.steps):
            rod.step()
        if rt.rank == 0:
            print(rt.summary["fingerprint"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
