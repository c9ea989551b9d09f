"""Human durations: parsing, errors, formatting."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from ulfmpy.errors import ConfigError
from ulfmpy.units import format_duration, parse_duration


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90.0), ("4m", 240.0), ("1h", 3600.0), ("1.5h", 5400.0), ("2d", 172800.0),
    ("250ms", 0.25), ("30", 30.0), ("0.5", 0.5), ("1e3", 1000.0), (".5h", 1800.0),
    ("4 min", 240.0), (" 1H ", 3600.0), ("1h30m", 5400.0), ("1h 30m 15s", 5415.0),
    ("0s", 0.0), (5, 5.0), (2.5, 2.5),
])
def test_parse_accepted_forms(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize("text", [
    "", "  ", "abc", "4x", "-5s", "-5", "1h x", "h", "nan", "inf", "1..5h", "5 s h", "1e400",
    "s5", True, -1.0, float("inf"),
])
def test_parse_rejects_with_a_clear_message(text):
    with pytest.raises(ConfigError) as info:
        parse_duration(text, what="--mtbf")
    message = str(info.value)
    assert "--mtbf" in message
    assert repr(text) in message
    assert "90s" in message and "ms" in message  # names the accepted forms


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_duration("soon")


@pytest.mark.parametrize("seconds, text", [
    (0.25, "250 ms"), (30, "30 s"), (90, "1.5 min"), (464.758, "7.75 min"), (5400, "1.5 h"),
    (172800, "2 d"), (0, "0 s"), (3600, "1 h"),
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-3, max_value=1e8))
def test_format_parses_back_to_three_digits(seconds):
    back = parse_duration(format_duration(seconds))
    assert math.isclose(back, seconds, rel_tol=5e-3)
