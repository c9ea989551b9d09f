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

A **diagnostic** (``--diagnose NAME:every=N[,latency=L]``) is a detector too
expensive to run at every segment end, run at every N-th step instead. It
may find an error up to L steps after it struck (default: N, or the
detector's own ``latency`` attribute): the runtime then goes back to a
checkpoint older than that (docs/architecture.md, "Detection latency").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ulfmpy.errors import ConfigError
from ulfmpy.state import local_array

__all__ = ["register_detector", "get_detector", "detectors", "run_detectors", "Diagnostic",
           "parse_diagnostic"]

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


@dataclass(frozen=True)
class Diagnostic:
    """A periodic detector: run at every ``every``-th step; what it finds may be
    up to ``latency`` steps old (None: the detector's ``latency`` attribute,
    else ``every``)."""

    name: str
    every: int
    latency: int | None = None

    def latency_steps(self) -> int:
        """The latency in steps. Local (reads the registered detector)."""
        if self.latency is not None:
            return self.latency
        declared = getattr(_REGISTRY.get(self.name), "latency", None)
        return int(declared) if declared is not None else self.every


def parse_diagnostic(text: str) -> Diagnostic:
    """``NAME:every=N[,latency=L]`` as a :class:`Diagnostic`. Pure.

    Raises:
        ConfigError: naming the problem and the form to use.
    """
    form = "give NAME:every=N[,latency=L] (steps), e.g. --diagnose checksum:every=50"
    name, _, rest = str(text).partition(":")
    name = name.strip()
    if not name or not rest:
        raise ConfigError(f"diagnostic {text!r}: {form}")
    keys: dict[str, int] = {}
    for item in rest.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in ("every", "latency") or key in keys:
            raise ConfigError(f"diagnostic {text!r}: unknown or repeated key {key!r}; {form}")
        try:
            keys[key] = int(value)
        except ValueError:
            raise ConfigError(f"diagnostic {text!r}: {key} must be a whole number of steps; "
                              f"{form}") from None
    if keys.get("every", 0) < 1:
        raise ConfigError(f"diagnostic {text!r}: every must be >= 1; {form}")
    if keys.get("latency", 0) < 0:
        raise ConfigError(f"diagnostic {text!r}: latency must be >= 0; {form}")
    return Diagnostic(name, keys["every"], keys.get("latency"))
