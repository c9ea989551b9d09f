"""``Runtime`` and ``rt.loop``: the two lines an app changes.

::

    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        for step, app in rt.loop(lambda comm: MyApp(comm), steps=1000):
            app.step()

The loop is a generator and a façade over the mechanisms of DESIGN §8:
plan the boundary (:mod:`ulfmpy.planner`) → run the segment
(:mod:`ulfmpy.segments`) → checkpoint or not (:mod:`ulfmpy.checkpoints`) →
on a global rollback, roll back → on a process failure, repair
(:mod:`ulfmpy.repair`, :mod:`ulfmpy.spares`, :mod:`ulfmpy.respawn`) →
finish (:mod:`ulfmpy.teardown`). What a rank is travels as one
:class:`~ulfmpy.identity.Identity`; the loop body never sees a fault.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Iterator

import numpy as np
from mpi4py import MPI

from ulfmpy import recovery as _rec
from ulfmpy import respawn as _respawn
from ulfmpy import teardown as _td
from ulfmpy.checkpoints import Checkpoints, RestoreContext
from ulfmpy.comm import ResilientComm
from ulfmpy.config import Config
from ulfmpy.detect import get_detector
from ulfmpy.errors import ConfigError, GlobalRollback, ProcessFailure
from ulfmpy.events import EventLog
from ulfmpy.faults import hooks_for
from ulfmpy.identity import Identity, Work
from ulfmpy.inject import FaultPlan
from ulfmpy.planner import BoundaryPlanner, Schedule
from ulfmpy.repair import Repairer, as_failure
from ulfmpy.segment import Snapshot
from ulfmpy.segments import SegmentRunner, SegmentTiming
from ulfmpy.spares import release_spares, wait_as_spare
from ulfmpy.state import normalize_state, state_nbytes

__all__ = ["Runtime"]


class _AppView:
    """The app as detectors see it, with a ``Runtime(invariant=...)`` override."""

    def __init__(self, app: Any, invariant: Callable[[Any], bool] | None) -> None:
        self._app, self._invariant = app, invariant

    def __getattr__(self, name: str) -> Any:
        if name == "invariant" and self._invariant is not None:
            return lambda: self._invariant(self._app)
        return getattr(self._app, name)


class Runtime:
    """Fault-tolerance runtime of one job. Use as a context manager.

    Collective over ``comm``: every rank enters and leaves it together, with
    equal settings (checked on entry). With ``spares=S`` (``ulfmpy run
    --spares S``) the last S ranks of ``comm`` wait inside the runtime and
    never run the loop body unless they replace a failed rank. A setting
    given as an ``ulfmpy run`` flag wins over the same keyword here (the
    event log's ``config_override`` says so).

    Args:
        comm: the communicator of the job (``MPI.COMM_WORLD`` in ``main()``);
            the runtime works on its own duplicates.
        invariant: optional ``fn(app) -> bool`` for the ``invariant`` detector.
        **settings: any :class:`~ulfmpy.config.Config` field; ``ULFMPY_*``
            environment variables fill the rest.
    """

    def __init__(self, comm: MPI.Comm, *, invariant: Callable[[Any], bool] | None = None,
                 **settings: Any) -> None:
        self.config, self._overrides = Config.load_with_sources(**settings)
        self._user_comm, self._invariant = comm, invariant
        parent = MPI.Comm.Get_parent()
        self._parent = parent if parent != MPI.COMM_NULL else None
        nspares = 0 if self._parent is not None else self.config.spares
        if nspares >= comm.Get_size():
            raise ConfigError(f"{nspares} spares leave no compute rank out of {comm.Get_size()}")
        self.size = comm.Get_size() - nspares
        self.uid = comm.Get_rank()
        self.ft = os.environ.get("ULFMPY_FT", "ulfm") == "ulfm" and _rec.ulfm_available(comm)
        self.summary: dict[str, Any] = {}
        self.comm: ResilientComm | MPI.Comm
        self.me: Identity
        self.work: Work | None = None
        self.planner: BoundaryPlanner | None = None
        self._join: dict[str, Any] | None = None
        self._saw_failure = False
        self._boundary_from: float | None = None

    @property
    def rank(self) -> int:
        return self.me.rank

    @property
    def is_spare(self) -> bool:
        return self.me.is_spare

    @property
    def role(self) -> _rec.Role:
        return self.me.role

    # -- context ------------------------------------------------------------------
    def __enter__(self) -> "Runtime":
        for name in self.config.detect:
            get_detector(name)  # unknown names fail before any work
        if self._parent is not None:
            return self._enter_respawned()
        world = self._user_comm.Dup()
        world.Set_errhandler(MPI.ERRORS_RETURN)
        run_dir = self.config.run_dir
        if run_dir is None:
            from ulfmpy.launch import default_run_dir

            run_dir = world.bcast(default_run_dir() if self.uid == 0 else None, root=0)
        self.run_dir = os.path.abspath(run_dir)
        self.config.check_uniform(world)
        if self.uid == 0:
            os.makedirs(self.run_dir, exist_ok=True)
        world.Barrier()
        self.events = EventLog(self.run_dir, self.uid)
        cfg = self.config
        zygote = _respawn.start_zygote(world, run_dir=self.run_dir, events=self.events,
                                       wanted=self.ft and cfg.zygote and "respawn" in cfg.recovery)
        logical = self.uid if self.uid < self.size else None
        compute = world.Split(0 if logical is not None else 1, self.uid)
        compute.Set_errhandler(MPI.ERRORS_RETURN)
        self._setup(Identity(world, compute, None, self.uid, logical, self.size), zygote)
        return self

    def _enter_respawned(self) -> "Runtime":
        """A process spawned to replace a dead rank joins the job (respawn policy)."""
        world, info, joined = _respawn.join_job(self._parent)
        self._parent = None
        uid = info["new_uids"][self.uid]
        self.config = Config(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in info["config"].items()})
        self.run_dir, self.size = info["run_dir"], info["size"]
        self.events = EventLog(self.run_dir, uid)
        logical = info["assign"][uid]
        compute = world.Split(0, logical)
        compute.Set_errhandler(MPI.ERRORS_RETURN)
        self._join = dict(info, joined=joined)
        self._setup(Identity(world, compute, None, uid, logical, self.size,
                             role=_rec.Role.RECOVERED, respawns=info["respawns"]),
                    info.get("zygote"))
        return self

    def _setup(self, me: Identity, zygote: str | None) -> None:
        cfg = self.config
        self.me, self.uid = me, me.uid
        self._t0 = time.perf_counter()
        self._host = socket.gethostname()
        plan = FaultPlan(cfg.inject, me.uid, cfg.seed,
                         marker_dir=os.path.join(self.run_dir, "injected"))
        self.hooks = hooks_for(plan, self.events, uid=me.uid, size=self.size, host=self._host,
                               t0=self._t0)
        self.comm = ResilientComm(me.compute, ft=self.ft) if cfg.resilience else me.compute
        self.segments = SegmentRunner(cfg, self.comm, self.events, self.hooks)
        self.ckpts = Checkpoints(cfg, self.run_dir, self.events, self.hooks)
        self.repairer = Repairer(cfg, self.events, self.hooks, self.run_dir, ft=self.ft,
                                 zygote_name=zygote)
        self.events.log("start", size=self.size, spares=cfg.spares, logical=me.logical,
                        ft=self.ft, host=self._host, pid=os.getpid(), config=cfg.as_dict(),
                        relaunch=int(os.environ.get("ULFMPY_RELAUNCH", "0")),
                        mpi=MPI.Get_library_version().splitlines()[0],
                        respawned=self._join is not None)
        for o in self._overrides:
            self.events.log("config_override", **o)

    def __exit__(self, etype: Any, exc: Any, tb: Any) -> None:
        self.events.log("exit", error=None if exc is None else repr(exc))
        self.ckpts.close()
        me = self.me
        comms = (me.replay, me.compute, me.world)
        if exc is not None:
            if self.ft:
                _td.end_job(exc, uid=me.uid, run_dir=self.run_dir, events=self.events,
                            comms=comms)
            return
        saw = self._saw_failure or getattr(self.comm, "failure", None) is not None
        # A spawned process must finalize: its runtime reports an exit without
        # finalize as an error (prterun then exits 1).
        spawned = me.uid >= _respawn.UID_STRIDE
        if (self.repairer.recoveries or me.role != _rec.Role.INITIAL or saw) and not spawned:
            _td.guard_finalize()
        self.events.close()
        for c in comms:
            if c is not None:
                try:
                    c.Free()
                except MPI.Exception:
                    pass

    # -- building the app ----------------------------------------------------------
    def _build(self) -> Work:
        app = self._factory(self.comm)
        state = normalize_state(app.state)
        snap = Snapshot(state) if self.config.resilience else None
        return Work(app, state, _AppView(app, self._invariant), snap)

    def _make_planner(self) -> BoundaryPlanner:
        """Rank 0's planner decides; the others' only plan the first segment. Local."""
        cfg, interval = self.config, None
        if cfg.mtbf > 0 or cfg.node_mtbf > 0:
            from ulfmpy.policy import IntervalPolicy

            interval = IntervalPolicy(
                mtbf=cfg.mtbf or None, node_mtbf=cfg.node_mtbf or None,
                nodes=len(set(self._hosts)), model=cfg.interval_model,
                recovery_estimate=cfg.recovery_estimate)
        return BoundaryPlanner(Schedule(
            steps=self._steps, segment_steps=cfg.segment_steps,
            segment_budget=cfg.segment_budget, soft_mtbf=cfg.soft_mtbf,
            ckpt_every=cfg.ckpt_every, ckpt_seconds=cfg.ckpt_seconds,
            checkpoints=self.ckpts.store is not None, interval=interval,
            interval_model=cfg.interval_model, async_writes=cfg.ckpt_mode == "async"))

    # -- the loop ------------------------------------------------------------------
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
            self.work = self._build()
            step = self.ckpts.resume(self.comm, self.work.state, start)
            self._t_loop = time.perf_counter()
            for s in range(step, steps):
                yield s, self.work.app
            self._finish(steps)
            return
        first = self._begin(start)
        if first is None:
            return  # a spare the run did not need
        self.comm.void_on_failure = self.ft
        step, end = first, self._restart(first)
        self.events.log("segments", k=self.planner.k, auto=not self.config.segment_steps
                        and not self.config.soft_mtbf, state_bytes=state_nbytes(self.work.state),
                        start=step)
        self._t_loop = time.perf_counter()
        global_rollbacks = 0
        while step < steps:
            try:
                agreed = yield from self.segments.run(self.me, self.work, step, end,
                                                      self._plan_slots)
                step, end = agreed.timing.end, self._boundary(agreed)
            except GlobalRollback as gr:
                global_rollbacks += 1
                self.segments.abandon()
                step = self.ckpts.global_rollback(self.comm.mpi_comm, self.work.state, gr,
                                                  global_rollbacks)
                end = self._restart(step)
            except (ProcessFailure, MPI.Exception) as exc:
                step = self._recover(exc, step)
                # Replacements start the segment length afresh; survivors
                # must too, or the first segment ends at different steps on
                # different ranks and the agreement meets a halo exchange.
                end = self._restart(step)
        self._finish(steps)

    def _begin(self, start: int) -> int | None:
        """Where this process's loop starts: fresh or resumed, as a replacement, or a spare."""
        if self._join is not None:
            replay = self.me.compute.Dup()
            replay.Set_errhandler(MPI.ERRORS_RETURN)
            step = self._restore(self.me.replace(replay=replay), None, self._join["target"], None)
            self.events.log("recovery", policy="respawn", role="recovered", resumed_step=step,
                            uid=self.me.uid, logical=self.me.logical, restored_at=time.time(),
                            **self._join["joined"])
            return step
        if self.me.is_spare:
            me, step, saw = wait_as_spare(self.me, self.events, self.hooks, self._spare_repair)
            self._saw_failure |= saw
            return step
        self.work = self._build()
        step = self.ckpts.resume(self.comm.mpi_comm, self.work.state, start)
        self.ckpts.open(self.comm.mpi_comm, self.work.state, wait=True)
        self._hosts = self.comm.mpi_comm.allgather(self._host)
        self.planner = self._make_planner()
        replay = self.me.compute.Dup()
        replay.Set_errhandler(MPI.ERRORS_RETURN)
        self.me = self.me.replace(replay=replay)
        return step

    def _restart(self, step: int) -> int:
        """The planner starts over at ``step``; the first segment's end (same on every rank)."""
        self._boundary_from = None
        return self.planner.start(step, time.perf_counter())

    # -- one boundary ------------------------------------------------------------------
    def _plan_slots(self, t: SegmentTiming) -> np.ndarray:
        """This rank's contribution to the end-of-segment vector (rank 0 plans). Local."""
        delta, unfinished = self.ckpts.plan_slots()
        if self.me.rank != 0:
            return np.array((0, 0, 0, delta, unfinished))
        p = self.planner
        if self._boundary_from is not None:
            # From the last step of the previous segment to this one's first,
            # checkpoint work subtracted: what one boundary costs.
            p.observe_boundary(t.t_start - self._boundary_from)
        p.observe_snapshot(t.snapshot_s)
        p.observe_segment(t.t_steps_end - t.t_start, t.end - t.first, clean=t.clean,
                          log_bytes=self.comm.log.nbytes,
                          state_bytes=state_nbytes(self.work.state))
        b = p.boundary(t.end, time.perf_counter())
        for name, fields in b.events:
            self.events.log(name, **fields)
        return np.array((int(b.save), b.next_end, p.k, delta, unfinished))

    def _boundary(self, agreed: Any) -> int:
        """After the commit: checkpoint work, then the next segment's end. Collective."""
        if self._k != agreed.k:
            if self._k:
                self.events.log("segment_length", old=self._k, new=agreed.k,
                                at_step=agreed.timing.end)
            self._k = agreed.k
        rank0, p = self.me.rank == 0, self.planner
        if rank0 and agreed.delta_ns:
            p.observe_save(agreed.delta_ns / 1e9)
        rollbacks = len(self.segments.rollbacks)
        t = time.perf_counter()
        committed, saved = self.ckpts.at_boundary(
            self.comm.mpi_comm, self.me, agreed.timing.end, self.work.state, save=agreed.save,
            writes_ready=agreed.writes_ready, hosts=self._hosts)
        ckpt_s = time.perf_counter() - t
        if rank0 and committed is not None and committed.write_s is not None:
            p.observe_write(committed.write_s)
        if rank0 and agreed.save and not saved:
            p.save_skipped()
        clean = agreed.timing.clean and rollbacks == self._rollbacks_seen
        self._rollbacks_seen = len(self.segments.rollbacks)
        self._boundary_from = agreed.timing.t_steps_end + ckpt_s if clean else None
        return agreed.next_end

    _k = 0
    _rollbacks_seen = 0

    # -- hard failures ---------------------------------------------------------------
    def _recover(self, exc: BaseException, step: int) -> int:
        """Repair after a dead rank; the step to resume from. Collective over the
        live processes of the job (spares included)."""
        err = as_failure(exc, self.ft)
        if not isinstance(err, ProcessFailure):
            raise exc
        self._saw_failure = True
        self.events.log("failure", step=step, error=str(err))
        if not self.ft or not self.config.recovery or _td.abort_marker(self.run_dir):
            raise err
        self.comm.end_segment()
        self.me, resumed = self.repairer.repair(
            self.me, t_detect=time.perf_counter(), step=step, cur_step=self.segments.cur_step,
            known_ckpt=self.ckpts.last_committed_step, restore=self._restore)
        self.planner.observe_recovery(self.repairer.recoveries[-1]["seconds"])
        return resumed

    def _spare_repair(self, me: Identity) -> tuple[Identity, int]:
        return self.repairer.repair(me, t_detect=time.perf_counter(), step=0, cur_step=0,
                                    known_ckpt=self.ckpts.last_committed_step,
                                    restore=self._restore)

    def _restore(self, me: Identity, plan: Any, target: int | None,
                 old_logical: int | None) -> int:
        """Application recovery on the repaired communicator. Collective."""
        self.me = me
        self.comm.reset(me.compute)
        t0 = time.perf_counter()
        ctx = RestoreContext(target=target, policy=plan.policy if plan is not None else None,
                             same_layout=(plan is not None and plan.policy in ("spares", "respawn")
                                          and old_logical == me.logical),
                             replacement=old_logical is None)
        self.work, how = self.ckpts.restore_after_repair(self.comm.mpi_comm, me, ctx,
                                                         self._build, self.work)
        self._hosts = self.comm.mpi_comm.allgather(self._host)
        if self.planner is None:
            self.planner = self._make_planner()
        self.events.log("restore_after_repair", how=how, step=target,
                        seconds=time.perf_counter() - t0)
        return target if target is not None else self._step0

    # -- end of run --------------------------------------------------------------------
    def _finish(self, steps: int) -> None:
        comm = self.comm.mpi_comm if isinstance(self.comm, ResilientComm) else self.comm
        self.ckpts.drain()
        # Loop time only, like the --no-resilience baseline (setup excluded).
        wall = time.perf_counter() - getattr(self, "_t_loop", self._t0)
        survivor = self._saw_failure or self.me.role != _rec.Role.INITIAL
        # Spares are released before the last collective, so that every rank
        # learns whether one died while waiting: then nobody may finalize
        # (Open MPI's finalize fence was seen to wait on the dead spare).
        lost = 0
        if self.me.rank == 0 and self.config.spares:
            lost = release_spares(self.me, self.events, ft=self.ft,
                                  failed=bool(self.repairer.recoveries or self._saw_failure))
        seg = self.segments
        store = self.ckpts.store
        history = _td.History(
            segments=seg.counters["segments"], rollbacks=seg.rollbacks,
            reexecuted_rank_steps=seg.counters["reexecuted_rank_steps"],
            global_rollbacks=self.ckpts.global_rollbacks,
            checkpoints=[r.as_dict() for r in store.records] if store is not None else [],
            recoveries=self.repairer.recoveries, restored_from=self.ckpts.restored_from)
        cfg = self.config
        base = _td.Summary(ranks=self.me.size, steps=steps, wall_s=wall, fingerprint=None,
                           resilience=cfg.resilience,
                           segment_steps=cfg.segment_steps if cfg.resilience else None,
                           segment_length=self._k or None if cfg.resilience else None,
                           run_dir=self.run_dir, spares_lost=0 if cfg.spares else None)
        summary, lost_any = _td.finish(comm, self.me.rank, self.work.state, history=history,
                                       counters=seg.counters, wall=wall, lost=lost,
                                       survivor=survivor, events=self.events, base=base)
        self._saw_failure |= lost_any
        self.summary = summary.as_dict()
