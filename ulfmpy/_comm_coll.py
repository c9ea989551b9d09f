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
