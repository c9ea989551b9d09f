# Run: ulfmpy run -n 4 --spares 1 --inject kill:rank=1,step=60 tests/scenarios/apps/sub_grid.py
"""A 2D grid of ranks whose rows and columns talk on their own
communicators (``cart.Sub``) and whose halves reduce on a ``Split``: each
step every rank mixes its block with its row neighbour's (``Sendrecv`` on
the row), adds its column's mean (``Allreduce`` on the column) and its
half's maximum (``allreduce`` on the split). Rank 0 prints a checksum.

``--inline``: the same loop with ``ulfmpy.range`` inside the with block.
"""
import argparse
import hashlib

import numpy as np
from mpi4py import MPI

import ulfmpy


class Grid:
    def __init__(self, comm, n):
        dims = MPI.Compute_dims(comm.Get_size(), 2)
        self.cart = comm.Create_cart(dims, periods=[True, True])
        self.rows, self.cols = self.cart.Sub([False, True]), self.cart.Sub([True, False])
        self.half = comm.Split(comm.Get_rank() % 2, comm.Get_rank())
        self.rank = comm.Get_rank()
        self.u = np.arange(n, dtype=np.float64) * 1e-3 + self.rank
        self.got, self.mean = np.empty(n), np.empty(1)

    state = property(lambda self: {"u": self.u})

    def step(self):
        left, right = self.rows.Shift(0, 1)
        self.rows.Sendrecv(self.u, dest=right, recvbuf=self.got, source=left)
        self.cols.Allreduce(np.array([self.u.mean()]), self.mean)
        top = self.half.allreduce(float(self.u.max()), op=MPI.MAX)
        self.u = 0.5 * (self.u + np.roll(self.got, 1)) + 1e-3 * (self.mean[0] - top)

    def report(self, comm):
        parts = comm.gather(self.u, root=0)
        if comm.Get_rank() == 0:
            print("checksum", hashlib.sha256(np.concatenate(parts).tobytes()).hexdigest()[:16],
                  flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--inline", action="store_true")
    args = p.parse_args()
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        if args.inline:
            g = Grid(MPI.COMM_WORLD, args.n)
            for it in ulfmpy.range(args.steps, state=lambda: g.state):
                g.step()
        else:
            for it, g in rt.loop(lambda comm: Grid(comm, args.n), steps=args.steps):
                g.step()
        g.report(rt.comm)


if __name__ == "__main__":
    main()
