"""Silent-data-corruption detectors, registered by name. Pure (no MPI).

A detector is ``fn(app, state) -> str | None``: a short description of what
it found, or None when the state looks right. ``--detect finite,bounds``
selects them by name. Built in:

* ``finite`` — no NaN or Inf in any floating state array;
* ``bounds`` — values within ``app.bounds[name] = (lo, hi)`` (for the heat
  equation the maximum principle gives them);
* ``invariant`` — ``app.invariant()`` (or ``Runtime(invariant=fn)``) returns
  True;
* ``checksum`` — ``app.checksum_ok()`` returns True, for apps that keep one.

Apps add their own with :func:`register_detector`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ulfmpy.errors import ConfigError
from ulfmpy.state import local_array

__all__ = ["register_detector", "get_detector", "detectors", "run_detectors"]

Detector = Callable[[Any, Mapping[str, Any]], "str | None"]
_REGISTRY: dict[str, Detector] = {}


def register_detector(name: str, fn: Detector | None = None) -> Any:
    """Register ``fn`` under ``name`` (usable as a decorator)."""
    def deco(f: Detector) -> Detector:
        _REGISTRY[name] = f
        return f

    return deco(fn) if fn is not None else deco


def get_detector(name: str) -> Detector:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown detector {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def detectors() -> list[str]:
    """Names of the registered detectors."""
    return sorted(_REGISTRY)


@register_detector("finite")
def _finite(app: Any, state: Mapping[str, Any]) -> str | None:
    for name, value in state.items():
        arr = local_array(value)
        if arr.dtype.kind not in "fc" or arr.size == 0:
            continue
        # One reduction instead of a boolean temporary: NaN and Inf survive a
        # sum; only an overflowing sum of finite values needs the full check.
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.add.reduce(arr, axis=None)
        if np.isfinite(total):
            continue
        bad = ~np.isfinite(arr)
        if bad.any():
            idx = np.unravel_index(int(np.argmax(bad)), arr.shape)
            return f"{name}: non-finite value {arr[idx]} at local index {tuple(int(i) for i in idx)}"
    return None


@register_detector("bounds")
def _bounds(app: Any, state: Mapping[str, Any]) -> str | None:
    bounds = getattr(app, "bounds", None)
    if not bounds:
        raise ConfigError("detector 'bounds' needs app.bounds = {name: (lo, hi)} "
                          "or --bounds NAME=LO:HI")
    for name, (lo, hi) in bounds.items():
        if name not in state:
            raise ConfigError(f"bounds name {name!r} is not in app.state ({sorted(state)})")
        arr = local_array(state[name])
        if arr.size == 0:
            continue
        amin, amax = arr.min(), arr.max()
        # NaN compares false both ways; report it here too.
        if not (amin >= lo and amax <= hi):
            return f"{name}: values in [{amin}, {amax}] outside bounds [{lo}, {hi}]"
    return None


@register_detector("invariant")
def _invariant(app: Any, state: Mapping[str, Any]) -> str | None:
    fn = getattr(app, "invariant", None)
    if fn is None:
        raise ConfigError("detector 'invariant' needs app.invariant() or Runtime(invariant=fn)")
    ok = fn()
    return None if ok else "invariant violated"


@register_detector("checksum")
def _checksum(app: Any, state: Mapping[str, Any]) -> str | None:
    fn = getattr(app, "checksum_ok", None)
    if fn is None:
        raise ConfigError("detector 'checksum' needs app.checksum_ok()")
    return None if fn() else "checksum mismatch"


def run_detectors(names: tuple[str, ...] | list[str], app: Any,
                  state: Mapping[str, Any]) -> tuple[str, str] | None:
    """Run the named detectors in order; return (detector, finding) for the first hit."""
    for name in names:
        found = get_detector(name)(app, state)
        if found:
            return name, found
    return None
