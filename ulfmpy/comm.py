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
"""

from __future__ import annotations

import pickle
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from mpi4py import MPI

from ulfmpy.errors import (CommRevoked, ProcessFailure, UnsupportedCall, UlfmpyError,
                           translate_mpi_error)

__all__ = ["ResilientComm", "Request", "MessageLog", "ReplayDivergence"]

# Local queries that never communicate: always safe to pass through.
_LOCAL = frozenset({
    "Get_rank", "Get_size", "rank", "size", "Get_group", "group", "Get_name", "name",
    "Is_inter", "is_inter", "Is_intra", "is_intra", "Get_topology", "topology",
    "Get_errhandler", "Get_info", "info", "Get_attr", "py2f", "handle", "Is_revoked",
})


class ReplayDivergence(UlfmpyError):
    """Re-execution made a call the original run did not (not replay-deterministic)."""


def _digest(data: Any) -> int:
    """crc32 of the bytes (collective contributions: small, compared once)."""
    if isinstance(data, np.ndarray):
        return zlib.crc32(np.ascontiguousarray(data).view(np.uint8).reshape(-1)) ^ (data.nbytes << 32)
    return zlib.crc32(data) ^ (len(data) << 32)


def _same(orig: Any, data: Any) -> bool:
    """Whether a re-executed send carries the bytes the original did (NaN-safe)."""
    if isinstance(orig, np.ndarray):
        return (isinstance(data, np.ndarray) and orig.dtype == data.dtype
                and orig.shape == data.shape and orig.tobytes() == data.tobytes())
    return bool(orig == data)


def _array(buf: Any, call: str) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        return buf
    if isinstance(buf, (list, tuple)) and buf and isinstance(buf[0], np.ndarray):
        return buf[0]
    raise UnsupportedCall(
        f"{call}: inside a segment buffers must be numpy arrays (or [array, datatype]); "
        f"got {type(buf).__name__}")


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


_PROC_NULL, _ANY_SOURCE, _ANY_TAG = MPI.PROC_NULL, MPI.ANY_SOURCE, MPI.ANY_TAG


class _Channel:
    """What one rank received from one (source, tag) this segment, in order.

    ``items[i]`` is message ``i`` (an array copy, or pickled bytes); only the
    first ``n`` belong to the segment. The arrays outlive it: the next segment
    makes the same calls, so its copies land in the same buffers instead of
    fresh allocations (no malloc, no page faults per step). ``views[i]`` is a
    memoryview of a one-dimensional ``items[i]`` (else None): assigning a
    received array to it is the cheapest checked copy Python has, since a
    memoryview refuses a different shape or element format instead of
    broadcasting or casting.
    """

    __slots__ = ("n", "items", "views", "last")

    def __init__(self) -> None:
        self.n = 0
        self.items: list[Any] = []
        self.views: list[memoryview | None] = []
        self.last = 0  # messages in the last segment that had any

    def grow(self, count: int) -> None:
        """Make room for ``count`` messages like the last one, in one block.

        Called between segments, so the copies inside the exchange land in
        memory already allocated and touched (no malloc, no page faults on
        the neighbours' critical path). Only uniform array traffic is
        predicted; anything else keeps allocating per message.
        """
        have = len(self.items)
        if count <= have or self.last == 0:
            return
        tmpl = self.items[self.last - 1]
        if type(tmpl) is not np.ndarray or tmpl.ndim == 0:
            return  # objects, or scalars (a block's rows would not be arrays)
        block = np.empty((count - have, *tmpl.shape), dtype=tmpl.dtype)
        block.fill(0)  # fault the pages in now, not during the exchange
        for j, row in enumerate(block):
            self.set(have + j, row)

    def set(self, i: int, value: Any) -> None:
        """Make ``value`` message slot ``i`` (an array the channel now owns, or bytes)."""
        items = self.items
        if i >= len(items):
            pad = i + 1 - len(items)
            items.extend([None] * pad)
            self.views.extend([None] * pad)
        items[i] = value
        self.views[i] = (memoryview(value) if type(value) is np.ndarray and value.ndim == 1
                         else None)


def _put(ch: _Channel, i: int, arr: np.ndarray) -> None:
    """Copy received ``arr`` into message slot ``i`` of ``ch`` (reusing its buffer)."""
    if i < len(ch.items):
        view = ch.views[i]
        if view is not None:
            try:
                view[:] = arr
                return
            except (ValueError, TypeError, NotImplementedError):
                pass  # a different shape or dtype this time: a new buffer
        buf = ch.items[i]
        if type(buf) is np.ndarray and buf.shape == arr.shape and buf.dtype == arr.dtype:
            buf[...] = arr
            return
    ch.set(i, np.array(arr, copy=True))


class MessageLog:
    """What one rank received and sent during one segment. Local.

    Received payloads are copied into per-(source, tag) channels, in
    sequence order; ``received`` shows them keyed (source, tag, seq).
    ``sent`` holds, for a replay, the originals of this rank's sends,
    fetched from their receivers (:meth:`ResilientComm.fetch_originals`).
    """

    __slots__ = ("rx", "sent", "collectives", "steps")

    def __init__(self) -> None:
        self.rx: dict[tuple[int, int], _Channel] = {}
        self.sent: dict[tuple[int, int, int], Any] = {}
        self.collectives: list[tuple[str, int, Any]] = []
        self.steps = 0  # steps in the segment being logged (0: not said)

    def channel(self, source: int, tag: int) -> _Channel:
        ch = self.rx.get((source, tag))
        if ch is None:
            ch = self.rx[(source, tag)] = _Channel()
        return ch

    def reserve(self, source: int, tag: int) -> tuple[_Channel, int]:
        """The next message slot from (source, tag): its channel and seq."""
        ch = self.channel(source, tag)
        i = ch.n
        ch.n = i + 1
        if i >= len(ch.items):
            ch.set(i, None)
        return ch, i

    def keep(self, source: int, tag: int, arr: np.ndarray) -> None:
        """Log a copy of received ``arr`` as the next message from (source, tag)."""
        ch = self.channel(source, tag)
        i = ch.n
        ch.n = i + 1
        _put(ch, i, arr)

    def get(self, source: int, tag: int, seq: int) -> Any:
        """Message ``seq`` from (source, tag) this segment, or None."""
        ch = self.rx.get((source, tag))
        return ch.items[seq] if ch is not None and seq < ch.n else None

    @property
    def received(self) -> dict[tuple[int, int, int], Any]:
        """Every payload received this segment, keyed (source, tag, seq)."""
        return {(src, tag, i): ch.items[i]
                for (src, tag), ch in self.rx.items() for i in range(ch.n)}

    def clear(self) -> None:
        for ch in self.rx.values():
            if ch.n:
                ch.last = ch.n
            ch.n = 0
        self.sent.clear()
        self.collectives.clear()

    def expect(self, steps: int) -> None:
        """Size every channel's buffers for a segment of ``steps`` steps.

        Each channel is assumed to carry as many messages per step as it
        did in the last segment (a timestep loop repeats its pattern), so
        when the segment length grows the buffers grow here, in blocks.
        """
        prev, self.steps = self.steps, steps
        if prev <= 0:
            return
        for ch in self.rx.values():
            if ch.last:
                ch.grow(-(-ch.last * steps // prev))

    def release(self) -> None:
        """Drop the pooled buffers too (after a repair: the calls will differ)."""
        self.clear()
        self.rx.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held: received payloads and pickled sends."""
        vals = [ch.items[i] for ch in self.rx.values() for i in range(ch.n)]
        vals += self.sent.values()
        return sum(v.nbytes if isinstance(v, np.ndarray) else len(v)
                   for v in vals if v is not None)


@dataclass
class _Counters:
    send: dict[tuple[int, int], int] = field(default_factory=dict)
    recv: dict[tuple[int, int], int] = field(default_factory=dict)
    coll: int = 0

    def next_send(self, dest: int, tag: int) -> int:
        n = self.send.get((dest, tag), 0)
        self.send[(dest, tag)] = n + 1
        return n

    def next_recv(self, source: int, tag: int) -> int:
        n = self.recv.get((source, tag), 0)
        self.recv[(source, tag)] = n + 1
        return n

    def next_coll(self) -> int:
        n = self.coll
        self.coll += 1
        return n


@dataclass
class ReplayOutcome:
    """What one rank learned while re-executing. Local."""

    contaminated: set[int] = field(default_factory=set)
    collective_mismatch: bool = False
    diverged: str | None = None


class Request:
    """A request returned by :class:`ResilientComm` nonblocking calls.

    Use its ``Wait``/``Test`` (or ``Request.Waitall`` /
    ``ResilientComm.Waitall``) — not ``MPI.Request.Waitall``, which cannot
    see the logging this request does on completion.
    """

    __slots__ = ("_comm", "_req", "_done", "_on_complete", "_value", "_call")

    def __init__(self, comm: "ResilientComm", req: Any, call: str,
                 on_complete: Any = None, value: Any = None) -> None:
        self._comm = comm
        self._req = req
        self._call = call
        self._done = req is None
        self._on_complete = on_complete
        self._value = value

    def _finish(self, value: Any = None) -> Any:
        self._done = True
        if self._on_complete is not None:
            out = self._on_complete(value)
            self._on_complete = None
            if out is not None:
                self._value = out
        elif value is not None:
            self._value = value
        return self._value

    def Wait(self, status: Any = None) -> bool:  # noqa: N802 (mpi4py names)
        """Complete the request. Local (completes a point-to-point operation)."""
        self.wait(status)
        return True

    def wait(self, status: Any = None) -> Any:
        """Complete the request and return the received object (lowercase irecv)."""
        if self._done:
            return self._value
        if self._comm._voided():
            self._done = True
            return self._value
        value = self._comm._guard(self._call + ".Wait", self._req.wait, status)
        if self._comm._voided():
            return self._value
        return self._finish(value)

    def Test(self, status: Any = None) -> bool:  # noqa: N802
        """Return True and finish the request if it completed. Local."""
        flag, _ = self.test(status)
        return flag

    def test(self, status: Any = None) -> tuple[bool, Any]:
        if self._done or self._comm._voided():
            return True, self._value
        flag, value = self._comm._guard(self._call + ".Test", self._req.test, status)
        if flag:
            return True, self._finish(value)
        return False, None

    @staticmethod
    def Waitall(requests: Sequence["Request"], statuses: Any = None) -> bool:  # noqa: N802
        """Complete all requests. Local."""
        Request.waitall(requests)
        return True

    @staticmethod
    def waitall(requests: Sequence["Request"]) -> list[Any]:
        for r in requests:
            if not isinstance(r, Request):
                raise UnsupportedCall(
                    f"Request.Waitall: got {type(r).__name__}; pass the requests the "
                    "resilient communicator returned")
        return [r.wait() for r in requests]


class ResilientComm:
    """The communicator apps receive from the runtime (``rt.comm``).

    Args:
        comm: the communicator to use; the caller owns it and should have
            set ``MPI.ERRORS_RETURN`` on it so failures surface as errors.
        ft: the job runs with ULFM (failures are survivable); ERR_OTHER is then
            read as a failure too (Open MPI 5 was seen to raise it on the
            first rank to notice a dead peer).
    """

    def __init__(self, comm: MPI.Comm, *, ft: bool = True) -> None:
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

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._comm, name)
        if name in _LOCAL or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.mode != "off":
                raise UnsupportedCall(
                    f"Comm.{name} cannot be logged for local rollback and is not allowed "
                    "inside a segment; use Send/Recv/Sendrecv/Isend/Irecv, their lowercase "
                    "forms, Allreduce/Bcast/Barrier/Allgather, or call it outside rt.loop")
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
            try:
                self._comm.Revoke()
            except MPI.Exception:
                pass
            if self._replay_comm is not None:
                try:
                    self._replay_comm.Revoke()
                except MPI.Exception:
                    pass

    def clear_failure(self) -> None:
        """Forget a handled failure. Local."""
        self.failure = None

    def reset(self, comm: MPI.Comm) -> None:
        """Continue on a repaired communicator (after a failure). Local."""
        self._comm = comm
        self._rank = comm.Get_rank()
        self._size = comm.Get_size()
        self._replay_comm = None
        self.failure = None
        self.mode = "off"
        self.log.release()
        self._ctr = _Counters()
        self._forget_originals()

    def check_failure(self) -> None:
        """Raise the failure a voided call recorded, if any. Local."""
        if self.failure is not None:
            raise self.failure

    # -- segment modes (driven by the runtime) ----------------------------
    def begin_segment(self, steps: int = 0) -> None:
        """Start logging a new segment (of ``steps`` steps, if known). Local."""
        self.mode = "live"
        self.log.clear()
        if steps:
            self.log.expect(steps)
        self._ctr = _Counters()
        self._forget_originals()

    def end_segment(self) -> None:
        """Stop logging (segment committed). Local."""
        self.mode = "off"
        self.log.clear()
        self._forget_originals()

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
        for (src, tag), ch in self.log.rx.items():
            if src not in senders or src == me:
                continue
            for seq in range(ch.n):
                data = ch.items[seq]
                if data is not None:
                    box = out[src]
                    if box is None:
                        box = out[src] = {}
                    box[(me, tag, seq)] = data
        got = self._comm.alltoall(out)
        if me in senders:
            sent = self.log.sent
            for box in got:
                if box:
                    for key, data in box.items():
                        sent.setdefault(key, data)
            self._have_originals = True

    def verify_resent(self) -> set[int]:
        """Ranks whose original messages differ from what a lone re-execution
        re-sent (after :meth:`fetch_originals`). Local; clears the stash."""
        sent, bad = self.log.sent, set()
        for key, data in self._resent.items():
            orig = sent.get(key)
            if orig is None or not _same(orig, data):
                bad.add(key[0])
        self._resent = {}
        return bad

    def begin_replay(self, S: Iterable[int], replay_comm: MPI.Comm) -> None:
        """Re-execute with the ranks in ``S`` live, everyone else from the log. Local."""
        self.mode = "replay"
        self._S = frozenset(S)
        self._all_in_S = len(self._S) == self._size
        self._replay_comm = replay_comm
        self._ctr = _Counters()
        self.outcome = ReplayOutcome()

    def end_replay(self, resume_live: bool = False) -> ReplayOutcome:
        """Leave replay; ``resume_live`` continues logging where the original run was."""
        out = self.outcome
        # Live logging needs no counters: a channel's length is its next seq.
        self._ctr = _Counters()
        self.mode = "live" if resume_live else "off"
        return out

    def _live(self, peer: int) -> bool:
        return peer in self._S

    # -- point to point ---------------------------------------------------
    def _check_peer(self, call: str, peer: int) -> None:
        if peer == MPI.ANY_SOURCE:
            raise UnsupportedCall(f"{call}: ANY_SOURCE cannot be replayed; name the source rank")

    def _check_tag(self, call: str, tag: int) -> None:
        if tag == MPI.ANY_TAG:
            raise UnsupportedCall(f"{call}: ANY_TAG cannot be replayed; name the tag")

    def _send_token(self, call: str, dest: int, tag: int, data: Any) -> None:
        """Compare a re-sent payload (replay) with the original its receiver logged.

        Live sends are neither copied nor counted: every payload's original is
        the copy its receiver logged, fetched before a replay round
        (:meth:`fetch_originals`). Comparison is exact (bytes, NaN-safe).
        Without originals yet (a lone catch-up mid-segment) the re-sent
        payload waits in ``_resent`` for :meth:`verify_resent`. An object's
        original is the receiver's re-pickling of what it got; where that is
        not byte-stable across processes (a set of str under per-process hash
        seeds) an unchanged object reads as changed, which only pulls its
        receiver into S: extra work, never a wrong result.
        """
        key = (dest, tag, self._ctr.next_send(dest, tag))
        orig = self.log.sent.get(key)
        if orig is None and not self._have_originals:
            self._resent[key] = np.array(data, copy=True) if isinstance(data, np.ndarray) else data
        elif orig is None or not _same(orig, data):
            # Missing at the receiver means it was not received in this
            # segment: pulling the receiver in is always safe.
            self.outcome.contaminated.add(dest)

    def _logged(self, call: str, source: int, tag: int, seq: int) -> Any:
        data = self.log.get(source, tag, seq)
        if data is None:
            self._diverged(f"{call} from rank {source} tag {tag} #{seq} was not received originally")
        return data

    def _diverged(self, what: str) -> None:
        if self.outcome.diverged is None:
            self.outcome.diverged = what

    def Send(self, buf: Any, dest: int, tag: int = 0) -> None:  # noqa: N802
        if self._voided():
            return
        if self.mode == "off" or dest == MPI.PROC_NULL:
            return self._guard("Send", self._comm.Send, buf, dest, tag)
        arr = _array(buf, "Send")
        if self.mode == "live":
            self._guard("Send", self._comm.Send, buf, dest, tag)
        elif self._live(dest):
            self._ctr.next_send(dest, tag)
            self._guard("Send", self._replay_comm.Send, buf, dest, tag)
        else:
            self._send_token("Send", dest, tag, arr)

    def Recv(self, buf: Any, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
             status: Any = None) -> None:  # noqa: N802
        if self._voided():
            return
        if self.mode == "off" or source == MPI.PROC_NULL:
            return self._guard("Recv", self._comm.Recv, buf, source, tag, status)
        self._check_peer("Recv", source)
        self._check_tag("Recv", tag)
        arr = _array(buf, "Recv")
        if self.mode == "live":
            self._guard("Recv", self._comm.Recv, buf, source, tag, status)
            self.log.keep(source, tag, arr)
            return
        seq = self._ctr.next_recv(source, tag)
        if self._live(source):
            self._guard("Recv", self._replay_comm.Recv, buf, source, tag, status)
        else:
            data = self._logged("Recv", source, tag, seq)
            if data is not None:
                np.copyto(arr, data)

    def Isend(self, buf: Any, dest: int, tag: int = 0) -> Request:  # noqa: N802
        if self._voided():
            return Request(self, None, "Isend")
        if self.mode == "off" or dest == MPI.PROC_NULL:
            return Request(self, self._guard("Isend", self._comm.Isend, buf, dest, tag), "Isend")
        arr = _array(buf, "Isend")
        if self.mode == "live":
            return Request(self, self._guard("Isend", self._comm.Isend, buf, dest, tag), "Isend")
        if self._live(dest):
            self._ctr.next_send(dest, tag)
            return Request(self, self._guard("Isend", self._replay_comm.Isend, buf, dest, tag), "Isend")
        self._send_token("Isend", dest, tag, arr)
        return Request(self, None, "Isend")

    def Irecv(self, buf: Any, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG) -> Request:  # noqa: N802
        if self._voided():
            return Request(self, None, "Irecv")
        if self.mode == "off" or source == MPI.PROC_NULL:
            return Request(self, self._guard("Irecv", self._comm.Irecv, buf, source, tag), "Irecv")
        self._check_peer("Irecv", source)
        self._check_tag("Irecv", tag)
        arr = _array(buf, "Irecv")
        if self.mode == "live":
            req = self._guard("Irecv", self._comm.Irecv, buf, source, tag)
            # The sequence number is the posting order, whatever order they complete in.
            ch, seq = self.log.reserve(source, tag)

            def keep(_: Any) -> None:
                _put(ch, seq, arr)

            return Request(self, req, "Irecv", keep)
        seq = self._ctr.next_recv(source, tag)
        if self._live(source):
            return Request(self, self._guard("Irecv", self._replay_comm.Irecv, buf, source, tag), "Irecv")
        data = self._logged("Irecv", source, tag, seq)
        if data is not None:
            np.copyto(arr, data)
        return Request(self, None, "Irecv")

    def Sendrecv(self, sendbuf: Any, dest: int, sendtag: int = 0, recvbuf: Any = None,
                 source: int = MPI.ANY_SOURCE, recvtag: int = MPI.ANY_TAG,
                 status: Any = None) -> None:  # noqa: N802
        if self.failure is not None and self.void_on_failure:
            return
        mode = self.mode
        if mode != "replay":
            # The hot path of a halo exchange, once per neighbour per step, so
            # it is written flat: one MPI call, at most one copy per direction
            # into the log. Every microsecond here is paid on each neighbour's
            # critical path, twice over when ranks share a core.
            live = mode == "live"
            rcv = None
            if live:
                if dest != _PROC_NULL and type(sendbuf) is not np.ndarray:
                    _array(sendbuf, "Sendrecv")  # the same rule as Send
                if source != _PROC_NULL:
                    if source == _ANY_SOURCE or recvtag == _ANY_TAG:
                        self._check_peer("Sendrecv", source)
                        self._check_tag("Sendrecv", recvtag)
                    rcv = recvbuf if type(recvbuf) is np.ndarray else _array(recvbuf, "Sendrecv")
            try:
                # Open MPI 5.0 MPI_Sendrecv with a PROC_NULL side segfaults
                # when the other side fails with ERR_REVOKED (seen with
                # messages > 256 B), so a one-sided exchange is a Send or a Recv.
                if source == _PROC_NULL:
                    if dest == _PROC_NULL:
                        return
                    self._comm.Send(sendbuf, dest, sendtag)
                elif dest == _PROC_NULL:
                    self._comm.Recv(recvbuf, source, recvtag, status)
                else:
                    self._comm.Sendrecv(sendbuf, dest, sendtag, recvbuf, source, recvtag, status)
            except MPI.Exception as exc:
                self._fail("Sendrecv", exc)
                return
            if rcv is not None:
                # MessageLog.keep, inlined: this runs once per neighbour per
                # step. The memoryview assignment checks shape and format
                # itself; any mismatch (or a new slot) takes the general path.
                ch = self.log.rx.get((source, recvtag))
                if ch is not None:
                    i = ch.n
                    if i < len(ch.views) and (view := ch.views[i]) is not None:
                        try:
                            view[:] = rcv
                            ch.n = i + 1
                            return
                        except (ValueError, TypeError, NotImplementedError):
                            pass
                self.log.keep(source, recvtag, rcv)
            return
        # Replay: half live, half logged is possible; post the live halves
        # nonblocking so two members of S never wait on each other.
        reqs = []
        if source != MPI.PROC_NULL:
            reqs.append(self.Irecv(recvbuf, source, recvtag))
        if dest != MPI.PROC_NULL:
            reqs.append(self.Isend(sendbuf, dest, sendtag))
        Request.waitall(reqs)

    # -- lowercase (pickled objects) ---------------------------------------
    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        if self._voided():
            return
        if self.mode == "off" or dest == MPI.PROC_NULL:
            return self._guard("send", self._comm.send, obj, dest, tag)
        if self.mode == "live":
            self._guard("send", self._comm.send, obj, dest, tag)
        elif self._live(dest):
            self._ctr.next_send(dest, tag)
            self._guard("send", self._replay_comm.send, obj, dest, tag)
        else:
            self._send_token("send", dest, tag, _pickle(obj))

    def recv(self, buf: Any = None, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
             status: Any = None) -> Any:
        if self._voided():
            return None
        if self.mode == "off" or source == MPI.PROC_NULL:
            return self._guard("recv", self._comm.recv, buf, source, tag, status)
        self._check_peer("recv", source)
        self._check_tag("recv", tag)
        if self.mode == "live":
            obj = self._guard("recv", self._comm.recv, buf, source, tag, status)
            if not self._voided():
                ch, seq = self.log.reserve(source, tag)
                ch.set(seq, _pickle(obj))
            return obj
        seq = self._ctr.next_recv(source, tag)
        if self._live(source):
            return self._guard("recv", self._replay_comm.recv, buf, source, tag, status)
        data = self._logged("recv", source, tag, seq)
        return None if data is None else pickle.loads(data)

    def isend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        if self._voided():
            return Request(self, None, "isend")
        if self.mode == "off" or dest == MPI.PROC_NULL:
            return Request(self, self._guard("isend", self._comm.isend, obj, dest, tag), "isend")
        if self.mode == "live":
            return Request(self, self._guard("isend", self._comm.isend, obj, dest, tag), "isend")
        if self._live(dest):
            self._ctr.next_send(dest, tag)
            return Request(self, self._guard("isend", self._replay_comm.isend, obj, dest, tag), "isend")
        self._send_token("isend", dest, tag, _pickle(obj))
        return Request(self, None, "isend")

    def irecv(self, buf: Any = None, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG) -> Request:
        if self._voided():
            return Request(self, None, "irecv")
        if self.mode == "off" or source == MPI.PROC_NULL:
            return Request(self, self._guard("irecv", self._comm.irecv, buf, source, tag), "irecv")
        self._check_peer("irecv", source)
        self._check_tag("irecv", tag)
        if self.mode == "live":
            req = self._guard("irecv", self._comm.irecv, buf, source, tag)
            ch, seq = self.log.reserve(source, tag)

            def keep(obj: Any) -> Any:
                ch.set(seq, _pickle(obj))
                return obj

            return Request(self, req, "irecv", keep)
        seq = self._ctr.next_recv(source, tag)
        if self._live(source):
            return Request(self, self._guard("irecv", self._replay_comm.irecv, buf, source, tag), "irecv")
        data = self._logged("irecv", source, tag, seq)
        return Request(self, None, "irecv", value=None if data is None else pickle.loads(data))

    def sendrecv(self, sendobj: Any, dest: int, sendtag: int = 0, recvbuf: Any = None,
                 source: int = MPI.ANY_SOURCE, recvtag: int = MPI.ANY_TAG, status: Any = None) -> Any:
        if self._voided():
            return None
        if self.mode == "off":
            return self._guard("sendrecv", self._comm.sendrecv, sendobj, dest, sendtag,
                               recvbuf, source, recvtag, status)
        rreq = self.irecv(recvbuf, source, recvtag) if source != MPI.PROC_NULL else None
        sreq = self.isend(sendobj, dest, sendtag) if dest != MPI.PROC_NULL else None
        out = rreq.wait() if rreq is not None else None
        if sreq is not None:
            sreq.wait()
        return out

    @staticmethod
    def Waitall(requests: Sequence[Request], statuses: Any = None) -> bool:  # noqa: N802
        """Complete all requests. Local."""
        return Request.Waitall(requests)

    # -- collectives ---------------------------------------------------------
    def _collective(self, call: str, contribution: Any, live: Any, result_of: Any,
                    apply_logged: Any) -> Any:
        """Run, log or replay one collective.

        ``live(comm)`` performs it on a communicator and returns its value;
        ``result_of(value)`` gives what to log; ``apply_logged(logged)`` hands
        the logged result back to the caller during replay.
        """
        if self._voided():
            return apply_logged(None)
        if self.mode == "off":
            return self._guard(call, live, self._comm)
        seq = self._ctr.next_coll()
        digest = _digest(contribution)
        if self.mode == "live":
            value = self._guard(call, live, self._comm)
            if self._voided():
                return value
            self.log.collectives.append((call, digest, result_of(value)))
            return value
        if self._all_in_S:
            return self._guard(call, live, self._replay_comm)
        if seq >= len(self.log.collectives) or self.log.collectives[seq][0] != call:
            self._diverged(f"{call} #{seq} was not called at this point originally")
            return apply_logged(None)
        _, orig_digest, logged = self.log.collectives[seq]
        if orig_digest != digest:
            # Our contribution changed: every rank's result was wrong.
            self.outcome.collective_mismatch = True
        return apply_logged(logged)

    def Allreduce(self, sendbuf: Any, recvbuf: Any, op: Any = MPI.SUM) -> None:  # noqa: N802
        rb = _array(recvbuf, "Allreduce") if self.mode != "off" else None
        if self.mode != "off":
            contrib = np.array(rb, copy=True) if sendbuf is MPI.IN_PLACE else _array(sendbuf, "Allreduce")
        else:
            contrib = b""

        def apply(logged: Any) -> None:
            if logged is not None:
                np.copyto(rb, logged)

        self._collective("Allreduce", contrib, lambda c: c.Allreduce(sendbuf, recvbuf, op),
                         lambda _: rb.copy(), apply)

    def allreduce(self, sendobj: Any, op: Any = MPI.SUM) -> Any:
        contrib = _pickle(sendobj) if self.mode != "off" else b""
        return self._collective("allreduce", contrib, lambda c: c.allreduce(sendobj, op),
                                _pickle, lambda d: sendobj if d is None else pickle.loads(d))

    def Bcast(self, buf: Any, root: int = 0) -> None:  # noqa: N802
        arr = _array(buf, "Bcast") if self.mode != "off" else None
        contrib: Any = b""
        if arr is not None and self._rank == root:
            contrib = arr

        def apply(logged: Any) -> None:
            if logged is not None:
                np.copyto(arr, logged)

        self._collective("Bcast", contrib, lambda c: c.Bcast(buf, root), lambda _: arr.copy(), apply)

    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        contrib = _pickle(obj) if (self.mode != "off" and self._rank == root) else b""
        return self._collective("bcast", contrib, lambda c: c.bcast(obj, root), _pickle,
                                lambda d: obj if d is None else pickle.loads(d))

    def Barrier(self) -> None:  # noqa: N802
        self._collective("Barrier", b"", lambda c: c.Barrier(), lambda _: None, lambda _: None)

    def barrier(self) -> None:
        self.Barrier()

    def Allgather(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        rb = _array(recvbuf, "Allgather") if self.mode != "off" else None
        contrib: Any = b""
        if self.mode != "off":
            contrib = (np.array(rb, copy=True) if sendbuf is MPI.IN_PLACE
                       else _array(sendbuf, "Allgather"))

        def apply(logged: Any) -> None:
            if logged is not None:
                np.copyto(rb, logged)

        self._collective("Allgather", contrib, lambda c: c.Allgather(sendbuf, recvbuf),
                         lambda _: rb.copy(), apply)

    def allgather(self, sendobj: Any) -> list[Any]:
        contrib = _pickle(sendobj) if self.mode != "off" else b""
        return self._collective("allgather", contrib, lambda c: c.allgather(sendobj), _pickle,
                                lambda d: [sendobj] * self._size if d is None else pickle.loads(d))
