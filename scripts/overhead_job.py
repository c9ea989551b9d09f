# Run: ulfmpy run -n 4 -- scripts/overhead_job.py --out times.json [--steps 1000] [--rounds 8] [--k 0,1,5,10,50]
#      (where the default's cost goes: --k 0,0:nolog,0:raw)
"""One MPI job that alternates the plain stencil and the protected one (bench_segments (a)).

Separate launches differ by more than the overhead being measured (where
the pages land, which cores the ranks get, what else runs), so the baseline
and every segment length run inside the same job, round after round, in
alternating order, after one warm-up round that is not recorded. Each
trial is a fresh kernel on a fresh communicator:

- ``baseline``: ``apps.stencil.baseline`` (the ``--no-resilience`` mode):
  the kernel on a duplicate of COMM_WORLD, no ulfmpy at all; loop time
  from a barrier to the slowest rank's end.
- ``k=K``: a fresh ``ulfmpy.Runtime`` (``segment_steps=K``, 0 = auto) and
  ``rt.loop``; loop time is the summary's ``wall_s`` (first snapshot to the
  last commit, slowest rank), so neither side pays for start-up.
- ``k=K:nolog`` and ``k=K:raw`` take the protected loop apart (benchmark
  only: such segments could not be replayed). ``nolog``: the resilient
  communicator with its receive log switched off. ``raw``: the app talks
  to the runtime's plain communicator, so only the segment boundaries
  (snapshot, detectors, agreement) remain.

Rank 0 writes every trial's loop time and fingerprint to ``--out`` (JSON).
Collective over COMM_WORLD.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from mpi4py import MPI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ulfmpy  # noqa: E402
from ulfmpy.comm import MessageLog, ResilientComm  # noqa: E402
from apps.stencil import Heat2D, baseline  # noqa: E402


KEEP = MessageLog.keep


def protected(world: MPI.Comm, nx: int, ny: int, steps: int, k: int, run_dir: str,
              part: str = "") -> tuple[float, str, int]:
    def factory(comm: ResilientComm) -> Heat2D:
        return Heat2D(comm.mpi_comm if part == "raw" else comm, nx, ny)

    # Without keep no channel is ever made, so Sendrecv's inlined copy never runs either.
    MessageLog.keep = (lambda *_: None) if part == "nolog" else KEEP  # type: ignore[method-assign]
    try:
        with ulfmpy.Runtime(world, run_dir=run_dir, segment_steps=k) as rt:
            for _step, grid in rt.loop(factory, steps=steps):
                grid.step()
            s = rt.summary
    finally:
        MessageLog.keep = KEEP  # type: ignore[method-assign]
    return s["wall_s"], s["fingerprint"], int(s["segment_length"])


def _case(text: str) -> tuple[int, str]:
    k, _, part = text.partition(":")
    if part not in ("", "nolog", "raw"):
        raise SystemExit(f"overhead_job: --k {text!r}: the part after ':' must be nolog or raw")
    return int(k), part


def round_order(cases: list[Any], rnd: int) -> list[Any]:
    """The order of ``cases`` in round ``rnd``: rotated by one place each
    round, and every other cycle of rotations backwards. Over ``2 *
    len(cases)`` rounds every case runs in every place equally often, half
    the time forwards and half backwards, so none is always first or always
    after the same one. Pure."""
    n = len(cases)
    shift = rnd % n
    order = cases[shift:] + cases[:shift]
    return order[::-1] if (rnd // n) % 2 else order


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--nx", type=int, default=1024)
    p.add_argument("--ny", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--k", default="0,1,5,10,50",
                   help="segment lengths, 0 = auto (the default); K:nolog or K:raw for the parts")
    args = p.parse_args()
    world = MPI.COMM_WORLD
    ks = [_case(x) for x in args.k.split(",")]
    base_dir = world.bcast(tempfile.mkdtemp(prefix="overhead-") if world.Get_rank() == 0 else None)
    trials: list[dict[str, object]] = []
    n = 0
    # Round -1 is a warm-up, not recorded: each side's first trial pays
    # one-time costs the loop times are meant to exclude (first-touch page
    # faults, imports, the node's respawn zygote preloading at nice 10 beside
    # the first protected loop).
    for rnd in range(-1, args.rounds):
        for case in round_order([None, *ks], rnd):
            n += 1
            if case is None:
                base = baseline(world, args.nx, args.ny, args.steps, os.path.join(base_dir, f"t{n}"))
                wall, fp = base["wall_s"], base["fingerprint"]
                if rnd >= 0:
                    trials.append({"round": rnd, "mode": "baseline", "loop_s": wall,
                                   "fingerprint": fp})
            else:
                k, part = case
                wall, fp, k_end = protected(world, args.nx, args.ny, args.steps, k,
                                            os.path.join(base_dir, f"t{n}"), part)
                if rnd >= 0:
                    trials.append({"round": rnd, "mode": f"k={k}" + (f":{part}" if part else ""),
                                   "segment_steps": k, "segment_length_end": k_end,
                                   "loop_s": wall, "fingerprint": fp})
    if world.Get_rank() == 0:
        Path(args.out).write_text(json.dumps({
            "ranks": world.Get_size(), "nx": args.nx, "ny": args.ny, "steps": args.steps,
            "rounds": args.rounds, "trials": trials}, indent=1) + "\n")
        import shutil

        shutil.rmtree(base_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
