"""Fault injection plans, registered by name. Pure apart from ``os.kill``.

Specs (``--inject``, repeatable, or ``ULFMPY_INJECT`` separated by ``;``):

* ``bitflip:rank=R,step=S[,array=NAME][,index=I][,bit=B][,persistent=1]`` —
  flip one bit of a state array on rank R after step S ran. ``index`` is the
  flat index into the rank's local block, ``bit`` counts from the least
  significant bit of the element (little endian). Unset fields are drawn
  from a generator seeded by (seed, rank, step), so a plan is reproducible.
  A transient flip strikes the first execution of the step only;
  ``repeat=N`` strikes the first N executions (re-executions included: with
  N > --max-retries local rollback gives up and a global rollback cures it),
  ``persistent=1`` every execution (a stuck fault: the run stops with a
  clear error).
* ``bitflip:rate=P[,seed=N][,bit=B][,array=NAME]`` — each rank-step flips
  with probability P.
* ``kill:rank=R,step=S[,phase=compute|agreement|rollback|checkpoint|recovery]``
  — SIGKILL logical rank R (whichever process computes as rank R when the
  fault is due: after a spare or a replacement took rank R's place, that
  one; ranks ``n .. n+spares-1`` name the spares while they wait, in start
  order) when it reaches that point:
  after step S's body (compute), at the agreement ending the segment that
  holds S (agreement), re-executing S (rollback), at the first checkpoint
  save at or after S (checkpoint), in the first recovery at or after S
  (recovery). Each kill fires once per run, relaunches included (a marker
  file under ``RUN_DIR/injected`` records it).
* ``kill:rank=R,at=DURATION`` — SIGKILL rank R (a spare too: it checks while
  it waits) once it has run that long.
* ``kill:mtbf=DURATION[,seed=N]`` — exponential failures per job: one random
  rank is killed after an exponentially distributed run time.
* ``kill:mtbf=DURATION,stream=1[,seed=N]`` — a stream of them (a Poisson
  process): kill k strikes a random rank at the sum of k + 1 exponential
  gaps of that mean after the launch's start, for as long as the run lasts
  (each launch starts its own stream).
* ``kill:...,stall=DURATION`` — instead of dying, the process stops
  responding for that long where the kill would strike (a hang: a process
  stuck in I/O or swapping), then goes on. ``phase=recovery`` stalls the
  in-job repair, which ``--repair-timeout`` ends.

The injector records each fault as an event (ground truth for tests and
experiments).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ulfmpy.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

# numpy is imported where a fault fires, not here: ``ulfmpy run`` parses every
# --inject before any rank starts, and numpy would be most of its start-up.

__all__ = ["Fault", "BitFlip", "Kill", "FaultPlan", "parse_fault", "register_injector",
           "flip_bit"]

_PARSERS: dict[str, Callable[[dict[str, str], str], "Fault"]] = {}


def register_injector(name: str) -> Callable[[Callable[[dict[str, str], str], "Fault"]], Any]:
    """Register a parser ``fn(fields, spec) -> Fault`` for specs ``name:...``."""
    def deco(fn: Callable[[dict[str, str], str], "Fault"]) -> Callable[..., "Fault"]:
        _PARSERS[name] = fn
        return fn

    return deco


class Fault:
    """Base of injected faults."""

    spec: str = ""


def _int(fields: dict[str, str], key: str, spec: str, default: int | None = None) -> int | None:
    if key not in fields:
        return default
    try:
        return int(fields[key])
    except ValueError:
        raise ConfigError(f"fault {spec!r}: {key}={fields[key]!r} is not an integer") from None


def _check_keys(fields: dict[str, str], allowed: set[str], spec: str) -> None:
    extra = set(fields) - allowed
    if extra:
        raise ConfigError(f"fault {spec!r}: unknown field(s) {', '.join(sorted(extra))}; "
                          f"allowed: {', '.join(sorted(allowed))}")


@dataclass(frozen=True)
class BitFlip(Fault):
    """A bit flip at a rank and step, or at a rate per rank-step."""

    spec: str
    rank: int | None = None
    step: int | None = None
    rate: float = 0.0
    seed: int = 0
    array: str | None = None
    index: int | None = None
    bit: int | None = None
    persistent: bool = False
    repeat: int = 1


@register_injector("bitflip")
def _parse_bitflip(fields: dict[str, str], spec: str) -> BitFlip:
    _check_keys(fields, {"rank", "step", "rate", "seed", "array", "index", "bit", "persistent",
                         "repeat"}, spec)
    rate = float(fields.get("rate", 0.0))
    rank, step = _int(fields, "rank", spec), _int(fields, "step", spec)
    if rate:
        if not 0 < rate <= 1:
            raise ConfigError(f"fault {spec!r}: rate must be in (0, 1]")
    elif rank is None or step is None:
        raise ConfigError(f"fault {spec!r}: give rank= and step=, or rate=")
    return BitFlip(spec=spec, rank=rank, step=step, rate=rate, seed=_int(fields, "seed", spec, 0) or 0,
                   array=fields.get("array"), index=_int(fields, "index", spec),
                   bit=_int(fields, "bit", spec),
                   persistent=fields.get("persistent", "0") not in ("0", "false", "no"),
                   repeat=_int(fields, "repeat", spec, 1) or 1)


KILL_PHASES = ("compute", "agreement", "rollback", "checkpoint", "recovery")


@dataclass(frozen=True)
class Kill(Fault):
    """SIGKILL of a rank at a step and phase, or at an exponential time."""

    spec: str
    rank: int | None = None
    step: int | None = None
    phase: str = "compute"
    mtbf: float = 0.0
    seed: int = 0
    node: str | None = None
    at: float = 0.0
    stall: float = 0.0
    stream: bool = False


@register_injector("kill")
def _parse_kill(fields: dict[str, str], spec: str) -> Kill:
    _check_keys(fields, {"rank", "step", "phase", "mtbf", "seed", "node", "at", "stall", "stream"},
                spec)
    phase = fields.get("phase", "compute")
    if phase not in KILL_PHASES:
        raise ConfigError(f"fault {spec!r}: phase must be one of {', '.join(KILL_PHASES)}")
    mtbf = 0.0
    if "mtbf" in fields:
        from ulfmpy.units import parse_duration

        mtbf = parse_duration(fields["mtbf"])
    at = 0.0
    if "at" in fields:
        from ulfmpy.units import parse_duration

        at = parse_duration(fields["at"])
    rank, step = _int(fields, "rank", spec), _int(fields, "step", spec)
    if at and rank is None:
        raise ConfigError(f"fault {spec!r}: at= needs rank=")
    if not mtbf and not at and (rank is None and "node" not in fields or step is None):
        raise ConfigError(f"fault {spec!r}: give rank= (or node=) and step=, rank= and at=, or mtbf=")
    stall = 0.0
    if "stall" in fields:
        from ulfmpy.units import parse_duration

        stall = parse_duration(fields["stall"])
        if stall <= 0:
            raise ConfigError(f"fault {spec!r}: stall must be a duration > 0")
    stream = bool(_int(fields, "stream", spec, 0))
    if stream and not mtbf:
        raise ConfigError(f"fault {spec!r}: stream=1 needs mtbf= (the mean time between kills)")
    return Kill(spec=spec, rank=rank, step=step, phase=phase, mtbf=mtbf,
                seed=_int(fields, "seed", spec, 0) or 0, node=fields.get("node"), at=at,
                stall=stall, stream=stream)


def parse_fault(spec: str) -> Fault:
    """Parse one fault spec; :class:`ConfigError` names what is wrong."""
    kind, _, rest = spec.strip().partition(":")
    if kind not in _PARSERS:
        raise ConfigError(f"unknown fault kind {kind!r} in {spec!r}; known: {', '.join(sorted(_PARSERS))}")
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"fault {spec!r}: expected key=value, got {part!r}")
        fields[key.strip()] = value.strip()
    return _PARSERS[kind](fields, spec)


def flip_bit(arr: np.ndarray, index: int, bit: int) -> tuple[Any, Any]:
    """Flip bit ``bit`` of element ``index`` (flat) of ``arr`` in place.

    Returns the element's value before and after.
    """
    size = arr.dtype.itemsize
    if not 0 <= bit < 8 * size:
        raise ConfigError(f"bit {bit} out of range for {arr.dtype} (0..{8 * size - 1})")
    import numpy as np

    # State arrays are often views (a block's interior), so go through one element.
    idx = np.unravel_index(index, arr.shape)
    cell = np.array(arr[idx], dtype=arr.dtype)
    before = cell.item()
    cell.reshape(1).view(np.uint8)[bit // 8] ^= np.uint8(1 << (bit % 8))
    arr[idx] = cell
    return before, cell.item()


@dataclass
class FaultPlan:
    """The faults of one run, queried by the runtime at each point. Local.

    Args:
        specs: fault specs as given on the command line.
        rank: this process's logical rank at start (the spares: ``n + j``);
            the queries take the current one.
        seed: default seed for randomized faults.
    """

    specs: tuple[str, ...]
    rank: int
    seed: int = 0
    marker_dir: str | None = None
    faults: list[Fault] = field(default_factory=list)
    _hits: dict[tuple[int, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.faults = [parse_fault(s) for s in self.specs]

    @property
    def bitflips(self) -> list[BitFlip]:
        return [f for f in self.faults if isinstance(f, BitFlip)]

    @property
    def kills(self) -> list[Kill]:
        return [f for f in self.faults if isinstance(f, Kill)]

    def flips_after_step(self, step: int, state: Mapping[str, Any], *,
                         replay: bool, rank: int | None = None) -> list[dict[str, Any]]:
        """Apply the bit flips due on this rank after ``step``; return their records.

        A transient flip strikes the first execution of its step only, a
        ``repeat=N`` one the first N, a persistent one every execution.
        """
        rank = self.rank if rank is None else rank
        out = []
        for i, f in enumerate(self.faults):
            if not isinstance(f, BitFlip):
                continue
            if not f.rate and (f.rank != rank or f.step != step):
                continue
            hits = self._hits.get((i, step), 0)
            if not f.persistent and hits >= f.repeat:
                continue
            if not f.rate and not f.persistent and hits == 0 and self._flip_fired(i):
                # Struck once in this run already, on the process that held
                # this logical rank before (a spare or replacement re-executing
                # the step after a repair must not count it twice).
                continue
            self._hits[(i, step)] = hits + 1
            seed = f.seed if f.seed else self.seed
            import numpy as np

            rng = np.random.default_rng([seed, rank, step, 0x5eed])
            if f.rate and rng.random() >= f.rate:
                continue
            rec = self._flip(f, step, state, rng)
            if not f.rate and hits == 0:
                self._mark_flip(i)
            rec["replay"] = replay
            rec["execution"] = hits + 1
            out.append(rec)
        return out

    def _flip(self, f: BitFlip, step: int, state: Mapping[str, Any],
              rng: np.random.Generator) -> dict[str, Any]:
        from ulfmpy.state import local_array

        names = [n for n in state if local_array(state[n]).size > 0]
        if f.array is not None:
            if f.array not in state:
                raise ConfigError(f"fault {f.spec!r}: no state array {f.array!r}; "
                                  f"state has {', '.join(state)}")
            name = f.array
        else:
            name = names[int(rng.integers(len(names)))]
        arr = local_array(state[name])
        index = int(rng.integers(arr.size)) if f.index is None else f.index
        if not 0 <= index < arr.size:
            raise ConfigError(f"fault {f.spec!r}: index {index} outside the local block "
                              f"of {arr.size} elements")
        bit = int(rng.integers(8 * arr.dtype.itemsize)) if f.bit is None else f.bit
        before, after = flip_bit(arr, index, bit)
        return {"kind": "bitflip", "spec": f.spec, "step": step, "array": name,
                "index": index, "bit": bit, "before": before, "after": after,
                "persistent": f.persistent}

    def _flip_fired(self, i: int) -> bool:
        return self.marker_dir is not None and os.path.exists(
            os.path.join(self.marker_dir, f"flip-{i}.json"))

    def _mark_flip(self, i: int) -> None:
        if self.marker_dir is None:
            return
        os.makedirs(self.marker_dir, exist_ok=True)
        with open(os.path.join(self.marker_dir, f"flip-{i}.json"), "w", encoding="utf-8") as fh:
            fh.write('{"uid": %d}\n' % self.rank)

    def _marker(self, f: Fault, rank: int | None = None) -> str | None:
        if self.marker_dir is None:
            return None
        i = self.faults.index(f)
        if isinstance(f, Kill) and f.node is not None:
            # A node kill strikes every logical rank on the node, once each
            # (a replacement placed on the node again is not struck again).
            return os.path.join(self.marker_dir,
                                f"fault-{i}-{self.rank if rank is None else rank}.json")
        return os.path.join(self.marker_dir, f"fault-{i}.json")

    def fired(self, f: Fault, rank: int | None = None) -> bool:
        """True when this kill already happened (in this run or before a relaunch)."""
        m = self._marker(f, rank)
        return m is not None and os.path.exists(m)

    def mark_fired(self, f: Fault, rank: int | None = None, **record: Any) -> None:
        """Record the ground truth of a kill before it happens."""
        m = self._marker(f, rank)
        if m is None:
            return
        os.makedirs(os.path.dirname(m), exist_ok=True)
        import json

        with open(m, "w", encoding="utf-8") as fh:
            json.dump({"spec": f.spec, "rank": self.rank, **record}, fh)
            fh.flush()
            os.fsync(fh.fileno())

    def kill_due(self, step: int, phase: str, *, host: str | None = None,
                 rank: int | None = None) -> Kill | None:
        """The kill fault due on this rank at (step, phase), if any.

        ``checkpoint`` and ``recovery`` kills fire at the first such phase at
        or after their step; the others at their step exactly.
        """
        rank = self.rank if rank is None else rank
        for f in self.kills:
            if f.mtbf or f.at or f.phase != phase:
                continue
            target = (f.node is not None and f.node == host) or (f.node is None and f.rank == rank)
            if not target:
                continue
            hit = f.step <= step if phase in ("checkpoint", "recovery") else f.step == step
            if hit and not self.fired(f, rank):
                return f
        return None

    def timed_kill_due(self, elapsed: float, rank: int | None = None) -> Kill | None:
        """The ``at=`` kill due on this rank after ``elapsed`` seconds, if any."""
        rank = self.rank if rank is None else rank
        for f in self.kills:
            if f.at and f.rank == rank and elapsed >= f.at and not self.fired(f):
                return f
        return None

    def node_down(self, host: str | None, rank: int) -> Kill | None:
        """A node kill that struck ``host`` and not yet this process (a waiting
        spare: it runs no steps, but it dies with its node). Local; reads markers."""
        if self.marker_dir is None or host is None:
            return None
        for f in self.kills:
            if f.node != host or self.fired(f, rank):
                continue
            prefix = f"fault-{self.faults.index(f)}-"
            try:
                if any(n.startswith(prefix) for n in os.listdir(self.marker_dir)):
                    return f
            except FileNotFoundError:
                return None
        return None

    def mtbf_kill(self, size: int) -> tuple[Kill, int, float] | None:
        """(fault, victim rank, seconds after start) of the job's exponential failure."""
        for f in self.kills:
            if f.mtbf and not f.stream and not self.fired(f):
                import numpy as np

                rng = np.random.default_rng([f.seed or self.seed, 0xdead])
                return f, int(rng.integers(size)), float(rng.exponential(f.mtbf))
        return None


    def streams(self) -> list[Kill]:
        """The ``kill:mtbf=M,stream=1`` faults of the plan."""
        return [f for f in self.kills if f.mtbf and f.stream]

    @staticmethod
    def stream_kill(f: Kill, size: int, k: int) -> tuple[int, float]:
        """The ``k``-th kill (from 0) of a stream: (victim rank, seconds after the
        launch's start). Pure: a function of the seed; the gaps are exponential
        with mean ``f.mtbf`` (a Poisson process)."""
        import numpy as np

        rng = np.random.default_rng([f.seed, 0x5eed])
        gaps = rng.exponential(f.mtbf, k + 1)
        victims = rng.integers(size, size=k + 1)
        return int(victims[k]), float(gaps.sum())

    def stream_origin(self, f: Kill, launch: str) -> float | None:
        """This launch's start for the stream ``f`` (``time.time()``), shared by
        every process of the launch through a marker (the first writes it)."""
        if self.marker_dir is None:
            return None
        from ulfmpy.jobctl import shared_time

        os.makedirs(self.marker_dir, exist_ok=True)
        return shared_time(os.path.join(self.marker_dir,
                                        f"stream-{self.faults.index(f)}-{launch}-origin"))

    def stream_marker(self, f: Kill, launch: str, k: int) -> str | None:
        if self.marker_dir is None:
            return None
        return os.path.join(self.marker_dir, f"stream-{self.faults.index(f)}-{launch}-{k}.json")


def cannot_fire(specs: tuple[str, ...], steps: int) -> str | None:
    """Why a fault of ``specs`` can never fire in a loop of ``steps`` steps, or None. Pure."""
    for spec in specs:
        f = parse_fault(spec)
        step = getattr(f, "step", None)
        if step is not None and step >= steps:
            return (f"fault {spec!r} cannot fire: step {step} is past the end of the loop "
                    f"(steps 0..{steps - 1})")
    return None


def kill_self() -> None:
    """SIGKILL this process (a rank that exits without finalizing can hang ULFM)."""
    os.kill(os.getpid(), signal.SIGKILL)
