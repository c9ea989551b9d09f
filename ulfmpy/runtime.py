"""``Runtime`` and ``rt.loop``: the two lines an app changes.

::

    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        for step, app in rt.loop(lambda comm: MyApp(comm), steps=1000):
            app.step()

A façade over the mechanisms of ``docs/architecture.md``: plan the boundary
(:mod:`~ulfmpy.boundary`) → run the segment (:mod:`~ulfmpy.segments`) →
checkpoint or not (:mod:`~ulfmpy.checkpoints`) → on a global rollback, roll
back → on a process failure, repair (:mod:`~ulfmpy.repair`) → finish
(:mod:`~ulfmpy.teardown`). The loop body never sees a fault.
"""

from __future__ import annotations

import atexit
import os
import socket
import time
from typing import Any, Callable, Iterator

import numpy as np
from mpi4py import MPI

from ulfmpy import recovery as _rec
from ulfmpy import setup_log as _setup_log
from ulfmpy import respawn as _respawn
from ulfmpy import teardown as _td
from ulfmpy.checkpoints import Checkpoints, RestoreContext
from ulfmpy._comm_handle import shim_mpi, unshim_mpi
from ulfmpy.comm import PlainComm, Request, ResilientComm
from ulfmpy.config import Config
from ulfmpy.detect import get_detector
from ulfmpy.errors import (ConfigError, GlobalRollback, LatentError, ProcessFailure, RecoveryFailed,
                           RetriesExhausted)
from ulfmpy.events import EventLog
from ulfmpy.faults import hooks_for
from ulfmpy.identity import (Identity, Work, build_work, initial_identity, open_world,
                             sync_state, with_replay)
from ulfmpy import jobctl as _jobctl
from ulfmpy.inject import FaultPlan, cannot_fire
from ulfmpy.halt import HALT_WINDOW_MAX_S, HALT_WINDOW_S, HaltWatch, halt_times, parse_signals
from ulfmpy.nodes import virtual_node
from ulfmpy.progress import Reporter
from ulfmpy.boundary import Boundaries, make_planner
from ulfmpy.repair import Repairer
from ulfmpy.segment import Snapshot
from ulfmpy.segments import SegmentRunner, SegmentTiming
from ulfmpy.spares import wait_as_spare
from ulfmpy.state import state_nbytes

__all__ = ["Runtime"]


_ACTIVE: list["Runtime"] = []


class _InlineApp:
    """The app of the inline loop: its state is whatever the loop's callable names now."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self._state = state

    @property
    def state(self) -> dict[str, Any]:
        return self._state()


def inline_range(start: int, stop: int | None = None, *,
                 state: Callable[[], dict[str, Any]]) -> Iterator[int]:
    """``ulfmpy.range``: :meth:`Runtime.range` of the runtime whose ``with``
    block this is, so a loop inside a function needs no ``rt``. Collective."""
    if not _ACTIVE:
        raise ConfigError("ulfmpy.range(...) runs inside a runtime: add `import ulfmpy.auto` "
                          "after `from mpi4py import MPI`, or wrap the call of the code that "
                          "holds the loop in `with ulfmpy.Runtime(MPI.COMM_WORLD):`")
    return _ACTIVE[-1].range(start, stop, state=state)


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
        parent = MPI.Comm.Get_parent()
        self._parent = parent if parent != MPI.COMM_NULL else None
        self._inline = False  # rt.range: the app is the loop's own variables
        error = None
        try:
            self.config, self._overrides = Config.load_with_sources(**settings)
            nspares = 0 if self._parent is not None else self.config.spares
            if nspares >= comm.Get_size():
                raise ConfigError(f"{nspares} spares leave no compute rank out of "
                                  f"{comm.Get_size()}")
            for name in self.config.detect:
                get_detector(name)  # unknown names fail before any work
        except ConfigError as exc:
            error = exc
        if comm.allreduce(error is not None, op=MPI.LOR):
            _td.refuse_settings(comm, error)  # every rank, once: no abort, no hang
        self._user_comm, self._invariant = comm, invariant
        self.size = comm.Get_size() - nspares
        self.uid = comm.Get_rank()
        self.ft = os.environ.get("ULFMPY_FT", "ulfm") == "ulfm" and _rec.ulfm_available(comm)
        self.summary: dict[str, Any] = {}
        self.comm: ResilientComm | MPI.Comm
        self.me: Identity
        self.work: Work | None = None
        self.planner: Any = None  # a BoundaryPlanner once the loop starts
        self._join: dict[str, Any] | None = None
        self._node: str | None = None  # set on entry (a replacement computes its own)
        self._virtual = False
        self._saw_failure = False
        self._initial: Any = None  # the inline loop's start, until a checkpoint commits
        self._deferred: tuple[Any, ...] | None = None  # a replacing spare's restore

    rank = property(lambda self: self.me.rank, doc="The logical rank (-1 on a spare).")
    is_spare, role = property(lambda self: self.me.is_spare), property(lambda self: self.me.role)

    def __enter__(self) -> "Runtime":
        _ACTIVE.append(self)
        if self._parent is not None:
            return self._enter_respawned()
        world, self.run_dir = open_world(self._user_comm, self.config)
        self.events = EventLog(self.run_dir, self.uid)
        cfg = self.config
        self._node, nodes = self._place(world)
        # The job's end is read once, by one process (squeue under Slurm).
        self._halt_times = world.bcast(halt_times(cfg) if world.Get_rank() == 0 else None,
                                       root=0)
        zygote = _respawn.start_zygote(world, run_dir=self.run_dir, events=self.events,
                                       wanted=self.ft and cfg.zygote and "respawn" in cfg.recovery,
                                       node=self._node if self._virtual else None)
        self._setup(initial_identity(world, self.size, nodes), zygote)
        if cfg.resilience and self.me.is_spare:
            # A spare waits here, before any of the app's code: the inline
            # loop's set-up code runs on compute ranks only.
            self._wait_as_spare()
        elif cfg.resilience:
            # The contexts of derived communicators exist before any app code
            # runs: the inline loop's set-up code, or the factory, may make some.
            self.me = with_replay(self.me)
            self.comm.open_contexts(self.me.replay)
            # What the set-up code receives is logged until the loop starts: a
            # replacement of the inline loop runs that code again from it.
            self.comm.begin_setup()
        return self

    def _wait_as_spare(self) -> None:
        """Wait until the run ends (then end this process: an idle spare runs
        none of the app's code) or this spare replaces a dead rank. The
        replacement's restore waits for the loop (``_begin``): the factory,
        or the inline loop's set-up code, must run first."""
        me, step, saw = wait_as_spare(self.me, self.events, self.hooks, self._spare_repair)
        self._saw_failure |= saw
        if step is None:
            self._leave_idle()
        self.me = me
        self.comm.reset(me.compute)  # the app's code before the loop sees its rank
        if self.repairer.setup_log:
            self.comm.begin_fast_forward(_setup_log.load(self.run_dir, me.logical))

    def _leave_idle(self) -> None:
        """A spare the run did not need ends here. Does not return."""
        self._close_block(None)
        _td.leave(self.me, self.events, failed=bool(self._saw_failure or self.repairer.recoveries
                                                       or self.me.role != _rec.Role.INITIAL))
        _td.free_at_exit([self.me.compute], self.comm)
        _td.end_idle_spare()

    def _enter_respawned(self) -> "Runtime":
        """A process spawned to replace a dead rank joins the job (respawn policy)."""
        me, self._join = _respawn.joined_identity(self._parent)
        self._parent = None
        self.config = Config(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in self._join["config"].items()})
        self.run_dir, self.size = self._join["run_dir"], me.size
        self._halt_times = tuple(self._join.get("halt") or (None, None))
        self.events = EventLog(self.run_dir, me.uid)
        self._setup(me, self._join.get("zygote"))
        if self._join.get("setup") and self.config.resilience:
            # The inline loop: the program's set-up code runs again here,
            # answered from what the rank it replaces received (setup_log.py).
            self.comm.begin_fast_forward(_setup_log.load(self.run_dir, me.logical))
        return self

    def _setup(self, me: Identity, zygote: str | None) -> None:
        cfg = self.config
        self.me, self.uid = me, me.uid
        # Spares per node are not the last world ranks; faults address the
        # j-th spare as n + j all the same.
        self._spare_addr = None if me.spare_slot is None else me.size + me.spare_slot
        # A replacement (not started by ulfmpy._rank) dies with the launcher too.
        _jobctl.watch_launcher()
        _jobctl.hold_job_lock(self.run_dir)
        self._t0 = time.perf_counter()
        if self._node is None:  # a replacement: on the node of the rank it replaces
            self._virtual = bool(self._join.get("virtual")) and bool(me.layout)
            self._node = me.layout[me.logical] if self._virtual else socket.gethostname()
        self._host = self._node
        plan = FaultPlan(cfg.inject, me.uid, cfg.seed,
                         marker_dir=os.path.join(self.run_dir, "injected"))
        self.hooks = hooks_for(plan, self.events, uid=me.uid, size=self.size, host=self._host,
                               t0=self._t0, whoami=self._whoami)
        self.comm = ResilientComm(me.compute, ft=self.ft) if cfg.resilience else PlainComm(me.compute)
        if cfg.resilience:
            # Inside the with block MPI.COMM_WORLD is rt.comm and MPI.Request
            # ulfmpy's request class: set-up code on COMM_WORLD is protected,
            # and an app's MPI.Request.Waitall(reqs) logs and voids like the
            # communicator's own calls (ulfmpy/_comm_request.py).
            shim_mpi(self.comm, Request)
            self._shimmed = True
        self.segments = SegmentRunner(cfg, self.comm, self.events, self.hooks)
        self.ckpts = Checkpoints(cfg, self.run_dir, self.events, self.hooks)
        self.ckpts.node = self._node if self._virtual else None
        self.repairer = Repairer(cfg, self.events, self.hooks, self.run_dir, ft=self.ft,
                                 zygote_name=zygote, node=self._host, virtual=self._virtual,
                                 halt_times=self._halt_times)
        halt_at, end_at = self._halt_times
        self.halt = HaltWatch(parse_signals(cfg.halt_signal) if cfg.resilience else (),
                              halt_at=halt_at if cfg.resilience else None, end_at=end_at,
                              on_escalate=self._escalate)
        self.halt.install()
        self.events.log("start", size=self.size, spares=cfg.spares, logical=me.logical,
                        ft=self.ft, host=self._host, pid=os.getpid(), config=cfg.as_dict(),
                        spare_slot=me.spare_slot,
                        relaunch=int(os.environ.get("ULFMPY_RELAUNCH", "0")),
                        launch=_jobctl.launch_id(),
                        mpi=MPI.Get_library_version().splitlines()[0],
                        respawned=self._join is not None)
        for o in self._overrides:
            self.events.log("config_override", **o)

    def _close_block(self, exc: Any) -> None:
        """What leaving the with block undoes, on every process. Local."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if getattr(self, "_shimmed", False):
            unshim_mpi()
            self._shimmed = False
        self.events.log("exit", error=None if exc is None else repr(exc))
        self.ckpts.close()

    def __exit__(self, etype: Any, exc: Any, tb: Any) -> None:
        self._close_block(exc)
        me = self.me
        if exc is not None:
            if self.ft:
                _td.end_job(exc, uid=me.uid, run_dir=self.run_dir, events=self.events,
                            comms=(me.replay, me.compute, me.world))
            return
        saw = self._saw_failure or getattr(self.comm, "failure", None) is not None
        failed = bool(self.repairer.recoveries or me.role != _rec.Role.INITIAL or saw)
        _td.leave(me, self.events, failed=failed)
        rc = self.comm if isinstance(self.comm, ResilientComm) else None
        # Registered after mpi4py's finalize: runs before it.
        atexit.register(_td.free_at_exit, [me.compute], rc)
        if failed and self.ft:
            # Runs first: nobody leaves while another still runs the code after the loop.
            atexit.register(_td.agree_at_exit, me.compute)

    def _place(self, world: MPI.Comm) -> tuple[str, list[str]]:
        """This process's node and every world rank's (``--virtual-nodes``,
        unless the job spans real hosts). Collective over ``world``."""
        host, k = socket.gethostname(), self.config.virtual_nodes
        hosts = world.allgather(host)
        self._virtual = False
        if k <= 0:
            return host, hosts
        if len(set(hosts)) > 1:
            if world.Get_rank() == 0:
                self.events.log("virtual_nodes_off", reason="the ranks run on several hosts")
            return host, hosts
        self._virtual = True
        total = world.Get_size()
        nodes = [virtual_node(w, total, k) for w in range(total)]
        return nodes[world.Get_rank()], nodes

    def _whoami(self) -> int:
        """The logical rank faults address: this one's, or ``n + j`` on the j-th waiting spare."""
        me = self.me
        if me.logical is not None:
            return me.logical
        return self._spare_addr if self._spare_addr is not None else me.uid

    # -- building the app ----------------------------------------------------------
    def _build(self) -> Work:
        if isinstance(self.comm, ResilientComm) and not self._inline:
            self.comm.drop_children()  # the factory makes them again
        return build_work(self._factory, self.comm, invariant=self._invariant,
                          bounds=self.config.bounds_map(),
                          snapshot=self.config.resilience)

    def _make_planner(self) -> None:
        """Rank 0's planner decides; the others' only plan the first segment. Local."""
        planner = make_planner(self.config, self._steps, nodes=len(set(self._hosts)),
                               checkpoints=self.ckpts.store is not None,
                               max_segment_s=HALT_WINDOW_S if self.halt.possible else 0.0,
                               max_segment_stretch_s=min(HALT_WINDOW_MAX_S,
                                                         self.config.halt_before / 4))
        self.planner = planner
        self.bounds = Boundaries(planner, self.ckpts, self.segments, self.events)

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
        if self._join is None:
            self._check_loop(steps, start)
            if isinstance(self.comm, ResilientComm):
                self.comm.end_setup()  # the factory form rebuilds; nothing to keep
        if not self.config.resilience:
            self.work = self._build()
            step = self.ckpts.resume(self.comm, self.work.state, start)
            self._t_loop = time.perf_counter()
            for s in range(step, steps):
                self._progress(s)
                yield s, self.work.app
            self._finish(steps)
            return
        first = self._begin(start)
        self.comm.void_on_failure = self.ft
        step, end = first, self._restart(first)
        self.events.log("segments", k=self.planner.k, auto=not self.config.segment_steps
                        and not self.config.soft_mtbf, state_bytes=state_nbytes(self.work.state),
                        start=step)
        self._t_loop = time.perf_counter()
        self._loop_origin = _jobctl.loop_origin(self.run_dir)
        global_rollbacks = 0
        self._latent_targets: dict[int | None, int] = {}
        while step < steps:
            try:
                agreed = yield from self.segments.run(self.me, self.work, step, end, self._slots)
                step = agreed.timing.end
                sync_state(self.work)  # a save and the summary read the arrays named now
                end = self.bounds.apply(agreed, self.me, self.comm.mpi_comm, self.work,
                                        self._hosts)
                if self._initial is not None and self.ckpts.last_committed_step() is not None:
                    self._initial = None  # a checkpoint is the state to go back to now
                self._progress(step)
                if agreed.halt and step < steps:
                    self._halt(step)
            except LatentError as err:
                step = self._latent_rollback(err)
                end = self._restart(step)
            except GlobalRollback as gr:
                global_rollbacks += 1
                sync_state(self.work)
                self.segments.abandon()
                step = self.ckpts.global_rollback(self.comm.mpi_comm, self.work, gr,
                                                  global_rollbacks)
                end = self._restart(step)
            except (ProcessFailure, MPI.Exception) as exc:
                step = self._recover(exc, step)
                # Replacements start the segment length afresh; survivors
                # must too, or the first segment ends at different steps on
                # different ranks and the agreement meets a halo exchange.
                end = self._restart(step)
        self._finish(steps)

    def _latent_rollback(self, err: LatentError) -> int:
        """A late diagnosis: every rank back to a checkpoint older than the
        error may be, else to the loop's start. Collective."""
        sync_state(self.work)
        step = self.ckpts.latent_rollback(self.comm.mpi_comm, self.work, err)
        self._latent_targets[step] = times = self._latent_targets.get(step, 0) + 1
        if times > 1 + self.config.max_retries:
            raise RetriesExhausted(
                f"{err}; going back to step {step} did not cure it in {times - 1} tries: the "
                "checkpoint holds it too (a latency longer than declared) or the fault persists")
        if step is None:
            if self.ckpts.restored_from is not None:
                raise RetriesExhausted(
                    f"{err}; no checkpoint of this run is older than the error may be, and the "
                    "run resumed from one: raise --ckpt-keep or diagnose more often")
            if self._inline and self._initial is None:
                raise RetriesExhausted(f"{err}; the inline loop keeps no copy of its start and "
                                       "no checkpoint is older than the error may be")
            if self._inline:
                self._initial.restore(self.work.state)
            else:
                self.work = self._build()
            step = self._step0
            self.events.log("latent_rollback_to_start", step=step)
        self.segments.cured_since(step)
        return step

    def range(self, start: int, stop: int | None = None, *,
              state: Callable[[], dict[str, Any]]) -> Iterator[int]:
        """The inline form, no factory: ``for it in rt.range(steps, state=lambda:
        {"u": u}):`` (docs/architecture.md, "The inline loop").

        Collective over the runtime's communicator. ``state`` is called at
        every boundary, so it names the loop's arrays as they are then
        (swaps included); everything else follows ``rt.loop``. A dead rank
        is replaced in the job (``spares``, ``respawn``) from the last
        committed checkpoint, or the loop's start before the first one: the
        replacement runs the program's own set-up code with its calls
        answered from what the dead rank received the first time
        (fast-forward, docs/architecture.md, "The inline loop"). A change of
        rank count (``shrink``) needs the factory form and is dropped; a
        set-up that made calls ulfmpy cannot log, or that does something
        else on the replacement, ends the job for a relaunch (exit 75,
        ``ulfmpy run --max-restarts K`` or a Slurm requeue).
        """
        if stop is None:
            start, stop = 0, start
        if not callable(state):
            raise ConfigError("rt.range(..., state=...) takes a callable that returns the "
                              "state dict, e.g. state=lambda: {'u': u}")
        if self.config.resilience and self._join is None and self._deferred is None:
            self._keep_setup(self.comm.end_setup())  # not on a replacement: it fast-forwarded
        app = _InlineApp(state)
        self._inline = True  # the set-up code's derived communicators stay
        for step, _ in self.loop(lambda comm: app, steps=stop, start=start):
            yield step

    def _keep_setup(self, logs: list[dict[str, Any]] | None) -> None:
        """The inline loop starts: keep the set-up logs for replacements, or
        say why a dead rank will end the job instead. Collective over the
        compute ranks; every rank ends with the same recovery policies."""
        cfg = self.config
        was = tuple(cfg.recovery)
        problems = sorted(set(self.comm.setup_unlogged))
        nbytes = 0
        if was and self.ft and logs is not None and not problems:
            try:
                nbytes = _setup_log.save(self.run_dir, self.me.logical, logs)
            except OSError as exc:
                problems = [f"the set-up log could not be written ({exc})"]
        problems = sorted({p for ps in self.comm.mpi_comm.allgather(problems) for p in ps})
        if not was:
            return
        if problems or not self.ft:
            recovery, why = (), (f"the set-up code made calls that are not logged: "
                                 f"{', '.join(problems)}" if problems else "no ULFM")
        else:
            recovery = tuple(p for p in was if p != "shrink")
            why = "shrink changes the rank count, which needs the factory form" \
                if recovery != was else None
            self.repairer.setup_log = True
        object.__setattr__(cfg, "recovery", recovery)  # every rank alike
        self.events.log("inline_loop", recovery_was=list(was),
                        recovery=list(recovery) or "relaunch", setup_log_bytes=nbytes,
                        reason=why)

    def _check_loop(self, steps: int, start: int) -> None:
        """Refuse a loop or a fault that cannot work, once, before any step. Every
        compute rank is here with the same arguments, so all refuse alike; the
        spares (waiting in ``__enter__``) are released first."""
        problem = None
        if not isinstance(steps, (int, np.integer)) or steps < 0:
            problem = f"rt.loop(steps={steps!r}): steps must be a whole number >= 0"
        elif not 0 <= start <= steps:
            problem = f"rt.loop(start={start!r}): start must be in 0..steps ({steps})"
        else:
            problem = cannot_fire(self.config.inject, int(steps))
        if problem is None:
            return
        comm = self._user_comm
        if self.config.resilience:
            comm = self.me.compute
            if self.config.spares and self.me.logical == 0:
                from ulfmpy.spares import release_spares

                release_spares(self.me, self.events, ft=self.ft, failed=False)
        _td.refuse_settings(comm, ConfigError(problem))

    def _begin(self, start: int) -> int | None:
        """Where this process's loop starts: fresh or resumed, as a replacement, or a spare."""
        if self._join is not None:
            self.comm.end_fast_forward()
            step = self._restore(with_replay(self.me), None, self._join["target"], None)
            self.events.log("recovery", policy="respawn", role="recovered", resumed_step=step,
                            uid=self.me.uid, logical=self.me.logical, restored_at=time.time(),
                            **self._join["joined"])
            return step
        if self._deferred is not None:  # a spare that replaced a dead rank
            self.comm.end_fast_forward()
            args, self._deferred = self._deferred, None
            return self._restore(*args)
        self.work = self._build()
        step = self.ckpts.resume(self.comm.mpi_comm, self.work.state, start)
        if self._inline and self.config.recovery and self.ckpts.last_committed_step() is None:
            # Until a checkpoint commits, the only state the inline loop can
            # return to after a dead rank is its start: keep a copy of it.
            self._initial = Snapshot(self.work.state)
            self._initial.take(step)
        self._hosts = self.comm.mpi_comm.allgather(self._host)
        self.ckpts.open(self.comm.mpi_comm, self.work.state, self._hosts)
        self._make_planner()
        return step

    def _restart(self, step: int) -> int:
        return self.bounds.restart(step)

    def _slots(self, t: SegmentTiming) -> np.ndarray:
        return self.bounds.slots(self.me.rank, self.comm, self.work, t,
                                 halt=self.halt.due() is not None)

    # -- halting (docs/architecture.md, "Halting") ------------------------------------
    def _halt(self, step: int) -> None:
        """Every rank agreed to halt at ``step``, saved there: commit, then leave
        with EXIT_HALTED. Collective over the compute ranks (spares released)."""
        self.halt.request("another rank asked")
        self.ckpts.save_at_halt(self.comm.mpi_comm, self.work.state, step)
        self.ckpts.drain()  # the halt's save is committed before anyone leaves
        self.halt.done = True
        self.ckpts.close()
        _td.leave_halted_run(self.me, self.comm.mpi_comm, step=step, events=self.events,
                             watch=self.halt, committed=self.ckpts.last_committed_step(),
                             spares=self.config.spares, ft=self.ft,
                             failed=bool(self.repairer.recoveries or self._saw_failure
                                         or self.me.role != _rec.Role.INITIAL))

    def _escalate(self, reason: str) -> None:
        """A second halt signal, or the job's end, before the halt was done: stop now."""
        # The watch is installed after self.ckpts exists (_setup).
        _td.escalate_halt(reason, uid=self.uid, run_dir=self.run_dir, events=self.events,
                          committed=self.ckpts.last_committed_step())

    # -- hard failures ---------------------------------------------------------------
    def _recover(self, exc: BaseException, step: int) -> int:
        """Repair after a dead rank; the step to resume from. Collective over the
        live processes of the job (spares included)."""
        self._saw_failure = True
        if self.work is not None:
            sync_state(self.work)  # survivors restore into the arrays named now
        self.me, resumed = self.repairer.recover(
            self.me, exc, step=step, comm=self.comm, cur_step=self.segments.cur_step,
            known_ckpt=self.ckpts.last_committed_step, restore=self._restore)
        self.planner.observe_recovery(self.repairer.recoveries[-1]["seconds"])
        return resumed

    def _spare_repair(self, me: Identity) -> tuple[Identity, int]:
        def later(me: Identity, plan: Any, target: int | None, old_logical: int | None) -> int:
            self._deferred = (me, plan, target, old_logical)
            return target if target is not None else 0

        return self.repairer.repair(me, t_detect=time.perf_counter(), step=0, cur_step=0,
                                    known_ckpt=self.ckpts.last_committed_step, restore=later)

    def _restore(self, me: Identity, plan: Any, target: int | None,
                 old_logical: int | None) -> int:
        """Application recovery on the repaired communicator. Collective."""
        survivor = self._join is None and self.work is not None
        if self._inline and target is None and survivor and self._initial is None:
            raise RecoveryFailed(
                "the inline loop (ulfmpy.range) lost a rank before it had a state to go back "
                "to; the job is relaunched (ulfmpy run --max-restarts K)")
        self.me = me
        self.comm.reset(me.compute)
        self.comm.open_contexts(me.replay)
        t0 = time.perf_counter()
        ctx = RestoreContext.after(plan, target, old_logical=old_logical, logical=me.logical)
        self.work, how = self.ckpts.restore_after_repair(self.comm.mpi_comm, me, ctx,
                                                         self._build, self.work)
        target = ctx.target  # newer when a checkpoint staged in memory everywhere was taken
        if self._inline and target is None and survivor:
            # No checkpoint yet: the inline loop's arrays go back to the loop's
            # start (a replacement's are there already: it ran the set-up).
            self._initial.restore(self.work.state)
            how = "loop start"
        self._hosts = self.comm.mpi_comm.allgather(self._host)
        self.ckpts.relayout(self.comm.mpi_comm, self.work.state, self._hosts)
        if self.planner is None:
            self._make_planner()
        self.events.log("restore_after_repair", how=how, step=target,
                        seconds=time.perf_counter() - t0)
        return target if target is not None else self._step0

    # -- end of run --------------------------------------------------------------------
    def _progress(self, step: int, *, final: bool = False) -> None:
        """Logical rank 0 records the progress (``ulfmpy/progress.py``). Local."""
        if self.me.logical != 0:
            return
        rep = getattr(self, "_reporter", None)
        if rep is None:
            rep = self._reporter = Reporter(self.run_dir, self.config.progress, total=self._steps,
                                            launch=_jobctl.launch_id() or "",
                                            every=self.config.progress_every)
        if not final and not rep.due():  # the plain loop asks every step
            return
        store = self.ckpts.store
        recoveries = self.repairer.recoveries
        rep.update(step, {
            "segments": self.segments.counters["segments"],
            "rollbacks": len(self.segments.rollbacks),
            "checkpoints": sum(r.committed for r in store.records) if store is not None else 0,
            "failures": sum(len(r.get("failed_ranks", ())) for r in recoveries),
            "recoveries": len(recoveries)}, final=final)

    def _finish(self, steps: int) -> None:
        if isinstance(self.comm, ResilientComm):
            # After the loop there is no next step to handle a failure at: a
            # failing call must raise, never stand in (a wrong result, exit 0).
            self.comm.void_on_failure = False
        comm = self.comm.mpi_comm if isinstance(self.comm, ResilientComm) else self.comm
        sync_state(self.work)  # the fingerprint of the arrays the state names at the end
        self.ckpts.save_final(comm, self.work.state, steps)
        self.ckpts.drain()
        self._progress(steps, final=True)
        # Loop time only, like the --no-resilience baseline (setup excluded),
        # from when this launch's loop started, whichever process saw that
        # (a replacement's own loop started later; with every first rank
        # replaced the summary's time was a fraction of the run's).
        wall = time.perf_counter() - getattr(self, "_t_loop", self._t0)
        origin = getattr(self, "_loop_origin", None)
        if origin is not None:
            wall = max(wall, time.time() - origin)
        self.summary, self._saw_failure = _td.close_run(
            comm, self.me, self.work.state, config=self.config, steps=steps, wall=wall,
            segments=self.segments, ckpts=self.ckpts, repairer=self.repairer, events=self.events,
            run_dir=self.run_dir, ft=self.ft, saw_failure=self._saw_failure,
            k=self.bounds.k if self.planner is not None else 0)
