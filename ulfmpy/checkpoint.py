"""Global coordinated checkpoints to HDF5 (docs/architecture.md, "Checkpoints").

* :class:`CheckpointStore` saves the state at committed segment boundaries
  with a **two-phase commit**: every rank writes and fsyncs
  ``ckpt/step-NNNNNNNN/rank-NNNNN.h5``, all ranks agree that every write
  succeeded, then rank 0 writes the manifest ``ckpt/step-NNNNNNNN.h5`` under
  a temporary name, fsyncs it and renames it. The rename is the commit
  point: a checkpoint without a manifest does not exist. A save stages
  each rank's state in a shared-memory buffer of its holder (another rank:
  the partner copy, :mod:`ulfmpy.partner`; or its own); in ``async`` mode
  that copy is the only exposed part, the holder's node writer process
  writes the file while compute continues, and :meth:`CheckpointStore.poll`
  commits once every rank's file is durable.
* :func:`restore` picks the newest committed checkpoint whose checksums
  verify (falling back to older ones and saying why) and restores the state
  in place, N→M for distributed blocks.
* :func:`list_checkpoints` and :func:`verify_checkpoint` need no MPI.

Collective calls take the communicator as an argument and must be called by
every rank of it, in the same order, with the same ``step``.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ulfmpy import _ckpt_helper as _writer
from ulfmpy import partner as _partner
from ulfmpy._ckpt_async import Buffer as _Buffer
from ulfmpy._ckpt_async import WRITER_DIED
from ulfmpy._ckpt_async import NodeWriter as _NodeWriter
from ulfmpy._ckpt_async import layout_key as _layout_key
from ulfmpy._ckpt_async import specs_of as _specs
from ulfmpy._ckpt_async import sweep_orphans as _sweep_orphans
from ulfmpy._ckpt_commit import CheckpointRecord, _Committer, _Pending, _Write
from ulfmpy._ckpt_files import (
    CheckpointInfo,
    Verification,
    list_checkpoints,
    verify_checkpoint,
)
from ulfmpy._ckpt_helper import write_rank_file as _write_rank_file
from ulfmpy._ckpt_restore import MemoryCopy, RestoreRecord, restore, restore_from_memory
from ulfmpy.errors import CheckpointError, ConfigError
from ulfmpy.partner import wards_of
from ulfmpy.state import local_array, normalize_state

__all__ = [
    "CheckpointInfo",
    "CheckpointRecord",
    "CheckpointStore",
    "MemoryCopy",
    "RestoreRecord",
    "Verification",
    "list_checkpoints",
    "restore",
    "restore_from_memory",
    "verify_checkpoint",
]

def _cleanup(procs: list[_NodeWriter | None], copies: dict[int, _Buffer]) -> None:
    for helper in procs:
        if helper is not None:
            helper.close(kill=True, timeout=5)
    for b in copies.values():
        b.close()
    copies.clear()


# ----------------------------------------------------------------------------
# The store


class CheckpointStore(_Committer):
    """Writes global checkpoints of one run with a two-phase commit.

    Construct it on every rank of ``comm`` with the same arguments. Calls
    marked *Collective* must be made by all ranks in the same order with the
    same ``step``; calls marked *Local* need no other rank.

    Args:
        comm: the communicator the checkpoint spans (never bound at import).
        run_dir: the run directory; checkpoints go to ``run_dir/ckpt``.
        keep: committed checkpoints to keep (>= 1; 2 or more recommended, so a
            torn newest one leaves an older one). Older ones are deleted only
            after a newer one committed.
        mode: ``"async"`` (stage into shared memory, the node's writer
            process writes the file) or ``"sync"`` (write and commit inside
            :meth:`save`).
        events: the rank's event log, or None.
        meta: JSON-serializable run description stored in every manifest.
        node: the virtual node (``--virtual-nodes``) whose writer serves
            this rank; None: the host's.
        holders: every rank's holder (:func:`ulfmpy.partner.holders`, the
            same list on every rank): a save stages each rank's state in its
            holder's memory, and the holder's node writer writes the rank's
            file from there (the partner copy is the staging buffer). None:
            every rank stages and writes its own.
        helper_nice: niceness of the node's writer process. It runs on the
            cores the rank that started it is not bound to; where every core computes, 19
            (the default) keeps its share of a busy core near 1.5%: the
            write then stretches out instead of slowing compute, and speeds
            up whenever the rank waits.
        helper_duty: fraction of the time the writer writes while the rank
            computes (it pauses between 1 MiB chunks to spare the rank's
            memory bandwidth); it writes at full speed whenever the rank
            waits for it (:meth:`drain`, a save behind an unfinished write).

    A save arriving while the previous asynchronous write is still running
    **waits** for it and commits it first (logged as ``checkpoint_waited``):
    a skipped save would silently stretch the checkpoint interval, while the
    wait shows up in the exposed time the interval policy measures. There is
    thus at most one write outstanding per rank, and one staging buffer per
    copy held: it keeps the last committed checkpoint in memory until the
    next save stages over it (:meth:`held`, :meth:`memory_copy`); during a
    write only the files hold the one before.
    """

    def __init__(self, comm: Any, run_dir: str | os.PathLike[str], *, keep: int = 2,
                 mode: str = "async", events: Any = None, meta: dict[str, Any] | None = None,
                 node: str | None = None, holders: Sequence[int] | None = None,
                 helper_nice: int = 19, helper_duty: float = 1.0) -> None:
        if mode not in ("async", "sync"):
            raise ConfigError(f"checkpoint mode must be 'async' or 'sync', got {mode!r}")
        if not 0.0 < float(helper_duty) <= 1.0:
            raise ConfigError(f"helper_duty must be in (0, 1], got {helper_duty}")
        if int(keep) < 1:
            raise ConfigError(f"keep must be >= 1 committed checkpoints, got {keep}")
        try:
            self._meta_json = json.dumps(meta or {}, sort_keys=True, default=_json_default)
        except TypeError as exc:
            raise ConfigError(f"checkpoint meta must be JSON-serializable: {exc}") from exc
        self.comm = comm
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "ckpt"
        self.keep = int(keep)
        self.latency = 0  # steps: the newest checkpoint this much older than a new one is kept
        self.mode = mode
        self._events = events
        self._copies: dict[int, _Buffer] = {}  # ward -> the staged copy of its state
        self._pending: _Pending | None = None
        self._records: list[CheckpointRecord] = []
        self._closed = False
        self._nice = helper_nice
        self._duty = float(helper_duty)
        self._holder, self._wards = 0, [0]
        self.set_holders(holders)
        if mode == "async":
            swept = _sweep_orphans()
            if swept:
                self._log("checkpoint_shm_swept", segments=swept,
                          reason="staging buffers of killed ranks")
        self._node = node
        self._procs = [_NodeWriter(self.run_dir, node=node, nice=helper_nice)
                       if mode == "async" else None]
        self._finalizer = weakref.finalize(self, _cleanup, self._procs, self._copies)

    @property
    def _helper(self) -> _NodeWriter | None:
        return self._procs[0]

    # -- context manager and lifetime ---------------------------------------

    def __enter__(self) -> CheckpointStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the helper and free the buffers. Local.

        An outstanding write that was not committed is abandoned (call
        :meth:`drain` first to commit it); without a manifest it does not
        exist. Memory copies become invalid.
        """
        if self._closed:
            return
        self._closed = True
        if self._pending is not None:
            self._log("checkpoint_discarded", step=self._pending.step,
                      reason="store closed before the write committed")
            self._pending = None
            if self._helper is not None:
                self._helper.close(kill=True)
        self._finalizer()

    def set_holders(self, holders: Sequence[int] | None) -> None:
        """Who holds whose copy from the next save on (None: everyone its own). Local.

        Copies of ranks this rank no longer holds are freed.
        """
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        if holders is None or size == 1:
            self._holder, self._wards = rank, [rank]
        else:
            if len(holders) != size:
                raise ConfigError(f"holders names {len(holders)} ranks, the communicator has {size}")
            self._holder, self._wards = int(holders[rank]), wards_of(rank, holders)
        for w in [w for w in self._copies if w not in self._wards]:
            self._drop_copy(w)

    def reset(self, comm: Any, *, same_ranks: bool = True) -> None:
        """Continue on a repaired communicator. Local.

        An outstanding uncommitted write is abandoned (it can no longer commit:
        the ranks that shared it changed). The memory copies of committed
        checkpoints are kept when the ranks keep their numbers
        (``same_ranks``: spares, respawn), and dropped otherwise (a shrink).
        """
        self._check_open()
        p = self._pending
        if p is not None:
            # Let the helper go idle. A commit job already handed to rank 0's
            # helper may still rename the manifest: that checkpoint is then
            # complete on disk (every rank's file was durable), just not in memory.
            if self._helper is not None:
                for w in p.writes:
                    if w.result is None:
                        w.result = self._helper.result(w.job or 0, block=True, timeout=120)
            if self._helper is not None and p.commit_job is not None and p.commit is None:
                p.commit = self._helper.result(p.commit_job, block=True, timeout=120)
            self._log("checkpoint_abandoned", step=p.step,
                      reason="communicator repaired before the checkpoint committed",
                      on_disk=bool(p.commit and p.commit.get("ok")))
            self._pending = None  # its copies stay staged (held(staged=True))
        if not same_ranks:
            for w in list(self._copies):
                self._drop_copy(w)
        self.comm = comm

    @property
    def helper_pid(self) -> int | None:
        """The pid of the node's writer this rank uses (async mode), for tests and tools."""
        return self._helper.pid if self._helper is not None else None

    # -- records ------------------------------------------------------------

    @property
    def records(self) -> list[CheckpointRecord]:
        """Every save of this store, oldest first (``summary.json`` ``checkpoints``)."""
        return list(self._records)

    @property
    def last_committed(self) -> CheckpointRecord | None:
        """The newest committed checkpoint of this store, or None."""
        return next((r for r in reversed(self._records) if r.committed), None)

    @property
    def pending_step(self) -> int | None:
        """The step of the outstanding uncommitted write, or None."""
        return self._pending.step if self._pending is not None else None

    @property
    def holder(self) -> int:
        """The rank that holds this rank's copy (itself: no partner copies)."""
        return self._holder

    @property
    def wards(self) -> list[int]:
        """The ranks whose copies this rank holds."""
        return list(self._wards)

    def held(self, *, staged: bool = False) -> dict[int, tuple[int, Any]]:
        """The committed copies in this rank's memory: ``{ward: (step, layout)}``. Local.

        ``staged``: also copies fully staged for a checkpoint that did not
        commit (its write was abandoned by :meth:`reset`, or is in flight).
        """
        return {w: (int(b.step), b.key) for w, b in self._copies.items()
                if b.step is not None and (b.committed or staged)}

    def adopt_committed(self, step: int, path: str | None = None) -> None:
        """Checkpoint ``step``, whose write :meth:`reset` abandoned, committed
        after all: its manifest was renamed as the failure struck, and the
        repair restored it. Its record and its copies count as committed. Local."""
        for i, r in enumerate(self._records):
            if r.step == step and not r.committed:
                self._records[i] = r.__class__(**{**r.__dict__, "committed": True,
                                                  "path": path})
        for b in self._copies.values():
            if b.step == step:
                b.committed = True
        self._log("checkpoint_adopted", step=step, path=path,
                  reason="its manifest was renamed before the repair: committed")

    def forget_after(self, step: int) -> None:
        """Copies in memory of steps after ``step`` are no longer offered. Local."""
        for b in self._copies.values():
            if b.step is not None and b.step > step:
                b.step, b.committed = None, False
        for i, r in enumerate(self._records):
            if r.step > step and r.committed:
                self._records[i] = r.__class__(**{**r.__dict__, "committed": False})

    def copy_views(self, ward: int) -> list[np.ndarray]:
        """Read-only views of the copy held for ``ward``, in its layout's order. Local."""
        out = []
        for view in self._copies[ward].views.values():
            v = view.view()
            v.flags.writeable = False
            out.append(v)
        return out

    def memory_copy(self, step: int | None = None) -> MemoryCopy | None:
        """This rank's own committed copy, when this rank holds it, or None. Local.

        A rank holds its own copy when partner copies are off (``holders``
        None) or it is the only rank; otherwise its holder does (see
        :func:`ulfmpy.partner.restore_from_copies`).

        Args:
            step: which step; None means whichever is held.

        Returns:
            read-only views into the staging buffer: valid until the next
            save stages into it or the store closes. Copy to keep.
        """
        rank = self.comm.Get_rank()
        held = self.held().get(rank)
        if held is None or (step is not None and held[0] != step):
            return None
        names = [name for name, _, _ in self._copies[rank].key]
        return MemoryCopy(held[0], dict(zip(names, self.copy_views(rank))))

    def prepare(self, state: Mapping[str, Any]) -> None:
        """Allocate and pre-fault the staging buffers (a ward's in this rank's
        layout until its own is known), and have the node's writer started. Local.

        Optional: :meth:`save` does both on first use, then inside the exposed time.
        """
        self._check_open()
        if self._helper is not None:
            self._helper.start_soon()
        key = _layout_key(normalize_state(state))
        for w in self._wards:
            if w not in self._copies:
                self._ensure_copy(w, key)

    # -- save / poll / drain ------------------------------------------------

    def save(self, step: int, state: Mapping[str, Any], *,
             data: Mapping[str, np.ndarray] | None = None) -> CheckpointRecord:
        """Save the state as checkpoint ``step``. Collective over ``comm``.

        Call only at a committed segment boundary (no messages in flight), on
        every rank with the same ``step`` and state names. In sync mode the
        checkpoint is committed on return; in async mode it commits in a
        later :meth:`poll` or :meth:`drain`. Checkpoints on disk with a step
        >= ``step`` belong to an abandoned future (the run rolled back) and
        are removed first.

        Args:
            data: the state's values by name, read instead of the state's
                own arrays (C-contiguous copies such as the segment
                snapshot taken at this step: no array is copied twice).

        Raises:
            CheckpointError: on every rank, if any rank could not stage or
                write (sync mode), naming the ranks and the problem.
        """
        self._check_open()
        t0 = time.perf_counter()
        step = int(step)
        entries = normalize_state(state)
        arrays = [local_array(v) if data is None else data[n] for n, v in entries.items()]
        waited = 0.0
        if self._pending is not None:
            previous = self._pending.step
            self._finish(block=True, charge=False)
            waited = time.perf_counter() - t0
            self._log("checkpoint_waited", step=step, previous=previous, waited_s=waited)
        # After a rollback, copies of steps >= step hold an abandoned future.
        for b in self._copies.values():
            if b.committed and (b.step or 0) >= step:
                b.committed = False
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        mine = (_layout_key(entries), _specs(entries))
        t1 = time.perf_counter()
        alone = self._wards == [rank]
        layouts = ({rank: mine} if alone and self._holder == rank
                   else _partner.exchange_layouts(self.comm, self._holder, self._wards, mine))
        err = None
        try:
            bufs = {w: self._ensure_copy(w, key) for w, (key, _) in layouts.items()}
        except CheckpointError as exc:
            err = str(exc)
        self._prepare_dir(step, err)
        for buf in bufs.values():  # staged over from here: no committed copy
            buf.step, buf.committed = None, False
        if self._holder == rank:
            buf = bufs[rank]
            for (name, _, _), a in zip(mine[0], arrays):
                np.copyto(buf.views[name], a)
        else:
            _partner.transfer(
                self.comm, {self._holder: [np.ascontiguousarray(a) for a in arrays]},
                {w: [bufs[w].views[name] for name, _, _ in layouts[w][0]] for w in self._wards})
        stage_s = time.perf_counter() - t1
        nbytes = sum(a.nbytes for a in arrays)
        pending = _Pending(step, [], 0.0, stage_s, nbytes)
        for w in self._wards:
            buf, specs = bufs[w], layouts[w][1]
            buf.step = step
            write = _Write(w, specs)
            path = self.ckpt_dir / _writer.step_dir_name(step) / _writer.rank_file_name(w)
            attrs = {"step": step, "rank": w, "nranks": size}
            if self._helper is not None:
                job = {"path": str(path), "shm": buf.shm.name, "size": buf.size,  # type: ignore[union-attr]
                       "attrs": attrs, "entries": buf.job_entries(specs), "duty": self._duty}
                try:
                    try:
                        write.job = self._live_helper().submit(job)
                    except OSError:
                        # A writer found dead only now, by this send: once
                        # more, to the writer that takes over.
                        write.job = self._live_helper().submit(job)
                except OSError as exc:  # agreed on at the next poll, so every rank raises together
                    write.result = {"ok": False,
                                    "error": f"{WRITER_DIED} before the write reached it ({exc})"}
            else:
                views = [(e[0], buf.views[e[0]], e[4]) for e in buf.job_entries(specs)]
                try:
                    write.result = dict(_write_rank_file(str(path), views, attrs), ok=True)
                except Exception as exc:  # noqa: BLE001 - agreed on below: every rank raises together
                    write.result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            pending.writes.append(write)
        pending.exposed_s = time.perf_counter() - t0
        self._pending = pending
        record = CheckpointRecord(step, pending.exposed_s, None, nbytes, False, None, stage_s)
        self._records.append(record)
        self._log("checkpoint_saved", step=step, mode=self.mode, exposed_s=pending.exposed_s,
                  stage_s=stage_s, waited_s=waited, bytes=nbytes, holder=self._holder,
                  wards=self._wards)
        if self._helper is None:
            self._finish(block=True)
            return self._records[-1]
        return record

    def ready(self) -> bool:
        """Whether this rank's part of the outstanding write's current phase is done.

        Local and non-blocking: the runtime reduces it over the ranks in the
        end-of-segment agreement and passes the outcome to :meth:`poll`.
        True when nothing is outstanding.
        """
        p = self._pending
        if p is None or self._helper is None:
            return True
        if p.phase == "write":
            for w in p.writes:
                if w.result is None:
                    w.result = self._helper.result(w.job or 0, block=False)
            return all(w.result is not None for w in p.writes)
        if self.comm.Get_rank() == 0 and p.commit is None:
            p.commit = self._helper.result(p.commit_job or 0, block=False)
            return p.commit is not None
        return True

    def poll(self, *, ready: bool | None = None) -> CheckpointRecord | None:
        """Commit the outstanding write if every rank's file is durable. Collective.

        Call at every segment boundary. Costs nothing when no write is
        outstanding (every rank knows, since saves are collective). With
        ``ready`` (the same on every rank: all ranks' :meth:`ready`) it
        communicates only when every rank is ready, so a commit lands at
        the first boundary after the last write ends. Without it: one small
        allgather at the 1st, 2nd, 4th, 8th and 16th poll after the save,
        then at every 16th.

        Returns:
            the record of the checkpoint committed by this call, or None.

        Raises:
            CheckpointError: on every rank, if a rank's write failed.
        """
        self._check_open()
        if self._pending is None or ready is False:
            return None
        return self._finish(block=False, backoff=ready is None)

    def drain(self) -> CheckpointRecord | None:
        """Wait for the outstanding write and commit it. Collective (end of run)."""
        self._check_open()
        if self._pending is None:
            return None
        return self._finish(block=True)

    # -- internals ----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("the checkpoint store is closed")

    def _log(self, event: str, **fields: Any) -> None:
        if self._events is not None:
            self._events.log(event, **fields)

    def _live_helper(self) -> _NodeWriter:
        """The node's writer, reached anew if it died (a failed write was already
        reported): the first rank of the node to find it gone starts another."""
        helper = self._procs[0]
        assert helper is not None
        if not helper.alive():
            self._log("checkpoint_writer_restarted", pid=helper.pid)
            helper.close(kill=True)
            helper = self._procs[0] = _NodeWriter(self.run_dir, node=self._node, nice=self._nice)
        return helper

    def _ensure_copy(self, ward: int, key: tuple[Any, ...]) -> _Buffer:
        buf = self._copies.get(ward)
        if buf is not None and buf.key == key:
            return buf
        self._drop_copy(ward)
        self._copies[ward] = buf = _Buffer(key, shared=self.mode == "async")
        return buf

    def _drop_copy(self, ward: int) -> None:
        buf = self._copies.pop(ward, None)
        if buf is None:
            return
        if self._helper is not None and buf.shm is not None:
            self._helper.forget(buf.shm.name)
        buf.close()

    def _prepare_dir(self, step: int, local_error: str | None) -> None:
        """Rank 0 retires checkpoints >= step and creates the step directory; all agree."""
        # A save at step S after a rollback: committed checkpoints >= S hold
        # an abandoned timeline; uncommit them before rank files are rewritten.
        if self.comm.Get_rank() == 0 and local_error is None:
            try:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                manifests, dirs = _writer.scan_steps(self.ckpt_dir)
                stale = sorted(s for s in manifests | dirs if s >= step)
                for s in stale:
                    _writer.remove_checkpoint(self.ckpt_dir, s)
                if stale:
                    self._log("checkpoint_superseded", step=step, removed=stale)
                # made durable by the manifest's commit (fsync of ckpt/ before the rename)
                (self.ckpt_dir / _writer.step_dir_name(step)).mkdir()
            except OSError as exc:
                local_error = f"cannot create checkpoint directory under {self.ckpt_dir}: {exc}"
        errors = self.comm.allgather(local_error)
        bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
        if bad:
            self._log("checkpoint_failed", step=step, reasons=bad)
            raise CheckpointError(f"checkpoint step {step} not started: " + "; ".join(bad))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")
