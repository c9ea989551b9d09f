"""A small ring app and a driver for the segment protocol tests (unit and MPI tiers)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ulfmpy.comm import ResilientComm
from ulfmpy.config import Config
from ulfmpy.faults import NoFaults
from ulfmpy.identity import Identity, build_work
from ulfmpy.segments import SegmentRunner


class Ring:
    """Each step: pass the first value to the next rank, mix it in, add the step's source."""

    def __init__(self, comm: Any, n: int = 16) -> None:
        self.comm = comm
        r = comm.Get_rank()
        self.u = np.linspace(r, r + 1, n)
        self.out = np.zeros(1)
        self.inb = np.zeros(1)
        self.state = {"u": self.u}

    def step(self, s: int) -> None:
        c = self.comm
        rank, size = c.Get_rank(), c.Get_size()
        self.out[0] = self.u[0]
        c.Sendrecv(self.out, (rank + 1) % size, 3, self.inb, (rank - 1) % size, 3)
        self.u[:] = 0.5 * self.u + 0.25 * self.inb[0] + 0.01 * s


class Corrupt(NoFaults):
    """Sets a NaN into logical rank ``victim``'s state after ``step``'s body.

    At ``index`` 0 the NaN is what the victim sends to the next rank at the
    following step; elsewhere it stays local.

    ``times``: how many executions of that step it strikes (re-executions too).
    """

    active = True

    def __init__(self, victim: int, step: int, times: int = 1, index: int = 3) -> None:
        super().__init__()
        self.victim, self.step, self.left, self.index = victim, step, times, index

    def after_step(self, step: int, state: Any, *, replay: bool, logical: int | None) -> None:
        if logical == self.victim and step == self.step and self.left > 0:
            self.left -= 1
            state["u"][self.index] = np.nan  # index 0 is what the next step sends on
            if not replay:
                self.flips.append(step)


class Events:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def log(self, event: str, **fields: Any) -> None:
        self.records.append((event, fields))

    def of(self, event: str) -> list[dict[str, Any]]:
        return [f for e, f in self.records if e == event]


def setup(base: Any, hooks: Any = None, **settings: Any):
    """(runner, identity, work, events) on duplicates of ``base``. Collective."""
    from mpi4py import MPI

    compute = base.Dup()
    compute.Set_errhandler(MPI.ERRORS_RETURN)
    replay = compute.Dup()
    comm = ResilientComm(compute, ft=False)
    cfg = Config.load(environ={}, **settings)
    events = Events()
    runner = SegmentRunner(cfg, comm, events, hooks or NoFaults())
    me = Identity(compute, compute, replay, compute.Get_rank(), compute.Get_rank(),
                  compute.Get_size())
    work = build_work(lambda c: Ring(c), comm)
    return runner, me, work, events


def run_segment(runner: SegmentRunner, me: Identity, work: Any, first: int, end: int,
                plan=None) -> Any:
    """Drive one segment as the loop body would; returns the :class:`Agreed`."""
    plan = plan or (lambda t: np.array((0, end + 5, 0, 0, 0, 0)))
    gen = runner.run(me, work, first, end, plan)
    try:
        while True:
            step, app = next(gen)
            app.step(step)
    except StopIteration as stop:
        return stop.value


def free(me: Identity) -> None:
    me.replay.Free()
    me.compute.Free()


def reference(base: Any, steps: int, k: int = 10) -> np.ndarray:
    """The fault-free state after ``steps`` steps in segments of ``k``. Collective."""
    runner, me, work, _ = setup(base)
    for first in range(0, steps, k):
        run_segment(runner, me, work, first, min(first + k, steps))
    free(me)
    return work.state["u"].copy()
