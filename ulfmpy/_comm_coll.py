"""Collective calls of the resilient communicator (a mixin).

:class:`_Collectives` holds ``Allreduce``/``Bcast``/``Barrier``/``Allgather``
and their lowercase forms, all run, logged or replayed by ``_collective``.
:class:`~ulfmpy.comm.ResilientComm` inherits them; they use its state and
plumbing (``_guard``, ``_voided``, ``_diverged``, ``log``, ``_ctr``, ...).
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
from mpi4py import MPI

from ulfmpy.msglog import _array, _digest, _pickle


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

    def allgather(self, sendobj: Any) -> list[Any]:
        contrib = _pickle(sendobj) if self.mode != "off" else b""
        return self._collective("allgather", contrib, lambda c: c.allgather(sendobj), _pickle,
                                lambda d: [sendobj] * self._size if d is None else pickle.loads(d))


def _tree_allreduce(comm: MPI.Comm, obj: Any, op: Any) -> Any:
    """``comm.allreduce(obj, op)`` for Python objects, over ``comm`` itself.

    mpi4py runs its lowercase reductions as point-to-point messages on a
    duplicate of the communicator it keeps privately; a revoke of ``comm``
    never reaches that duplicate, so after a failure a rank waiting there for
    a live peer that had gone on to the repair waited for ever (the hang of a
    killed rank under a per-step ``allreduce``). This reduces over the same
    binomial tree, so results are bitwise those of mpi4py, with messages on
    ``comm`` (tag ``TAG_UB``, which receives in a segment cannot match: they
    name their tag), then broadcasts. Collective over ``comm``.
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    if size == 1:
        return pickle.loads(pickle.dumps(obj))
    tag = _reserved_tag(comm)
    result, mask = obj, 1
    while mask < size:
        if rank & mask:
            comm.send(result, dest=rank & ~mask, tag=tag)
            break
        if rank | mask < size:
            result = op(result, comm.recv(source=rank | mask, tag=tag))
        mask <<= 1
    return comm.bcast(result if rank == 0 else None, root=0)


_TAG: list[int] = []


def _reserved_tag(comm: MPI.Comm) -> int:
    """The largest tag (MPI attaches ``TAG_UB`` to ``COMM_WORLD``; 32767 is the
    least the standard allows)."""
    if not _TAG:
        tag = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)
        _TAG.append(int(tag) if tag else 32767)
    return _TAG[0]
