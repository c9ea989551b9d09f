"""The segment length when ``--segment-steps auto`` (the default): an overhead budget.

Every segment boundary costs about the same whatever the segment's length:
the snapshot copy, the detectors, the agreement, and the ranks waiting for
each other there. A segment of k steps spreads that cost over k steps, so
the fault-free overhead of the boundaries is ``boundary / (k * step_time)``.
This policy measures both and picks the smallest k that keeps the overhead
within a budget (default :data:`DEFAULT_BUDGET`, 0.25 % of the step time),
because a shorter segment loses less work to a soft error and keeps a
smaller message log. The budget is a quarter of a point because the
boundaries are not the only cost of a protected loop: on the 4-rank
stencil with two ranks per core the resilient communicator costs about
a point and logging what each rank receives 0.5–0.8 more, and a
boundary costs more than this policy sees (ranks sharing a core reach the
agreement up to a step apart, and the step after a boundary runs slower).
With 0.5 % the whole loop cost 2.9 %, with 0.25 % 2.4 % (45 paired rounds
in 3 jobs, before the message log's buffers were grown in blocks); at
0.25 % it costs the same as one segment for the whole run (+0.3 ± 0.8
points in 30 paired rounds), so a smaller budget would buy nothing more.

Two caps keep the choice sane: at most :data:`K_MAX` steps, and a message
log no larger than the state itself or :data:`LOG_FLOOR` bytes, whichever
is more (the log grows with k; the snapshot is already one copy of the
state, and a few MiB matter to nobody). A new k is proposed only when it differs
from the current one by more than a quarter, so noise does not churn it.

Pure and local: no MPI. The runtime feeds it rank 0's measurements and
shares rank 0's proposal in the end-of-segment agreement, so every rank
switches at the same boundary.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SegmentBudget", "DEFAULT_BUDGET", "K_START", "K_MIN", "K_MAX", "LOG_FLOOR"]

K_START = 10   # first segments: short, so the first measurement comes early
K_MIN = 4
K_MAX = 1000
LOG_FLOOR = 16 << 20
HYSTERESIS = 0.25
DEFAULT_BUDGET = 0.0025


@dataclass
class SegmentBudget:
    """Rolling measurements in, segment lengths out. Local.

    Args:
        budget: the fraction of the step time the boundaries may cost.
        k: the segment length in use.
        window: how many recent measurements the medians use.
    """

    budget: float = DEFAULT_BUDGET
    k: int = K_START
    window: int = 5
    _boundary: deque[float] = field(default_factory=deque, repr=False)
    _step: deque[float] = field(default_factory=deque, repr=False)
    _log_per_step: float = 0.0
    _state_bytes: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.budget < 1):
            raise ValueError(f"segment budget must be a fraction in (0, 1), got {self.budget!r}")
        self._boundary = deque(maxlen=self.window)
        self._step = deque(maxlen=self.window)

    def observe_boundary(self, seconds: float) -> None:
        """Time from one segment's last step to the next segment's first (no checkpoint between)."""
        if math.isfinite(seconds) and seconds >= 0:
            self._boundary.append(seconds)

    def observe_segment(self, seconds: float, steps: int, *, log_bytes: int = 0,
                        state_bytes: int = 0) -> None:
        """A fault-free segment: its steps' time, and the log it kept."""
        if steps > 0 and math.isfinite(seconds) and seconds > 0:
            self._step.append(seconds / steps)
            self._log_per_step = log_bytes / steps
            self._state_bytes = state_bytes

    def ideal(self) -> int | None:
        """The k the measurements call for (before hysteresis), or None without data."""
        if not self._boundary or not self._step:
            return None
        boundary = statistics.median(self._boundary)
        step = statistics.median(self._step)
        k = math.ceil(boundary / (self.budget * step)) if step > 0 else K_MAX
        cap = K_MAX
        if self._log_per_step > 0:
            room = max(self._state_bytes, LOG_FLOOR)
            cap = min(cap, max(K_MIN, int(room // self._log_per_step)))
        return max(K_MIN, min(k, cap))

    def propose(self) -> dict[str, Any] | None:
        """A decision record when k should change (and adopt it), else None."""
        k = self.ideal()
        if k is None or abs(k - self.k) <= HYSTERESIS * self.k:
            return None
        boundary = statistics.median(self._boundary)
        step = statistics.median(self._step)
        decision = {"policy": "budget", "old": self.k, "steps": k, "budget": self.budget,
                    "boundary_s": boundary, "step_time": step,
                    "overhead": boundary / (k * step) if step > 0 else 0.0,
                    "log_bytes_per_step": self._log_per_step, "state_bytes": self._state_bytes}
        self.k = k
        return decision
