"""Monte Carlo availability of periodic checkpointing.

A job computes τ, saves for δ, and so on; failures come with mean gap M,
exponential or Weibull. Two models, each matching one analytic formula of
:mod:`ulfmpy.interval` exactly in the long run:

* ``paper`` (:func:`ulfmpy.interval.availability_paper`): failures strike
  while the job computes or saves ("uptime"); after one the job recovers in
  R and re-executes the work since the last checkpoint, neither of which can
  fail, and resumes where it was. Uptime is thus one continuous run of
  periods cut at the cumulative failure times S_i; the phase S_i mod T is
  the work lost. That phase is uniform in the long run for any non-lattice
  gap distribution, so the formula holds for Weibull gaps too.
* ``renewal`` (:func:`ulfmpy.interval.availability_renewal`): failures
  strike at any wall time, during saves and recovery too. Every failure
  restarts the job from its last checkpoint, so each gap X between two
  failures starts with recovery and then completes ⌊(X − R)⁺/T⌋ periods.
  With a detection latency D, a failure that hits a period is found D later
  (the job waits D first); one that hits a recovery restarts it at once.
  The formula assumes exponential gaps; with Weibull gaps (renewed at each
  failure) the simulation tells what the formula cannot.

All intervals see the same failure gaps (common random numbers), so their
differences are estimated far more precisely than their levels; the
empirical best interval and the ones statistically tied with it use that.
Confidence intervals come from batch means of the ratio estimator (delta
method), which tolerates the weak dependence between cycles of the paper
model. Randomness comes from an injected ``numpy.random.Generator``.
"""

from __future__ import annotations

import dataclasses as _dc
import math as _math
import statistics as _statistics
from dataclasses import dataclass as _dataclass
from collections.abc import Sequence as _Sequence
from typing import Any as _Any

import numpy as _np

from ulfmpy import interval as _interval
from ulfmpy.errors import ConfigError as _ConfigError

__all__ = [
    "DISTRIBUTIONS",
    "SIM_MODELS",
    "IntervalEstimate",
    "Simulation",
    "failure_gaps",
    "auto_periods",
    "simulate",
]

DISTRIBUTIONS: tuple[str, ...] = ("exponential", "weibull")
SIM_MODELS: tuple[str, ...] = ("paper", "renewal")


@_dataclass(frozen=True, kw_only=True)
class IntervalEstimate:
    """Simulated availability of one checkpoint period.

    Attributes:
        period: T = τ + δ (s). tau: τ (s).
        availability: simulated long-run availability.
        ci_low, ci_high: its confidence interval.
        analytic: the model's formula at this period (for ``renewal`` with
            Weibull gaps only a reference: the formula assumes exponential).
        gap_to_best: availability minus the best interval's (<= 0).
        tied_with_best: the paired confidence interval of ``gap_to_best``
            contains 0 (the data cannot tell this interval from the best).
    """

    period: float
    tau: float
    availability: float
    ci_low: float
    ci_high: float
    analytic: float
    gap_to_best: float
    tied_with_best: bool


@_dataclass(frozen=True, kw_only=True)
class Simulation:
    """The result of :func:`simulate`: inputs and one estimate per period."""

    model: str
    dist: str
    shape: float
    mtbf: float
    save: float
    recovery: float
    latency: float
    failures: int
    confidence: float
    estimates: tuple[IntervalEstimate, ...]
    best: int

    @property
    def best_period(self) -> float:
        """The period with the highest simulated availability (s)."""
        return self.estimates[self.best].period

    def as_dict(self) -> dict[str, _Any]:
        """Plain types for JSON."""
        return _dc.asdict(self)


def failure_gaps(rng: _np.random.Generator, n: int, *, mtbf: float,
                 dist: str = "exponential", shape: float = 1.0) -> _np.ndarray:
    """Draw ``n`` independent gaps between failures with mean ``mtbf``.

    Args:
        rng: the random generator (seeded by the caller).
        n: number of gaps.
        mtbf: the mean gap M (s).
        dist: ``"exponential"`` or ``"weibull"``.
        shape: Weibull shape k (< 1: infant mortality, 1: exponential); the
            scale is M / Γ(1 + 1/k) so that the mean is M.

    Returns:
        Array of ``n`` gaps (s).
    """
    if dist == "exponential":
        return rng.exponential(mtbf, n)
    if dist == "weibull":
        gaps: _np.ndarray = rng.weibull(shape, n) * (mtbf / _math.gamma(1.0 + 1.0 / shape))
        return gaps
    raise _ConfigError(f"unknown failure distribution {dist!r}; choose one of {', '.join(DISTRIBUTIONS)}")


def auto_periods(*, mtbf: float, save: float, recovery: float, points: int = 9) -> list[float]:
    """Periods worth simulating: every model's optimum plus a grid around them.

    Args:
        mtbf: M, mean gap between failures (s).
        save: δ, exposed save time (s).
        recovery: R, recovery time (s).
        points: size of the geometric grid from ¼ to 4 times the exact
            optimum period.

    Returns:
        Sorted periods T (s), all > δ, none within 0.1 % of another (Daly's
        and the exact optimum often coincide to that precision).
    """
    opt = {m: _interval.optimal_tau(m, mtbf=mtbf, save=save, recovery=recovery) + save
           for m in _interval.MODELS}
    grid = opt["exact"] * _np.geomspace(0.25, 4.0, points)
    out: list[float] = []
    for t in sorted([*opt.values(), *grid.tolist()]):
        if t > save and (not out or t > out[-1] * (1 + 1e-3)):
            out.append(float(t))
    return out


def _t_quantile(p: float, dof: int) -> float:
    # Student-t quantile by the Cornish-Fisher expansion around the normal
    # one: within 1e-3 for dof >= 5, which is all a batch count needs.
    z = _statistics.NormalDist().inv_cdf(p)
    v = float(dof)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


def _batch_starts(n: int, batches: int) -> _np.ndarray:
    return _np.linspace(0, n, batches + 1).astype(_np.int64)[:-1]


def _paper_batches(gaps: _np.ndarray, cum: _np.ndarray, starts: _np.ndarray, counts: _np.ndarray,
                   gap_sums: _np.ndarray, *, period: float, save: float,
                   recovery: float) -> tuple[_np.ndarray, _np.ndarray]:
    tau = period - save

    def computed(s: _np.ndarray) -> _np.ndarray:
        # compute time contained in uptime [0, s) of back-to-back periods
        done: _np.ndarray = _np.floor(s / period) * tau + _np.minimum(_np.mod(s, period), tau)
        return done

    ends = _np.append(starts[1:], len(gaps)) - 1
    before = _np.where(starts > 0, cum[starts - 1], 0.0)
    work = computed(cum[ends]) - computed(before)
    lost = _np.add.reduceat(_np.mod(cum, period), starts)
    return work, gap_sums + counts * recovery + lost


def _renewal_batches(gaps: _np.ndarray, starts: _np.ndarray, waits: _np.ndarray,
                     gap_sums: _np.ndarray, *, period: float,
                     save: float, recovery: float) -> tuple[_np.ndarray, _np.ndarray]:
    periods_done = _np.floor(_np.maximum(gaps - recovery, 0.0) / period)
    work = (period - save) * _np.add.reduceat(periods_done, starts)
    return work, gap_sums + waits


def simulate(*, periods: _Sequence[float], mtbf: float, save: float, recovery: float,
             rng: _np.random.Generator, model: str = "renewal", dist: str = "exponential",
             shape: float = 1.0, failures: int = 100_000, latency: float = 0.0,
             confidence: float = 0.95, batches: int = 100) -> Simulation:
    """Simulate ``failures`` failures and estimate each period's availability.

    Args:
        periods: checkpoint periods T = τ + δ to compare (s), each > δ.
        mtbf: M, mean gap between failures (s).
        save: δ, exposed save time (s).
        recovery: R, recovery time (s).
        rng: seeded generator; the same seed gives the same result.
        model: ``"paper"`` or ``"renewal"`` (see the module docstring).
        dist: ``"exponential"`` or ``"weibull"``.
        shape: Weibull shape k (ignored for exponential gaps).
        failures: number of failures (cycles) simulated.
        latency: D, detection latency (s); ``renewal`` model only.
        confidence: level of the confidence intervals.
        batches: batches for the batch-means variance (>= 10 failures each).

    Returns:
        A :class:`Simulation` with one :class:`IntervalEstimate` per period,
        in the given order, and the index of the empirical best.

    Raises:
        ConfigError: a bad argument (named in the message).
    """
    mtbf = _interval._positive("mtbf", mtbf)
    save = _interval._positive("save", save)
    recovery = _interval._nonnegative("recovery", recovery)
    latency = _interval._nonnegative("latency", latency)
    if model not in SIM_MODELS:
        raise _ConfigError(f"unknown simulation model {model!r}; choose one of {', '.join(SIM_MODELS)}")
    if dist not in DISTRIBUTIONS:
        raise _ConfigError(f"unknown failure distribution {dist!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    if not (_math.isfinite(shape) and shape > 0):
        raise _ConfigError(f"Weibull shape must be > 0, got {shape!r}")
    if latency > 0 and model != "renewal":
        raise _ConfigError("detection latency is simulated under the renewal model only")
    if not (0.0 < confidence < 1.0):
        raise _ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    failures = int(failures)
    if failures < 100:
        raise _ConfigError(f"simulate at least 100 failures, got {failures}")
    batches = max(10, min(int(batches), failures // 10))
    periods = [float(t) for t in periods]
    if not periods:
        raise _ConfigError("no periods to simulate")
    for t in periods:
        if not (_math.isfinite(t) and t > save):
            raise _ConfigError(f"every period must exceed the save time {save:g} s, got {t!r}")

    gaps = failure_gaps(rng, failures, mtbf=mtbf, dist=dist, shape=shape)
    starts = _batch_starts(failures, batches)
    counts = _np.diff(_np.append(starts, failures)).astype(float)
    gap_sums = _np.add.reduceat(gaps, starts)
    if model == "paper":
        cum = _np.cumsum(gaps)
    else:
        # a period failure is found D later; one during recovery at once
        hit_period = _np.concatenate(([True], gaps[:-1] >= recovery))
        waits = _np.add.reduceat(_np.where(hit_period, latency, 0.0), starts)

    work_b, time_b = [], []
    for t in periods:
        if model == "paper":
            w, z = _paper_batches(gaps, cum, starts, counts, gap_sums,
                                  period=t, save=save, recovery=recovery)
        else:
            w, z = _renewal_batches(gaps, starts, waits, gap_sums,
                                    period=t, save=save, recovery=recovery)
        work_b.append(w)
        time_b.append(z)
    work = _np.array(work_b)  # (intervals, batches)
    time = _np.array(time_b)
    avail = work.sum(axis=1) / time.sum(axis=1)
    # Delta-method residuals of the ratio estimator, one per batch.
    resid = (work - avail[:, None] * time) / time.mean(axis=1, keepdims=True)
    q = _t_quantile(0.5 + confidence / 2.0, batches - 1)
    half = q * resid.std(axis=1, ddof=1) / _math.sqrt(batches)
    best = int(_np.argmax(avail))
    diff_half = q * (resid - resid[best]).std(axis=1, ddof=1) / _math.sqrt(batches)

    formula = _interval.availability_paper if model == "paper" else _interval.availability_renewal
    extra = {"latency": latency} if model == "renewal" else {}
    estimates = tuple(
        IntervalEstimate(
            period=t, tau=t - save, availability=float(avail[i]),
            ci_low=float(avail[i] - half[i]), ci_high=float(avail[i] + half[i]),
            analytic=float(formula(period=t, mtbf=mtbf, save=save, recovery=recovery, **extra)),
            gap_to_best=float(avail[i] - avail[best]),
            tied_with_best=bool(avail[best] - avail[i] <= diff_half[i]),
        )
        for i, t in enumerate(periods))
    return Simulation(model=model, dist=dist, shape=float(shape), mtbf=mtbf, save=save,
                      recovery=recovery, latency=latency, failures=failures,
                      confidence=confidence, estimates=estimates, best=best)
