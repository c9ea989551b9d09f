"""The request a :class:`~ulfmpy.comm.ResilientComm` nonblocking call returns."""

from __future__ import annotations

from typing import Any, Sequence

from ulfmpy.errors import UnsupportedCall

__all__ = ["Request"]


class Request:
    """A request returned by :class:`ResilientComm` nonblocking calls.

    Use its ``Wait``/``Test`` (or ``Request.Waitall`` /
    ``ResilientComm.Waitall``) — not ``MPI.Request.Waitall``, which cannot
    see the logging this request does on completion.
    """

    __slots__ = ("_comm", "_req", "_done", "_on_complete", "_value", "_call")

    def __init__(self, comm: Any, req: Any, call: str,  # the ResilientComm (no import: no cycle)
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
