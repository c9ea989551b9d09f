"""The node's checkpoint writer (server side), re-exporting the writers.

This file is the program of the one writer process per node (per virtual
node under ``--virtual-nodes``) that writes every rank's checkpoint files
(its rank-side handle is :class:`ulfmpy._ckpt_async.NodeWriter`;
``docs/architecture.md``, "Checkpoints"). The first rank of the node to
save starts it as ``python ulfmpy/_ckpt_helper.py NAME ...``, by path, so
the writer imports neither the ``ulfmpy`` package (whose modules may pull
in mpi4py) nor the user's ``__main__`` (which multiprocessing's spawn and
forkserver contexts re-import, and a user script imports mpi4py, which
would initialize MPI inside the writer as another copy of a rank). It is a
fresh interpreter started by exec; it needs only the standard library,
numpy and h5py, and must stay that way. The writers it runs live in
:mod:`ulfmpy._ckpt_writers`, which the program loads by path too; imported
as a module of the package, this one re-exports them (the names
:mod:`ulfmpy.checkpoint` and its parts import from here), and costs only
the standard library.

The writer listens on an abstract socket (node-local, no file to clean
up) and serves processes of its own user. Each rank connects once and
sends jobs: write this rank's file from its shared-memory staging buffer;
on rank 0, also commit a checkpoint (manifest under a temporary name,
fsync, rename, fsync the directory) and prune old ones. Results go back on
the rank's connection. A rank's death ends its connection: its write in
flight stops, its staging segments are unlinked, and the writer goes on
serving the others. The writer leaves when its last rank has left, or
when the daemon that started the ranks is gone; it holds the run
directory's job lock meanwhile, so ``ulfmpy run`` ends it with the job's
other processes.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Started by path: sys.path[0] is ulfmpy/, whose module names must not
    # shadow anything numpy or h5py import.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import mmap
import pickle
import queue
import signal
import socket
import struct
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable

_WRITERS = ("CHECKSUM_ALGO", "DIRECT_BYTES", "MANIFEST_FORMAT", "RANK_FORMAT", "RESERVED",
            "STEP_RE", "commit_checkpoint", "crc32_hex", "fsync_dir", "fsync_path", "h5py",
            "manifest_name", "rank_file_name", "remove_checkpoint", "scan_steps",
            "step_dir_name", "write_manifest", "write_rank_file")


def _load_writers() -> Any:
    """The writers module (numpy, and h5py on first use): loaded on demand,
    so that importing this file costs only the standard library."""
    if __name__ != "__main__":
        from ulfmpy import _ckpt_writers

        return _ckpt_writers
    loaded = sys.modules.get("_ulfmpy_ckpt_writers")
    if loaded is None:
        import importlib.util

        # The writers, from the sibling file, as a module outside the package.
        spec: Any = importlib.util.spec_from_file_location(
            "_ulfmpy_ckpt_writers", os.path.join(_here, "_ckpt_writers.py"))
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = loaded
        spec.loader.exec_module(loaded)
    return loaded


def __getattr__(name: str) -> Any:
    # Re-exported: the package imports the writers from this module.
    if name in _WRITERS:
        return getattr(_load_writers(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["commit_checkpoint", "crc32_hex", "fsync_dir", "fsync_path", "remove_checkpoint",
           "scan_steps", "write_manifest", "write_rank_file"]


# ----------------------------------------------------------------------------
# The node's writer: server side


def shm_prefix() -> str:
    """Name prefix of this PID namespace's staging segments (pids mean nothing elsewhere)."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"ulfmpy-ckpt-{ns}-"


def _unlink_segments_of(pid: int) -> None:
    """Unlink the staging segments a dead rank created (nothing left in /dev/shm)."""
    prefix = f"{shm_prefix()}{pid}-"
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone: it maps nothing and writes nothing
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


class _Mappings:
    """Shared-memory segments the writer has attached for one rank, by name."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def get(self, name: str, size: int) -> mmap.mmap:
        mm = self._maps.get(name)
        if mm is None or len(mm) < size:
            # POSIX shared memory lives in /dev/shm on Linux. Opening it
            # directly avoids multiprocessing's resource tracker, which would
            # unlink the rank's segment when the writer exits.
            fd = os.open(f"/dev/shm/{name}", os.O_RDONLY)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # no faults while writing
            try:
                mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self._maps[name] = mm
        return mm

    def forget(self, name: str) -> None:
        mm = self._maps.pop(name, None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # still exported by a write that was abandoned
                pass

    def close(self) -> None:
        for name in list(self._maps):
            self.forget(name)


class _Gone(BaseException):
    """The rank whose write this is has left: stop writing its file."""


class _Client(threading.Thread):
    """One rank's connection to the writer.

    Reads the rank's messages in the background; a worker thread of its own
    runs the rank's jobs in order. Ranks' jobs run side by side, as their
    own helper processes' did (checksums and copies overlap; h5py's own
    calls take turns). A ``hurry`` overtakes queued work: it is the rank
    waiting for a job, which is then written at full speed. The rank's end
    (``bye`` or its connection's) reaches the server after its last job.
    """

    def __init__(self, sock: socket.socket, pid: int, done: Callable[[_Client], None]) -> None:
        super().__init__(daemon=True, name=f"ulfmpy-writer-client-{pid}")
        self.conn = Connection(sock.detach())
        self.pid = pid
        self.maps = _Mappings()
        self.gone = False
        self.hung_up = False  # the connection ended without a word: the rank died or is dying
        self._work: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._done = done
        self._hurry_upto = 0
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._worker, daemon=True,
                         name=f"ulfmpy-writer-jobs-{pid}").start()

    def _worker(self) -> None:
        while True:
            msg = self._work.get()
            kind = msg[0]
            if kind == "bye":
                self._done(self)
                return
            if self.gone:
                continue  # the rank left before this job came up: nobody waits for it
            if kind == "forget":
                self.maps.forget(msg[1])
            elif kind == "info":
                self.send({"id": msg[1], "pid": os.getpid(),
                           "mpi_modules": sorted(m for m in sys.modules if m.startswith("mpi4py")),
                           "affinity": sorted(os.sched_getaffinity(0))
                           if hasattr(os, "sched_getaffinity") else None})
            elif kind in ("write", "commit"):
                try:
                    self.send(_run_job(kind, msg[1], self))
                except _Gone:
                    pass

    def run(self) -> None:
        while True:
            try:
                data = self.conn.recv_bytes()
            except (EOFError, OSError):  # the rank closed the connection or died
                self.hung_up = True
                msg: tuple[Any, ...] = ("bye",)
            else:
                if _preload is not None:
                    _preload.need()  # a job may unpickle numpy arrays
                msg = pickle.loads(data)
            if msg[0] == "hurry":
                with self._cond:
                    self._hurry_upto = max(self._hurry_upto, msg[1])
                    self._cond.notify_all()
                continue
            if msg[0] in ("bye", "stop"):
                with self._cond:
                    self.gone = True
                    self._cond.notify_all()
                self._work.put(("bye",))
                return
            self._work.put(msg)

    def send(self, result: dict[str, Any]) -> None:
        with self._send_lock:
            try:
                self.conn.send(result)
            except OSError:  # the rank is gone: nobody waits for this result
                pass

    def hurried(self, job_id: int) -> bool:
        """Whether the rank waits for ``job_id`` (or a later job)."""
        with self._cond:
            return self._hurry_upto >= job_id

    def wait_hurry(self, job_id: int, timeout: float) -> None:
        """Sleep up to ``timeout`` unless the rank is (or becomes) waiting for ``job_id``."""
        with self._cond:
            self._cond.wait_for(lambda: self.gone or self._hurry_upto >= job_id, timeout)
        if self.gone:
            raise _Gone

    def close(self) -> None:
        self.maps.close()
        try:
            self.conn.close()
        except OSError:
            pass


def _do_write(job: dict[str, Any], client: _Client) -> dict[str, Any]:
    import numpy as np

    mm = client.maps.get(job["shm"], job["size"])
    base = np.frombuffer(mm, dtype=np.uint8, count=job["size"])
    arrays = []
    for name, dtype, shape, offset, dattrs in job["entries"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        arr = base[offset:offset + count].view(dt).reshape(shape)
        arrays.append((name, arr, dattrs))
    duty = float(job.get("duty", 1.0))
    job_id = job["id"]
    paced = [0.0]

    def pace(busy: float) -> None:
        if client.gone:
            raise _Gone
        # Write only `duty` of the time while the rank computes, sparing its
        # memory bandwidth; full speed once the rank waits for this job.
        if duty < 1.0 and not client.hurried(job_id):
            t0 = time.perf_counter()
            client.wait_hurry(job_id, busy * (1.0 / duty - 1.0))
            paced[0] += time.perf_counter() - t0

    try:
        result = _load_writers().write_rank_file(job["path"], arrays, job["attrs"], pace=pace)
    finally:
        del arrays, base
    result.update(paced_s=paced[0], hurried=client.hurried(job_id))
    return result


def _place(starter: int, nice: int) -> None:
    """Run in the background: lower priority, and off the ranks' cores.

    mpirun often binds a rank to one core; inheriting the starting rank's
    binding would make the writer steal that core from compute. Use the other
    cores when there are any (the kernel then places it next to the compute).
    """
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        allowed = set(range(os.cpu_count() or 1))
        others = allowed - os.sched_getaffinity(starter)
        os.sched_setaffinity(0, others or allowed)
    except OSError:
        pass


class _Preload:
    """Import numpy, the writers and h5py before the first job, on time no rank wants.

    The writer starts with the run, while the ranks import and take their
    first, step-timing segments: its imports competing with them cost every
    launch about 0.2 s on a full node and skewed the step time the policies
    measure. Scheduling policy is per thread on Linux: the import runs in a
    ``SCHED_IDLE`` thread (only on an otherwise idle core). The first message
    a rank sends (its first job) needs them: :meth:`need` then lifts the
    thread to the normal policy and waits for it. On a node whose ranks
    never leave a core idle (oversubscribed, busy-polling), an idle-priority
    import would otherwise hold the first write back for as long as compute
    runs, and the wait would land in the next save's exposed time (the
    delta the interval policy measures).

    Started before the writer lowers its own priority (:func:`_place`):
    nice values are per thread on Linux, and a thread takes its creator's.
    """

    def __init__(self) -> None:
        self._tid: int | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._lifted = False
        threading.Thread(target=self._load, name="ulfmpy-writer-preload", daemon=True).start()
        self._ready.wait()

    def _load(self) -> None:
        self._tid = threading.get_native_id()
        try:
            os.sched_setscheduler(self._tid, os.SCHED_IDLE, os.sched_param(0))
        except (OSError, AttributeError):
            pass
        self._ready.set()
        try:
            _load_writers().h5py.File  # the proxy's first use imports h5py
        finally:
            self._done.set()

    def need(self) -> None:
        """Wait until the imports are done, at normal priority from now on.

        Two threads importing numpy at once break it, so nothing that may
        unpickle or write runs before this returns.
        """
        if self._done.is_set():
            return
        with self._lock:
            if not self._lifted and self._tid is not None:
                self._lifted = True
                try:
                    os.sched_setscheduler(self._tid, os.SCHED_OTHER, os.sched_param(0))
                except (OSError, AttributeError):
                    pass
        self._done.wait()


_preload: _Preload | None = None


def _run_job(kind: str, job: dict[str, Any], client: _Client) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        if kind == "write":
            result = _do_write(job, client)
        else:
            result = _load_writers().commit_checkpoint(
                job["ckpt_dir"], job["step"], job["infos"], job["meta_json"], job["attrs"],
                job["keep"], job.get("latency", 0))
        result.update(id=job["id"], ok=True)
    except _Gone:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported to the rank, which fails the checkpoint
        result = {"id": job["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=4),
                  "write_s": time.perf_counter() - t0}
    return result


class _Server:
    """The node's writer: every rank of the node sends it its jobs.

    It leaves when its last rank has left (a rank's end or death is the end
    of its connection), when no rank came within ``FIRST_CLIENT_S`` of its
    start, or when the process it watches (the daemon that started the
    ranks) is gone. Deciding to leave and accepting a rank happen under one
    lock, and the listening socket closes first: a rank arriving then starts
    a writer of its own.
    """

    FIRST_CLIENT_S = 30.0
    EXIT_GRACE_S = 3.0

    def __init__(self, listener: socket.socket, watch: int) -> None:
        self.listener, self.watch = listener, watch
        self.work: queue.Queue[Any] = queue.Queue()
        self.clients: set[_Client] = set()
        self.lock = threading.Lock()
        self.leaving = False
        self.started = time.monotonic()

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:  # closed: the writer is leaving
                return
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():
                sock.close()
                continue
            with self.lock:
                if self.leaving:
                    sock.close()
                    return
                client = _Client(sock, pid, self._client_done)
                self.clients.add(client)
            client.start()

    def watchdog(self) -> None:
        while True:
            time.sleep(0.5)
            with self.lock:
                idle = not self.clients and time.monotonic() - self.started > self.FIRST_CLIENT_S
            if not _alive(self.watch) or idle:
                self.work.put(("leave",))
                return

    def _client_done(self, client: _Client) -> None:
        """A rank left (its worker's last act): the writer leaves with the last one."""
        client.close()
        if client.hung_up:
            # A killed process's sockets close before it turns into a zombie:
            # give its exit a moment to finish before deciding it lives on.
            deadline = time.monotonic() + self.EXIT_GRACE_S
            while _alive(client.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        if not _alive(client.pid):
            _unlink_segments_of(client.pid)
        with self.lock:
            self.clients.discard(client)
            if self.clients:
                return
            self.leaving = True
        self.listener.close()
        self.work.put(("leave",))

    def serve(self) -> int:
        threading.Thread(target=self.accept, name="ulfmpy-writer-accept", daemon=True).start()
        threading.Thread(target=self.watchdog, name="ulfmpy-writer-watch", daemon=True).start()
        self.work.get()  # ("leave",): the last rank left, or the watched daemon is gone
        return 0


def _hold_job_lock(path: str) -> Any:
    """Share the run directory's job lock (``ulfmpy.jobctl``): a job's end
    ends its writer too, even a stopped one, and the next launch waits for it."""
    if not path:
        return None
    import fcntl

    try:
        fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held until exit)
        fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return None
    return fh


def _writer_main(argv: list[str]) -> int:
    """``_ckpt_helper.py NAME STARTER_PID WATCH_PID NICE [JOB_LOCK]``."""
    name, starter, watch, nice = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the ranks decide when it stops
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind("\0" + name)
    except OSError:
        return 0  # another rank of the node started the writer first: it serves
    listener.listen(256)
    lock = _hold_job_lock(argv[4] if len(argv) > 4 else "")  # noqa: F841 (held until exit)
    global _preload
    _preload = _Preload()
    _place(starter, nice)
    return _Server(listener, watch).serve()


if __name__ == "__main__":
    sys.exit(_writer_main(sys.argv[1:]))
