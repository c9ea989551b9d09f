"""One exception hierarchy for ulfmpy.

Two families:

* :class:`UlfmpyError` (an ``Exception``): problems the user must act on —
  bad configuration, a missing or corrupt checkpoint, an MPI without ULFM.
  Each message names the problem and what to do about it.
* :class:`FaultSignal` (a ``BaseException``): internal signals that unwind
  from deep inside user code (a halo exchange, a collective) back to
  ``Runtime.loop``. They derive from ``BaseException`` on purpose, like
  trio's ``Cancelled``: a user's ``except Exception`` must not swallow the
  news that a rank died or that the segment is being rolled back.

MPI error classes are translated in one table, :data:`MPI_ERROR_CLASSES`,
by :func:`translate_mpi_error`.
"""

from __future__ import annotations

__all__ = [
    "UlfmpyError",
    "ConfigError",
    "LaunchError",
    "UlfmUnavailable",
    "CheckpointError",
    "RestoreError",
    "UnsupportedCall",
    "RetriesExhausted",
    "RecoveryFailed",
    "FaultSignal",
    "LatentError",
    "ProcessFailure",
    "CommRevoked",
    "RollbackSignal",
    "GlobalRollback",
    "StillSpare",
    "translate_mpi_error",
    "EXIT_RELAUNCH",
    "EXIT_UNRECOVERABLE",
    "EXIT_HALTED",
]

#: Exit status of a rank/job that could not recover in-job but left a
#: committed checkpoint behind: relaunching resumes from it
#: (``ulfmpy run --max-restarts`` and the Slurm templates look for it).
EXIT_RELAUNCH = 75
#: Exit status of a run that stopped on an error relaunching cannot fix.
EXIT_UNRECOVERABLE = 76
#: Exit status of a run halted on request (a halt signal or its deadline,
#: :mod:`ulfmpy.halt`): "halted, resume me". Normally a checkpoint was taken
#: at the halt; after an escalation (a second signal, the job's end) the
#: newest committed one stands. Batch templates requeue on it.
EXIT_HALTED = 79


class UlfmpyError(Exception):
    """Base of every error ulfmpy reports to the user."""


class ConfigError(UlfmpyError, ValueError):
    """A setting is missing, malformed, or differs between ranks."""


class LaunchError(UlfmpyError):
    """``ulfmpy run`` cannot build or start the MPI job."""


class UlfmUnavailable(UlfmpyError):
    """The MPI library lacks the ULFM calls in-job recovery needs."""


class CheckpointError(UlfmpyError):
    """Writing or committing a checkpoint failed."""


class WriterLost(CheckpointError):
    """The node's checkpoint writer died: the checkpoint in flight was not
    committed (older ones are intact), and the next save reaches a new writer.
    The runtime logs it and goes on; a direct user of the store may too."""


class RestoreError(UlfmpyError):
    """No checkpoint can be restored (missing, corrupt, wrong rank count)."""


class UnsupportedCall(UlfmpyError):
    """An MPI call the resilient communicator cannot log was made in a segment."""


class RetriesExhausted(UlfmpyError):
    """Local re-execution kept detecting the error (a persistent fault)."""


class RecoveryFailed(UlfmpyError):
    """In-job recovery from a hard failure was impossible or failed."""


class FaultSignal(BaseException):
    """Internal unwinding signal; never caught by ``except Exception``."""


class ProcessFailure(FaultSignal):
    """A peer process died (MPI error class proc-failed or proc-failed-pending).

    Attributes:
        error_class: the MPI error class that was raised.
        call: the name of the communicator call that failed.
    """

    def __init__(self, message: str, *, error_class: int | None = None,
                 call: str | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.call = call


class CommRevoked(ProcessFailure):
    """The communicator was revoked by a rank that detected a failure."""


class RollbackSignal(FaultSignal):
    """Unwinds the loop body to the start of the segment for re-execution."""


class GlobalRollback(FaultSignal):
    """Local rollback gave up on a segment; every rank restores the last checkpoint.

    Attributes:
        first: the first step of the abandoned segment.
    """

    def __init__(self, first: int, reason: str) -> None:
        super().__init__(reason)
        self.first = first


class LatentError(FaultSignal):
    """A periodic diagnostic found an error that may be ``latency`` steps old:
    every rank goes back to a checkpoint older than that.

    Attributes:
        detected_at: the step the diagnostic ran after (the segment's end).
        latency: how many steps old the error may be.
        detector: the diagnostic's name.
        finding: what it found (on the first rank that found it).
    """

    def __init__(self, detected_at: int, latency: int, detector: str, finding: str) -> None:
        super().__init__(f"diagnostic {detector!r} found an error at step {detected_at} that may "
                         f"be {latency} steps old: {finding}")
        self.detected_at, self.latency = detected_at, latency
        self.detector, self.finding = detector, finding


class StillSpare(FaultSignal):
    """A repair left this process a spare: it goes back to waiting.

    Attributes:
        target: the checkpoint step the repaired job resumes from.
        identity: the spare's identity after the repair (its new communicators).
    """

    def __init__(self, target: int | None, identity: object = None) -> None:
        super().__init__("still a spare")
        self.target = target
        self.identity = identity


def _mpi_classes() -> dict[int, type[ProcessFailure]]:
    # Imported lazily so that pure modules importing ulfmpy.errors need no MPI.
    from mpi4py import MPI

    table: dict[int, type[ProcessFailure]] = {}
    for name, exc in (("ERR_PROC_FAILED", ProcessFailure),
                      ("ERR_PROC_FAILED_PENDING", ProcessFailure),
                      ("ERR_REVOKED", CommRevoked)):
        value = getattr(MPI, name, None)
        if isinstance(value, int):
            table[value] = exc
    return table


_TABLE: dict[int, type[ProcessFailure]] | None = None


def MPI_ERROR_CLASSES() -> dict[int, type[ProcessFailure]]:  # noqa: N802
    """The table mapping MPI error classes to ulfmpy fault signals."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _mpi_classes()
    return _TABLE


def translate_mpi_error(exc: BaseException, call: str,
                        *, failure_suspected: bool = False) -> BaseException:
    """Map an ``MPI.Exception`` to the ulfmpy exception to raise in its place.

    Open MPI 5 reports a peer's death as ERR_PROC_FAILED on most ranks, but the
    first rank to notice it in a collective was seen to get ERR_OTHER (16).
    With ``failure_suspected`` (the communicator is in an error-returning
    state during a fault-tolerant run) ERR_OTHER is treated as a failure too;
    the caller then confirms with ``Get_failed``.

    Returns the exception to raise (``exc`` itself when it is unrelated).
    """
    from mpi4py import MPI

    if not isinstance(exc, MPI.Exception):
        return exc
    cls = exc.Get_error_class()
    kind = MPI_ERROR_CLASSES().get(cls)
    if kind is None and failure_suspected and cls in (MPI.ERR_OTHER, MPI.ERR_IN_STATUS):
        # ERR_IN_STATUS: a multi-request wait where a peer's request failed.
        kind = ProcessFailure
    if kind is None:
        return exc
    return kind(f"{call}: {exc.Get_error_string()} (MPI error class {cls})",
                error_class=cls, call=call)
