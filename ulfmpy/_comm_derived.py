"""Communicators derived from ``rt.comm`` (docs/internals.md, "Derived communicators").

``rt.comm.Create_cart(...)`` and ``rt.comm.Dup()`` return communicators
over the same ranks that are protected like ``rt.comm`` itself: their
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

from typing import Any

from mpi4py import MPI

from ulfmpy._comm_handle import set_handle
from ulfmpy.comm import ResilientComm
from ulfmpy.errors import UnsupportedCall
from ulfmpy.msglog import MessageLog, _Counters

__all__ = ["DerivedComm", "CartComm"]


def _shared(name: str) -> property:
    """An attribute every member of the family shares: the root's."""

    def get(self: "DerivedComm") -> Any:
        return getattr(self._root, name)

    def put(self: "DerivedComm", value: Any) -> None:
        setattr(self._root, name, value)

    return property(get, put)


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
        self.log = MessageLog()
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

    def Free(self) -> None:  # noqa: N802
        """Kept until the run ends: the context belongs to the runtime's pool."""

    # The driver calls belong to the root: one family, one segment.
    def begin_segment(self, steps: int = 0) -> None:
        raise UnsupportedCall("segments are driven on rt.comm, not on a derived communicator")

    begin_replay = end_replay = end_segment = fetch_originals = begin_segment


class CartComm(DerivedComm):
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

    # -- the topology, with MPI's row-major semantics ---------------------------
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

    def Sub(self, remain_dims: Any) -> Any:  # noqa: N802
        raise UnsupportedCall(
            "Cartcomm.Sub gives a communicator over a subset of the ranks, which ulfmpy "
            "does not protect yet; use the full grid with Shift, or rt.comm's collectives")
