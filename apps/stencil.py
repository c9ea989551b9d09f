# Run: ulfmpy run -n 4 apps/stencil.py --nx 512 --ny 512 --steps 200
"""2D heat equation, 5-point Jacobi, on a block decomposition of any rank count.

Fixed boundary values (the top edge is held at 1, the others at 0), a
deterministic initial field computed from global indices, one halo exchange
per step through the communicator the app is given. The kernel works in
preallocated buffers (``out=``), so a step allocates no array memory.

Every cell's update is the same floating-point expression in the same order
(``((N + S) + W + E) * 0.25``) whatever the decomposition, so the fingerprint
of the final field is identical for any rank count.

``--no-resilience`` runs the same kernel on a plain mpi4py communicator with
no ulfmpy machinery: the baseline of every overhead figure.
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

__all__ = ["Heat2D", "process_grid", "split", "main"]

TOP = 1.0


def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """(start, count) of block ``index`` when ``n`` cells split into ``parts`` blocks."""
    base, extra = divmod(n, parts)
    return index * base + min(index, extra), base + (1 if index < extra else 0)


def process_grid(size: int, nx: int, ny: int) -> tuple[int, int]:
    """A px × py process grid for ``size`` ranks minimizing the halo perimeter.

    Computed here, not by MPI topology calls (ULFM does not cover those).
    """
    best: tuple[float, int, int] | None = None
    for px in range(1, size + 1):
        if size % px:
            continue
        py = size // px
        if px > nx or py > ny:
            continue
        cost = px * ny + py * nx  # halo cells exchanged, up to a constant
        if best is None or cost <= best[0]:  # ties: more row blocks (contiguous halos)
            best = (cost, px, py)
    if best is None:
        raise ulfmpy.ConfigError(
            f"a {nx}x{ny} grid cannot be split over {size} ranks; use fewer ranks or a larger grid")
    return best[1], best[2]


def initial_value(i: np.ndarray, j: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """The initial field at global indices (exact in binary: integer pattern / 28)."""
    u = ((i * 7 + j * 13) % 29) / 28.0
    u = np.where((i == nx - 1) | (j == 0) | (j == ny - 1), 0.0, u)
    return np.where(i == 0, TOP, u)


class Heat2D:
    """This rank's block of the heat equation on an ``nx`` × ``ny`` grid.

    Args:
        comm: the communicator (ulfmpy's resilient one, or a plain mpi4py one).
        nx, ny: global grid size, boundary included.
    """

    def __init__(self, comm, nx: int = 512, ny: int = 512) -> None:
        self.comm = comm
        self.nx, self.ny = nx, ny
        rank, size = comm.Get_rank(), comm.Get_size()
        px, py = process_grid(size, nx, ny)
        ci, cj = divmod(rank, py)
        (x0, lx), (y0, ly) = split(nx, px, ci), split(ny, py, cj)
        self.block_start, self.block_shape = (x0, y0), (lx, ly)

        def at(a: int, b: int) -> int:
            return a * py + b if 0 <= a < px and 0 <= b < py else MPI.PROC_NULL

        self.north, self.south = at(ci - 1, cj), at(ci + 1, cj)
        self.west, self.east = at(ci, cj - 1), at(ci, cj + 1)

        self.u = np.zeros((lx + 2, ly + 2))
        gi, gj = np.meshgrid(np.arange(x0, x0 + lx), np.arange(y0, y0 + ly), indexing="ij")
        self.u[1:-1, 1:-1] = initial_value(gi, gj, nx, ny)
        self.state = {"u": Block(self.u[1:-1, 1:-1], (nx, ny), (x0, y0), dims=("x", "y"))}
        # Maximum principle: Jacobi averaging never leaves [min, max] of the data.
        self.bounds = {"u": (0.0, 1.0)}

        # Update region in padded coordinates: global boundary cells stay fixed.
        r0 = 2 if x0 == 0 else 1
        r1 = lx if x0 + lx == nx else lx + 1
        c0 = 2 if y0 == 0 else 1
        c1 = ly if y0 + ly == ny else ly + 1
        u = self.u
        self.tmp = np.empty((max(r1 - r0, 0), max(c1 - c0, 0)))
        self._views = (u[r0 - 1:r1 - 1, c0:c1], u[r0 + 1:r1 + 1, c0:c1],
                       u[r0:r1, c0 - 1:c1 - 1], u[r0:r1, c0 + 1:c1 + 1], u[r0:r1, c0:c1])
        # Halo rows are contiguous views; columns go through packed buffers.
        self._rows = (u[1, 1:-1], u[lx, 1:-1], u[0, 1:-1], u[lx + 1, 1:-1])
        self._send_w, self._send_e = np.empty(lx), np.empty(lx)
        self._recv_w, self._recv_e = np.empty(lx), np.empty(lx)

    def exchange(self) -> None:
        """Fill the halo from the four neighbours (one exchange per step)."""
        comm, u = self.comm, self.u
        first_row, last_row, halo_n, halo_s = self._rows
        comm.Sendrecv(last_row, self.south, 1, halo_n, self.north, 1)
        comm.Sendrecv(first_row, self.north, 2, halo_s, self.south, 2)
        np.copyto(self._send_w, u[1:-1, 1])
        np.copyto(self._send_e, u[1:-1, -2])
        comm.Sendrecv(self._send_e, self.east, 3, self._recv_w, self.west, 3)
        comm.Sendrecv(self._send_w, self.west, 4, self._recv_e, self.east, 4)
        if self.west != MPI.PROC_NULL:
            u[1:-1, 0] = self._recv_w
        if self.east != MPI.PROC_NULL:
            u[1:-1, -1] = self._recv_e

    def compute(self) -> None:
        """One Jacobi sweep of the interior from the current halo."""
        north, south, west, east, centre = self._views
        t = self.tmp
        np.add(north, south, out=t)
        t += west
        t += east
        t *= 0.25
        np.copyto(centre, t)

    def step(self) -> None:
        self.exchange()
        self.compute()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="2D heat equation (5-point Jacobi)")
    p.add_argument("--nx", type=int, default=512, help="global rows (default 512)")
    p.add_argument("--ny", type=int, default=512, help="global columns (default 512)")
    p.add_argument("--steps", type=int, default=200, help="time steps (default 200)")
    p.add_argument("--no-resilience", action="store_true",
                   help="plain mpi4py baseline: no segments, detection or logging")
    p.add_argument("--run-dir", default=None, help="run directory (default: ULFMPY_RUN_DIR or runs/...)")
    p.add_argument("--quiet", action="store_true", help="print only the JSON summary line")
    return p


def _report(summary: dict, nx: int, ny: int, quiet: bool) -> None:
    # A resumed run computed only the steps after its checkpoint in this wall time.
    steps, wall = summary.get("steps_run", summary["steps"]), summary["wall_s"]
    start = summary.get("start_step", 0)
    summary["steps_per_s"] = steps / wall if wall > 0 else float("inf")
    summary["mcells_per_s"] = nx * ny * steps / wall / 1e6 if wall > 0 else float("inf")
    if not quiet:
        what = f"steps {start}..{summary['steps']} ({steps})" if start else f"{steps} steps"
        print(f"stencil: {summary['ranks']} ranks, {nx}x{ny}, {what} in {wall:.3f} s "
              f"({summary['steps_per_s']:.1f} steps/s, {summary['mcells_per_s']:.1f} Mcells/s)"
              f"{'' if summary.get('resilience', True) else ' [no resilience]'}")
        print(f"stencil: fingerprint {summary['fingerprint']}  "
              f"segments {summary.get('segments', 0)}  rollbacks {len(summary.get('rollbacks', []))}")
    print(json.dumps({k: summary[k] for k in ("ranks", "steps", "wall_s", "fingerprint",
                                              "steps_per_s", "mcells_per_s")}))
    sys.stdout.flush()


def baseline(world: MPI.Comm, nx: int, ny: int, steps: int, run_dir: str) -> dict:
    """The kernel on a plain communicator, no ulfmpy: the overhead baseline."""
    comm = world.Dup()
    app = Heat2D(comm, nx, ny)
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        app.step()
    wall = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    fp = ulfmpy.fingerprint(comm, app.state)
    summary = {"ranks": comm.Get_size(), "steps": steps, "wall_s": wall, "fingerprint": fp,
               "resilience": False}
    if comm.Get_rank() == 0:
        from ulfmpy.events import write_json_atomic

        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    comm.Free()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    world = MPI.COMM_WORLD
    plain = args.no_resilience or os.environ.get("ULFMPY_RESILIENCE", "1") in ("0", "false", "no")
    if plain:
        from ulfmpy.launch import default_run_dir

        run_dir = args.run_dir or os.environ.get("ULFMPY_RUN_DIR") or world.bcast(
            default_run_dir() if world.Get_rank() == 0 else None)
        summary = baseline(world, args.nx, args.ny, args.steps, run_dir)
        if world.Get_rank() == 0:
            _report(summary, args.nx, args.ny, args.quiet)
        return 0
    settings = {"run_dir": args.run_dir} if args.run_dir else {}
    with ulfmpy.Runtime(world, **settings) as rt:
        for _step, grid in rt.loop(lambda comm: Heat2D(comm, args.nx, args.ny), steps=args.steps):
            grid.step()
        if rt.rank == 0:
            _report(rt.summary, args.nx, args.ny, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
