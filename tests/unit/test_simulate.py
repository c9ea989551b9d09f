"""The Monte Carlo simulator against the analytic models, and its statistics."""

import time

import numpy as np
import pytest

from ulfmpy import interval
from ulfmpy.errors import ConfigError
from ulfmpy.simulate import auto_periods, failure_gaps, simulate

M, DELTA, R = 3600.0, 30.0, 960.0


def _periods():
    best = interval.exact(mtbf=M, save=DELTA) + DELTA
    return [0.4 * best, best, 2.5 * best, interval.saxena(mtbf=M, save=DELTA, recovery=R)]


@pytest.mark.parametrize("model, dist, shape, latency", [
    ("paper", "exponential", 1.0, 0.0),
    ("paper", "weibull", 0.7, 0.0),      # the paper formula holds for any gap law
    ("renewal", "exponential", 1.0, 0.0),
    ("renewal", "exponential", 1.0, 300.0),
])
def test_simulated_availability_agrees_with_the_formula(model, dist, shape, latency):
    sim = simulate(periods=_periods(), mtbf=M, save=DELTA, recovery=R, model=model, dist=dist,
                   shape=shape, latency=latency, failures=200_000, rng=np.random.default_rng(7))
    for e in sim.estimates:
        assert e.ci_low <= e.analytic <= e.ci_high, e
        assert e.ci_high - e.ci_low < 0.005  # narrow enough for the check to mean something


def test_weibull_renewal_differs_from_the_exponential_formula():
    # With clustered failures (k = 0.5) long gaps are more frequent: the
    # exponential formula is far outside the simulated CI.
    sim = simulate(periods=_periods(), mtbf=M, save=DELTA, recovery=R, model="renewal",
                   dist="weibull", shape=0.5, failures=100_000, rng=np.random.default_rng(1))
    for e in sim.estimates:
        assert e.analytic < e.ci_low


def test_confidence_intervals_are_calibrated():
    # Over independent seeds, the 95 % CI covers the true value about 95 %
    # of the time, and its half-width matches the spread of the estimates.
    t = interval.exact(mtbf=M, save=DELTA) + DELTA
    truth = interval.availability_renewal(period=t, mtbf=M, save=DELTA, recovery=R)
    estimates, halves, covered = [], [], 0
    for seed in range(60):
        e = simulate(periods=[t], mtbf=M, save=DELTA, recovery=R, model="renewal",
                     failures=5_000, rng=np.random.default_rng(seed)).estimates[0]
        estimates.append(e.availability)
        halves.append((e.ci_high - e.ci_low) / 2)
        covered += e.ci_low <= truth <= e.ci_high
    assert covered >= 51  # P(Binomial(60, 0.95) <= 50) < 1.5 %
    ratio = np.mean(halves) / 1.96 / np.std(estimates, ddof=1)
    assert 0.7 < ratio < 1.4


def test_failure_gaps_have_mean_mtbf():
    rng = np.random.default_rng(3)
    for dist, shape in (("exponential", 1.0), ("weibull", 0.5), ("weibull", 2.0)):
        gaps = failure_gaps(rng, 400_000, mtbf=M, dist=dist, shape=shape)
        assert gaps.mean() == pytest.approx(M, rel=0.01)
    # the Weibull shape changes the spread: k < 1 has a coefficient of variation > 1
    g = failure_gaps(rng, 400_000, mtbf=M, dist="weibull", shape=0.5)
    assert g.std() / g.mean() > 2.0


def test_same_seed_same_result_and_common_random_numbers():
    kw = dict(mtbf=M, save=DELTA, recovery=R, failures=10_000)
    a = simulate(periods=[300.0, 600.0], rng=np.random.default_rng(5), **kw)
    b = simulate(periods=[300.0, 600.0], rng=np.random.default_rng(5), **kw)
    assert a == b
    # each period sees the same failures whatever else is simulated with it
    c = simulate(periods=[900.0, 600.0], rng=np.random.default_rng(5), **kw)
    assert c.estimates[1].availability == a.estimates[1].availability


def test_empirical_best_and_ties():
    periods = auto_periods(mtbf=M, save=DELTA, recovery=R)
    sim = simulate(periods=periods, mtbf=M, save=DELTA, recovery=R, model="renewal",
                   failures=200_000, rng=np.random.default_rng(2))
    values = [e.availability for e in sim.estimates]
    assert sim.best == int(np.argmax(values))
    assert sim.estimates[sim.best].tied_with_best
    assert sim.estimates[sim.best].gap_to_best == 0.0
    # the optimum region is flat: Daly/exact and Young are tied; the grid ends are not
    exact_period = interval.exact(mtbf=M, save=DELTA) + DELTA
    near = [e for e in sim.estimates if abs(e.period / exact_period - 1) < 0.05]
    assert near and all(e.tied_with_best for e in near)
    assert not sim.estimates[0].tied_with_best and not sim.estimates[-1].tied_with_best
    # common random numbers make differences far more precise than levels
    e0 = sim.estimates[0]
    assert abs(e0.gap_to_best) > (e0.ci_high - e0.ci_low)


def test_auto_periods_contain_every_optimum():
    periods = auto_periods(mtbf=M, save=DELTA, recovery=R)
    assert periods == sorted(periods) and all(t > DELTA for t in periods)
    for model in interval.MODELS:
        opt = interval.optimal_tau(model, mtbf=M, save=DELTA, recovery=R) + DELTA
        assert min(abs(t / opt - 1) for t in periods) < 1e-3


def test_a_million_failures_take_seconds():
    start = time.perf_counter()
    for model in ("paper", "renewal"):
        simulate(periods=_periods(), mtbf=M, save=DELTA, recovery=R, model=model,
                 failures=1_000_000, rng=np.random.default_rng(0))
    assert time.perf_counter() - start < 10.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(periods=[20.0]), "exceed the save time"),
    (dict(periods=[]), "no periods"),
    (dict(failures=10), "at least 100"),
    (dict(model="paper", latency=60.0), "renewal model only"),
    (dict(model="fancy"), "paper, renewal"),
    (dict(dist="lognormal"), "exponential, weibull"),
    (dict(dist="weibull", shape=0.0), "shape"),
    (dict(confidence=1.0), "confidence"),
])
def test_bad_arguments(kwargs, match):
    args = dict(periods=[600.0], mtbf=M, save=DELTA, recovery=R, failures=1000,
                rng=np.random.default_rng(0))
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        simulate(**args)
