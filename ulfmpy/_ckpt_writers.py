"""Checkpoint writers: rank files, the manifest, pruning.

Private engine of :mod:`ulfmpy.checkpoint`, used both in the ranks (sync
mode, rank 0's commit) and in the per-rank helper process
(:mod:`ulfmpy._ckpt_helper`, which loads this file by path). It must
therefore need only the standard library, numpy and h5py, and import nothing
from the ``ulfmpy`` package.

A rank file holds one rank's arrays, each with its CRC-32; the manifest,
written under a temporary name, fsynced and renamed (the commit point),
describes every rank's file and offers global virtual views of the state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable
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
        entries[name] = {k: e0[k] for k in ("kind", "dtype", "global_shape", "count") if k in e0}
    ranks = [{name: {k: info["entries"][name][k] for k in ("shape", "start", "rows", "checksum")
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
        _label_dimensions(f, names, infos)
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
    elif entry["kind"] in ("rank", "rows") and len(set(shapes)) == 1 and 0 not in shapes[0]:
        layout = h5py.VirtualLayout(shape=(len(infos),) + shapes[0], dtype=dtype)
        for r, info in enumerate(infos):
            layout[r] = h5py.VirtualSource(info["file"], name, shape=shapes[0], dtype=dtype)
        f.create_virtual_dataset(name, layout)
    else:  # ragged per-rank shapes: one external link per rank
        grp = f.create_group(name)
        for r, info in enumerate(infos):
            grp[f"rank-{r:05d}"] = h5py.ExternalLink(info["file"], "/" + name)



def _label_dimensions(f: h5py.File, names: list[str], infos: list[dict[str, Any]]) -> None:
    """Attach HDF5 dimension scales to the global views (netCDF-4's model of
    dimensions), so xarray and netCDF tools see named dimensions with
    coordinates instead of ``phony_dim_*``. A distributed array has the
    names its ``Block(dims=...)`` gives, else ``{name}_dim{i}``; a stacked
    per-rank array has ``rank`` first. Only the data view: restore reads the
    layout, not these."""
    scales: dict[str, Any] = {}

    def scale(dim: str, n: int, values: Any = None) -> Any:
        if dim not in scales:
            data = np.arange(n, dtype=np.int64) if values is None else np.asarray(values)
            ds = f.create_dataset(dim, data=data)
            ds.make_scale(dim)
            scales[dim] = ds
        return scales[dim]

    e0s = infos[0]["entries"]
    for name in names:
        dset = f.get(name)
        if not isinstance(dset, h5py.Dataset):
            continue  # ragged per-rank arrays are links, not one array
        e0 = e0s[name]
        if e0["kind"] == "block":
            dims = list(e0.get("dims") or [f"{name}_dim{i}" for i in range(dset.ndim)])
        else:
            dims = ["rank"] + [f"{name}_dim{i}" for i in range(dset.ndim - 1)]
        coords = e0.get("coords") or {}
        for i, (dim, n) in enumerate(zip(dims, dset.shape)):
            if dim in e0s or (dim in scales and scales[dim].shape[0] != n):
                continue  # a state array's name, or "rank" taken with another length
            dset.dims[i].attach_scale(scale(dim, n, coords.get(dim)))


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
                      attrs: dict[str, Any], keep: int, latency: int = 0) -> dict[str, Any]:
    """Rank 0's second phase: write and rename the manifest, then prune.

    Called once every rank's file is durable. Keeps the newest ``keep``
    committed checkpoints, deleting older ones only now that a newer one
    committed, and removes uncommitted leftovers older than ``step`` and
    temporary manifests of commits that were killed. With a detection
    ``latency`` (steps), the newest checkpoint at least that much older than
    ``step`` and every newer one are kept too: an error found late may be
    in every checkpoint after the one a rollback then needs.

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
        if latency > 0:
            # A later diagnosis goes back to the newest checkpoint at least
            # `latency` steps older than it: keep that one and every newer.
            safe = [s for s in manifests if s <= step - latency]
            old = [s for s in old if safe and s < max(safe)]
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
