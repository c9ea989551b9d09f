"""The boundary planner: the one owner of where a segment ends (docs/architecture.md, "Who decides where a segment ends").

At every segment boundary the planner answers two questions::

    save    = does this boundary checkpoint?
    next_end = min(step + k, steps, next checkpoint step, halt step,
                   step + k_pending while an async write is in flight)

Its inputs are the segment-length policy (the overhead budget of
``--segment-steps auto``, ``--soft-mtbf``, or a fixed length), the checkpoint
schedule (``--ckpt-every`` steps, ``--ckpt-seconds``, the ``--mtbf`` interval
policy), a halt request, and the state of the asynchronous checkpoint write.
Seconds and the interval policy's τ become steps through the measured step
time, re-evaluated at each boundary.

Pure and local: no MPI, no I/O, the clock comes in as an argument. The
runtime feeds rank 0's planner its measurements and sends rank 0's answer
to every rank in the end-of-segment ``Allreduce`` (docs/architecture.md, "Who decides where a segment ends"), so the fault
-free path gains no message. What the planner decided is returned as event
records for the runtime to log; the planner logs nothing itself.

Honest measurements: the step time is the per-step time of the recent
fault-free segments (weighted by their steps), measured over the steps only (no boundary, no
save, no rollback, no recovery), and the first segment after a start,
resume or repair is a warm-up whose time is not used. The interval policy
decides only on measured step times.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ulfmpy.seglength import DEFAULT_BUDGET, K_MIN, K_START, SegmentBudget

__all__ = ["Boundary", "BoundaryPlanner", "Schedule"]

# While an async write is in flight the first boundary comes after about
# one expected write time (the last write's, measured), each later one after
# twice the previous wait: a write that takes longer than expected costs a
# few boundaries, not one every few steps, and a commit (write agreed, then
# rank 0's manifest) lands within about twice the write's time of its end.
# A segment that ends within _PENDING_REACH such waits is not cut; one that
# ends at a save is cut once, for the write to commit before the save.
_PENDING_REACH = 4
# The step time is taken over the newest fault-free segments that cover at
# least this many steps (at most _STEP_WINDOW segments).
_STEP_SPAN = 200
_STEP_WINDOW = 64
# A held --mtbf decision is revised when the step time it converted τ with
# has moved by more than this fraction (noise must not churn the schedule).
_REVISE = 0.25


@dataclass(frozen=True)
class Boundary:
    """Rank 0's answer at one boundary; every rank applies it.

    Attributes:
        step: the boundary (the step the segment just ended at).
        save: checkpoint at this boundary.
        halt: a halt was requested for this boundary (the hook of docs/architecture.md, "Halting").
        next_end: where the next segment ends (> step, <= the run's end).
        events: ``(name, fields)`` records of what was decided, to log.
    """

    step: int
    save: bool
    halt: bool
    next_end: int
    events: tuple[tuple[str, dict[str, Any]], ...] = ()


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """What the planner is configured with; equal on every rank.

    Attributes:
        steps: the run's last step (exclusive).
        segment_steps: a fixed segment length, or 0 for a policy's.
        segment_budget: the overhead budget of the automatic length.
        soft_mtbf: mean time between soft errors (s), 0 = not used.
        ckpt_every: checkpoint at every multiple of this step, 0 = off.
        diagnose_every: a boundary at every multiple of this step (the
            periodic diagnostics run there), 0 = none.
        ckpt_seconds: checkpoint every this many seconds, 0 = off.
        checkpoints: whether checkpoints are on at all (a store is open).
        interval: the ``--mtbf`` policy (:class:`ulfmpy.policy.IntervalPolicy`)
            or None.
        interval_model: the model ``--soft-mtbf`` picks the segment length with.
        async_writes: saves return before the write is durable.
        max_segment_s: while a halt can come (:mod:`ulfmpy.halt`), a segment
            runs at most about this long, so the halt lands soon; 0 = unbounded.
        max_segment_stretch_s: the segment-length policy's own length (k
            steps) may stretch that bound up to this, so boundaries cost no
            more than its budget where steps are long.
    """

    steps: int
    segment_steps: int = 0
    segment_budget: float = DEFAULT_BUDGET
    soft_mtbf: float = 0.0
    ckpt_every: int = 0
    ckpt_seconds: float = 0.0
    diagnose_every: int = 0
    checkpoints: bool = False
    interval: Any = None
    interval_model: str = "exact"
    async_writes: bool = True
    max_segment_s: float = 0.0
    max_segment_stretch_s: float = 0.0


@dataclass
class BoundaryPlanner:
    """Where segments end and when to save. Local; see the module docstring.

    Call :meth:`start` at the loop's start and after every restore (resume,
    global rollback, repair), then :meth:`boundary` at every boundary with
    the measurements of the segment that just ended.
    """

    schedule: Schedule
    k: int = K_START
    _budget: SegmentBudget | None = field(default=None, repr=False)
    _steps: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=_STEP_WINDOW),
                                             repr=False)
    _busy: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=_STEP_WINDOW),
                                            repr=False)
    _warm: bool = False
    _last_save_step: int = 0
    _last_save_time: float = 0.0
    _pending: bool = False
    _pending_polls: int = 0
    _write_s: float | None = None
    _snapshot_s: float | None = None
    _next_ckpt: int | None = None       # held --mtbf decision (absolute step)
    _decided_step_time: float | None = None
    _awaiting_delta: bool = False        # a save happened; its δ not yet learned
    _held: dict[str, Any] | None = None  # the last --mtbf decision (its interval in steps)
    _provisional: bool = False           # _next_ckpt is the held interval, δ not yet in
    _halt_at: int | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        s = self.schedule
        if s.steps < 0:
            raise ValueError(f"steps must be >= 0, got {s.steps}")
        self._reset_k()

    # -- lifecycle --------------------------------------------------------------
    def _reset_k(self) -> None:
        s = self.schedule
        self.k = s.segment_steps or K_START
        self._budget = (SegmentBudget(budget=s.segment_budget, k=self.k)
                        if not s.segment_steps and not s.soft_mtbf else None)

    def start(self, step: int, now: float) -> int:
        """The loop (re)starts at ``step``: the first segment's end. Local.

        Deterministic from the schedule and ``step`` alone, so every rank,
        a fresh replacement included, computes the same end without a message.
        The segment length starts afresh; the step-time samples are dropped
        (a repair can change the rank count, so the step time); the save
        time and the write time are kept. The checkpoint schedule counts
        from ``step``: it was restored from a checkpoint, or is the start.
        """
        self._reset_k()
        self._steps.clear()
        self._busy.clear()
        self._warm = False
        self._last_save_step, self._last_save_time = step, now
        self._pending = False
        self._next_ckpt = None
        self._provisional = False
        self._decided_step_time = None
        return self._end(step, now, first=True)

    def request_halt(self, step: int) -> None:
        """End a segment at ``step`` and report ``halt`` there (docs/architecture.md, "Halting"). Local."""
        self._halt_at = step if self._halt_at is None else min(self._halt_at, step)

    # -- measurements (rank 0's) ------------------------------------------------
    @property
    def step_time(self) -> float | None:
        """Seconds per step over the recent fault-free segments, or None.

        Weighted by steps, over the newest segments that cover
        :data:`_STEP_SPAN` steps. Segments that ran while an asynchronous
        write was in flight (the helper competes for the cores: a cost of
        the checkpoint, not of a step) count only while there are no others.
        """
        samples = self._steps or self._busy
        if not samples:
            return None
        seconds = steps = 0.0
        for sec, n in reversed(samples):
            seconds, steps = seconds + sec, steps + n
            if steps >= _STEP_SPAN:
                break
        return seconds / steps

    def observe_segment(self, seconds: float, steps: int, *, clean: bool,
                        log_bytes: int = 0, state_bytes: int = 0) -> None:
        """The steps of the segment just run took ``seconds`` (boundary excluded)."""
        if not self._warm:
            self._warm = True  # the first segment after a (re)start warms caches and buffers
            return
        if not clean or steps <= 0 or not (math.isfinite(seconds) and seconds > 0):
            return
        (self._busy if self._pending else self._steps).append((seconds, steps))
        if self._budget is not None:
            self._budget.observe_segment(seconds, steps, log_bytes=log_bytes,
                                         state_bytes=state_bytes)

    def observe_boundary(self, seconds: float) -> None:
        """What one boundary cost, checkpoint work already subtracted."""
        if self._budget is not None:
            self._budget.observe_boundary(seconds)

    def observe_snapshot(self, seconds: float) -> None:
        """Time of one segment-start snapshot (``--soft-mtbf`` needs it)."""
        if math.isfinite(seconds) and seconds >= 0:
            self._snapshot_s = seconds

    def observe_save(self, exposed_s: float) -> None:
        """The exposed time δ of the last save (maximum over ranks)."""
        self._awaiting_delta = False
        pol = self.schedule.interval
        if pol is not None:
            pol.observe_save(max(exposed_s, 0.0))

    def observe_write(self, write_s: float | None, step: int | None = None) -> None:
        """Checkpoint ``step``'s write committed; it took ``write_s`` (max over ranks).

        The write in flight is done only if it was the newest save's (a save
        commits the write before it first: that one is not the new one).
        """
        if step is None or step >= self._last_save_step:
            self._pending = False
        if write_s is not None and math.isfinite(write_s) and write_s >= 0:
            self._write_s = write_s

    def save_skipped(self) -> None:
        """The boundary decided to save but the step was already committed (a re-run)."""
        self._pending = False
        self._awaiting_delta = False

    def observe_recovery(self, seconds: float) -> None:
        """A measured in-job recovery: it replaces the configured estimate of R."""
        pol = self.schedule.interval
        if pol is not None:
            pol.observe_recovery(seconds)

    # -- decisions ----------------------------------------------------------------
    def boundary(self, step: int, now: float) -> Boundary:
        """Decide at boundary ``step``: save here? halt here? the next segment's end.

        Local; rank 0's answer is the one every rank applies.
        """
        events: list[tuple[str, dict[str, Any]]] = []
        d = self._propose_k(step)
        if d is not None:
            events.append(("segment_decision", d))
        save = self._save_due(step, now, events)
        halt = self._halt_at is not None and step >= self._halt_at
        if halt:
            self._halt_at = None
        if save:
            self._last_save_step, self._last_save_time = step, now
            self._next_ckpt = None
            self._provisional = False
            self._decided_step_time = None
            self._pending = self.schedule.async_writes
            self._pending_polls = 0
            self._awaiting_delta = True
        nxt = self._end(step, now, first=False, events=events)
        return Boundary(step=step, save=save, halt=halt, next_end=nxt, events=tuple(events))

    def _propose_k(self, step: int) -> dict[str, Any] | None:
        s = self.schedule
        if s.segment_steps:
            return None
        if self._budget is not None:
            d = self._budget.propose()
            if d is None:
                return None
            self.k = int(d["steps"])
            return dict(d, at_step=step)
        st = self.step_time
        if st is None or self._snapshot_s is None:
            return None
        from ulfmpy.policy import IntervalPolicy

        pol = IntervalPolicy(mtbf=s.soft_mtbf, model=s.interval_model,
                             save_estimate=max(self._snapshot_s, 1e-9))
        dec = pol.segment_length(soft_mtbf=s.soft_mtbf, snapshot=self._snapshot_s, step_time=st)
        k = max(K_MIN, dec.steps)
        if k == self.k:
            return None
        old, self.k = self.k, k
        return dict(dec.as_dict(), policy="soft_mtbf", old=old, steps=k, at_step=step)

    def _save_due(self, step: int, now: float, events: list[tuple[str, dict[str, Any]]]) -> bool:
        s = self.schedule
        if not s.checkpoints or step >= s.steps or step <= self._last_save_step:
            return False
        if s.ckpt_every:
            return step % s.ckpt_every == 0
        if s.ckpt_seconds:
            st = self.step_time or 0.0
            return now - self._last_save_time >= s.ckpt_seconds - st / 2
        if s.interval is not None:
            nxt = self._interval_next(step, events)
            if nxt is None:
                # No δ measured yet: the first save measures it, taken as soon
                # as a step time is known (no decision rests on a start-up sample).
                return self.step_time is not None and s.interval.last is None \
                    and not self._awaiting_delta
            return step >= nxt
        return False

    def _interval_next(self, step: int, events: list[tuple[str, dict[str, Any]]]) -> int | None:
        """The held ``--mtbf`` decision's checkpoint step; decide or revise it."""
        pol = self.schedule.interval
        st = self.step_time
        if st is None or self._awaiting_delta:
            if self._next_ckpt is None and self._held is not None:
                # The last save's δ is learned one or two boundaries later
                # (it rides in the next boundary's agreement); until then the
                # last decision's interval holds, so a long segment cannot
                # carry the next save past it (docs/architecture.md, "Who
                # decides where a segment ends"). Revised once δ is in.
                self._next_ckpt = max(self._last_save_step + int(self._held["steps"]), step)
                self._provisional = True
                rec = dict(self._held, at_step=step, next_step=self._next_ckpt,
                           last_save_step=self._last_save_step, held=True)
                self.decisions.append(rec)
                events.append(("interval_decision", rec))
            return self._next_ckpt
        stale = self._provisional or (
            self._decided_step_time is not None
            and abs(st - self._decided_step_time) > _REVISE * self._decided_step_time)
        if self._next_ckpt is not None and not stale:
            return self._next_ckpt
        try:
            d = pol.decide(step_time=st)
        except ValueError:
            return None  # no save measured yet
        # The earliest boundary still ahead is this one: a late decision saves now.
        nxt = max(self._last_save_step + d.steps, step)
        self._held, self._provisional = d.as_dict(), False
        revised = self._next_ckpt
        if revised == nxt:  # the new step time lands on the same step: nothing to say
            self._decided_step_time = st
            return nxt
        self._next_ckpt, self._decided_step_time = nxt, st
        rec = dict(d.as_dict(), at_step=step, next_step=nxt, last_save_step=self._last_save_step)
        if revised is not None:
            rec["revises"] = revised
        self.decisions.append(rec)
        events.append(("interval_decision", rec))
        return nxt

    def _seconds_next(self, step: int, now: float) -> int | None:
        st = self.step_time
        if st is None:
            return None
        left = self.schedule.ckpt_seconds - (now - self._last_save_time)
        return step + max(1, math.ceil(left / st))

    def _end(self, step: int, now: float, *, first: bool,
             events: list[tuple[str, dict[str, Any]]] | None = None) -> int:
        s = self.schedule
        end = min(step + self.k, s.steps)
        save_at: int | None = None
        if s.checkpoints and s.ckpt_every:
            save_at = (step // s.ckpt_every + 1) * s.ckpt_every
        elif s.checkpoints and not first and s.ckpt_seconds:
            save_at = self._seconds_next(step, now)
        elif s.checkpoints and not first and s.interval is not None:
            nxt = self._interval_next(step, events if events is not None else [])
            save_at = nxt if nxt is not None and nxt > step else None
        if save_at is not None:
            end = min(end, save_at)
        if s.diagnose_every:
            # The periodic diagnostics run at a boundary: end there too.
            end = min(end, (step // s.diagnose_every + 1) * s.diagnose_every)
        busy = self._pending or (self._awaiting_delta and s.interval is not None)
        if busy and not first:
            k_pending = self._pending_k()
            if end == save_at:
                # One poll on the way to the next save, once the write should
                # be done: the commit then starts in the background and the
                # save finds it finished instead of waiting for it.
                cut = self._pending_polls == 0 and end - step > 2 * k_pending
            else:
                # Cut only a segment that would run on well past the write.
                cut = end - step > _PENDING_REACH * k_pending
            if cut:
                end = step + k_pending
                self._pending_polls += 1
        if self._halt_at is not None and self._halt_at > step:
            end = min(end, self._halt_at)
        st = self.step_time
        if s.max_segment_s > 0 and st:
            window = max(s.max_segment_s, min(s.max_segment_stretch_s, self.k * st))
            end = min(end, step + max(1, int(window / st)))
        return max(end, min(step + 1, s.steps))

    def _pending_k(self) -> int:
        """Segment length while a write is in flight (see the comment at the top)."""
        st = self.step_time
        first = K_START if self._write_s is None or st is None else math.ceil(self._write_s / st)
        return max(K_MIN, min(self.k, first << min(self._pending_polls, 20)))
