"""In-job repair after a dead rank (docs/architecture.md, "In-job recovery"): revoke → shrink → agree → plan →
policy → restore.

Each step is a small function; the policy comes from a name → function
table (:data:`POLICIES`), tried in the configured order by the pure planner
:func:`ulfmpy.recovery.plan_repair`. A failure during a repair starts the
repair again (at most :data:`MAX_REPAIRS` times). Phases are timed by one
:class:`PhaseTimer` and recorded with the recovery.

Collective over the live processes of the job (spares included).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterator

from mpi4py import MPI

from ulfmpy import recovery as _rec
from ulfmpy import respawn as _respawn
from ulfmpy.identity import with_replay
from ulfmpy.errors import ProcessFailure, RecoveryFailed, StillSpare, translate_mpi_error
from ulfmpy.spares import translate

__all__ = ["Repairer", "PhaseTimer", "POLICIES", "MAX_REPAIRS"]

MAX_REPAIRS = 8


class PhaseTimer:
    """Times named phases: ``with timer("shrink"): ...``. Local."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.current: str | None = None  # the phase running now

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        self.current = name
        try:
            yield
        finally:
            self.current = None
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t


def _keep(world: MPI.Comm, plan: Any, ctx: "Repairer", timer: PhaseTimer,
          target: int | None, respawns: int) -> tuple[MPI.Comm, Any, int]:
    """spares and shrink: the surviving processes are the job (the split assigns them)."""
    return world, plan, respawns


def _respawn_policy(world: MPI.Comm, plan: Any, ctx: "Repairer", timer: PhaseTimer,
                    target: int | None, respawns: int) -> tuple[MPI.Comm, Any, int]:
    with timer("respawn"):
        merged, plan, times = _respawn.spawn_replacements(
            world, plan, target=target, respawns=respawns + 1, zygote_name=ctx.zygote_name,
            run_dir=ctx.run_dir, config=ctx.config, virtual=ctx.virtual,
            halt_times=ctx.halt_times, setup_log=ctx.setup_log)
    ctx.events.log("respawn_timing", **times)
    return merged, plan, respawns + 1


#: Recovery policies by name: ``fn(world, plan, repairer, timer, target, respawns)``
#: returns the world to split, the completed plan and the respawn count.
POLICIES: dict[str, Callable[..., tuple[MPI.Comm, Any, int]]] = {
    "spares": _keep,
    "respawn": _respawn_policy,
    "shrink": _keep,
}


class Repairer:
    """Repairs the job's communicators for one process. Local object.

    Args:
        config: the run's settings; ``recovery`` is the policy order.
        events: the process's event log.
        hooks: fault-injection hooks (kills in the recovery phase).
        run_dir: the run directory (respawned processes are told it).
        ft: ULFM is available.
        zygote_name: the node's zygote, for warm respawns.
        node: this process's node (a spare on the dead rank's node is chosen first).
        virtual: the nodes are ``--virtual-nodes`` (a replacement takes its
            node from the layout, not from its host).
        halt_times: (halt at, job ends at) of :mod:`ulfmpy.halt`, told to
            replacements.
    """

    def __init__(self, config: Any, events: Any, hooks: Any, run_dir: str, *, ft: bool,
                 zygote_name: str | None, node: str = "", virtual: bool = False,
                 halt_times: tuple[float | None, float | None] = (None, None)) -> None:
        self.config, self.events, self.hooks, self.run_dir = config, events, hooks, run_dir
        self.halt_times = halt_times
        self.ft, self.zygote_name = ft, zygote_name
        self.node, self.virtual = node, virtual
        # The inline loop kept its set-up logs: replacements fast-forward
        # through the set-up code (ulfmpy/setup_log.py).
        self.setup_log = False
        self.recoveries: list[dict[str, Any]] = []

    def recover(self, me: Any, exc: BaseException, *, step: int, comm: Any,
                **repair_args: Any) -> tuple[Any, int]:
        """A communication call failed at segment ``step``: repair if it is a dead rank.

        Re-raises what is not a process failure, and a failure with no
        in-job recovery (no ULFM, ``--recovery ""``, or another rank stopped
        on its own error: its abort marker is in the run directory).
        Collective over the live processes. ``repair_args`` go to :meth:`repair`.
        """
        from ulfmpy.teardown import abort_marker

        err = as_failure(exc, self.ft)
        if not isinstance(err, ProcessFailure):
            raise exc
        self.events.log("failure", step=step, error=str(err))
        if not self.ft or not self.config.recovery or abort_marker(self.run_dir):
            raise err
        comm.end_segment()
        return self.repair(me, t_detect=time.perf_counter(), step=step, **repair_args)

    def repair(self, me: Any, *, t_detect: float, step: int, cur_step: int,
               known_ckpt: Callable[[], int | None],
               restore: Callable[[Any, Any, int | None, int | None], int]) -> tuple[Any, int]:
        """Repair and restore; returns the new identity and the step to resume from.

        ``known_ckpt()`` is this process's newest committed checkpoint step;
        ``restore(me, plan, target, old_logical)`` restores the application
        (collective over the new compute communicator) and returns the step.

        Raises:
            StillSpare: this process is still a spare after the repair.
            RecoveryFailed: no policy applies, or repairs kept failing.
        """
        timer = PhaseTimer()
        # A failure during a repair repairs again from where this one got:
        # the communicators it last made (a shrunk or merged world).
        self._current = me
        # An MPI call of the repair that never returns (a spawn under heavy
        # load was seen to) must not hang the job: leave for a relaunch.
        limit = self.config.repair_timeout
        watchdog = threading.Timer(limit, self._stuck, args=(timer, limit, known_ckpt))
        watchdog.daemon = True
        if limit > 0:
            watchdog.start()
        try:
            for attempt in range(MAX_REPAIRS):
                try:
                    return self._once(self._current, timer, t_detect, step, cur_step, attempt,
                                      known_ckpt, restore)
                except (ProcessFailure, MPI.Exception) as again:
                    self.events.log("failure_during_recovery", attempt=attempt, error=str(again))
            raise RecoveryFailed(f"{MAX_REPAIRS} repairs in a row failed")
        finally:
            watchdog.cancel()

    def _stuck(self, timer: PhaseTimer, limit: float, known_ckpt: Callable[[], int | None]) -> None:
        """The repair did not finish within ``--repair-timeout``: exit 75. Runs in
        the watchdog thread; does not return."""
        import os
        import sys

        from ulfmpy import jobctl
        from ulfmpy.errors import EXIT_RELAUNCH

        phase = timer.current or "between phases"
        uid = self._current.uid
        try:
            self.events.log("repair_stuck", seconds=limit, phase=phase, phases=dict(timer.phases))
            self.events.close()
            jobctl.write_exit_marker(self.run_dir, uid, EXIT_RELAUNCH)
        except Exception:
            pass
        if jobctl.claim_first_error(self.run_dir):
            ckpt = known_ckpt()
            where = (f"from checkpoint step {ckpt}" if ckpt is not None else
                     "from the start (no checkpoint was committed)")
            print(f"ulfmpy: an in-job repair did not finish within {limit:g} s (stuck in "
                  f"{phase}); exit {EXIT_RELAUNCH}: a relaunch (--max-restarts, a requeue) "
                  f"resumes {where}", file=sys.stderr, flush=True)
        os._exit(EXIT_RELAUNCH)

    def _once(self, me: Any, timer: PhaseTimer, t_detect: float, step: int, cur_step: int,
              attempt: int, known_ckpt: Callable[[], int | None],
              restore: Callable[..., int]) -> tuple[Any, int]:
        with timer("revoke"):
            # Every rank stops using the broken communicators at once.
            for c in (me.compute, me.world, me.replay):
                if c is not None:
                    _rec.revoke(c)
        # A recovery kill fires in the first recovery at or after its step.
        self.hooks.kill_point("recovery", max(step, cur_step))
        world, shrink_s = _rec.shrink(me.world)
        timer.phases["shrink"] = timer.phases.get("shrink", 0.0) + shrink_s
        me = self._current = me.replace(world=world, replay=None)
        with timer("agree"):
            # Who is alive, which checkpoint each holds, how many respawns
            # happened: the plan must be the same on every process.
            # Compute ranks also say which policies the loop left (the inline
            # loop drops shrink, or all) and whether replacements fast-forward:
            # a spare learns both here.
            told = (tuple(self.config.recovery), self.setup_log) if me.logical is not None \
                else None
            mine = (_rec.Member(me.uid, me.logical, known_ckpt(), self.node, me.layout),
                    me.respawns, told)
            members = sorted(translate(world.allgather, mine), key=lambda m: m[0].uid)
            respawns = max(r for _, r, _ in members)
            told = next((t for _, _, t in members if t is not None), None)
            if told is not None:
                object.__setattr__(self.config, "recovery", told[0])
                self.setup_log = told[1]
            live = [m for m, _, _ in members]
            plan = _rec.plan_repair(live, size=me.size, policies=self.config.recovery,
                                    spawn_ok=True)
            # A real agreement: the allgather may have completed on some
            # processes and failed on others (a death during it); ULFM's
            # fault-tolerant Agree fails on all of them alike, and all repair again.
            _rec.agree(world, 1)
        if plan is None:
            raise RecoveryFailed(
                f"no recovery policy of {','.join(self.config.recovery)} applies "
                f"({sum(m.logical is None for m in live)} live spares, "
                f"{len(live)} live processes)")
        held = [m.ckpt_step for m in live if m.logical is not None and m.ckpt_step is not None]
        target = max(held) if held else None
        world, plan, respawns = POLICIES[plan.policy](world, plan, self, timer, target, respawns)
        me = self._current = me.replace(world=world)
        old_logical = me.logical
        with timer("spares" if plan.policy == "spares" else "split"):
            logical = plan.assign[me.uid]
            compute = world.Split(0 if logical is not None else 1,
                                  logical if logical is not None else me.uid)
            compute.Set_errhandler(MPI.ERRORS_RETURN)
        role = me.role
        if logical is not None and old_logical is None:
            role = _rec.Role.RECOVERED
        elif logical is not None and role == _rec.Role.INITIAL:
            role = _rec.Role.SURVIVOR
        me = self._current = me.replace(world=world, compute=compute, replay=None,
                                        logical=logical, size=plan.size, role=role,
                                        respawns=respawns, layout=plan.layout)
        rec = {"policy": plan.policy, "failed_ranks": list(plan.failed), "attempt": attempt,
               "detected_at_step": step, "replaced": plan.replaced, "size": plan.size,
               "nodes": {r: plan.layout[r] for r in plan.replaced} if plan.layout else {}}
        if logical is None:
            self.events.log("recovery_spare_idle", **rec)
            raise StillSpare(target, identity=me)
        me = with_replay(me)
        with timer("restore"):
            resumed = restore(me, plan, target, old_logical)
        seconds = time.perf_counter() - t_detect
        # The steps this rank had computed since the restored checkpoint, which
        # it computes again (the segment's own steps count: they are redone).
        reached = max(step, cur_step)
        rec.update({"seconds": seconds, "phases": dict(timer.phases), "resumed_step": resumed,
                    "reached_step": reached, "lost_steps": max(0, reached - resumed),
                    "role": role.value})
        self.recoveries.append(rec)
        # This process's rank after the repair: the report follows its lane.
        self.events.log("recovery", **rec, logical=logical)
        return me, resumed


def as_failure(exc: BaseException, ft: bool) -> BaseException:
    """An MPI error as :class:`ProcessFailure` when it is one; else the error itself."""
    if isinstance(exc, MPI.Exception):
        err = translate_mpi_error(exc, "runtime", failure_suspected=ft)
        return err if isinstance(err, ProcessFailure) else exc
    return exc
