"""``Runtime`` and ``rt.loop``: the two lines an app changes.

::

    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        for step, app in rt.loop(lambda comm: MyApp(comm), steps=1000):
            app.step()

The loop is a generator. It yields ``(step, app)``; the body runs the step;
control comes back to the generator, which injects faults, runs detectors,
and at segment boundaries agrees, commits or re-executes. Re-execution is
the generator yielding earlier steps again after restoring the snapshot, so
the loop body never sees a fault.
"""

from __future__ import annotations

import glob
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

from mpi4py import MPI

from ulfmpy.comm import ResilientComm
from ulfmpy.config import Config
from ulfmpy.detect import get_detector, run_detectors
from ulfmpy.errors import EXIT_RELAUNCH, EXIT_UNRECOVERABLE, FaultSignal, RetriesExhausted
from ulfmpy.events import EventLog, write_json_atomic
from ulfmpy.inject import FaultPlan
from ulfmpy.segment import Report, Snapshot, agree_reports, closure
from ulfmpy.state import fingerprint, normalize_state, state_nbytes

__all__ = ["Runtime"]


class _AppView:
    """The app as detectors see it, with a ``Runtime(invariant=...)`` override."""

    def __init__(self, app: Any, invariant: Callable[[Any], bool] | None) -> None:
        self._app = app
        self._invariant = invariant

    def __getattr__(self, name: str) -> Any:
        if name == "invariant" and self._invariant is not None:
            return lambda: self._invariant(self._app)
        return getattr(self._app, name)


class Runtime:
    """Fault-tolerance runtime of one job. Use as a context manager.

    Collective over ``comm``: every rank enters and leaves it together, with
    equal settings (checked on entry).

    Args:
        comm: the communicator of the job (``MPI.COMM_WORLD`` in ``main()``);
            the runtime works on its own duplicate.
        invariant: optional ``fn(app) -> bool`` for the ``invariant`` detector.
        **settings: any :class:`~ulfmpy.config.Config` field; ``ULFMPY_*``
            environment variables fill the rest.
    """

    def __init__(self, comm: MPI.Comm, *, invariant: Callable[[Any], bool] | None = None,
                 **settings: Any) -> None:
        self.config = Config.load(**settings)
        self._world = comm
        self._invariant = invariant
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.ft = os.environ.get("ULFMPY_FT", "ulfm" if _has_ulfm() else "none") == "ulfm"
        self.summary: dict[str, Any] = {}
        self.comm: ResilientComm | MPI.Comm
        self._counters = {"segments": 0, "reexecuted_rank_steps": 0,
                          "injected_faults": 0, "escaped_faults": 0}
        self._rollbacks: list[dict[str, Any]] = []

    # -- context ------------------------------------------------------------
    def __enter__(self) -> "Runtime":
        cfg = self.config
        for name in cfg.detect:
            get_detector(name)  # unknown names fail before any work
        run_dir = cfg.run_dir
        if run_dir is None:
            from ulfmpy.launch import default_run_dir

            run_dir = self._world.bcast(default_run_dir() if self.rank == 0 else None, root=0)
        self.run_dir = os.path.abspath(run_dir)
        self._dup = self._world.Dup()
        self._dup.Set_errhandler(MPI.ERRORS_RETURN)
        cfg.check_uniform(self._dup)
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
        self._dup.Barrier()
        self.events = EventLog(self.run_dir, self.rank)
        if cfg.resilience:
            self._replay_comm = self._dup.Dup()
            self._replay_comm.Set_errhandler(MPI.ERRORS_RETURN)
            self.comm = ResilientComm(self._dup, ft=self.ft)
        else:
            self._replay_comm = None
            self.comm = self._dup
        self.plan = FaultPlan(cfg.inject, self.rank, cfg.seed)
        self.events.log("start", size=self.size, ft=self.ft, config=cfg.as_dict(),
                        mpi=MPI.Get_library_version().splitlines()[0])
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, etype: Any, exc: Any, tb: Any) -> None:
        self.events.log("exit", error=None if exc is None else repr(exc))
        if exc is None:
            self.events.close()
            if self._replay_comm is not None:
                self._replay_comm.Free()
            self._dup.Free()
            return
        if self.ft:
            self._end_job(exc)

    def _end_job(self, exc: BaseException) -> None:
        """End this rank so the whole job ends (never a hang). Does not return.

        Under ULFM a rank that calls ``MPI_Abort`` (what ``python -m mpi4py``
        does on an uncaught exception) was seen to hang the job, so ranks end
        themselves instead: a rank whose own code failed leaves an abort
        marker, revokes and SIGKILLs itself (SIGKILL is reliably detected);
        the others see the failure, find the marker and exit with
        EXIT_UNRECOVERABLE. A hard failure with no in-job recovery left exits
        with EXIT_RELAUNCH: the newest committed checkpoint resumes the job.
        """
        marker = self._abort_marker()
        if isinstance(exc, FaultSignal):
            code = EXIT_UNRECOVERABLE if marker else EXIT_RELAUNCH
            self.events.log("job_end", code=code, reason=repr(exc), abort_marker=marker)
            self.events.close()
            print(f"ulfmpy: rank {self.rank}: {exc}; "
                  + (f"rank stopped on an error ({marker})" if marker else
                     "no in-job recovery: exiting for relaunch"), file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(code)
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        path = os.path.join(self.run_dir, f"abort-rank-{self.rank:04d}.json")
        write_json_atomic(path, {"rank": self.rank, "error": repr(exc)})
        self.events.log("job_end", code=EXIT_UNRECOVERABLE, reason=repr(exc))
        self.events.close()
        sys.stdout.flush()
        sys.stderr.flush()
        for c in (self._replay_comm, self._dup):
            if c is not None:
                try:
                    c.Revoke()
                except MPI.Exception:
                    pass
        os.kill(os.getpid(), signal.SIGKILL)

    def _abort_marker(self) -> str | None:
        found = sorted(glob.glob(os.path.join(self.run_dir, "abort-rank-*.json")))
        return os.path.basename(found[0]) if found else None

    # -- the loop -------------------------------------------------------------
    def loop(self, factory: Callable[[Any], Any], steps: int, *,
             start: int = 0) -> Iterator[tuple[int, Any]]:
        """Drive the timestep loop; yields ``(step, app)``.

        Collective over the runtime's communicator: every rank iterates.
        ``factory(comm)`` builds the app on ``rt.comm``; its ``state`` holds
        everything the loop carries between steps. At the end the summary
        (with the global fingerprint) is written and kept in ``rt.summary``.
        """
        app = factory(self.comm)
        state = normalize_state(app.state)
        self.app, self.state = app, state
        self._view = _AppView(app, self._invariant)
        if not self.config.resilience:
            for step in range(start, steps):
                yield step, app
            self._finish(steps, state)
            return
        k = self.config.segment_steps
        snap = Snapshot(state)
        self.events.log("segments", k=k, state_bytes=state_nbytes(state))
        step = start
        while step < steps:
            yield from self._segment(step, min(step + k, steps), snap)
            step = min(step + k, steps)
        self._finish(steps, state)

    def _detect(self) -> tuple[str, str] | None:
        return run_detectors(self.config.detect, self._view, self.state)

    def _after_step(self, step: int, *, replay: bool) -> None:
        for rec in self.plan.flips_after_step(step, self.state, replay=replay):
            self.events.log("inject", replay=replay, **rec)
            if not replay:
                self._seg_flips.append(step)

    def _segment(self, first: int, end: int, snap: Snapshot) -> Iterator[tuple[int, Any]]:
        cfg, comm, app = self.config, self.comm, self.app
        assert isinstance(comm, ResilientComm)
        snap.take(first)
        comm.begin_segment()
        self._seg_flips: list[int] = []
        report = Report()
        repaired_through = -1  # last step a lone catch-up re-executed
        s = first
        while s < end:
            yield s, app
            self._after_step(s, replay=False)
            if (cfg.detect_every and s + 1 < end and (s + 1 - first) % cfg.detect_every == 0
                    and not report.detected):
                hit = self._detect()
                if hit:
                    report = yield from self._catch_up(first, s, snap, hit, report)
                    if report.repaired_steps:
                        repaired_through = s
            s += 1
        if not report.detected:
            hit = self._detect()
            if hit:
                self.events.log("detection", step=end - 1, detector=hit[0], finding=hit[1],
                                when="segment")
                report = Report(detected=True, detector=hit[0], finding=hit[1],
                                contaminated=report.contaminated,
                                collective_mismatch=report.collective_mismatch,
                                diverged=report.diverged, repaired_steps=report.repaired_steps)
        reports = agree_reports(comm.mpi_comm, report)
        S = closure((), reports, self.size)
        lone = [r for r, rep in enumerate(reports) if rep.repaired_steps]
        if not S:
            if lone:
                self._record_rollback(first, lone, frozenset(), rounds=0, seconds=0.0,
                                      reexec=sum(rep.repaired_steps for rep in reports))
            self._commit(first, end, comm, in_S=False, repaired_through=repaired_through)
            return
        if cfg.rollback == "global":
            S = frozenset(range(self.size))
        t0 = time.perf_counter()
        rounds = retries = 0
        reexec = sum(rep.repaired_steps for rep in reports)
        detected_on = sorted(r for r, rep in enumerate(reports) if rep.detected) or sorted(S)
        while True:
            rounds += 1
            mine = Report()
            if self.rank in S:
                snap.restore()
                comm.begin_replay(S, self._replay_comm)
                for r in range(first, end):
                    yield r, app
                    self._after_step(r, replay=True)
                out = comm.end_replay(resume_live=False)
                hit = self._detect()
                mine = Report(detected=hit is not None, detector=hit and hit[0],
                              finding=hit and hit[1], contaminated=frozenset(out.contaminated),
                              collective_mismatch=out.collective_mismatch, diverged=out.diverged)
            reports = agree_reports(comm.mpi_comm, mine)
            reexec += len(S) * (end - first)
            grown = closure(S, [Report(contaminated=r.contaminated,
                                       collective_mismatch=r.collective_mismatch,
                                       diverged=r.diverged) for r in reports], self.size)
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
                    comm.end_segment()
                    raise RetriesExhausted(
                        f"segment at step {first}: ranks {bad} detected the error again in "
                        f"{retries} re-executions (a persistent fault); raise --max-retries "
                        "or enable global checkpoints (--ckpt-every) to roll back further")
                continue
            break
        self._record_rollback(first, lone, S, rounds=rounds, seconds=time.perf_counter() - t0,
                              reexec=reexec, detected_on=detected_on)
        self._commit(first, end, comm, in_S=self.rank in S, repaired_through=repaired_through)

    def _catch_up(self, first: int, s: int, snap: Snapshot, hit: tuple[str, str],
                  report: Report) -> Iterator[tuple[int, Any]]:
        """Re-execute steps first..s alone after a per-step detection.

        The others keep running; every message this rank needs comes from its
        log, and its re-sent messages are checked against what it sent: if one
        differs, the receiver was reached and the segment-end agreement grows S.
        """
        self.events.log("detection", step=s, detector=hit[0], finding=hit[1], when="step")
        comm = self.comm
        assert isinstance(comm, ResilientComm)
        snap.restore()
        comm.begin_replay({self.rank}, self._replay_comm)
        for r in range(first, s + 1):
            yield r, self.app
            self._after_step(r, replay=True)
        out = comm.end_replay(resume_live=True)
        again = self._detect()
        self.events.log("catch_up", first=first, last=s, detected_again=again is not None,
                        contaminated=sorted(out.contaminated),
                        collective_mismatch=out.collective_mismatch)
        return Report(detected=again is not None, detector=hit[0], finding=hit[1],
                      contaminated=report.contaminated | frozenset(out.contaminated),
                      collective_mismatch=out.collective_mismatch or report.collective_mismatch,
                      diverged=out.diverged or report.diverged,
                      repaired_steps=report.repaired_steps + s + 1 - first)

    def _record_rollback(self, first: int, lone: list[int], S: frozenset[int], *,
                         rounds: int, seconds: float, reexec: int,
                         detected_on: list[int] | None = None) -> None:
        rec = {"step": first,
               "detected_on": detected_on if detected_on is not None else lone,
               "reexecuted_ranks": sorted(set(S) | set(lone)),
               "rounds": rounds + (1 if lone else 0),
               "seconds": seconds, "reexecuted_rank_steps": reexec}
        self._rollbacks.append(rec)
        self._counters["reexecuted_rank_steps"] += reexec
        self.events.log("rollback", **rec)

    def _commit(self, first: int, end: int, comm: ResilientComm, *, in_S: bool,
                repaired_through: int) -> None:
        comm.end_segment()
        self._counters["segments"] += 1
        for step in self._seg_flips:
            self._counters["injected_faults"] += 1
            # A flip is cured when this rank re-executed the step it struck.
            if not in_S and step > repaired_through:
                self._counters["escaped_faults"] += 1
                self.events.log("escaped", step=step)
        self.events.log("segment", step=first, end=end)

    # -- end of run -------------------------------------------------------------
    def _finish(self, steps: int, state: dict[str, Any]) -> None:
        comm = self.comm.mpi_comm if isinstance(self.comm, ResilientComm) else self.comm
        wall = time.perf_counter() - self._t0
        fp = fingerprint(comm, state)
        counts = comm.allgather((self._counters["injected_faults"], self._counters["escaped_faults"]))
        totals = [sum(c[0] for c in counts), sum(c[1] for c in counts)]
        wall = comm.allreduce(wall, op=MPI.MAX)
        self.summary = {
            "ranks": self.size, "steps": steps, "wall_s": wall, "fingerprint": fp,
            "resilience": self.config.resilience,
            "segment_steps": self.config.segment_steps if self.config.resilience else None,
            "segments": self._counters["segments"],
            "rollbacks": self._rollbacks,
            "reexecuted_rank_steps": self._counters["reexecuted_rank_steps"],
            "injected_faults": totals[0], "escaped_faults": totals[1],
            "run_dir": self.run_dir,
        }
        self.events.log("finish", fingerprint=fp, wall_s=wall)
        if self.rank == 0:
            write_json_atomic(os.path.join(self.run_dir, "summary.json"), self.summary)


def _has_ulfm() -> bool:
    return hasattr(MPI.Comm, "Shrink") and hasattr(MPI.Comm, "Revoke")
