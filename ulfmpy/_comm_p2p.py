"""Point-to-point calls of the resilient communicator (a mixin).

:class:`_PointToPoint` holds ``Send``/``Recv``/``Isend``/``Irecv``/``Sendrecv``
(with the ``Ssend``/``Bsend``/``Rsend`` modes, ``Sendrecv_replace``,
``Probe``/``Iprobe``), their lowercase (pickled object) forms and
``Waitall``, with the checks and replay comparisons they share.
:class:`~ulfmpy.comm.ResilientComm` inherits them; they use its state
(``_comm``, ``_replay_comm``, ``mode``, ``log``, ``_ctr``, ``outcome``, ...)
and its plumbing (``_guard``, ``_fail``, ``_voided``, ``_live``,
``_diverged``, ``_settle``), so the calls cost what they did as methods
defined in the class itself.

Wildcards (docs/internals.md, "Wildcards and datatypes"): a receive with
``ANY_TAG`` from a named source logs into that source's ANY_TAG channel with
the tag each message had; messages from one source arrive in the order
they were sent, so replay is deterministic. A blocking receive with
``ANY_SOURCE`` logs the source it matched; replay takes the same source.
A nonblocking ``ANY_SOURCE`` receive (the match depends on timing, not on
the program) is refused inside a segment. A buffer ``[array, count,
datatype]`` logs the datatype's elements only (the bytes on the wire).
"""

from __future__ import annotations

import pickle
from typing import Any, Sequence

import numpy as np
from mpi4py import MPI

from ulfmpy._comm_request import Request
from ulfmpy.errors import UnsupportedCall
from ulfmpy.msglog import _check_buffer, _deliver, _layout, _payload, _pickle, _put, _same

_PROC_NULL, _ANY_SOURCE, _ANY_TAG = MPI.PROC_NULL, MPI.ANY_SOURCE, MPI.ANY_TAG
_ndarray = np.ndarray


def _fill_status(status: Any, source: int, tag: int | None, data: Any) -> None:
    """Answer a status from the log, as the original receive filled it."""
    if status is None:
        return
    status.Set_source(source)
    if tag is not None:
        status.Set_tag(tag)
    if data is not None:
        n = data.nbytes if isinstance(data, np.ndarray) else len(data)
        status.Set_elements(MPI.BYTE, n)


class _PointToPoint:
    """The point-to-point calls of :class:`~ulfmpy.comm.ResilientComm`."""

    # -- shared checks and log access ------------------------------------------
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
        ctr = self._ctr
        key = (dest, tag, ctr.next_send(dest, tag))
        sent = self.log.sent
        orig = sent.get(key)
        if orig is None:
            # The receiver took this source's messages with ANY_TAG: the
            # original is known by its place among all sends to ``dest``.
            orig = sent.get((dest, _ANY_TAG, ctr.last_any))
        if orig is None and not self._have_originals:
            kept = np.array(data, copy=True) if isinstance(data, np.ndarray) else data
            self._resent[key] = (kept, (dest, _ANY_TAG, ctr.last_any))
        elif orig is None or not _same(orig, data):
            # Missing at the receiver means it was not received in this
            # segment (or not in an order known to both): pulling the
            # receiver in is always safe.
            self.outcome.contaminated.add(self._to_root(dest))

    def _logged(self, call: str, source: int, tag: int, seq: int) -> Any:
        data = self.log.get(source, tag, seq)
        if data is None:
            self._diverged(f"{call} from rank {source} tag {tag} #{seq} was not received originally")
        return data

    def _logged_tag(self, source: int, tag: int, seq: int) -> int | None:
        if tag != _ANY_TAG:
            return tag
        ch = self.log.rx.get((source, tag))
        if ch is None or ch.tags is None or seq >= len(ch.tags):
            return None
        return ch.tags[seq]

    def _replay_source(self, call: str) -> int:
        """The source the original ANY_SOURCE receive matched (replay)."""
        k = self._ctr.source
        self._ctr.source = k + 1
        if k >= len(self.log.sources):
            self._diverged(f"{call} with ANY_SOURCE #{k} was not called originally")
            return _PROC_NULL
        return self.log.sources[k]

    def _no_any_source(self, call: str) -> None:
        raise UnsupportedCall(
            f"{call}: ANY_SOURCE in a nonblocking receive cannot be replayed (which "
            "message it matches depends on timing); name the source, or use a blocking "
            "Recv(source=MPI.ANY_SOURCE)")

    def _log_recv(self, buf: Any, source: int, tag: int, status: Any, call: str) -> None:
        """Log what a blocking receive got (live mode); ``status`` is set
        when the source or the tag was a wildcard."""
        if source == _ANY_SOURCE:
            source = status.Get_source()
            self.log.sources.append(source)
        ch, seq = self.log.reserve(source, tag)
        _put(ch, seq, _payload(buf, call))
        if tag == _ANY_TAG:
            ch.tag(seq, status.Get_tag())

    # -- sends (every mode: Send, Ssend, Bsend, Rsend) -------------------------
    def _send(self, call: str, buf: Any, dest: int, tag: int) -> None:
        if self._voided():
            return
        if self._pending:
            self._settle()
        fn = getattr(self._comm, call)
        if self.mode == "off" or dest == _PROC_NULL:
            return self._guard(call, fn, buf, dest, tag)
        if self.mode == "live":
            if type(buf) is not _ndarray:
                _check_buffer(buf, call)
            self._guard(call, fn, buf, dest, tag)
        elif self._live(dest):
            self._ctr.next_send(dest, tag)
            # Ready mode needs the receive posted; in a replay round it may
            # not be yet, and a standard send carries the same bytes.
            self._guard(call, getattr(self._replay_comm, "Send" if call == "Rsend" else call),
                        buf, dest, tag)
        else:
            self._send_token(call, dest, tag, _payload(buf, call))

    def Send(self, buf: Any, dest: int, tag: int = 0) -> None:  # noqa: N802
        self._send("Send", buf, dest, tag)

    def Ssend(self, buf: Any, dest: int, tag: int = 0) -> None:  # noqa: N802
        self._send("Ssend", buf, dest, tag)

    def Bsend(self, buf: Any, dest: int, tag: int = 0) -> None:  # noqa: N802
        self._send("Bsend", buf, dest, tag)

    def Rsend(self, buf: Any, dest: int, tag: int = 0) -> None:  # noqa: N802
        self._send("Rsend", buf, dest, tag)

    def _isend(self, call: str, buf: Any, dest: int, tag: int) -> Request:
        root = self._root
        if root.mode == "live" and root.failure is None and not self._dropped and (
                dest >= 0 or (dest == _PROC_NULL and root.void_on_failure)):
            # The fault-free path of every step, written out for speed (the
            # general path below gives the same result): live sends are
            # neither copied nor counted (see _send_token).
            if root._pending:
                root._settle()
            if dest < 0:
                return Request.make(self, None, call)  # completes at once: no MPI call needed
            if type(buf) is not _ndarray:
                _check_buffer(buf, call)
            try:
                req = getattr(self._comm, call)(buf, dest, tag)
            except MPI.Exception as exc:
                self._fail(call, exc)  # returns only when the failure voids the step
                req = None
            return Request.make(self, req, call)
        if self._voided():
            return Request.make(self, None, call)
        if self._pending:
            self._settle()
        if dest == _PROC_NULL and self.void_on_failure:
            return Request.make(self, None, call)  # completes at once: no MPI call needed
        if self.mode == "off" or dest == _PROC_NULL:
            return self._off_request(call, getattr(self._comm, call), buf, dest, tag)
        if self.mode == "live":
            if type(buf) is not _ndarray:
                _check_buffer(buf, call)
            return Request.make(self, self._guard(call, getattr(self._comm, call), buf, dest, tag),
                                call)
        if self._live(dest):
            self._ctr.next_send(dest, tag)
            fn = getattr(self._replay_comm, "Isend" if call == "Irsend" else call)
            return Request.make(self, self._guard(call, fn, buf, dest, tag), call)
        self._send_token(call, dest, tag, _payload(buf, call))
        return Request.make(self, None, call)

    def Isend(self, buf: Any, dest: int, tag: int = 0) -> Request:  # noqa: N802
        return self._isend("Isend", buf, dest, tag)

    def Issend(self, buf: Any, dest: int, tag: int = 0) -> Request:  # noqa: N802
        return self._isend("Issend", buf, dest, tag)

    def Ibsend(self, buf: Any, dest: int, tag: int = 0) -> Request:  # noqa: N802
        return self._isend("Ibsend", buf, dest, tag)

    def Irsend(self, buf: Any, dest: int, tag: int = 0) -> Request:  # noqa: N802
        return self._isend("Irsend", buf, dest, tag)

    def _off_request(self, call: str, fn: Any, *args: Any) -> Any:
        """Outside segments: mpi4py's own request, unless the loop needs
        failures voided (then one that completes as a no-op after a failure)."""
        req = self._guard(call, fn, *args)
        return Request.make(self, req, call) if self.void_on_failure else req

    # -- receives --------------------------------------------------------------
    def Recv(self, buf: Any, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
             status: Any = None) -> None:  # noqa: N802
        if self._voided():
            return
        if self._pending:
            self._settle()
        if self.mode == "off" or source == _PROC_NULL:
            return self._guard("Recv", self._comm.Recv, buf, source, tag, status)
        if self.mode == "live":
            st = status
            if st is None and (source == _ANY_SOURCE or tag == _ANY_TAG):
                st = MPI.Status()
            self._guard("Recv", self._comm.Recv, buf, source, tag, st)
            if not self._voided():
                self._log_recv(buf, source, tag, st, "Recv")
            return
        if source == _ANY_SOURCE:
            source = self._replay_source("Recv")
            if source == _PROC_NULL:
                return
        seq = self._ctr.next_recv(source, tag)
        if self._live(source):
            self._guard("Recv", self._replay_comm.Recv, buf, source, tag, status)
        else:
            data = self._logged("Recv", source, tag, seq)
            if data is not None:
                _deliver(buf, data, "Recv")
                _fill_status(status, source, self._logged_tag(source, tag, seq), data)

    def Irecv(self, buf: Any, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG) -> Request:  # noqa: N802
        root = self._root
        if root.mode == "live" and root.failure is None and not self._dropped:
            if source >= 0:
                return self._irecv_live(root, buf, source, tag)
            if source == _PROC_NULL and root.void_on_failure:
                if root._pending:
                    root._settle()
                return Request.make(self, None, "Irecv")  # completes at once, receives nothing
        if self._voided():
            return Request.make(self, None, "Irecv")
        if self._pending:
            self._settle()
        if source == _PROC_NULL and self.void_on_failure:
            return Request.make(self, None, "Irecv")  # completes at once, receives nothing
        if self.mode == "off" or source == _PROC_NULL:
            return self._off_request("Irecv", self._comm.Irecv, buf, source, tag)
        if source == _ANY_SOURCE:
            self._no_any_source("Irecv")
        if self.mode == "live":
            return self._irecv_live(self._root, buf, source, tag)
        # The buffer's rules, checked before anything is posted (_payload
        # refuses what is neither an array nor [array, ...]).
        if type(buf) is not _ndarray and _layout(buf, "Irecv") is None:
            _payload(buf, "Irecv")
        seq = self._ctr.next_recv(source, tag)
        if self._live(source):
            return Request.make(self, self._guard("Irecv", self._replay_comm.Irecv, buf, source, tag),
                                "Irecv")
        data = self._logged("Irecv", source, tag, seq)
        if data is not None:
            _deliver(buf, data, "Irecv")
        return Request.make(self, None, "Irecv")

    def _irecv_live(self, root: Any, buf: Any, source: int, tag: int) -> Request:
        """Irecv from a named source in a live segment (the fault-free path
        of every step). The buffer's rules are checked before anything is
        posted; the message is logged (the datatype's elements only) when
        the request completes, under its posting order: messages from one
        source match in that order."""
        if root._pending:
            root._settle()
        if type(buf) is _ndarray:
            arr, lay = buf, None
        else:
            spec = _layout(buf, "Irecv")
            if spec is None:
                arr, lay = _payload(buf, "Irecv"), None  # the array itself
            else:
                arr, lay = spec
        try:
            req = self._comm.Irecv(buf, source, tag)
        except MPI.Exception as exc:
            self._fail("Irecv", exc)  # returns only when the failure voids the step
            return Request.make(self, None, "Irecv")
        ch, seq = self.log.reserve(source, tag)

        def keep(_: Any, status: Any) -> None:
            _put(ch, seq, arr if lay is None else lay.pack(arr))
            if tag == _ANY_TAG:
                ch.tag(seq, status.Get_tag() if status is not None else None)

        return Request.make(self, req, "Irecv", keep)

    def Sendrecv(self, sendbuf: Any, dest: int, sendtag: int = 0, recvbuf: Any = None,
                 source: int = MPI.ANY_SOURCE, recvtag: int = MPI.ANY_TAG,
                 status: Any = None) -> None:  # noqa: N802
        if self._voided():
            return
        if self._pending:
            self._settle()
        mode = self.mode
        if mode != "replay":
            # The hot path of a halo exchange, once per neighbour per step, so
            # it is written flat: one MPI call, at most one copy per direction
            # into the log. Every microsecond here is paid on each neighbour's
            # critical path, twice over when ranks share a core.
            live = mode == "live"
            wild = False
            if live:
                if dest != _PROC_NULL and type(sendbuf) is not _ndarray:
                    _check_buffer(sendbuf, "Sendrecv")  # the same rules as Send
                if source != _PROC_NULL:
                    if type(recvbuf) is not _ndarray:
                        _check_buffer(recvbuf, "Sendrecv")
                    if source == _ANY_SOURCE or recvtag == _ANY_TAG:
                        wild = True
                        if status is None:
                            status = MPI.Status()
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
            if not live or source == _PROC_NULL:
                return
            if wild:
                self._log_recv(recvbuf, source, recvtag, status, "Sendrecv")
                return
            rcv = recvbuf if type(recvbuf) is _ndarray else _payload(recvbuf, "Sendrecv")
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
        if source == _ANY_SOURCE:
            source = self._replay_source("Sendrecv")
        reqs = []
        if source != _PROC_NULL:
            seq = self._ctr.recv.get((source, recvtag), 0)
            reqs.append(self.Irecv(recvbuf, source, recvtag))
            if status is not None and not self._live(source):
                _fill_status(status, source, self._logged_tag(source, recvtag, seq),
                             self.log.get(source, recvtag, seq))
        if dest != _PROC_NULL:
            reqs.append(self.Isend(sendbuf, dest, sendtag))
        Request.waitall(reqs)

    def Sendrecv_replace(self, buf: Any, dest: int, sendtag: int = 0,
                         source: int = MPI.ANY_SOURCE, recvtag: int = MPI.ANY_TAG,
                         status: Any = None) -> None:  # noqa: N802
        if self.mode != "replay":
            if self._voided():
                return
            if self._pending:
                self._settle()
            st = status
            if self.mode == "live" and st is None and (
                    source == _ANY_SOURCE or recvtag == _ANY_TAG):
                st = MPI.Status()
            self._guard("Sendrecv_replace", self._comm.Sendrecv_replace, buf, dest, sendtag,
                        source, recvtag, st)
            if self.mode == "live" and source != _PROC_NULL and not self._voided():
                self._log_recv(buf, source, recvtag, st, "Sendrecv_replace")
            return
        # Replay: what is sent is the buffer as it was before the receive.
        arr = buf if type(buf) is _ndarray else buf[0]
        copy = np.array(arr, copy=True)
        sendbuf = copy if type(buf) is _ndarray else [copy, *buf[1:]]
        self.Sendrecv(sendbuf, dest, sendtag, buf, source, recvtag, status)

    # -- probes ----------------------------------------------------------------
    def Probe(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
              status: Any = None) -> bool:  # noqa: N802
        """Wait for a message from a named source. In replay the answer comes
        from the log (the status of the message the next receive gets)."""
        if self._voided():
            return True
        if self.mode == "off" or source == _PROC_NULL:
            return self._guard("Probe", self._comm.Probe, source, tag, status)
        if source == _ANY_SOURCE:
            raise UnsupportedCall("Probe: ANY_SOURCE cannot be replayed; name the source")
        if self.mode == "live":
            return self._guard("Probe", self._comm.Probe, source, tag, status)
        if self._live(source):
            return self._guard("Probe", self._replay_comm.Probe, source, tag, status)
        seq = self._ctr.recv.get((source, tag), 0)
        data = self._logged("Probe", source, tag, seq)
        _fill_status(status, source, self._logged_tag(source, tag, seq), data)
        return True

    def Iprobe(self, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
               status: Any = None) -> bool:  # noqa: N802
        """Whether a message from a named source is there. Its answer depends
        on timing, so each answer is logged and replay gives it back."""
        if self._voided():
            return False
        if self.mode == "off" or source == _PROC_NULL:
            return self._guard("Iprobe", self._comm.Iprobe, source, tag, status)
        if source == _ANY_SOURCE:
            raise UnsupportedCall("Iprobe: ANY_SOURCE cannot be replayed; name the source")
        if self.mode == "live":
            flag = bool(self._guard("Iprobe", self._comm.Iprobe, source, tag, status))
            self.log.probes.append((flag, source, tag, 0))
            return flag
        k = self._ctr.probe
        self._ctr.probe = k + 1
        if k >= len(self.log.probes) or self.log.probes[k][1:3] != (source, tag):
            self._diverged(f"Iprobe #{k} from rank {source} tag {tag} was not called originally")
            return False
        flag = self.log.probes[k][0]
        if flag and status is not None:
            seq = self._ctr.recv.get((source, tag), 0)
            _fill_status(status, source, self._logged_tag(source, tag, seq),
                         self.log.get(source, tag, seq))
        return flag

    # -- lowercase (pickled objects) ---------------------------------------
    def send(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._send_obj("send", obj, dest, tag)

    def ssend(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._send_obj("ssend", obj, dest, tag)

    def bsend(self, obj: Any, dest: int, tag: int = 0) -> None:
        self._send_obj("bsend", obj, dest, tag)

    def _send_obj(self, call: str, obj: Any, dest: int, tag: int) -> None:
        if self._voided():
            return
        if self._pending:
            self._settle()
        if self.mode == "off" or dest == _PROC_NULL:
            return self._guard(call, getattr(self._comm, call), obj, dest, tag)
        if self.mode == "live":
            self._guard(call, getattr(self._comm, call), obj, dest, tag)
        elif self._live(dest):
            self._ctr.next_send(dest, tag)
            self._guard(call, getattr(self._replay_comm, call), obj, dest, tag)
        else:
            self._send_token(call, dest, tag, _pickle(obj))

    def _stand_in(self, source: int, tag: int) -> Any:
        """What a voided lowercase receive returns: the last object this rank
        got from (source, tag), this segment or the one before (the step is
        thrown away; the code using the object must not fail meanwhile)."""
        ch = self.log.rx.get((source, tag))
        if ch is None:
            return None
        i = (ch.n or ch.last) - 1
        if not 0 <= i < len(ch.items) or not isinstance(ch.items[i], bytes):
            return None
        return pickle.loads(ch.items[i])

    def recv(self, buf: Any = None, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
             status: Any = None) -> Any:
        if self._voided():
            return self._stand_in(source, tag)
        if self._pending:
            self._settle()
        if self.mode == "off" or source == _PROC_NULL:
            return self._guard("recv", self._comm.recv, buf, source, tag, status)
        if self.mode == "live":
            st = status
            if st is None and (source == _ANY_SOURCE or tag == _ANY_TAG):
                st = MPI.Status()
            obj = self._guard("recv", self._comm.recv, buf, source, tag, st)
            if self._voided():
                return self._stand_in(source, tag)
            if source == _ANY_SOURCE:
                source = st.Get_source()
                self.log.sources.append(source)
            ch, seq = self.log.reserve(source, tag)
            ch.set(seq, _pickle(obj))
            if tag == _ANY_TAG:
                ch.tag(seq, st.Get_tag())
            return obj
        if source == _ANY_SOURCE:
            source = self._replay_source("recv")
            if source == _PROC_NULL:
                return None
        seq = self._ctr.next_recv(source, tag)
        if self._live(source):
            return self._guard("recv", self._replay_comm.recv, buf, source, tag, status)
        data = self._logged("recv", source, tag, seq)
        _fill_status(status, source, self._logged_tag(source, tag, seq), data)
        return None if data is None else pickle.loads(data)

    def isend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        return self._isend_obj("isend", obj, dest, tag)

    def issend(self, obj: Any, dest: int, tag: int = 0) -> Request:
        return self._isend_obj("issend", obj, dest, tag)

    def _isend_obj(self, call: str, obj: Any, dest: int, tag: int) -> Request:
        if self._voided():
            return Request.make(self, None, call)
        if self._pending:
            self._settle()
        if self.mode == "off" or dest == _PROC_NULL:
            return self._off_request(call, getattr(self._comm, call), obj, dest, tag)
        if self.mode == "live":
            return Request.make(self, self._guard(call, getattr(self._comm, call), obj, dest, tag),
                                call)
        if self._live(dest):
            self._ctr.next_send(dest, tag)
            return Request.make(self, self._guard(call, getattr(self._replay_comm, call), obj,
                                                  dest, tag), call)
        self._send_token(call, dest, tag, _pickle(obj))
        return Request.make(self, None, call)

    def irecv(self, buf: Any = None, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG) -> Request:
        if self._voided():
            return Request.make(self, None, "irecv", value=self._stand_in(source, tag))
        if self._pending:
            self._settle()
        if self.mode == "off" or source == _PROC_NULL:
            return self._off_request("irecv", self._comm.irecv, buf, source, tag)
        if source == _ANY_SOURCE:
            self._no_any_source("irecv")
        if self.mode == "live":
            req = self._guard("irecv", self._comm.irecv, buf, source, tag)
            ch, seq = self.log.reserve(source, tag)
            wild = tag == _ANY_TAG

            def keep(obj: Any, status: Any) -> Any:
                ch.set(seq, _pickle(obj))
                if wild:
                    ch.tag(seq, status.Get_tag() if status is not None else None)
                return obj

            return Request.make(self, req, "irecv", keep)
        seq = self._ctr.next_recv(source, tag)
        if self._live(source):
            return Request.make(self, self._guard("irecv", self._replay_comm.irecv, buf, source, tag),
                                "irecv")
        data = self._logged("irecv", source, tag, seq)
        return Request.make(self, None, "irecv", value=None if data is None else pickle.loads(data))

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
        if source == _ANY_SOURCE:
            # Blocking: the match is logged (live) or taken from the log (replay).
            sreq = self.isend(sendobj, dest, sendtag) if dest != _PROC_NULL else None
            out = self.recv(recvbuf, source, recvtag, status)
            if sreq is not None:
                sreq.wait()
            return sendobj if self._voided() else out
        rreq = self.irecv(recvbuf, source, recvtag) if source != _PROC_NULL else None
        sreq = self.isend(sendobj, dest, sendtag) if dest != _PROC_NULL else None
        out = rreq.wait(status) if rreq is not None else None
        if sreq is not None:
            sreq.wait()
        return sendobj if self._voided() else out

    @staticmethod
    def Waitall(requests: Sequence[Any], statuses: Any = None) -> bool:  # noqa: N802
        """Complete all requests. Local."""
        return Request.Waitall(requests, statuses)

    @staticmethod
    def waitall(requests: Sequence[Any], statuses: Any = None) -> list[Any]:
        """Complete all requests; the received objects. Local."""
        return Request.waitall(requests, statuses)
