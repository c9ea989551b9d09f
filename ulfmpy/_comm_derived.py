"""Communicators derived from ``rt.comm`` (docs/internals.md, "Derived communicators").

``rt.comm.Create_cart(...)``, ``rt.comm.Create_dist_graph_adjacent(...)``
and ``rt.comm.Dup()`` return communicators over the same ranks, and
``rt.comm.Split(...)`` and ``cart.Sub(...)`` over a subset of them
(``SplitComm``), that are protected like ``rt.comm`` itself: their
messages are logged and replayed, a failure on them voids the step and
revokes the whole family, and after a repair they go on over the repaired
ranks. Each has a context of its own (a communicator from the pools the
runtime opens collectively at the start and after every repair,
:meth:`ResilientComm.open_contexts`), so creating one is local and a
replacement running the factory gets the same slots as the survivors.

Open MPI's topology module is not fault tolerant, so the Cartesian mapping
is computed here, with MPI's semantics: row-major ranks, ``reorder``
ignored (allowed by the standard), ``Shift`` giving ``PROC_NULL`` off a
non-periodic edge. The segment mode, the failure and the replay outcome are
the parent's: one family, one segment.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

from mpi4py import MPI

from ulfmpy._comm_handle import set_handle
from ulfmpy.comm import ResilientComm
from ulfmpy.errors import RecoveryFailed, UnsupportedCall
from ulfmpy.msglog import MessageLog, _Counters

__all__ = ["DerivedComm", "CartComm", "DistGraphComm", "SplitComm", "SubCartComm"]


def _shared(name: str) -> property:
    """An attribute every member of the family shares: the root's (read by
    a C getter: these are read on every call of the hot path)."""

    def put(self: "DerivedComm", value: Any) -> None:
        setattr(self._root, name, value)

    return property(attrgetter(f"_root.{name}"), put)


class DerivedComm(ResilientComm):
    """A protected duplicate of a :class:`ResilientComm` (``rt.comm.Dup()``)."""

    mode = _shared("mode")
    failure = _shared("failure")
    void_on_failure = _shared("void_on_failure")
    outcome = _shared("outcome")
    ft = _shared("ft")
    _S = _shared("_S")
    _all_in_S = _shared("_all_in_S")
    # One list for the family: any member's next call logs what mpi4py completed.
    _pending = _shared("_pending")

    def __init__(self, parent: ResilientComm, slot: int) -> None:  # noqa: D107
        root = getattr(parent, "_root", parent)
        self._root = root
        self._index = slot
        self._replay_comm = None
        ff = root._ff_logs  # a replacement's set-up: the rank it replaces got these
        self.log = ff[slot + 1] if ff is not None and slot + 1 < len(ff) else MessageLog()
        self._ctr = _Counters()
        self._have_originals = False
        self._resent = {}
        self._children = []
        self._pools = ([], [])
        self._attach()
        root._children.append(self)

    _dropped = False

    def _voided(self) -> bool:
        if self._dropped:
            raise UnsupportedCall(
                "a communicator derived for an app the runtime has since rebuilt (the factory "
                "ran again after a repair) was used; use the ones the new app holds")
        root = self._root
        return root.failure is not None and root.void_on_failure

    def _attach(self) -> None:
        """Take this slot's context from the root's current pool. Local."""
        root = self._root
        if not root._pools[0]:  # fast-forward: the repair's open_contexts attaches it
            self._comm = root._ff_self
            set_handle(self, self._comm)
            self._rank, self._size = root._rank, root._size
            return
        self._comm = root._pools[0][self._index]
        set_handle(self, self._comm)
        self._rank, self._size = root._rank, root._size
        self._replay_comm = None

    def _replay_context(self) -> MPI.Comm | None:
        pool = self._root._pools[1]
        return pool[self._index] if pool else None

    def _family(self) -> list[Any]:
        return self._root._family()

    def _slot(self, call: str) -> int:
        return self._root._slot(call)

    def Dup(self) -> "DerivedComm":  # noqa: N802
        return DerivedComm(self._root, self._root._slot("Dup"))

    Clone = Dup

    def Create_cart(self, dims: Any, periods: Any = None, reorder: bool = False) -> "CartComm":  # noqa: N802
        return CartComm(self._root, self._root._slot("Create_cart"), dims, periods)

    def Create_dist_graph_adjacent(self, sources: Any, destinations: Any,  # noqa: N802
                                   sourceweights: Any = None, destweights: Any = None,
                                   info: Any = None, reorder: bool = False) -> "DistGraphComm":
        return DistGraphComm(self._root, self._root._slot("Create_dist_graph_adjacent"),
                             sources, destinations, sourceweights, destweights)

    def Split(self, color: int = 0, key: int = 0) -> Any:  # noqa: N802
        return _split(self, color, key)

    def Free(self) -> None:  # noqa: N802
        """Kept until the run ends: the context belongs to the runtime's pool."""

    # The driver calls belong to the root: one family, one segment.
    def begin_segment(self, steps: int = 0) -> None:
        raise UnsupportedCall("segments are driven on rt.comm, not on a derived communicator")

    begin_replay = end_replay = end_segment = fetch_originals = begin_segment


class _CartTopology:
    """MPI's Cartesian mapping over ``_dims``/``_periods``, row-major,
    for the ranks ``_rank`` of ``_size`` (a protected grid or a sub-grid)."""

    @property
    def dims(self) -> list[int]:
        return list(self._dims)

    @property
    def periods(self) -> list[int]:
        return [int(p) for p in self._periods]

    @property
    def ndim(self) -> int:
        return len(self._dims)

    @property
    def coords(self) -> list[int]:
        return self.Get_coords(self._rank)

    @property
    def topo(self) -> tuple[list[int], list[int], list[int]]:
        return self.Get_topo()

    def Get_dim(self) -> int:  # noqa: N802
        return len(self._dims)

    def Get_topology(self) -> int:  # noqa: N802
        return MPI.CART

    @property
    def topology(self) -> int:
        return MPI.CART

    def Get_topo(self) -> tuple[list[int], list[int], list[int]]:  # noqa: N802
        return self.dims, self.periods, self.coords

    def Get_coords(self, rank: int) -> list[int]:  # noqa: N802
        if not 0 <= rank < self._size:
            raise UnsupportedCall(f"Get_coords({rank}): no such rank (size {self._size})")
        out = []
        for d in reversed(self._dims):
            out.append(rank % d)
            rank //= d
        return out[::-1]

    def Get_cart_rank(self, coords: Any) -> int:  # noqa: N802
        rank = 0
        for c, d, p in zip(coords, self._dims, self._periods):
            c = int(c)
            if p:
                c %= d
            elif not 0 <= c < d:
                raise UnsupportedCall(f"Get_cart_rank({list(coords)}): outside the "
                                      f"non-periodic grid {self._dims}")
            rank = rank * d + c
        return rank

    def Shift(self, direction: int, disp: int) -> tuple[int, int]:  # noqa: N802
        """(source, dest) of a shift by ``disp`` along ``direction``: PROC_NULL
        off a non-periodic edge. Local."""
        if not 0 <= direction < len(self._dims):
            raise UnsupportedCall(f"Shift({direction}, ...): the grid has {len(self._dims)} "
                                  "dimensions")
        me = self.coords

        def at(offset: int) -> int:
            c = list(me)
            c[direction] += offset
            d = self._dims[direction]
            if not self._periods[direction] and not 0 <= c[direction] < d:
                return MPI.PROC_NULL
            return self.Get_cart_rank(c)

        return at(-disp), at(disp)

    def Sub(self, remain_dims: Any) -> "SubCartComm":  # noqa: N802
        """The grid of the dimensions kept, one per combination of the others'
        coordinates, ranked row-major within it (MPI's Cart_sub), protected.
        Collective over this communicator, like MPI's."""
        if isinstance(self, SplitComm):
            raise UnsupportedCall("Sub of a sub-grid is not protected; take every sub-grid "
                                  "from the full one (cart.Sub([...]))")
        remain = [bool(r) for r in remain_dims]
        if len(remain) != len(self._dims):
            raise UnsupportedCall(f"Sub({list(remain_dims)}): the grid has {len(self._dims)} "
                                  "dimensions")
        color, coords = 0, self.coords
        for keep, c, d in zip(remain, coords, self._dims):
            if not keep:
                color = color * d + c
        dims = [d for keep, d in zip(remain, self._dims) if keep]
        periods = [p for keep, p in zip(remain, self._periods) if keep]
        return SubCartComm(self, self._root._slot("Sub"), color, self._rank, dims, periods)


class CartComm(_CartTopology, DerivedComm):
    """A protected Cartesian communicator (``rt.comm.Create_cart``)."""

    def __init__(self, parent: ResilientComm, slot: int, dims: Any,
                 periods: Any = None) -> None:  # noqa: D107
        dims = [int(d) for d in dims]
        size = parent.Get_size()
        if not dims or any(d <= 0 for d in dims):
            raise UnsupportedCall(f"Create_cart(dims={dims}): every dimension must be >= 1; "
                                  f"MPI.Compute_dims({size}, {len(dims) or 2}) fills them")
        n = 1
        for d in dims:
            n *= d
        if n != size:
            raise UnsupportedCall(
                f"Create_cart(dims={dims}) covers {n} of {size} ranks; a protected Cartesian "
                f"communicator covers them all: dims=MPI.Compute_dims({size}, {len(dims)})")
        if periods is None:
            periods = [False] * len(dims)
        elif isinstance(periods, (bool, int)):
            periods = [bool(periods)] * len(dims)
        periods = [bool(p) for p in periods]
        if len(periods) != len(dims):
            raise UnsupportedCall(f"Create_cart: {len(periods)} periods for {len(dims)} dims")
        self._dims, self._periods = dims, periods
        super().__init__(parent, slot)


class SplitComm(DerivedComm):
    """A protected communicator over the ranks of one colour (``comm.Split``).

    Every rank's (colour, key) is gathered on the parent (a logged
    collective: a replacement's fast-forward gets it from the log), so every
    process holds the whole table. The context is a split of the slot's
    pool context, made where the app calls ``Split`` (collective over the
    parent, as MPI's is) and, after a repair, by every process in
    :meth:`ResilientComm.open_contexts` from the survivors' tables: a
    replacement whose factory calls ``Split`` later finds its part there
    and checks its colour and key against it. Ranks here are the colour's
    own; the replay set ``S`` and the originals' exchange speak the
    parent's, translated by ``_members``. A process given ``MPI.UNDEFINED``
    gets ``MPI.COMM_NULL`` but keeps the slot, so slots stay aligned.
    """

    def __init__(self, parent: ResilientComm, slot: int, color: int, key: int) -> None:  # noqa: D107
        root = getattr(parent, "_root", parent)
        color, key = int(color), int(key)
        if color < 0 and color != MPI.UNDEFINED:
            raise UnsupportedCall(f"Split(color={color}): a colour is >= 0 or MPI.UNDEFINED")
        made = root._splits.get(slot)
        if made is not None and len(made[0]) == root._size:
            table = made[0]  # a replacement after a repair: the survivors' table
            if tuple(table[root._rank]) != (color, key):
                raise RecoveryFailed(
                    f"Split(color={color}, key={key}) on the replacement of rank {root._rank}; "
                    f"that rank split with {tuple(table[root._rank])}: the set-up differs")
        else:
            table = [tuple(t) for t in parent.allgather((color, key))]
            made = None
        self._table = table
        self._color = color
        order = sorted(range(len(table)), key=lambda r: (table[r][1], r))
        self._members = [r for r in order if table[r][0] == color and color != MPI.UNDEFINED]
        self._index_of = {r: i for i, r in enumerate(self._members)}
        if made is None and root._pools[0]:
            root._make_split(slot, table)
        super().__init__(parent, slot)

    @property
    def is_null(self) -> bool:
        return self._color == MPI.UNDEFINED

    def _attach(self) -> None:
        root = self._root
        made = root._splits.get(self._index)
        if not root._pools[0] or made is None or made[0] != self._table:
            # Fast-forward (the repair's open_contexts makes it), or a stale
            # one of an app the factory is about to rebuild (shrink).
            self._comm = root._ff_self if not root._pools[0] else MPI.COMM_NULL
        else:
            self._comm = made[1]
        self._replay_comm = None
        if self._comm != MPI.COMM_NULL:
            set_handle(self, self._comm)
        self._rank = self._index_of.get(root._rank, MPI.UNDEFINED)
        self._size = len(self._members)

    def _replay_context(self) -> MPI.Comm | None:
        made = self._root._splits.get(self._index)
        return made[2] if made is not None else None

    def _live(self, peer: int) -> bool:
        return 0 <= peer < len(self._members) and self._members[peer] in self._S

    def _to_root(self, rank: int) -> int:
        return self._members[rank]

    def _originals_for(self, senders: frozenset[int]) -> list[tuple[int, tuple, Any]]:
        mine = frozenset(self._index_of[r] for r in senders if r in self._index_of)
        return [(self._members[src], key, data)
                for src, key, data in self.log.originals_for(self._rank, mine)]

    def Split(self, color: int = 0, key: int = 0) -> Any:  # noqa: N802
        raise UnsupportedCall("Split of a communicator that is itself a split is not "
                              "protected; split rt.comm (or the full grid) with a finer colour")

    def _derive(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedCall("a communicator derived from a split one (Create_cart, Dup, "
                              "Create_dist_graph_adjacent) is not protected; derive it from "
                              "rt.comm, and take a grid's rows with cart.Sub")

    Dup = Clone = Create_dist_graph_adjacent = Create_cart = _derive


class SubCartComm(_CartTopology, SplitComm):
    """A protected sub-grid of a Cartesian communicator (``cart.Sub``)."""

    def __init__(self, parent: ResilientComm, slot: int, color: int, key: int,
                 dims: list[int], periods: list[bool]) -> None:  # noqa: D107
        self._dims, self._periods = list(dims), list(periods)
        super().__init__(parent, slot, color, key)


class DistGraphComm(DerivedComm):
    """A protected distributed-graph communicator
    (``rt.comm.Create_dist_graph_adjacent``): the neighbour lists are kept
    here and the neighbour collectives run as point-to-point messages on
    its own context, so they are logged and replayed like any other."""

    def __init__(self, parent: ResilientComm, slot: int, sources: Any, destinations: Any,
                 sourceweights: Any = None, destweights: Any = None) -> None:  # noqa: D107
        size = parent.Get_size()
        self._sources = [int(r) for r in sources]
        self._dests = [int(r) for r in destinations]
        for r in self._sources + self._dests:
            if not 0 <= r < size:
                raise UnsupportedCall(f"Create_dist_graph_adjacent: rank {r} is not in 0..{size - 1}")
        weighted = sourceweights is not None and sourceweights is not MPI.UNWEIGHTED
        self._weights = ((list(sourceweights), list(destweights)) if weighted else None)
        super().__init__(parent, slot)

    def Get_topology(self) -> int:  # noqa: N802
        return MPI.DIST_GRAPH

    @property
    def topology(self) -> int:
        return MPI.DIST_GRAPH

    def Get_dist_neighbors_count(self) -> tuple[int, int, bool]:  # noqa: N802
        return len(self._sources), len(self._dests), self._weights is not None

    def Get_dist_neighbors(self) -> tuple[list[int], list[int], Any]:  # noqa: N802
        return list(self._sources), list(self._dests), self._weights

    @property
    def inedges(self) -> list[int]:
        return list(self._sources)

    @property
    def outedges(self) -> list[int]:
        return list(self._dests)

    @property
    def indegree(self) -> int:
        return len(self._sources)

    @property
    def outdegree(self) -> int:
        return len(self._dests)

    # -- neighbour collectives over the lists, in list order ---------------------
    def _exchange(self, sends: list[Any], recvs: list[Any]) -> None:
        tag = _neighbour_tag()
        reqs = [self.Irecv(buf, src, tag) for src, buf in zip(self._sources, recvs)]
        reqs += [self.Isend(buf, dst, tag) for dst, buf in zip(self._dests, sends)]
        self.Waitall(reqs)

    def Neighbor_allgather(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        """Send ``sendbuf`` to every destination; block i of ``recvbuf`` from source i."""
        blocks = _blocks(recvbuf, len(self._sources), "Neighbor_allgather")
        self._exchange([sendbuf] * len(self._dests), blocks)

    def Neighbor_alltoall(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        """Block j of ``sendbuf`` to destination j; block i of ``recvbuf`` from source i."""
        self._exchange(_blocks(sendbuf, len(self._dests), "Neighbor_alltoall"),
                       _blocks(recvbuf, len(self._sources), "Neighbor_alltoall"))

    def Neighbor_allgatherv(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        """Send ``sendbuf`` to every destination; source i's message lands in
        block i of the vector spec ``recvbuf`` (``[array, counts, displs,
        datatype]``, displacements in elements)."""
        self._exchange([sendbuf] * len(self._dests),
                       _vblocks(recvbuf, len(self._sources), "Neighbor_allgatherv"))

    def Neighbor_alltoallv(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        """Block j of the vector spec ``sendbuf`` to destination j, block i of
        ``recvbuf`` from source i (``[array, counts, displs, datatype]``,
        displacements in elements of the datatype)."""
        self._exchange(_vblocks(sendbuf, len(self._dests), "Neighbor_alltoallv"),
                       _vblocks(recvbuf, len(self._sources), "Neighbor_alltoallv"))

    def Neighbor_alltoallw(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        """As ``Neighbor_alltoallv`` with a datatype per neighbour and
        displacements in bytes (``[array, (counts, displs), datatypes]``)."""
        self._exchange(_vblocks(sendbuf, len(self._dests), "Neighbor_alltoallw", w=True),
                       _vblocks(recvbuf, len(self._sources), "Neighbor_alltoallw", w=True))

    def neighbor_allgather(self, sendobj: Any) -> list[Any]:
        tag = _neighbour_tag()
        reqs = [self.irecv(source=src, tag=tag) for src in self._sources]
        sreqs = [self.isend(sendobj, dst, tag) for dst in self._dests]
        out = [r.wait() for r in reqs]
        for r in sreqs:
            r.wait()
        return out

    def neighbor_alltoall(self, sendobjs: Any) -> list[Any]:
        sendobjs = list(sendobjs)
        if len(sendobjs) != len(self._dests):
            raise UnsupportedCall(f"neighbor_alltoall: {len(sendobjs)} objects for "
                                  f"{len(self._dests)} destinations")
        tag = _neighbour_tag()
        reqs = [self.irecv(source=src, tag=tag) for src in self._sources]
        sreqs = [self.isend(obj, dst, tag) for dst, obj in zip(self._dests, sendobjs)]
        out = [r.wait() for r in reqs]
        for r in sreqs:
            r.wait()
        return out


def _split(parent: ResilientComm, color: int, key: int) -> Any:
    """``parent.Split(color, key)``, protected (``MPI.COMM_NULL`` for
    ``MPI.UNDEFINED``). Collective over ``parent``."""
    root = getattr(parent, "_root", parent)
    comm = SplitComm(parent, root._slot("Split"), color, key)
    return MPI.COMM_NULL if comm.is_null else comm


def _blocks(buf: Any, n: int, call: str) -> list[Any]:
    import numpy as np

    arr = buf[0] if isinstance(buf, (list, tuple)) else buf
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
        raise UnsupportedCall(f"{call}: buffers must be contiguous numpy arrays")
    if n == 0:
        return []
    flat = arr.reshape(-1)
    if flat.size % n:
        raise UnsupportedCall(f"{call}: {flat.size} elements do not split into {n} blocks")
    return list(flat.reshape(n, -1))


def _vblocks(buf: Any, n: int, call: str, w: bool = False) -> list[Any]:
    """A vector spec's n blocks as buffers the point-to-point calls log
    exactly: a byte slice for a predefined datatype, ``[bytes from the
    displacement, count, datatype]`` for a derived one. The forms are
    mpi4py's: ``[array, counts, displs, type(s)]``, ``[array, (counts,
    displs), type(s)]``, ``[array, counts, type]`` or ``[array, counts]``
    (displacements packed one after another); for ``w`` the displacements
    are in bytes and there is one datatype per block."""
    import numpy as np
    from mpi4py.util.dtlib import from_numpy_dtype

    forms = ("[array, counts, displs, datatypes]" if w else
             "[array, counts, displs, datatype] or [array, counts]")
    if not (isinstance(buf, (list, tuple)) and 2 <= len(buf) <= 4
            and isinstance(buf[0], np.ndarray)):
        raise UnsupportedCall(f"{call}: give each buffer as {forms} over a numpy array")
    arr, rest = buf[0], list(buf[1:])
    if not arr.flags.c_contiguous:
        raise UnsupportedCall(f"{call}: buffers must be contiguous numpy arrays")
    if isinstance(rest[0], tuple) and len(rest[0]) == 2 and not np.isscalar(rest[0][0]):
        counts, displs = rest.pop(0)
    else:
        counts = rest.pop(0)
        displs = rest.pop(0) if len(rest) == 2 or (rest and not _datatypes(rest[0])) else None
    types = rest[0] if rest else None
    counts = [int(c) for c in counts]
    if len(counts) != n or (displs is not None and len(displs) != n):
        raise UnsupportedCall(f"{call}: {len(counts)} counts for {n} neighbours")
    if w:
        if displs is None or not _datatypes(types) or len(types) != n:
            raise UnsupportedCall(f"{call}: give {forms}, with {n} byte displacements "
                                  f"and {n} datatypes")
    else:
        if types is not None and not isinstance(types, MPI.Datatype):
            raise UnsupportedCall(f"{call}: give one datatype ({forms}); a datatype per "
                                  "neighbour is Neighbor_alltoallw")
        types = [from_numpy_dtype(arr.dtype) if types is None else types] * n
        if displs is None:
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    raw = arr.reshape(-1).view(np.uint8)
    out = []
    for count, displ, dt in zip(counts, displs, types):
        extent = dt.Get_extent()[1]
        start = int(displ) * (1 if w else extent)
        if dt.is_predefined:
            if start + count * extent > raw.size:
                raise UnsupportedCall(f"{call}: a block of {count} items at {start} bytes "
                                      f"overruns a buffer of {raw.size} bytes")
            out.append(raw[start:start + count * extent])
        else:
            out.append([raw[start:], count, dt])
    return out


def _datatypes(obj: Any) -> bool:
    return isinstance(obj, MPI.Datatype) or (
        isinstance(obj, (list, tuple)) and bool(obj) and all(isinstance(t, MPI.Datatype) for t in obj))


def _neighbour_tag() -> int:
    """Neighbour collectives use the tag below the reserved TAG_UB (on the
    derived communicator's own context, which nothing else uses)."""
    from ulfmpy._comm_coll import _reserved_tag

    return _reserved_tag(None) - 1
