# Run: ulfmpy run -n 4 apps/hydro.py --zones 128 --steps 400
"""Lagrangian staggered-grid hydrodynamics on an unstructured quad mesh, in the spirit of Pennant.

The mesh is generated (a quarter annulus cut into ``--zones`` rings of
``--zones`` sectors, :func:`make_mesh`) and then held as a general
unstructured mesh: point coordinates, and for each zone its four points
counter-clockwise; a zone's sides run between consecutive points, its
corners sit at them. The problem is the Sedov blast: an ideal gas (gamma
1.4) at rest with density 1, and energy ``--energy`` in the innermost ring,
reflecting walls along the axes, the inner and outer rings held fixed (the
quarter of the full blast, which holds four times the energy; the shock
radius follows :func:`sedov_radius`).

A step, with the velocities ``u`` and positions ``x`` at points, the
internal energy ``e`` of each zone, and each zone's constant mass:

1. ghost points: each point has one owner rank; ranks whose zones use it
   get its position and velocity (a neighbour exchange);
2. the time step: every rank's stability limit (CFL on sound speed plus
   artificial viscosity), then one ``Allreduce`` (MIN): the global step;
3. forces at the half-step positions: pressure (ideal gas) times each
   corner's median surface vector, plus an artificial (edge) viscosity on
   the zones' closing edges;
4. the corner forces go to the points' owners (a neighbour exchange); an
   owner sums a point's corner forces in the order of the zones' global
   numbers, whichever rank computed them, so the sum is the same for any
   decomposition; reflecting walls; new velocities and positions;
5. the new velocities go back to the ranks using the points (an exchange);
   each zone's internal energy changes by the work of its corner forces
   (the compatible update: total energy is conserved to rounding);
6. the total energy (``Allreduce`` SUM), checked by the app's ``invariant``.

Zones and points are split over the ranks in contiguous runs of their global
numbers; the state (point positions and velocities, zone energies, and the
simulation time on rank 0) is ``ulfmpy.Block``s of the global arrays, so a
shrink or a resume on another rank count restores it N→M, and the
fingerprint is the same on any number of ranks.

``--no-resilience`` runs the same kernels on a plain mpi4py communicator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

import ulfmpy
from ulfmpy.state import Block

__all__ = ["Hydro", "HydroSpec", "make_mesh", "span", "sedov_radius", "main"]

GAMMA = 1.4
CFL = 0.25
Q_QUAD, Q_LIN = 1.0, 0.5   # edge viscosity: quadratic and linear coefficients
ENERGY_TOL = 1e-6          # invariant: relative change of the total energy
HOLE = 0.05                # the inner radius of the mesh, as a fraction of its outer one
_TAG_PT, _TAG_F, _TAG_U = 41, 42, 43


@dataclass(frozen=True)
class HydroSpec:
    """The global problem: the same on every rank and any rank count."""

    zones: int = 128         # rings and sectors (zones per side)
    size: float = 1.2        # side of the square domain
    energy: float = 0.25     # deposited in the origin zone (a quarter of the blast)
    rho: float = 1.0


def make_mesh(spec: HydroSpec) -> tuple[np.ndarray, np.ndarray]:
    """The mesh as unstructured data: point coordinates (P, 2) and zone points (Z, 4). Pure.

    A quarter annulus ``HOLE * size <= r <= size``, ``0 <= theta <= pi/2``,
    cut into ``zones`` rings of ``zones`` sectors, numbered ring by ring
    from the inside: a mesh that follows the blast, so points move along
    rays and the walls (the axes) stay straight.
    """
    n = spec.zones
    r = spec.size * (HOLE + (1.0 - HOLE) * np.arange(n + 1) / n)
    theta = 0.5 * np.pi * np.arange(n + 1) / n
    ri, tj = np.meshgrid(r, theta, indexing="ij")          # point (i, j) = i * (n + 1) + j
    px = np.stack([ri * np.cos(tj), ri * np.sin(tj)], axis=-1).reshape(-1, 2)
    px[np.arange(n + 1) * (n + 1), 1] = 0.0                # exactly on the walls
    px[np.arange(n + 1) * (n + 1) + n, 0] = 0.0
    zi, zj = np.divmod(np.arange(n * n), n)
    p0 = zi * (n + 1) + zj
    zp = np.stack([p0, p0 + n + 1, p0 + n + 2, p0 + 1], axis=1).astype(np.int64)  # CCW
    return px, zp


def span(count: int, size: int, rank: int) -> tuple[int, int]:
    """The contiguous run ``[first, last)`` of ``count`` items rank ``rank`` of ``size`` owns."""
    return count * rank // size, count * (rank + 1) // size


def sedov_radius(energy_full: float, rho: float, t: float, xi0: float = 1.004) -> float:
    """The cylindrical Sedov shock radius ``xi0 (E t^2 / rho)^(1/4)`` (gamma 1.4). Pure."""
    return xi0 * (energy_full * t * t / rho) ** 0.25


def _rot_cw(v: np.ndarray) -> np.ndarray:
    """(x, y) -> (y, -x): the outward normal of a counter-clockwise edge."""
    return np.stack([v[..., 1], -v[..., 0]], axis=-1)


class Hydro:
    """This rank's zones and points of the mesh, stepped through ``comm``.

    Args:
        comm: the communicator (ulfmpy's resilient one, or a plain mpi4py one).
        spec: the global problem.
    """

    def __init__(self, comm, spec: HydroSpec) -> None:
        self.comm, self.spec = comm, spec
        rank, size = comm.Get_rank(), comm.Get_size()
        px_all, zp_all = make_mesh(spec)
        n_pts, n_zones = len(px_all), len(zp_all)
        if n_zones < size:
            raise ulfmpy.ConfigError(f"{n_zones} zones cannot be split over {size} ranks; "
                                     "use a larger --zones")
        self.z0, z1 = span(n_zones, size, rank)
        self.p0, p1 = span(n_pts, size, rank)
        pt_owner = np.searchsorted([span(n_pts, size, q)[1] for q in range(size)],
                                   np.arange(n_pts), side="right")
        zone_owner = np.searchsorted([span(n_zones, size, q)[1] for q in range(size)],
                                     np.arange(n_zones), side="right")
        own_p = p1 - self.p0

        # Zone masses and point masses (a quarter of each zone's), from the
        # initial mesh: every rank computes the same values.
        area_all = self._areas(px_all, zp_all)
        zm_all = spec.rho * area_all
        order = np.lexsort((np.repeat(np.arange(n_zones), 4), zp_all.ravel()))  # by (point, zone)
        corner_pt = zp_all.ravel()[order]
        corner_zone = np.repeat(np.arange(n_zones), 4)[order]
        corner_k = np.tile(np.arange(4), n_zones)[order]
        first = np.searchsorted(corner_pt, np.arange(n_pts))
        count = np.bincount(corner_pt, minlength=n_pts)
        rank_in_point = np.arange(len(corner_pt)) - first[corner_pt]  # 0..3: the canonical slot
        mass_slots = np.zeros((n_pts, 4))
        mass_slots[corner_pt, rank_in_point] = zm_all[corner_zone] * 0.25
        pm_all = ((mass_slots[:, 0] + mass_slots[:, 1]) + mass_slots[:, 2]) + mass_slots[:, 3]

        # Local points: owned first, then ghosts (points of my zones owned elsewhere).
        my_zp = zp_all[self.z0:z1]
        used = np.unique(my_zp)
        ghosts = used[(used < self.p0) | (used >= p1)]
        self.n_own, self.n_ghost = own_p, len(ghosts)
        local_of = np.full(n_pts, -1, np.int64)
        local_of[self.p0:p1] = np.arange(own_p)
        local_of[ghosts] = own_p + np.arange(len(ghosts))
        self.zp = local_of[my_zp]                        # (nz, 4) local point numbers
        self.pm = pm_all[self.p0:p1]
        self.zm = zm_all[self.z0:z1]

        # Ghost exchange: who sends me which points, whom I send mine (from global data).
        self.recv_pts = {int(q): local_of[ghosts[pt_owner[ghosts] == q]]
                         for q in np.unique(pt_owner[ghosts])}
        self.send_pts: dict[int, np.ndarray] = {}
        for q in range(size):
            if q == rank:
                continue
            qz0, qz1 = span(n_zones, size, q)
            theirs = np.unique(zp_all[qz0:qz1])
            mine = theirs[(theirs >= self.p0) & (theirs < p1)]
            if len(mine):
                self.send_pts[q] = mine - self.p0

        # Corner forces to owners: every corner of a point, in the canonical
        # order (by global zone number), as a slot of the point's sum.
        is_mine_zone = (corner_zone >= self.z0) & (corner_zone < z1)
        own_pt = (corner_pt >= self.p0) & (corner_pt < p1)
        # What I send to q: my corners whose point q owns, in (point, zone) order.
        self.send_f = {}
        for q in self.recv_pts:
            sel = is_mine_zone & (pt_owner[corner_pt] == q)
            self.send_f[q] = (corner_zone[sel] - self.z0) * 4 + corner_k[sel]
        # Where each corner force of my points comes from: row of a source
        # array [my corners (nz*4) | each neighbour's corners | a zero row].
        nz = z1 - self.z0
        src_rows = np.full(len(corner_pt), -1, np.int64)
        src_rows[is_mine_zone] = (corner_zone[is_mine_zone] - self.z0) * 4 + corner_k[is_mine_zone]
        base = nz * 4
        self.recv_f: dict[int, int] = {}
        self.recv_f_slices = {}
        for q in sorted(self.send_pts):
            sel = own_pt & (zone_owner[corner_zone] == q)
            n = int(sel.sum())
            src_rows[sel] = base + np.arange(n)
            self.recv_f_slices[q] = slice(base, base + n)
            base += n
        zero_row = base
        slots = np.full((own_p, 4), zero_row, np.int64)
        sel = own_pt
        slots[corner_pt[sel] - self.p0, rank_in_point[sel]] = src_rows[sel]
        if np.any(slots == -1):
            raise AssertionError("a corner of an owned point has no source")
        self.slots = slots
        self._src = np.zeros((zero_row + 1, 2))

        # Boundary: reflecting walls along the axes (a point on one keeps its
        # normal velocity 0); the inner and outer rings are fixed.
        n = spec.zones
        ring, sector = np.divmod(np.arange(self.p0, p1), n + 1)
        fixed = (ring == 0) | (ring == n)
        self.wall_x = fixed | (sector == n)               # u_x = 0: on the y axis
        self.wall_y = fixed | (sector == 0)               # u_y = 0: on the x axis
        pts = px_all[self.p0:p1]

        # State: owned point positions and velocities, zone energies, time (rank 0).
        self.x = np.zeros((own_p + self.n_ghost, 2))
        self.x[:own_p] = pts
        self.u = np.zeros_like(self.x)
        self.ze = np.zeros(nz)
        inner = np.arange(self.z0, z1) < n                  # the innermost ring holds the energy
        self.ze[inner] = spec.energy / n
        self.t = np.zeros(1 if rank == 0 else 0)
        self.state = {
            "x": Block(self.x[:own_p], (n_pts, 2), (self.p0, 0)),
            "u": Block(self.u[:own_p], (n_pts, 2), (self.p0, 0)),
            "ze": Block(self.ze, (n_zones,), (self.z0,)),
            "t": Block(self.t, (1,), (0 if rank == 0 else 1,)),
        }
        self.bounds = {"ze": (0.0, 1e30)}  # internal energy stays positive
        self.energy0 = spec.energy  # the fluid starts at rest
        self.energy = spec.energy
        self.local_energy = self._local_energy()
        self.dt = 0.0
        self.min_volume = float(area_all.min())
        self._buf_pt = {q: np.empty((len(i), 4)) for q, i in self.recv_pts.items()}
        self._send_pt = {q: np.empty((len(i), 4)) for q, i in self.send_pts.items()}
        self._buf_u = {q: np.empty((len(i), 2)) for q, i in self.recv_pts.items()}
        self._send_u = {q: np.empty((len(i), 2)) for q, i in self.send_pts.items()}
        self._send_fb = {q: np.empty((len(i), 2)) for q, i in self.send_f.items()}
        self._red = np.zeros(1)
        self._out = np.zeros(1)

    # -- geometry -------------------------------------------------------------------
    @staticmethod
    def _areas(x: np.ndarray, zp: np.ndarray) -> np.ndarray:
        """Zone areas by the shoelace formula over each zone's four points."""
        p = x[zp]                                      # (nz, 4, 2)
        q = np.roll(p, -1, axis=1)
        return 0.5 * (p[..., 0] * q[..., 1] - q[..., 0] * p[..., 1]).sum(axis=1)

    def _surfaces(self, x: np.ndarray) -> np.ndarray:
        """Each corner's median surface vector: half the outward normal of the
        segment from the previous point to the next one."""
        p = x[self.zp]
        return 0.5 * _rot_cw(np.roll(p, -1, axis=1) - np.roll(p, 1, axis=1))

    def _forces(self, x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, ...]:
        """At positions ``x`` and velocities ``u``: each corner's force, and per
        zone the volume, the smallest edge and the signal speed (sound plus
        the edges' closing speed).

        A corner's force is the zone's pressure times the corner's median
        surface vector, plus an edge viscosity on each of the zone's closing
        edges: a force along the velocity difference of its two points, on
        both, opposite (it turns kinetic energy into the zone's internal
        energy, and keeps an edge from collapsing).
        """
        vol = self._areas(x, self.zp)
        rho = self.zm / vol
        p = (GAMMA - 1.0) * rho * (self.ze / self.zm)
        ss = np.sqrt(GAMMA * p / rho)
        force = p[:, None, None] * self._surfaces(x)
        pz, uz = x[self.zp], u[self.zp]
        dx = np.roll(pz, -1, axis=1) - pz               # edge k: from corner k to k + 1
        du = np.roll(uz, -1, axis=1) - uz
        h = np.sqrt((dx * dx).sum(axis=2))
        closing = (du * dx).sum(axis=2) < 0.0
        speed = np.sqrt((du * du).sum(axis=2))
        size = np.sqrt(vol)[:, None]                    # the zone's length, not the edge's:
        mu = np.where(closing, rho[:, None] * (Q_QUAD * speed + Q_LIN * ss[:, None]) * size, 0.0)
        fv = mu[:, :, None] * du                        # on corner k; minus on corner k + 1
        force += fv
        force -= np.roll(fv, 1, axis=1)
        signal = ss + 2.0 * speed.max(axis=1)
        return force, vol, h.min(axis=1), signal

    # -- exchanges ----------------------------------------------------------------------
    def _exchange(self, sends, sbufs, recvs, rbufs, tag, fill) -> None:
        comm = self.comm
        reqs = [comm.Irecv(rbufs[q], source=q, tag=tag) for q in recvs]
        for q, idx in sends.items():
            fill(q, idx, sbufs[q])
            reqs.append(comm.Isend(sbufs[q], dest=q, tag=tag))
        MPI.Request.Waitall(reqs)

    def ghosts(self) -> None:
        """Owners send their shared points' positions and velocities."""
        x, u = self.x, self.u

        def fill(q, idx, buf):
            buf[:, :2] = x[idx]
            buf[:, 2:] = u[idx]

        self._exchange(self.send_pts, self._send_pt, self.recv_pts, self._buf_pt, _TAG_PT, fill)
        for q, loc in self.recv_pts.items():
            x[loc] = self._buf_pt[q][:, :2]
            u[loc] = self._buf_pt[q][:, 2:]

    # -- the step -------------------------------------------------------------------------
    def step(self) -> None:
        self.ghosts()
        x, u, own = self.x, self.u, self.n_own
        _, vol, edge, signal = self._forces(x, u)
        self.min_volume = float(vol.min()) if len(vol) else np.inf
        self._red[0] = (CFL * edge / np.maximum(signal, 1e-300)).min() if len(vol) else np.inf
        self.comm.Allreduce(self._red, self._out, op=MPI.MIN)
        dt = self.dt = float(self._out[0])

        xh = x + (0.5 * dt) * u                            # half-step positions
        force = self._forces(xh, u)[0]                     # (nz, 4, 2) corner forces
        src = self._src
        src[:len(force) * 4] = force.reshape(-1, 2)

        def fill_f(q, rows, buf):
            np.take(src, rows, axis=0, out=buf)

        recv_bufs = {q: src[sl] for q, sl in self.recv_f_slices.items()}
        self._exchange(self.send_f, self._send_fb, self.recv_f_slices, recv_bufs, _TAG_F, fill_f)
        s = self.slots
        f = ((src[s[:, 0]] + src[s[:, 1]]) + src[s[:, 2]]) + src[s[:, 3]]
        f[self.wall_x, 0] = 0.0
        f[self.wall_y, 1] = 0.0
        u_old = u.copy()
        u[:own] += (dt / self.pm)[:, None] * f
        u[:own][self.wall_x, 0] = 0.0
        u[:own][self.wall_y, 1] = 0.0

        def fill_u(q, idx, buf):
            buf[:] = u[idx]

        self._exchange(self.send_pts, self._send_u, self.recv_pts, self._buf_u, _TAG_U, fill_u)
        for q, loc in self.recv_pts.items():
            u[loc] = self._buf_u[q]
        uavg = 0.5 * (u_old + u)
        x[:own] += dt * uavg[:own]
        work = np.einsum("zkd,zkd->z", force, uavg[self.zp])
        self.ze -= dt * work
        if self.t.size:
            self.t += dt
        self._red[0] = self.local_energy = self._local_energy()
        self.comm.Allreduce(self._red, self._out, op=MPI.SUM)
        self.energy = float(self._out[0])

    def _local_energy(self) -> float:
        own = self.n_own
        return float(self.ze.sum() + 0.5 * (self.pm * (self.u[:own] ** 2).sum(axis=1)).sum())

    def invariant(self) -> bool:
        """Total energy conserved (to rounding), every zone's volume positive,
        and this rank's energy what the last step left (a change since, say a
        flipped bit, would reach the total only at the next step)."""
        return (abs(self.energy - self.energy0) <= ENERGY_TOL * abs(self.energy0)
                and self.min_volume > 0.0 and self._local_energy() == self.local_energy)

    def density(self) -> np.ndarray:
        """Each of this rank's zones' density now."""
        return self.zm / self._areas(self.x, self.zp)

    def zone_centres(self) -> np.ndarray:
        return self.x[self.zp].mean(axis=1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Lagrangian hydrodynamics (Sedov blast)")
    d = HydroSpec()
    p.add_argument("--zones", type=int, default=d.zones, help=f"zones per side (default {d.zones})")
    p.add_argument("--energy", type=float, default=d.energy,
                   help=f"energy in the origin zone (default {d.energy})")
    p.add_argument("--steps", type=int, default=400, help="time steps (default 400)")
    p.add_argument("--seed", type=int, default=0,
                   help="unused: the Sedov problem is deterministic (kept for the command-line shape)")
    p.add_argument("--no-resilience", action="store_true",
                   help="plain mpi4py baseline: no segments, detection or logging")
    p.add_argument("--run-dir", default=None, help="run directory (default: ULFMPY_RUN_DIR or runs/...)")
    p.add_argument("--quiet", action="store_true", help="print only the JSON summary line")
    return p


def report(summary: dict, spec: HydroSpec, quiet: bool) -> None:
    steps, wall = summary.get("steps_run", summary["steps"]), summary["wall_s"]
    summary["steps_per_s"] = steps / wall if wall > 0 else float("inf")
    summary["mzones_per_s"] = spec.zones ** 2 * steps / wall / 1e6 if wall > 0 else float("inf")
    if not quiet:
        print(f"hydro: {summary['ranks']} ranks, {spec.zones}x{spec.zones} zones, {steps} steps "
              f"in {wall:.3f} s ({summary['mzones_per_s']:.2f} M zone-steps/s)"
              f"{'' if summary.get('resilience', True) else ' [no resilience]'}")
        print(f"hydro: fingerprint {summary['fingerprint']}")
    print(json.dumps({k: summary[k] for k in ("ranks", "steps", "wall_s", "fingerprint",
                                              "steps_per_s", "mzones_per_s")}))
    sys.stdout.flush()


def baseline(world: MPI.Comm, spec: HydroSpec, steps: int, run_dir: str) -> dict:
    """The kernels on a plain communicator, no ulfmpy: the overhead baseline."""
    comm = world.Dup()
    app = Hydro(comm, spec)
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        app.step()
    wall = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    summary = {"ranks": comm.Get_size(), "steps": steps, "wall_s": wall,
               "fingerprint": ulfmpy.fingerprint(comm, app.state), "resilience": False}
    if comm.Get_rank() == 0:
        from ulfmpy.events import write_json_atomic

        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    comm.Free()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.zones < 2:
        raise SystemExit("hydro: --zones >= 2")
    spec = HydroSpec(zones=args.zones, energy=args.energy)
    world = MPI.COMM_WORLD
    plain = args.no_resilience or os.environ.get("ULFMPY_RESILIENCE", "1") in ("0", "false", "no")
    if plain:
        from ulfmpy.launch import default_run_dir

        run_dir = args.run_dir or os.environ.get("ULFMPY_RUN_DIR") or world.bcast(
            default_run_dir() if world.Get_rank() == 0 else None)
        summary = baseline(world, spec, args.steps, run_dir)
        if world.Get_rank() == 0:
            report(summary, spec, args.quiet)
        return 0
    settings = {"run_dir": args.run_dir} if args.run_dir else {}
    with ulfmpy.Runtime(world, **settings) as rt:
        for _step, hydro in rt.loop(lambda comm: Hydro(comm, spec), steps=args.steps):
            hydro.step()
        if rt.rank == 0:
            report(rt.summary, spec, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
