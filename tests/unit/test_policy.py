"""The online interval policy: measurements in, decisions out."""

import dataclasses
import itertools

import pytest

from ulfmpy import interval
from ulfmpy.errors import ConfigError
from ulfmpy.policy import Decision, IntervalPolicy


def _clock():
    ticks = itertools.count(100)
    return lambda: float(next(ticks))


def test_decision_uses_the_model_and_the_measured_step_time():
    policy = IntervalPolicy(mtbf=3600.0, model="young", save_estimate=30.0, clock=_clock())
    policy.observe_step(10.0)
    d = policy.decide()
    # young: tau = sqrt(2 * 30 * 3600) = 464.758 s -> 46 steps of 10 s
    assert d.tau == pytest.approx(464.758, rel=1e-6)
    assert d.period == pytest.approx(494.758, rel=1e-6)
    assert d.steps == 46
    assert (d.model, d.mtbf, d.save, d.step_time, d.time) == ("young", 3600.0, 30.0, 10.0, 100.0)
    assert policy.last is d


@pytest.mark.parametrize("model", interval.MODELS)
def test_each_model_gives_its_own_tau(model):
    policy = IntervalPolicy(mtbf=3600.0, model=model, save_estimate=30.0, recovery_estimate=960.0)
    d = policy.decide()
    assert d.tau == pytest.approx(interval.optimal_tau(model, mtbf=3600.0, save=30.0, recovery=960.0))
    assert d.recovery == 960.0


def test_default_model_is_exact():
    d = IntervalPolicy(mtbf=3600.0, save_estimate=30.0).decide()
    assert d.model == "exact"
    assert d.tau == pytest.approx(interval.exact(mtbf=3600.0, save=30.0))


def test_node_mtbf_is_divided_by_the_node_count():
    policy = IntervalPolicy(node_mtbf=8 * 3600.0, nodes=8, save_estimate=1.0)
    assert policy.mtbf == 3600.0
    assert policy.decide().mtbf == 3600.0


def test_saves_are_smoothed_and_the_first_replaces_the_estimate():
    policy = IntervalPolicy(mtbf=3600.0, save_estimate=100.0, smoothing=0.5)
    policy.observe_save(10.0)
    assert policy.decide().save == 10.0
    policy.observe_save(20.0)
    assert policy.decide().save == 15.0
    policy.observe_save(15.0)
    assert policy.decide().save == 15.0


def test_a_larger_save_lengthens_the_interval():
    policy = IntervalPolicy(mtbf=600.0, save_estimate=1.0, smoothing=1.0)
    policy.observe_step(0.1)
    small = policy.decide()
    policy.observe_save(4.0)
    large = policy.decide()
    assert large.steps > small.steps
    assert large.tau == pytest.approx(2 * small.tau, rel=0.05)  # tau grows like sqrt(save)


def test_recovery_estimate_then_measured_recovery():
    policy = IntervalPolicy(mtbf=3600.0, save_estimate=30.0, recovery_estimate=60.0, smoothing=0.5)
    assert policy.recovery == 60.0
    policy.observe_restore(5.0)
    assert policy.recovery == 65.0  # measured restore + configured repair estimate
    policy.observe_recovery(100.0)
    assert policy.recovery == 100.0  # a measured recovery replaces both
    policy.observe_recovery(200.0)
    assert policy.recovery == 150.0
    assert policy.decide().recovery == 150.0


def test_recovery_changes_saxena_only():
    for model, changes in (("saxena", True), ("exact", False)):
        policy = IntervalPolicy(mtbf=3600.0, model=model, save_estimate=30.0)
        before = policy.decide().tau
        policy.observe_recovery(3600.0)
        assert (policy.decide().tau != before) == changes


def test_steps_is_at_least_one():
    policy = IntervalPolicy(mtbf=3600.0, save_estimate=1.0)
    assert policy.decide().steps == 1  # no step time yet: checkpoint after one step
    policy.observe_step(1e6)
    assert policy.decide().steps == 1  # a step longer than the interval
    policy = IntervalPolicy(mtbf=3600.0, save_estimate=1.0)
    policy.observe_step(0.0)  # a coarse clock: many steps, not a crash
    assert policy.decide().steps > 1000


def test_step_time_per_step():
    policy = IntervalPolicy(mtbf=3600.0, save_estimate=30.0)
    policy.observe_step(50.0, steps=10)
    assert policy.decide().step_time == 5.0


def test_decide_needs_a_save_time():
    policy = IntervalPolicy(mtbf=3600.0)
    with pytest.raises(ValueError, match="save"):
        policy.decide()
    policy.observe_save(2.0)
    assert policy.decide().save == 2.0


def test_decision_is_frozen_and_serializable():
    d = IntervalPolicy(mtbf=3600.0, save_estimate=30.0, clock=lambda: 7.0).decide()
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.steps = 3  # type: ignore[misc]
    assert d.as_dict() == {"model": "exact", "mtbf": 3600.0, "save": 30.0, "recovery": 0.0,
                           "step_time": None, "tau": d.tau, "period": d.period, "steps": 1,
                           "time": 7.0, "latency": 0.0}
    assert isinstance(d, Decision)


def test_segment_length_uses_the_same_math():
    policy = IntervalPolicy(mtbf=3600.0, model="young", save_estimate=1.0)
    policy.observe_step(0.01)
    d = policy.segment_length(soft_mtbf=600.0, snapshot=0.05)
    # sqrt(2 * 0.05 * 600) = 7.746 s of 0.01 s steps
    assert d.tau == pytest.approx(7.7459667, rel=1e-6)
    assert d.steps == 775
    assert (d.mtbf, d.save, d.recovery) == (600.0, 0.05, 0.05)
    assert policy.segment_length(soft_mtbf=600.0, snapshot=0.05, step_time=0.1).steps == 77
    assert policy.last is None  # proposing k is not an interval decision


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one"),
    (dict(mtbf=1.0, node_mtbf=1.0), "exactly one"),
    (dict(mtbf=0.0), "mtbf"),
    (dict(node_mtbf=3600.0, nodes=0), "nodes"),
    (dict(mtbf=3600.0, model="fancy"), "young, daly, exact, saxena"),
    (dict(mtbf=3600.0, smoothing=0.0), "smoothing"),
    (dict(mtbf=3600.0, save_estimate=-1.0), "save_estimate"),
    (dict(mtbf=3600.0, recovery_estimate=-1.0), "recovery_estimate"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        IntervalPolicy(**kwargs)


@pytest.mark.parametrize("method", ["observe_save", "observe_step", "observe_restore", "observe_recovery"])
def test_bad_measurements(method):
    policy = IntervalPolicy(mtbf=3600.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            getattr(policy, method)(bad)


def test_a_declared_latency_gives_the_latency_aware_optimum():
    """With D above the latency-free optimum the floor variant's supremum is
    just above T = D (DESIGN §4); below it, the latency changes nothing."""
    pol = IntervalPolicy(mtbf=3600.0, model="saxena", save_estimate=30.0, latency_steps=100,
                         recovery_estimate=60.0)
    d = pol.decide(step_time=10.0)                      # D = 1000 s
    base = interval.saxena(mtbf=3600.0, save=30.0, recovery=60.0)
    assert base < 1000.0 and d.latency == 1000.0
    assert d.period == interval.saxena_latency(mtbf=3600.0, save=30.0, recovery=60.0,
                                               latency=1000.0)
    assert 1000.0 < d.period < 1000.0 * (1 + 1e-9) and d.steps == round(d.tau / 10.0)
    short = IntervalPolicy(mtbf=3600.0, model="saxena", save_estimate=30.0, latency_steps=1,
                           recovery_estimate=60.0).decide(step_time=10.0)
    assert short.period == pytest.approx(base)
