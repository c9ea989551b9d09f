# Run: ulfmpy run -n 4 --detect finite,bounds tests/scenarios/apps/ring.py --n 96 --steps 30
"""A test app with an irregular communication pattern (not a halo stencil).

A 1D array of ``--n`` values is split in blocks over the ranks
(``ulfmpy.Block``). Each step every rank

1. swaps its end values with its ring neighbours (``Isend``/``Irecv``,
   completed with ``comm.Waitall``);
2. swaps a few values with a seeded-random partner ``rank ± off`` where
   ``off`` is drawn each step from a generator every rank seeds alike
   (``Isend``/``Irecv`` completed with each request's ``Wait`` on even
   steps, lowercase ``isend``/``irecv`` of a list on odd ones);
3. passes a Python object one hop around the ring (lowercase ``sendrecv``);
4. reduces the block sums (``Allreduce``) and maxima (lowercase
   ``allreduce``), gathers every block's first value (``Allgather``), every
   4th step broadcasts a value from a rotating root (lowercase ``bcast``),
   every 5th a small array (``Bcast``), and every 3rd step waits at a
   ``Barrier``;

and the new values are a convex combination of all of it plus a
deterministic source, so they stay in [0, 1) (``bounds``). Corruption
anywhere reaches the ``Allreduce`` at the next step; collective results pass
a limiter, so corruption reaches the other ranks without tripping their
detectors (only the contribution digest reveals it). Bit-exact for a given
rank count; ``--no-resilience`` runs the same kernel on a plain communicator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import ulfmpy
from ulfmpy.state import Block

PARTNER_VALUES = 4
TAG_TO_LEFT, TAG_TO_RIGHT, TAG_PARTNER, TAG_OBJ = 11, 12, 13, 14


def split(n: int, parts: int, index: int) -> tuple[int, int]:
    base, extra = divmod(n, parts)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


class Ring:
    """This rank's block of the ring app.

    Args:
        comm: ulfmpy's resilient communicator or a plain mpi4py one.
        n: global array length (at least 2 values per rank).
        seed: seed of the partner choice and the source term.
    """

    def __init__(self, comm, n: int = 96, seed: int = 7) -> None:
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        if n < 2 * self.size:
            raise ulfmpy.ConfigError(f"--n {n} is too small for {self.size} ranks")
        self.n, self.seed = n, seed
        start, count = split(n, self.size, self.rank)
        self.left = (self.rank - 1) % self.size
        self.right = (self.rank + 1) % self.size
        self.xp = np.zeros(count + 2)  # one ghost value each side
        gi = np.arange(start, start + count)
        self.xp[1:-1] = ((gi * 17 + 5) % 31) / 32.0  # exact binary fractions in [0, 1)
        self.x = self.xp[1:-1]
        self.carry = np.array(((self.rank * 5) % 7) / 8.0)  # per-rank scalar state
        self.state = {"x": Block(self.x, (n,), (start,)), "carry": self.carry}
        self.bounds = {"x": (0.0, 1.0), "carry": (0.0, 1.0)}
        self._send_part = np.empty(PARTNER_VALUES)
        self._recv_part = np.empty(PARTNER_VALUES)
        self._sums = np.empty(1)
        self._gsums = np.empty(1)
        self._firsts = np.empty(self.size)
        self._bc = np.empty(2)
        self._gi = gi
        # Plain mpi4py communicators have no Waitall; ulfmpy's must be used for its requests.
        self._waitall = getattr(comm, "Waitall", None) or MPI.Request.Waitall

    def step(self, step: int) -> None:
        comm, xp, x = self.comm, self.xp, self.x
        # 1. ring neighbours: ghost cells, nonblocking.
        reqs = [comm.Irecv(xp[-1:], self.right, TAG_TO_LEFT),
                comm.Irecv(xp[:1], self.left, TAG_TO_RIGHT),
                comm.Isend(x[:1], self.left, TAG_TO_LEFT),
                comm.Isend(x[-1:], self.right, TAG_TO_RIGHT)]
        self._waitall(reqs)
        # 2. a seeded-random partner, the same draw on every rank.
        rng = np.random.default_rng([self.seed, step])
        off = int(rng.integers(1, self.size)) if self.size > 1 else 0
        pos = rng.integers(0, 1 << 30, PARTNER_VALUES) % x.size
        pmix = 0.0
        if off and step % 2 == 0:
            np.take(x, pos, out=self._send_part)
            rr = comm.Irecv(self._recv_part, (self.rank - off) % self.size, TAG_PARTNER)
            sr = comm.Isend(self._send_part, (self.rank + off) % self.size, TAG_PARTNER)
            rr.Wait()
            sr.Wait()
            pmix = float(self._recv_part.sum()) / PARTNER_VALUES
        elif off:
            rr = comm.irecv(source=(self.rank - off) % self.size, tag=TAG_PARTNER)
            sr = comm.isend([float(v) for v in x[pos]], (self.rank + off) % self.size, TAG_PARTNER)
            pmix = sum(rr.wait()) / PARTNER_VALUES
            sr.wait()
        # 3. a Python object one hop to the right.
        got = comm.sendrecv({"step": step, "v": float(x[x.size // 2])}, dest=self.right,
                            sendtag=TAG_OBJ, source=self.left, recvtag=TAG_OBJ)
        # 4. collectives. The limiters (min with 1) never act in a correct run
        # (values stay below 1); they let corruption cross a collective
        # *silently*: the other ranks' values change but stay in bounds, so
        # only the contribution digest can tell them to re-execute.
        self._sums[0] = x.sum()
        comm.Allreduce(self._sums, self._gsums, op=MPI.SUM)
        mean = min(float(self._gsums[0]) / self.n, 1.0)
        gmax = min(comm.allreduce(float(x.max()), op=MPI.MAX), 1.0)
        comm.Allgather(x[:1], self._firsts)
        firsts = min(float(self._firsts.sum()) / self.size, 1.0)
        if step % 4 == 0:
            root = step % self.size
            b = comm.bcast(float(self.carry) if self.rank == root else None, root=root)
        else:
            b = float(self.carry)
        if step % 5 == 0:
            root = (step // 5) % self.size
            if self.rank == root:
                np.copyto(self._bc, x[:2])
            comm.Bcast(self._bc, root=root)
            bc = min(float(self._bc.max()), 1.0)
        else:
            bc = mean
        if step % 3 == 0:
            comm.Barrier()
        # New values: convex combinations of values in [0, 1), so they stay there.
        src = ((self._gi * 3 + step * 11) % 17) / 34.0  # in [0, 0.5)
        avg3 = (xp[:-2] + xp[1:-1] + xp[2:]) / 3.0
        new = 0.5 * avg3 + 0.2 * pmix + 0.1 * mean + 0.1 * float(self.carry) + 0.1 * src
        np.copyto(x, new)
        self.carry[...] = (0.25 * got["v"] + 0.125 * gmax + 0.25 * b + 0.125 * mean
                           + 0.125 * firsts + 0.125 * bc)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="ring + random-partner test app")
    p.add_argument("--n", type=int, default=96, help="global array length (default 96)")
    p.add_argument("--steps", type=int, default=30, help="time steps (default 30)")
    p.add_argument("--seed", type=int, default=7, help="seed of the communication pattern")
    p.add_argument("--no-resilience", action="store_true", help="plain mpi4py baseline")
    p.add_argument("--run-dir", default=None, help="run directory (default: ULFMPY_RUN_DIR)")
    p.add_argument("--quiet", action="store_true", help="accepted for symmetry with the stencil")
    return p


def _print(summary: dict) -> None:
    print(json.dumps({k: summary[k] for k in ("ranks", "steps", "wall_s", "fingerprint")}))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    world = MPI.COMM_WORLD
    plain = args.no_resilience or os.environ.get("ULFMPY_RESILIENCE", "1") in ("0", "false", "no")
    run_dir = args.run_dir or os.environ.get("ULFMPY_RUN_DIR")
    if plain:
        comm = world.Dup()
        app = Ring(comm, args.n, args.seed)
        t0 = time.perf_counter()
        for step in range(args.steps):
            app.step(step)
        wall = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        fp = ulfmpy.fingerprint(comm, app.state)
        summary = {"ranks": comm.Get_size(), "steps": args.steps, "wall_s": wall,
                   "fingerprint": fp, "resilience": False}
        if comm.Get_rank() == 0:
            from ulfmpy.events import write_json_atomic

            if run_dir:
                os.makedirs(run_dir, exist_ok=True)
                write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
            _print(summary)
        comm.Free()
        return 0
    settings = {"run_dir": run_dir} if run_dir else {}
    with ulfmpy.Runtime(world, **settings) as rt:
        for step, app in rt.loop(lambda comm: Ring(comm, args.n, args.seed), steps=args.steps):
            app.step(step)
        if rt.rank == 0:
            _print(rt.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
