# Run: ulfmpy run -n 4 -- scripts/overhead_job.py --out times.json [--steps 1000] [--rounds 8] [--k 0,1,5,10,50]
#      (where the default's cost goes: --k 0,0:nolog,0:raw)
#      (the default with global checkpoints every 100 steps: --k 0:ckpt100)
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
- ``k=K:ckptN``: the protected loop with global checkpoints every N steps
  (``ckpt_every=N``, the runtime's default checkpoint settings). The trial
  also records each checkpoint's step and the loop time spent in saves:
  per checkpoint its ``exposed_s`` (the time the rank was held in the
  save), summed over the run's checkpoints, the slowest rank's sum (only
  rank 0's summary lists them today). The trial's checkpoint directory is
  removed after it: the next trial starts on an empty disk.

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
from pathlib import Path
from typing import Any

from mpi4py import MPI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ulfmpy  # noqa: E402
from ulfmpy.comm import MessageLog, ResilientComm  # noqa: E402
from apps.stencil import Heat2D, baseline  # noqa: E402


KEEP = MessageLog.keep


def checkpoint_times(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What one rank's ``summary["checkpoints"]`` says about the saves.

    ``records`` are the summary's checkpoint dicts (``step``, ``exposed_s``,
    ``write_s``, ``bytes``, ``committed``; empty on ranks that do not hold
    them). Returns the steps saved at (oldest first), how many committed,
    and the sums of ``exposed_s`` (the loop time spent in saves) and of
    ``write_s`` (None where a write never finished). Pure.
    """
    return {"steps": [int(r["step"]) for r in records],
            "committed": sum(1 for r in records if r.get("committed")),
            "exposed_s": float(sum(float(r.get("exposed_s") or 0.0) for r in records)),
            "write_s": float(sum(float(r["write_s"]) for r in records
                                 if r.get("write_s") is not None))}


def protected(world: MPI.Comm, nx: int, ny: int, steps: int, k: int, run_dir: str,
              part: str = "", ckpt_every: int = 0) -> dict[str, Any]:
    """One protected trial: its loop time, fingerprint and final segment
    length and, with ``ckpt_every``, its checkpoints. Collective."""
    def factory(comm: ResilientComm) -> Heat2D:
        return Heat2D(comm.mpi_comm if part == "raw" else comm, nx, ny)

    settings: dict[str, Any] = {"ckpt_every": ckpt_every} if ckpt_every else {}
    # Without keep no channel is ever made, so Sendrecv's inlined copy never runs either.
    MessageLog.keep = (lambda *_: None) if part == "nolog" else KEEP  # type: ignore[method-assign]
    try:
        with ulfmpy.Runtime(world, run_dir=run_dir, segment_steps=k, **settings) as rt:
            for _step, grid in rt.loop(factory, steps=steps):
                grid.step()
            s = rt.summary
    finally:
        MessageLog.keep = KEEP  # type: ignore[method-assign]
    out: dict[str, Any] = {"loop_s": s["wall_s"], "fingerprint": s["fingerprint"],
                           "segment_length_end": int(s["segment_length"])}
    if ckpt_every:
        # The exposed save time includes the partner copy (the save stages each
        # rank's state in its holder's memory).
        mine = checkpoint_times(list(s.get("checkpoints") or []))
        # Rank 0 holds the list; should every rank hold its own, the slowest counts.
        held = world.allgather(mine if mine["steps"] else None)
        ref = next((h for h in held if h is not None), mine)
        out.update({"ckpt_every": ckpt_every, "checkpoint_steps": ref["steps"],
                    "checkpoints_committed": ref["committed"],
                    # exposed save time (partner copy included), the slowest rank's
                    "saves_s": max((h["exposed_s"] for h in held if h is not None), default=0.0),
                    "writes_s": max((h["write_s"] for h in held if h is not None), default=0.0)})
        # ~8 MB per rank per checkpoint: do not let the rounds pile them up.
        world.Barrier()
        if world.Get_rank() == 0:
            shutil.rmtree(os.path.join(run_dir, "ckpt"), ignore_errors=True)
    return out


def _case(text: str) -> tuple[int, str, int]:
    """``K``, ``K:nolog``, ``K:raw`` or ``K:ckptN`` as (K, part, ckpt_every)."""
    k, _, part = text.partition(":")
    ckpt = 0
    if part.startswith("ckpt"):
        try:
            ckpt = int(part[4:])
        except ValueError:
            ckpt = 0
        if ckpt < 1:
            raise SystemExit(f"overhead_job: --k {text!r}: ckptN needs a checkpoint interval N >= 1")
    elif part not in ("", "nolog", "raw"):
        raise SystemExit(f"overhead_job: --k {text!r}: the part after ':' must be nolog, raw "
                         "or ckptN")
    return int(k), part, ckpt


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
                   help="segment lengths, 0 = auto (the default); K:nolog or K:raw for the "
                        "parts; K:ckptN with global checkpoints every N steps")
    args = p.parse_args()
    world = MPI.COMM_WORLD
    # Every trial's Runtime gets a run directory of its own (below): here the
    # keyword must win over the launcher's --run-dir, which would otherwise
    # put every trial's events and checkpoints in one directory.
    flags = os.environ.get("ULFMPY_FLAGS", "").split(",")
    os.environ["ULFMPY_FLAGS"] = ",".join(f for f in flags if f and f != "run_dir")
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
                k, part, ckpt = case
                got = protected(world, args.nx, args.ny, args.steps, k,
                                os.path.join(base_dir, f"t{n}"), part, ckpt)
                if rnd >= 0:
                    trials.append({"round": rnd, "mode": f"k={k}" + (f":{part}" if part else ""),
                                   "segment_steps": k, **got})
    if world.Get_rank() == 0:
        Path(args.out).write_text(json.dumps({
            "ranks": world.Get_size(), "nx": args.nx, "ny": args.ny, "steps": args.steps,
            "rounds": args.rounds, "trials": trials}, indent=1) + "\n")
        shutil.rmtree(base_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
