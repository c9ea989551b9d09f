"""The message log: what a rank received (and, for a replay, sent) in a segment.

Holds :class:`MessageLog` with its per-(source, tag) receive channels
(:class:`_Channel`, filled by :func:`_put`), the replay counters
(:class:`_Counters`), and the payload helpers the resilient communicator
(:mod:`ulfmpy.comm`) uses: :func:`_digest` and :func:`_same` to compare
payloads, :func:`_array` and :func:`_pickle` to take them from a call.
"""

from __future__ import annotations

import pickle
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from ulfmpy.errors import UnsupportedCall

__all__ = ["MessageLog"]


def _digest(data: Any) -> int:
    """crc32 of the bytes (collective contributions: small, compared once)."""
    if isinstance(data, np.ndarray):
        return zlib.crc32(np.ascontiguousarray(data).view(np.uint8).reshape(-1)) ^ (data.nbytes << 32)
    return zlib.crc32(data) ^ (len(data) << 32)


def _same(orig: Any, data: Any) -> bool:
    """Whether a re-executed send carries the bytes the original did (NaN-safe).

    A payload packed from a datatype is raw bytes (uint8): it equals a typed
    array on the other side when the bytes on the wire are the same.
    """
    if isinstance(orig, np.ndarray):
        if not isinstance(data, np.ndarray):
            return False
        if orig.dtype == data.dtype and orig.shape == data.shape:
            return orig.tobytes() == data.tobytes()
        return (np.uint8 in (orig.dtype, data.dtype) and orig.nbytes == data.nbytes
                and orig.tobytes() == data.tobytes())
    return bool(orig == data)


def _array(buf: Any, call: str) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        return buf
    if isinstance(buf, (list, tuple)) and buf and isinstance(buf[0], np.ndarray):
        return buf[0]
    raise UnsupportedCall(
        f"{call}: inside a segment buffers must be numpy arrays (or [array, datatype]); "
        f"got {type(buf).__name__}")


class _Layout:
    """The elements ``count`` items of a datatype cover, from a byte offset,
    in an array of a given size: packed to log a message (the bytes on the
    wire, not the whole array) and unpacked to hand a logged message back."""

    __slots__ = ("type", "offset", "span", "scratch")

    def __init__(self, dt: Any, count: int, displ: int, nbytes: int) -> None:
        base = dt.Create_contiguous(count)
        lb, extent = base.Get_extent()
        tlb, textent = base.Get_true_extent()
        if min(lb, tlb) < 0:
            base.Free()
            raise UnsupportedCall("a datatype with a negative lower bound cannot be logged; "
                                  "give the buffer from its first element")
        self.offset = displ * dt.Get_extent()[1]
        self.span = max(lb + extent, tlb + textent)
        if nbytes < self.offset + self.span:
            base.Free()
            raise UnsupportedCall(
                f"a buffer of {nbytes} bytes is too small for its datatype "
                f"({self.offset + self.span} bytes from the array's start)")
        # Pack and Unpack count whole extents in the memory they are given
        # (the array from the offset): with the extent resized to that
        # memory's length, it holds exactly one.
        self.type = base.Create_resized(0, nbytes - self.offset).Commit()
        base.Free()
        self.scratch = np.empty(self.type.Pack_size(1, MPI.COMM_SELF), dtype=np.uint8)

    def memory(self, arr: np.ndarray) -> Any:
        if self.offset:
            return arr.reshape(-1).view(np.uint8)[self.offset:]
        return arr

    def pack(self, arr: np.ndarray) -> np.ndarray:
        """The elements, packed into a scratch buffer (valid until the next pack)."""
        self.type.Pack(self.memory(arr), self.scratch, 0, MPI.COMM_SELF)
        return self.scratch

    def unpack(self, data: np.ndarray, arr: np.ndarray) -> None:
        if data.nbytes != self.scratch.nbytes:
            raise UnsupportedCall(f"a logged message of {data.nbytes} bytes does not fit a "
                                  f"datatype of {self.scratch.nbytes} bytes")
        self.type.Unpack(np.ascontiguousarray(data).view(np.uint8).reshape(-1), 0,
                         self.memory(arr), MPI.COMM_SELF)


_LAYOUTS: dict[tuple[int, Any, Any, int], tuple[Any, _Layout]] = {}


def _layout(buf: Any, call: str) -> tuple[np.ndarray, _Layout] | None:
    """For a buffer given as ``[array, datatype]``, ``[array, count, datatype]``,
    ``[array, (count, displ), datatype]`` or ``[array, count, displ, datatype]``
    with a derived datatype or an explicit count: the array and its layout
    (cached per datatype, count, displacement and array size). None for a
    whole array of a predefined type."""
    if type(buf) is list and len(buf) == 3:
        # The usual form, [array, 1, type], looked up before it is parsed.
        arr, count, dt = buf
        if type(count) is int and type(arr) is np.ndarray:
            hit = _LAYOUTS.get((id(dt), count, 0, arr.nbytes))
            if hit is not None:
                return arr, hit[1]
    if not (isinstance(buf, (list, tuple)) and len(buf) >= 2 and type(buf[0]) is np.ndarray):
        return None
    arr, dt = buf[0], buf[-1]
    if not isinstance(dt, MPI.Datatype):
        return None
    n = len(buf)
    if n == 2:
        if dt.is_predefined:
            return None
        count, displ = None, 0
    elif n == 3 and isinstance(buf[1], tuple) and len(buf[1]) == 2:
        count, displ = buf[1]
    elif n in (3, 4):
        count, displ = buf[1], (buf[2] if n == 4 else 0)
    else:
        count = displ = "?"
    if not (count is None or isinstance(count, (int, np.integer))) or \
            not isinstance(displ, (int, np.integer)):
        raise UnsupportedCall(f"{call}: buffer spec {[type(b).__name__ for b in buf]} is not "
                              "[array, datatype], [array, count, datatype] or "
                              "[array, count, displ, datatype]")
    if count is None:
        extent = dt.Get_extent()[1]
        count = arr.nbytes // extent if extent else 0
    # Keyed by the datatype object, which the entry keeps alive (so its id
    # is never reused): the layout is a type of ulfmpy's own, derived from
    # it, and stays valid whatever the app does with its datatype later.
    key = (id(dt), count, displ, arr.nbytes)
    hit = _LAYOUTS.get(key)
    if hit is None:
        if not arr.flags.c_contiguous:
            raise UnsupportedCall(f"{call}: a buffer with a datatype must be a contiguous array")
        hit = _LAYOUTS[key] = (dt, _Layout(dt, int(count), int(displ), arr.nbytes))
    return arr, hit[1]


def _check_buffer(buf: Any, call: str) -> None:
    """The rule for buffers inside a segment, cheaply (what a message
    carries is taken only where it is needed)."""
    if type(buf) is np.ndarray or (
            isinstance(buf, (list, tuple)) and buf and type(buf[0]) is np.ndarray):
        return
    _array(buf, call)


def _payload(buf: Any, call: str) -> np.ndarray:
    """What a message carries, to log or compare: the array itself, or the
    elements a datatype selects, packed (a scratch buffer: copy to keep)."""
    if type(buf) is np.ndarray:
        return buf
    spec = _layout(buf, call)
    if spec is None:
        return _array(buf, call)
    return spec[1].pack(spec[0])


def _deliver(buf: Any, data: Any, call: str) -> None:
    """Write a logged message into a receive buffer (only the datatype's elements)."""
    if type(buf) is np.ndarray:
        np.copyto(buf, data)
        return
    spec = _layout(buf, call)
    if spec is None:
        np.copyto(_array(buf, call), data)
    else:
        spec[1].unpack(data, spec[0])


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)



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

    __slots__ = ("n", "items", "views", "last", "tags")

    def __init__(self) -> None:
        self.n = 0
        self.items: list[Any] = []
        self.views: list[memoryview | None] = []
        self.last = 0  # messages in the last segment that had any
        # For a channel of ANY_TAG receives: the tag each message had (None:
        # not known, its request was completed without a status).
        self.tags: list[int | None] | None = None

    def tag(self, i: int, tag: int | None) -> None:
        """Record the tag message ``i`` of an ANY_TAG channel arrived with."""
        tags = self.tags
        if tags is None:
            tags = self.tags = []
        if i >= len(tags):
            tags.extend([None] * (i + 1 - len(tags)))
        tags[i] = tag

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

    __slots__ = ("rx", "sent", "collectives", "steps", "sources", "probes")

    def __init__(self) -> None:
        self.rx: dict[tuple[int, int], _Channel] = {}
        self.sent: dict[tuple[int, int, int], Any] = {}
        self.collectives: list[tuple[str, int, Any]] = []
        self.steps = 0  # steps in the segment being logged (0: not said)
        # The source each ANY_SOURCE receive matched, in call order, and each
        # Iprobe's answer: replay gives the same ones back.
        self.sources: list[int] = []
        self.probes: list[tuple[bool, int, int, int]] = []

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
        self.sources.clear()
        self.probes.clear()

    def originals_for(self, me: int, senders: frozenset[int]) -> list[tuple[int, tuple, Any]]:
        """(sender, key, payload) of every message received this segment, keyed
        as its sender counts sends: (receiver, tag, seq) for a receive that
        named the tag, (receiver, ANY_TAG, n) for the n-th message from a
        source whose receives were all ANY_TAG (messages from one source
        match those in the order they were sent, whatever their tags). Where
        one source met both kinds the order between them is not known, so its
        messages are left out: their sender then counts its re-sends as
        changed and the receiver re-executes too (more work, never a wrong
        result)."""
        kinds: dict[int, set[bool]] = {}
        for (src, tag), ch in self.rx.items():
            if ch.n:
                kinds.setdefault(src, set()).add(tag == MPI.ANY_TAG)
        out = []
        for (src, tag), ch in self.rx.items():
            if src not in senders or src == me or ch.n == 0 or len(kinds[src]) > 1:
                continue
            out.extend((src, (me, tag, seq), ch.items[seq]) for seq in range(ch.n)
                       if ch.items[seq] is not None)
        return out

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
    send: dict[tuple[int, int | None], int] = field(default_factory=dict)
    recv: dict[tuple[int, int], int] = field(default_factory=dict)
    coll: int = 0
    last_any: int = 0
    source: int = 0  # ANY_SOURCE receives replayed
    probe: int = 0  # Iprobe answers replayed

    def next_send(self, dest: int, tag: int) -> int:
        """The send's number among those to ``dest`` with ``tag``; its number
        among all sends to ``dest`` is left in ``last_any``."""
        n = self.send.get((dest, tag), 0)
        self.send[(dest, tag)] = n + 1
        k = self.send.get((dest, None), 0)
        self.send[(dest, None)] = k + 1
        self.last_any = k
        return n

    def next_recv(self, source: int, tag: int) -> int:
        n = self.recv.get((source, tag), 0)
        self.recv[(source, tag)] = n + 1
        return n

    def next_coll(self) -> int:
        n = self.coll
        self.coll += 1
        return n
