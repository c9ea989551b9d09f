# Run: ulfmpy run -n 4 -- scripts/apps_job.py --app circuit --out times.json [--steps 600] [--rounds 6]
"""One MPI job that alternates an app's plain run and its protected run (bench_apps (a)).

As ``scripts/overhead_job.py`` does for the stencil, for any of the three
apps: separate launches differ by more than the overhead measured, so the
baseline and the protected loop run in the same job, round after round, in
alternating order, after a warm-up round that is not recorded.

- ``baseline``: the app on a duplicate of COMM_WORLD, no ulfmpy at all; loop
  time from a barrier to the slowest rank's end;
- ``protected``: a fresh ``ulfmpy.Runtime`` at its default settings and
  ``rt.loop``; loop time is the summary's ``wall_s``, so neither side pays
  for start-up.

Rank 0 writes every trial's loop time and fingerprint to ``--out`` (JSON).
Collective over COMM_WORLD.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from mpi4py import MPI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ulfmpy  # noqa: E402
from apps.circuit import Circuit, CircuitSpec  # noqa: E402
from apps.hydro import Hydro, HydroSpec  # noqa: E402
from apps.stencil import Heat2D  # noqa: E402


def factories(args: argparse.Namespace) -> dict[str, Callable[[Any], Any]]:
    """Each app's factory at the sizes given. Pure."""
    return {
        "stencil": lambda comm: Heat2D(comm, args.n, args.n),
        "circuit": lambda comm: Circuit(comm, CircuitSpec(pieces=args.pieces, nodes=args.nodes,
                                                          wires=args.wires)),
        "hydro": lambda comm: Hydro(comm, HydroSpec(zones=args.zones)),
    }


def baseline(world: MPI.Comm, factory: Callable[[Any], Any], steps: int) -> tuple[float, str]:
    """The app on a plain communicator: (loop seconds, slowest rank; fingerprint). Collective."""
    comm = world.Dup()
    app = factory(comm)
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        app.step()
    wall = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    fp = ulfmpy.fingerprint(comm, app.state)
    comm.Free()
    return wall, fp


def protected(world: MPI.Comm, factory: Callable[[Any], Any], steps: int,
              run_dir: str) -> dict[str, Any]:
    """The app under a Runtime at the defaults. Collective."""
    with ulfmpy.Runtime(world, run_dir=run_dir) as rt:
        for _step, app in rt.loop(factory, steps=steps):
            app.step()
        s = rt.summary
    return {"loop_s": s["wall_s"], "fingerprint": s["fingerprint"],
            "segment_length_end": int(s["segment_length"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--app", choices=("stencil", "circuit", "hydro"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--n", type=int, default=1024, help="stencil side")
    p.add_argument("--pieces", type=int, default=24)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--wires", type=int, default=4000)
    p.add_argument("--zones", type=int, default=128)
    args = p.parse_args()
    world = MPI.COMM_WORLD
    # Every trial's Runtime gets a run directory of its own: the keyword must
    # win over the launcher's --run-dir.
    flags = os.environ.get("ULFMPY_FLAGS", "").split(",")
    os.environ["ULFMPY_FLAGS"] = ",".join(f for f in flags if f and f != "run_dir")
    factory = factories(args)[args.app]
    base_dir = world.bcast(tempfile.mkdtemp(prefix="apps-job-") if world.Get_rank() == 0 else None)
    trials: list[dict[str, Any]] = []
    n = 0
    for rnd in range(-1, args.rounds):  # round -1 warms up: not recorded
        for mode in (("baseline", "protected") if rnd % 2 == 0 else ("protected", "baseline")):
            n += 1
            if mode == "baseline":
                wall, fp = baseline(world, factory, args.steps)
                got: dict[str, Any] = {"loop_s": wall, "fingerprint": fp}
            else:
                got = protected(world, factory, args.steps, os.path.join(base_dir, f"t{n}"))
            if rnd >= 0:
                trials.append({"round": rnd, "mode": mode, **got})
    if world.Get_rank() == 0:
        Path(args.out).write_text(json.dumps({
            "app": args.app, "ranks": world.Get_size(), "steps": args.steps,
            "rounds": args.rounds, "trials": trials}, indent=1) + "\n")
        shutil.rmtree(base_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
