"""Application state: the arrays a timestep loop carries, and their fingerprint.

An app's ``state`` is a mapping from names to either

* a :class:`Block` — this rank's block of a distributed global array (the
  block's local array, the global shape and the block's start index), which
  checkpoints can restore onto any rank count (N→M); or
* a :class:`Rows` — this rank's rows of a collection spread over the ranks
  in no fixed order (particles, agents, items): its first ``count`` rows,
  which checkpoints deal out again on another rank count (N→M); or
* a plain ``numpy.ndarray`` — per-rank state (scalars as 0-d arrays), which
  restores only onto the same rank count.

The runtime restores state *in place*, so the arrays handed out here must be
the very arrays (or views) the app computes on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ulfmpy.errors import ConfigError

__all__ = ["Block", "Rows", "normalize_state", "fingerprint", "state_nbytes"]


@dataclass(frozen=True)
class Block:
    """This rank's block of a distributed global array.

    Args:
        local: the block's data; a view into the app's arrays is fine (the
            runtime writes into it in place), e.g. the interior of a padded
            array with halo cells.
        global_shape: the shape of the whole array.
        start: the global index of ``local[0, 0, ...]``.
        dims: optional names of the dimensions, e.g. ``("y", "x")``: a
            checkpoint labels the global array with them (HDF5 dimension
            scales), so xarray and netCDF tools open it with named dimensions.
            Arrays that share a name share the dimension (same length).
        coords: optional coordinate values per dimension name, each a 1-D
            array of the dimension's global length (default ``0 .. n-1``).
    """

    local: np.ndarray
    global_shape: tuple[int, ...]
    start: tuple[int, ...]
    dims: tuple[str, ...] | None = None
    coords: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.local, np.ndarray):
            raise ConfigError("Block.local must be a numpy array")
        gs = tuple(int(n) for n in self.global_shape)
        st = tuple(int(n) for n in self.start)
        object.__setattr__(self, "global_shape", gs)
        object.__setattr__(self, "start", st)
        if len(gs) != self.local.ndim or len(st) != self.local.ndim:
            raise ConfigError(
                f"Block: local array has {self.local.ndim} dimensions but global_shape "
                f"{gs} and start {st} do not match it")
        for s, n, g in zip(st, self.local.shape, gs):
            if s < 0 or s + n > g:
                raise ConfigError(
                    f"Block: local block {self.local.shape} at {st} lies outside "
                    f"global shape {gs}")
        self._check_labels(gs)

    def _check_labels(self, gs: tuple[int, ...]) -> None:
        if self.dims is None:
            if self.coords:
                raise ConfigError("Block: coords need dims (the names they belong to)")
            return
        dims = tuple(self.dims)
        object.__setattr__(self, "dims", dims)
        if len(dims) != len(gs) or len(set(dims)) != len(dims) or not all(
                isinstance(d, str) and d.isidentifier() and not d.startswith("_") for d in dims):
            raise ConfigError(f"Block: dims {dims!r} must be {len(gs)} distinct names (letters, "
                              "digits, _; not starting with _), one per dimension")
        coords = {}
        for name, values in (self.coords or {}).items():
            if name not in dims:
                raise ConfigError(f"Block: coords for {name!r}, which is not one of dims {dims}")
            arr = np.asarray(values)
            n = gs[dims.index(name)]
            if arr.ndim != 1 or arr.shape[0] != n or arr.dtype.kind not in "iuf":
                raise ConfigError(f"Block: coords[{name!r}] must be a 1-D numeric array of the "
                                  f"dimension's global length {n}, got shape {arr.shape}")
            coords[name] = arr
        object.__setattr__(self, "coords", coords or None)

    @property
    def slices(self) -> tuple[slice, ...]:
        """The block's place in the global array."""
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.local.shape))


@dataclass(frozen=True, eq=False)
class Rows:
    """This rank's rows of a collection whose rows may sit on any rank.

    The first ``count`` rows of ``local`` hold this rank's items; the rest
    is room to grow. ``count`` is a 0-d integer array the app updates in
    place, and the state holds it too, under a name of its own (the
    runtime restores it with the rows). Several arrays of one collection
    (positions, velocities, ids) share one ``count``.

    On the same rank count everything restores in place. On another (a
    shrink, a resume with ``-n M``) the rows of all old ranks, in rank order,
    are dealt out in even contiguous shares and ``count`` is set to the
    share: rows arrive on ranks that may not own them, so the app must move
    items to their owners in its step (a particle code's migration does).

    Args:
        local: the rows, ``(capacity, ...)``, a view into the app's arrays.
        count: how many of them are in use, a 0-d integer array.
    """

    local: np.ndarray
    count: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.local, np.ndarray) or self.local.ndim < 1:
            raise ConfigError("Rows.local must be a numpy array with rows (at least 1-D)")
        c = self.count
        if not (isinstance(c, np.ndarray) and c.ndim == 0 and c.dtype.kind in "iu"):
            raise ConfigError("Rows.count must be a 0-d integer numpy array (np.array(n)), "
                              "updated in place, so the runtime can restore it")
        if not 0 <= int(c) <= self.local.shape[0]:
            raise ConfigError(f"Rows: count {int(c)} is outside 0..{self.local.shape[0]}, the "
                              "rows the array has room for")


StateValue = Block | Rows | np.ndarray


def count_name(state: Mapping[str, StateValue], rows: Rows) -> str:
    """The name under which ``state`` holds a :class:`Rows`' count. Local."""
    for name, value in state.items():
        if value is rows.count:
            return name
    raise ConfigError("a ulfmpy.Rows' count must be in the state too, under its own name "
                      "(e.g. state['n'] = the same 0-d array), so that it is restored with "
                      "the rows")


def normalize_state(state: Any) -> dict[str, StateValue]:
    """Check an app's ``state`` and return it as an ordered dict by name.

    Local. Raises :class:`ConfigError` naming the offending entry.
    """
    if not isinstance(state, Mapping):
        raise ConfigError(
            f"app.state must be a dict of numpy arrays or ulfmpy.Block, got {type(state).__name__}")
    out: dict[str, StateValue] = {}
    for name in sorted(state):
        value = state[name]
        if not isinstance(name, str):
            raise ConfigError(f"app.state keys must be strings, got {name!r}")
        if isinstance(value, (Block, Rows)):
            out[name] = value
        elif isinstance(value, np.ndarray):
            out[name] = value
        else:
            raise ConfigError(
                f"app.state[{name!r}] is a {type(value).__name__}; use a numpy array "
                "(0-d for scalars), ulfmpy.Block or ulfmpy.Rows")
    for value in out.values():
        if isinstance(value, Rows):
            count_name(out, value)
    return out


def local_array(value: StateValue) -> np.ndarray:
    """The array holding this rank's data for a state entry."""
    return value.local if isinstance(value, (Block, Rows)) else value


def state_nbytes(state: Mapping[str, StateValue]) -> int:
    """Bytes of this rank's state. Local."""
    return sum(local_array(v).nbytes for v in state.values())


def _hash_header(h: "hashlib._Hash", name: str, kind: str, dtype: np.dtype,
                 shape: tuple[int, ...]) -> None:
    h.update(f"{name}|{kind}|{dtype.str}|{shape}\n".encode())


def fingerprint(comm: Any, state: Mapping[str, StateValue]) -> str:
    """Hash of the global state in canonical order; the same on every rank.

    Collective over ``comm``; every rank must pass state with the same names
    and kinds. Distributed arrays are assembled in global index order, so the
    fingerprint does not depend on the rank count or decomposition; per-rank
    arrays are hashed in rank order; a :class:`Rows` collection as its rows
    sorted, whatever rank holds them.

    Returns:
        a hex string (blake2b, 128 bits).
    """
    state = normalize_state(state)
    rank = comm.Get_rank()
    counts = {count_name(state, v) for v in state.values() if isinstance(v, Rows)}
    h = hashlib.blake2b(digest_size=16)
    for name, value in state.items():
        if isinstance(value, Block):
            # Gathering whole blocks to rank 0 keeps this simple; it runs once
            # per run, not per step.
            parts = comm.gather((value.start, np.ascontiguousarray(value.local)), root=0)
            if rank == 0:
                full = np.empty(value.global_shape, dtype=value.local.dtype)
                filled = np.zeros(value.global_shape, dtype=bool)
                for start, arr in parts:
                    sl = tuple(slice(s, s + n) for s, n in zip(start, arr.shape))
                    full[sl] = arr
                    filled[sl] = True
                if not filled.all():
                    raise ConfigError(
                        f"state[{name!r}]: the ranks' blocks do not cover the global array")
                _hash_header(h, name, "block", full.dtype, full.shape)
                h.update(np.ascontiguousarray(full).tobytes())
        elif isinstance(value, Rows) or name in counts:
            # A collection's rows in any order on any ranks: hashed as the
            # sorted rows of all ranks (a count as the total), so the
            # fingerprint does not depend on where they sit.
            mine = (np.ascontiguousarray(value.local[:int(value.count)])
                    if isinstance(value, Rows) else int(value))
            parts = comm.gather(mine, root=0)
            if rank == 0:
                if isinstance(value, Rows):
                    rows = np.concatenate(parts).reshape(sum(len(p) for p in parts), -1)
                    rows = rows[np.lexsort(rows.T[::-1])] if rows.size else rows
                    _hash_header(h, name, "rows", value.local.dtype, value.local.shape[1:])
                    h.update(np.ascontiguousarray(rows).tobytes())
                else:
                    _hash_header(h, name, "count", value.dtype, ())
                    h.update(str(sum(parts)).encode())
        else:
            parts = comm.gather(np.ascontiguousarray(value), root=0)
            if rank == 0:
                _hash_header(h, name, "ranks", value.dtype, (len(parts),))
                for arr in parts:
                    h.update(f"{arr.shape}".encode())
                    h.update(arr.tobytes())
    digest = h.hexdigest() if rank == 0 else None
    return comm.bcast(digest, root=0)
