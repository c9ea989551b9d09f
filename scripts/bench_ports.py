# Run: ulfmpy run -n 4 scripts/bench_ports.py --out bench_ports.json [--n 512] [--steps 300] [--rounds 6]
"""The course-style heat solver (apps/tutorials) plain against protected, in one job.

Two figures for the port of ``heat2d_plain.py`` (Create_cart, subarray
datatypes for rows and columns, ``MPI.Request.Waitall``, a buffer swap):

- **Fault-free overhead at the default segment length.** Plain and
  protected trials alternate inside one MPI job, round after round, after a
  warm-up round that is not recorded (separate launches differ by more than
  the overhead). Plain: ``Heat2D`` of ``heat2d_plain.py`` on a duplicate of
  COMM_WORLD, loop time from a barrier to the slowest rank's end.
  Protected: ``heat2d.py``'s ``Heat2D`` under a fresh ``ulfmpy.Runtime``
  and ``rt.loop``, loop time the summary's ``wall_s``. Both give the same
  field (the checksum is compared).
- **Logged bytes per step against the bytes on the wire.** One step on a
  resilient communicator in a live segment: what its message log holds,
  against the bytes the receive datatypes select (the halo) and against
  what logging each receive's whole array would hold (the old rule).

Rank 0 writes the JSON. Collective over COMM_WORLD.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mpi4py import MPI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ulfmpy  # noqa: E402
from ulfmpy.comm import ResilientComm  # noqa: E402


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "apps" / "tutorials" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PLAIN, PORT = _module("heat2d_plain"), _module("heat2d")


def field_digest(heat) -> str | None:
    blocks = heat.cart.gather((heat.x0, heat.y0, heat.u[1:-1, 1:-1].copy()), root=0)
    if blocks is None:
        return None
    import numpy as np

    field = np.zeros((heat.n, heat.n))
    for x0, y0, b in blocks:
        field[x0:x0 + b.shape[0], y0:y0 + b.shape[1]] = b
    return hashlib.sha256(field.tobytes()).hexdigest()[:16]


def plain(world: MPI.Comm, n: int, steps: int) -> tuple[float, str | None]:
    comm = world.Dup()
    heat = PLAIN.Heat2D(comm, n)
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        heat.step()
    t = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    digest = field_digest(heat)
    heat.cart.Free()
    comm.Free()
    return t, digest


def protected(world: MPI.Comm, n: int, steps: int, run_dir: str) -> tuple[float, str | None, int]:
    with ulfmpy.Runtime(world, run_dir=run_dir) as rt:
        for _, heat in rt.loop(lambda comm: PORT.Heat2D(comm, n), steps=steps):
            heat.step()
        s = rt.summary
        digest = field_digest(heat)
    wall = world.bcast(s["wall_s"] if world.Get_rank() == 0 else None, root=0)
    return wall, digest, int(world.bcast(s["segment_length"] if world.Get_rank() == 0 else 0))


def logged_bytes(world: MPI.Comm, n: int) -> dict[str, int]:
    base = world.Dup()
    base.Set_errhandler(MPI.ERRORS_RETURN)
    replay = base.Dup()
    rc = ResilientComm(base)
    rc.open_contexts(replay)
    heat = PORT.Heat2D(rc, n)
    rc.begin_segment()
    heat.step()
    rc.Barrier()
    logged = rc.log_bytes
    rc.end_segment()
    peers = {"up": heat.up, "down": heat.down, "left": heat.left, "right": heat.right}
    wire = sum(heat.recv[s].Get_size() for s, p in peers.items() if p != MPI.PROC_NULL)
    whole = sum(heat.u.nbytes for p in peers.values() if p != MPI.PROC_NULL)
    state = heat.u[1:-1, 1:-1].nbytes
    tot = [sum(x[i] for x in base.allgather((logged, wire, whole, state))) for i in range(4)]
    return {"logged_bytes_per_step": tot[0], "halo_bytes_per_step": tot[1],
            "whole_array_bytes_per_step": tot[2], "state_bytes": tot[3]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    world = MPI.COMM_WORLD
    flags = os.environ.get("ULFMPY_FLAGS", "").split(",")
    os.environ["ULFMPY_FLAGS"] = ",".join(f for f in flags if f and f != "run_dir")
    tmp = world.bcast(tempfile.mkdtemp(prefix="ports-") if world.Get_rank() == 0 else None)
    trials = []
    for rnd in range(-1, args.rounds):
        order = ("plain", "protected") if rnd % 2 == 0 else ("protected", "plain")
        for mode in order:
            if mode == "plain":
                t, digest = plain(world, args.n, args.steps)
                k = None
            else:
                t, digest, k = protected(world, args.n, args.steps, os.path.join(tmp, f"r{rnd}"))
            if rnd >= 0:
                trials.append({"round": rnd, "mode": mode, "loop_s": t, "checksum": digest,
                               "segment_length_end": k})
    sizes = logged_bytes(world, args.n)
    if world.Get_rank() == 0:
        ratios = []
        for rnd in range(args.rounds):
            by = {t["mode"]: t for t in trials if t["round"] == rnd}
            ratios.append(by["protected"]["loop_s"] / by["plain"]["loop_s"])
        same = len({t["checksum"] for t in trials}) == 1
        out = {"ranks": world.Get_size(), "n": args.n, "steps": args.steps,
               "rounds": args.rounds, "trials": trials, "overhead_ratios": ratios,
               "overhead_median": statistics.median(ratios), "same_result": same, **sizes}
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps({k: v for k, v in out.items() if k != "trials"}, indent=1))
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
