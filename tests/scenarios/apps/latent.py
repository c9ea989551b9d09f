# Run: ulfmpy run -n 4 --ckpt-every 10 --diagnose rowsums:every=20 tests/scenarios/apps/latent.py --steps 80
"""A test app whose corruption only an expensive, periodic diagnostic sees.

Each rank holds a block of integer rows (``--rows`` × ``--cols``, int64) and
the sum of each row (``rowsums``). Every step the block shifts one column
to the right; the last column goes to the next rank of the ring and the
previous rank's arrives as the first (``Sendrecv``); the row sums follow
incrementally (minus what left, plus what came). A flipped bit of ``u``
keeps its value an integer in range, so the per-segment detectors
(``finite``, ``bounds``) see nothing; the row sums stay off by the flip on
that rank for ever after. The ``rowsums`` detector (registered here) adds
up every row again: a check too costly for every segment end, so it runs as
a diagnostic (``--diagnose rowsums:every=N``), and finds an error up to N
steps after it struck. The fingerprint is exact integer arithmetic.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from mpi4py import MPI

import ulfmpy
from ulfmpy.state import Block


@ulfmpy.register_detector("rowsums")
def _rowsums(app, state) -> str | None:
    bad = np.flatnonzero(app.u.sum(axis=1) != app.rowsums)
    return f"row sums of rows {bad.tolist()} disagree" if len(bad) else None


class Shift:
    def __init__(self, comm, rows: int, cols: int) -> None:
        self.comm = comm
        rank, size = comm.Get_rank(), comm.Get_size()
        self.right, self.left = (rank + 1) % size, (rank - 1) % size
        i, j = np.indices((rows, cols))
        self.u = ((i * 7919 + (j + rank * cols) * 104729) % 1000003).astype(np.int64)
        self.rowsums = self.u.sum(axis=1)
        self.out, self.inc = np.empty(rows, np.int64), np.empty(rows, np.int64)
        self.state = {"u": Block(self.u, (rows * size, cols), (rows * rank, 0)),
                      "rowsums": Block(self.rowsums, (rows * size,), (rows * rank,))}
        self.bounds = {"u": (0, 1 << 62)}  # what a low bit flip stays inside

    def step(self) -> None:
        u = self.u
        np.copyto(self.out, u[:, -1])
        self.comm.Sendrecv(self.out, self.right, 5, self.inc, self.left, 5)
        u[:, 1:] = u[:, :-1].copy()
        u[:, 0] = self.inc
        self.rowsums += self.inc
        self.rowsums -= self.out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--cols", type=int, default=12)
    p.add_argument("--steps", type=int, default=80)
    args = p.parse_args()
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        for _step, app in rt.loop(lambda comm: Shift(comm, args.rows, args.cols),
                                  steps=args.steps):
            app.step()
        if rt.rank == 0:
            print(json.dumps({"fingerprint": rt.summary["fingerprint"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
