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

from ulfmpy.errors import UnsupportedCall

__all__ = ["MessageLog"]


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
