"""Human durations: ``90s``, ``4m``, ``1.5h``, ``2d``, ``250ms``, ``1h30m``.

Pure: used by the CLI, the configuration and the interval tools, so every
place that takes a time accepts the same spellings and rejects bad ones with
the same message.
"""

from __future__ import annotations

import math as _math
import re as _re

from ulfmpy.errors import ConfigError as _ConfigError

__all__ = ["parse_duration", "format_duration", "UNITS"]

#: unit spelling -> seconds; ``m`` is minutes (months make no sense here).
UNITS: dict[str, float] = {
    "ms": 1e-3,
    "s": 1.0, "sec": 1.0, "secs": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
# Longest spellings first so that "ms" is not read as "m" followed by "s".
_UNIT = "|".join(sorted(UNITS, key=len, reverse=True))
_PART = _re.compile(rf"\s*({_NUMBER})\s*({_UNIT})", _re.IGNORECASE)
_PLAIN = _re.compile(rf"\s*{_NUMBER}\s*")

_ACCEPTED = ("a number of seconds or numbers with units ms, s, m/min, h, d "
             "(e.g. 90s, 4m, 1.5h, 2d, 250ms, 1h30m)")


def parse_duration(text: str | float | int, *, what: str = "duration") -> float:
    """Parse a human duration into seconds.

    Args:
        text: ``"90s"``, ``"4m"``, ``"1.5h"``, ``"2d"``, ``"250ms"``,
            ``"1h30m"`` (parts are added), a plain number of seconds
            (``"30"``), or an ``int``/``float`` already in seconds.
        what: the name of the setting, used in the error message
            (e.g. ``"--mtbf"``).

    Returns:
        The duration in seconds, finite and >= 0.

    Raises:
        ConfigError: the value is empty, negative, not finite, or not in one
            of the accepted forms; the message names the value and the forms.
    """
    if isinstance(text, bool):
        raise _ConfigError(f"invalid {what} {text!r}: expected {_ACCEPTED}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        value = _parse_text(str(text), what)
    if not _math.isfinite(value) or value < 0:
        raise _ConfigError(f"invalid {what} {text!r}: must be finite and >= 0; expected {_ACCEPTED}")
    return value


def _parse_text(text: str, what: str) -> float:
    if _PLAIN.fullmatch(text):
        return float(text)
    total, pos, parts = 0.0, 0, 0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * UNITS[match.group(2).lower()]
        pos, parts = match.end(), parts + 1
    if parts == 0 or text[pos:].strip():
        raise _ConfigError(f"invalid {what} {text!r}: expected {_ACCEPTED}")
    return total


def format_duration(seconds: float) -> str:
    """Format seconds in the largest unit that keeps the number >= 1.

    Args:
        seconds: a duration in seconds (negative values keep their sign).

    Returns:
        Three significant digits and a unit, e.g. ``"250 ms"``, ``"30 s"``,
        ``"7.74 min"``, ``"1.5 h"``, ``"2 d"``; ``parse_duration`` reads it
        back (to those three digits).
    """
    if not _math.isfinite(seconds):
        return str(seconds)
    size = abs(seconds)
    for unit, scale in (("d", 86400.0), ("h", 3600.0), ("min", 60.0), ("s", 1.0)):
        if size >= scale:
            return f"{seconds / scale:.3g} {unit}"
    if size == 0:
        return "0 s"
    return f"{seconds * 1e3:.3g} ms"
