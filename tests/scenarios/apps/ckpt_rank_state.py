# Run: ulfmpy run -n 4 --ckpt-every 10 tests/scenarios/apps/ckpt_rank_state.py --steps 60
"""The stencil plus per-rank state (a plain ndarray, not a ulfmpy.Block).

Each rank keeps ``tally``: how many steps it ran and a running sum of its
block. Checkpoints restore it only onto the same rank count; resuming on
another rank count must fail with an error naming both counts.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from mpi4py import MPI

import ulfmpy
from apps.stencil import Heat2D


class TalliedHeat(Heat2D):
    """Heat2D whose state also holds a per-rank ``tally`` array."""

    def __init__(self, comm, nx: int, ny: int) -> None:
        super().__init__(comm, nx, ny)
        self.tally = np.zeros(2)  # [steps run, running sum of this rank's block]
        self.state = {**self.state, "tally": self.tally}

    def step(self) -> None:
        super().step()
        self.tally[0] += 1.0
        self.tally[1] += float(self.u[1:-1, 1:-1].sum())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nx", type=int, default=64)
    p.add_argument("--ny", type=int, default=48)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        for _step, app in rt.loop(lambda comm: TalliedHeat(comm, args.nx, args.ny),
                                  steps=args.steps):
            app.step()
        if rt.rank == 0:
            print(json.dumps({"fingerprint": rt.summary["fingerprint"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
