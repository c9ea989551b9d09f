# Run: ulfmpy run -n 4 tests/scenarios/apps/slow_steps.py --steps 40 --slow-from 20 --slow-s 6
"""A test app whose steps turn slow from a given step on (halt escalation).

Each rank holds 256 values; each step it averages them with its right
neighbour's (``Sendrecv`` around a ring) and adds a step-dependent source.
From step ``--slow-from`` on every step also sleeps ``--slow-s`` seconds
(the state does not depend on it: a run without the sleep gives the same
fingerprint), and rank 0 creates ``RUN_DIR/slow-STEP`` as it starts the
first such step, so a test can send a signal while a long step is running.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import ulfmpy


class Slow:
    def __init__(self, comm, slow_from: int, slow_s: float, run_dir: str) -> None:
        self.comm, self.slow_from, self.slow_s, self.run_dir = comm, slow_from, slow_s, run_dir
        rank = comm.Get_rank()
        self.u = np.linspace(rank, rank + 1, 256)
        self.buf = np.empty_like(self.u)
        self.state = {"u": self.u}

    def step(self, step: int) -> None:
        comm = self.comm
        rank, size = comm.Get_rank(), comm.Get_size()
        if step >= self.slow_from:
            if rank == 0 and step == self.slow_from:
                open(os.path.join(self.run_dir, f"slow-{step}"), "w").close()
            time.sleep(self.slow_s)
        comm.Sendrecv(self.u, dest=(rank - 1) % size, sendtag=5, recvbuf=self.buf,
                      source=(rank + 1) % size, recvtag=5)
        self.u += self.buf
        self.u *= 0.5
        self.u += 1e-3 * np.sin(step + np.arange(self.u.size))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--slow-from", type=int, default=20)
    p.add_argument("--slow-s", type=float, default=6.0)
    args = p.parse_args()
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        run_dir = rt.run_dir
        for step, app in rt.loop(lambda c: Slow(c, args.slow_from, args.slow_s, run_dir),
                                 steps=args.steps):
            app.step(step)
        if rt.rank == 0:
            print(rt.summary["fingerprint"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
