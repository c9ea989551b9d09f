# Run: ulfmpy run -n 4 tests/scenarios/apps/unsupported.py --call Alltoall --at-step 3
"""A test app that makes an MPI call ulfmpy cannot log, inside the loop.

Each step is a ring ``Sendrecv``; at ``--at-step`` the ranks (all of them,
or only ``--only-rank``) also make the call named by ``--call``. Inside a
segment that must fail with :class:`ulfmpy.UnsupportedCall` naming the call,
and the job must end (nonzero exit), never hang. ``--before-loop`` makes the
same call before ``rt.loop`` instead, where it must pass through.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI

import ulfmpy
from ulfmpy.state import Block


class Tiny:
    def __init__(self, comm, n: int = 8) -> None:
        self.comm = comm
        rank, size = comm.Get_rank(), comm.Get_size()
        self.x = np.full(n, (rank + 1) / (size + 1))
        self.halo = np.empty(1)
        self.state = {"x": Block(self.x, (n * size,), (n * rank,))}
        self.bounds = {"x": (0.0, 1.0)}

    def step(self) -> None:
        comm = self.comm
        rank, size = comm.Get_rank(), comm.Get_size()
        comm.Sendrecv(self.x[-1:], (rank + 1) % size, 5, self.halo, (rank - 1) % size, 5)
        self.x[1:] = 0.5 * (self.x[1:] + self.x[:-1])
        self.x[0] = 0.5 * (self.x[0] + self.halo[0])


def make_call(comm, name: str) -> None:
    """Make the MPI call ``name`` on ``comm`` with small numpy buffers."""
    size = comm.Get_size()
    if name == "Alltoall":
        comm.Alltoall(np.ones(size), np.empty(size))
    elif name == "Scan":
        comm.Scan(np.ones(1), np.empty(1), op=MPI.SUM)
    elif name == "Reduce":
        comm.Reduce(np.ones(1), np.empty(1), op=MPI.SUM, root=0)
    elif name == "gather":
        comm.gather(comm.Get_rank(), root=0)
    elif name == "Alltoallw":
        t = [MPI.DOUBLE] * size
        one, zero = [1] * size, list(range(size))
        comm.Alltoallw([np.ones(size), one, [8 * d for d in zero], t],
                       [np.empty(size), one, [8 * d for d in zero], t])
    elif name == "Iprobe":
        comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
    else:
        raise SystemExit(f"unsupported.py: unknown --call {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--call", default="Alltoall")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--at-step", type=int, default=3)
    p.add_argument("--only-rank", type=int, default=None)
    p.add_argument("--before-loop", action="store_true")
    args = p.parse_args(argv)
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        if args.before_loop:
            make_call(rt.comm, args.call)
        for step, app in rt.loop(lambda comm: Tiny(comm), steps=args.steps):
            app.step()
            if (step == args.at_step and not args.before_loop
                    and args.only_rank in (None, rt.rank)):
                make_call(app.comm, args.call)
        if rt.rank == 0:
            print(f'{{"fingerprint": "{rt.summary["fingerprint"]}"}}', flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
