"""``Runtime`` and ``rt.loop``: the two lines an app changes.

::

    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        for step, app in rt.loop(lambda comm: MyApp(comm), steps=1000):
            app.step()

The loop is a generator. It yields ``(step, app)``; the body runs the step;
control comes back to the generator, which injects faults, runs detectors,
and at segment boundaries agrees, commits, checkpoints or re-executes.
Re-execution is the generator yielding earlier steps again after restoring
the snapshot, so the loop body never sees a fault. A dead rank voids the
rest of the iteration on every rank (communication calls return at once);
the generator then repairs the communicator and yields the checkpoint's step.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
from mpi4py import MPI

from ulfmpy import recovery as _rec
from ulfmpy.comm import ResilientComm
from ulfmpy.config import Config
from ulfmpy.detect import get_detector, run_detectors
from ulfmpy.errors import (UlfmpyError, EXIT_RELAUNCH, EXIT_UNRECOVERABLE, ConfigError, FaultSignal,
                           ProcessFailure, RecoveryFailed, RetriesExhausted,
                           translate_mpi_error)
from ulfmpy.events import EventLog, write_json_atomic
from ulfmpy.inject import FaultPlan, kill_self
from ulfmpy.partner import PartnerCopies, plan_handover, receive_copy
from ulfmpy.seglength import K_START, SegmentBudget
from ulfmpy.segment import Report, Snapshot, agree_reports, closure
from ulfmpy.state import fingerprint, normalize_state, state_nbytes

__all__ = ["Runtime"]

_SPARE_TAG = 7301
_MAX_REPAIRS = 8


class _AppView:
    """The app as detectors see it, with a ``Runtime(invariant=...)`` override."""

    def __init__(self, app: Any, invariant: Callable[[Any], bool] | None) -> None:
        self._app = app
        self._invariant = invariant

    def __getattr__(self, name: str) -> Any:
        if name == "invariant" and self._invariant is not None:
            return lambda: self._invariant(self._app)
        return getattr(self._app, name)


class _GlobalRollback(Exception):
    """Local rollback gave up; every rank restores the last checkpoint."""

    def __init__(self, first: int, reason: str) -> None:
        super().__init__(reason)
        self.first = first


class Runtime:
    """Fault-tolerance runtime of one job. Use as a context manager.

    Collective over ``comm``: every rank enters and leaves it together, with
    equal settings (checked on entry). With ``spares=S`` (``ulfmpy run
    --spares S``) the last S ranks of ``comm`` wait inside the runtime and
    never run the loop body unless they replace a failed rank.

    Args:
        comm: the communicator of the job (``MPI.COMM_WORLD`` in ``main()``);
            the runtime works on its own duplicates.
        invariant: optional ``fn(app) -> bool`` for the ``invariant`` detector.
        **settings: any :class:`~ulfmpy.config.Config` field; ``ULFMPY_*``
            environment variables fill the rest.
    """

    def __init__(self, comm: MPI.Comm, *, invariant: Callable[[Any], bool] | None = None,
                 **settings: Any) -> None:
        self.config = Config.load(**settings)
        self._user_comm = comm
        self._invariant = invariant
        self.uid = comm.Get_rank()
        parent = MPI.Comm.Get_parent()
        self._parent = parent if parent != MPI.COMM_NULL else None
        self._respawns = 0
        nspares = 0 if self._parent is not None else self.config.spares
        if nspares >= comm.Get_size():
            raise ConfigError(f"{nspares} spares leave no compute rank out of {comm.Get_size()}")
        self.size = comm.Get_size() - nspares
        self.logical: int | None = self.uid if self.uid < self.size else None
        self.rank = self.logical if self.logical is not None else -1
        self.role = _rec.Role.INITIAL
        self.ft = os.environ.get("ULFMPY_FT", "ulfm") == "ulfm" and _rec.ulfm_available(comm)
        self.summary: dict[str, Any] = {}
        self.comm: ResilientComm | MPI.Comm
        self.store: Any = None
        self._counters = {"segments": 0, "reexecuted_rank_steps": 0,
                          "injected_faults": 0, "escaped_faults": 0}
        self._rollbacks: list[dict[str, Any]] = []
        self._recoveries: list[dict[str, Any]] = []
        self._global_rollbacks: list[dict[str, Any]] = []
        self._restored_from: dict[str, Any] | None = None
        self._replay_comm: MPI.Comm | None = None
        self._seg_flips: list[int] = []
        self._saw_failure = False
        self._partners: PartnerCopies | None = None

    @property
    def is_spare(self) -> bool:
        return self.logical is None

    # -- context ------------------------------------------------------------
    def __enter__(self) -> "Runtime":
        cfg = self.config
        for name in cfg.detect:
            get_detector(name)  # unknown names fail before any work
        if self._parent is not None:
            return self._enter_respawned()
        self._world = self._user_comm.Dup()
        self._world.Set_errhandler(MPI.ERRORS_RETURN)
        run_dir = cfg.run_dir
        if run_dir is None:
            from ulfmpy.launch import default_run_dir

            run_dir = self._world.bcast(default_run_dir() if self.uid == 0 else None, root=0)
        self.run_dir = os.path.abspath(run_dir)
        cfg.check_uniform(self._world)
        if self.uid == 0:
            os.makedirs(self.run_dir, exist_ok=True)
        self._world.Barrier()
        self.events = EventLog(self.run_dir, self.uid)
        self._start_zygote()
        compute = self._world.Split(0 if not self.is_spare else 1, self.uid)
        compute.Set_errhandler(MPI.ERRORS_RETURN)
        self._compute = compute
        self._setup(compute)
        return self

    def _start_zygote(self) -> None:
        """With respawn in the recovery chain, the lowest rank of each node
        makes sure the node's zygote (:mod:`ulfmpy.zygote`) runs: one per
        process for all its Runtimes, stopped at interpreter exit. Collective
        over the world; the settings match on all ranks already."""
        from ulfmpy import zygote

        self._zygote_name: str | None = None
        cfg = self.config
        if not (self.ft and cfg.zygote and "respawn" in cfg.recovery and zygote.available()):
            return
        if self.uid == 0 and _ZYGOTE["job"] is None:
            _ZYGOTE["job"] = f"{os.getpid()}-{time.time_ns() % 10**12}"
        self._zygote_name = zygote.name_for(self._world.bcast(_ZYGOTE["job"], root=0))
        local = self._world.Split_type(MPI.COMM_TYPE_SHARED)
        leader = local.Get_rank() == 0
        local.Free()
        proc = _ZYGOTE["proc"]
        if leader and (proc is None or proc.poll() is not None or
                       _ZYGOTE["name"] != self._zygote_name):
            _stop_zygote()
            log = os.path.join(self.run_dir, f"zygote-{socket.gethostname()}.log")
            proc = zygote.start(self._zygote_name, watch=os.getppid(), log=log)
            _ZYGOTE.update(proc=proc, name=self._zygote_name)
            self.events.log("zygote", name=self._zygote_name, pid=getattr(proc, "pid", None))
            if not _ZYGOTE["atexit"]:
                import atexit

                atexit.register(_stop_zygote)
                _ZYGOTE["atexit"] = True

    def _setup(self, compute: MPI.Comm) -> None:
        cfg = self.config
        self.plan = FaultPlan(cfg.inject, self.uid, cfg.seed,
                              marker_dir=os.path.join(self.run_dir, "injected"))
        self._mtbf_kill = self.plan.mtbf_kill(self.size)
        # Looked up once: _after_step runs every step and must cost next to nothing.
        self._host = socket.gethostname()
        self._any_faults = bool(self.plan.faults)
        if cfg.resilience:
            self.comm = ResilientComm(compute, ft=self.ft)
        else:
            self.comm = compute
        self.events.log("start", size=self.size, spares=cfg.spares, logical=self.logical,
                        ft=self.ft, host=self._host, pid=os.getpid(), config=cfg.as_dict(),
                        relaunch=int(os.environ.get("ULFMPY_RELAUNCH", "0")),
                        mpi=MPI.Get_library_version().splitlines()[0],
                        respawned=getattr(self, "_spawned", False))
        self._t0 = time.perf_counter()

    def _enter_respawned(self) -> "Runtime":
        """A process spawned to replace a dead rank joins the job (respawn policy).

        Collective with the parents' repair: merge, then receive who it is.
        """
        t_merge = time.time()
        merged = self._parent.Merge(high=True)
        merged.Set_errhandler(MPI.ERRORS_RETURN)
        info = merged.bcast(None, root=0)
        self._joined = {"imported_at": _IMPORTED_AT, "warm": _WARM, "merge_called_at": t_merge,
                        "merged_at": time.time()}
        # Keeping the intercommunicator open was seen to crash Open MPI's finalize.
        self._parent.Disconnect()
        self._parent = None
        self._spawned = True
        me = info["new_uids"][self.uid]
        self.uid = me
        self.config = Config(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in info["config"].items()})
        self.run_dir = info["run_dir"]
        self.size = info["size"]
        self.logical = info["assign"][me]
        self.rank = self.logical
        self.role = _rec.Role.RECOVERED
        self._respawns = info["respawns"]
        self._zygote_name = info.get("zygote")
        self._join = info
        self._world = merged
        self.events = EventLog(self.run_dir, self.uid)
        compute = merged.Split(0, self.logical)
        compute.Set_errhandler(MPI.ERRORS_RETURN)
        self._compute = compute
        self._setup(compute)
        return self

    def __exit__(self, etype: Any, exc: Any, tb: Any) -> None:
        self.events.log("exit", error=None if exc is None else repr(exc))
        if exc is None:
            if self.store is not None:
                self.store.close()
            saw = self._saw_failure or getattr(self.comm, "failure", None) is not None
            # A spawned process must finalize: its runtime reports an exit
            # without finalize as an error (prterun then exits 1).
            spawned = self.uid >= 100_000
            if (self._recoveries or self.role != _rec.Role.INITIAL or saw) and not spawned:
                _guard_finalize(self.events)
            self.events.close()
            for c in (self._replay_comm, self._compute, self._world):
                if c is not None:
                    try:
                        c.Free()
                    except MPI.Exception:
                        pass
            return
        if self.store is not None:
            self.store.close()
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
        if isinstance(exc, (FaultSignal, RecoveryFailed)) and not marker:
            code = EXIT_RELAUNCH
        elif marker and isinstance(exc, FaultSignal):
            code = EXIT_UNRECOVERABLE
        else:
            code = None
        if code is not None:
            self.events.log("job_end", code=code, reason=repr(exc), abort_marker=marker)
            self.events.close()
            print(f"ulfmpy: rank {self.uid}: {exc}; "
                  + (f"another rank stopped on an error ({marker})" if marker else
                     "no in-job recovery: exiting for relaunch from the last checkpoint"),
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(code)
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        path = os.path.join(self.run_dir, f"abort-rank-{self.uid:04d}.json")
        write_json_atomic(path, {"rank": self.uid, "error": repr(exc)})
        self.events.log("job_end", code=EXIT_UNRECOVERABLE, reason=repr(exc))
        self.events.close()
        sys.stdout.flush()
        sys.stderr.flush()
        for c in (self._replay_comm, self._compute, self._world):
            if c is not None:
                try:
                    c.Revoke()
                except MPI.Exception:
                    pass
        os.kill(os.getpid(), signal.SIGKILL)

    def _abort_marker(self) -> str | None:
        found = sorted(glob.glob(os.path.join(self.run_dir, "abort-rank-*.json")))
        return os.path.basename(found[0]) if found else None

    # -- building the app -----------------------------------------------------
    def _build(self, comm: Any) -> None:
        app = self._factory(comm)
        self.app = app
        self.state = normalize_state(app.state)
        self._view = _AppView(app, self._invariant)
        self._snap = Snapshot(self.state) if self.config.resilience else None

    def _ckpt_enabled(self) -> bool:
        c = self.config
        return c.resilience and (c.ckpt_every > 0 or c.ckpt_seconds > 0 or c.mtbf > 0
                                 or c.node_mtbf > 0)

    def _open_store(self, step: int) -> None:
        """Open the checkpoint store; ``step`` is where the schedule counts from."""
        from ulfmpy.checkpoint import CheckpointStore

        self.store = CheckpointStore(self.comm.mpi_comm, self.run_dir, keep=self.config.ckpt_keep,
                                     mode=self.config.ckpt_mode, events=self.events,
                                     meta={"config": self.config.as_dict()})
        self.store.prepare(self.state)
        self._last_ckpt_step = step
        self._last_ckpt_time = time.perf_counter()
        self._policy = None
        if self.config.mtbf > 0 or self.config.node_mtbf > 0:
            from ulfmpy.policy import IntervalPolicy

            nodes = max(1, len(set(self.comm.mpi_comm.allgather(socket.gethostname()))))
            self._policy = IntervalPolicy(
                mtbf=self.config.mtbf or None, node_mtbf=self.config.node_mtbf or None,
                nodes=nodes, model=self.config.interval_model,
                save_estimate=None, recovery_estimate=self.config.recovery_estimate)
            self._next_ckpt_step = None

    def _resume(self, start: int) -> int:
        src = self.config.resume
        if src == "none":
            return start
        from ulfmpy.checkpoint import restore

        source = self.run_dir if src == "auto" else src
        rec = restore(self.comm.mpi_comm if isinstance(self.comm, ResilientComm) else self.comm,
                      source, self.state, events=self.events)
        if rec is None:
            self.events.log("resume_none", source=source, reason="no committed checkpoint: fresh start")
            return start
        self._restored_from = {"step": rec.step, "path": rec.path, "fallbacks": rec.fallbacks,
                               "seconds": rec.seconds, "ckpt_ranks": rec.nranks}
        return rec.step

    # -- the loop -------------------------------------------------------------
    def loop(self, factory: Callable[[Any], Any], steps: int, *,
             start: int = 0) -> Iterator[tuple[int, Any]]:
        """Drive the timestep loop; yields ``(step, app)``.

        Collective over the runtime's communicator: every rank iterates.
        ``factory(comm)`` builds the app on ``rt.comm``; its ``state`` holds
        everything the loop carries between steps. After a repair that
        changes the communicator the factory is called again, so the loop may
        yield a new app object. At the end the summary (with the global
        fingerprint) is written and kept in ``rt.summary``.
        """
        self._factory, self._steps, self._step0 = factory, steps, start
        if not self.config.resilience:
            self._build(self.comm)
            step = self._resume(start)
            self._t_loop = time.perf_counter()
            for s in range(step, steps):
                yield s, self.app
            self._finish(steps)
            return
        assert isinstance(self.comm, ResilientComm)
        if getattr(self, "_spawned", False):
            self._spawned = False
            self._new_replay_comm()
            step = self._restore_after_repair(None, self._join["target"], None)
            self.events.log("recovery", policy="respawn", role="recovered",
                            resumed_step=step, uid=self.uid, logical=self.logical,
                            restored_at=time.time(), **self._joined)
        elif self.is_spare:
            step = self._wait_as_spare()  # the repair made its replay communicator
            if step is None:
                return
        else:
            self._build(self.comm)
            step = self._resume(start)
            if self._ckpt_enabled():
                self._open_store(step)
            self._new_replay_comm()
        self.comm.void_on_failure = self.ft
        self._reset_segment_length()
        self.events.log("segments", k=self._k, auto=self._seglen is not None,
                        state_bytes=state_nbytes(self.state), start=step)
        global_rollbacks = 0
        self._agree_buf = np.zeros(3, dtype=np.int64)
        self._t_loop = time.perf_counter()
        while step < steps:
            try:
                end = min(step + self._k, steps)
                yield from self._segment(step, end)
                step = end
                self._checkpoint(step)
            except _GlobalRollback as gr:
                self._t_boundary_from = None
                global_rollbacks += 1
                step = self._global_rollback(gr, global_rollbacks)
            except (ProcessFailure, MPI.Exception) as exc:
                step = self._recover(exc, step)
                # Replacements (spares, respawned ranks) start the segment
                # length afresh; survivors must too, or the first segment
                # ends at different steps on different ranks and the
                # end-of-segment agreement meets a halo exchange.
                self._reset_segment_length()
        self._finish(steps)

    def _reset_segment_length(self) -> None:
        """Segment length back to its start value (same on every rank). Local."""
        cfg = self.config
        self._k = cfg.segment_steps or K_START
        self._seglen = (SegmentBudget(budget=cfg.segment_budget, k=self._k)
                        if not cfg.segment_steps and not cfg.soft_mtbf else None)
        self._t_boundary_from: float | None = None

    # -- one segment ----------------------------------------------------------
    def _detect(self) -> tuple[str, str] | None:
        return run_detectors(self.config.detect, self._view, self.state)

    def _kill_point(self, phase: str, step: int) -> None:
        if not self._any_faults:
            return
        f = self.plan.kill_due(step, phase, host=self._host)
        if f is None:
            return
        self.plan.mark_fired(f, step=step, phase=phase, uid=self.uid)
        self.events.log("inject", kind="kill", spec=f.spec, step=step, phase=phase)
        self.events.close()
        kill_self()

    def _timed_kill(self, step: int | None) -> None:
        f = self.plan.timed_kill_due(time.perf_counter() - self._t0)
        if f is not None:
            self.plan.mark_fired(f, step=step, phase="at", uid=self.uid)
            self.events.log("inject", kind="kill", spec=f.spec, step=step, phase="at")
            self.events.close()
            kill_self()

    def _after_step(self, step: int, *, replay: bool) -> None:
        self._cur_step = step
        self.comm.check_failure()
        if not self._any_faults:
            return
        if not replay:
            self._kill_point("compute", step)
            self._timed_kill(step)
            if self._mtbf_kill is not None and self._mtbf_kill[1] == self.logical:
                f, _, at = self._mtbf_kill
                if self.plan.fired(f):
                    # Another process held this logical rank and was the victim.
                    self._mtbf_kill = None
                elif time.perf_counter() - self._t0 >= at:
                    self._mtbf_kill = None
                    self.plan.mark_fired(f, step=step, phase="mtbf", uid=self.uid, at_s=at)
                    self.events.log("inject", kind="kill", spec=f.spec, step=step, phase="mtbf")
                    self.events.close()
                    kill_self()
        else:
            self._kill_point("rollback", step)
        for rec in self.plan.flips_after_step(step, self.state, replay=replay):
            self.events.log("inject", **rec)
            if rec["execution"] == 1:
                self._seg_flips.append(step)

    def _agree(self, report: Report, first: int, end: int) -> list[Report]:
        for s in range(first, end):
            self._kill_point("agreement", s)
        # Common case first: one small Allreduce, no pickling. Only when some
        # rank has something to report do all ranks exchange full reports.
        quiet = Report(ckpt_due=report.ckpt_due, next_k=report.next_k)
        vec = self._agree_buf
        vec[0] = 0 if report == quiet else 1
        # Rank 0 decides checkpoints and segment length (others' clocks differ).
        vec[1] = int(report.ckpt_due) if self.rank == 0 else 0
        vec[2] = report.next_k if self.rank == 0 else 0
        self.comm.mpi_comm.Allreduce(MPI.IN_PLACE, vec, op=MPI.MAX)
        if vec[0] == 0:
            return [Report(ckpt_due=bool(vec[1]), next_k=int(vec[2]))] + [quiet] * (self.size - 1)
        return agree_reports(self.comm.mpi_comm, report)

    def _segment(self, first: int, end: int) -> Iterator[tuple[int, Any]]:
        cfg, comm, app, snap = self.config, self.comm, self.app, self._snap
        assert isinstance(comm, ResilientComm) and snap is not None
        snap.take(first)
        self._seg_t0 = time.perf_counter()
        if self._t_boundary_from is not None and self._seglen is not None:
            # From the last step of the previous segment to here: what one
            # boundary costs (snapshot, detectors, agreement, waiting).
            self._seglen.observe_boundary(self._seg_t0 - self._t_boundary_from)
        self._t_boundary_from = None
        comm.begin_segment(end - first)
        self._seg_flips = []
        report = Report()
        repaired_through = -1  # last step a lone catch-up re-executed
        s = first
        if not cfg.detect_every and not self._any_faults:
            # The common case, kept lean: it runs once per step.
            while s < end:
                yield s, app
                self._cur_step = s
                if comm.failure is not None:
                    raise comm.failure
                s += 1
        while s < end:
            yield s, app
            self._after_step(s, replay=False)
            if (cfg.detect_every and s + 1 < end and (s + 1 - first) % cfg.detect_every == 0
                    and not report.detected):
                hit = self._detect()
                if hit and cfg.rollback == "global":
                    # The comparison mode: no lone catch-up, everyone redoes the segment.
                    self.events.log("detection", step=s, detector=hit[0], finding=hit[1],
                                    when="step")
                    report = Report(detected=True, detector=hit[0], finding=hit[1])
                elif hit:
                    report = yield from self._catch_up(first, s, hit, report)
                    if report.repaired_steps:
                        repaired_through = s
            s += 1
        t_steps_end = time.perf_counter()
        if not report.detected:
            hit = self._detect()
            if hit:
                self.events.log("detection", step=end - 1, detector=hit[0], finding=hit[1],
                                when="segment")
                report = Report(detected=True, detector=hit[0], finding=hit[1],
                                contaminated=report.contaminated,
                                collective_mismatch=report.collective_mismatch,
                                diverged=report.diverged, repaired_steps=report.repaired_steps)
        clean = not report.detected and not report.repaired_steps
        report = Report(**{**report.__dict__, "ckpt_due": self._ckpt_due(end),
                           "next_k": self._propose_k(first, end, t_steps_end, clean)})
        reports = self._agree(report, first, end)
        self._ckpt_decision = reports[0].ckpt_due
        if reports[0].next_k and reports[0].next_k != self._k:
            self.events.log("segment_length", old=self._k, new=reports[0].next_k, at_step=end)
            self._k = reports[0].next_k
        lone = [r for r, rep in enumerate(reports) if rep.repaired_steps]
        fetched: frozenset[int] = frozenset()  # ranks holding their originals (same everywhere)
        if lone and len(lone) < self.size:
            reports = self._verify_lone(reports, lone)
            fetched = frozenset(lone)
        S = closure((), reports, self.size)
        lone_s = max((rep.repair_s for rep in reports), default=0.0)
        if not S:
            if lone:
                self._record_rollback(first, lone, frozenset(), rounds=0, seconds=lone_s,
                                      reexec=sum(rep.repaired_steps for rep in reports))
            else:
                self._t_boundary_from = t_steps_end
            self._commit(first, end, in_S=False, repaired_through=repaired_through)
            return
        if cfg.rollback == "global":
            S = frozenset(range(self.size))
        t0 = time.perf_counter()
        rounds = retries = 0
        reexec = sum(rep.repaired_steps for rep in reports)
        detected_on = sorted({r for r, rep in enumerate(reports) if rep.detected} | set(lone)) or sorted(S)
        while True:
            rounds += 1
            mine = Report()
            if len(S) < self.size and not S <= fetched:
                # The originals of what S will re-send to the others; a retry
                # or a grown S keeps what earlier rounds fetched.
                comm.fetch_originals(S - fetched)
                fetched |= S
            if self.rank in S:
                snap.restore()
                comm.begin_replay(S, self._replay())
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
                    self._counters["reexecuted_rank_steps"] += reexec
                    comm.end_segment()
                    raise _GlobalRollback(first, (
                        f"segment at step {first}: ranks {bad} detected the error again in "
                        f"{retries} re-executions (a persistent fault)"))
                continue
            break
        self._record_rollback(first, lone, S, rounds=rounds,
                              seconds=lone_s + time.perf_counter() - t0,
                              reexec=reexec, detected_on=detected_on)
        self._commit(first, end, in_S=self.rank in S, repaired_through=repaired_through)

    def _propose_k(self, first: int, end: int, t_steps_end: float, clean: bool) -> int:
        """Rank 0's proposal for the next segment length (0: no change). Local.

        From the soft-error MTBF and the measured snapshot time when
        ``--soft-mtbf`` is set; else, with ``--segment-steps auto``, from the
        overhead budget and the measured boundary and step times.
        """
        if self.rank != 0 or self._snap is None:
            return 0
        if not self.config.soft_mtbf:
            if self._seglen is None:
                return 0
            if clean:
                assert isinstance(self.comm, ResilientComm)
                self._seglen.observe_segment(t_steps_end - self._seg_t0, end - first,
                                             log_bytes=self.comm.log.nbytes,
                                             state_bytes=state_nbytes(self.state))
            d = self._seglen.propose()
            if d is None:
                return 0
            self.events.log("segment_decision", at_step=end, **d)
            return int(d["steps"])
        from ulfmpy.policy import IntervalPolicy

        probe = getattr(self, "_probe", None)
        if probe is None or probe._arrays[0] is not next(iter(self._snap._arrays)):
            probe = self._probe = Snapshot(self.state)  # scratch: the real one must survive
        t0 = time.perf_counter()
        probe.take(first)
        snapshot = time.perf_counter() - t0
        step_time = (time.perf_counter() - self._seg_t0) / max(1, end - first)
        pol = IntervalPolicy(mtbf=self.config.soft_mtbf, model=self.config.interval_model,
                             save_estimate=snapshot)
        d = pol.segment_length(soft_mtbf=self.config.soft_mtbf, snapshot=snapshot,
                               step_time=step_time)
        self.events.log("segment_decision", **d.as_dict())
        return max(1, d.steps)

    def _replay(self) -> MPI.Comm:
        assert self._replay_comm is not None
        return self._replay_comm

    def _new_replay_comm(self) -> None:
        """Collective over the compute communicator: replay traffic gets its own."""
        self._replay_comm = self.comm.mpi_comm.Dup()
        self._replay_comm.Set_errhandler(MPI.ERRORS_RETURN)

    def _catch_up(self, first: int, s: int, hit: tuple[str, str],
                  report: Report) -> Iterator[tuple[int, Any]]:
        """Re-execute steps first..s alone after a per-step detection.

        The others keep running; every message this rank needs comes from its
        log, and it keeps what it re-sends: at the segment's end the receivers
        hand back the originals (``_verify_lone``), and a difference means the
        receiver was reached, so S grows.
        """
        self.events.log("detection", step=s, detector=hit[0], finding=hit[1], when="step")
        t0 = time.perf_counter()
        comm, snap = self.comm, self._snap
        assert isinstance(comm, ResilientComm) and snap is not None
        snap.restore()
        comm.begin_replay({self.rank}, self._replay())
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
                      repaired_steps=report.repaired_steps + s + 1 - first,
                      repair_s=report.repair_s + time.perf_counter() - t0)

    def _verify_lone(self, reports: list[Report], lone: list[int]) -> list[Report]:
        """After lone catch-ups: did a re-sent message differ from the original?

        Collective over the compute communicator. The catching-up ranks kept
        what they re-sent; their receivers hand back the originals; a
        difference means the receiver consumed corrupted data, so it joins S.
        """
        comm = self.comm
        assert isinstance(comm, ResilientComm)
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
        self._rollbacks.append(rec)
        self._counters["reexecuted_rank_steps"] += reexec
        self.events.log("rollback", **rec)

    def _commit(self, first: int, end: int, *, in_S: bool, repaired_through: int) -> None:
        comm = self.comm
        assert isinstance(comm, ResilientComm)
        comm.end_segment()
        self._counters["segments"] += 1
        for step in self._seg_flips:
            self._counters["injected_faults"] += 1
            # A flip is cured when this rank re-executed the step it struck.
            if not in_S and step > repaired_through:
                self._counters["escaped_faults"] += 1
                self.events.log("escaped", step=step)
        self._seg_flips = []
        self.events.log("segment", step=first, end=end)

    # -- checkpoints and global rollback ---------------------------------------
    def _ckpt_due(self, end: int) -> bool:
        """This rank's view of whether to checkpoint at ``end`` (rank 0's decides)."""
        c = self.config
        if self.store is None or end >= self._steps:
            return False
        if self._policy is not None:
            if self._next_ckpt_step is None:
                self._decide_interval(end)
            return end >= self._next_ckpt_step
        if c.ckpt_every and end - self._last_ckpt_step >= c.ckpt_every:
            return True
        return bool(c.ckpt_seconds and time.perf_counter() - self._last_ckpt_time >= c.ckpt_seconds)

    def _decide_interval(self, now_step: int) -> None:
        pol = self._policy
        steps_run = max(1, now_step - self._last_ckpt_step)
        pol.observe_step((time.perf_counter() - self._last_ckpt_time) / steps_run)
        try:
            d = pol.decide()
        except ValueError:
            # No save measured yet: take the first checkpoint now to measure δ.
            self._next_ckpt_step = now_step
            return
        self._next_ckpt_step = self._last_ckpt_step + d.steps
        self.events.log("interval_decision", at_step=now_step, next_step=self._next_ckpt_step,
                        **d.as_dict())

    def _checkpoint(self, step: int) -> None:
        """At a committed boundary: commit finished writes; save when due. Collective."""
        if self.store is None:
            return
        self.store.poll()
        if not getattr(self, "_ckpt_decision", False):
            return
        if any(r.step == step and r.committed for r in self.store.records):
            # Re-running after a rollback: this step is already safe on disk
            # (replay is deterministic), and re-saving would first delete it.
            self._last_ckpt_step, self._last_ckpt_time = step, time.perf_counter()
            return
        self._t_boundary_from = None  # a save is the interval policy's cost, not a boundary's
        if self.store.mode == "sync":
            self._kill_point("checkpoint", step)
        rec = self.store.save(step, self.state)
        if self.store.mode == "async":
            # Staged and handed to the helper, not committed: the worst moment.
            self._kill_point("checkpoint", step)
        if self.config.partner and self.size > 1:
            t0 = time.perf_counter()
            comm = self.comm.mpi_comm
            if self._partners is None:
                self._partners = PartnerCopies(comm.allgather(self._host), self.rank)
            got = self._partners.exchange(comm, step, self.state)
            self.events.log("partner_copy", step=step, holder=self._partners.holder,
                            wards=self._partners.wards, bytes=got,
                            seconds=time.perf_counter() - t0)
        self._last_ckpt_step, self._last_ckpt_time = step, time.perf_counter()
        if self._policy is not None:
            exposed = self.comm.mpi_comm.allreduce(rec.exposed_s, op=MPI.MAX)
            self._policy.observe_save(exposed)
            self._next_ckpt_step = None
            self._decide_interval(step)

    def _global_rollback(self, gr: _GlobalRollback, count: int) -> int:
        """Restore the newest committed checkpoint on every rank. Collective."""
        store = self.store
        if store is None:
            raise RetriesExhausted(f"{gr}; no committed checkpoint to roll back to: enable global "
                                   "checkpoints (--ckpt-every N) or raise --max-retries")
        if count > 1 + self.config.max_retries:
            raise RetriesExhausted(f"{gr}; {count - 1} global rollbacks did not cure it either")
        from ulfmpy.checkpoint import restore, restore_from_memory

        t0 = time.perf_counter()
        copy = store.memory_copy()
        held = self.comm.mpi_comm.allgather(copy.step if copy is not None else None)
        if copy is not None and len(set(held)) == 1:
            restore_from_memory(self.state, copy)
            step, how = copy.step, "memory"
        else:
            # A save staged over the in-memory copy (the run had rolled back
            # before): the files still hold every committed checkpoint.
            got = restore(self.comm.mpi_comm, self.run_dir, self.state, events=self.events)
            if got is None:
                raise RetriesExhausted(f"{gr}; no committed checkpoint to roll back to: enable "
                                       "global checkpoints (--ckpt-every N) or raise --max-retries")
            step, how = got.step, "file"
        rec = {"step": step, "from_segment": gr.first, "reason": str(gr), "how": how,
               "seconds": time.perf_counter() - t0, "lost_steps": gr.first - step}
        self._global_rollbacks.append(rec)
        self.events.log("global_rollback", **rec)
        # Faults of the abandoned segment were injected, and cured by this rollback.
        self._counters["injected_faults"] += len(self._seg_flips)
        self._seg_flips = []
        self._last_ckpt_step = step
        return step

    # -- hard failures -----------------------------------------------------------
    def _recover(self, exc: BaseException, step: int) -> int:
        """Repair after a dead rank and return the step to resume from. Collective
        over the live processes of the job (spares included)."""
        if isinstance(exc, MPI.Exception):
            err = translate_mpi_error(exc, "runtime", failure_suspected=self.ft)
            if not isinstance(err, ProcessFailure):
                raise exc
            exc = err
        t_detect = time.perf_counter()
        self._saw_failure = True
        self.events.log("failure", step=step, error=str(exc))
        if not self.ft or not self.config.recovery:
            raise exc
        if self._abort_marker():
            raise exc
        comm = self.comm
        assert isinstance(comm, ResilientComm)
        comm.end_segment()
        return self._repair(t_detect, step)

    def _repair(self, t_detect: float, step: int) -> int:
        phases: dict[str, float] = {}
        for attempt in range(_MAX_REPAIRS):
            try:
                return self._repair_once(t_detect, step, phases, attempt)
            except (ProcessFailure, MPI.Exception) as again:
                self.events.log("failure_during_recovery", attempt=attempt, error=str(again))
        raise RecoveryFailed(f"{_MAX_REPAIRS} repairs in a row failed")

    def _repair_once(self, t_detect: float, step: int, phases: dict[str, float],
                     attempt: int) -> int:
        t = time.perf_counter()
        for c in (self._compute, self._world, self._replay_comm):
            if c is not None:
                _rec.revoke(c)
        phases["revoke"] = time.perf_counter() - t
        # A recovery kill fires in the first recovery at or after its step.
        self._kill_point("recovery", max(step, getattr(self, "_cur_step", step)))
        new_world, phases["shrink"] = _rec.shrink(self._world)
        self._world = new_world
        t = time.perf_counter()
        known = None
        if self.store is not None and self.store.last_committed is not None:
            known = self.store.last_committed.step
        me = _rec.Member(self.uid, self.logical, known)
        members = sorted(_translate(new_world.allgather, (me, self._respawns)),
                         key=lambda m: m[0].uid)
        respawns = max(r for _, r in members)
        members = [m for m, _ in members]
        plan = _rec.plan_repair(members, size=self.size, policies=self.config.recovery,
                                spawn_ok=True)
        phases["agree"] = time.perf_counter() - t
        if plan is None:
            raise RecoveryFailed(
                f"no recovery policy of {','.join(self.config.recovery)} applies "
                f"({sum(m.logical is None for m in members)} live spares, "
                f"{len(members)} live processes)")
        ckpt_steps = [m.ckpt_step for m in members if m.logical is not None and m.ckpt_step is not None]
        target = max(ckpt_steps) if ckpt_steps else None
        old_logical = self.logical
        t = time.perf_counter()
        if plan.policy == "respawn":
            new_world, plan = self._respawn(new_world, plan, target, respawns)
            phases["respawn"] = time.perf_counter() - t
            self.events.log("respawn_timing", **self._spawn_times)
            t = time.perf_counter()
        self.logical = plan.assign[self.uid]
        compute = new_world.Split(0 if self.logical is not None else 1,
                                  self.logical if self.logical is not None else self.uid)
        compute.Set_errhandler(MPI.ERRORS_RETURN)
        self._compute = compute
        self._replay_comm = None
        # For spares the split is the whole policy step (activation); the
        # other policies had their own phase (shrink, respawn) above.
        phases["spares" if plan.policy == "spares" else "split"] = time.perf_counter() - t
        self.size = plan.size
        rec = {"policy": plan.policy, "failed_ranks": list(plan.failed), "attempt": attempt,
               "detected_at_step": step, "replaced": plan.replaced, "size": plan.size}
        if self.logical is None:  # still a spare
            self.events.log("recovery_spare_idle", **rec)
            raise _StillSpare(target)
        if old_logical is None:
            self.role = _rec.Role.RECOVERED
        elif self.role == _rec.Role.INITIAL:
            self.role = _rec.Role.SURVIVOR
        self.rank = self.logical
        comm = self.comm
        assert isinstance(comm, ResilientComm)
        comm.reset(compute)
        self._new_replay_comm()
        t = time.perf_counter()
        resumed = self._restore_after_repair(plan, target, old_logical)
        phases["restore"] = time.perf_counter() - t
        seconds = time.perf_counter() - t_detect
        rec.update({"seconds": seconds, "phases": dict(phases), "resumed_step": resumed,
                    "lost_steps": max(0, step - resumed), "role": self.role.value})
        self._recoveries.append(rec)
        self.events.log("recovery", **rec)
        if getattr(self, "_policy", None) is not None:
            # A measured recovery replaces the configured estimate of R.
            self._policy.observe_recovery(seconds)
        return resumed

    def _respawn(self, world: MPI.Comm, plan: Any, target: int | None,
                 respawns: int) -> tuple[MPI.Comm, Any]:
        """Spawn replacements for the dead ranks and merge them in. Collective
        over the live processes; returns the merged world and the full plan."""
        import dataclasses

        n = len(plan.failed)
        self._respawns = respawns + 1
        from ulfmpy import zygote

        command, args = zygote.spawn_command(self._zygote_name, ["-m", "mpi4py", *sys.argv])
        t0 = time.perf_counter()
        inter = world.Spawn(command, args=args, maxprocs=n, root=0)
        inter.Set_errhandler(MPI.ERRORS_RETURN)
        t1 = time.perf_counter()
        merged = inter.Merge(high=False)
        merged.Set_errhandler(MPI.ERRORS_RETURN)
        self._spawn_times = {"spawn_s": t1 - t0, "merge_s": time.perf_counter() - t1}
        new_uids = [100_000 * self._respawns + k for k in range(n)]
        assign = dict(plan.assign)
        replaced = {}
        for r, uid in zip(plan.failed, new_uids):
            assign[uid] = r
            replaced[r] = uid
        info = {"new_uids": new_uids, "assign": assign, "size": plan.size, "target": target,
                "run_dir": self.run_dir, "config": self.config.as_dict(),
                "respawns": self._respawns, "zygote": self._zygote_name}
        merged.bcast(info if merged.Get_rank() == 0 else None, root=0)
        inter.Disconnect()
        try:
            world.Free()
        except MPI.Exception:
            pass
        self._world = merged
        return merged, dataclasses.replace(plan, assign=assign, replaced=replaced)

    def _restore_after_repair(self, plan: Any, target: int | None, old_logical: int | None) -> int:
        """Application recovery: state back to the checkpoint ``target``. Collective."""
        comm = self.comm
        t0 = time.perf_counter()
        same_layout = (plan is not None and plan.policy in ("spares", "respawn")
                       and old_logical == self.logical)
        copy = None
        if same_layout and self.store is not None and target is not None:
            copy = self.store.memory_copy(target)
        if self.store is not None:
            self.store.reset(comm.mpi_comm)
        if copy is not None:
            from ulfmpy.checkpoint import restore_from_memory

            restore_from_memory(self.state, copy)  # survivors: no file I/O
            how = "memory"
        else:
            self._build(comm)
            how = "factory"
        replacement = old_logical is None
        source = None
        if (target is not None and self.config.partner and self.size > 1
                and (plan is None or plan.policy in ("spares", "respawn"))):
            source = self._partner_handover(target, replacement)
        self._partners = None  # holder and ward roles follow the new layout
        if copy is None:
            if target is not None:
                if source is not None:
                    receive_copy(comm.mpi_comm, source, self.state)
                    how = "partner"
                elif same_layout or replacement:
                    _restore_local(self.run_dir, target, self.state, comm.Get_rank(), comm.Get_size())
                    how = "file"
                else:
                    from ulfmpy.checkpoint import restore

                    restore(comm.mpi_comm, os.path.join(self.run_dir, "ckpt", f"step-{target:08d}.h5"),
                            self.state, events=self.events)
                    how = "file N->M"
        if self._snap is None or how != "memory":
            self._snap = Snapshot(self.state)
        t_state = time.perf_counter()
        if self.store is None and self._ckpt_enabled():
            self._open_store(self._step0 if target is None else target)
        elif self.store is not None:
            self.store.prepare(self.state)
            self._last_ckpt_step = self._step0 if target is None else target
            self._last_ckpt_time = time.perf_counter()
        # Timed in two parts: the state (build, handover, copy) and the checkpoint
        # store (opened here by a replacement, only reset elsewhere).
        self.events.log("restore_after_repair", how=how, step=target, state_s=t_state - t0,
                        store_s=time.perf_counter() - t_state)
        return target if target is not None else self._step0

    def _partner_handover(self, target: int, replacement: bool) -> int | None:
        """Hand each replacement its partner copy of checkpoint ``target``.

        Collective over the repaired compute communicator (same size and
        logical ranks as before: spares or respawn). Holders send; returns,
        on a replacement, the rank to receive from (None: read the files).
        Roles change with the new layout, so every rank drops its copies
        afterwards; the next checkpoint makes new ones.
        """
        comm = self.comm.mpi_comm
        held = {}
        if self._partners is not None and not replacement:
            held = {w: self._partners.steps(w) for w in self._partners.wards}
        senders = plan_handover(comm.allgather((replacement, held)), target)
        for r, h in senders.items():
            if h == self.rank:
                assert self._partners is not None
                self._partners.send_to_replacement(comm, r, r, target)
        self._partners = None
        self.events.log("partner_handover", step=target, senders=senders)
        return senders.get(self.rank) if replacement else None

    def _wait_as_spare(self) -> int | None:
        """Wait inside the runtime until the run ends (None) or this spare
        replaces a failed rank (the step to resume from)."""
        self.events.log("spare_waiting")
        # Idle time: load the checkpoint engine (h5py) now rather than on the
        # critical path of the recovery this spare may join.
        import ulfmpy.checkpoint  # noqa: F401
        while True:
            try:
                # Poll rather than block, so a timed kill can strike a waiting spare.
                req = _translate(self._world.irecv, None, MPI.ANY_SOURCE, _SPARE_TAG)
                while True:
                    done, msg = _translate(req.test)
                    if done:
                        break
                    self._timed_kill(None)
                    time.sleep(0.002)
                if msg in ("done", "done:lost"):
                    if msg == "done:lost":
                        self._saw_failure = True
                    self.events.log("spare_released")
                    return None
            except ProcessFailure as exc:
                self._saw_failure = True
                if not self._world.Is_revoked():
                    # A death the compute ranks have not acted on (yet): they
                    # revoke the world when they repair; until then keep waiting.
                    try:
                        self._world.Ack_failed()
                    except MPI.Exception:
                        pass
                    time.sleep(0.01)
                    continue
                try:
                    self.events.log("failure", step=None, error=str(exc))
                    return self._repair(time.perf_counter(), 0)
                except _StillSpare:
                    continue

    def _release_spares(self) -> int:
        """Tell waiting spares the run is over; return how many were found dead.

        Called by logical rank 0. A spare killed while it waited is known to
        ULFM as a failed process of the world communicator (or fails the send).
        """
        world_ranks = _world_ranks_of_spares(self._world, self._compute)
        dead: set[int] = set()
        if self.ft:
            try:
                dead = set(_rec.failed_ranks(self._world)) & set(world_ranks)
            except (MPI.Exception, UlfmpyError):
                dead = set()
        for r in world_ranks:
            if r in dead:
                continue
            try:
                # "done:lost": a process died (a spare, or a rank earlier), so
                # this one must not finalize either.
                failed = dead or self._recoveries or self._saw_failure
                self._world.send("done:lost" if failed else "done", dest=r, tag=_SPARE_TAG)
            except MPI.Exception:
                dead.add(r)  # a dead spare needs no goodbye
        if dead:
            self.events.log("spares_lost", world_ranks=sorted(dead), count=len(dead))
        return len(dead)

    # -- end of run -------------------------------------------------------------
    def _survivor(self) -> bool:
        """Whether this process lived through a failure (or replaced a dead one).

        Such processes leave without MPI_Finalize (:func:`_guard_finalize`),
        so at the very end an error from a peer that already left is expected.
        """
        return self._saw_failure or self.role != _rec.Role.INITIAL

    def _finish(self, steps: int) -> None:
        comm = self.comm.mpi_comm if isinstance(self.comm, ResilientComm) else self.comm
        if self.store is not None:
            self.store.drain()
        # Loop time only, like the --no-resilience baseline (setup excluded).
        wall = time.perf_counter() - getattr(self, "_t_loop", self._t0)
        # Spares are released before the last collective, so that every rank
        # learns whether one died while waiting: then nobody may finalize
        # (Open MPI's finalize fence was seen to wait on the dead spare).
        lost = self._release_spares() if self.rank == 0 and self.config.spares else 0
        try:
            fp = fingerprint(comm, self.state)
            counts = comm.allgather((self._counters["injected_faults"],
                                     self._counters["escaped_faults"], len(self._recoveries),
                                     self._counters["segments"], wall, lost))
        except MPI.Exception as exc:
            if self.rank == 0 or not self._survivor():
                raise
            # A peer died at the very end (the barrier below keeps the
            # living from leaving early). Rank 0 writes the summary; this
            # rank has nothing left to learn.
            self.events.log("finish_peer_gone", error=str(exc))
            self.summary = {"ranks": self.size, "steps": steps, "wall_s": wall,
                            "fingerprint": None, "incomplete": True}
            return
        totals = [sum(c[0] for c in counts), sum(c[1] for c in counts)]
        wall = max(c[4] for c in counts)
        lost = counts[0][5]
        if lost:
            self._saw_failure = True
        # The history of the run is best known to the process that lived
        # through all of it: a spare or respawned rank 0 joined late.
        keeper = max(range(len(counts)), key=lambda r: (counts[r][2], counts[r][3], -r))
        history = None
        if self.rank == keeper:
            history = {"segments": self._counters["segments"], "rollbacks": self._rollbacks,
                       "reexecuted_rank_steps": self._counters["reexecuted_rank_steps"],
                       "global_rollbacks": self._global_rollbacks,
                       "checkpoints": [r.as_dict() for r in self.store.records] if self.store else [],
                       "recoveries": self._recoveries, "restored_from": self._restored_from}
        if keeper != 0:
            if self.rank == keeper:
                comm.send(history, dest=0, tag=7302)
            elif self.rank == 0:
                history = comm.recv(source=keeper, tag=7302)
        # Nobody leaves before everybody has read what it was sent above. A
        # process that lived through a failure exits without MPI_Finalize,
        # and a peer still reading that process's last message was seen to
        # read garbage (an UnpicklingError in the allgather, exit 76). Past
        # the barrier only the barrier's own messages are in flight, and
        # they carry no data.
        try:
            comm.Barrier()
        except MPI.Exception as exc:
            if not self._survivor():
                raise
            self.events.log("finish_peer_gone", error=str(exc), at="barrier")
        if self.rank != 0:
            history = {"segments": self._counters["segments"], "rollbacks": self._rollbacks,
                       "reexecuted_rank_steps": self._counters["reexecuted_rank_steps"],
                       "global_rollbacks": self._global_rollbacks, "checkpoints": [],
                       "recoveries": self._recoveries, "restored_from": self._restored_from}
        assert history is not None
        self.summary = {
            "ranks": self.size, "steps": steps, "wall_s": wall, "fingerprint": fp,
            "resilience": self.config.resilience,
            "segment_steps": self.config.segment_steps if self.config.resilience else None,
            "segment_length": getattr(self, "_k", None) if self.config.resilience else None,
            "segments": history["segments"],
            "rollbacks": history["rollbacks"],
            "reexecuted_rank_steps": history["reexecuted_rank_steps"],
            "injected_faults": totals[0], "escaped_faults": totals[1],
            "global_rollbacks": history["global_rollbacks"],
            "checkpoints": history["checkpoints"],
            "failures": len(history["recoveries"]),
            "recoveries": history["recoveries"],
            "run_dir": self.run_dir,
        }
        self._restored_from = history["restored_from"]
        if self._restored_from is not None:
            self.summary["restored_from"] = self._restored_from
        self.events.log("finish", fingerprint=fp, wall_s=wall)
        if self.rank == 0:
            if self.config.spares:
                # The spares that died while waiting (they show up nowhere else).
                self.summary["spares_lost"] = lost
            write_json_atomic(os.path.join(self.run_dir, "summary.json"), self.summary)


_FINALIZE_SKIPPED = False
_IMPORTED_AT = time.time()  # a respawned rank reports how long its start-up took
_WARM = False  # set in a replacement forked by the node's zygote
# The node's zygote this process started (one for all its Runtimes).
_ZYGOTE: dict[str, Any] = {"job": None, "name": None, "proc": None, "atexit": False}


def _stop_zygote() -> None:
    """Ask the zygote this process started to leave. Local; at exit."""
    proc, name = _ZYGOTE["proc"], _ZYGOTE["name"]
    _ZYGOTE.update(proc=None, name=None)
    if proc is None or proc.poll() is not None:
        return
    from ulfmpy import zygote

    zygote.stop(name)  # it leaves once its children (replacements) have
    try:
        proc.wait(timeout=0.05)
    except Exception:  # not yet: it also leaves on its own once the launcher's daemon has
        pass


def _guard_finalize(events: EventLog) -> None:
    """After surviving a failure, leave without ``MPI_Finalize``.

    Open MPI 5 with ULFM was seen to hang in ``MPI_Finalize`` now and then
    after a failure (every survivor sleeping in ``ompi_mpi_finalize``, most
    likely a runtime fence that waits on the dead process), and a watchdog
    thread cannot help: finalize holds the GIL. A job whose processes all
    leave with ``os._exit`` ends normally under ``--with-ft ulfm`` (mpirun
    exits 0), so once the run completed, a process that saw a failure exits
    at interpreter exit with status 0 without finalizing. The run's results
    are already on disk; only a ``sys.exit(n)`` status after the run is lost.
    """
    global _FINALIZE_SKIPPED
    if _FINALIZE_SKIPPED:
        return
    _FINALIZE_SKIPPED = True
    import atexit

    def leave() -> None:
        _stop_zygote()  # the atexit handler that would have is skipped by _exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    atexit.register(leave)


class _StillSpare(Exception):
    def __init__(self, target: int | None) -> None:
        super().__init__("still a spare")
        self.target = target


def _translate(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except MPI.Exception as exc:
        err = translate_mpi_error(exc, getattr(fn, "__name__", "call"), failure_suspected=True)
        raise err from exc


def _world_ranks_of_spares(world: MPI.Comm, compute: MPI.Comm) -> list[int]:
    """World ranks that are not in the compute communicator."""
    active = MPI.Group.Translate_ranks(compute.Get_group(), list(range(compute.Get_size())),
                                       world.Get_group())
    return [r for r in range(world.Get_size()) if r not in set(active)]


def _restore_local(run_dir: str, step: int, state: dict[str, Any], rank: int, size: int) -> None:
    """Read this rank's block of checkpoint ``step`` from the files. Local."""
    from ulfmpy import _ckpt_files as files
    from ulfmpy._ckpt_restore import _load
    from ulfmpy.errors import RestoreError

    manifest = files.read_manifest(os.path.join(run_dir, "ckpt", f"step-{step:08d}.h5"))
    problem = _load(manifest, state, rank, size)
    if problem:
        raise RestoreError(f"rank {rank} cannot read its block of checkpoint {step}: {problem}")
