"""Point-to-point calls of the resilient communicator (a mixin).

:class:`_PointToPoint` holds ``Send``/``Recv``/``Isend``/``Irecv``/``Sendrecv``,
their lowercase (pickled object) forms and ``Waitall``, with the checks and
replay comparisons they share. :class:`~ulfmpy.comm.ResilientComm` inherits
them; they use its state (``_comm``, ``_replay_comm``, ``mode``, ``log``,
``_ctr``, ``outcome``, ...) and its plumbing (``_guard``, ``_fail``,
``_voided``, ``_live``, ``_diverged``), so the calls cost what they did
as methods defined in the class itself.
"""

from __future__ import annotations

import pickle
from typing import Any, Sequence

import numpy as np
from mpi4py import MPI

from ulfmpy._comm_request import Request
from ulfmpy.errors import UnsupportedCall
from ulfmpy.msglog import _array, _pickle, _put, _same

_PROC_NULL, _ANY_SOURCE, _ANY_TAG = MPI.PROC_NULL, MPI.ANY_SOURCE, MPI.ANY_TAG


class _PointToPoint:
    """The point-to-point calls of :class:`~ulfmpy.comm.ResilientComm`."""

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
        # After a failure the step is thrown away; what this rank sends is the
        # placeholder most like what a neighbour sends back (a halo exchange).
        if self._voided():
            return sendobj
        if self.mode == "off":
            out = self._guard("sendrecv", self._comm.sendrecv, sendobj, dest, sendtag,
                              recvbuf, source, recvtag, status)
            return sendobj if self._voided() else out
        rreq = self.irecv(recvbuf, source, recvtag) if source != MPI.PROC_NULL else None
        sreq = self.isend(sendobj, dest, sendtag) if dest != MPI.PROC_NULL else None
        out = rreq.wait() if rreq is not None else None
        if sreq is not None:
            sreq.wait()
        return sendobj if self._voided() else out

    @staticmethod
    def Waitall(requests: Sequence[Request], statuses: Any = None) -> bool:  # noqa: N802
        """Complete all requests. Local."""
        return Request.Waitall(requests)
