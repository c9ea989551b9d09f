"""Particles in a 1D periodic box, as mpi4py course codes write it.

The box is cut into one slab per rank. Each step every particle moves in a
harmonic well; particles that left their slab go to their new owner with
an ``Alltoall`` of counts and an ``Alltoallv`` of the particle data, and
the total energy goes to rank 0 with ``Reduce``. Particles sit in
fixed-capacity arrays with a count. At the end rank 0 prints a checksum of
all particles, sorted by id (the same on any rank count).

particles_plain.py is the plain program; particles.py is the same
protected by ulfmpy, five lines changed.
Run:  mpirun -n 4 python apps/tutorials/particles_plain.py --particles 2000 --steps 200
      ulfmpy run -n 4 apps/tutorials/particles.py --particles 2000 --steps 200
"""
import argparse
import hashlib

import numpy as np
from mpi4py import MPI
import ulfmpy

L, DT, K = 1.0, 0.01, 4.0


class Particles:
    def __init__(self, comm, total, seed):
        self.comm = comm
        rank, size = comm.Get_rank(), comm.Get_size()
        rng = np.random.default_rng(seed)
        x0, v0 = rng.random(total) * L, rng.standard_normal(total) * 0.5
        mine = np.flatnonzero(self.owner(x0) == rank)
        cap = 2 * total
        self.x, self.v, self.id = np.zeros(cap), np.zeros(cap), np.zeros(cap)
        self.n = np.array(len(mine))
        self.x[:len(mine)], self.v[:len(mine)], self.id[:len(mine)] = x0[mine], v0[mine], mine
        self.energy = np.zeros(1)
    state = property(lambda self: {"x": ulfmpy.Rows(self.x, self.n), "v": ulfmpy.Rows(self.v, self.n), "id": ulfmpy.Rows(self.id, self.n), "n": self.n})

    def owner(self, x):
        return np.minimum((x / L * self.comm.Get_size()).astype(int), self.comm.Get_size() - 1)

    def step(self):
        comm, n, size = self.comm, int(self.n), self.comm.Get_size()
        x, v = self.x[:n], self.v[:n]
        v -= K * (x - 0.5 * L) * DT
        x += v * DT
        x %= L
        dest = self.owner(x)
        order = np.argsort(dest, kind="stable")
        send = np.stack([x, v, self.id[:n]], axis=1)[order]
        scount = np.bincount(dest, minlength=size).astype(np.int64)
        rcount = np.zeros(size, dtype=np.int64)
        comm.Alltoall(scount, rcount)
        recv = np.zeros((int(rcount.sum()), 3))
        sdispl = np.concatenate([[0], np.cumsum(scount)[:-1]])
        rdispl = np.concatenate([[0], np.cumsum(rcount)[:-1]])
        comm.Alltoallv([send, scount * 3, sdispl * 3, MPI.DOUBLE],
                       [recv, rcount * 3, rdispl * 3, MPI.DOUBLE])
        m = len(recv)
        self.x[:m], self.v[:m], self.id[:m] = recv[:, 0], recv[:, 1], recv[:, 2]
        self.n[...] = m
        mine = np.array([0.5 * np.sum(recv[:, 1] ** 2) + 0.5 * K * np.sum((recv[:, 0] - 0.5 * L) ** 2)])
        comm.Reduce(mine, self.energy, op=MPI.SUM, root=0)

    def report(self):
        n = int(self.n)
        parts = self.comm.gather(np.stack([self.id[:n], self.x[:n], self.v[:n]], axis=1), root=0)
        if self.comm.Get_rank() == 0:
            allp = np.concatenate(parts)
            allp = allp[np.argsort(allp[:, 0])]
            print("checksum", hashlib.sha256(allp.tobytes()).hexdigest()[:16],
                  "particles", len(allp), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--particles", type=int, default=2000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args()
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
      for it, parts in rt.loop(lambda comm: Particles(comm, args.particles, args.seed), steps=args.steps):
        parts.step()
    parts.report()


if __name__ == "__main__":
    main()
