"""Halting on request: a signal or the job's end time becomes a boundary (docs/architecture.md, "Halting").

A batch system ends a job at its wall time; before that it can warn it
(Slurm's ``--signal=B:USR1@120``), and an operator can ask a job to stop
(``scancel --signal=USR1``). ulfmpy turns either into a *halt*: at the next
segment boundary every rank takes a checkpoint, waits until it is
committed and the job exits with :data:`~ulfmpy.errors.EXIT_HALTED`
("halted, resume me"); the next allocation resumes with ``--resume auto``.

* :func:`parse_signals`, :func:`slurm_end_time` and :func:`deadline` are pure
  (the last two take what they read as arguments);
* :class:`HaltWatch` is one process's view: the signal handlers
  (``--halt-signal``), the deadline (``--halt-before`` before the job's end,
  known from ``--walltime`` or from Slurm) and the escalation when a second
  signal comes, or the end itself, before the halt is done.

The escalation stops the process at once with EXIT_HALTED and an exit
marker: a checkpoint is committed by renaming its manifest (docs/
architecture.md), so stopping anywhere leaves every committed checkpoint
as it was, and the next launch resumes from the newest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

__all__ = ["parse_signals", "slurm_end_time", "read_slurm_end", "deadline", "halt_times",
           "HaltWatch", "HALT_WINDOW_S", "signals_blocked", "catch_early"]

#: The first halt signal caught before any HaltWatch existed, and when (empty: none).
_early: list[tuple[signal.Signals, float]] = []
_early_claimed = threading.Event()
_early_held: set[signal.Signals] = set()
#: How long an early halt signal waits for a Runtime to take it; a program that
#: never makes one then gets the signal's default action (it ends).
EARLY_PATIENCE_S = 20.0


def catch_early(signals: tuple[signal.Signals, ...]) -> None:
    """From a rank's start (``ulfmpy._rank``), hold on to a halt signal that
    comes before the runtime installs its :class:`HaltWatch`: the signal's
    default action would kill the rank, and the halt would be lost. Local."""
    if threading.current_thread() is not threading.main_thread():
        return

    def held(signum: int, _frame: Any) -> None:
        if not _early:
            _early.append((signal.Signals(signum), time.time()))
            timer = threading.Timer(EARLY_PATIENCE_S, _unclaimed, args=(signum,))
            timer.daemon = True
            timer.start()

    for sig in signals:
        signal.signal(sig, held)
        _early_held.add(sig)


def _unclaimed(signum: int) -> None:
    # A timer thread cannot restore the signal's default action: end as it would.
    if not _early_claimed.is_set():
        print(f"ulfmpy: {signal.Signals(signum).name} came and no ulfmpy Runtime took it "
              f"within {EARLY_PATIENCE_S:.0f} s; ending", file=sys.stderr, flush=True)
        os._exit(128 + signum)


#: While a halt can come, a segment runs at most this many seconds, so a halt
#: lands within a few seconds and not after a 1000-step segment.
HALT_WINDOW_S = 2.0
#: ... which the segment-length policy may stretch to its own length, up to
#: this (and a quarter of ``--halt-before``): a boundary every 2 s costs more
#: than the policy's budget once steps are long (a 26 ms step with 10 ms
#: boundaries: 0.5 % instead of 0.25 %), and a halt still lands in seconds.
HALT_WINDOW_MAX_S = 10.0
#: A signal this soon after the first is the same request delivered twice
#: (``scancel --full`` signals the batch shell and every process; the
#: launcher passes it on as well), not a second one.
SAME_REQUEST_S = 2.0


def parse_signals(text: str) -> tuple[signal.Signals, ...]:
    """``"USR1,TERM"`` → the signals; ``""``/``"none"`` → none. Pure.

    Raises ValueError naming the bad entry.
    """
    out: list[signal.Signals] = []
    for part in str(text).replace(" ", "").split(","):
        if not part or part.lower() == "none":
            continue
        name = part.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, name):
            raise ValueError(f"--halt-signal: {part!r} is not a signal a process can catch "
                             "(use names such as USR1, USR2, TERM, INT, or none)")
        sig = signal.Signals[name]
        if sig not in out:
            out.append(sig)
    return tuple(out)


def slurm_end_time(text: str, *, tz: Any = None) -> float | None:
    """The job's end time from ``squeue -o %e`` (``2026-12-02T01:23:45``, local
    time) as a Unix time; None for ``Unlimited``, ``N/A`` or nothing. Pure."""
    text = (text or "").strip().splitlines()[0].strip() if (text or "").strip() else ""
    if not text or text.upper() in ("N/A", "UNLIMITED", "NONE", "INVALID"):
        return None
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None and tz is not None:
        when = when.replace(tzinfo=tz)
    return when.timestamp()


def read_slurm_end(environ: dict[str, str] | None = None,
                   run: Callable[..., Any] = subprocess.run) -> float | None:
    """The end time of the Slurm job this process runs in, or None. Reads once."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True,
                  timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return slurm_end_time(out.stdout) if out.returncode == 0 else None


def deadline(*, start: float, walltime: float, halt_before: float,
             slurm_end: float | None) -> tuple[float | None, float | None]:
    """(when to halt, when the job is ended) as Unix times, or (None, None). Pure.

    ``--walltime`` (seconds from ``start``) wins over the Slurm end time.
    The margin is at most half the time left at ``start``, so a job shorter
    than twice ``--halt-before`` still computes before it halts (and does not
    halt at once after every requeue).
    """
    end = start + walltime if walltime > 0 else slurm_end
    if end is None:
        return None, None
    return end - min(halt_before, max(end - start, 0.0) / 2), end


def halt_times(config: Any, now: float | None = None) -> tuple[float | None, float | None]:
    """(halt at, job ends at) for a run's settings, from ``--walltime`` or, when
    it is not given, the Slurm job's end time (``squeue``, read here). Local."""
    slurm_end = read_slurm_end() if config.walltime <= 0 else None
    return deadline(start=time.time() if now is None else now, walltime=config.walltime,
                    halt_before=config.halt_before, slurm_end=slurm_end)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Start helper processes inside this: they never see a halt signal.

    A checkpoint helper killed by the ``SIGUSR1`` that halts
    its rank (``mpirun`` and ``scancel --full`` signal every process) would
    fail the very checkpoint the halt takes. The blocked mask is inherited
    across fork and exec, so the child keeps them blocked for life; in this
    process a signal that comes meanwhile stays pending and is delivered
    when the block ends (no request is lost). Helpers still die with their
    rank (``PR_SET_PDEATHSIG``).
    """
    sigs = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class HaltWatch:
    """One process's halt requests. Local object.

    Args:
        signals: the signals that request a halt (``--halt-signal``).
        halt_at: Unix time to halt at (the deadline), or None.
        end_at: Unix time the job is ended by the scheduler, or None: a halt
            not done by then (less a second) escalates.
        on_escalate: called (reason) to stop the process when a second
            signal comes or the end is reached before the halt is done.
    """

    def __init__(self, signals: tuple[signal.Signals, ...], *, halt_at: float | None = None,
                 end_at: float | None = None,
                 on_escalate: Callable[[str], None] | None = None) -> None:
        self.signals, self.halt_at, self.end_at = signals, halt_at, end_at
        self.reason: str | None = None
        self.requested_at: float | None = None
        self._on_escalate = on_escalate or _exit_now
        self._old: dict[int, Any] = {}
        self._timer: threading.Timer | None = None
        self.done = False

    @property
    def possible(self) -> bool:
        """A halt can come: segments are bounded to HALT_WINDOW_S."""
        return bool(self.signals) or self.halt_at is not None

    def install(self) -> None:
        """Catch the halt signals (main thread only: elsewhere nothing is caught)."""
        if threading.current_thread() is not threading.main_thread():
            return
        _early_claimed.set()
        for sig in _early_held - set(self.signals):  # the program halts on others, or none
            signal.signal(sig, signal.SIG_DFL)
        _early_held.clear()
        if _early and _early[0][0] in self.signals and self.reason is None:
            sig, at = _early[0]  # it came during start-up
            self.reason, self.requested_at = f"signal {sig.name}", at
        for sig in self.signals:
            self._old[sig] = signal.signal(sig, self._caught)
        if self.signals:
            # Never blocked here unless a parent left them so: be sure.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(self.signals))
        if self.end_at is not None:
            # The scheduler kills the job at its end: a halt still running
            # a second before that stops at once rather than half-done.
            left = self.end_at - 1.0 - time.time()
            self._timer = threading.Timer(max(left, 0.0), self._at_end)
            self._timer.daemon = True
            self._timer.start()

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _caught(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.reason is not None and not self.done:
            if self.requested_at is not None and time.time() - self.requested_at < SAME_REQUEST_S:
                return
            self._on_escalate(f"a second halt signal ({name}) while halting")
            return
        self.reason, self.requested_at = f"signal {name}", time.time()

    def _at_end(self) -> None:
        if not self.done:
            self._on_escalate("the job's end time came before the halt was done")

    def due(self, now: float | None = None) -> str | None:
        """Why this process wants to halt now, or None. Local."""
        if self.reason is not None:
            return self.reason
        now = time.time() if now is None else now
        if self.halt_at is not None and now >= self.halt_at:
            self.reason, self.requested_at = "deadline", now
        return self.reason

    def request(self, reason: str) -> None:
        """Halt at the next boundary (another rank asked: the agreement said so)."""
        if self.reason is None:
            self.reason, self.requested_at = reason, time.time()


def _exit_now(reason: str) -> None:
    from ulfmpy.errors import EXIT_HALTED

    print(f"ulfmpy: halt escalated: {reason}; stopping now (the newest committed "
          "checkpoint is intact; --resume auto resumes from it)", file=sys.stderr, flush=True)
    os._exit(EXIT_HALTED)
