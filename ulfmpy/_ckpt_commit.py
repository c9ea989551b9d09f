"""The two-phase commit of a checkpoint, as the store's private mixin.

Private engine of :mod:`ulfmpy.checkpoint` (docs/architecture.md, "Checkpoints"). Phase 1: every rank's
file is durable, and all ranks agree on it (an allgather of each rank's
status; one failure fails the checkpoint on every rank). Phase 2: rank 0
writes the manifest under a temporary name, fsyncs it and renames it (in
async mode its helper process does, while compute continues) and tells every
rank the outcome (a broadcast). The rename is the commit point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ulfmpy import _ckpt_files as _files
from ulfmpy import _ckpt_helper as _writer
from ulfmpy._ckpt_async import WRITER_DIED, Buffer, NodeWriter
from ulfmpy.errors import CheckpointError, WriterLost

__all__ = ["CheckpointRecord"]

_PENDING, _DONE, _FAILED = 1, 2, 0
_POLL_EVERY = 16


@dataclass(frozen=True)
class CheckpointRecord:
    """One save. ``exposed_s`` and ``write_s`` are maxima over ranks, ``bytes`` a sum.

    Attributes:
        exposed_s: what the loop waited for: the slowest rank's :meth:`save`
            call (staging, plus any wait for the previous write) and this
            rank's time in the polls that advanced the commit. Until the
            commit it holds this rank's save time only.
        write_s: the slowest rank's file write, fsync included (None until
            committed).
        committed: whether the manifest's rename happened.
        path: the committed manifest.
        stage_s: this rank's staging copy, the part no design can hide.
        commit_s: this rank's time in :meth:`poll`/:meth:`drain` for it.
    """

    step: int
    exposed_s: float
    write_s: float | None
    bytes: int
    committed: bool
    path: str | None = None
    stage_s: float = 0.0
    commit_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The fields ``summary.json`` lists under ``checkpoints``."""
        return {k: getattr(self, k) for k in ("step", "exposed_s", "write_s", "bytes", "committed")}


@dataclass
class _Write:
    """One rank file of the outstanding checkpoint, written from a copy this rank holds."""

    ward: int                                   # whose file (this rank, or a ward it holds)
    specs: list[dict[str, Any]]                 # the ward's arrays, as it described them
    job: int | None = None                      # the helper job writing it
    result: dict[str, Any] | None = None        # ... and its result


@dataclass
class _Pending:
    """The outstanding checkpoint: its files being written, then its manifest."""

    step: int
    writes: list[_Write]
    exposed_s: float
    stage_s: float
    nbytes: int
    phase: str = "write"                        # "write", then "commit"
    commit_job: int | None = None               # rank 0: helper job writing the manifest
    commit: dict[str, Any] | None = None        # rank 0: the commit's outcome
    stats: dict[str, Any] | None = None         # rank 0: maxima/sums over ranks
    poll_s: float = 0.0                         # time spent in poll() on this checkpoint
    polls: int = 0                              # poll() calls so far (identical on all ranks)


class _Committer:
    """Phases of the outstanding checkpoint; mixed into :class:`CheckpointStore`."""

    comm: Any
    ckpt_dir: Path
    keep: int
    latency: int
    mode: str
    _pending: _Pending | None
    _copies: dict[int, Buffer]
    _records: list[CheckpointRecord]
    _meta_json: str

    @property
    def _helper(self) -> NodeWriter | None:
        raise NotImplementedError

    def _live_helper(self) -> NodeWriter:
        raise NotImplementedError

    def _log(self, event: str, **fields: Any) -> None:
        raise NotImplementedError

    def _finish(self, *, block: bool, charge: bool = True,
                backoff: bool = True) -> CheckpointRecord | None:
        """Advance the outstanding checkpoint: agree on the writes, then commit.

        Collective. With ``block`` it returns only once committed (or
        raises); otherwise it returns None while a phase is still running.
        ``charge`` adds the time spent here to the checkpoint's exposed time.
        """
        p = self._pending
        assert p is not None
        t0 = time.perf_counter()
        if not block and backoff:
            # Back off: communicate at the 1st, 2nd, 4th, 8th, 16th poll, then
            # every 16th. Every rank counts the same polls (poll is
            # collective), so all skip or all communicate; a long write
            # stretched out behind busy compute costs a handful of collectives,
            # and its commit lands at most 16 boundaries after the write ends.
            p.polls += 1
            if p.polls & (p.polls - 1) and p.polls % _POLL_EVERY:
                return None
        try:
            if p.phase == "write":
                if not self._agree_written(p, block):
                    return None
                self._start_commit(p)
            return self._await_commit(p, block, t0 if charge else None)
        finally:
            if charge:
                p.poll_s += time.perf_counter() - t0

    def _wait_without_spinning(self) -> None:
        """Wait for every rank here, sleeping instead of spinning. Collective.

        A rank done with its own write must not busy-poll in a blocking
        collective: a slower rank's helper may share its core, and at a low
        priority it would starve behind the spin. Communicators without
        ``Ibarrier`` (tests' fakes) skip the wait.
        """
        ibarrier = getattr(self.comm, "Ibarrier", None)
        if ibarrier is None:
            return
        req = ibarrier()
        delay = 1e-4
        while not req.Test():
            time.sleep(delay)
            delay = min(2 * delay, 5e-3)

    def _agree_written(self, p: _Pending, block: bool) -> bool:
        """Phase 1: every rank's file durable? Raises on every rank if one failed."""
        if self._helper is not None:
            for w in p.writes:
                if w.result is None:
                    w.result = self._helper.result(w.job or 0, block=block)
        failed = [w.result.get("error", "unknown error") for w in p.writes
                  if w.result is not None and not w.result.get("ok")]
        status: tuple[int, str | None]
        if failed:
            status = (_FAILED, "; ".join(failed))
        elif any(w.result is None for w in p.writes):
            status = (_PENDING, None)
        else:
            status = (_DONE, None)
        if block:
            self._wait_without_spinning()
        statuses = self.comm.allgather(status)
        worst = min(s for s, _ in statuses)
        if worst == _FAILED:
            if self._helper is not None:  # let every write end first
                for w in p.writes:
                    if w.result is None:
                        w.result = self._helper.result(w.job or 0, block=True)
            self.comm.Barrier()
            self._fail(p, [f"rank {r}: {m}" for r, (s, m) in enumerate(statuses) if s == _FAILED])
        return worst == _DONE

    def _start_commit(self, p: _Pending) -> None:
        """Phase 2 begins: rank 0 gathers the file list and writes the manifest.

        Each rank reports the files it wrote (its own, or its wards' from
        the copies it holds). In async mode rank 0's helper writes, fsyncs
        and renames the manifest while compute continues; a later poll
        learns the outcome.
        """
        rank = self.comm.Get_rank()
        mine = []
        for w in p.writes:
            assert w.result is not None
            mine.append({
                "rank": w.ward,
                "file": f"{_writer.step_dir_name(p.step)}/{_writer.rank_file_name(w.ward)}",
                "bytes": w.result["bytes"], "write_s": w.result["write_s"],
                "exposed_s": p.exposed_s,
                "entries": {s["name"]: {**{k: v for k, v in s.items()
                                           if k != "coords" or w.ward == 0},  # rank 0's suffice
                                        "checksum": w.result["checksums"][s["name"]]}
                            for s in w.specs}})
        gathered = self.comm.gather(mine, root=0)
        p.phase = "commit"
        if rank != 0:
            return
        infos = sorted((i for part in gathered for i in part), key=lambda i: i["rank"])
        p.stats = {"exposed_s": max(i["exposed_s"] for i in infos),
                   "write_s": max(i["write_s"] for i in infos),
                   "bytes": sum(int(i["bytes"]) for i in infos)}
        problem = _files.validate_infos(infos)
        if problem:
            p.commit = {"ok": False, "error": problem, "user_error": True}
            return
        job = {"ckpt_dir": str(self.ckpt_dir), "step": p.step, "infos": infos, "keep": self.keep,
               "latency": self.latency, "meta_json": self._meta_json,
               "attrs": dict(p.stats, mode=self.mode, created=time.time())}
        if self._helper is not None:
            try:
                p.commit_job = self._live_helper().submit(job, kind="commit")
            except OSError as exc:
                p.commit = {"ok": False, "error": f"cannot reach the checkpoint helper: {exc}"}
            return
        try:
            p.commit = dict(_writer.commit_checkpoint(**job), ok=True)
        except Exception as exc:  # noqa: BLE001 - reported to every rank
            p.commit = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _await_commit(self, p: _Pending, block: bool, t0: float | None) -> CheckpointRecord | None:
        """Phase 2 ends: rank 0 tells every rank whether the manifest's rename happened.

        The record's exposed time is the slowest rank's save plus the time
        this rank spent in polls of this checkpoint (``t0``: start of this one).
        """
        outcome: dict[str, Any] | None = None
        if self.comm.Get_rank() == 0:
            if p.commit is None and self._helper is not None:
                p.commit = self._helper.result(p.commit_job or 0, block=block)
            if p.commit is not None:
                outcome = dict(p.commit, **(p.stats or {}))
                if not outcome.get("ok") and not outcome.get("user_error"):
                    outcome["error"] = f"committing failed: {outcome.get('error')}"
        if block:
            self._wait_without_spinning()
        outcome = self.comm.bcast(outcome, root=0)
        if outcome is None:
            return None
        if not outcome["ok"]:
            self._fail(p, [outcome["error"] if outcome.get("user_error")
                           else f"rank 0: {outcome['error']}"],
                       hint="fix the app's state" if outcome.get("user_error") else None)
        self._pending = None
        for w in p.writes:
            buf = self._copies.get(w.ward)
            if buf is not None and buf.step == p.step:
                buf.committed = True
        first = (p.writes[0].result if p.writes else None) or {}
        poll_s = p.poll_s + (time.perf_counter() - t0 if t0 is not None else 0.0)
        record = CheckpointRecord(p.step, outcome["exposed_s"] + poll_s, outcome["write_s"],
                                  outcome["bytes"], True, outcome["path"], p.stage_s, poll_s)
        self._replace_record(record)
        self._log("checkpoint_committed", step=p.step, path=outcome["path"],
                  exposed_s=record.exposed_s, write_s=record.write_s, bytes=record.bytes,
                  poll_s=poll_s, manifest_s=outcome.get("commit_s"),
                  rank_write_s=first.get("write_s"), rank_fsync_s=first.get("fsync_s"),
                  rank_paced_s=first.get("paced_s", 0.0), rank_hurried=first.get("hurried"),
                  rank_bytes=p.nbytes)
        if outcome.get("pruned"):
            self._log("checkpoint_pruned", steps=outcome["pruned"], keep=self.keep)
        if outcome.get("prune_error"):
            self._log("checkpoint_prune_failed", error=outcome["prune_error"])
        return record

    def _fail(self, p: _Pending, reasons: list[str], hint: str | None = None) -> None:
        """Every rank: drop the failed checkpoint, record and raise."""
        self._pending = None
        for w in p.writes:
            if w.ward in self._copies:
                self._copies[w.ward].step = None
        if self.comm.Get_rank() == 0:  # never committed (or its commit is void): tidy up
            _writer.remove_checkpoint(self.ckpt_dir, p.step)
        self._replace_record(CheckpointRecord(p.step, p.exposed_s, None, p.nbytes, False, None,
                                              p.stage_s))
        lost = bool(reasons) and all(WRITER_DIED in r for r in reasons)
        self._log("checkpoint_failed", step=p.step, reasons=reasons, writer_died=lost)
        if lost:
            raise WriterLost(f"checkpoint step {p.step} was not committed: {WRITER_DIED} "
                             f"({'; '.join(reasons[:2])}{'; ...' if len(reasons) > 2 else ''}); "
                             "the next checkpoint starts a new writer, older ones are intact")
        hint = hint or f"check free space and permissions under {self.ckpt_dir}"
        raise CheckpointError(f"checkpoint step {p.step} failed and was not committed: "
                              + "; ".join(reasons)
                              + f". To fix: {hint}; older committed checkpoints are intact")

    def _replace_record(self, record: CheckpointRecord) -> None:
        for i in range(len(self._records) - 1, -1, -1):
            if self._records[i].step == record.step and not self._records[i].committed:
                self._records[i] = record
                return
        self._records.append(record)
