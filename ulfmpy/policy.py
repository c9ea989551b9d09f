"""The online checkpoint-interval policy: measurements in, decisions out.

Local (no MPI, no I/O): the runtime feeds it what it measured — the exposed
save time δ, restore and recovery times, the time per step — and asks
:meth:`IntervalPolicy.decide` after each checkpoint how many steps to run
before the next one. Each :class:`Decision` records the inputs it used, so
the runtime can log it as an event as is. The clock is injected so tests
and replays get reproducible timestamps.

The runtime must feed every rank the same values (e.g. the maximum over
ranks of the measured δ) for the ranks to agree on the boundaries.
"""

from __future__ import annotations

import dataclasses as _dc
import math as _math
import time as _time
from dataclasses import dataclass as _dataclass
from collections.abc import Callable as _Callable
from typing import Any as _Any

from ulfmpy import interval as _interval
from ulfmpy.errors import ConfigError as _ConfigError

__all__ = ["Decision", "IntervalPolicy"]


@_dataclass(frozen=True, kw_only=True)
class Decision:
    """One interval decision and the inputs it was made from.

    Attributes:
        model: the interval model used (``exact``, ``young``, ``daly``,
            ``saxena``).
        mtbf: M used (s). save: δ used (s). recovery: R used (s).
        step_time: seconds per step used, or ``None`` before any was measured.
        tau: τ, compute time until the next checkpoint (s).
        period: T = τ + δ (s).
        steps: steps until the next checkpoint (>= 1): τ / step_time
            rounded, or 1 while the step time is unknown.
        time: the injected clock's reading when the decision was made.
        latency: D used (s), the error-detection latency; with D > 0 the
            period maximizes the paper's availability with latency (its
            floor variant, :func:`ulfmpy.interval.saxena_latency`).
    """

    model: str
    mtbf: float
    save: float
    recovery: float
    step_time: float | None
    tau: float
    period: float
    steps: int
    time: float
    latency: float = 0.0

    def as_dict(self) -> dict[str, _Any]:
        """The decision as plain types, for an event log."""
        return _dc.asdict(self)


class _Ewma:
    """Exponentially weighted mean; the first sample replaces any estimate."""

    def __init__(self, alpha: float, estimate: float | None = None) -> None:
        self.alpha = alpha
        self.value = estimate
        self.measured = False

    def add(self, sample: float) -> None:
        if not self.measured or self.value is None:
            self.value, self.measured = sample, True
        else:
            self.value += self.alpha * (sample - self.value)


def _sample(name: str, seconds: float) -> float:
    seconds = float(seconds)
    if not (_math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"measured {name} must be a finite number >= 0 seconds, got {seconds!r}")
    return seconds


class IntervalPolicy:
    """Chooses the checkpoint interval from measured costs. Local.

    Args:
        mtbf: M, the job's mean time between failures (s); or give
        node_mtbf: the per-node MTBF (s) with
        nodes: the node count, and M = node_mtbf / nodes.
        model: interval model, one of :data:`ulfmpy.interval.MODELS`;
            ``exact`` (the renewal-model optimum) by default.
        save_estimate: δ assumed until the first save is measured (s);
            ``None``: :meth:`decide` needs a measured save first.
        recovery_estimate: the configured repair or relaunch time (s); until
            a recovery is measured, R = measured restore time + this.
        smoothing: EWMA weight of a new sample, in (0, 1]; 1 keeps only the
            latest. Saves vary with file-system load, hence the smoothing.
        clock: returns seconds; stamps each decision (``time.monotonic``).
        latency_steps: a declared error-detection latency (steps, from
            ``--diagnose``); with it, checkpoint decisions use the
            latency-aware optimum (D = latency_steps × step time).

    Raises:
        ConfigError: neither or both of ``mtbf`` and ``node_mtbf``, a bad
            model name or a bad value.
    """

    def __init__(self, *, mtbf: float | None = None, node_mtbf: float | None = None,
                 nodes: int = 1, model: str = "exact", save_estimate: float | None = None,
                 recovery_estimate: float = 0.0, smoothing: float = 0.3,
                 clock: _Callable[[], float] = _time.monotonic, latency_steps: int = 0) -> None:
        if (mtbf is None) == (node_mtbf is None):
            raise _ConfigError("give exactly one of mtbf (job) and node_mtbf (per node, with nodes)")
        if int(nodes) < 1:
            raise _ConfigError(f"nodes must be >= 1, got {nodes!r}")
        if node_mtbf is not None:
            self.mtbf = _interval._positive("node_mtbf", node_mtbf) / int(nodes)
        else:
            self.mtbf = _interval._positive("mtbf", mtbf)  # type: ignore[arg-type]
        if model not in _interval.MODELS:
            raise _ConfigError(f"unknown interval model {model!r}; choose one of {', '.join(_interval.MODELS)}")
        if not (0.0 < float(smoothing) <= 1.0):
            raise _ConfigError(f"smoothing must be in (0, 1], got {smoothing!r}")
        if save_estimate is not None:
            save_estimate = _interval._positive("save_estimate", save_estimate)
        self.model = model
        self.latency_steps = int(latency_steps)
        self._recovery_estimate = _interval._nonnegative("recovery_estimate", recovery_estimate)
        self._clock = clock
        self._save = _Ewma(float(smoothing), save_estimate)
        self._step = _Ewma(float(smoothing))
        self._recovery = _Ewma(float(smoothing))
        self._restore = _Ewma(float(smoothing), 0.0)
        self.last: Decision | None = None

    # -- measurements -----------------------------------------------------------

    def observe_save(self, seconds: float) -> None:
        """Record the exposed (blocking) time of one checkpoint save."""
        self._save.add(_sample("save time", seconds))

    def observe_step(self, seconds: float, steps: int = 1) -> None:
        """Record that ``steps`` steps took ``seconds`` (saves excluded)."""
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps!r}")
        self._step.add(_sample("step time", seconds) / int(steps))

    def observe_restore(self, seconds: float) -> None:
        """Record the time to read and install a checkpoint (e.g. at resume)."""
        self._restore.add(_sample("restore time", seconds))

    def observe_recovery(self, seconds: float) -> None:
        """Record a whole recovery (repair + restore); replaces the estimate."""
        self._recovery.add(_sample("recovery time", seconds))

    @property
    def recovery(self) -> float:
        """R in use: measured recoveries, else restore + configured estimate."""
        if self._recovery.value is not None:
            return self._recovery.value
        return (self._restore.value or 0.0) + self._recovery_estimate

    # -- decisions --------------------------------------------------------------

    def decide(self, *, step_time: float | None = None) -> Decision:
        """Choose the compute time and step count until the next checkpoint.

        Args:
            step_time: seconds per step to convert τ with; default the
                smoothed :meth:`observe_step` samples.

        Returns:
            The :class:`Decision` (also kept as :attr:`last`).

        Raises:
            ValueError: no save time measured and no ``save_estimate``.
        """
        if self._save.value is None:
            raise ValueError("no save time yet: pass save_estimate= or call observe_save() first")
        step_time = self._step.value if step_time is None else step_time
        save = max(self._save.value, _TINY)
        if self.latency_steps and step_time is not None:
            latency = self.latency_steps * step_time
            period = _interval.saxena_latency(mtbf=self.mtbf, save=save, recovery=self.recovery,
                                              latency=latency)
            tau = max(period - save, _TINY)
            self.last = Decision(model=self.model, mtbf=self.mtbf, save=save,
                                 recovery=self.recovery, step_time=step_time, tau=tau,
                                 period=tau + save,
                                 steps=max(1, round(tau / max(step_time, _TINY))),
                                 time=float(self._clock()), latency=latency)
            return self.last
        self.last = self._decision(mtbf=self.mtbf, save=save, recovery=self.recovery,
                                   step_time=step_time)
        return self.last

    def segment_length(self, *, soft_mtbf: float, snapshot: float,
                       step_time: float | None = None,
                       restore: float | None = None) -> Decision:
        """Propose the segment length k for local rollback of soft errors.

        The same math as :meth:`decide`, with M = the soft-error MTBF and
        δ = the time to take a segment-start snapshot.

        Args:
            soft_mtbf: mean time between soft errors (s).
            snapshot: measured time of one in-memory snapshot (s).
            step_time: seconds per step; default the measured one.
            restore: time to roll back to a snapshot (s); default
                ``snapshot`` (copying it back costs about as much).

        Returns:
            A :class:`Decision` whose ``steps`` is the proposed k (>= 1).
        """
        soft_mtbf = _interval._positive("soft_mtbf", soft_mtbf)
        snapshot = max(_sample("snapshot time", snapshot), _TINY)
        restore = snapshot if restore is None else _sample("restore time", restore)
        if step_time is None:
            step_time = self._step.value
        elif not (_math.isfinite(step_time) and step_time > 0):
            raise ValueError(f"step_time must be > 0 seconds, got {step_time!r}")
        return self._decision(mtbf=soft_mtbf, save=snapshot, recovery=restore,
                              step_time=step_time)

    def _decision(self, *, mtbf: float, save: float, recovery: float,
                  step_time: float | None) -> Decision:
        tau = _interval.optimal_tau(self.model, mtbf=mtbf, save=save, recovery=recovery)
        if step_time is None:
            steps = 1  # unknown step time: checkpoint after one step and measure
        else:
            steps = max(1, round(tau / max(step_time, _TINY)))
        return Decision(model=self.model, mtbf=mtbf, save=save, recovery=recovery,
                        step_time=step_time, tau=tau, period=tau + save, steps=int(steps),
                        time=float(self._clock()))


# Floor for measured times of 0 s (a coarse clock, nothing to write): keeps
# the formulas finite; a free save then rightly means very short intervals.
_TINY = 1e-9
