"""Detectors by name."""

import numpy as np
import pytest

from ulfmpy.detect import detectors, register_detector, run_detectors
from ulfmpy.errors import ConfigError
from ulfmpy.state import Block


class App:
    def __init__(self, u):
        self.u = u
        self.state = {"u": Block(u, u.shape, (0, 0)), "n": np.array(3)}
        self.bounds = {"u": (0.0, 1.0)}


def test_clean_state_passes():
    app = App(np.full((4, 4), 0.5))
    assert run_detectors(("finite", "bounds"), app, app.state) is None


@pytest.mark.parametrize("value,name", [(np.nan, "finite"), (np.inf, "finite"), (-1e-3, "bounds"),
                                        (1e308, "bounds")])
def test_corruption_found(value, name):
    app = App(np.full((4, 4), 0.5))
    app.u[2, 1] = value
    hit = run_detectors(("finite", "bounds"), app, app.state)
    assert hit is not None and hit[0] == name


def test_finite_sum_overflow_is_not_a_false_alarm():
    u = np.full((2, 2), 1e308)
    app = App(u)
    assert run_detectors(("finite",), app, app.state) is None


def test_bounds_needs_app_bounds():
    app = App(np.zeros((2, 2)))
    del app.bounds
    with pytest.raises(ConfigError, match="app.bounds"):
        run_detectors(("bounds",), app, app.state)


def test_unknown_and_custom_detectors():
    app = App(np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="unknown detector 'psychic'"):
        run_detectors(("psychic",), app, app.state)
    register_detector("nonzero", lambda a, s: "all zero" if not a.u.any() else None)
    assert "nonzero" in detectors()
    assert run_detectors(("nonzero",), app, app.state) == ("nonzero", "all zero")


def test_invariant():
    app = App(np.zeros((2, 2)))
    app.invariant = lambda: False
    assert run_detectors(("invariant",), app, app.state)[0] == "invariant"


def test_diagnostics_parse_with_their_latency():
    from ulfmpy.detect import Diagnostic, parse_diagnostic, register_detector

    assert parse_diagnostic("checksum:every=50") == Diagnostic("checksum", 50, None)
    assert parse_diagnostic("checksum:every=50").latency_steps() == 50  # default: the period
    assert parse_diagnostic("checksum:every=50,latency=120").latency_steps() == 120

    def slow(app, state):
        return None

    slow.latency = 7
    register_detector("slow_with_latency", slow)
    assert parse_diagnostic("slow_with_latency:every=3").latency_steps() == 7


@pytest.mark.parametrize("bad, match", [
    ("checksum", "NAME:every=N"), ("checksum:every=0", "every must be >= 1"),
    ("checksum:every=x", "whole number"), ("checksum:often=3", "unknown or repeated key"),
    ("checksum:every=3,latency=-1", "latency must be >= 0"),
    ("checksum:every=3,every=4", "unknown or repeated key")])
def test_a_bad_diagnostic_is_refused_with_the_form(bad, match):
    from ulfmpy.config import Config
    from ulfmpy.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        Config(diagnose=(bad,))
