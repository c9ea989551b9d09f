"""Restartable segments: snapshot, the agreement, and the contamination closure.

The protocol (docs/architecture.md, "Segments and local rollback") is run by :mod:`ulfmpy.segments`; this module holds its
pieces that do not need the generator: the preallocated snapshot, the
per-rank report exchanged at each agreement, and the rule that grows the set
S of ranks that must re-execute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ulfmpy.state import StateValue, local_array

__all__ = ["Snapshot", "Report", "closure", "agree_reports"]


class Snapshot:
    """Copies of the state arrays in buffers allocated once. Local.

    ``take`` and ``restore`` copy with ``np.copyto`` into existing memory: no
    allocation per segment, and restore writes into the app's own arrays.
    The buffers are C-contiguous, so a checkpoint sends and stages straight
    from them.

    Attributes:
        step: the step the buffers hold (None: nothing yet).
        fresh: the step of a copy made at a boundary for the segment that
            starts there (a checkpoint's, or a restore's): that segment
            uses it instead of taking its own (docs/internals.md, "Copies
            of the state"). None once a segment started.
        seconds: what the last take cost.
    """

    def __init__(self, state: Mapping[str, StateValue]) -> None:
        # The state dict itself: after a swap it names other arrays of the
        # same shapes (identity.sync_state), and copies follow it by name.
        self._state = state
        self._names = list(state)
        self._buffers = [np.empty(local_array(v).shape, local_array(v).dtype)
                         for v in state.values()]
        self.step: int | None = None
        self.fresh: int | None = None
        self.seconds = 0.0

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    @property
    def data(self) -> dict[str, np.ndarray]:
        """The buffers by state name (what a checkpoint saves from)."""
        return dict(zip(self._names, self._buffers))

    @property
    def buffers(self) -> list[np.ndarray]:
        """The buffers, in the state's (sorted) order."""
        return list(self._buffers)

    def take(self, step: int, *, fresh: bool = False) -> None:
        t0 = time.perf_counter()
        for buf, v in zip(self._buffers, self._state.values()):
            np.copyto(buf, local_array(v))
        self.step = step
        self.fresh = step if fresh else None
        self.seconds = time.perf_counter() - t0

    def restore(self, state: Mapping[str, StateValue] | None = None) -> None:
        """Copy back into the arrays ``state`` (default: the one taken) names now."""
        for buf, v in zip(self._buffers, (state or self._state).values()):
            np.copyto(local_array(v), buf)

    def filled(self, step: int) -> None:
        """The buffers were written from elsewhere (a copy of ``step``): restore the
        state from them, and let the next segment start from them."""
        self.restore()
        self.step = self.fresh = step
        self.seconds = 0.0


@dataclass(frozen=True)
class Report:
    """What one rank tells the others at an agreement."""

    detected: bool = False
    detector: str | None = None
    finding: str | None = None
    contaminated: frozenset[int] = field(default_factory=frozenset)
    collective_mismatch: bool = False
    diverged: str | None = None
    repaired_steps: int = 0  # steps re-executed alone after a per-step detection
    repair_s: float = 0.0    # seconds those re-executions took
    # Its log holds a receive mpi4py's own Request class completed before
    # ulfmpy could log it: the buffer may have changed in between, so this
    # rank never replays from its log (docs/internals.md, "Requests").
    late_log: bool = False
    # A periodic diagnostic's finding, which may be this many steps old (None: none).
    latent: int | None = None


def closure(S: Iterable[int], reports: Sequence[Report], size: int) -> frozenset[int]:
    """Grow S by what the reports found (docs/architecture.md, "Segments and local rollback" step 5). Pure.

    A changed send pulls its receiver into S; a changed collective
    contribution, or a re-execution that diverged from the log, makes S all
    ranks (every rank consumed the wrong result).
    """
    out = set(S)
    for rank, rep in enumerate(reports):
        if rep.detected or rep.contaminated:
            # A rank that reached others also consumed their (now stale) replies.
            out.add(rank)
        out |= rep.contaminated
        if rep.collective_mismatch or rep.diverged:
            return frozenset(range(size))
    return frozenset(out)


def trusted(S: frozenset[int], late: Iterable[int], size: int) -> frozenset[int]:
    """S, or every rank when a rank of S would replay from a log it does not
    trust (a receive logged late): with every rank live, nothing is taken
    from a log. Pure."""
    if S and not S.isdisjoint(late):
        return frozenset(range(size))
    return S


def agree_reports(comm: Any, report: Report) -> list[Report]:
    """Exchange reports; every rank gets all of them in rank order.

    Collective over ``comm`` (the runtime's unlogged communicator).
    """
    return list(comm.allgather(report))
