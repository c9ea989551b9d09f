"""The segment protocol (docs/architecture.md, "Segments and local rollback"): live run, lone catch-up, replay rounds, commit.

:meth:`SegmentRunner.run` is a generator the runtime's loop delegates to
(``yield from``): it yields ``(step, app)`` for the loop body, and between
yields it injects faults, runs detectors and, at the segment's end, agrees
with every rank on the set E of ranks that found an error, re-executes the
contaminated ranks S (restore the snapshot, replay from the message log)
until S stops growing, and commits. It returns the :class:`Agreed` outcome
of the end-of-segment ``Allreduce``, which also carries rank 0's plan for
the next boundary (docs/architecture.md, "Who decides where a segment ends"): the fault-free path sends one small message.

Collective over the compute communicator: every compute rank runs the same
segment ``[first, end)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
from mpi4py import MPI

from ulfmpy.detect import run_detectors
from ulfmpy.identity import sync_state
from ulfmpy.errors import GlobalRollback, LatentError
from ulfmpy.segment import Report, agree_reports, closure, trusted

__all__ = ["SegmentRunner", "SegmentTiming", "Agreed", "PLAN_SLOTS"]

#: Slots of the end-of-segment vector after the report flag, in order:
#: rank 0's save, next end and segment length (others send 0), every rank's last exposed
#: save time in ns (the maximum reaches rank 0), and whether any rank's
#: asynchronous write is still unfinished (1) — all reduced with MAX.
PLAN_SLOTS = 6


@dataclass(frozen=True)
class SegmentTiming:
    """What a segment measured on this rank, before the agreement.

    Attributes:
        first, end: the segment's steps ``[first, end)``.
        t_start: ``perf_counter`` after the snapshot, as the first step began.
        t_steps_end: as the last step's body returned (before the detectors).
        snapshot_s: what the segment-start snapshot took.
        clean: no error found and nothing re-executed on this rank.
    """

    first: int
    end: int
    t_start: float
    t_steps_end: float
    snapshot_s: float
    clean: bool


@dataclass(frozen=True)
class Agreed:
    """The end-of-segment agreement as every rank sees it.

    Attributes:
        save: checkpoint at this boundary (rank 0's decision).
        next_end: where the next segment ends (rank 0's decision).
        k: the segment length in use (rank 0's policy).
        delta_ns: the maximum over ranks of the last save's exposed time.
        writes_ready: every rank's asynchronous write has finished its phase.
        halt: some rank asked for a halt (:mod:`ulfmpy.halt`): save and stop here.
        timing: this rank's measurements of the segment.
    """

    save: bool
    next_end: int
    k: int
    delta_ns: int
    writes_ready: bool
    timing: SegmentTiming
    halt: bool = False


class SegmentRunner:
    """Runs segments for one rank. Local object; :meth:`run` is collective.

    Args:
        config: the run's :class:`~ulfmpy.config.Config`.
        comm: the rank's :class:`~ulfmpy.comm.ResilientComm`.
        events: the rank's event log.
        hooks: fault-injection hooks (:mod:`ulfmpy.faults`).
    """

    def __init__(self, config: Any, comm: Any, events: Any, hooks: Any) -> None:
        self.config, self.comm, self.events, self.hooks = config, comm, events, hooks
        self.counters = {"segments": 0, "reexecuted_rank_steps": 0,
                         "injected_faults": 0, "escaped_faults": 0}
        self.rollbacks: list[dict[str, Any]] = []
        self.cur_step = 0
        self._vec = np.zeros(1 + PLAN_SLOTS, dtype=np.int64)
        self._late_told = False
        self._diagnostics = config.diagnostics()
        self._escaped_at: list[int] = []  # steps of flips counted as escaped

    def _late_log(self, step: int) -> bool:
        """Whether this segment logged a receive late (see
        ``ResilientComm.late_receives``); said once per run in the events."""
        n = self.comm.late_receives()
        if n and not self._late_told:
            self._late_told = True
            self.events.log("late_receive", step=step, receives=n, hint=(
                "a receive was completed by mpi4py's own Request class and logged only at "
                "ulfmpy's next call, so a buffer changed in between would be logged changed; "
                "this rank never replays from its log (a rollback re-executes every rank). "
                "Complete requests with MPI.Request inside rt.loop, req.Wait() or "
                "rt.comm.Waitall(reqs) to keep rollbacks local"))
        return bool(n)

    # -- small pieces -------------------------------------------------------------
    def _detect(self, work: Any) -> tuple[str, str] | None:
        sync_state(work)
        return run_detectors(self.config.detect, work.view, work.state)

    def _after_step(self, step: int, work: Any, logical: int | None, *, replay: bool) -> None:
        self.cur_step = step
        self.comm.check_failure()
        if self.hooks.active:  # a flip strikes the array the state names now
            sync_state(work)
        self.hooks.after_step(step, work.state, replay=replay, logical=logical)

    def abandon(self) -> None:
        """The segment will not commit (global rollback): its flips count as cured."""
        self.counters["injected_faults"] += len(self.hooks.flips)
        self.hooks.flips.clear()

    def cured_since(self, step: int) -> None:
        """Every rank went back to checkpoint ``step`` (a late diagnosis): flips
        that struck since, counted as escaped when their segments committed,
        are undone."""
        cured = [s for s in self._escaped_at if s >= step]
        if cured:
            self._escaped_at = [s for s in self._escaped_at if s < step]
            self.counters["escaped_faults"] -= len(cured)
            self.events.log("escape_cured", steps=cured, restored_step=step)

    def _diagnose(self, work: Any, end: int) -> tuple[str, str, int] | None:
        """The periodic diagnostics due at step ``end``: (name, finding, latency) of a hit."""
        from ulfmpy.detect import get_detector

        for d in self._diagnostics:
            if end % d.every == 0:
                sync_state(work)
                found = get_detector(d.name)(work.view, work.state)
                if found:
                    return d.name, found, d.latency_steps()
        return None

    # -- the segment ----------------------------------------------------------------
    def run(self, me: Any, work: Any, first: int, end: int,
            plan: Callable[[SegmentTiming], np.ndarray]) -> Iterator[tuple[int, Any]]:
        """Run steps ``[first, end)`` as one segment; returns :class:`Agreed`.

        Collective over ``me.compute``. ``plan(timing)`` gives this rank's
        :data:`PLAN_SLOTS` values for the agreement.

        Raises:
            GlobalRollback: re-execution kept detecting the error.
            ProcessFailure: a rank died (from a communication call).
        """
        cfg, comm, app, snap, hooks = self.config, self.comm, work.app, work.snap, self.hooks
        t = time.perf_counter()
        sync_state(work)
        if snap.fresh == first:
            # The boundary before copied the state already (a checkpoint
            # saved from this copy, or a restore filled it): the same bytes.
            snap.fresh = None
            t -= snap.seconds
        else:
            snap.take(first)
        t_start = time.perf_counter()
        comm.begin_segment(end - first)
        hooks.flips.clear()
        report = Report()
        repaired_through = -1  # last step a lone catch-up re-executed
        s = first
        if not cfg.detect_every and not hooks.active:
            # The common case, kept lean: it runs once per step.
            while s < end:
                yield s, app
                self.cur_step = s
                if comm.failure is not None:
                    raise comm.failure
                s += 1
        while s < end:
            yield s, app
            self._after_step(s, work, me.logical, replay=False)
            if (cfg.detect_every and s + 1 < end and (s + 1 - first) % cfg.detect_every == 0
                    and not report.detected):
                hit = self._detect(work)
                if hit and cfg.rollback == "global":
                    # The comparison mode: no lone catch-up, everyone redoes the segment.
                    self.events.log("detection", step=s, detector=hit[0], finding=hit[1],
                                    when="step")
                    report = Report(detected=True, detector=hit[0], finding=hit[1])
                elif hit and self._late_log(s):
                    # Its log is not trusted: no catch-up from it; the
                    # agreement sends every rank back (trusted()).
                    self.events.log("detection", step=s, detector=hit[0], finding=hit[1],
                                    when="step")
                    report = Report(detected=True, detector=hit[0], finding=hit[1],
                                    contaminated=report.contaminated,
                                    collective_mismatch=report.collective_mismatch,
                                    diverged=report.diverged,
                                    repaired_steps=report.repaired_steps,
                                    repair_s=report.repair_s)
                elif hit:
                    report = yield from self._catch_up(me, work, first, s, hit, report)
                    if report.repaired_steps:
                        repaired_through = s
            s += 1
        t_steps_end = time.perf_counter()
        if not report.detected:
            hit = self._detect(work)
            if hit:
                self.events.log("detection", step=end - 1, detector=hit[0], finding=hit[1],
                                when="segment")
                report = Report(detected=True, detector=hit[0], finding=hit[1],
                                contaminated=report.contaminated,
                                collective_mismatch=report.collective_mismatch,
                                diverged=report.diverged, repaired_steps=report.repaired_steps)
        if not report.detected and self._diagnostics:
            late = self._diagnose(work, end)
            if late:
                self.events.log("detection", step=end - 1, detector=late[0], finding=late[1],
                                when="diagnostic", latency=late[2])
                report = replace(report, detected=True, detector=late[0], finding=late[1],
                                 latent=late[2])
        if self._late_log(end - 1):
            report = replace(report, late_log=True)
        timing = SegmentTiming(first, end, t_start, t_steps_end, t_start - t,
                               clean=not report.detected and not report.repaired_steps)
        reports, agreed = self._agree(me, report, timing, plan)
        latent = [rep for rep in reports if rep.latent is not None]
        if latent:
            # Re-executing this segment cannot cure an error that may be older:
            # every rank goes back to a checkpoint before it (the runtime's part).
            self.comm.end_segment()
            self.abandon()
            first_hit = latent[0]
            raise LatentError(end, max(int(rep.latent or 0) for rep in latent),
                              str(first_hit.detector), str(first_hit.finding))
        lone = [r for r, rep in enumerate(reports) if rep.repaired_steps]
        fetched: frozenset[int] = frozenset()  # ranks holding their originals (same everywhere)
        if lone and len(lone) < me.size:
            reports = self._verify_lone(me, reports, lone)
            fetched = frozenset(lone)
        late = frozenset(r for r, rep in enumerate(reports) if rep.late_log)
        S = trusted(closure((), reports, me.size), late, me.size)
        lone_s = max((rep.repair_s for rep in reports), default=0.0)
        if not S:
            if lone:
                self._record_rollback(first, lone, frozenset(), rounds=0, seconds=lone_s,
                                      reexec=sum(rep.repaired_steps for rep in reports))
            self._commit(first, end, in_S=False, repaired_through=repaired_through)
            return agreed
        if cfg.rollback == "global":
            S = frozenset(range(me.size))
        detected_on = sorted({r for r, rep in enumerate(reports) if rep.detected} | set(lone)) \
            or sorted(S)
        reexec = sum(rep.repaired_steps for rep in reports)
        S, rounds, reexec, seconds = yield from self._rounds(me, work, first, end, S, fetched,
                                                             reexec, late)
        self._record_rollback(first, lone, S, rounds=rounds, seconds=lone_s + seconds,
                              reexec=reexec, detected_on=detected_on)
        self._commit(first, end, in_S=me.rank in S, repaired_through=repaired_through)
        return agreed

    def _agree(self, me: Any, report: Report, timing: SegmentTiming,
               plan: Callable[[SegmentTiming], np.ndarray]) -> tuple[list[Report], Agreed]:
        """The end-of-segment agreement: one small ``Allreduce`` when all is quiet."""
        for s in range(timing.first, timing.end):
            self.hooks.kill_point("agreement", s)
        vec = self._vec
        vec[0] = 0 if report == Report() else 1
        vec[1:] = plan(timing)
        self.comm.mpi_comm.Allreduce(MPI.IN_PLACE, vec, op=MPI.MAX)
        agreed = Agreed(save=bool(vec[1]), next_end=int(vec[2]), k=int(vec[3]),
                        delta_ns=int(vec[4]), writes_ready=not vec[5], timing=timing,
                        halt=bool(vec[6]))
        if vec[0] == 0:
            return [Report()] * me.size, agreed
        # Only when some rank has something to report do all exchange full reports.
        return agree_reports(self.comm.mpi_comm, report), agreed

    def _rounds(self, me: Any, work: Any, first: int, end: int, S: frozenset[int],
                fetched: frozenset[int], reexec: int,
                late: frozenset[int] = frozenset()) -> Iterator[tuple[int, Any]]:
        """Re-execute S until it stops growing (docs/architecture.md, "Segments and local rollback" step 5). Collective."""
        cfg, comm, app = self.config, self.comm, work.app
        t0 = time.perf_counter()
        rounds = retries = 0
        while True:
            rounds += 1
            mine = Report()
            if len(S) < me.size and not S <= fetched:
                # The originals of what S will re-send to the others; a retry
                # or a grown S keeps what earlier rounds fetched.
                comm.fetch_originals(S - fetched)
                fetched |= S
            if me.rank in S:
                sync_state(work)
                work.snap.restore()
                comm.begin_replay(S, me.replay)
                for r in range(first, end):
                    yield r, app
                    self._after_step(r, work, me.logical, replay=True)
                out = comm.end_replay(resume_live=False)
                hit = self._detect(work)
                mine = Report(detected=hit is not None, detector=hit and hit[0],
                              finding=hit and hit[1], contaminated=frozenset(out.contaminated),
                              collective_mismatch=out.collective_mismatch, diverged=out.diverged)
            reports = agree_reports(comm.mpi_comm, mine)
            reexec += len(S) * (end - first)
            grown = closure(S, [Report(contaminated=r.contaminated,
                                       collective_mismatch=r.collective_mismatch,
                                       diverged=r.diverged) for r in reports], me.size)
            grown = trusted(grown, late, me.size)
            self.events.log("rollback_round", step=first, round=rounds, S=sorted(S),
                            grown=sorted(grown - S),
                            detected=[r for r, rep in enumerate(reports) if rep.detected])
            if grown != S:
                S = grown
                continue
            if any(rep.detected for rep in reports):
                retries += 1
                if retries > cfg.max_retries:
                    bad = [r for r, rep in enumerate(reports) if rep.detected]
                    self.events.log("retries_exhausted", step=first, ranks=bad)
                    self.counters["reexecuted_rank_steps"] += reexec
                    comm.end_segment()
                    raise GlobalRollback(first, (
                        f"segment at step {first}: ranks {bad} detected the error again in "
                        f"{retries} re-executions (a persistent fault)"))
                continue
            return S, rounds, reexec, time.perf_counter() - t0

    def _catch_up(self, me: Any, work: Any, first: int, s: int, hit: tuple[str, str],
                  report: Report) -> Iterator[tuple[int, Any]]:
        """Re-execute steps first..s alone after a per-step detection.

        The others keep running; every message this rank needs comes from its
        log, and it keeps what it re-sends: at the segment's end the receivers
        hand back the originals (``_verify_lone``), and a difference means the
        receiver was reached, so S grows.
        """
        self.events.log("detection", step=s, detector=hit[0], finding=hit[1], when="step")
        t0 = time.perf_counter()
        comm = self.comm
        sync_state(work)
        work.snap.restore()
        comm.begin_replay({me.rank}, me.replay)
        for r in range(first, s + 1):
            yield r, work.app
            self._after_step(r, work, me.logical, replay=True)
        out = comm.end_replay(resume_live=True)
        again = self._detect(work)
        self.events.log("catch_up", first=first, last=s, detected_again=again is not None,
                        contaminated=sorted(out.contaminated),
                        collective_mismatch=out.collective_mismatch)
        return Report(detected=again is not None, detector=hit[0], finding=hit[1],
                      contaminated=report.contaminated | frozenset(out.contaminated),
                      collective_mismatch=out.collective_mismatch or report.collective_mismatch,
                      diverged=out.diverged or report.diverged,
                      repaired_steps=report.repaired_steps + s + 1 - first,
                      repair_s=report.repair_s + time.perf_counter() - t0)

    def _verify_lone(self, me: Any, reports: list[Report], lone: list[int]) -> list[Report]:
        """After lone catch-ups: did a re-sent message differ from the original?

        Collective over the compute communicator. The catching-up ranks kept
        what they re-sent; their receivers hand back the originals; a
        difference means the receiver consumed corrupted data, so it joins S.
        """
        comm = self.comm
        comm.fetch_originals(lone)
        mine = Report(contaminated=frozenset(comm.verify_resent()))
        if mine.contaminated:
            self.events.log("catch_up_verified", contaminated=sorted(mine.contaminated))
        extra = agree_reports(comm.mpi_comm, mine)
        return [Report(**{**rep.__dict__, "contaminated": rep.contaminated | x.contaminated})
                for rep, x in zip(reports, extra)]

    def _record_rollback(self, first: int, lone: list[int], S: frozenset[int], *,
                         rounds: int, seconds: float, reexec: int,
                         detected_on: list[int] | None = None) -> None:
        rec = {"step": first,
               "detected_on": detected_on if detected_on is not None else lone,
               "reexecuted_ranks": sorted(set(S) | set(lone)),
               "rounds": rounds + (1 if lone else 0),
               "seconds": seconds, "reexecuted_rank_steps": reexec}
        self.rollbacks.append(rec)
        self.counters["reexecuted_rank_steps"] += reexec
        self.events.log("rollback", **rec)

    def _commit(self, first: int, end: int, *, in_S: bool, repaired_through: int) -> None:
        self.comm.end_segment()
        self.counters["segments"] += 1
        for step in self.hooks.flips:
            self.counters["injected_faults"] += 1
            # A flip is cured when this rank re-executed the step it struck.
            if not in_S and step > repaired_through:
                self.counters["escaped_faults"] += 1
                self._escaped_at.append(step)
                self.events.log("escaped", step=step)
        self.hooks.flips.clear()
        self.events.log("segment", step=first, end=end)
