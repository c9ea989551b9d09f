"""The asynchronous machinery: staging buffers and the helper process handle.

Private engine of :mod:`ulfmpy.checkpoint`. A staging buffer is one
contiguous copy of the state; in async mode it lives in POSIX shared memory
(``/dev/shm``), where the rank's helper process (``_ckpt_helper``, started by
:class:`HelperProcess`) reads it while the rank computes.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from multiprocessing import shared_memory as _shm
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ulfmpy import _ckpt_files as _files
from ulfmpy import _ckpt_helper
from ulfmpy import jobctl as _jobctl
from ulfmpy.errors import CheckpointError
from ulfmpy.state import Block, Rows, StateValue, count_name, local_array

__all__ = ["Buffer", "HelperProcess", "layout_key", "specs_of", "sweep_orphans"]

_ALIGN = 64


_shm_prefix = _ckpt_helper.shm_prefix
sweep_orphans = _jobctl.sweep_staging_segments


def _untracked_shm(name: str, size: int) -> _shm.SharedMemory:
    """A new segment the multiprocessing resource tracker does not own.

    The tracker outlives a SIGKILLed rank and warns of "leaked shared_memory
    objects" after every injected kill; the segment's name carries its
    creator's pid instead, and :func:`sweep_orphans` (the next store on the
    node, and ``ulfmpy run`` after each launch) unlinks it.
    """
    try:
        return _shm.SharedMemory(name=name, create=True, size=size, track=False)  # 3.13+
    except TypeError:
        pass
    seg = _shm.SharedMemory(name=name, create=True, size=size)
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):
        pass
    return seg


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
        self.shm: _shm.SharedMemory | None = None
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
        self.shm = _untracked_shm(name, self.size)
        fd = getattr(self.shm, "_fd", -1)
        if fd >= 0 and hasattr(os, "posix_fallocate"):
            try:  # ENOSPC now rather than SIGBUS when the copy touches the pages
                os.posix_fallocate(fd, 0, self.size)
            except OSError as exc:
                self.close()
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
                # Not shm.unlink(): it would also tell the tracker, which never had it.
                os.unlink(f"/dev/shm/{self.shm.name}")
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
# The helper process


class HelperProcess:
    """Parent-side handle of one helper process. Local.

    Args:
        nice: niceness added to the helper (it is a background writer).
    """

    def __init__(self, *, nice: int = 19) -> None:
        r_job, w_job = os.pipe()
        r_res, w_res = os.pipe()
        cmd = [sys.executable]
        if sys.version_info >= (3, 11):
            cmd.append("-P")  # no script or cwd directory on sys.path
        cmd += [os.path.abspath(_ckpt_helper.__file__), str(r_job), str(w_res), str(os.getpid()), str(nice)]
        from ulfmpy.halt import signals_blocked

        try:
            with signals_blocked():
                self.proc = subprocess.Popen(cmd, pass_fds=(r_job, w_res), close_fds=True,
                                             stdin=subprocess.DEVNULL)
        finally:
            os.close(r_job)
            os.close(w_res)
        self._out = Connection(w_job, readable=False)
        self._in = Connection(r_res, writable=False)
        self._results: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._hurried = 0
        self._eof = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _send(self, msg: tuple[Any, ...]) -> None:
        self._out.send(msg)

    def submit(self, job: dict[str, Any], kind: str = "write") -> int:
        """Queue a job (``write`` a rank file, or ``commit`` a checkpoint); returns its id."""
        self._next_id += 1
        job = dict(job, id=self._next_id)
        self._send((kind, job))
        return self._next_id

    def forget(self, shm_name: str) -> None:
        """Tell the helper to unmap a segment the parent is about to free."""
        if self.alive():
            try:
                self._send(("forget", shm_name))
            except OSError:
                pass

    def _pump(self, timeout: float) -> bool:
        """Receive one result if one arrives within ``timeout``; False once the pipe is closed."""
        if self._eof:
            time.sleep(timeout)
            return False
        if self._in.poll(timeout):
            try:
                res = self._in.recv()
            except (EOFError, OSError):  # the helper exited
                self._eof = True
                return False
            self._results[res["id"]] = res
        return True

    def result(self, job_id: int, *, block: bool, timeout: float | None = None) -> dict[str, Any] | None:
        """The job's result, or None if it is still running (``block=False``).

        A dead helper yields a failed result naming its exit status.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if block and job_id > self._hurried and self.alive():
            try:  # the rank now waits: the helper should stop sparing it
                self._send(("hurry", job_id))
                self._hurried = job_id
            except OSError:
                pass
        while True:
            while not self._eof and self._in.poll(0):
                self._pump(0)
            if job_id in self._results:
                return self._results.pop(job_id)
            if self._eof or not self.alive():
                while not self._eof and self._in.poll(0):
                    self._pump(0)  # results sent just before exiting
                if job_id in self._results:
                    return self._results.pop(job_id)
                if self.proc.poll() is None:  # closed its pipe but still running: end it
                    self.proc.kill()
                    self.proc.wait()
                return {"id": job_id, "ok": False,
                        "error": f"the checkpoint helper process {self.pid} died "
                                 f"(exit status {self.proc.returncode})"}
            if not block or (deadline is not None and time.monotonic() >= deadline):
                return None
            self._pump(0.05)

    def info(self, timeout: float = 30.0) -> dict[str, Any]:
        """Ask the helper for its pid, CPUs and the mpi4py modules it has loaded (tests)."""
        self._next_id += 1
        self._send(("info", self._next_id))
        res = self.result(self._next_id, block=True, timeout=timeout)
        if res is None:
            raise TimeoutError("checkpoint helper did not answer")
        return res

    def close(self, *, timeout: float = 10.0, kill: bool = False) -> None:
        """Stop the helper: ask nicely (or SIGKILL it with ``kill``), then reap it."""
        if self.alive():
            if kill:
                # Not SIGTERM: helpers keep it blocked (halt.signals_blocked),
                # and an abandoned write needs no goodbye.
                self.proc.kill()
            else:
                try:
                    self._send(("stop",))
                except OSError:
                    pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for conn in (self._out, self._in):
            try:
                conn.close()
            except OSError:
                pass
