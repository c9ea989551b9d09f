"""The interval formulas against hand-derived values and their own models.

Each closed form is checked two ways: against numbers derived here by hand
or by an independent method (bisection, quadrature, grid search), and, over
a wide range of (M, δ, R) drawn by hypothesis, against the model it claims
to optimize: no neighbour at ±1e-4 relative and no point of a wide grid
does better. ``test_neighbour_check_catches_a_wrong_formula`` shows that the
check is sharp enough to fail when a formula optimizes another model.
"""

import decimal
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from ulfmpy import interval
from ulfmpy.errors import ConfigError
from ulfmpy.interval import (
    availability_paper, availability_renewal, daly, exact, lost_time, nonblocking,
    retained_checkpoints, rollback_target, saxena, saxena_latency, young,
)

M, DELTA, R = 3600.0, 30.0, 960.0  # 1 h, 30 s, 16 min


# -- hand-derived values ---------------------------------------------------------

def test_young_by_hand():
    # sqrt(2 * 30 * 3600) = sqrt(216000)
    assert young(mtbf=M, save=DELTA) == pytest.approx(464.7580015448900, rel=1e-12)


def test_daly_by_hand():
    # x = 30 / 7200 = 1/240; sqrt(x) = 0.0645497224; bracket = 1 + 0.0215165741 + 0.000462963
    bracket = 1 + 0.06454972243679028 / 3 + (1 / 240) / 9
    assert bracket == pytest.approx(1.0219795371, rel=1e-9)
    assert daly(mtbf=M, save=DELTA) == pytest.approx(464.75800154489 * 1.0219795371 - 30, rel=1e-9)
    assert daly(mtbf=M, save=DELTA) == pytest.approx(444.97317, rel=1e-6)


def test_daly_for_saves_longer_than_twice_the_mtbf_is_the_mtbf():
    assert daly(mtbf=100.0, save=200.0) == 100.0
    assert daly(mtbf=100.0, save=500.0) == 100.0


def test_saxena_by_hand():
    # 30 + sqrt(900 + 60 * 4560) = 30 + sqrt(274500)
    assert saxena(mtbf=M, save=DELTA, recovery=R) == pytest.approx(30 + 523.9274758971894, rel=1e-12)


def _exact_by_bisection(mtbf, save):
    # independent of the Newton solver: bisection on (1 - u) e^u = e^(-a)
    # in 60-digit decimals, which need no cancellation-free rewriting
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        a = decimal.Decimal(save) / decimal.Decimal(mtbf)
        target = (-a).exp()
        lo, hi = decimal.Decimal(0), decimal.Decimal(1)
        for _ in range(120):
            mid = (lo + hi) / 2
            if (1 - mid) * mid.exp() > target:
                lo = mid
            else:
                hi = mid
        return float(decimal.Decimal(mtbf) * (lo + hi) / 2)


@pytest.mark.parametrize("mtbf, save", [(M, DELTA), (7200.0, 1.0), (1.0, 0.5), (1.0, 3.0), (1e6, 1e-2)])
def test_exact_matches_bisection_and_lambert_w_identity(mtbf, save):
    tau = exact(mtbf=mtbf, save=save)
    assert tau == pytest.approx(_exact_by_bisection(mtbf, save), rel=1e-9)
    w = tau / mtbf - 1  # must be W0(-e^(-1-save/mtbf)): w e^w equals the argument, w >= -1
    assert w >= -1
    assert w * math.exp(w) == pytest.approx(-math.exp(-1 - save / mtbf), rel=1e-9)


def test_exact_by_hand_value():
    assert exact(mtbf=M, save=DELTA) == pytest.approx(444.97690, rel=1e-6)


def test_exact_near_the_branch_point_keeps_its_digits():
    # δ/M = 1e-14: u = sqrt(2a) - 2a/3 + ..., the second term below rounding
    assert exact(mtbf=1.0, save=1e-14) == pytest.approx(math.sqrt(2e-14) - 2e-14 / 3, rel=1e-9)


def test_exact_does_not_depend_on_recovery_but_saxena_does():
    assert saxena(mtbf=M, save=DELTA, recovery=0) < saxena(mtbf=M, save=DELTA, recovery=R)


def test_availability_paper_by_hand():
    # (3600 - 3600 * 30 / 600) / (3600 + 300 + 960) = 3420 / 4860
    a = availability_paper(period=600.0, mtbf=M, save=DELTA, recovery=R)
    assert a == pytest.approx(3420 / 4860, rel=1e-12)
    # with D = 1500 s: floor(1500 / 600) = 2 adds 1200 s
    a = availability_paper(period=600.0, mtbf=M, save=DELTA, recovery=R, latency=1500.0)
    assert a == pytest.approx(3420 / 6060, rel=1e-12)


def _renewal_by_quadrature(period, mtbf, save, recovery, latency):
    # Solve the renewal equations by numerical integration, not by the closed
    # form: E(L) = L e^{-L/M} + ∫_0^L (t + P + E(L)) f(t) dt for a task of
    # length L with per-failure penalty P, f the exponential density.
    def expected(length, penalty):
        t = np.linspace(0.0, length, 200_001)
        f = np.exp(-t / mtbf) / mtbf
        p_fail = np.trapezoid(f, t)
        mean_fail_time = np.trapezoid(t * f, t)
        return (length * math.exp(-length / mtbf) + mean_fail_time + p_fail * penalty) / (1 - p_fail)

    recover = expected(recovery, 0.0) if recovery > 0 else 0.0
    return (period - save) / expected(period, latency + recover)


@pytest.mark.parametrize("period, recovery, latency", [
    (600.0, R, 0.0), (300.0, 0.0, 0.0), (2000.0, 240.0, 120.0), (60.0, 3600.0, 0.0),
])
def test_availability_renewal_matches_the_renewal_equations(period, recovery, latency):
    got = availability_renewal(period=period, mtbf=M, save=DELTA, recovery=recovery, latency=latency)
    want = _renewal_by_quadrature(period, M, DELTA, recovery, latency)
    assert got == pytest.approx(want, rel=1e-7)


def test_availabilities_are_zero_without_compute_time_and_vectorize():
    t = np.array([10.0, 30.0, 600.0])
    for f in (availability_paper, availability_renewal):
        a = f(period=t, mtbf=M, save=DELTA, recovery=R)
        assert a.shape == (3,) and a[0] == 0 and a[1] == 0 and 0 < a[2] < 1
    assert availability_renewal(period=1e9, mtbf=M, save=DELTA, recovery=R) == 0.0


def test_lost_time_by_hand():
    # 3600 * 30 / 600 + 300 + 960
    assert lost_time(tau=600.0, mtbf=M, save=DELTA, recovery=R) == pytest.approx(180 + 300 + 960)


def test_nonblocking_by_hand():
    # sqrt(2 * 0.2 * 30 * (3600 - 960 - 24)) = sqrt(31392)
    t = nonblocking(mtbf=M, save=DELTA, recovery=R, async_fraction=0.8)
    assert t == pytest.approx(177.17787672280, rel=1e-10)
    assert nonblocking(mtbf=M, save=DELTA, recovery=R, async_fraction=0.0) == pytest.approx(
        math.sqrt(2 * 30 * (3600 - 960)))


def test_nonblocking_maximizes_its_first_order_model():
    c, omega = 30.0, 0.6
    t_star = nonblocking(mtbf=M, save=c, recovery=R, async_fraction=omega)
    grid = np.linspace(c, 20 * t_star, 400_001)[1:]
    useful = (1 - (1 - omega) * c / grid) * (1 - (R + omega * c + grid / 2) / M)
    assert t_star == pytest.approx(grid[np.argmax(useful)], rel=1e-3)


def test_nonblocking_refuses_failures_faster_than_recovery():
    with pytest.raises(ConfigError, match="faster than recovery"):
        nonblocking(mtbf=100.0, save=10.0, recovery=100.0, async_fraction=0.5)


# -- detection latency ---------------------------------------------------------------

def test_retained_checkpoints_by_hand():
    assert retained_checkpoints(period=60, latency=120) == 3
    assert retained_checkpoints(period=50, latency=120) == 4
    assert retained_checkpoints(period=600, latency=120) == 2
    assert retained_checkpoints(period=600, latency=0) == 1


def test_rollback_target_by_hand():
    ckpts = [0.0, 60.0, 120.0, 180.0]
    assert rollback_target(ckpts, detected_at=200.0, latency=120.0) == 60.0
    assert rollback_target(ckpts, detected_at=180.0, latency=120.0) == 60.0  # at t - D is clean
    assert rollback_target(ckpts, detected_at=179.0, latency=120.0) == 0.0
    assert rollback_target(ckpts, detected_at=100.0, latency=120.0) is None
    assert rollback_target(ckpts, detected_at=200.0, latency=0.0) == 180.0


@settings(max_examples=300, deadline=None)
@given(period=st.integers(1, 500), latency=st.integers(0, 5000), detect=st.integers(0, 20000))
def test_retained_checkpoints_always_hold_the_rollback_target(period, latency, detect):
    # integers keep k*T and t - D exact, so the boundary cases really occur
    taken = [float(k * period) for k in range(detect // period + 1)]
    target = rollback_target(taken, detected_at=detect, latency=latency)
    assume(target is not None)
    kept = taken[-retained_checkpoints(period=period, latency=latency):]
    assert target in kept


def test_saxena_latency_by_hand():
    # M = 1 h, δ = 1 s, R = 4 min, D = 2 min: the latency-free optimum
    # 1 + sqrt(1 + 2 * 3840) = 88.6 s < D, so the supremum is at T = 120+:
    # (3600 - 30) / (3600 + 60 + 240) = 3570 / 3900. At T = 120 itself
    # floor(D/T) = 1 adds 120 s: 3570 / 4020.
    kw = dict(mtbf=3600.0, save=1.0, recovery=240.0)
    t = saxena_latency(**kw, latency=120.0)
    assert 120.0 < t < 120.0 * (1 + 1e-12)
    assert availability_paper(period=t, **kw, latency=120.0) == pytest.approx(3570 / 3900, rel=1e-12)
    assert availability_paper(period=120.0, **kw, latency=120.0) == pytest.approx(3570 / 4020, rel=1e-12)


def test_saxena_latency_is_saxena_when_its_optimum_exceeds_d():
    assert saxena_latency(mtbf=M, save=DELTA, recovery=R, latency=120.0) == saxena(
        mtbf=M, save=DELTA, recovery=R)
    assert saxena_latency(mtbf=M, save=DELTA, recovery=R, latency=0.0) == saxena(
        mtbf=M, save=DELTA, recovery=R)


def test_saxena_latency_with_a_long_latency_still_sits_just_above_d():
    # many short pieces below D: none beats the limit at D+ (see the docstring)
    kw = dict(mtbf=3600.0, save=1.0, recovery=240.0, latency=3000.0)
    t = saxena_latency(**kw)
    assert 3000.0 < t < 3000.0 * (1 + 1e-12)
    grid = np.linspace(1.0, 9000.0, 900_001)[1:]
    assert availability_paper(period=t, **kw) >= availability_paper(period=grid, **kw).max()


@settings(max_examples=40, deadline=None)
@given(log_m=st.floats(2, 6), log_ratio=st.floats(-6, -1), rec=st.floats(0, 3),
       lat_factor=st.floats(0.05, 30))
def test_saxena_latency_beats_a_brute_force_grid(log_m, log_ratio, rec, lat_factor):
    mtbf = 10**log_m
    save = mtbf * 10**log_ratio
    recovery = rec * mtbf
    latency = lat_factor * saxena(mtbf=mtbf, save=save, recovery=recovery)
    kw = dict(mtbf=mtbf, save=save, recovery=recovery, latency=latency)
    t = saxena_latency(**kw)
    best = availability_paper(period=t, **kw)
    hi = 4 * max(latency, t)
    grid = np.concatenate([np.linspace(save, hi, 200_001)[1:], np.geomspace(save * 1.0001, hi, 20_001)])
    assert best >= availability_paper(period=grid, **kw).max() * (1 - 1e-12)


# -- each closed form is the optimum of its own model ------------------------------

def _is_local_optimum(f, x, h=1e-4, rel_tol=1e-14):
    """No neighbour at x(1 ± h) is better than x (f is maximized)."""
    fx = f(x)
    return all(f(x * (1 + s * h)) <= fx + rel_tol * abs(fx) for s in (-1, 1))


def _beats_grid(f, x, lo, hi):
    grid = np.geomspace(lo, hi, 4001)
    return f(x) >= np.max(f(grid)) - 1e-13 * abs(f(x))


inputs = dict(
    log_m=st.floats(1, 8),              # M from 10 s to 3 years
    log_ratio=st.floats(-7, -0.5),      # δ/M from 1e-7 to 0.3
    rec=st.floats(0, 10),               # R/M from 0 to 10
)


def _values(log_m, log_ratio, rec):
    mtbf = 10**log_m
    return mtbf, mtbf * 10**log_ratio, rec * mtbf


@settings(max_examples=150, deadline=None)
@given(**inputs)
def test_young_minimizes_lost_time(log_m, log_ratio, rec):
    mtbf, save, recovery = _values(log_m, log_ratio, rec)
    tau = young(mtbf=mtbf, save=save)

    def neg_loss(t):
        return -lost_time(tau=t, mtbf=mtbf, save=save, recovery=recovery)

    assert _is_local_optimum(neg_loss, tau)
    assert _beats_grid(neg_loss, tau, tau * 1e-3, tau * 1e3)


@settings(max_examples=150, deadline=None)
@given(**inputs)
def test_saxena_maximizes_the_paper_availability(log_m, log_ratio, rec):
    mtbf, save, recovery = _values(log_m, log_ratio, rec)
    period = saxena(mtbf=mtbf, save=save, recovery=recovery)

    def avail(t):
        return availability_paper(period=t, mtbf=mtbf, save=save, recovery=recovery)

    assert _is_local_optimum(avail, period)
    assert _beats_grid(avail, period, save * (1 + 1e-9), 1e3 * period)


@settings(max_examples=150, deadline=None)
@given(**inputs, lat=st.floats(0, 5))
def test_exact_maximizes_the_renewal_availability(log_m, log_ratio, rec, lat):
    mtbf, save, recovery = _values(log_m, log_ratio, rec)
    period = exact(mtbf=mtbf, save=save) + save

    def avail(t):
        return availability_renewal(period=t, mtbf=mtbf, save=save, recovery=recovery,
                                    latency=lat * mtbf)

    assert _is_local_optimum(avail, period)
    assert _beats_grid(avail, period, save * (1 + 1e-9), 1e3 * period)


@settings(max_examples=150, deadline=None)
@given(log_m=st.floats(1, 8), log_ratio=st.floats(-7, -1))
def test_daly_stays_close_to_exact_where_save_is_small(log_m, log_ratio):
    mtbf = 10**log_m
    save = mtbf * 10**log_ratio
    d, e = daly(mtbf=mtbf, save=save), exact(mtbf=mtbf, save=save)
    # the series is accurate to O((δ/M)^(3/2)); measured coefficient ≈ 0.011
    assert abs(d / e - 1) <= 0.02 * (save / mtbf) ** 1.5 + 1e-11
    a_d = availability_renewal(period=d + save, mtbf=mtbf, save=save, recovery=0.0)
    a_e = availability_renewal(period=e + save, mtbf=mtbf, save=save, recovery=0.0)
    assert a_d <= a_e * (1 + 1e-14)
    assert a_d >= a_e * (1 - 1e-7)


def test_neighbour_check_catches_a_wrong_formula():
    # Each optimum is wrong for the other model, and the check notices.
    mtbf, save, recovery = 3600.0, 30.0, 960.0

    def paper(t):
        return availability_paper(period=t, mtbf=mtbf, save=save, recovery=recovery)

    def renewal(t):
        return availability_renewal(period=t, mtbf=mtbf, save=save, recovery=recovery)

    assert not _is_local_optimum(paper, young(mtbf=mtbf, save=save) + save)
    assert not _is_local_optimum(renewal, saxena(mtbf=mtbf, save=save, recovery=recovery))
    assert not _is_local_optimum(paper, math.sqrt(2 * save * (mtbf + recovery)))  # Saxena minus δ
    tiny = 1e-7 * mtbf  # even where the models nearly agree
    assert not _is_local_optimum(
        lambda t: availability_paper(period=t, mtbf=mtbf, save=tiny, recovery=0.0),
        exact(mtbf=mtbf, save=tiny) + tiny)


# -- dispatch, table, validation ------------------------------------------------------

def test_optimal_tau_dispatches_by_name():
    kw = dict(mtbf=M, save=DELTA, recovery=R)
    assert interval.optimal_tau("young", **kw) == young(mtbf=M, save=DELTA)
    assert interval.optimal_tau("daly", **kw) == daly(mtbf=M, save=DELTA)
    assert interval.optimal_tau("exact", **kw) == exact(mtbf=M, save=DELTA)
    assert interval.optimal_tau("saxena", **kw) == pytest.approx(saxena(**kw) - DELTA)
    with pytest.raises(ConfigError, match="young, daly, exact, saxena"):
        interval.optimal_tau("best", **kw)


def test_table_rows_and_winners():
    rows = interval.table(mtbf=M, save=DELTA, recovery=R)
    assert list(rows) == ["young", "daly", "exact", "saxena"]
    for row in rows.values():
        assert set(row) == {"tau_s", "period_s", "availability_paper", "availability_renewal"}
        assert row["period_s"] == pytest.approx(row["tau_s"] + DELTA)
    assert max(rows, key=lambda m: rows[m]["availability_paper"]) == "saxena"
    assert max(rows, key=lambda m: rows[m]["availability_renewal"]) == "exact"
    assert rows["saxena"]["availability_paper"] == pytest.approx(0.70396, abs=1e-5)
    assert rows["exact"]["availability_renewal"] == pytest.approx(0.67126, abs=1e-5)


def test_table_with_latency_and_nonblocking_saves():
    rows = interval.table(mtbf=3600.0, save=1.0, recovery=240.0, latency=120.0)
    assert "saxena_latency" in rows and "nonblocking" not in rows
    assert max(rows, key=lambda m: rows[m]["availability_paper"]) == "saxena_latency"
    rows = interval.table(mtbf=M, save=DELTA, recovery=R, async_fraction=0.8)
    assert rows["nonblocking"]["period_s"] == pytest.approx(
        nonblocking(mtbf=M, save=DELTA, recovery=R, async_fraction=0.8))
    assert rows["young"]["tau_s"] == pytest.approx(young(mtbf=M, save=6.0))  # exposed save


@pytest.mark.parametrize("kwargs", [
    dict(mtbf=0.0, save=1.0), dict(mtbf=-1.0, save=1.0), dict(mtbf=M, save=0.0),
    dict(mtbf=float("nan"), save=1.0), dict(mtbf=M, save=float("inf")),
])
def test_bad_inputs_are_config_errors(kwargs):
    for f in (young, daly, exact):
        with pytest.raises(ConfigError):
            f(**kwargs)
    with pytest.raises(ConfigError):
        saxena(**kwargs, recovery=0.0)


def test_bad_recovery_latency_fraction():
    with pytest.raises(ConfigError, match="recovery"):
        saxena(mtbf=M, save=DELTA, recovery=-1.0)
    with pytest.raises(ConfigError, match="latency"):
        saxena_latency(mtbf=M, save=DELTA, recovery=R, latency=-1.0)
    with pytest.raises(ConfigError, match="async_fraction"):
        nonblocking(mtbf=M, save=DELTA, recovery=R, async_fraction=1.0)
