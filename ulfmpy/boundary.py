"""A segment boundary as the runtime runs it: rank 0's planner fed, its answer applied.

Around the pure :class:`~ulfmpy.planner.BoundaryPlanner` this module does
the two halves of a boundary that need the rank's mechanisms:

* before the end-of-segment ``Allreduce`` (:meth:`Boundaries.slots`):
  rank 0 feeds the planner what the segment measured and puts its decision
  in the vector; every rank adds its last save's δ and whether its write
  is unfinished;
* after the commit (:meth:`Boundaries.apply`): every rank applies the agreed
  decision — commit a finished write, save when decided — and rank 0's
  planner learns δ, the write time and what the boundary cost.

The boundary cost the automatic segment length learns is the time from the
last step of one segment to the first of the next, with the checkpoint work
(poll, save with its partner copy) subtracted, so it keeps learning at boundaries
that save.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ulfmpy.planner import BoundaryPlanner, Schedule
from ulfmpy.state import state_nbytes

__all__ = ["Boundaries", "make_planner"]


def make_planner(config: Any, steps: int, *, nodes: int, checkpoints: bool,
                 max_segment_s: float = 0.0,
                 max_segment_stretch_s: float = 0.0) -> BoundaryPlanner:
    """The planner for a run's settings. Local; pure apart from the clock it is given."""
    interval = None
    if config.mtbf > 0 or config.node_mtbf > 0:
        from ulfmpy.policy import IntervalPolicy

        interval = IntervalPolicy(mtbf=config.mtbf or None, node_mtbf=config.node_mtbf or None,
                                  nodes=nodes, model=config.interval_model,
                                  recovery_estimate=config.recovery_estimate,
                                  latency_steps=max((d.latency_steps()
                                                     for d in config.diagnostics()), default=0))
    every = 0
    for d in config.diagnostics():
        every = math.gcd(every, d.every)
    return BoundaryPlanner(Schedule(
        steps=steps, segment_steps=config.segment_steps, segment_budget=config.segment_budget,
        soft_mtbf=config.soft_mtbf, ckpt_every=config.ckpt_every, diagnose_every=every,
        ckpt_seconds=config.ckpt_seconds, checkpoints=checkpoints, interval=interval,
        interval_model=config.interval_model, async_writes=config.ckpt_mode == "async",
        max_segment_s=max_segment_s, max_segment_stretch_s=max_segment_stretch_s))


class Boundaries:
    """One rank's side of every boundary. Local object.

    Args:
        planner: this rank's planner (only rank 0's decides).
        ckpts: the rank's :class:`~ulfmpy.checkpoints.Checkpoints`.
        segments: the rank's :class:`~ulfmpy.segments.SegmentRunner`.
        events: the rank's event log.
    """

    def __init__(self, planner: BoundaryPlanner, ckpts: Any, segments: Any, events: Any) -> None:
        self.planner, self.ckpts, self.segments, self.events = planner, ckpts, segments, events
        self.k = 0  # the segment length in use, as agreed (0: none yet)
        self._from: float | None = None
        self._rollbacks = 0

    def restart(self, step: int) -> int:
        """The loop (re)starts at ``step``: the first segment's end, the same on every rank."""
        self._from = None
        self._rollbacks = len(self.segments.rollbacks)
        return self.planner.start(step, time.perf_counter())

    def slots(self, rank: int, comm: Any, work: Any, t: Any, halt: bool = False) -> np.ndarray:
        """This rank's contribution to the end-of-segment vector. Local.

        ``halt``: this rank asks for a halt here (a signal, the deadline).
        """
        delta, unfinished = self.ckpts.plan_slots()
        if rank != 0:
            return np.array((0, 0, 0, delta, unfinished, int(halt)))
        p = self.planner
        if self._from is not None:
            p.observe_boundary(t.t_start - self._from)
        p.observe_snapshot(t.snapshot_s)
        p.observe_segment(t.t_steps_end - t.t_start, t.end - t.first, clean=t.clean,
                          log_bytes=comm.log_bytes, state_bytes=state_nbytes(work.state))
        b = p.boundary(t.end, time.perf_counter())
        for name, fields in b.events:
            self.events.log(name, **fields)
            if name == "interval_decision":
                self.ckpts.keep_for_latency(int(fields["steps"]))
        return np.array((int(b.save), b.next_end, p.k, delta, unfinished, int(halt)))

    def apply(self, agreed: Any, me: Any, comm: Any, work: Any, hosts: list[str]) -> int:
        """After the commit: checkpoint work, then the next segment's end. Collective."""
        if self.k != agreed.k:
            if self.k:
                self.events.log("segment_length", old=self.k, new=agreed.k,
                                at_step=agreed.timing.end)
            self.k = agreed.k
        rank0, p = me.rank == 0, self.planner
        if rank0 and agreed.delta_ns:
            p.observe_save(agreed.delta_ns / 1e9)
        t = time.perf_counter()
        committed, saved = self.ckpts.at_boundary(comm, me, agreed.timing.end, work,
                                                  save=agreed.save or agreed.halt,
                                                  writes_ready=agreed.writes_ready, hosts=hosts)
        # The snapshot a save took is the next segment's (it reports it).
        ckpt_s = time.perf_counter() - t - (work.snap.seconds if saved else 0.0)
        if rank0 and committed is not None and committed.write_s is not None:
            p.observe_write(committed.write_s, committed.step)
        if rank0 and agreed.save and not saved:
            p.save_skipped()
        # A boundary after a rollback measures the rollback, not the boundary.
        clean = agreed.timing.clean and len(self.segments.rollbacks) == self._rollbacks
        self._rollbacks = len(self.segments.rollbacks)
        self._from = agreed.timing.t_steps_end + ckpt_s if clean else None
        return agreed.next_end
