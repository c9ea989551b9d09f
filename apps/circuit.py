# Run: ulfmpy run -n 4 apps/circuit.py --pieces 24 --nodes 1000 --wires 4000 --steps 200
"""An electrical circuit on an irregular graph, the restartable-tasks circuit benchmark's structure.

The circuit is a graph of **nodes** (charge, capacitance, leakage, voltage)
and **wires** (resistance, inductance, capacitance, a current per segment and
a voltage at each of the ``--segments - 1`` points inside the wire). It is
cut into ``--pieces`` pieces of ``--nodes`` nodes and ``--wires`` wires each;
a wire starts at a node of its piece and ends at one of its piece or, with
probability ``--cross``, at a node of another piece. A rank owns a
contiguous run of pieces. Nodes that wires of other ranks reach are
*shared*; a rank keeps *ghost* copies of the other ranks' nodes its wires
reach. One step:

1. **ghost voltages**: each owner sends its shared nodes' voltages to the
   ranks that hold ghosts of them (point to point, a rank-dependent set of
   neighbours of varying size: ``Isend``/``Irecv``/``Waitall``);
2. **new currents**: per wire, a few sweeps of an implicit update over its
   segments and internal points (numpy over all the rank's wires);
3. **distribute charge**: each wire moves charge out of its start node and
   into its end node (a scatter-add that reaches ghost nodes); the ghosts'
   charge goes back to the owners, which add it (a second exchange);
4. **update voltages**: each owned node takes its charge, leaks, and starts
   the next step with none.

The circuit is generated from ``--seed`` piece by piece (a generator per
piece), so it is the same for any rank count. Charge moves in integer units
(2**-40 of the step's charge), so a node's sum over its wires does not
depend on the order, the rank or the decomposition: the fingerprint is the
same on any number of ranks. The state (node voltages, wire currents and
internal voltages) is ``ulfmpy.Block``s of global arrays indexed by global
node and wire number, so a shrink or a resume on another rank count
restores it N→M; the graph itself is rebuilt from the seed by the factory.

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

__all__ = ["Circuit", "CircuitSpec", "generate_piece", "owner_pieces", "main"]

DT = 1e-6          # time step (s)
SWEEPS = 3         # relaxation sweeps of the implicit wire update per step
QUANTUM = 2.0 ** -40  # the unit charge moves in (exact integer sums)
_TAG_V, _TAG_Q = 31, 32


@dataclass(frozen=True)
class CircuitSpec:
    """The global circuit: the same on every rank and any rank count."""

    pieces: int = 24
    nodes: int = 1000       # per piece
    wires: int = 4000       # per piece
    segments: int = 4       # currents per wire (segments - 1 internal points)
    cross: float = 0.1      # fraction of wires ending in another piece
    seed: int = 0

    @property
    def total_nodes(self) -> int:
        return self.pieces * self.nodes

    @property
    def total_wires(self) -> int:
        return self.pieces * self.wires


def owner_pieces(pieces: int, size: int, rank: int) -> tuple[int, int]:
    """The pieces ``[first, last)`` rank ``rank`` of ``size`` owns (contiguous, even)."""
    return pieces * rank // size, pieces * (rank + 1) // size


def generate_piece(spec: CircuitSpec, piece: int) -> dict[str, np.ndarray]:
    """Piece ``piece`` of the circuit, from its own generator. Pure.

    Returns its wires' global end nodes and properties, and its nodes'
    properties and initial voltages.
    """
    rng = np.random.default_rng([spec.seed, piece])
    n, w = spec.nodes, spec.wires
    base = piece * n
    in_node = base + rng.integers(0, n, w)
    crossing = rng.random(w) < spec.cross if spec.pieces > 1 else np.zeros(w, bool)
    other = (piece + 1 + rng.integers(0, max(spec.pieces - 1, 1), w)) % spec.pieces
    out_piece = np.where(crossing, other, piece)
    out_node = out_piece * n + rng.integers(0, n, w)
    return {
        "in_node": in_node.astype(np.int64), "out_node": out_node.astype(np.int64),
        "resistance": rng.uniform(1.0, 10.0, w), "inductance": rng.uniform(1e-3, 1e-2, w),
        "wire_cap": rng.uniform(1e-5, 1e-4, w),
        "node_cap": rng.uniform(1e-3, 1e-2, n), "leakage": rng.uniform(1e-4, 1e-3, n),
        "voltage": rng.uniform(0.0, 1.0, n),
    }


class Circuit:
    """This rank's pieces of the circuit, stepped through ``comm``.

    Args:
        comm: the communicator (ulfmpy's resilient one, or a plain mpi4py one).
        spec: the global circuit.
    """

    def __init__(self, comm, spec: CircuitSpec) -> None:
        self.comm, self.spec = comm, spec
        rank, size = comm.Get_rank(), comm.Get_size()
        if spec.pieces < size:
            raise ulfmpy.ConfigError(f"{spec.pieces} pieces cannot be split over {size} ranks; "
                                     "use --pieces >= the rank count")
        p0, p1 = owner_pieces(spec.pieces, size, rank)
        n, w, s = spec.nodes, spec.wires, spec.segments
        self.node0, self.wire0 = p0 * n, p0 * w
        own_n, own_w = (p1 - p0) * n, (p1 - p0) * w
        parts = [generate_piece(spec, p) for p in range(p0, p1)]

        def cat(key: str) -> np.ndarray:
            return np.concatenate([part[key] for part in parts]) if parts else np.empty(0)

        in_node, out_node = cat("in_node").astype(np.int64), cat("out_node").astype(np.int64)
        self.r, self.l, self.c = cat("resistance"), cat("inductance"), cat("wire_cap")
        self.node_cap, self.leak = cat("node_cap"), cat("leakage")

        # Local node numbering: owned nodes first, then ghosts (sorted by global id).
        piece_owner = np.array([next(q for q in range(size) if owner_pieces(spec.pieces, size, q)[0]
                                     <= p < owner_pieces(spec.pieces, size, q)[1])
                                for p in range(spec.pieces)])
        remote = out_node[(out_node < self.node0) | (out_node >= self.node0 + own_n)]
        ghosts = np.unique(remote)
        self.n_own, self.n_ghost = own_n, len(ghosts)
        self.in_idx = in_node - self.node0

        def local(g: np.ndarray) -> np.ndarray:
            mine = (g >= self.node0) & (g < self.node0 + own_n)
            return np.where(mine, g - self.node0, own_n + np.searchsorted(ghosts, g))

        self.out_idx = local(out_node)
        # Who ghosts whose nodes: every rank derives every other rank's ghost
        # set from the seed (the pieces' wire ends), so no set-up messages.
        ghost_owner = piece_owner[ghosts // n] if len(ghosts) else np.empty(0, np.int64)
        self.recv_from = {int(q): np.flatnonzero(ghost_owner == q) + own_n
                          for q in np.unique(ghost_owner)}
        self.send_to: dict[int, np.ndarray] = {}
        for q in range(size):
            if q == rank:
                continue
            q0, q1 = owner_pieces(spec.pieces, size, q)
            ends = np.concatenate([generate_piece(spec, p)["out_node"] for p in range(q0, q1)]) \
                if q1 > q0 else np.empty(0, np.int64)
            wanted = np.unique(ends[(ends >= self.node0) & (ends < self.node0 + own_n)])
            if len(wanted):
                self.send_to[q] = wanted - self.node0
        self.neighbours = sorted(set(self.recv_from) | set(self.send_to))

        # State: owned node voltages, wire currents and internal voltages.
        self.voltage = np.zeros(own_n + self.n_ghost)
        self.voltage[:own_n] = cat("voltage")
        self.current = np.zeros((own_w, s))
        self.v_int = np.zeros((own_w, s - 1))
        self.state = {
            "voltage": Block(self.voltage[:own_n], (spec.total_nodes,), (self.node0,)),
            "current": Block(self.current, (spec.total_wires, s), (self.wire0, 0)),
            "v_internal": Block(self.v_int, (spec.total_wires, s - 1), (self.wire0, 0)),
        }
        # A generous envelope (--detect bounds): voltages stay within [0, 1]
        # and currents and internal voltages within +-2 over 5000 steps; a
        # flipped exponent bit lands far outside.
        self.bounds = {name: (-100.0, 100.0) for name in self.state}

        # Preallocated work arrays: a step allocates no array memory.
        self._pts = np.empty((own_w, s + 1))
        self._dv = np.empty((own_w, s))
        self._tmp = np.empty((own_w, s))
        self._dq = np.empty((own_w, s - 1))
        self._qin = np.empty(own_w, np.int64)
        self._qout = np.empty(own_w, np.int64)
        self._charge = np.zeros(own_n + self.n_ghost, np.int64)
        self._dt_l = (DT / self.l)[:, None]
        self._damp = (1.0 + DT * self.r / self.l)[:, None]
        self._dt_c = (DT / self.c)[:, None]
        self._inv_cap = QUANTUM / self.node_cap
        self._keep = 1.0 - self.leak
        self._vsend = {q: np.empty(len(i)) for q, i in self.send_to.items()}
        self._vrecv = {q: np.empty(len(i)) for q, i in self.recv_from.items()}
        self._qsend = {q: np.empty(len(i), np.int64) for q, i in self.recv_from.items()}
        self._qrecv = {q: np.empty(len(i), np.int64) for q, i in self.send_to.items()}

    # -- the four phases ----------------------------------------------------------------
    def exchange_voltages(self) -> None:
        """Owners send shared nodes' voltages; ghosts take them."""
        comm, v = self.comm, self.voltage
        reqs = [comm.Irecv(self._vrecv[q], source=q, tag=_TAG_V) for q in self.recv_from]
        for q, idx in self.send_to.items():
            np.take(v, idx, out=self._vsend[q])
            reqs.append(comm.Isend(self._vsend[q], dest=q, tag=_TAG_V))
        MPI.Request.Waitall(reqs)
        for q, slots in self.recv_from.items():
            v[slots] = self._vrecv[q]

    def new_currents(self) -> None:
        """A few sweeps of the implicit update of every wire's segments."""
        pts, dv, tmp, i, vi = self._pts, self._dv, self._tmp, self.current, self.v_int
        np.take(self.voltage, self.in_idx, out=pts[:, 0])
        np.take(self.voltage, self.out_idx, out=pts[:, -1])
        for _ in range(SWEEPS):
            pts[:, 1:-1] = vi
            np.subtract(pts[:, :-1], pts[:, 1:], out=dv)
            np.multiply(dv, self._dt_l, out=tmp)
            tmp += i
            np.divide(tmp, self._damp, out=i)
            np.subtract(i[:, :-1], i[:, 1:], out=self._dq)
            self._dq *= self._dt_c
            vi += self._dq

    def distribute_charge(self) -> None:
        """Each wire's charge out of its start node and into its end node; ghosts' to owners."""
        comm, q = self.comm, self._charge
        np.rint(self.current[:, 0] * (DT / QUANTUM), out=self._tmp[:, 0])
        self._qin[:] = self._tmp[:, 0]
        np.rint(self.current[:, -1] * (DT / QUANTUM), out=self._tmp[:, 0])
        self._qout[:] = self._tmp[:, 0]
        q[:] = 0
        np.subtract.at(q, self.in_idx, self._qin)
        np.add.at(q, self.out_idx, self._qout)
        reqs = [comm.Irecv(self._qrecv[p], source=p, tag=_TAG_Q) for p in self.send_to]
        for p, slots in self.recv_from.items():
            np.take(q, slots, out=self._qsend[p])
            reqs.append(comm.Isend(self._qsend[p], dest=p, tag=_TAG_Q))
        MPI.Request.Waitall(reqs)
        for p, idx in self.send_to.items():
            np.add.at(q, idx, self._qrecv[p])

    def update_voltages(self) -> None:
        """Owned nodes take their charge and leak."""
        v = self.voltage[:self.n_own]
        v += self._charge[:self.n_own] * self._inv_cap
        v *= self._keep

    def step(self) -> None:
        self.exchange_voltages()
        self.new_currents()
        self.distribute_charge()
        self.update_voltages()

    @property
    def updates_per_step(self) -> int:
        """Wire segments and nodes this rank updates per step (the rate's unit)."""
        return self.current.size * SWEEPS + self.n_own


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="electrical circuit on an irregular graph")
    d = CircuitSpec()
    p.add_argument("--pieces", type=int, default=d.pieces, help=f"pieces (default {d.pieces})")
    p.add_argument("--nodes", type=int, default=d.nodes, help=f"nodes per piece (default {d.nodes})")
    p.add_argument("--wires", type=int, default=d.wires, help=f"wires per piece (default {d.wires})")
    p.add_argument("--segments", type=int, default=d.segments,
                   help=f"current segments per wire (default {d.segments})")
    p.add_argument("--cross", type=float, default=d.cross,
                   help=f"fraction of wires ending in another piece (default {d.cross})")
    p.add_argument("--seed", type=int, default=0, help="seed of the circuit (default 0)")
    p.add_argument("--steps", type=int, default=200, help="time steps (default 200)")
    p.add_argument("--no-resilience", action="store_true",
                   help="plain mpi4py baseline: no segments, detection or logging")
    p.add_argument("--run-dir", default=None, help="run directory (default: ULFMPY_RUN_DIR or runs/...)")
    p.add_argument("--quiet", action="store_true", help="print only the JSON summary line")
    return p


def _spec(args: argparse.Namespace) -> CircuitSpec:
    if args.segments < 2 or args.nodes < 1 or args.wires < 1 or args.pieces < 1:
        raise SystemExit("circuit: --segments >= 2, and --nodes, --wires, --pieces >= 1")
    if not 0.0 <= args.cross <= 1.0:
        raise SystemExit("circuit: --cross is a fraction in [0, 1]")
    return CircuitSpec(pieces=args.pieces, nodes=args.nodes, wires=args.wires,
                       segments=args.segments, cross=args.cross, seed=args.seed)


def report(summary: dict, spec: CircuitSpec, quiet: bool) -> None:
    steps, wall = summary.get("steps_run", summary["steps"]), summary["wall_s"]
    per_step = spec.total_wires * spec.segments * SWEEPS + spec.total_nodes
    summary["steps_per_s"] = steps / wall if wall > 0 else float("inf")
    summary["mupdates_per_s"] = per_step * steps / wall / 1e6 if wall > 0 else float("inf")
    if not quiet:
        print(f"circuit: {summary['ranks']} ranks, {spec.pieces} pieces, {spec.total_nodes} nodes, "
              f"{spec.total_wires} wires, {steps} steps in {wall:.3f} s "
              f"({summary['mupdates_per_s']:.1f} M wire-segment and node updates/s)"
              f"{'' if summary.get('resilience', True) else ' [no resilience]'}")
        print(f"circuit: fingerprint {summary['fingerprint']}")
    print(json.dumps({k: summary[k] for k in ("ranks", "steps", "wall_s", "fingerprint",
                                              "steps_per_s", "mupdates_per_s")}))
    sys.stdout.flush()


def baseline(world: MPI.Comm, spec: CircuitSpec, steps: int, run_dir: str) -> dict:
    """The kernels on a plain communicator, no ulfmpy: the overhead baseline."""
    comm = world.Dup()
    app = Circuit(comm, spec)
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
    spec = _spec(args)
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
        for _step, circuit in rt.loop(lambda comm: Circuit(comm, spec), steps=args.steps):
            circuit.step()
        if rt.rank == 0:
            report(rt.summary, spec, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
