"""The checkpoint interval: closed forms, availability models, scoring.

Pure functions, seconds in and seconds out, keyword-only arguments:

* ``mtbf`` M: the job's mean time between failures;
* ``save`` δ: the exposed (blocking) time of one checkpoint;
* ``recovery`` R: time from a failure until the job computes again
  (repair or relaunch plus restoring the checkpoint);
* ``latency`` D: error-detection latency (0 for fail-stop failures).

Two quantities are easy to confuse, so every docstring says which one it
returns: the *compute time* τ between two checkpoints and the *period*
T = τ + δ (checkpoint every T seconds of wall time).

Two availability models score any period:

* :func:`availability_paper` — the model of Saxena et al.: failures arrive
  with mean M while the job computes or saves, recovery and the re-execution
  of lost work cannot fail; A(T) = (M − Mδ/T) / (M + T/2 + R).
* :func:`availability_renewal` — exponential failures strike at any time,
  also during saves and recovery; see its docstring for the derivation.

:func:`saxena` is the optimum of the first, :func:`exact` of the second;
:func:`young` and :func:`daly` approximate them. :func:`table` puts every
model side by side for the ``ulfmpy interval`` command.
"""

from __future__ import annotations

import math as _math
from typing import Any as _Any

import numpy as _np

from ulfmpy.errors import ConfigError as _ConfigError

__all__ = [
    "MODELS",
    "young",
    "daly",
    "exact",
    "saxena",
    "saxena_latency",
    "nonblocking",
    "retained_checkpoints",
    "rollback_target",
    "lost_time",
    "availability_paper",
    "availability_renewal",
    "optimal_tau",
    "table",
]

#: Interval models selectable by name (``--interval-model``), in table order.
MODELS: tuple[str, ...] = ("young", "daly", "exact", "saxena")


# -- validation ---------------------------------------------------------------

def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (_math.isfinite(value) and value > 0):
        raise _ConfigError(f"{name} must be a finite number > 0 seconds, got {value!r}")
    return value


def _nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not (_math.isfinite(value) and value >= 0):
        raise _ConfigError(f"{name} must be a finite number >= 0 seconds, got {value!r}")
    return value


def _fraction(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise _ConfigError(f"{name} must be in [0, 1), got {value!r}")
    return value


# -- closed forms ---------------------------------------------------------------

def young(*, mtbf: float, save: float) -> float:
    """Young (1974): the first-order optimum τ = √(2δM).

    It minimizes the lost time per failure L(τ) = Mδ/τ + τ/2 + R
    (:func:`lost_time`).

    Args:
        mtbf: M, job mean time between failures (s).
        save: δ, exposed checkpoint time (s).

    Returns:
        τ, the compute time between checkpoints (s); the period is τ + δ.
    """
    mtbf, save = _positive("mtbf", mtbf), _positive("save", save)
    return _math.sqrt(2.0 * save * mtbf)


def daly(*, mtbf: float, save: float) -> float:
    """Daly (2006), higher-order estimate of the renewal-model optimum.

    τ = √(2δM)·[1 + ⅓√(δ/2M) + (1/9)(δ/2M)] − δ for δ < 2M, else τ = M.
    A series expansion of :func:`exact`; close to it where δ ≪ M.

    Args:
        mtbf: M, job mean time between failures (s).
        save: δ, exposed checkpoint time (s).

    Returns:
        τ, the compute time between checkpoints (s); the period is τ + δ.
    """
    mtbf, save = _positive("mtbf", mtbf), _positive("save", save)
    if save >= 2.0 * mtbf:
        return mtbf
    x = save / (2.0 * mtbf)
    return _math.sqrt(2.0 * save * mtbf) * (1.0 + _math.sqrt(x) / 3.0 + x / 9.0) - save


def exact(*, mtbf: float, save: float) -> float:
    """The exact optimum of :func:`availability_renewal` (exponential failures).

    τ* = M·(1 + W₀(−e^(−1−δ/M))), W₀ the principal branch of Lambert W.
    Independent of R and D: they scale the expected time of a period by a
    constant factor (see :func:`availability_renewal`).

    With u = τ/M and a = δ/M the condition w·e^w = −e^(−1−a), w = u − 1,
    is (1 − u)·e^u = e^(−a), i.e. g(u) = log(1 − u) + u + a = 0. Newton's
    method is run on g rather than on w·e^w: the argument of W₀ sits next to
    the branch point −1/e when δ ≪ M, where the textbook iteration loses
    half the digits to cancellation, while ``log1p(-u) + u`` keeps them.
    g is decreasing and concave on (0, 1), so Newton started right of the
    root (u₀ = min(√(2a), 1 − e^(−1−a)), both upper bounds of the root)
    decreases monotonically to it in a handful of steps.

    Args:
        mtbf: M, job mean time between failures (s).
        save: δ, exposed checkpoint time (s).

    Returns:
        τ, the compute time between checkpoints (s); the period is τ + δ.
    """
    mtbf, save = _positive("mtbf", mtbf), _positive("save", save)
    a = save / mtbf
    u = min(_math.sqrt(2.0 * a), -_math.expm1(-1.0 - a))
    if u >= 1.0:  # δ >> M: the root 1 − e^(−1−a−…) rounds to 1
        return mtbf
    for _ in range(100):
        g = _math.log1p(-u) + u + a
        step = g * (1.0 - u) / u  # g / g'(u), g'(u) = -u / (1 - u)
        u_next = u + step
        if not (0.0 < u_next < u):  # monotone from the right: stop at rounding level
            break
        u = u_next
    return mtbf * u


def saxena(*, mtbf: float, save: float, recovery: float) -> float:
    """Saxena et al.: the period that maximizes :func:`availability_paper`.

    Setting the derivative of A(T) = (1 − δ/T)·M / (M + R + T/2) to zero
    gives T² − 2δT − 2δ(M + R) = 0, so T = δ + √(δ² + 2δ(M + R)).
    Exact in the paper's model (recovery and re-execution cannot fail).

    Args:
        mtbf: M, job mean time between failures (s).
        save: δ, exposed checkpoint time (s).
        recovery: R, recovery time (s).

    Returns:
        T, the period between checkpoints (s); τ = T − δ.
    """
    mtbf, save = _positive("mtbf", mtbf), _positive("save", save)
    recovery = _nonnegative("recovery", recovery)
    return save + _math.sqrt(save * save + 2.0 * save * (mtbf + recovery))


def saxena_latency(*, mtbf: float, save: float, recovery: float, latency: float) -> float:
    """The period maximizing the paper's availability with detection latency.

    A_D(T) = (M − Mδ/T) / (M + T/2 + T⌊D/T⌋ + R) (:func:`availability_paper`
    with ``latency=D``) jumps at every T = D/n. Its supremum:

    * For T > D, ⌊D/T⌋ = 0 and A_D is the latency-free A, unimodal with its
      peak at T_0 = :func:`saxena`.
    * For δ < T <= D, n = ⌊D/T⌋ >= 1 and T > D/(n + 1), so the loss term
      (n + ½)T exceeds (n + ½)D/(n + 1) >= ¾D > D/2, while 1 − δ/T <= 1 − δ/D:
      A_D(T) < (1 − δ/D)·M / (M + R + D/2), the limit of A_D as T → D+.

    So the maximum is T_0 when T_0 > D. Otherwise A is decreasing on
    (D, ∞) and the supremum is that limit at T → D+, which is not attained:
    A_D(D) itself has ⌊D/D⌋ = 1 and is lower. This function then returns the
    smallest float above D, where A_D evaluates to the supremum up to
    rounding.

    Args:
        mtbf: M, job mean time between failures (s).
        save: δ, exposed checkpoint time (s).
        recovery: R, recovery time (s).
        latency: D, detection latency (s); 0 gives :func:`saxena`.

    Returns:
        T, the period between checkpoints (s); τ = T − δ.
    """
    latency = _nonnegative("latency", latency)
    base = saxena(mtbf=mtbf, save=save, recovery=recovery)
    if latency == 0.0 or base > latency:
        return base
    period = _math.nextafter(max(latency, float(save)), _math.inf)
    while _math.floor(latency / period) > 0:  # D/T can round up to 1 just above D
        period = _math.nextafter(period, _math.inf)
    return period


def nonblocking(*, mtbf: float, save: float, recovery: float, async_fraction: float) -> float:
    """First-order optimal period when saves overlap computation.

    A save takes C = ``save`` seconds, of which the fraction ω =
    ``async_fraction`` overlaps computation, so (1 − ω)C is exposed. A
    failure also loses the work overlapped with the save in flight, which
    adds ωC to the time lost per failure. Maximizing the fraction of time
    neither spent on exposed saves nor lost to failures,
    (1 − (1 − ω)C/T)·(1 − (R + ωC + T/2)/M) (the first-order waste of
    Robert & Vivien's formulation), gives T = √(2(1 − ω)C·(M − (R + ωC))).

    Args:
        mtbf: M, job mean time between failures (s).
        save: C, the total duration of one save (s).
        recovery: R, recovery time (s).
        async_fraction: ω in [0, 1), the overlapped fraction of the save.

    Returns:
        T, the period between checkpoints (s); the compute time is
        τ = T − (1 − ω)C.

    Raises:
        ConfigError: M <= R + ωC, where the first-order model breaks down.
    """
    mtbf, save = _positive("mtbf", mtbf), _positive("save", save)
    recovery = _nonnegative("recovery", recovery)
    omega = _fraction("async_fraction", async_fraction)
    room = mtbf - (recovery + omega * save)
    if room <= 0:
        raise _ConfigError(
            f"the non-blocking model needs mtbf > recovery + async_fraction*save "
            f"({mtbf:g} s <= {recovery + omega * save:g} s): failures come faster than recovery")
    return _math.sqrt(2.0 * (1.0 - omega) * save * room)


# -- detection latency ---------------------------------------------------------

def retained_checkpoints(*, period: float, latency: float) -> int:
    """Checkpoints to keep so that the rollback target is always kept.

    The target (:func:`rollback_target`) is the newest checkpoint at or
    before t_detect − D; the checkpoints newer than it lie in the half-open
    window (t_detect − D, t_detect], which holds at most ⌈D/T⌉ of them when
    one is taken every T. Keeping the ⌈D/T⌉ + 1 newest therefore keeps it.

    Args:
        period: T, the period between checkpoints (s).
        latency: D, detection latency (s).

    Returns:
        The number of committed checkpoints to retain (>= 1).
    """
    period = _positive("period", period)
    latency = _nonnegative("latency", latency)
    return _math.ceil(latency / period) + 1


def rollback_target(checkpoints: _Any, *, detected_at: float, latency: float) -> float | None:
    """The checkpoint to roll back to when an error is detected.

    An error found at t_detect happened at some t_err >= t_detect − D, and
    an error at t_err corrupts the state after t_err, so every checkpoint
    taken at or before t_detect − D is clean; the newest of them loses the
    least work (on average D + T/2, plus R to recover).

    Args:
        checkpoints: times (s) at which committed checkpoints were taken.
        detected_at: t_detect, when the error was detected (s).
        latency: D, detection latency (s).

    Returns:
        The newest checkpoint time <= t_detect − D, or ``None`` when no
        retained checkpoint is old enough.
    """
    latency = _nonnegative("latency", latency)
    limit = float(detected_at) - latency
    older = [float(t) for t in checkpoints if float(t) <= limit]
    return max(older) if older else None


# -- scoring ----------------------------------------------------------------------

def lost_time(*, tau: _Any, mtbf: float, save: float, recovery: float) -> _Any:
    """Young's lost time per failure L(τ) = Mδ/τ + τ/2 + R.

    Between two failures (M seconds) M/τ checkpoints cost δ each; a failure
    loses half an interval of work on average, then R to recover.

    Args:
        tau: τ, compute time between checkpoints (s); scalar or array.
        mtbf: M, job mean time between failures (s).
        save: δ, exposed checkpoint time (s).
        recovery: R, recovery time (s).

    Returns:
        Seconds lost per failure (same shape as ``tau``).
    """
    tau = _np.asarray(tau, dtype=float)
    with _np.errstate(divide="ignore"):
        out = mtbf * save / tau + tau / 2.0 + recovery
    return out if out.ndim else float(out)


def availability_paper(*, period: _Any, mtbf: float, save: float, recovery: float,
                       latency: float = 0.0) -> _Any:
    """Availability in the paper's model (Saxena et al.).

    A(T) = (M − Mδ/T) / (M + T/2 + R): per failure the job is up for M on
    average, a fraction δ/T of which goes to saves, then loses T/2 of work
    on average (re-executed) and recovers in R; neither can fail. With
    detection latency the paper's floor variant
    A_D(T) = (M − Mδ/T) / (M + T/2 + T⌊D/T⌋ + R) is used, which is
    discontinuous at T = D/n.

    Args:
        period: T = τ + δ (s); scalar or array.
        mtbf: M, job mean time between failures (s).
        save: δ, exposed checkpoint time (s).
        recovery: R, recovery time (s).
        latency: D, detection latency (s); 0 without.

    Returns:
        The fraction of wall time spent on useful computation, in [0, 1]
        (0 where T <= δ).
    """
    t = _np.asarray(period, dtype=float)
    with _np.errstate(divide="ignore", invalid="ignore"):
        extra = t * _np.floor(latency / t) if latency > 0 else 0.0
        out = mtbf * (1.0 - save / t) / (mtbf + t / 2.0 + extra + recovery)
    out = _np.where(t > save, out, 0.0)
    return out if out.ndim else float(out)


def availability_renewal(*, period: _Any, mtbf: float, save: float, recovery: float,
                         latency: float = 0.0) -> _Any:
    """Availability when exponential failures can strike at any time.

    Model: failures form a Poisson process of rate 1/M in wall time; a
    period is τ of compute then δ of save and counts only if no failure
    strikes during its T = τ + δ; after a failure the job waits D (the error
    is found D after it happens; later failures in that window are
    irrelevant, the rollback goes back before the first one), then recovers
    in R. Recovery can fail too and then starts over, and the interrupted
    period is re-executed from its start.

    Derivation (memorylessness): a task of length L that, on each failure,
    pays a penalty P before starting over takes in expectation
    E(L) = (e^{L/M} − 1)(M + E[P]): condition on the first failure time F,
    E(L) = L·e^{−L/M} + E[F; F < L] + (1 − e^{−L/M})(E[P] + E(L)) with
    E[F; F < L] = M − e^{−L/M}(L + M). Recovery itself is such a task with
    no penalty: E[Y] = M(e^{R/M} − 1). A period pays P = D + Y, so
    E[period] = (e^{T/M} − 1)(D + M·e^{R/M}) and, by the renewal-reward
    theorem, A(T) = τ / ((e^{T/M} − 1)(D + M·e^{R/M})).
    R and D only scale the denominator, so the optimal τ (:func:`exact`)
    depends on neither.

    Args:
        period: T = τ + δ (s); scalar or array.
        mtbf: M, job mean time between failures (s).
        save: δ, exposed checkpoint time (s).
        recovery: R, recovery time (s); recovery can fail and restarts.
        latency: D, detection latency (s); 0 without.

    Returns:
        The long-run fraction of wall time spent on committed computation,
        in [0, 1] (0 where T <= δ).
    """
    t = _np.asarray(period, dtype=float)
    tau = _np.maximum(t - save, 0.0)
    with _np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        # e^{R/M} overflows for R >> M: divide through by it instead.
        penalty = _np.exp(recovery / mtbf) + latency / mtbf
        out = (tau / mtbf) / (_np.expm1(t / mtbf) * penalty)
    out = _np.where(tau > 0, _np.nan_to_num(out, nan=0.0, posinf=0.0), 0.0)
    return out if out.ndim else float(out)


# -- dispatch and table -------------------------------------------------------

def optimal_tau(model: str, *, mtbf: float, save: float, recovery: float = 0.0) -> float:
    """τ of the named model, for callers that pick the model by name.

    Args:
        model: one of :data:`MODELS` (``young``, ``daly``, ``exact``,
            ``saxena``).
        mtbf: M, job mean time between failures (s).
        save: δ, exposed checkpoint time (s).
        recovery: R, recovery time (s); used by ``saxena`` only.

    Returns:
        τ, the compute time between checkpoints (s); the period is τ + δ.

    Raises:
        ConfigError: unknown model name or bad value.
    """
    if model == "young":
        return young(mtbf=mtbf, save=save)
    if model == "daly":
        return daly(mtbf=mtbf, save=save)
    if model == "exact":
        return exact(mtbf=mtbf, save=save)
    if model == "saxena":
        return saxena(mtbf=mtbf, save=save, recovery=recovery) - float(save)
    raise _ConfigError(f"unknown interval model {model!r}; choose one of {', '.join(MODELS)}")


def table(*, mtbf: float, save: float, recovery: float, latency: float = 0.0,
          async_fraction: float | None = None) -> dict[str, dict[str, float]]:
    """Every model's interval and the availability it gets in both models.

    Rows: ``young``, ``daly``, ``exact``, ``saxena``, plus ``saxena_latency``
    when ``latency`` > 0 and ``nonblocking`` when ``async_fraction`` is given.
    Both availability columns include the latency D when given (the paper's
    floor variant and the renewal model's wait D).

    With ``async_fraction`` ω, ``save`` is the full save time C: every model
    sees the exposed save (1 − ω)C as δ and recovery R + ωC (the overlapped
    work of a save in flight is lost with it), as :func:`nonblocking` does.

    Args:
        mtbf: M, job mean time between failures (s).
        save: δ, exposed checkpoint time, or with ``async_fraction`` the
            whole save time C (s).
        recovery: R, recovery time (s).
        latency: D, detection latency (s); 0 without.
        async_fraction: ω in [0, 1), or ``None`` for blocking saves.

    Returns:
        ``{model: {"tau_s", "period_s", "availability_paper",
        "availability_renewal"}}`` in row order.
    """
    mtbf, save = _positive("mtbf", mtbf), _positive("save", save)
    recovery = _nonnegative("recovery", recovery)
    latency = _nonnegative("latency", latency)
    delta, r_eff = save, recovery
    if async_fraction is not None:
        omega = _fraction("async_fraction", async_fraction)
        delta, r_eff = (1.0 - omega) * save, recovery + omega * save
        if delta <= 0:
            raise _ConfigError("async_fraction leaves no exposed save time")
    periods: dict[str, float] = {}
    for model in MODELS:
        periods[model] = optimal_tau(model, mtbf=mtbf, save=delta, recovery=r_eff) + delta
    if latency > 0:
        periods["saxena_latency"] = saxena_latency(mtbf=mtbf, save=delta, recovery=r_eff,
                                                   latency=latency)
    if async_fraction is not None:
        periods["nonblocking"] = nonblocking(mtbf=mtbf, save=save, recovery=recovery,
                                             async_fraction=async_fraction)
    rows: dict[str, dict[str, float]] = {}
    for model, period in periods.items():
        kw = dict(period=period, mtbf=mtbf, save=delta, recovery=r_eff, latency=latency)
        rows[model] = {
            "tau_s": period - delta,
            "period_s": period,
            "availability_paper": float(availability_paper(**kw)),
            "availability_renewal": float(availability_renewal(**kw)),
        }
    return rows
