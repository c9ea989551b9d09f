# Run: ulfmpy run -n 4 tests/scenarios/apps/late_receive.py --steps 200
"""Receives completed by mpi4py's own ``Request`` class, then the receive
buffer reused before ulfmpy's next call: the late-receive guard's app.

Rank 0 sends a forcing field to every other rank each step and takes their
fields back. The workers complete their exchange with ``Request.Waitall``
of the class bound from ``mpi4py.MPI`` when the module loads (before
``rt.loop`` shims ``MPI.Request``), so ulfmpy logs their receive only at
its next call, by which time the worker has cleared its scratch buffer.
The forcing goes into ``acc`` (a running average) that the worker never
sends, and rank 0 logs what the workers send through ulfmpy's class: a
worker replayed alone from its log would get zeros, and nothing it re-sends
would differ, so no comparison could notice. ``--no-resilience`` is the
plain loop.
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI
from mpi4py.MPI import Request  # mpi4py's own class, whatever MPI.Request is later

import ulfmpy


class Forcing:
    def __init__(self, comm, n: int) -> None:
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.u = np.linspace(0.0, 1.0, n) * (self.rank + 1) / self.size
        self.acc = np.zeros(n)
        self.scratch = np.empty(n)
        self.back = np.zeros((self.size, n))
        self.bounds = {"u": (-0.5, 1.5), "acc": (-0.5, 1.5)}

    @property
    def state(self):
        return {"u": self.u, "acc": self.acc}

    def step(self) -> None:
        c = self.comm
        if self.rank == 0:
            reqs = [c.Isend(self.u, w, 0) for w in range(1, self.size)]
            reqs += [c.Irecv(self.back[w], w, 1) for w in range(1, self.size)]
            MPI.Request.Waitall(reqs)  # ulfmpy's class inside the loop: logged at once
            self.u = 0.5 * self.u + 0.5 * self.back[1:].mean(axis=0)
        else:
            reqs = [c.Irecv(self.scratch, 0, 0), c.Isend(self.u, 0, 1)]
            Request.Waitall(reqs)
            self.acc *= 0.9
            self.acc += 0.1 * self.scratch
            self.scratch.fill(0.0)  # reused scratch: cleared before ulfmpy logs it
            self.u = 0.5 * (self.u + np.roll(self.u, 1))


def main() -> int:
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 200
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        for _, app in rt.loop(lambda c: Forcing(c, 64), steps=steps):
            app.step()
        if rt.rank == 0:
            print(rt.summary["fingerprint"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
