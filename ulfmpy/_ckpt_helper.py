"""The checkpoint helper program (child side), re-exporting the writers.

This file is the program of the per-rank helper process (its parent-side
handle is in ``_ckpt_async``): the store starts it as ``python
ulfmpy/_ckpt_helper.py FDS...``, by path, so the helper imports neither the
``ulfmpy`` package (whose modules may pull in mpi4py) nor the user's
``__main__`` (which multiprocessing's spawn and forkserver contexts
re-import — and a user script imports mpi4py, which would initialize MPI
inside the helper as a second copy of the rank). It is a fresh interpreter
started by exec, i.e. a spawn without that import; it needs only the
standard library, numpy and h5py, and must stay that way. The writers it
runs live in :mod:`ulfmpy._ckpt_writers`, which the program loads by path
too; imported as a module of the package, this one re-exports them (the
names :mod:`ulfmpy.checkpoint` and its parts import from here).

The helper reads jobs from a pipe: write this rank's file from the shared
memory staging buffer; on rank 0, also commit a checkpoint (manifest under a
temporary name, fsync, rename, fsync the directory) and prune old ones. It
reports each result back. It exits when told to, when the pipe
closes, or when its parent rank dies (``PR_SET_PDEATHSIG`` on Linux, plus a
watchdog thread), so a killed rank leaves no orphan behind.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Started by path: sys.path[0] is ulfmpy/, whose module names must not
    # shadow anything numpy or h5py import.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    if sys.platform.startswith("linux"):  # die with the rank, even while importing h5py
        try:
            import ctypes

            # PR_SET_PDEATHSIG, SIGKILL: it ends even a stopped helper. The
            # dead rank's staging segments are swept by ulfmpy run after the
            # launch and by the node's next store (nothing left in /dev/shm).
            ctypes.CDLL(None).prctl(1, 9)
        except (OSError, AttributeError):
            pass
    if len(sys.argv) > 3 and os.getppid() != int(sys.argv[3]):
        os._exit(3)

import mmap
import queue
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

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
# The helper process: child side


def shm_prefix() -> str:
    """Name prefix of this PID namespace's staging segments (pids mean nothing elsewhere)."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"ulfmpy-ckpt-{ns}-"


def _orphaned(ppid: int) -> None:
    """The parent rank died: unlink its staging segments and leave at once."""
    prefix = f"{shm_prefix()}{ppid}-"
    try:
        for name in os.listdir("/dev/shm"):
            if name.startswith(prefix):
                try:
                    os.unlink(f"/dev/shm/{name}")
                except OSError:
                    pass
    finally:
        os._exit(3)


def _watch_parent(ppid: int) -> None:
    """Die with the parent rank: no orphan may keep writing.

    On Linux ``PR_SET_PDEATHSIG`` (set first thing at startup) signals the
    helper when its parent dies; this watchdog covers other systems.
    """
    if os.getppid() != ppid:  # the parent died before we got here
        _orphaned(ppid)

    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != ppid:
                _orphaned(ppid)

    threading.Thread(target=watchdog, daemon=True).start()


class _Mappings:
    """Shared-memory segments the helper has attached, by name."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def get(self, name: str, size: int) -> mmap.mmap:
        mm = self._maps.get(name)
        if mm is None or len(mm) < size:
            # POSIX shared memory lives in /dev/shm on Linux. Opening it
            # directly avoids multiprocessing's resource tracker, which would
            # unlink the parent's segment when the helper exits.
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
            mm.close()


def _do_write(job: dict[str, Any], maps: _Mappings, inbox: _Inbox) -> dict[str, Any]:
    import numpy as np

    mm = maps.get(job["shm"], job["size"])
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
        # Write only `duty` of the time while the rank computes, sparing its
        # memory bandwidth; full speed once the rank waits for this job.
        if duty < 1.0 and not inbox.hurried(job_id):
            t0 = time.perf_counter()
            inbox.wait_hurry(job_id, busy * (1.0 / duty - 1.0))
            paced[0] += time.perf_counter() - t0

    try:
        result = _load_writers().write_rank_file(job["path"], arrays, job["attrs"], pace=pace)
    finally:
        del arrays, base
    result.update(paced_s=paced[0], hurried=inbox.hurried(job_id))
    return result


def _place(ppid: int, nice: int) -> None:
    """Run in the background: lower priority, and off the rank's own cores.

    mpirun often binds a rank to one core; inheriting that binding would make
    the helper steal the rank's core from compute. Use the other cores when
    there are any (the kernel then places it next to the compute, not on it).
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
        others = allowed - os.sched_getaffinity(ppid)
        os.sched_setaffinity(0, others or allowed)
    except OSError:
        pass


def _preload_when_idle() -> None:
    """Import h5py before the first job, on time no rank wants.

    The helper starts with the run, while the ranks import and take their
    first, step-timing segments: its imports (numpy, the writers, h5py)
    competing with them cost every launch about 0.2 s on a full node and
    skewed the step time the policies measure. Scheduling policy is per
    thread on Linux: the import runs in a ``SCHED_IDLE`` thread (only on an
    otherwise idle core); the writes themselves run in the main thread at the
    helper's nice level. A rank that waits for a write sleeps, which leaves
    a core idle: the import then goes ahead.
    """

    def load() -> None:
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        except (OSError, AttributeError):
            pass
        _load_writers().h5py.File  # the proxy's first use imports h5py

    loader = threading.Thread(target=load, name="ulfmpy-helper-preload", daemon=True)
    loader.start()
    loader.join()


class _Inbox(threading.Thread):
    """Reads the job pipe in the background, so a ``hurry`` overtakes queued work."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.jobs: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._hurry_upto = 0
        self._cond = threading.Condition()

    def run(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the rank closed the pipe or died
                msg = ("stop",)
            if msg[0] in ("hurry", "stop"):
                with self._cond:
                    self._hurry_upto = max(self._hurry_upto, msg[1] if msg[0] == "hurry" else 1 << 62)
                    self._cond.notify_all()
            if msg[0] != "hurry":
                self.jobs.put(msg)
            if msg[0] == "stop":
                return

    def hurried(self, job_id: int) -> bool:
        """Whether the rank is waiting for ``job_id`` (or a later job)."""
        with self._cond:
            return self._hurry_upto >= job_id

    def wait_hurry(self, job_id: int, timeout: float) -> None:
        """Sleep up to ``timeout`` unless the rank is (or becomes) waiting for ``job_id``."""
        with self._cond:
            self._cond.wait_for(lambda: self._hurry_upto >= job_id, timeout)


def _run_job(kind: str, job: dict[str, Any], maps: _Mappings, inbox: _Inbox) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        if kind == "write":
            result = _do_write(job, maps, inbox)
        else:
            result = _load_writers().commit_checkpoint(job["ckpt_dir"], job["step"], job["infos"],
                                                   job["meta_json"], job["attrs"], job["keep"])
        result.update(id=job["id"], ok=True)
    except BaseException as exc:  # noqa: BLE001 - reported to the rank, which fails the checkpoint
        result = {"id": job["id"], "ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=4),
                  "write_s": time.perf_counter() - t0}
    return result


def _child_main(argv: list[str]) -> int:
    rfd, wfd, ppid, nice = (int(a) for a in argv[:4])
    _watch_parent(ppid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent rank decides when to stop
    _place(ppid, nice)
    # Before the inbox starts: its unpickling may import numpy too, and two
    # threads importing numpy at once break it.
    _preload_when_idle()
    inbox = _Inbox(Connection(rfd, writable=False))
    inbox.start()
    cout = Connection(wfd, readable=False)
    maps = _Mappings()
    while True:
        msg = inbox.jobs.get()
        kind = msg[0]
        if kind == "stop":
            return 0
        if kind == "forget":
            maps.forget(msg[1])
        elif kind == "info":
            cout.send({"id": msg[1], "pid": os.getpid(),
                       "mpi_modules": sorted(m for m in sys.modules if m.startswith("mpi4py")),
                       "affinity": sorted(os.sched_getaffinity(0))
                       if hasattr(os, "sched_getaffinity") else None})
        elif kind in ("write", "commit"):
            cout.send(_run_job(kind, msg[1], maps, inbox))


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
