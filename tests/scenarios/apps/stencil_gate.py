# Run: ulfmpy run -n 4 --spares 1 tests/scenarios/apps/stencil_gate.py --gate-step 20 --nx 64 --ny 48 --steps 60
"""The stencil of ``apps/stencil.py`` with two hooks for scenario tests.

* Every process writes its pid to ``RUN_DIR/pids/world-NNNN.pid`` (NNNN: its
  rank in ``MPI.COMM_WORLD``) before it enters the runtime. The events carry
  no pid and a spare never reaches a kill point while it waits, so this is
  how a test finds, say, the waiting spare to SIGKILL it.
* ``--gate-step G``: logical rank 0 writes ``RUN_DIR/gate-reached`` and waits,
  before the first execution of step G, until ``RUN_DIR/gate`` exists (at
  most ``--gate-timeout`` seconds), so a test can act at a known point of
  the run while the compute ranks are blocked in the loop.

The kernel is the stencil's, so the fingerprint equals ``apps/stencil.py``'s
for the same grid and step count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from mpi4py import MPI

import ulfmpy
from apps.stencil import Heat2D


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nx", type=int, default=64)
    p.add_argument("--ny", type=int, default=48)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--gate-step", type=int, default=-1)
    p.add_argument("--gate-timeout", type=float, default=60.0)
    args = p.parse_args()
    world = MPI.COMM_WORLD
    run_dir = os.environ["ULFMPY_RUN_DIR"]
    pids = os.path.join(run_dir, "pids")
    os.makedirs(pids, exist_ok=True)
    with open(os.path.join(pids, f"world-{world.Get_rank():04d}.pid"), "w") as fh:
        fh.write(str(os.getpid()))
    gated = False
    with ulfmpy.Runtime(world) as rt:
        for step, grid in rt.loop(lambda comm: Heat2D(comm, args.nx, args.ny), steps=args.steps):
            if step == args.gate_step and rt.rank == 0 and not gated:
                gated = True
                open(os.path.join(rt.run_dir, "gate-reached"), "w").close()
                deadline = time.monotonic() + args.gate_timeout
                while not os.path.exists(os.path.join(rt.run_dir, "gate")):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the test never opened the gate")
                    time.sleep(0.02)
            grid.step()
        if rt.rank == 0 and rt.summary:
            print(json.dumps({"fingerprint": rt.summary["fingerprint"], "ranks": rt.summary["ranks"]}))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
