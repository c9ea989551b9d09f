"""The resilient communicator: mpi4py calls, shimmed for logging and replay.

:class:`ResilientComm` wraps a communicator (a duplicate the runtime owns,
with ``ERRORS_RETURN``) and offers the calls a timestep loop uses. It has
three jobs:

1. **Failure translation.** MPI errors of the process-failure and revoked
   classes become :class:`~ulfmpy.errors.ProcessFailure` /
   :class:`~ulfmpy.errors.CommRevoked`; the detecting rank revokes the
   communicator so every rank learns. Inside ``Runtime.loop`` the failure
   instead *voids* the rest of the iteration (every further call returns at
   once) because an exception cannot unwind a ``for`` body back into the
   generator that drives it; the loop handles the failure at the next step.
2. **Logging** (``live`` segment mode): every payload received is copied,
   keyed by (peer, tag, sequence number); sends cost nothing (their bytes
   already sit in the receiver's log); collectives record this rank's
   contribution digest and the result.
3. **Replay** (``replay`` segment mode, for the ranks S re-executing a
   segment): messages between members of S go live on a private duplicate
   communicator (so they never match normal traffic); messages from ranks
   outside S are served from the log; sends to ranks outside S are not sent
   but compared with the original, and a mismatch marks that rank
   contaminated. The originals of sends come from the receivers' logs
   (:meth:`ResilientComm.fetch_originals`, collective, before a replay
   round); a rank re-executing alone mid-segment keeps its re-sent payloads
   and checks them at the segment's end (:meth:`ResilientComm.verify_resent`).

Calls that cannot be logged raise :class:`~ulfmpy.errors.UnsupportedCall`
inside a segment, naming the call; outside segments they pass through.

The parts live in their own modules, re-exported here: the message log and
payload helpers in :mod:`ulfmpy.msglog`, :class:`Request` in
``_comm_request``, and the point-to-point and collective calls in the mixins
``_comm_p2p._PointToPoint`` and ``_comm_coll._Collectives``, which
:class:`ResilientComm` inherits. This module keeps the communicator's state,
plumbing (failure translation) and segment modes, and :class:`ReplayOutcome`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from mpi4py import MPI

from ulfmpy._comm_coll import _Collectives
from ulfmpy._comm_handle import free_quietly, install_guards, set_handle
from ulfmpy._comm_p2p import _ANY_SOURCE, _ANY_TAG, _PROC_NULL, _PointToPoint  # noqa: F401
from ulfmpy._comm_request import Request
from ulfmpy.errors import (CommRevoked, ProcessFailure, RecoveryFailed, UnsupportedCall,
                           UlfmpyError, translate_mpi_error)
from ulfmpy.msglog import (_Channel, _Counters, _array, _digest, _pickle, _put,  # noqa: F401
                           _same, MessageLog)

__all__ = ["ResilientComm", "PlainComm", "Request", "MessageLog", "ReplayDivergence"]


class PlainComm(MPI.Intracomm):
    """``rt.comm`` under ``--no-resilience``: mpi4py's communicator itself (the
    same handle), plus the ``Waitall`` the resilient one offers, so an app
    runs unchanged in both modes."""

    @staticmethod
    def Waitall(requests: Any, statuses: Any = None) -> bool:  # noqa: N802
        return MPI.Request.Waitall(requests, statuses)

    @staticmethod
    def waitall(requests: Any, statuses: Any = None) -> Any:
        return MPI.Request.waitall(requests, statuses)

# Local queries that never communicate: always safe to pass through.
_LOCAL = frozenset({
    "Get_rank", "Get_size", "rank", "size", "Get_group", "group", "Get_name", "name",
    "Is_inter", "is_inter", "Is_intra", "is_intra", "Get_topology", "topology",
    "Get_errhandler", "Get_info", "info", "Get_attr", "py2f", "handle", "Is_revoked",
})


# Calls that make a communicator ulfmpy would not protect (a subset of the
# ranks, or a topology it does not map): refused even outside segments,
# since an app using one would run unprotected without a word.
_MAKES_COMM = frozenset({
    "Split_type", "Create", "Create_group", "Create_graph", "Create_dist_graph",
    "Create_intercomm", "Idup", "Dup_with_info", "Idup_with_info",
    "Create_from_group", "Spawn", "Spawn_multiple", "Accept", "Connect",
})


class ReplayDivergence(UlfmpyError):
    """Re-execution made a call the original run did not (not replay-deterministic)."""


@dataclass
class ReplayOutcome:
    """What one rank learned while re-executing. Local."""

    contaminated: set[int] = field(default_factory=set)
    collective_mismatch: bool = False
    diverged: str | None = None


class ResilientComm(_PointToPoint, _Collectives, MPI.Intracomm):
    """The communicator apps receive from the runtime (``rt.comm``).

    Args:
        comm: the communicator to use; the caller owns it and should have
            set ``MPI.ERRORS_RETURN`` on it so failures surface as errors.
        ft: the job runs with ULFM (failures are survivable); ERR_OTHER is then
            read as a failure too (Open MPI 5 was seen to raise it on the
            first rank to notice a dead peer).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "ResilientComm":
        return MPI.Intracomm.__new__(cls)  # COMM_NULL until set_handle

    def __init__(self, comm: MPI.Comm, *, ft: bool = True) -> None:
        set_handle(self, comm)
        self._root = self  # the family's shared state lives on the root (derived comms read it)
        self._comm = comm
        self._replay_comm: MPI.Comm | None = None
        self.ft = ft
        self.void_on_failure = False
        self.failure: ProcessFailure | None = None
        self.mode = "off"  # off | live | replay
        self.log = MessageLog()
        self._ctr = _Counters()
        self._S: frozenset[int] = frozenset()
        self._all_in_S = False
        self.outcome = ReplayOutcome()
        self._rank = comm.Get_rank()
        self._size = comm.Get_size()
        # Originals of array sends, fetched from their receivers for a replay
        # round; without them (a lone catch-up) re-sent payloads wait in
        # _resent for verify_resent at the segment's end.
        self._have_originals = False
        self._resent: dict[tuple[int, int, int], np.ndarray] = {}
        # Receive requests not yet logged: a request completed by mpi4py's
        # own MPI.Request calls is logged at the next call or boundary.
        self._pending: list[Request] = []
        # Derived communicators (Create_cart, Dup): each has a context of its
        # own, a slot in the pools opened at every start and repair, so a
        # replacement building its app gets the survivors' slots in order.
        self._children: list[Any] = []
        self._pools: tuple[list[MPI.Comm], list[MPI.Comm]] = ([], [])
        # Split slots: (every rank's (colour, key), live part, replay part).
        self._splits: dict[int, tuple[list[tuple[int, int]], MPI.Comm, MPI.Comm | None]] = {}
        # The inline loop's set-up code (ulfmpy/setup_log.py): logged on the
        # first run, answered from that log on a replacement.
        self._recording = False
        self.setup_unlogged: list[str] = []
        self._ff_logs: list[MessageLog] | None = None
        self._ff_self: MPI.Comm | None = None

    _dropped = False  # a derived communicator whose app was rebuilt (never the root)
    _status_pool: list[MPI.Status] = []

    def _statuses(self, n: int) -> list[MPI.Status]:
        """``n`` or more statuses to complete requests with, reused (each is
        read as soon as its request is logged). Local."""
        pool = self._status_pool
        if len(pool) < n:
            pool = self._status_pool = pool + [MPI.Status() for _ in range(n - len(pool))]
        return pool

    def _root_flag(self, name: str) -> Any:
        return getattr(self._root, name)

    def _settle(self) -> None:
        """Log the receives of requests mpi4py completed behind our back. Local.

        Called before every call on the family while receives are pending,
        so it is written for speed: a request still active stays, one that
        is finished goes, one whose handle mpi4py nulled is logged now."""
        keep = []
        for r in self._pending:
            if r._on_complete is None:
                continue
            if r._lower or r:  # a live handle (lowercase ones finish only through us)
                keep.append(r)
            else:
                self._root._late += 1
                r._finish()
        self._pending = keep

    _late = 0  # receives of this segment logged after mpi4py's own class completed them

    def late_receives(self) -> int:
        """How many receives of this segment were completed by mpi4py's own
        ``Request`` class and logged only afterwards (the buffer may have
        changed between the two, so this rank's log is not trusted for a
        replay: docs/internals.md, "Requests"). Logs what is pending first.
        Local."""
        if self._pending:
            self._settle()
        return self._root._late

    # -- plumbing ---------------------------------------------------------
    @property
    def mpi_comm(self) -> MPI.Comm:
        """The underlying communicator (for the runtime; apps should not use it)."""
        return self._comm

    def Get_rank(self) -> int:  # noqa: N802
        return self._rank

    def Get_size(self) -> int:  # noqa: N802
        return self._size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    def Free(self) -> None:  # noqa: N802
        """Nothing: the runtime owns this communicator and frees it at the end."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)  # private names never pass through
        return self._passthrough(name)

    def _passthrough(self, name: str) -> Any:
        """The mpi4py call ``name`` as rt.comm offers it: through, guarded,
        outside segments; refused inside one. Local."""
        if name in _MAKES_COMM:
            raise UnsupportedCall(
                f"Comm.{name} would give a communicator ulfmpy does not protect (the app would "
                "run unprotected without a word); rt.comm.Create_cart(dims, periods), "
                "rt.comm.Dup(), rt.comm.Split(color, key) and cart.Sub(remain) give "
                "protected ones")
        attr = getattr(self._comm, name)
        if name in _LOCAL or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.mode != "off" and not self._root_flag("_recording"):
                raise UnsupportedCall(
                    f"Comm.{name} cannot be logged for local rollback and is not allowed "
                    "inside a segment; the README's rules list the calls that are (point "
                    "to point, the collectives, their lowercase forms), or call it outside "
                    "rt.loop")
            if self.mode != "off":  # the set-up code: not logged, so no fast-forward
                self._root_flag("setup_unlogged").append(name)
            return self._guard(name, attr, *args, **kwargs)

        return call

    def _voided(self) -> bool:
        return self.failure is not None and self.void_on_failure

    def _guard(self, call: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MPI.Exception as exc:
            self._fail(call, exc)
            return None

    def _fail(self, call: str, exc: MPI.Exception) -> None:
        """Translate an MPI error; return only when a failure voids the call."""
        err = translate_mpi_error(exc, call, failure_suspected=self.ft)
        if isinstance(err, ProcessFailure):
            self._on_failure(err)
            if self.void_on_failure:
                return
        raise err from exc

    def _on_failure(self, err: ProcessFailure) -> None:
        if self.failure is None:
            self.failure = err
        # The detecting rank revokes so ranks blocked elsewhere learn too.
        if not isinstance(err, CommRevoked):
            for c in self._family():
                for mc in (c._comm, c._replay_comm):
                    if mc is not None:
                        try:
                            mc.Revoke()
                        except MPI.Exception:
                            pass

    def clear_failure(self) -> None:
        """Forget a handled failure. Local."""
        self.failure = None

    def reset(self, comm: MPI.Comm) -> None:
        """Continue on a repaired communicator (after a failure). Local."""
        self._recording, self._ff_logs = False, None
        set_handle(self, comm)
        self._comm = comm
        self._rank = comm.Get_rank()
        self._size = comm.Get_size()
        self.failure = None
        self.mode = "off"
        for c in self._family():
            c._replay_comm = None
            c.log.release()
            c._ctr = _Counters()
            c._pending = []
            c._forget_originals()
        if self._ff_self is not None:
            free_quietly([self._ff_self])
            self._ff_self = None

    def check_failure(self) -> None:
        """Raise the failure a voided call recorded, if any. Local."""
        if self.failure is not None:
            raise self.failure

    # -- derived communicators (ulfmpy/_comm_derived.py) -------------------
    POOL = 6  # derived communicators an app may make (a grid, its rows and columns, ...)

    def open_contexts(self, replay: MPI.Comm | None) -> None:
        """Where derived communicators get their contexts: duplicates of the
        current communicator and of ``replay``. Collective over the compute
        ranks (at the start and after every repair, before any app code).

        The pools are made when the first one is derived (a collective point
        of the app's own set-up), so an app that derives none pays nothing.
        After a repair every process (survivors and replacements alike)
        agrees whether the app had them, and if so they are made again now
        and every derived communicator gets its new pair."""
        old = self._pools
        self._replay_base = replay
        self._pools = ([], [])
        had = bool(self._comm.allreduce(bool(old[0]), op=MPI.LOR)) if self._size > 1 \
            else bool(old[0])
        old_splits = self._split_parts()
        self._splits = {}
        if had:
            self._make_pools()
            # A replacement whose factory has not run yet has no split
            # tables: it takes the survivors' (all alike; a shrink's are
            # for another size and rebuilt by the factory).
            tables = {c._index: c._table for c in self._children
                      if hasattr(c, "_table") and len(c._table) == self._size}
            if self._size > 1:
                tables = max(self._comm.allgather(tables), key=len)
            for slot in sorted(tables):
                self._make_split(slot, tables[slot])
            for child in self._children:
                child._attach()
        free_quietly(old[0] + old[1] + old_splits)

    def _split_parts(self) -> list[MPI.Comm]:
        return [c for _, *parts in self._splits.values() for c in parts if c is not None]

    def _make_split(self, slot: int, table: list[tuple[int, int]]) -> None:
        """The contexts of the split in ``slot``. Collective over the compute ranks."""
        color, key = table[self._rank]
        parts = [self._pools[0][slot].Split(color, key)]
        parts.append(self._pools[1][slot].Split(color, key) if self._pools[1] else None)
        for c in parts:
            if c is not None and c != MPI.COMM_NULL:
                c.Set_errhandler(MPI.ERRORS_RETURN)
        self._splits[slot] = (table, parts[0], parts[1])

    def _make_pools(self) -> None:
        """Collective over the compute ranks."""
        live = [self._comm.Dup() for _ in range(self.POOL)]
        base = getattr(self, "_replay_base", None)
        rep = [base.Dup() for _ in range(self.POOL)] if base is not None else []
        for c in live + rep:
            c.Set_errhandler(MPI.ERRORS_RETURN)
        self._pools = (live, rep)

    def _slot(self, call: str) -> int:
        """The next free context, for a derived communicator. Local, except
        the first time: then collective (the app's set-up, on every rank)."""
        if self.mode != "off" and not (self._recording or self._ff_logs is not None):
            raise UnsupportedCall(f"Comm.{call} inside a segment: make derived communicators "
                                  "in the factory, before the loop")
        j = len(self._children)
        if j >= self.POOL:
            raise UnsupportedCall(f"Comm.{call}: at most {self.POOL} derived communicators are "
                                  "protected; reuse the ones the factory made")
        if self._ff_logs is not None:
            return j  # a replacement's set-up: the repair's open_contexts attaches it
        if not self._pools[0]:
            if not hasattr(self, "_replay_base"):
                raise UnsupportedCall(f"Comm.{call}: derived communicators need the runtime's "
                                      "contexts (make them inside the with block)")
            self._make_pools()
        return j

    def close(self) -> None:
        """Free the contexts of derived communicators (before MPI_Finalize). Local."""
        free_quietly(self._pools[0] + self._pools[1] + self._split_parts())
        self._pools = ([], [])
        self._splits = {}

    def drop_children(self) -> None:
        """Forget the derived communicators (the factory runs again); a dropped
        one refuses every further call instead of running unprotected. Local."""
        for child in self._children:
            child._dropped = True
        self._children = []

    def _family(self) -> list[Any]:
        return [self, *self._children]

    def Create_cart(self, dims: Any, periods: Any = None, reorder: bool = False) -> Any:  # noqa: N802
        """A Cartesian communicator over the same ranks, protected: logged,
        replayed and rebuilt after a repair like this one. ``reorder`` is
        ignored (ranks keep their order: MPI allows it). Local (the contexts
        were opened collectively by the runtime)."""
        from ulfmpy._comm_derived import CartComm

        return CartComm(self, self._slot("Create_cart"), dims, periods)

    def Create_dist_graph_adjacent(self, sources: Any, destinations: Any,  # noqa: N802
                                   sourceweights: Any = None, destweights: Any = None,
                                   info: Any = None, reorder: bool = False) -> Any:
        """A distributed-graph communicator over the same ranks, protected; its
        neighbour collectives are logged point-to-point messages. Local."""
        from ulfmpy._comm_derived import DistGraphComm

        return DistGraphComm(self, self._slot("Create_dist_graph_adjacent"), sources,
                             destinations, sourceweights, destweights)

    def Split(self, color: int = 0, key: int = 0) -> Any:  # noqa: N802
        """A communicator over the ranks that give the same ``color``, ranked
        by ``key`` then by rank, protected like this one (``MPI.COMM_NULL``
        for ``MPI.UNDEFINED``). Collective, as MPI's Split is."""
        from ulfmpy._comm_derived import _split

        return _split(self, color, key)

    def Dup(self) -> Any:  # noqa: N802
        """A duplicate over the same ranks, protected. Local (see Create_cart)."""
        from ulfmpy._comm_derived import DerivedComm

        return DerivedComm(self, self._slot("Dup"))

    Clone = Dup

    # -- the set-up log (ulfmpy/setup_log.py) ------------------------------
    def begin_setup(self) -> None:
        """Log the calls of the code between the runtime's start and the loop
        like a segment's, and let the ones that cannot be logged through
        (noted in ``setup_unlogged``). Local."""
        self.begin_segment()
        self._recording = True
        self.setup_unlogged = []

    def end_setup(self) -> list[dict[str, Any]] | None:
        """Stop logging the set-up; its logs (one per communicator of the
        family, in slot order), or None when it was not being logged. Local."""
        if not self._recording:
            return None
        from ulfmpy.setup_log import snapshot

        for c in self._family():
            if c._pending:
                c._settle()
        logs = [snapshot(c.log) for c in self._family()]
        self._recording = False
        self.end_segment()
        return logs

    def begin_fast_forward(self, logs: list[dict[str, Any]]) -> None:
        """A replacement runs the set-up code: every receive and collective is
        answered from ``logs`` (what the rank it replaces got), nothing is
        sent, and a call the log does not hold is a divergence. The handle
        is a communicator of this process alone meanwhile, so code that uses
        it directly (``MPI.File.Open``) cannot wait for the survivors. Local."""
        from ulfmpy.setup_log import rebuild

        self._ff_logs = [rebuild(d) for d in logs]
        self._ff_self = MPI.COMM_SELF.Dup()
        set_handle(self, self._ff_self)
        self.log = self._ff_logs[0]
        self._ctr = _Counters()
        self.mode = "replay"
        self._S, self._all_in_S = frozenset(), False
        self.outcome = ReplayOutcome()

    def end_fast_forward(self) -> None:
        """Raise if the set-up code did not repeat the logged calls. Local."""
        if self._ff_logs is None:
            return
        for c in self._family():
            if c._pending:
                c._settle()
        if self.outcome.diverged is not None:
            raise RecoveryFailed(
                "a replacement ran the set-up code before the loop and it made a call the first "
                f"run did not ({self.outcome.diverged}): the set-up must do the same on every "
                "run (no clocks, no random seeds of its own); the job is relaunched instead")
        self.mode = "off"

    # -- segment modes (driven by the runtime) ----------------------------
    def begin_segment(self, steps: int = 0) -> None:
        """Start logging a new segment (of ``steps`` steps, if known). Local."""
        self.mode = "live"
        self._late = 0
        for c in self._family():
            c._pending = []
            c.log.clear()
            if steps:
                c.log.expect(steps)
            c._ctr = _Counters()
            c._forget_originals()

    def end_segment(self) -> None:
        """Stop logging (segment committed). Local."""
        self.mode = "off"
        for c in self._family():
            c._pending = []
            c.log.clear()
            c._forget_originals()

    @property
    def log_bytes(self) -> int:
        """Bytes the message logs of this communicator and its derived ones hold. Local."""
        for c in self._family():
            if c._pending:
                c._settle()
        return sum(c.log.nbytes for c in self._family())

    def _forget_originals(self) -> None:
        if self._have_originals or self._resent:
            self._have_originals = False
            self._resent = {}

    def fetch_originals(self, senders: Iterable[int]) -> None:
        """Give every rank in ``senders`` the payloads it sent this segment.

        Collective over the communicator (every rank calls it with the same
        ``senders``). Each rank returns to each sender what it logged from it;
        a sender files them as its originals, keyed (receiver, tag, seq), for
        the comparisons of a replay round or of :meth:`verify_resent`. Live
        logging therefore copies each payload once, at the receiver.
        """
        senders = frozenset(senders)
        me = self._rank
        out: list[dict | None] = [None] * self._size
        family = self._family()
        for slot, c in enumerate(family):
            if c._pending:
                c._settle()
            for src, key, data in c._originals_for(senders):
                box = out[src]
                if box is None:
                    box = out[src] = {}
                box[(slot, *key)] = data
        got = self._comm.alltoall(out)
        if me in senders:
            for box in got:
                if box:
                    for (slot, *key), data in box.items():
                        family[slot].log.sent.setdefault(tuple(key), data)
            for c in family:
                c._have_originals = True

    def verify_resent(self) -> set[int]:
        """Ranks whose original messages differ from what a lone re-execution
        re-sent (after :meth:`fetch_originals`). Local; clears the stash."""
        bad = set()
        for c in self._family():
            sent = c.log.sent
            for key, (data, any_key) in c._resent.items():
                orig = sent.get(key)
                if orig is None:
                    orig = sent.get(any_key)
                if orig is None or not _same(orig, data):
                    bad.add(c._to_root(key[0]))
            c._resent = {}
        return bad

    def begin_replay(self, S: Iterable[int], replay_comm: MPI.Comm) -> None:
        """Re-execute with the ranks in ``S`` live, everyone else from the log. Local."""
        for c in self._family():
            if c._pending:
                c._settle()
            c._pending = []
            c._ctr = _Counters()
            c._replay_comm = replay_comm if c is self else c._replay_context()
        self.mode = "replay"
        self._S = frozenset(S)
        self._all_in_S = len(self._S) == self._size
        self.outcome = ReplayOutcome()

    def end_replay(self, resume_live: bool = False) -> ReplayOutcome:
        """Leave replay; ``resume_live`` continues logging where the original run was."""
        out = self.outcome
        # Live logging needs no counters: a channel's length is its next seq.
        for c in self._family():
            c._ctr = _Counters()
        self.mode = "live" if resume_live else "off"
        return out

    def _live(self, peer: int) -> bool:
        return peer in self._S

    # A derived communicator over a subset of the ranks translates (SplitComm).
    def _to_root(self, rank: int) -> int:
        return rank

    def _originals_for(self, senders: frozenset[int]) -> list[tuple[int, tuple, Any]]:
        return self.log.originals_for(self._rank, senders)

    def _diverged(self, what: str) -> None:
        if self.outcome.diverged is None:
            self.outcome.diverged = what


install_guards(ResilientComm, ResilientComm._passthrough, _LOCAL)
