"""The end of a run: the summary, the exit code, and leaving without a hang.

* :func:`finish` gathers the global fingerprint and the run's history and
  writes ``summary.json`` (rank 0) from a frozen :class:`Summary`.
* :func:`exit_code_for` is the exit status as a pure function of what
  happened (like mpi4py ``run.py``'s ``set_abort_status``).
* :func:`end_job` ends a rank whose run failed so that the whole job ends;
  :func:`guard_finalize` lets a process that lived through a failure leave
  without ``MPI_Finalize``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from mpi4py import MPI

from ulfmpy._comm_handle import free_quietly

from ulfmpy.errors import (EXIT_RELAUNCH, EXIT_UNRECOVERABLE, FaultSignal, RecoveryFailed)
from ulfmpy.events import write_json_atomic
from ulfmpy.state import fingerprint

__all__ = ["Summary", "History", "finish", "close_run", "refuse_settings", "exit_code_for", "end_job", "guard_finalize",
           "abort_marker"]

_HISTORY_TAG = 7302


@dataclass(frozen=True)
class History:
    """What one process saw of the run (rank 0's summary takes the longest-lived one's)."""

    segments: int = 0
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    reexecuted_rank_steps: int = 0
    global_rollbacks: list[dict[str, Any]] = field(default_factory=list)
    latent_rollbacks: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    restored_from: dict[str, Any] | None = None


@dataclass(frozen=True)
class Summary:
    """``summary.json``: the run's outcome. Frozen; :meth:`as_dict` is the file."""

    ranks: int
    steps: int
    wall_s: float
    fingerprint: str | None
    resilience: bool = True
    segment_steps: int | None = None
    segment_length: int | None = None
    history: History = field(default_factory=History)
    injected_faults: int = 0
    escaped_faults: int = 0
    run_dir: str = ""
    spares_lost: int | None = None
    incomplete: bool = False
    failures: int | None = None
    launches: int = 1
    unfired_faults: tuple[str, ...] = ()
    faults: tuple[str, ...] = ()     # the run's fault specs (not in the file)

    def as_dict(self) -> dict[str, Any]:
        if self.incomplete:
            return {"ranks": self.ranks, "steps": self.steps, "wall_s": self.wall_s,
                    "fingerprint": None, "incomplete": True}
        h = self.history
        # This launch's share: a resumed run started at its checkpoint's step,
        # and wall_s is this launch's time only.
        start = int((h.restored_from or {}).get("step", 0))
        out = {"ranks": self.ranks, "steps": self.steps, "start_step": start,
               "steps_run": self.steps - start, "wall_s": self.wall_s,
               "fingerprint": self.fingerprint, "resilience": self.resilience,
               "segment_steps": self.segment_steps, "segment_length": self.segment_length,
               "segments": h.segments, "rollbacks": h.rollbacks,
               "reexecuted_rank_steps": h.reexecuted_rank_steps,
               "injected_faults": self.injected_faults, "escaped_faults": self.escaped_faults,
               "global_rollbacks": h.global_rollbacks, "latent_rollbacks": h.latent_rollbacks,
               "checkpoints": h.checkpoints,
               "failures": len(h.recoveries) if self.failures is None else self.failures,
               "recoveries": h.recoveries, "launches": self.launches,
               "run_dir": self.run_dir}
        if self.unfired_faults:
            out["unfired_faults"] = list(self.unfired_faults)
        if h.restored_from is not None:
            out["restored_from"] = h.restored_from
        if self.spares_lost is not None:
            out["spares_lost"] = self.spares_lost
        return out


def finish(comm: MPI.Comm, rank: int, state: dict[str, Any], *, history: History,
           counters: dict[str, int], wall: float, lost: int, survivor: bool, events: Any,
           base: Summary) -> tuple[Summary, bool]:
    """Gather the fingerprint and the history; rank 0 writes ``summary.json``.

    Collective over ``comm`` (the compute ranks). ``base`` holds the local
    fields (ranks, steps, settings); ``lost`` is rank 0's count of spares
    that died waiting. Returns the summary and whether a process was lost.
    """
    try:
        fp = fingerprint(comm, state)
        counts = comm.allgather((counters["injected_faults"], counters["escaped_faults"],
                                 len(history.recoveries), counters["segments"], wall, lost))
    except MPI.Exception as exc:
        if rank == 0 or not survivor:
            raise
        # A peer died at the very end (the barrier below keeps the living
        # from leaving early). Rank 0 writes the summary; this rank has
        # nothing left to learn.
        events.log("finish_peer_gone", error=str(exc))
        return dataclasses.replace(base, wall_s=wall, fingerprint=None, incomplete=True), False
    wall = max(c[4] for c in counts)
    lost = counts[0][5]
    # The history of the run is best known to the process that lived through
    # all of it: a spare or respawned rank 0 joined late.
    keeper = max(range(len(counts)), key=lambda r: (counts[r][2], counts[r][3], -r))
    kept = history
    if keeper != 0:
        if rank == keeper:
            comm.send(history, dest=0, tag=_HISTORY_TAG)
        elif rank == 0:
            kept = comm.recv(source=keeper, tag=_HISTORY_TAG)
    # Nobody leaves before everybody has read what it was sent above. A
    # process that lived through a failure exits without MPI_Finalize, and a
    # peer still reading that process's last message was seen to read
    # garbage (an UnpicklingError in the allgather, exit 76). Past the
    # barrier only the barrier's own messages are in flight, and they carry
    # no data.
    try:
        comm.Barrier()
    except MPI.Exception as exc:
        if not survivor:
            raise
        events.log("finish_peer_gone", error=str(exc), at="barrier")
    if rank != 0:
        kept = dataclasses.replace(history, checkpoints=[])
    summary = dataclasses.replace(
        base, wall_s=wall, fingerprint=fp, history=kept,
        injected_faults=sum(c[0] for c in counts), escaped_faults=sum(c[1] for c in counts),
        spares_lost=lost if base.spares_lost is not None else None)
    events.log("finish", fingerprint=fp, wall_s=wall)
    if rank == 0:
        summary = _durable_counts(summary, lost)
        write_json_atomic(os.path.join(base.run_dir, "summary.json"), summary.as_dict())
        if summary.escaped_faults:
            print(f"ulfmpy: warning: {summary.escaped_faults} injected bit flip(s) escaped "
                  "detection: the result may differ from a fault-free run (escaped_faults in "
                  "summary.json)", file=sys.stderr, flush=True)
        if summary.unfired_faults:
            print(f"ulfmpy: warning: {len(summary.unfired_faults)} injected fault(s) never "
                  f"fired: {'; '.join(summary.unfired_faults)} (their point was never reached)",
                  file=sys.stderr, flush=True)
    return summary, bool(lost)


def _durable_counts(summary: Summary, lost: int) -> Summary:
    """Faults, escapes and deaths from every process's log of every launch (rank 0).

    The in-memory counters above miss what died with a process (an escaped
    flip on a rank killed later) and what earlier launches saw.
    """
    from ulfmpy.tally import current_launch, tally, unfired

    t = tally(summary.run_dir, launch=current_launch())
    now = sum(len(r.get("failed_ranks", ())) for r in summary.history.recoveries) + lost
    specs = summary.faults
    return dataclasses.replace(
        summary, injected_faults=max(t.injected_faults, summary.injected_faults),
        escaped_faults=max(t.escaped_faults, summary.escaped_faults),
        # A launch that lost a process ended (no ULFM: mpirun killed the rest),
        # so each counts once, unless more kills than that were injected.
        failures=max(t.injected_kills, t.failed_launches + now), launches=max(1, t.launches),
        unfired_faults=tuple(unfired(specs, t.fired_specs)))


def abort_marker(run_dir: str) -> str | None:
    """The first abort marker a rank of this launch left in ``run_dir``, or None. Local."""
    from ulfmpy.jobctl import abort_markers

    found = abort_markers(run_dir)
    return found[0]["file"] if found else None


def exit_code_for(exc: BaseException, marker: str | None) -> int | None:
    """The exit status of a rank whose run ended on ``exc``. Pure.

    EXIT_RELAUNCH for a hard failure with no in-job recovery left (the
    newest committed checkpoint resumes the job); EXIT_UNRECOVERABLE for a
    failure caused by another rank's own error (``marker``); None for this
    rank's own error, which ends the job through :func:`end_job`'s abort path.
    """
    if isinstance(exc, (FaultSignal, RecoveryFailed)) and not marker:
        return EXIT_RELAUNCH
    if marker and isinstance(exc, FaultSignal):
        return EXIT_UNRECOVERABLE
    return None


def end_job(exc: BaseException, *, uid: int, run_dir: str, events: Any,
            comms: tuple[Any, ...]) -> None:
    """End this rank so the whole job ends (never a hang). Does not return.

    Under ULFM a rank that calls ``MPI_Abort`` (what ``python -m mpi4py``
    does on an uncaught exception) was seen to hang the job, so ranks end
    themselves instead: a rank whose own code failed leaves an abort
    marker, revokes and SIGKILLs itself (SIGKILL is reliably detected); the
    others see the failure, find the marker and exit with EXIT_UNRECOVERABLE.
    """
    marker = abort_marker(run_dir)
    code = exit_code_for(exc, marker)
    if code is not None:
        events.log("job_end", code=code, reason=repr(exc), abort_marker=marker)
        events.close()
        try:
            print(f"ulfmpy: rank {uid}: {exc}; "
                  + (f"another rank stopped on an error ({marker})" if marker else
                     "no in-job recovery: exiting for relaunch from the last checkpoint"),
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
        except OSError:
            # mpirun closes the ranks' streams as it tears the job down (a
            # BrokenPipeError here once turned a relaunch into exit 76).
            pass
        try:
            from ulfmpy.jobctl import write_exit_marker

            write_exit_marker(run_dir, uid, code)
        except OSError:
            pass
        os._exit(code)
    from ulfmpy import jobctl

    # Printed once per launch: the same error on every rank is one report.
    first = jobctl.claim_first_error(run_dir)
    if first:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    line = (traceback.format_exception_only(type(exc), exc) or [repr(exc)])[-1].strip()
    jobctl.write_abort_marker(run_dir, uid, code=EXIT_UNRECOVERABLE, error=line, first=first)
    events.log("job_end", code=EXIT_UNRECOVERABLE, reason=repr(exc))
    events.close()
    sys.stdout.flush()
    sys.stderr.flush()
    for c in comms:
        if c is not None:
            try:
                c.Revoke()
            except MPI.Exception:
                pass
    os.kill(os.getpid(), signal.SIGKILL)


_FINALIZE_SKIPPED = False


def guard_finalize() -> None:
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

    from ulfmpy.respawn import stop_zygote

    def leave() -> None:
        stop_zygote()  # the atexit handler that would have is skipped by _exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    atexit.register(leave)


def close_run(comm: MPI.Comm, me: Any, state: dict[str, Any], *, config: Any, steps: int,
              wall: float, segments: Any, ckpts: Any, repairer: Any, events: Any, run_dir: str,
              ft: bool, saw_failure: bool, k: int) -> tuple[dict[str, Any], bool]:
    """The end of a loop: release the spares, then :func:`finish`. Collective.

    Returns ``summary.json``'s content and whether this process saw a
    failure (a spare lost at the end counts).
    """
    from ulfmpy.recovery import Role
    from ulfmpy.spares import release_spares

    survivor = saw_failure or me.role != Role.INITIAL
    # Spares are released before the last collective, so that every rank
    # learns whether one died while waiting: then nobody may finalize (Open
    # MPI's finalize fence was seen to wait on the dead spare).
    lost = 0
    if me.rank == 0 and config.spares:
        lost = release_spares(me, events, ft=ft, failed=bool(repairer.recoveries or saw_failure))
    store = ckpts.store
    history = History(
        segments=segments.counters["segments"], rollbacks=segments.rollbacks,
        reexecuted_rank_steps=segments.counters["reexecuted_rank_steps"],
        global_rollbacks=ckpts.global_rollbacks, latent_rollbacks=ckpts.latent_rollbacks,
        checkpoints=[r.as_dict() for r in store.records] if store is not None else [],
        recoveries=repairer.recoveries, restored_from=ckpts.restored_from)
    on = config.resilience
    base = Summary(ranks=me.size, steps=steps, wall_s=wall, fingerprint=None, resilience=on,
                   segment_steps=config.segment_steps if on else None,
                   segment_length=(k or None) if on else None, run_dir=run_dir,
                   spares_lost=0 if config.spares else None, faults=tuple(config.inject))
    summary, lost_any = finish(comm, me.rank, state, history=history, counters=segments.counters,
                               wall=wall, lost=lost, survivor=survivor, events=events, base=base)
    return summary.as_dict(), saw_failure or lost_any


def leave(me: Any, events: Any, *, failed: bool) -> None:
    """A rank leaves the runtime after a completed run. Local.

    ``failed``: this process lived through a failure (or replaced a dead
    rank): it will leave without ``MPI_Finalize`` (:func:`guard_finalize`).
    A spawned process must finalize: its runtime reports an exit without
    finalize as an error (prterun then exits 1).
    """
    from ulfmpy.respawn import UID_STRIDE

    if failed and me.uid < UID_STRIDE:
        guard_finalize()
    events.close()
    # The compute communicator stays until the interpreter exits: rt.comm
    # (and what the app derived from it) still works after the with block.
    # It must be gone before MPI_Finalize: a respawned process's finalize
    # disconnects every communicator it shares with the dead (Open MPI 5
    # was seen to segfault sending to one), so the caller frees it then
    # (free_at_exit).
    free_quietly((me.replay, me.world))


def free_at_exit(comms: Any, resilient: Any = None) -> None:
    """Free what outlived the with block, before MPI_Finalize: the derived
    communicators' contexts and the compute communicator. Local."""
    if MPI.Is_finalized():
        return
    if resilient is not None:
        resilient.close()
    free_quietly(comms)


#: How long a rank waits at exit for the others (agree_at_exit) before it
#: leaves without them: its own communication is over by then.
EXIT_AGREE_S = 60.0


def agree_at_exit(compute: Any, patience: float = EXIT_AGREE_S) -> None:
    """Wait, at interpreter exit, until every compute rank is there. Collective
    over the compute ranks (a fault-tolerant agreement: a rank that died
    meanwhile does not hang it).

    After a failure the processes leave without ``MPI_Finalize``
    (:func:`guard_finalize`), which is no fence: a rank whose part of the
    app's code after the loop was done (a non-root of ``gather``) left at
    once, and ULFM then reported the root's ``gather`` as failed
    (``MPI_ERR_PROC_FAILED``, seen on a respawned rank 0 about half the time).

    A peer that leaves without agreeing (``os._exit`` in the app) and whose
    end ULFM does not report (a respawned rank is a spawned job, whose
    deaths Open MPI 5.0 does not always propagate) would hang it, so after
    ``patience`` seconds the rank says so and leaves: everything it had to
    communicate is done when it gets here.
    """
    if MPI.Is_finalized():
        return
    import numpy as np

    try:
        req = compute.Iagree(np.ones(1, dtype=np.intc))
        deadline = time.monotonic() + patience
        while not req.Test():
            if time.monotonic() > deadline:
                print(f"ulfmpy: rank {compute.Get_rank()}: the other ranks did not reach the "
                      f"end of the program within {patience:g} s; leaving without them",
                      file=sys.stderr, flush=True)
                return
            time.sleep(0.005)
    except MPI.Exception:
        pass


def end_idle_spare() -> None:
    """An idle spare ends its process where the loop ended: the app's code
    after the loop (and after the ``with`` block) is for compute ranks only.
    Finalizes unless it lived through a failure (:func:`guard_finalize`). Local."""
    from ulfmpy.respawn import stop_zygote

    stop_zygote()
    sys.stdout.flush()
    sys.stderr.flush()
    if not _FINALIZE_SKIPPED and not MPI.Is_finalized():
        MPI.Finalize()
    os._exit(0)


def refuse_settings(comm: Any, error: BaseException | None) -> None:
    """Settings refused on some rank: say so once and end the job. Collective; does not return.

    ``error`` is this rank's :class:`~ulfmpy.errors.ConfigError` or None.
    Raising it instead would end in ``python -m mpi4py``'s ``MPI_Abort``,
    which was seen to hang a ULFM job; every rank is here together (the
    caller's agreement), so each finalizes and leaves with EXIT_UNRECOVERABLE.
    """
    errors = comm.allgather(None if error is None else str(error))
    first = next((r, e) for r, e in enumerate(errors) if e is not None)
    if comm.Get_rank() == 0:
        where = "" if all(e == first[1] for e in errors) else f" (rank {first[0]})"
        print(f"ulfmpy: bad settings{where}: {first[1]}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    MPI.Finalize()
    os._exit(EXIT_UNRECOVERABLE)


def leave_halted_run(me: Any, comm: Any, *, step: int, events: Any, watch: Any,
                     committed: int | None, spares: int, ft: bool, failed: bool) -> None:
    """The run halted at ``step`` (its checkpoint committed): release the spares,
    say so once and leave with EXIT_HALTED. Collective over the compute ranks
    (every one is here after the same agreement). Does not return."""
    from ulfmpy.errors import EXIT_HALTED
    from ulfmpy.spares import leave_halted, release_spares

    lost = 0
    if me.rank == 0 and spares:
        lost = release_spares(me, events, ft=ft, failed=failed, halt=True)
    requested = watch.requested_at
    seconds = None if requested is None else time.time() - requested
    events.log("halt", step=step, reason=watch.reason, committed_step=committed,
               seconds_from_request=seconds, code=EXIT_HALTED)
    if me.rank == 0:
        where = (f"checkpoint step {committed} committed" if committed is not None else
                 "no checkpoint (checkpoints are off): a resume starts over")
        took = f" {seconds:.2f} s after the request" if seconds is not None else ""
        print(f"ulfmpy: halted at step {step} ({watch.reason}){took}; {where}; exit "
              f"{EXIT_HALTED}: resume with --resume auto", file=sys.stderr, flush=True)
    # One collective so nobody finalizes while another still releases spares.
    try:
        comm.Barrier()
    except MPI.Exception:
        failed = True
    leave_halted(events, finalize=not (failed or lost))


def escalate_halt(reason: str, *, uid: int, run_dir: str, events: Any,
                  committed: int | None) -> None:
    """Stop this process at once after a halt went wrong (:mod:`ulfmpy.halt`).
    Local; may run in a signal handler or a timer thread. Does not return.

    Committed checkpoints are untouched (a commit is a rename); the exit
    marker lets the launcher end the job if a peer does not notice.
    """
    from ulfmpy import jobctl
    from ulfmpy.errors import EXIT_HALTED

    try:
        events.log("halt_escalated", reason=reason, committed_step=committed)
        events.close()
        jobctl.write_exit_marker(run_dir, uid, EXIT_HALTED)
    except Exception:
        pass
    if jobctl.claim_first_error(run_dir):
        where = (f"checkpoint step {committed} is the newest committed" if committed is not None
                 else "no checkpoint was committed")
        print(f"ulfmpy: halt escalated: {reason}; stopping now ({where}; --resume auto resumes "
              f"from it); exit {EXIT_HALTED}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_HALTED)
