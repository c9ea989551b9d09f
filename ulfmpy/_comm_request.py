"""The request a :class:`~ulfmpy.comm.ResilientComm` nonblocking call returns.

It is an ``mpi4py.MPI.Request`` (a subclass holding the same MPI handle), so
``MPI.Request.Waitall(reqs)`` and the other completion calls of mpi4py work
on it. What a receive must log on completion happens in three places, the
first that applies (docs/internals.md, "Requests"):

1. its own ``Wait``/``Test``, or this class's ``Waitall``/``Waitany``/
   ``Waitsome``/``Testall``/... (inside ``rt.loop`` the name
   ``MPI.Request`` is this class, so ``MPI.Request.Waitall`` is these);
2. otherwise, at the next call on its communicator or at the segment's
   boundary, which find it completed (its handle is ``REQUEST_NULL``) and
   log the receive buffer then. A receive buffer the app changes between
   a completion by mpi4py's own class and that point is logged as changed;
   the README's porting rules say so.
"""

from __future__ import annotations

from typing import Any, Sequence

from mpi4py import MPI

from ulfmpy.errors import UnsupportedCall

__all__ = ["Request"]

_MPIRequest = MPI.Request  # the class itself: MPI.Request may name ours inside rt.loop
_NULL = MPI.REQUEST_NULL
_new = _MPIRequest.__new__


class Request(_MPIRequest):
    """A request returned by :class:`ResilientComm` nonblocking calls. Local."""

    # _comm: the ResilientComm (no import: no cycle); _keep: the request
    # mpi4py returned (it holds the buffers alive); _lower: a pickled-object
    # request, completed through mpi4py's own object, which unpickles.
    __slots__ = ("_comm", "_call", "_on_complete", "_value", "_keep", "_lower")

    def __init__(self, request: Any = None) -> None:  # noqa: D107 (mpi4py's constructor)
        self._comm = self._on_complete = self._value = self._keep = None
        self._call, self._lower = "Request", False

    @classmethod
    def make(cls, comm: Any, req: Any, call: str, on_complete: Any = None,
             value: Any = None) -> "Request":
        """Wrap ``req`` (None: nothing to wait for). ``on_complete(value,
        status)`` logs what arrived, once, whoever completes the request.

        A lowercase (pickled object) request keeps mpi4py's own request,
        which unpickles, and completes through it; it holds no handle itself.
        """
        lower = call.islower()
        # mpi4py's constructor copies the handle; ours (for Request() calls
        # outside ulfmpy) is skipped: every slot is set here, once.
        self = _new(cls, req if req is not None and not lower else _NULL)
        self._comm, self._call, self._value, self._lower, self._keep = \
            comm, call, value, lower, req
        if req is not None and on_complete is not None:
            self._on_complete = on_complete
            comm._pending.append(self)
        else:
            self._on_complete = None
        return self

    def _finish(self, value: Any = None, status: Any = None) -> Any:
        cb = self._on_complete
        if cb is not None:
            self._on_complete = None
            out = cb(value, status)
            if out is not None:
                self._value = out
        elif value is not None:
            self._value = value
        return self._value

    def _settled(self) -> bool:
        """Whether nothing is left to log; logs a receive mpi4py completed."""
        if self._on_complete is None:
            return True
        if not self._lower and _MPIRequest.__eq__(self, _NULL):
            self._comm._root._late += 1  # mpi4py's own class completed it: logged late
            self._finish()
            return True
        return False

    def Wait(self, status: Any = None) -> bool:  # noqa: N802 (mpi4py names)
        """Complete the request. Local (completes a point-to-point operation)."""
        self.wait(status)
        return True

    def wait(self, status: Any = None) -> Any:
        """Complete the request and return the received object (lowercase irecv)."""
        comm = self._comm
        if comm is None:
            return _MPIRequest.wait(self, status)
        if comm._voided():
            self._on_complete = None
            return self._value
        if status is None and self._on_complete is not None:
            status = MPI.Status()
        if self._lower:
            if self._keep is None:
                return self._value
            value = comm._guard(self._call + ".wait", self._keep.wait, status)
            self._keep = None
        elif _MPIRequest.__eq__(self, _NULL):
            self._settled()  # nothing to wait for, or mpi4py completed it
            return self._value
        else:
            value = comm._guard(self._call + ".Wait", _MPIRequest.Wait, self, status)
            value = None
        if comm._voided():
            self._on_complete = None
            return self._value
        return self._finish(value, status)

    def Test(self, status: Any = None) -> bool:  # noqa: N802
        """Return True and finish the request if it completed. Local."""
        flag, _ = self.test(status)
        return flag

    def test(self, status: Any = None) -> tuple[bool, Any]:
        comm = self._comm
        if comm is None:
            return _MPIRequest.test(self, status)
        if comm._voided():
            self._on_complete = None
            return True, self._value
        if status is None and self._on_complete is not None:
            status = MPI.Status()
        if self._lower:
            if self._keep is None:
                return True, self._value
            out = comm._guard(self._call + ".test", self._keep.test, status)
        elif _MPIRequest.__eq__(self, _NULL):
            self._settled()
            return True, self._value
        else:
            out = comm._guard(self._call + ".Test", _MPIRequest.Test, self, status), None
        if comm._voided() or out is None:
            self._on_complete = None
            return True, self._value
        flag, value = out
        if not flag:
            return False, None
        if self._lower:
            self._keep = None
        return True, self._finish(value, status)

    # -- completion of many (mpi4py's names) ------------------------------
    @staticmethod
    def Waitall(requests: Sequence[Any], statuses: Any = None) -> bool:  # noqa: N802
        """Complete every request (ulfmpy's and mpi4py's). Local."""
        for r in requests:
            if isinstance(r, Request):
                _wait_each(requests, statuses)
                return True
        # None of ulfmpy's (a communicator the app made itself): mpi4py's own call.
        return _MPIRequest.Waitall(requests, statuses)

    @staticmethod
    def waitall(requests: Sequence[Any], statuses: Any = None) -> list[Any]:
        """Complete every request; the received objects, in order. Local."""
        return _wait_each(requests, statuses)

    @staticmethod
    def Testall(requests: Sequence[Any], statuses: Any = None) -> bool:  # noqa: N802
        """Test every request; True when all have completed. Local."""
        return all(_test(r, statuses, i)[0] for i, r in enumerate(requests))

    @staticmethod
    def testall(requests: Sequence[Any], statuses: Any = None) -> tuple[bool, list[Any] | None]:
        done = [_test(r, statuses, i) for i, r in enumerate(requests)]
        if all(f for f, _ in done):
            return True, [v for _, v in done]
        return False, None

    @staticmethod
    def Waitany(requests: Sequence[Any], status: Any = None) -> int:  # noqa: N802
        """Complete one request; its index (``UNDEFINED`` if none is active). Local.

        ulfmpy's requests complete in list order here (the first still
        active), so replay sees the order the original run saw.
        """
        for i, r in enumerate(requests):
            if _active(r):
                _wait_one(r, status)
                return i
        return MPI.UNDEFINED

    @staticmethod
    def waitany(requests: Sequence[Any], status: Any = None) -> tuple[int, Any]:
        for i, r in enumerate(requests):
            if _active(r):
                return i, _wait_one(r, status)
        return MPI.UNDEFINED, None

    @staticmethod
    def Waitsome(requests: Sequence[Any], statuses: Any = None) -> list[int] | None:  # noqa: N802
        """Complete at least one request; the indices completed. Local."""
        i = Request.Waitany(requests)
        return None if i == MPI.UNDEFINED else [i]

    @staticmethod
    def Testany(requests: Sequence[Any], status: Any = None) -> tuple[int, bool]:  # noqa: N802
        for i, r in enumerate(requests):
            if _active(r):
                flag, _ = _test(r, None, 0, status)
                return (i, True) if flag else (MPI.UNDEFINED, False)
        return MPI.UNDEFINED, True


def _active(r: Any) -> bool:
    if isinstance(r, Request) and r._comm is not None and r._lower:
        return r._keep is not None
    return not _MPIRequest.__eq__(r, _NULL) or (
        isinstance(r, Request) and r._on_complete is not None)


def _wait_one(r: Any, status: Any) -> Any:
    if isinstance(r, Request):
        return r.wait(status)
    if isinstance(r, _MPIRequest):
        return r.wait(status)
    return _bad(r)


def _wait_each(requests: Sequence[Any], statuses: Any) -> list[Any]:
    if statuses is not None and len(statuses) < len(requests):
        raise ValueError("Waitall: fewer statuses than requests")
    comm = None
    for r in requests:
        if type(r) is not Request or r._comm is None or r._lower:
            break
        comm = r._comm
    else:
        if comm is not None:
            return _wait_batch(comm, requests, statuses)
    return [_wait_one(r, statuses[i] if statuses is not None else None)
            for i, r in enumerate(requests)]


def _wait_batch(comm: Any, requests: Sequence[Request], statuses: Any) -> list[Any]:
    """ulfmpy's handle requests (one communicator family: one failure, one
    segment): one MPI_Waitall, then each logs what it received."""
    if not comm._voided():
        st = statuses
        if st is None:
            for r in requests:
                if r._on_complete is not None:
                    st = comm._root._statuses(len(requests))
                    break
        try:
            _MPIRequest.Waitall(requests, st)
        except MPI.Exception as exc:
            comm._fail("Request.Waitall", exc)  # returns only when the failure voids the step
        else:
            if st is None:
                out = [r._value for r in requests]
            else:
                out = [r._value if r._on_complete is None else r._finish(None, st[i])
                       for i, r in enumerate(requests)]
            root = comm._root
            if root._pending:  # they are logged: the next call need not look at them
                root._pending = [r for r in root._pending if r._on_complete is not None]
            return out
    for r in requests:
        r._on_complete = None
    return [r._value for r in requests]


def _test(r: Any, statuses: Any, i: int, status: Any = None) -> tuple[bool, Any]:
    st = statuses[i] if statuses is not None else status
    if isinstance(r, Request):
        return r.test(st)
    if isinstance(r, _MPIRequest):
        return r.test(st)
    return _bad(r)


def _bad(r: Any) -> Any:
    raise UnsupportedCall(f"Request.Waitall: got {type(r).__name__}; pass the requests "
                          "the communicator's nonblocking calls returned")
