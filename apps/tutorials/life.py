"""Conway's Game of Life on a periodic board, as mpi4py tutorials write it.

Rows split over the ranks (1D decomposition), one ghost row above and below
exchanged with ``Sendrecv`` each generation, and the population counted with
an object ``allreduce`` every step. The board is a new array each
generation (``board = new``). At the end rank 0 prints a checksum.

life_plain.py is the plain program; life.py is the same protected by
ulfmpy, five lines changed.
Run:  mpirun -n 4 python apps/tutorials/life_plain.py --n 96 --steps 200
      ulfmpy run -n 4 apps/tutorials/life.py --n 96 --steps 200
"""
import argparse
import hashlib

import numpy as np
from mpi4py import MPI
import ulfmpy


class Life:
    def __init__(self, comm, n, seed):
        self.comm, self.n = comm, n
        rank, size = comm.Get_rank(), comm.Get_size()
        self.r0 = rank * n // size
        rows = (rank + 1) * n // size - self.r0
        world = np.random.default_rng(seed).random((n, n)) < 0.3  # the same board on any rank count
        self.board = np.zeros((rows + 2, n), dtype=np.uint8)
        self.board[1:-1] = world[self.r0:self.r0 + rows]
        self.up, self.down = (rank - 1) % size, (rank + 1) % size
        self.alive = 0
    state = property(lambda self: {"board": ulfmpy.Block(self.board[1:-1], (self.n, self.n), (self.r0, 0))})

    def step(self):
        b, comm = self.board, self.comm
        comm.Sendrecv(b[1], dest=self.up, recvbuf=b[-1], source=self.down)
        comm.Sendrecv(b[-2], dest=self.down, recvbuf=b[0], source=self.up)
        nb = sum(np.roll(b, (dy, dx), axis=(0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                 if (dy, dx) != (0, 0))
        new = np.zeros_like(b)
        new[1:-1] = ((nb[1:-1] == 3) | ((b[1:-1] == 1) & (nb[1:-1] == 2))).astype(np.uint8)
        self.board = new
        self.alive = comm.allreduce(int(new[1:-1].sum()), op=MPI.SUM)

    def report(self):
        parts = self.comm.gather(self.board[1:-1].copy(), root=0)
        if self.comm.Get_rank() == 0:
            board = np.concatenate(parts)
            print("checksum", hashlib.sha256(board.tobytes()).hexdigest()[:16],
                  "alive", int(board.sum()), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
      for it, life in rt.loop(lambda comm: Life(comm, args.n, args.seed), steps=args.steps):
        life.step()
    life.report()


if __name__ == "__main__":
    main()
