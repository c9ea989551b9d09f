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
directory can move.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
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
    scan_steps,
    step_dir_name,
)
from ulfmpy.errors import CheckpointError, RestoreError

__all__ = [
    "CheckpointInfo",
    "Manifest",
    "Verification",
    "list_checkpoints",
    "read_manifest",
    "resolve_checkpoint",
    "verify_checkpoint",
]

_STEP_RE = STEP_RE
# Dtype kinds HDF5 stores losslessly through h5py: bool, ints, floats, complex, bytes.
_DTYPE_KINDS = "biufcS"


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
    """A committed checkpoint as its manifest describes it."""

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
        return int(self.attrs.get("bytes", 0))


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
            for key in ("kind", "dtype", "global_shape"):
                if e.get(key) != e0.get(key):
                    return (f"state[{name!r}]: {key} is {e.get(key)} on rank {info['rank']} "
                            f"but {e0.get(key)} on rank 0; it must match on all ranks")
    for name, e0 in first.items():
        if e0["kind"] == "block":
            total = sum(int(np.prod(info["entries"][name]["shape"], dtype=np.int64)) for info in infos)
            want = int(np.prod(e0["global_shape"], dtype=np.int64))
            if total != want:
                return (f"state[{name!r}]: the ranks' blocks hold {total} elements but the "
                        f"global shape {tuple(e0['global_shape'])} has {want}; the blocks must "
                        "tile the global array without overlap")
    return None


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read a committed checkpoint's manifest. Raises CheckpointError if unreadable."""
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
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"manifest {path} is unreadable ({exc})") from exc
    return Manifest(path=path, step=int(layout["step"]), nranks=int(layout["nranks"]),
                    files=list(layout["files"]), entries=layout["entries"],
                    ranks=layout["ranks"], attrs=attrs, meta=meta)


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
        return {"step": self.step, "path": str(self.path), "committed": self.committed,
                "nranks": self.nranks, "bytes": self.bytes, "error": self.error}


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
                out.append(CheckpointInfo(step, path, True, m.nranks, m.nbytes))
            except CheckpointError as exc:
                out.append(CheckpointInfo(step, path, True, None, None, str(exc)))
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
    """Read (parts of) one rank file of a committed checkpoint.

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
            if int(f.attrs.get("step", -1)) != manifest.step:
                return f"rank file {rel} belongs to step {f.attrs.get('step')}, not {manifest.step}"
            for name, entry in manifest.entries.items():
                want = manifest.ranks[rank][name]
                if name not in f:
                    return f"rank file {rel} has no array {name!r}"
                dset = f[name]
                if dset.shape != tuple(want["shape"]) or dset.dtype != np.dtype(entry["dtype"]):
                    return (f"array {name!r} in {rel} is {dset.dtype}{list(dset.shape)}, "
                            f"the manifest says {entry['dtype']}{want['shape']}")
                problem = _read_dataset(dset, name, rel, want["checksum"], verify,
                                        targets.get(name, []))
                if problem:
                    return problem
    except OSError as exc:
        return f"rank file {rel} is truncated or unreadable ({exc})"
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
        return {"path": str(self.path), "step": self.step, "ok": self.ok,
                "problems": self.problems, "bytes": self.bytes, "seconds": self.seconds}


def verify_checkpoint(path: str | os.PathLike[str]) -> Verification:
    """Verify one checkpoint: manifest readable, every rank file present and intact. Local.

    Args:
        path: the manifest ``ckpt/step-NNNNNNNN.h5`` or the step directory.

    Returns:
        a :class:`Verification`; ``ok`` is False with ``problems`` naming each
        bad file when a rank file is missing, truncated or fails its checksum,
        and when the checkpoint was never committed.
    """
    t0 = time.perf_counter()
    try:
        manifest = read_manifest(resolve_checkpoint(path))
    except (RestoreError, CheckpointError) as exc:
        m = _STEP_RE.match(Path(path).name)
        return Verification(Path(path), int(m.group(1)) if m else None, False, [str(exc)], 0,
                            time.perf_counter() - t0)
    problems = [p for r in range(manifest.nranks)
                if (p := read_rank_file(manifest, r, verify=True)) is not None]
    return Verification(manifest.path, manifest.step, not problems, problems, manifest.nbytes,
                        time.perf_counter() - t0)
