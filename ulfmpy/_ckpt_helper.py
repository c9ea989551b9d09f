"""Checkpoint writers (rank files, manifest, pruning) and the helper program.

Private engine of :mod:`ulfmpy.checkpoint`. This file is also the program of
the per-rank helper process (its parent-side handle is in ``_ckpt_async``): the store starts it as ``python ulfmpy/_ckpt_helper.py FDS...``, by
path, so the helper imports neither the ``ulfmpy`` package (whose modules may
pull in mpi4py) nor the user's ``__main__`` (which multiprocessing's spawn
and forkserver contexts re-import — and a user script imports mpi4py, which
would initialize MPI inside the helper as a second copy of the rank). It is
a fresh interpreter started by exec, i.e. a spawn without that import; it
needs only the standard library, numpy and h5py, and must stay that way.

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

            ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        except (OSError, AttributeError):
            pass
    if len(sys.argv) > 3 and os.getppid() != int(sys.argv[3]):
        os._exit(3)

import json
import mmap
import queue
import re
import shutil
import signal
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np


class _Lazy:
    """A module imported on its first attribute access.

    h5py costs about 40 ms to import. A rank whose checkpoints the helper
    writes (async mode) never touches HDF5 in its own process unless it
    restores from the files, and a replacement rank pays every import on the
    recovery's critical path, so ranks import it only when they use it.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._name), attr)


h5py: Any = _Lazy("h5py")

__all__ = ["commit_checkpoint", "crc32_hex", "fsync_dir", "fsync_path", "remove_checkpoint",
           "scan_steps", "write_manifest", "write_rank_file"]

#: Format tags (root attribute ``format``) of a rank file and of a manifest.
RANK_FORMAT = "ulfmpy-ckpt-rank/1"
MANIFEST_FORMAT = "ulfmpy-ckpt/1"
CHECKSUM_ALGO = "crc32"
#: Group in the manifest holding the layout; state names may not start with it.
RESERVED = "_ulfmpy"
STEP_RE = re.compile(r"^step-(\d{8,})(\.h5)?$")
#: Arrays at least this large are written in one pass (write + checksum per
#: chunk) at their dataset's file offset instead of through HDF5.
DIRECT_BYTES = 1 << 20
_CHUNK = 1 << 20
_WRITEBACK = 8 << 20


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def manifest_name(step: int) -> str:
    return f"step-{step:08d}.h5"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.h5"


def crc32_hex(arr: np.ndarray) -> str:
    """CRC-32 of an array's bytes in C order, as 8 hex digits."""
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return f"{zlib.crc32(flat.data) & 0xFFFFFFFF:08x}"


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (created, renamed, removed files) durable."""
    try:
        fsync_path(path)
    except OSError:  # some file systems refuse fsync on directories; nothing more to do
        pass


def write_rank_file(path: str, arrays: list[tuple[str, np.ndarray, dict[str, Any]]],
                    attrs: dict[str, Any], *,
                    pace: Callable[[float], None] | None = None) -> dict[str, Any]:
    """Write one rank's arrays to a new HDF5 file and make it durable.

    Each array becomes a contiguous dataset carrying ``checksum`` (CRC-32 of
    its bytes), ``checksum_algo`` and the given attributes (``kind``, and for
    blocks ``global_shape``/``start``). Large arrays take one pass: HDF5
    allocates the dataset, then the bytes go to its file offset in chunks,
    each checksummed while still in cache, with writeback started early so
    the final fsync has little left to wait for. The file is fsynced before
    this returns; its directory entry is made durable by the commit.

    Args:
        path: the rank file to create (truncated if it exists).
        arrays: (name, C-contiguous array, dataset attributes) triples.
        attrs: root attributes (``step``, ``rank``, ``nranks``).
        pace: called with the seconds each large chunk took; it may sleep to
            leave memory bandwidth to the computing rank.

    Returns:
        ``{"bytes", "write_s", "fsync_s", "checksums": {name: hex}}``.
    """
    t0 = time.perf_counter()
    checksums: dict[str, str] = {}
    direct: list[tuple[str, int, np.ndarray]] = []
    with h5py.File(path, "w") as f:
        f.attrs["format"] = RANK_FORMAT
        for key, value in attrs.items():
            f.attrs[key] = value
        for name, arr, dattrs in arrays:
            if arr.nbytes >= DIRECT_BYTES:
                dset = f.create_dataset(name, shape=arr.shape, dtype=arr.dtype, dcpl=_early_dcpl())
                offset = dset.id.get_offset()
                if offset is not None:
                    direct.append((name, offset, arr))
                else:  # storage not allocated as asked: let HDF5 write it
                    dset[...] = arr
                    checksums[name] = crc32_hex(arr)
            else:
                dset = f.create_dataset(name, data=arr)
                checksums[name] = crc32_hex(arr)
            dset.attrs["checksum"] = checksums.get(name, "0" * 8)
            dset.attrs["checksum_algo"] = CHECKSUM_ALGO
            for key, value in dattrs.items():
                dset.attrs[key] = value
    t1 = time.perf_counter()
    if direct:
        fd = os.open(path, os.O_WRONLY)
        try:
            for name, offset, arr in direct:
                checksums[name] = _write_at(fd, offset, arr, pace)
            os.fsync(fd)
        finally:
            os.close(fd)
        with h5py.File(path, "r+") as f:
            for name, _, _ in direct:
                f[name].attrs["checksum"] = checksums[name]
    fsync_path(path)
    t2 = time.perf_counter()
    return {"bytes": sum(a.nbytes for _, a, _ in arrays), "write_s": t2 - t0,
            "fsync_s": t2 - t1, "checksums": checksums}


def _early_dcpl() -> Any:
    """Contiguous layout, space allocated at creation, never filled: a fixed file offset."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _write_at(fd: int, offset: int, arr: np.ndarray,
              pace: Callable[[float], None] | None = None) -> str:
    """Write an array's bytes at ``offset`` in chunks; return their CRC-32."""
    data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
    crc, pos, started = 0, 0, 0
    advise = getattr(os, "posix_fadvise", None)
    while pos < len(data):
        t0 = time.perf_counter()
        n = os.pwrite(fd, data[pos:pos + _CHUNK], offset + pos)
        crc = zlib.crc32(data[pos:pos + n], crc)  # still in cache
        pos += n
        if pace is not None:
            pace(time.perf_counter() - t0)
        if advise is not None and pos - started >= _WRITEBACK:
            # start writing back what is done (and drop it from the page cache
            # once clean): fsync then waits for little, compute keeps its cache
            advise(fd, offset + started, pos - started, os.POSIX_FADV_DONTNEED)
            started = pos
    return f"{crc & 0xFFFFFFFF:08x}"


# ----------------------------------------------------------------------------
# Manifest and housekeeping


def write_manifest(ckpt_dir: Path, step: int, infos: list[dict[str, Any]], *,
                   meta_json: str, attrs: dict[str, Any]) -> Path:
    """Write and commit the manifest (temporary name, fsync, rename, fsync dir).

    ``infos[r]`` describes rank r's file: ``file`` (relative), ``bytes``,
    ``entries`` (name -> kind, dtype, shape, start, global_shape, checksum).
    Returns the committed manifest's path.
    """
    final = ckpt_dir / manifest_name(step)
    tmp = ckpt_dir / f".{manifest_name(step)}.tmp{os.getpid()}"
    names = list(infos[0]["entries"])
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        e0 = infos[0]["entries"][name]
        entries[name] = {k: e0[k] for k in ("kind", "dtype", "global_shape") if k in e0}
    ranks = [{name: {k: info["entries"][name][k] for k in ("shape", "start", "checksum")
                     if k in info["entries"][name]} for name in names} for info in infos]
    layout = {"format": MANIFEST_FORMAT, "step": step, "nranks": len(infos),
              "files": [info["file"] for info in infos], "entries": entries, "ranks": ranks,
              "timings": [{"rank": i["rank"], "exposed_s": i.get("exposed_s"),
                           "write_s": i.get("write_s"), "bytes": i["bytes"]} for i in infos]}
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = MANIFEST_FORMAT
        f.attrs["step"] = step
        f.attrs["nranks"] = len(infos)
        f.attrs["bytes"] = sum(int(i["bytes"]) for i in infos)
        f.attrs["meta"] = meta_json
        f.attrs["checksum_algo"] = CHECKSUM_ALGO
        for key, value in attrs.items():
            f.attrs[key] = value
        grp = f.create_group(RESERVED)
        grp.create_dataset("layout", data=json.dumps(layout))
        grp.create_dataset("files", data=np.array(layout["files"], dtype=h5py.string_dtype()))
        for name in names:
            _add_global_view(f, name, entries[name], infos)
    fsync_path(tmp)
    fsync_dir(ckpt_dir / step_dir_name(step))  # every rank file's entry, then the step
    fsync_dir(ckpt_dir)                        # directory's, before the commit
    os.replace(tmp, final)  # the commit point
    fsync_dir(ckpt_dir)
    return final


def _add_global_view(f: h5py.File, name: str, entry: dict[str, Any],
                     infos: list[dict[str, Any]]) -> None:
    dtype = np.dtype(entry["dtype"])
    shapes = [tuple(i["entries"][name]["shape"]) for i in infos]
    if entry["kind"] == "block" and len(entry["global_shape"]) > 0:
        layout = h5py.VirtualLayout(shape=tuple(entry["global_shape"]), dtype=dtype)
        for info, shape in zip(infos, shapes):
            if 0 in shape:
                continue
            start = info["entries"][name]["start"]
            sl = tuple(slice(s, s + n) for s, n in zip(start, shape))
            layout[sl] = h5py.VirtualSource(info["file"], name, shape=shape, dtype=dtype)
        f.create_virtual_dataset(name, layout)
    elif entry["kind"] == "rank" and len(set(shapes)) == 1 and 0 not in shapes[0]:
        layout = h5py.VirtualLayout(shape=(len(infos),) + shapes[0], dtype=dtype)
        for r, info in enumerate(infos):
            layout[r] = h5py.VirtualSource(info["file"], name, shape=shapes[0], dtype=dtype)
        f.create_virtual_dataset(name, layout)
    else:  # ragged per-rank shapes: one external link per rank
        grp = f.create_group(name)
        for r, info in enumerate(infos):
            grp[f"rank-{r:05d}"] = h5py.ExternalLink(info["file"], "/" + name)



def scan_steps(ckpt_dir: Path) -> tuple[set[int], set[int]]:
    """(steps with a manifest, steps with a directory) under a ckpt directory."""
    manifests: set[int] = set()
    dirs: set[int] = set()
    if not ckpt_dir.is_dir():
        return manifests, dirs
    for entry in os.scandir(ckpt_dir):
        m = STEP_RE.match(entry.name)
        if not m:
            continue
        if m.group(2) and entry.is_file():
            manifests.add(int(m.group(1)))
        elif not m.group(2) and entry.is_dir():
            dirs.add(int(m.group(1)))
    return manifests, dirs



def remove_checkpoint(ckpt_dir: Path, step: int) -> None:
    """Uncommit (remove the manifest, durably) and then delete a checkpoint's files."""
    manifest = ckpt_dir / manifest_name(step)
    if manifest.exists():
        manifest.unlink()
        fsync_dir(ckpt_dir)
    shutil.rmtree(ckpt_dir / step_dir_name(step), ignore_errors=True)


def commit_checkpoint(ckpt_dir: str, step: int, infos: list[dict[str, Any]], meta_json: str,
                      attrs: dict[str, Any], keep: int) -> dict[str, Any]:
    """Rank 0's second phase: write and rename the manifest, then prune.

    Called once every rank's file is durable. Keeps the newest ``keep``
    committed checkpoints, deleting older ones only now that a newer one
    committed, and removes uncommitted leftovers older than ``step`` and
    temporary manifests of commits that were killed.

    Returns:
        ``{"path", "pruned", "commit_s", "prune_error"}``.
    """
    t0 = time.perf_counter()
    ckpt = Path(ckpt_dir)
    path = write_manifest(ckpt, step, infos, meta_json=meta_json, attrs=attrs)
    pruned: list[int] = []
    prune_error = None
    try:
        manifests, dirs = scan_steps(ckpt)
        old = sorted(manifests)[:-keep]
        torn = sorted(s for s in dirs - manifests if s < step)
        for s in old + torn:
            remove_checkpoint(ckpt, s)
        pruned = sorted(old + torn)
        for entry in os.scandir(ckpt):  # manifests a killed commit left half-written
            if entry.name.startswith(".step-") and ".h5.tmp" in entry.name:
                os.unlink(entry.path)
    except OSError as exc:  # the new checkpoint is committed; old files merely linger
        prune_error = str(exc)
    return {"path": str(path), "pruned": pruned, "prune_error": prune_error,
            "commit_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------
# The helper process: child side


def _watch_parent(ppid: int) -> None:
    """Die with the parent rank: no orphan may keep writing.

    On Linux ``PR_SET_PDEATHSIG`` (set first thing at startup) kills the
    helper with its parent; this watchdog covers other systems.
    """
    if os.getppid() != ppid:  # the parent died before we got here
        os._exit(3)

    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != ppid:
                os._exit(3)

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
        result = write_rank_file(job["path"], arrays, job["attrs"], pace=pace)
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
            result = commit_checkpoint(job["ckpt_dir"], job["step"], job["infos"],
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
    import h5py as _loaded  # noqa: F401  (the helper exists to write: be ready for the first job)

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
