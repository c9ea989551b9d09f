"""The spares policy (docs/architecture.md, "In-job recovery"): spare ranks wait inside the runtime and one
takes a failed rank's logical place; at the end of the run they are released.

A spare never runs the app's code: it waits here until the run ends or a
repair makes it a compute rank.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from mpi4py import MPI

from ulfmpy import recovery as _rec
from ulfmpy.errors import ProcessFailure, StillSpare, UlfmpyError, translate_mpi_error

__all__ = ["wait_as_spare", "release_spares", "SPARE_TAG"]

SPARE_TAG = 7301


def translate(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn``; an MPI error becomes ulfmpy's exception (a failure suspected)."""
    try:
        return fn(*args)
    except MPI.Exception as exc:
        err = translate_mpi_error(exc, getattr(fn, "__name__", "call"), failure_suspected=True)
        raise err from exc


def wait_as_spare(me: Any, events: Any, hooks: Any,
                  repair: Callable[[Any], tuple[Any, int]]) -> tuple[Any, int | None, bool]:
    """Wait until the run ends or this spare replaces a failed rank.

    Collective with the compute ranks' release or repair. ``repair(me)``
    joins a repair (returns the new identity and the step to resume from,
    or raises :class:`StillSpare`). Returns ``(identity, step, saw_failure)``;
    ``step`` is None when the run ended without needing this spare.
    """
    events.log("spare_waiting")
    # Idle time: load the checkpoint engine (h5py) now rather than on the
    # critical path of the recovery this spare may join.
    import ulfmpy.checkpoint  # noqa: F401
    saw = False
    req = None
    while True:
        try:
            # Poll rather than block, so a timed kill can strike a waiting spare.
            # A receive from ANY_SOURCE that failed "pending" (another spare
            # died) stays posted and still matches the release: keep it. A
            # second one would leave the release to the first, never tested
            # again (a hang at the end of the run, found by a campaign).
            if not req:
                req = translate(me.world.irecv, None, MPI.ANY_SOURCE, SPARE_TAG)
            while True:
                done, msg = translate(req.test)
                if done:
                    req = None
                    break
                hooks.timed_kill(None)
                time.sleep(0.002)
            if msg in ("done", "done:lost"):
                events.log("spare_released")
                return me, None, saw or msg == "done:lost"
            if msg in ("halt", "halt:lost"):
                events.log("spare_released", halted=True)
                leave_halted(events, finalize=not (saw or msg == "halt:lost"))
        except ProcessFailure as exc:
            saw = True
            if not me.world.Is_revoked():
                # A death the compute ranks have not acted on (yet): they
                # revoke the world when they repair; until then keep waiting.
                try:
                    me.world.Ack_failed()
                except MPI.Exception:
                    pass
                time.sleep(0.01)
                continue
            req = None  # the world is revoked: the repair makes a new one
            try:
                events.log("failure", step=None, error=str(exc))
                me, step = repair(me)
                return me, step, True
            except StillSpare as still:
                me = still.identity
                continue


def release_spares(me: Any, events: Any, *, ft: bool, failed: bool, halt: bool = False) -> int:
    """Tell waiting spares the run is over; return how many were found dead.

    Called by logical rank 0. A spare killed while it waited is known to
    ULFM as a failed process of the world communicator (or fails the send).
    ``failed``: a process died during the run, so no spare may finalize.
    ``halt``: the run halted (:mod:`ulfmpy.halt`): the spares exit EXIT_HALTED.
    """
    word = "halt" if halt else "done"
    world_ranks = _world_ranks_of_spares(me.world, me.compute)
    dead: set[int] = set()
    if ft:
        try:
            dead = set(_rec.failed_ranks(me.world)) & set(world_ranks)
        except (MPI.Exception, UlfmpyError):
            dead = set()
    for r in world_ranks:
        if r in dead:
            continue
        try:
            # "done:lost": a process died (a spare, or a rank earlier), so
            # this one must not finalize either.
            me.world.send(f"{word}:lost" if (dead or failed) else word, dest=r, tag=SPARE_TAG)
        except MPI.Exception:
            dead.add(r)  # a dead spare needs no goodbye
    if dead:
        events.log("spares_lost", world_ranks=sorted(dead), count=len(dead))
    return len(dead)


def _world_ranks_of_spares(world: MPI.Comm, compute: MPI.Comm) -> list[int]:
    """World ranks that are not in the compute communicator."""
    active = MPI.Group.Translate_ranks(compute.Get_group(), list(range(compute.Get_size())),
                                       world.Get_group())
    return [r for r in range(world.Get_size()) if r not in set(active)]


def leave_halted(events: Any, *, finalize: bool) -> None:
    """Leave the job after a halt with EXIT_HALTED. Every process of the job
    does so together (after the halt's agreement). Does not return."""
    import os
    import sys

    from ulfmpy.errors import EXIT_HALTED
    from ulfmpy.respawn import stop_zygote

    events.close()
    stop_zygote()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # If MPI_Finalize or mpirun does not end (seen once in 26 halts), the
        # launcher ends the job after its grace period and reports 79.
        from ulfmpy import jobctl

        jobctl.write_exit_marker(str(events.path.parent.parent), events.rank, EXIT_HALTED)
    except (OSError, AttributeError):
        pass
    if finalize:
        # Skipped after a failure: Open MPI's finalize was seen to wait on
        # the dead process (teardown.guard_finalize).
        MPI.Finalize()
    os._exit(EXIT_HALTED)
