"""Collective calls of the resilient communicator (a mixin).

:class:`_Collectives` holds ``Allreduce``/``Bcast``/``Barrier``/``Allgather``,
``Reduce``/``Gather(v)``/``Scatter(v)``/``Allgatherv``/``Alltoall(v)``/
``Reduce_scatter(_block)``/``Scan``/``Exscan`` and their lowercase forms,
all run, logged or replayed by ``_collective``: this rank's contribution is
digested, its result logged, and replay hands the logged result back.
:class:`~ulfmpy.comm.ResilientComm` inherits them; they use its state and
plumbing (``_guard``, ``_voided``, ``_diverged``, ``log``, ``_ctr``, ...).
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
from mpi4py import MPI

from ulfmpy.msglog import _array, _digest, _payload, _pickle


class _Collectives:
    """The collective calls of :class:`~ulfmpy.comm.ResilientComm`."""

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
        if self._pending:
            self._settle()
        # A call that fails returns the same placeholder as the calls after it
        # (this rank's own contribution for the lowercase forms), never None:
        # the step's results are thrown away, but the code that uses them
        # (``total = comm.allreduce(x); u += total``) must not fail meanwhile.
        if self.mode == "off":
            value = self._guard(call, live, self._comm)
            return apply_logged(None) if self._voided() else value
        seq = self._ctr.next_coll()
        digest = _digest(contribution)
        if self.mode == "live":
            value = self._guard(call, live, self._comm)
            if self._voided():
                return apply_logged(None)
            self.log.collectives.append((call, digest, result_of(value)))
            return value
        if self._all_in_S:
            value = self._guard(call, live, self._replay_comm)
            return apply_logged(None) if self._voided() else value
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
        return self._collective("allreduce", contrib, lambda c: _tree_allreduce(c, sendobj, op),
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


    # -- the rest of MPI's collectives: one pattern ------------------------------
    def _buffers(self, call: str, sendbuf: Any, recvbuf: Any, run: Any, *,
                 sends: bool = True, receives: bool = True) -> None:
        """A buffer collective: ``sends``/``receives`` say whether this rank's
        send and receive buffers take part (a root's, for rooted calls)."""
        rb, contrib = None, b""
        if self.mode != "off":
            if receives and recvbuf is not None:
                rb = _array(recvbuf, call)
            if sendbuf is MPI.IN_PLACE:
                contrib = np.array(rb, copy=True) if rb is not None else b""
            elif sends and sendbuf is not None:
                contrib = _contribution(sendbuf, call)

        def apply(logged: Any) -> None:
            if logged is not None and rb is not None:
                np.copyto(rb, logged)

        self._collective(call, contrib, run, lambda _: None if rb is None else rb.copy(), apply)

    def Reduce(self, sendbuf: Any, recvbuf: Any, op: Any = MPI.SUM, root: int = 0) -> None:  # noqa: N802
        me = self._rank == root
        self._buffers("Reduce", sendbuf, recvbuf if me else None,
                      lambda c: c.Reduce(sendbuf, recvbuf, op, root), receives=me)

    def Gather(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        me = self._rank == root
        self._buffers("Gather", sendbuf, recvbuf if me else None,
                      lambda c: c.Gather(sendbuf, recvbuf, root), receives=me)

    def Gatherv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        me = self._rank == root
        self._buffers("Gatherv", sendbuf, recvbuf if me else None,
                      lambda c: c.Gatherv(sendbuf, recvbuf, root), receives=me)

    def Scatter(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        me = self._rank == root
        self._buffers("Scatter", sendbuf if me else None, recvbuf,
                      lambda c: c.Scatter(sendbuf, recvbuf, root), sends=me)

    def Scatterv(self, sendbuf: Any, recvbuf: Any, root: int = 0) -> None:  # noqa: N802
        me = self._rank == root
        self._buffers("Scatterv", sendbuf if me else None, recvbuf,
                      lambda c: c.Scatterv(sendbuf, recvbuf, root), sends=me)

    def Allgatherv(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        self._buffers("Allgatherv", sendbuf, recvbuf, lambda c: c.Allgatherv(sendbuf, recvbuf))

    def Alltoall(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        self._buffers("Alltoall", sendbuf, recvbuf, lambda c: c.Alltoall(sendbuf, recvbuf))

    def Alltoallv(self, sendbuf: Any, recvbuf: Any) -> None:  # noqa: N802
        self._buffers("Alltoallv", sendbuf, recvbuf, lambda c: c.Alltoallv(sendbuf, recvbuf))

    def Reduce_scatter_block(self, sendbuf: Any, recvbuf: Any, op: Any = MPI.SUM) -> None:  # noqa: N802
        self._buffers("Reduce_scatter_block", sendbuf, recvbuf,
                      lambda c: c.Reduce_scatter_block(sendbuf, recvbuf, op))

    def Reduce_scatter(self, sendbuf: Any, recvbuf: Any, recvcounts: Any = None,
                       op: Any = MPI.SUM) -> None:  # noqa: N802
        self._buffers("Reduce_scatter", sendbuf, recvbuf,
                      lambda c: c.Reduce_scatter(sendbuf, recvbuf, recvcounts, op))

    def Scan(self, sendbuf: Any, recvbuf: Any, op: Any = MPI.SUM) -> None:  # noqa: N802
        self._buffers("Scan", sendbuf, recvbuf, lambda c: c.Scan(sendbuf, recvbuf, op))

    def Exscan(self, sendbuf: Any, recvbuf: Any, op: Any = MPI.SUM) -> None:  # noqa: N802
        self._buffers("Exscan", sendbuf, recvbuf, lambda c: c.Exscan(sendbuf, recvbuf, op))

    # -- lowercase --------------------------------------------------------------
    def _objects(self, call: str, contrib: Any, run: Any, placeholder: Any) -> Any:
        """A lowercase collective; after a failure the placeholder stands in
        (the step is thrown away, the code using the result must not fail)."""
        data = _pickle(contrib) if self.mode != "off" else b""
        return self._collective(call, data, run, _pickle,
                                lambda d: placeholder() if d is None else pickle.loads(d))

    def gather(self, sendobj: Any, root: int = 0) -> Any:
        me = self._rank == root
        return self._objects("gather", sendobj, lambda c: c.gather(sendobj, root),
                             lambda: [sendobj] * self._size if me else None)

    def scatter(self, sendobj: Any, root: int = 0) -> Any:
        me = self._rank == root
        last = getattr(self, "_last_scatter", None)

        def run(c: Any) -> Any:
            out = c.scatter(sendobj, root)
            self._last_scatter = out
            return out

        return self._objects("scatter", sendobj if me else None, run,
                             lambda: sendobj[self._rank] if me and sendobj is not None else last)

    def alltoall(self, sendobj: Any) -> Any:
        return self._objects("alltoall", sendobj, lambda c: c.alltoall(sendobj),
                             lambda: list(sendobj))

    def allgather(self, sendobj: Any) -> list[Any]:
        return self._objects("allgather", sendobj, lambda c: c.allgather(sendobj),
                             lambda: [sendobj] * self._size)

    def reduce(self, sendobj: Any, op: Any = MPI.SUM, root: int = 0) -> Any:
        me = self._rank == root
        return self._objects("reduce", sendobj, lambda c: _tree_reduce(c, sendobj, op, root),
                             lambda: sendobj if me else None)

    def scan(self, sendobj: Any, op: Any = MPI.SUM) -> Any:
        return self._objects("scan", sendobj, lambda c: _prefix(c, sendobj, op, False),
                             lambda: sendobj)

    def exscan(self, sendobj: Any, op: Any = MPI.SUM) -> Any:
        return self._objects("exscan", sendobj, lambda c: _prefix(c, sendobj, op, True),
                             lambda: sendobj if self._rank else None)


def _contribution(buf: Any, call: str) -> Any:
    """What a rank puts into a collective: the datatype's elements, or for a
    vector spec ``[array, counts, displs, datatype]`` the whole array."""
    def vector(m: Any) -> bool:  # per-rank counts or displacements, not one count
        return isinstance(m, (list, np.ndarray)) or (
            isinstance(m, tuple) and not all(isinstance(x, (int, np.integer)) for x in m))

    if isinstance(buf, (list, tuple)) and any(vector(m) for m in buf[1:-1]):
        return _array(buf, call)
    return _payload(buf, call)


# mpi4py runs its lowercase reductions (reduce, allreduce, scan, exscan) as
# point-to-point messages on a duplicate of the communicator it keeps
# privately; a revoke of the communicator never reaches that duplicate, so
# after a failure a rank waiting there for a live peer that had gone on to
# the repair waited for ever (the hang of a killed rank under a per-step
# ``allreduce``). These run the same trees (results bitwise mpi4py's) with
# messages on the communicator itself, tag ``TAG_UB``, which receives in a
# segment cannot match: those name their source and never use the largest
# tag. Collective over ``comm``.

def _reduce_to_zero(comm: MPI.Comm, obj: Any, op: Any, tag: int) -> Any:
    size, rank = comm.Get_size(), comm.Get_rank()
    result, mask = obj, 1
    while mask < size:
        if rank & mask:
            comm.send(result, dest=rank & ~mask, tag=tag)
            break
        if rank | mask < size:
            result = op(result, comm.recv(source=rank | mask, tag=tag))
        mask <<= 1
    return result


def _tree_reduce(comm: MPI.Comm, obj: Any, op: Any, root: int) -> Any:
    """``comm.reduce(obj, op, root)``: the binomial tree to rank 0, then to the root."""
    if comm.Get_size() == 1:
        return pickle.loads(pickle.dumps(obj))
    tag, rank = _reserved_tag(comm), comm.Get_rank()
    result = _reduce_to_zero(comm, obj, op, tag)
    if root != 0:
        if rank == 0:
            comm.send(result, dest=root, tag=tag)
        elif rank == root:
            result = comm.recv(source=0, tag=tag)
    return result if rank == root else None


def _prefix(comm: MPI.Comm, obj: Any, op: Any, exclusive: bool) -> Any:
    """``comm.scan``/``comm.exscan``: recursive doubling, as mpi4py does it."""
    size, rank = comm.Get_size(), comm.Get_rank()
    if size == 1:
        return None if exclusive else pickle.loads(pickle.dumps(obj))
    tag = _reserved_tag(comm)
    partial, result, have = obj, (None if exclusive else obj), not exclusive
    mask = 1
    while mask < size:
        peer = rank ^ mask
        if peer < size:
            got = comm.sendrecv(partial, dest=peer, sendtag=tag, source=peer, recvtag=tag)
            if rank > peer:
                partial = op(got, partial)
                result = op(got, result) if have else got
                have = True
            else:
                partial = op(partial, got)
        mask <<= 1
    return None if exclusive and rank == 0 else result


def _tree_allreduce(comm: MPI.Comm, obj: Any, op: Any) -> Any:
    """``comm.allreduce(obj, op)``: the reduction to rank 0, then a broadcast."""
    if comm.Get_size() == 1:
        return pickle.loads(pickle.dumps(obj))
    result = _reduce_to_zero(comm, obj, op, _reserved_tag(comm))
    return comm.bcast(result if comm.Get_rank() == 0 else None, root=0)

_TAG: list[int] = []


def _reserved_tag(comm: MPI.Comm) -> int:
    """The largest tag (MPI attaches ``TAG_UB`` to ``COMM_WORLD``; 32767 is the
    least the standard allows)."""
    if not _TAG:
        from ulfmpy._comm_handle import genuine_world

        tag = genuine_world().Get_attr(MPI.TAG_UB)
        _TAG.append(int(tag) if tag else 32767)
    return _TAG[0]
