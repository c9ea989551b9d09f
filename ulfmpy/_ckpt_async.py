"""The asynchronous machinery: staging buffers and the node writer's handle.

Private engine of :mod:`ulfmpy.checkpoint`. A staging buffer is one
contiguous copy of the state; in async mode it lives in POSIX shared memory
(``/dev/shm``), where the node's writer process (``_ckpt_helper``, reached
through :class:`NodeWriter`) reads it while the rank computes.
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ulfmpy import _ckpt_files as _files
from ulfmpy import _ckpt_helper
from ulfmpy import jobctl as _jobctl
from ulfmpy.errors import CheckpointError
from ulfmpy.state import Block, Rows, StateValue, count_name, local_array

__all__ = ["WRITER_DIED", "Buffer", "NodeWriter", "layout_key", "specs_of", "sweep_orphans", "writer_name"]

_ALIGN = 64


_shm_prefix = _ckpt_helper.shm_prefix
sweep_orphans = _jobctl.sweep_staging_segments


class _Segment:
    """A POSIX shared-memory segment this rank created in ``/dev/shm``. Local.

    Not ``multiprocessing.shared_memory``: before Python 3.13 it registers
    every segment with a resource tracker, one more process per rank, which
    outlives a SIGKILLed rank and warns of "leaked shared_memory objects"
    after every injected kill. The segment's name carries its creator's pid
    instead, and :func:`sweep_orphans` (the node's next store, and ``ulfmpy
    run`` after each launch) unlinks a dead rank's.
    """

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        fd = os.open(f"/dev/shm/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:  # ENOSPC now rather than SIGBUS when the copy touches the pages
                os.posix_fallocate(fd, 0, size)
            except AttributeError:  # pragma: no cover (not Linux)
                os.ftruncate(fd, size)
            self.buf = mmap.mmap(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(f"/dev/shm/{name}")
            raise
        os.close(fd)

    def close(self) -> None:
        self.buf.close()

    def unlink(self) -> None:
        os.unlink(f"/dev/shm/{self.name}")


def layout_key(entries: Mapping[str, StateValue]) -> tuple[Any, ...]:
    return tuple((n, local_array(v).dtype.str, local_array(v).shape) for n, v in entries.items())


class Buffer:
    """One contiguous allocation holding a staged copy of every state array. Local."""

    def __init__(self, key: tuple[Any, ...], *, shared: bool) -> None:
        self.key = key
        self.slots: list[tuple[str, str, tuple[int, ...], int]] = []
        size = 0
        for name, dtype, shape in key:
            _files.check_name(name, np.dtype(dtype))
            size = -(-size // _ALIGN) * _ALIGN
            self.slots.append((name, dtype, shape, size))
            size += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.size = max(size, 1)
        self.shm: _Segment | None = None
        if shared:
            self._make_shared()
            raw = np.ndarray((self.size,), np.uint8, buffer=self.shm.buf)  # type: ignore[attr-defined]
        else:
            raw = np.empty(self.size, np.uint8)
        raw.fill(0)  # fault the pages in now, not during the first (exposed) staging copy
        self.raw = raw
        self.views = {name: raw[off:off + int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize]
                      .view(dt).reshape(shape) for name, dt, shape, off in self.slots}
        self.step: int | None = None     # the step staged here
        self.committed = False           # whether that step committed

    def _make_shared(self) -> None:
        if not os.path.isdir("/dev/shm"):
            raise CheckpointError("asynchronous checkpoints need POSIX shared memory in /dev/shm "
                                  "(Linux); use mode='sync' (ckpt_mode='sync') here")
        free = os.statvfs("/dev/shm")
        avail = free.f_bavail * free.f_frsize
        if self.size > avail:
            raise CheckpointError(
                f"asynchronous checkpoints need {self.size} bytes of shared memory per "
                f"buffer (two per rank) but /dev/shm has {avail} free; enlarge /dev/shm "
                "or use ckpt_mode='sync'")
        name = f"{_shm_prefix()}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            self.shm = _Segment(name, self.size)
        except OSError as exc:
            raise CheckpointError(f"cannot allocate {self.size} bytes of shared memory for "
                                  f"checkpoint staging ({exc}); enlarge /dev/shm or use "
                                  "ckpt_mode='sync'") from exc

    def job_entries(self, specs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(name, dt, shape, off, _dataset_attrs(spec))
                for (name, dt, shape, off), spec in zip(self.slots, specs)]

    def close(self) -> None:
        self.views = {}
        self.raw = None  # type: ignore[assignment]
        if self.shm is not None:
            try:
                self.shm.close()
            except BufferError:  # a caller still holds a memory_copy() view; the map stays
                pass
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
            self.shm = None


def _dataset_attrs(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": spec["kind"]}
    if spec["kind"] == "block":
        out["global_shape"] = np.asarray(spec["global_shape"], dtype=np.int64)
        out["start"] = np.asarray(spec["start"], dtype=np.int64)
    return out


def specs_of(entries: Mapping[str, StateValue]) -> list[dict[str, Any]]:
    out = []
    for name, value in entries.items():
        arr = local_array(value)
        spec: dict[str, Any] = {"name": name, "kind": "rank", "dtype": arr.dtype.str,
                                "shape": list(arr.shape)}
        if isinstance(value, Rows):
            # the rows in use and the count's name: what an N→M restore deals out
            spec.update(kind="rows", count=count_name(entries, value), rows=int(value.count))
        elif isinstance(value, Block):
            spec.update(kind="block", start=list(value.start), global_shape=list(value.global_shape))
            if value.dims is not None:  # labels for the manifest's global view only
                spec["dims"] = list(value.dims)
                if value.coords:
                    spec["coords"] = {d: c for d, c in value.coords.items()}
        out.append(spec)
    return out


# ----------------------------------------------------------------------------
# The node's writer, rank side


#: How a result says the writer died (``WriterLost``: a failure the run survives).
WRITER_DIED = "the node's checkpoint writer died"


def writer_name(run_dir: str | os.PathLike[str], node: str | None = None) -> str:
    """The abstract socket name of the writer serving ``run_dir`` on ``node``.

    Every rank of a job on one node (one virtual node) computes the same
    name without talking to the others; another run directory, user or
    virtual node gets another writer. Pure.
    """
    import hashlib

    key = f"{os.path.realpath(run_dir)}\0{node or ''}".encode()
    return f"ulfmpy-writer-{os.getuid()}-{hashlib.blake2b(key, digest_size=8).hexdigest()}"


def _connect(name: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
    except OSError:
        sock.close()
        return None
    # A killed writer's listening socket can take connections for a moment
    # after its process is gone: that is no writer.
    if not _jobctl.alive(_peer_pid(sock)):
        sock.close()
        return None
    return sock


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[0])


class NodeWriter:
    """A rank's connection to its node's checkpoint writer (``_ckpt_helper``). Local.

    Connects (at its first use) to the writer serving this run directory on
    this node, and starts it first when none serves yet: the first rank of the node to ask
    starts it, and when two start one at once the socket's name decides
    (the loser leaves at once). The writer outlives the rank that started
    it and serves the node's other ranks on; it leaves with the last.

    Args:
        run_dir: the run directory (names the writer; its job lock).
        node: the virtual node (``--virtual-nodes``), or None for the host.
        nice: niceness added to the writer (it is a background process).
        start_timeout: how long to wait for a started writer to listen.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, node: str | None = None,
                 nice: int = 19, start_timeout: float = 30.0) -> None:
        self.name = writer_name(run_dir, node)
        self.started: subprocess.Popen[bytes] | None = None
        self._run_dir, self._nice, self._start_timeout = run_dir, nice, start_timeout
        self._conn: Connection | None = None
        self._pid: int | None = None
        self._results: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._hurried = 0
        self._eof = False
        self._guard: socket.socket | None = None  # held while the writer this rank started starts

    def start_soon(self) -> None:
        """Have the node's writer started, without waiting for it. Local.

        Called when the store opens (a run with checkpoints on): the one
        rank of the node that binds the name's ``-starting`` twin starts the
        writer, and everyone goes on. The first save then finds it listening
        instead of paying its interpreter's start inside the exposed save
        time the interval policy measures as delta.
        """
        if self._conn is not None or self._eof or self._guard is not None:
            return
        sock = _connect(self.name)
        if sock is not None:
            self._adopt(sock)
            return
        guard = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            guard.bind("\0" + self.name + "-starting")
        except OSError:  # another rank of the node is starting it
            guard.close()
            return
        if (sock := _connect(self.name)) is not None:
            guard.close()
            self._adopt(sock)
            return
        # Held until this rank connects: the node's other ranks wait for the
        # writer to listen instead of starting another.
        self._guard = guard
        self.started = self._start(self.name, self._run_dir, self._nice)

    def _ensure(self) -> Connection:
        """The connection, made on first use (after :meth:`start_soon`, or
        starting the writer here when nobody did)."""
        if self._conn is not None:
            return self._conn
        if self._eof:
            raise OSError("this rank already left the node's checkpoint writer")
        sock = _connect(self.name)
        guard, self._guard = self._guard, None
        if sock is None:
            # One rank of the node starts it: the one that binds the name's
            # "starting" twin (freed when it closes or dies); the others
            # wait for the writer to listen instead of starting their own.
            if guard is None:
                guard = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    guard.bind("\0" + self.name + "-starting")
                except OSError:
                    guard.close()
                    guard = None
                if guard is not None and (sock := _connect(self.name)) is None:
                    self.started = self._start(self.name, self._run_dir, self._nice)
            deadline = time.monotonic() + self._start_timeout
            while sock is None and time.monotonic() < deadline:
                time.sleep(0.005)
                sock = _connect(self.name)
                if sock is None and self.started is not None and self.started.poll() is not None:
                    # Ours lost the name: to a writer started past the guard
                    # (a rank that gave up waiting; use that one), or to a
                    # killed writer's socket not yet released (start again).
                    time.sleep(0.02)
                    if guard is not None and (sock := _connect(self.name)) is None:
                        self.started = self._start(self.name, self._run_dir, self._nice)
        if guard is not None:
            guard.close()
        if sock is None:
            raise OSError(f"the node's checkpoint writer did not start within "
                          f"{self._start_timeout:.0f} s")
        return self._adopt(sock)

    def _adopt(self, sock: socket.socket) -> Connection:
        self._pid = _peer_pid(sock)
        self._conn = Connection(sock.detach())
        return self._conn

    @property
    def pid(self) -> int:
        """The writer's pid (connecting first, if this rank has not yet)."""
        self._ensure()
        assert self._pid is not None
        return self._pid

    @staticmethod
    def _start(name: str, run_dir: str | os.PathLike[str], nice: int) -> subprocess.Popen[bytes]:
        cmd = [sys.executable]
        if sys.version_info >= (3, 11):
            cmd.append("-P")  # no script or cwd directory on sys.path
        lock = os.path.join(run_dir, _jobctl.JOB_LOCK_NAME)
        cmd += [os.path.abspath(_ckpt_helper.__file__), name, str(os.getpid()),
                str(os.getppid()), str(nice), lock if os.path.exists(lock) else ""]
        from ulfmpy.halt import signals_blocked

        with signals_blocked():
            # Its own process group: a signal to the rank's group (a halt, an
            # interrupt) must not end the writer the other ranks use. Not its
            # own session: with the kernel's autogroup scheduling a session
            # gets a fair share of the CPU whatever its nice level, and the
            # writer would take half a core from the ranks instead of their
            # idle time (a 2-rank Jacobi step was 7-17 % slower during writes).
            return subprocess.Popen(cmd, close_fds=True, stdin=subprocess.DEVNULL,
                                    **_jobctl.own_process_group())

    def alive(self) -> bool:
        """False once the writer is known gone (not yet connected: nothing is lost)."""
        if self._eof:
            return False
        return self._pid is None or _jobctl.alive(self._pid)

    def _send(self, msg: tuple[Any, ...]) -> None:
        self._ensure().send(msg)

    def submit(self, job: dict[str, Any], kind: str = "write") -> int:
        """Queue a job (``write`` a rank file, or ``commit`` a checkpoint); returns its id."""
        self._next_id += 1
        job = dict(job, id=self._next_id)
        try:
            self._send((kind, job))
        except OSError:
            # The writer is gone though its pid still looked alive (a killed
            # process tearing down): known gone from now on.
            self._eof = self._conn is not None
            raise
        return self._next_id

    def forget(self, shm_name: str) -> None:
        """Tell the writer to unmap a segment this rank is about to free."""
        if self._conn is not None and self.alive():
            try:
                self._send(("forget", shm_name))
            except OSError:
                pass

    def _pump(self, timeout: float) -> bool:
        """Receive one result if one arrives within ``timeout``; False once the writer is gone."""
        if self._eof or self._conn is None:
            time.sleep(timeout)
            return not self._eof
        try:
            if self._conn.poll(timeout):
                res = self._conn.recv()
                self._results[res["id"]] = res
        except (EOFError, OSError):  # the writer exited
            self._eof = True
            return False
        return True

    def result(self, job_id: int, *, block: bool, timeout: float | None = None) -> dict[str, Any] | None:
        """The job's result, or None if it is still running (``block=False``).

        A dead writer yields a failed result that says so.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if block and job_id > self._hurried and self.alive():
            try:  # the rank now waits: the writer should stop sparing it
                self._send(("hurry", job_id))
                self._hurried = job_id
            except OSError:
                pass
        while True:
            while not self._eof and self._conn_has_data():
                self._pump(0)
            if job_id in self._results:
                return self._results.pop(job_id)
            if self._eof or not self.alive():
                return {"id": job_id, "ok": False, "error": f"{WRITER_DIED} (pid {self._pid})"}
            if not block or (deadline is not None and time.monotonic() >= deadline):
                return None
            self._pump(0.05)

    def _conn_has_data(self) -> bool:
        if self._conn is None:
            return False
        try:
            return self._conn.poll(0)
        except (EOFError, OSError):
            self._eof = True
            return False

    def info(self, timeout: float = 30.0) -> dict[str, Any]:
        """Ask the writer for its pid, CPUs and the mpi4py modules it has loaded (tests)."""
        self._next_id += 1
        self._send(("info", self._next_id))
        res = self.result(self._next_id, block=True, timeout=timeout)
        if res is None:
            raise TimeoutError("the node's checkpoint writer did not answer")
        return res

    def close(self, *, timeout: float = 10.0, kill: bool = False) -> None:
        """Leave the writer. Local.

        ``kill``: abandon this rank's write in flight (the writer stops it);
        otherwise the writer finishes the rank's queued jobs first. The
        writer itself goes on for the node's other ranks and leaves with the
        last. ``timeout`` is kept for the store's clean-up call; nothing waits.
        """
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        if self._conn is None and self.started is not None and not self._eof:
            # This rank started a writer it never used (a run that saved
            # nothing): it visits and leaves, so the writer does not wait
            # for a first rank that will never come (it holds the job lock).
            deadline = time.monotonic() + 5.0
            while (sock := _connect(self.name)) is None and self.started.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.005)
            if sock is not None:
                self._adopt(sock)
        if self._conn is None:  # never connected: no writer to leave
            self._eof = True
            return
        if not self._eof:
            try:
                if not kill:
                    self._send(("bye",))
            except OSError:
                pass
        try:
            self._conn.close()
        except OSError:
            pass
        self._eof = True
        if self.started is not None:
            # Reaped here if it already left; otherwise it serves the node's
            # other ranks on, and whoever outlives it reaps it.
            self.started.poll()
