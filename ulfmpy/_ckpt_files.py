"""Checkpoint files on disk: names, manifest, listing, verification, reading.

Private engine of :mod:`ulfmpy.checkpoint`; pure (numpy, h5py, no MPI), so
``ulfmpy inspect`` can use it. Layout under a run directory::

    ckpt/step-00000120.h5               manifest; exists only once committed
    ckpt/step-00000120/rank-00003.h5    rank 3's arrays, a checksum per array

The manifest holds the step, rank count, run meta (JSON attribute ``meta``),
timings, the list of rank files, the layout of every array (in the JSON
dataset ``/_ulfmpy/layout``) and one dataset per state name: an HDF5 virtual
dataset presenting a distributed array as one global array, or stacking a
per-rank array as ``(nranks, *shape)``. Source paths are relative, so the run
directory can move. :func:`checkpoint_problems` is the check restore and
``ulfmpy inspect --verify`` share.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ulfmpy._ckpt_helper import h5py  # imported on first use
from ulfmpy._ckpt_helper import (
    CHECKSUM_ALGO,
    MANIFEST_FORMAT,
    RESERVED,
    STEP_RE,
    crc32_hex,
    manifest_name,
    rank_file_name,
    scan_steps,
    step_dir_name,
)
from ulfmpy.errors import CheckpointError, RestoreError

__all__ = [
    "CheckpointInfo",
    "Manifest",
    "Verification",
    "checkpoint_problems",
    "list_checkpoints",
    "manifest_problem",
    "read_manifest",
    "resolve_checkpoint",
    "verify_checkpoint",
]

_STEP_RE = STEP_RE
# Dtype kinds HDF5 stores losslessly through h5py: bool, ints, floats, complex, bytes.
_DTYPE_KINDS = "biufcS"
_HEX8 = re.compile(r"^[0-9a-f]{8}$")
# The fields of an array's entry, and of its record per rank, by kind.
_ENTRY_KEYS = {"block": {"kind", "dtype", "global_shape"}, "rank": {"kind", "dtype"},
               "rows": {"kind", "dtype", "count"}}
_LAYOUT_KEYS = ("step", "nranks", "files", "entries", "ranks")
_RANK_KEYS = {"block": {"shape", "start", "checksum"}, "rank": {"shape", "checksum"},
              "rows": {"shape", "rows", "checksum"}}


def ckpt_dir_of(run_dir: str | os.PathLike[str]) -> Path:
    """The ``ckpt`` directory of a run directory (or the path itself if it is one)."""
    p = Path(run_dir)
    if p.name == "ckpt" and not (p / "ckpt").is_dir():
        return p
    return p / "ckpt"


def check_name(name: str, dtype: np.dtype) -> None:
    """Raise CheckpointError if a state entry cannot be stored as an HDF5 dataset."""
    if not name or "/" in name or name in (".", "..") or name.startswith(RESERVED):
        raise CheckpointError(
            f"state name {name!r} cannot be a checkpoint dataset name: use a non-empty "
            f"name without '/' that does not start with {RESERVED!r}")
    if dtype.kind not in _DTYPE_KINDS or dtype.fields is not None:
        raise CheckpointError(
            f"state[{name!r}] has dtype {dtype}, which checkpoints cannot store; "
            "use bool, integer, float, complex or fixed-length bytes arrays")


# ----------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class Manifest:
    """A committed checkpoint as its manifest says, perhaps damaged (see manifest_problem)."""

    path: Path
    step: int
    nranks: int
    files: list[str]                     # relative to the manifest's directory
    entries: dict[str, dict[str, Any]]   # name -> {kind, dtype, global_shape?}
    ranks: list[dict[str, dict[str, Any]]]  # per rank: name -> {shape, start?, checksum}
    attrs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def file_path(self, rank: int) -> Path:
        return self.path.parent / self.files[rank]

    @property
    def nbytes(self) -> int:
        n = self.attrs.get("bytes", 0)
        return n if type(n) is int and n >= 0 else 0


def validate_infos(infos: list[dict[str, Any]]) -> str | None:
    """Check that the ranks' saved arrays form one consistent global state.

    Returns a message naming the first problem, or None.
    """
    first = infos[0]["entries"]
    for info in infos[1:]:
        ent = info["entries"]
        if list(ent) != list(first):
            return (f"rank {info['rank']} saved arrays {sorted(ent)} but rank 0 saved "
                    f"{sorted(first)}: every rank's state must have the same names")
        for name, e in ent.items():
            e0 = first[name]
            for key in ("kind", "dtype", "global_shape", "count"):
                if e.get(key) != e0.get(key):
                    return (f"state[{name!r}]: {key} is {e.get(key)} on rank {info['rank']} "
                            f"but {e0.get(key)} on rank 0; it must match on all ranks")
    lengths: dict[str, tuple[int, str]] = {}
    for name, e0 in first.items():
        for d, n in zip(e0.get("dims") or (), e0.get("global_shape") or ()):
            if d in first:
                return (f"state[{name!r}]: dimension name {d!r} is also the name of a state "
                        "array; give the dimension another name")
            if lengths.setdefault(d, (n, name))[0] != n:
                return (f"state[{name!r}]: dimension {d!r} has length {n}, but "
                        f"{lengths[d][1]!r} gives it length {lengths[d][0]}; arrays that share "
                        "a dimension name must agree on its length")
    for name, e0 in first.items():
        if e0["kind"] == "block":
            total = sum(math.prod(info["entries"][name]["shape"]) for info in infos)
            want = math.prod(e0["global_shape"])
            if total != want:
                return (f"state[{name!r}]: the ranks' blocks hold {total} elements but the "
                        f"global shape {tuple(e0['global_shape'])} has {want}; the blocks must "
                        "tile the global array without overlap")
    return None


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read a committed checkpoint's manifest as stored. Local.

    Raises CheckpointError if it cannot be read at all. Whether its fields
    describe a usable checkpoint is :func:`manifest_problem`'s question.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != MANIFEST_FORMAT:
                raise CheckpointError(f"{path} is not an ulfmpy checkpoint manifest "
                                      f"(format {f.attrs.get('format')!r})")
            layout = json.loads(f[RESERVED]["layout"][()])
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()
                     if k != "meta"}
            meta = json.loads(f.attrs.get("meta", "{}"))
        if not isinstance(layout, dict) or layout.get("format") != MANIFEST_FORMAT:
            raise ValueError("the layout is not an ulfmpy layout")
        if missing := [k for k in _LAYOUT_KEYS if k not in layout]:
            raise CheckpointError(f"manifest {path.name} is damaged: no layout field {missing[0]!r}")
        return Manifest(path=path, step=layout["step"], nranks=layout["nranks"],
                        files=layout["files"], entries=layout["entries"],
                        ranks=layout["ranks"], attrs=attrs, meta=meta)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file may fail in any way
        raise CheckpointError(f"manifest {path} is unreadable "
                              f"({type(exc).__name__}: {exc})") from exc


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------
# Manifest self-consistency


def manifest_problem(m: Manifest) -> str | None:
    """Why manifest ``m``'s fields cannot describe a usable checkpoint, or None. Local.

    Reads no file. Each field restore uses is checked against the others, so
    a flipped bit in any of them lands here (or in the rank-file checks of
    :func:`checkpoint_problems`), never in a raw exception later.
    """
    for check in (_header_problem, _entries_problem, _ranks_problem):
        if problem := check(m):
            return f"manifest {m.path.name} is damaged: {problem}"
    return None


def _is_shape(v: Any) -> bool:
    # type(), not isinstance: JSON true is no int. The bound keeps block ends in int64.
    return isinstance(v, list) and all(type(n) is int and 0 <= n < 1 << 62 for n in v)


def _header_problem(m: Manifest) -> str | None:
    named, algo = _step_of(m.path), m.attrs.get("checksum_algo")
    if not _is_shape([m.step]) or named not in (None, m.step):
        return f"step is {m.step!r} but the file name says {named}"
    if not _is_shape([m.nranks]) or m.nranks < 1:
        return f"nranks is {m.nranks!r}"
    for key, want in (("step", m.step), ("nranks", m.nranks)):
        if (got := m.attrs.get(key)) != want:
            return f"attribute {key} is {got!r} but the layout says {want!r}"
    if algo != CHECKSUM_ALGO:
        return f"attribute checksum_algo is {algo!r}, not {CHECKSUM_ALGO!r}"
    if not isinstance(m.files, list) or len(m.files) != m.nranks:
        return f"files is not a list of nranks ({m.nranks}) rank files"
    for r, rel in enumerate(m.files):
        if rel != (want := f"{step_dir_name(m.step)}/{rank_file_name(r)}"):
            return f"files[{r}] is {rel!r}, not {want!r}"
    return None


def _entries_problem(m: Manifest) -> str | None:
    if not isinstance(m.entries, dict):
        return f"entries is {type(m.entries).__name__}, not a table of arrays"
    for name, e in m.entries.items():
        kind = e.get("kind") if isinstance(e, dict) else None
        if kind not in _ENTRY_KEYS:
            return f"array {name!r} has kind {kind!r}, not 'block', 'rank' or 'rows'"
        if set(e) != (keys := _ENTRY_KEYS[kind]):
            return f"array {name!r} of kind {kind!r} has fields {sorted(e)}, not {sorted(keys)}"
        if _dtype(e["dtype"]) is None:
            return f"array {name!r} has dtype {e['dtype']!r}, which is no dtype checkpoints store"
        if kind == "block" and not _is_shape(e["global_shape"]):
            return f"array {name!r} has global_shape {e['global_shape']!r}, which is no shape"
        if kind == "rows" and m.entries.get(e["count"], {}).get("kind") != "rank":
            return f"array {name!r}: its count {e['count']!r} is no per-rank array of the checkpoint"
    return None


def _dtype(s: Any) -> np.dtype | None:
    """The dtype a manifest's string names, if the writers write it so (canonical form)."""
    try:
        dt = np.dtype(s) if isinstance(s, str) else None
    except Exception:  # noqa: BLE001 - numpy refuses garbage with TypeError, ValueError, ...
        return None
    ok = dt is not None and dt.kind in _DTYPE_KINDS and dt.fields is None and dt.str == s
    return dt if ok else None


def _ranks_problem(m: Manifest) -> str | None:
    if not isinstance(m.ranks, list) or len(m.ranks) != m.nranks:
        return f"ranks is not a list of nranks ({m.nranks}) ranks' arrays"
    names = sorted(m.entries)
    for r, arrays in enumerate(m.ranks):
        if not isinstance(arrays, dict) or sorted(arrays) != names:
            got = sorted(arrays) if isinstance(arrays, dict) else arrays
            return f"ranks[{r}] lists arrays {got!r} but entries lists {names}"
        for name, rec in arrays.items():
            if problem := _record_problem(m.entries[name], rec):
                return f"array {name!r} of rank {r}: {problem}"
    for name, e in m.entries.items():
        blocks = [ranks[name] for ranks in m.ranks]
        if e["kind"] == "block" and (problem := _tiling_problem(e["global_shape"], blocks)):
            return f"array {name!r}: {problem}"
    return None


def _record_problem(e: dict[str, Any], rec: Any) -> str | None:
    keys = _RANK_KEYS[e["kind"]]
    if not isinstance(rec, dict) or set(rec) != keys:
        return f"fields {sorted(rec) if isinstance(rec, dict) else rec!r}, not {sorted(keys)}"
    shape, checksum = rec["shape"], rec["checksum"]
    if not _is_shape(shape):
        return f"shape {shape!r} is no shape"
    if not isinstance(checksum, str) or not _HEX8.match(checksum):
        return f"checksum {checksum!r} is no {CHECKSUM_ALGO} (8 hex digits)"
    if e["kind"] == "rows" and not (type(rec["rows"]) is int and len(shape) >= 1
                                    and 0 <= rec["rows"] <= shape[0]):
        return f"rows {rec['rows']!r} is not a row count of an array of shape {shape}"
    if e["kind"] == "block":
        gs, start = e["global_shape"], rec["start"]
        if not _is_shape(start) or len(start) != len(gs) or len(shape) != len(gs):
            return f"start {start!r} or shape {shape} does not index global_shape {gs}"
        if any(a + n > g for a, n, g in zip(start, shape, gs)):
            return f"the block at start {start} of shape {shape} lies outside global_shape {gs}"
    return None


def _tiling_problem(gs: list[int], blocks: list[dict[str, Any]]) -> str | None:
    """Why blocks (each inside ``gs``) do not tile it: an element count, or an overlap."""
    total, want = sum(math.prod(b["shape"]) for b in blocks), math.prod(gs)
    if total != want:
        return f"the blocks hold {total} elements but global_shape {gs} has {want}"
    boxes = [b for b in blocks if math.prod(b["shape"])]
    lo = np.array([b["start"] for b in boxes], dtype=np.int64).reshape(len(boxes), len(gs))
    hi = lo + np.array([b["shape"] for b in boxes], dtype=np.int64).reshape(lo.shape)
    for i in range(len(boxes) - 1):  # vectorized per block: a run may have thousands
        hit = np.all((lo[i] < hi[i + 1:]) & (lo[i + 1:] < hi[i]), axis=1)
        if hit.any():
            other = boxes[i + 1 + int(np.argmax(hit))]["start"]
            return f"the blocks at start {boxes[i]['start']} and {other} overlap"
    return None


# ----------------------------------------------------------------------------
# Listing


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint found on disk (committed or not)."""

    step: int
    path: Path          # the manifest if committed, else the step directory
    committed: bool
    nranks: int | None
    bytes: int | None   # array bytes (committed) or file bytes on disk (uncommitted)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), path=str(self.path))


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """All checkpoints under a run directory (or its ``ckpt`` dir), oldest first. Local.

    A step directory without a manifest is listed with ``committed=False``:
    it is not a checkpoint (the run stopped before committing it).
    """
    ckpt = ckpt_dir_of(run_dir)
    manifests, dirs = scan_steps(ckpt)
    out = []
    for step in sorted(manifests | dirs):
        if step in manifests:
            path = ckpt / manifest_name(step)
            try:
                m = read_manifest(path)
            except CheckpointError as exc:
                out.append(CheckpointInfo(step, path, True, None, None, str(exc)))
                continue
            problem = manifest_problem(m)
            out.append(CheckpointInfo(step, path, True, None, None, problem) if problem
                       else CheckpointInfo(step, path, True, m.nranks, m.nbytes))
        else:
            d = ckpt / step_dir_name(step)
            files = [e for e in os.scandir(d) if e.name.startswith("rank-") and e.is_file()]
            out.append(CheckpointInfo(step, d, False, len(files),
                                      sum(e.stat().st_size for e in files)))
    return out


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The manifest path of one checkpoint given as its manifest or step directory.

    Raises RestoreError if the checkpoint was never committed or does not exist.
    """
    p = Path(path)
    m = _STEP_RE.match(p.name)
    if m is None:
        raise RestoreError(f"{p} is not a checkpoint: give a manifest ckpt/step-NNNNNNNN.h5, "
                           "a step directory ckpt/step-NNNNNNNN, or a run directory")
    manifest = p.parent / manifest_name(int(m.group(1)))
    if not manifest.is_file():
        what = "its step directory exists but " if (p.parent / step_dir_name(int(m.group(1)))).is_dir() else ""
        raise RestoreError(f"checkpoint {p} is not committed: {what}there is no manifest "
                           f"{manifest} (the run stopped before all ranks' writes were durable); "
                           "resume from an older checkpoint or the run directory")
    return manifest


# ----------------------------------------------------------------------------
# Reading and verifying rank files

Target = tuple[tuple[slice, ...], np.ndarray]  # (source selection, destination view)


def read_rank_file(manifest: Manifest, rank: int, *, verify: bool,
                   targets: dict[str, list[Target]] | None = None) -> str | None:
    """Read (parts of) one rank file of a checkpoint whose manifest is intact. Local.

    With ``verify``, every array is read whole and its CRC-32 compared with
    the manifest's; otherwise only the selections in ``targets`` are read.
    Each target copies ``dataset[selection]`` into its destination view.
    Returns None, or a message naming the file and what is wrong with it.
    """
    targets = targets or {}
    rel = manifest.files[rank]
    path = manifest.file_path(rank)
    if not path.is_file():
        return f"rank file {rel} is missing"
    try:
        with h5py.File(path, "r") as f:
            for key, want in (("step", manifest.step), ("rank", rank)):
                if f.attrs.get(key) != want:
                    return f"rank file {rel} belongs to {key} {f.attrs.get(key)}, not {want}"
            for name, entry in manifest.entries.items():
                want = manifest.ranks[rank][name]
                if name not in f:
                    return f"rank file {rel} has no array {name!r}"
                dset = f[name]
                if dset.shape != tuple(want["shape"]) or dset.dtype != np.dtype(entry["dtype"]):
                    return (f"array {name!r} in {rel} is {dset.dtype.str}{list(dset.shape)}, "
                            f"the manifest says {entry['dtype']}{want['shape']}")
                problem = _read_dataset(dset, name, rel, want["checksum"], verify,
                                        targets.get(name, []))
                if problem:
                    return problem
    except Exception as exc:  # noqa: BLE001 - HDF5 reports a damaged file in many ways
        return f"rank file {rel} is truncated or unreadable ({type(exc).__name__}: {exc})"
    return None


def _read_dataset(dset: h5py.Dataset, name: str, rel: str, checksum: str, verify: bool,
                  targets: list[Target]) -> str | None:
    if not verify:
        for sel, dest in targets:
            _read_into(dset, sel, dest)
        return None
    full = tuple(slice(0, n) for n in dset.shape)
    whole = [dest for sel, dest in targets if sel == full and dest.flags.c_contiguous]
    if whole:  # read straight into the state, then check it there
        data = whole[0]
        if data.size:
            dset.read_direct(data)
    else:
        data = dset[()] if dset.shape else np.asarray(dset[()], dtype=dset.dtype)
    got = crc32_hex(data)
    if got != checksum:
        return (f"checksum mismatch in array {name!r} of {rel} ({CHECKSUM_ALGO} {got}, "
                f"manifest {checksum}): the file is corrupt")
    for sel, dest in targets:
        if dest is not data:
            np.copyto(dest, np.asarray(data)[sel])
    return None


def _read_into(dset: h5py.Dataset, sel: tuple[slice, ...], dest: np.ndarray) -> None:
    if dest.size == 0:
        return
    if not dset.shape:
        dest[()] = dset[()]
    elif dest.flags.c_contiguous:
        dset.read_direct(dest, source_sel=sel)
    else:
        dest[...] = dset[sel]


@dataclass(frozen=True)
class Verification:
    """Result of verifying one checkpoint's files and checksums."""

    path: Path
    step: int | None
    ok: bool
    problems: list[str]
    bytes: int
    seconds: float

    @property
    def reason(self) -> str | None:
        return "; ".join(self.problems) if self.problems else None

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), path=str(self.path))


Problem = tuple[int, bool, str]  # (rank file, -1 for the manifest; by a full read?; message)


def checkpoint_problems(m: Manifest, *, verify: Collection[int] | None = None,
                        targets: Mapping[int, dict[str, list[Target]]] | None = None
                        ) -> list[Problem]:
    """What makes checkpoint ``m`` unusable, as far as these reads show, in file order. Local.

    The one check restore and ``ulfmpy inspect --verify`` share, so both
    reject the same checkpoints for the same reasons: the manifest's fields
    (:func:`manifest_problem`; no file is read if they are damaged), then the
    rank files in ``verify`` (default: all) read whole and checksummed, and
    those in ``targets`` read into their destinations (:func:`read_rank_file`).
    """
    if problem := manifest_problem(m):
        return [(-1, True, problem)]
    verify = range(m.nranks) if verify is None else verify
    targets = targets or {}
    out = []
    for i in sorted(set(verify) | set(targets)):
        if problem := read_rank_file(m, i, verify=i in verify, targets=targets.get(i)):
            out.append((i, i in verify, problem))
    return out


def verify_checkpoint(path: str | os.PathLike[str]) -> Verification:
    """Verify one checkpoint (manifest or step directory) as restore would. Local.

    Returns a :class:`Verification`; ``ok`` is False with ``problems`` naming
    what restore would reject: a manifest that is unreadable or whose fields
    are damaged, each rank file that is missing, truncated or fails its
    checksum, or a checkpoint that was never committed.
    """
    t0 = time.perf_counter()
    try:
        manifest = read_manifest(resolve_checkpoint(path))
    except (RestoreError, CheckpointError) as exc:
        return Verification(Path(path), _step_of(Path(path)), False, [str(exc)], 0,
                            time.perf_counter() - t0)
    problems = [msg for _, _, msg in checkpoint_problems(manifest)]
    return Verification(manifest.path, _step_of(manifest.path), not problems, problems,
                        manifest.nbytes, time.perf_counter() - t0)
