"""Restoring checkpoints: choice with fallback, verification, N→M redistribution.

Private engine of :mod:`ulfmpy.checkpoint`, which re-exports the public names.

Two kinds of failure stay apart. A damaged checkpoint (unreadable manifest,
any manifest field :func:`ulfmpy._ckpt_files.checkpoint_problems` rejects, a
missing, truncated or corrupt rank file) makes restore fall back to the next
older committed one, for the reason ``ulfmpy inspect --verify`` gives. A
state that does not fit an intact checkpoint (other names, dtypes, global
shapes) is the app's error and raises at once: falling back would silently
resume an older step with the same misfit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ulfmpy import _ckpt_files as _files
from ulfmpy.errors import CheckpointError, RestoreError
from ulfmpy.state import Block, Rows, StateValue, count_name, local_array, normalize_state

__all__ = ["MemoryCopy", "RestoreRecord", "restore", "restore_from_memory"]


class MemoryCopy(NamedTuple):
    """The staged copy of a committed checkpoint: ``(step, {name: read-only array})``."""

    step: int
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class RestoreRecord:
    """Where a restore came from; ``fallbacks`` lists skipped checkpoints and why."""

    step: int
    path: str
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    nranks: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The ``restored_from`` entry of ``summary.json``."""
        return asdict(self)


def restore_from_memory(state: Mapping[str, Any], copy: MemoryCopy) -> None:
    """Copy a :meth:`CheckpointStore.memory_copy` back into the state in place. Local.

    Raises:
        RestoreError: if names, shapes or dtypes differ (the decomposition
            changed: restore from the checkpoint files instead, N→M).
    """
    entries = normalize_state(state)
    if set(entries) != set(copy.arrays):
        raise RestoreError(f"the memory copy of step {copy.step} holds {sorted(copy.arrays)} but "
                           f"the state has {sorted(entries)}")
    for name, value in entries.items():
        dest, src = local_array(value), copy.arrays[name]
        if dest.shape != src.shape or dest.dtype != src.dtype:
            raise RestoreError(
                f"state[{name!r}] is {dest.dtype}{list(dest.shape)} but the memory copy of step "
                f"{copy.step} is {src.dtype}{list(src.shape)}: the decomposition changed; "
                "restore from the checkpoint files instead")
    for name, value in entries.items():
        np.copyto(local_array(value), copy.arrays[name])


def _plan(source: str | os.PathLike[str]) -> dict[str, Any]:
    """Rank 0: the candidate manifests, newest first, and uncommitted newer steps."""
    p = Path(source)
    if _files._STEP_RE.match(p.name) or p.is_file():
        manifest = _files.resolve_checkpoint(p) if _files._STEP_RE.match(p.name) else p
        return {"single": True, "candidates": [str(manifest)], "fallbacks": []}
    ckpt = _files.ckpt_dir_of(p)
    manifests, dirs = _files.scan_steps(ckpt)
    newest = max(manifests, default=-1)
    fallbacks = [{"step": s, "path": str(ckpt / _files.step_dir_name(s)),
                  "reason": "not committed: no manifest (the run stopped before every rank's "
                            "write was durable)"}
                 for s in sorted(dirs - manifests, reverse=True) if s > newest]
    return {"single": False, "fallbacks": fallbacks, "ckpt": str(ckpt),
            "candidates": [str(ckpt / _files.manifest_name(s)) for s in sorted(manifests, reverse=True)]}


def restore(comm: Any, source: str | os.PathLike[str], state: Mapping[str, Any], *,
            events: Any = None) -> RestoreRecord | None:
    """Restore the newest valid committed checkpoint into ``state`` in place. Collective.

    Every rank of ``comm`` calls it with the same ``source`` and a state with
    the same names. Rank 0 chooses candidates and reads manifests; every rank
    reads its own block and verifies the checksums of a share of the rank
    files; the results are combined, so all ranks restore the same step or
    all fall back (or all raise).

    Args:
        comm: the communicator of the run (may have a different size than the
            one that wrote the checkpoint: distributed blocks restore N→M).
        source: a run directory (its newest checkpoint that verifies), or one
            checkpoint (its manifest ``ckpt/step-NNNNNNNN.h5`` or step dir).
        state: the app state (dict of :class:`~ulfmpy.Block` / ndarray).
        events: the rank's event log, or None.

    Returns:
        a :class:`RestoreRecord`, or None when a run directory (which need not
        exist yet) holds no committed checkpoint: a fresh start.

    Raises:
        RestoreError: the state does not match an intact checkpoint (names,
            kinds, dtypes, global shapes, or per-rank state on another rank
            count); or no candidate is usable (the message gives each step's
            reason). The state may then be partly overwritten.
    """
    t0 = time.perf_counter()
    entries = normalize_state(state)
    rank, size = comm.Get_rank(), comm.Get_size()

    def log(event: str, **fields: Any) -> None:
        if events is not None:
            events.log(event, **fields)

    plan: dict[str, Any] | None = None
    if rank == 0:
        try:
            plan = _plan(source)
        except (RestoreError, OSError) as exc:
            plan = {"error": str(exc)}
    plan = comm.bcast(plan, root=0)
    if "error" in plan:
        raise RestoreError(plan["error"])
    fallbacks: list[dict[str, Any]] = list(plan["fallbacks"])
    for fb in fallbacks:
        log("restore_fallback", **fb)
    for path in plan["candidates"]:
        manifest, err = _read_candidate(path) if rank == 0 else (None, None)
        manifest, err = comm.bcast((manifest, err), root=0)
        if err is not None or manifest is None:
            fallbacks.append(_fallback(log, path, None, err or "manifest unreadable"))
            continue
        problems = comm.allgather(_mismatch(manifest, entries, rank, size))
        bad = [f"rank {r}: {m}" if size > 1 else m for r, m in enumerate(problems) if m]
        if bad:
            # The state does not fit: a user error, unless the checkpoint is damaged
            # (only then is it verified whole: the usual path reads each byte once).
            mine = _share(manifest, rank, size)
            damage = _reason(comm, _files.checkpoint_problems(manifest, verify=mine))
            if damage:
                fallbacks.append(_fallback(log, path, manifest.step, damage))
                continue
            log("restore_failed", step=manifest.step, path=path, reasons=bad)
            raise RestoreError(f"cannot restore checkpoint {path}: " + "; ".join(_dedupe(bad)))
        reason = _reason(comm, _load_problems(manifest, entries, rank, size))
        if reason:
            fallbacks.append(_fallback(log, path, manifest.step, reason))
            continue
        record = RestoreRecord(manifest.step, str(manifest.path), fallbacks,
                               time.perf_counter() - t0, manifest.nranks)
        log("restored", step=record.step, path=record.path, seconds=record.seconds,
            fallbacks=fallbacks, ckpt_nranks=manifest.nranks, nranks=size)
        return record
    if plan["single"] or plan["candidates"]:
        tried = "; ".join(f"step {f['step']}: {f['reason']}" for f in fallbacks)
        log("restore_failed", source=str(source), fallbacks=fallbacks)
        raise RestoreError(f"no checkpoint in {source} could be restored ({tried}). Inspect "
                           f"them with 'ulfmpy inspect {source} --verify'; to start afresh "
                           "use a new run directory")
    log("restore_none", source=str(source), fallbacks=fallbacks,
        reason=f"no committed checkpoint in {plan['ckpt']}: fresh start")
    return None


def _read_candidate(path: str) -> tuple[_files.Manifest | None, str | None]:
    """Rank 0: a candidate's manifest, or why it is unusable (unreadable, damaged fields)."""
    try:
        manifest = _files.read_manifest(path)
    except CheckpointError as exc:
        return None, str(exc)
    damage = _merge(_files.checkpoint_problems(manifest, verify=()))
    return (None, "; ".join(damage)) if damage else (manifest, None)


def _reason(comm: Any, problems: list[_files.Problem]) -> str | None:
    """Collective: every rank's problems with a checkpoint as one reason, or None."""
    merged = _merge(p for ps in comm.allgather(problems) for p in ps)
    return "; ".join(merged) or None


def _merge(problems: Iterable[_files.Problem]) -> list[str]:
    """The messages of problems found by one or more ranks, in file order, once each.

    A partial read's message for a file whose full read also failed is
    dropped, so the reason is the one ``inspect --verify`` gives, however
    restore shared the files among its ranks.
    """
    problems = list(problems)
    fully = {i for i, full, _ in problems if full}
    kept = sorted((i, msg) for i, full, msg in problems if full or i not in fully)
    return list(dict.fromkeys(msg for _, msg in kept))


def _share(m: _files.Manifest, rank: int, size: int) -> set[int]:
    """The rank files this rank verifies: every file by exactly one rank."""
    return {i for i in range(m.nranks) if i % size == rank}


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _fallback(log: Any, path: str, step: int | None, reason: str) -> dict[str, Any]:
    if step is None:
        m = _files._STEP_RE.match(Path(path).name)
        step = int(m.group(1)) if m else None
    fb = {"step": step, "path": str(path), "reason": reason}
    log("restore_fallback", **fb)
    return fb


def _kind(value: StateValue) -> str:
    return "block" if isinstance(value, Block) else "rows" if isinstance(value, Rows) else "rank"


def _row_share(total: int, rank: int, size: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of a collection of ``total`` that ``rank`` of
    ``size`` takes on an N→M restore: even contiguous shares in rank order."""
    return total * rank // size, total * (rank + 1) // size


def _row_counts(m: _files.Manifest) -> dict[str, str]:
    """The checkpoint's count arrays: count name -> the name of one collection it counts."""
    return {e["count"]: name for name, e in m.entries.items() if e["kind"] == "rows"}


def _mismatch(m: _files.Manifest, entries: Mapping[str, StateValue], rank: int,
              size: int) -> str | None:
    """Why this rank's state cannot take checkpoint ``m`` (a user error), or None."""
    where = f"checkpoint step {m.step}"
    if set(m.entries) != set(entries):
        return (f"{where} holds arrays {sorted(m.entries)} but the state has {sorted(entries)}; "
                "restore with the app configuration that wrote it")
    counts = _row_counts(m)
    for name, value in entries.items():
        e = m.entries[name]
        arr = local_array(value)
        if e["kind"] != _kind(value):
            what = {"block": "a distributed ulfmpy.Block", "rank": "per-rank (a plain ndarray)",
                    "rows": "the rows of a ulfmpy.Rows collection"}
            return (f"state[{name!r}] is {what[_kind(value)]} but {where} stored it as "
                    f"{what[e['kind']]}")
        if np.dtype(e["dtype"]) != arr.dtype:
            return f"state[{name!r}] has dtype {arr.dtype} but {where} stored {np.dtype(e['dtype'])}"
        if isinstance(value, Block):
            if tuple(e["global_shape"]) != value.global_shape:
                return (f"state[{name!r}] has global shape {value.global_shape} but {where} "
                        f"stored {tuple(e['global_shape'])}")
        elif isinstance(value, Rows):
            if e["count"] != (mine := count_name(entries, value)):
                return (f"state[{name!r}] is counted by state[{mine!r}] but {where} counted it "
                        f"with {e['count']!r}")
            if arr.shape[1:] != tuple(m.ranks[0][name]["shape"][1:]):
                return (f"state[{name!r}] has rows of shape {arr.shape[1:]} but {where} stored "
                        f"{tuple(m.ranks[0][name]['shape'][1:])}")
            if m.nranks != size:
                lo, hi = _row_share(sum(r[name]["rows"] for r in m.ranks), rank, size)
                if hi - lo > arr.shape[0]:
                    return (f"state[{name!r}] has room for {arr.shape[0]} rows on rank {rank}, "
                            f"but its even share of {where}'s rows on {size} ranks is "
                            f"{hi - lo}; give the array more capacity")
            elif arr.shape != tuple(m.ranks[rank][name]["shape"]):
                return (f"state[{name!r}] has room for {arr.shape[0]} rows on rank {rank} but "
                        f"{where} stored {m.ranks[rank][name]['shape'][0]}")
        elif m.nranks != size and name in counts:
            if arr.shape != () or arr.dtype.kind not in "iu":
                return f"state[{name!r}] counts state[{counts[name]!r}]: it must be a 0-d integer array"
        elif m.nranks != size:
            return (f"state[{name!r}] is per-rank state (a plain ndarray) and restores only onto "
                    f"the same rank count: {where} was written by {m.nranks} ranks but this run "
                    f"has {size}. Resume on {m.nranks} ranks, or make {name!r} a ulfmpy.Block "
                    "of a global array (or ulfmpy.Rows, for items that move between ranks) "
                    "so it can be redistributed")
        elif tuple(m.ranks[rank][name]["shape"]) != arr.shape:
            return (f"state[{name!r}] has shape {arr.shape} on rank {rank} but {where} stored "
                    f"{tuple(m.ranks[rank][name]['shape'])}")
    return None


def _overlaps(m: _files.Manifest, name: str, block: Block) -> tuple[dict[int, list[Any]], int]:
    """(file -> [(source selection, destination view)], elements covered) for a block."""
    out: dict[int, list[Any]] = {}
    covered = 0
    dst0, shape = block.start, block.local.shape
    for i, ranks in enumerate(m.ranks):
        src0, sshape = ranks[name].get("start", []), ranks[name]["shape"]
        lo = [max(a, b) for a, b in zip(src0, dst0)]
        hi = [min(a + n, b + k) for a, n, b, k in zip(src0, sshape, dst0, shape)]
        if any(h <= lo_ for lo_, h in zip(lo, hi)) or (0 in sshape):
            continue
        src_sel = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, src0))
        dst_sel = tuple(slice(a - d, b - d) for a, b, d in zip(lo, hi, dst0))
        dest = block.local[dst_sel] if dst_sel else block.local
        out.setdefault(i, []).append((src_sel, dest))
        covered += int(np.prod([b - a for a, b in zip(lo, hi)], dtype=np.int64))
    return out, covered


def _load_problems(m: _files.Manifest, entries: Mapping[str, StateValue], rank: int,
                   size: int) -> list[_files.Problem]:
    """Read this rank's part of checkpoint ``m`` into the state; verify its share of files.

    Local. Returns what makes the checkpoint unusable (empty if nothing).
    """
    damage = _files.checkpoint_problems(m, verify=())  # the fields, before using them
    if damage:
        return damage
    try:
        targets: dict[int, dict[str, list[Any]]] = {}
        for name, value in entries.items():
            if isinstance(value, Block):
                parts, covered = _overlaps(m, name, value)
                if covered != value.local.size:
                    return [(-1, True, f"checkpoint step {m.step} covers {covered} of the "
                             f"{value.local.size} elements of state[{name!r}]'s block at "
                             f"{value.start}")]
                for i, lst in parts.items():
                    targets.setdefault(i, {})[name] = lst
            elif m.nranks != size and (isinstance(value, Rows) or name in _row_counts(m)):
                _deal_rows(m, name, value, rank, size, targets)
            else:
                arr = local_array(value)
                full = tuple(slice(0, n) for n in arr.shape)
                targets.setdefault(rank, {})[name] = [(full, arr)]
        return _files.checkpoint_problems(m, verify=_share(m, rank, size), targets=targets)
    except Exception as exc:  # noqa: BLE001 - any read failure makes the checkpoint unusable
        return [(-1, True, f"reading checkpoint step {m.step} failed: {type(exc).__name__}: {exc}")]


def _deal_rows(m: _files.Manifest, name: str, value: StateValue, rank: int, size: int,
               targets: dict[int, dict[str, list[Any]]]) -> None:
    """N→M for a collection: this rank's even share of all old ranks' rows
    (in rank order) as read targets, or its count set to the share's length."""
    rows_name = name if isinstance(value, Rows) else _row_counts(m)[name]
    counts = [r[rows_name]["rows"] for r in m.ranks]
    lo, hi = _row_share(sum(counts), rank, size)
    if not isinstance(value, Rows):
        value[...] = hi - lo
        return
    start = 0
    for i, c in enumerate(counts):
        a, b = max(lo, start), min(hi, start + c)
        if a < b:
            targets.setdefault(i, {})[name] = [((slice(a - start, b - start),),
                                                value.local[a - lo:b - lo])]
        start += c


def _load(m: _files.Manifest, entries: Mapping[str, StateValue], rank: int,
          size: int) -> str | None:
    """Read this rank's part of checkpoint ``m`` into the state; verify a share of files.

    Local. Rank r verifies (reads whole and checksums) the rank files i with
    ``i % size == r``; every file is thus verified by exactly one rank.
    Returns why the checkpoint cannot be used, or None.
    """
    return "; ".join(_merge(_load_problems(m, entries, rank, size))) or None
