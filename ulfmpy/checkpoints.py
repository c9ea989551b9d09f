"""Checkpoint coordination (docs/architecture.md, "Checkpoints"): open, resume, save at a boundary,
global rollback, and the ordered choice of restore sources after a repair.

The HDF5 store itself (two-phase commit, async helper, files) is
:mod:`ulfmpy.checkpoint`; this module decides *when* and *from where*, for
one rank. Calls marked Collective are made by every compute rank together.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from ulfmpy.errors import GlobalRollback, RestoreError, RetriesExhausted, WriterLost
from ulfmpy.partner import PartnerCopies, plan_handover, receive_copy

__all__ = ["Checkpoints", "RestoreContext", "RESTORE_SOURCES"]


def enabled(config: Any) -> bool:
    """Whether the run takes global checkpoints. Pure."""
    c = config
    return c.resilience and (c.ckpt_every > 0 or c.ckpt_seconds > 0 or c.mtbf > 0
                             or c.node_mtbf > 0)


class Checkpoints:
    """One rank's checkpoint coordination. Local object.

    Args:
        config: the run's settings.
        run_dir: the run directory.
        events: the rank's event log.
        hooks: fault-injection hooks (kills in the checkpoint phase).
    """

    def __init__(self, config: Any, run_dir: str, events: Any, hooks: Any) -> None:
        self.config, self.run_dir, self.events, self.hooks = config, run_dir, events, hooks
        self.store: Any = None
        self.partners: PartnerCopies | None = None
        self.global_rollbacks: list[dict[str, Any]] = []
        self.restored_from: dict[str, Any] | None = None
        self._delta_ns = 0  # the last save's exposed time, reported once
        self._reported: int | None = None  # the last commit reported to the planner
        self.node: str | None = None  # the virtual node, whose own writer serves this rank

    # -- open and resume ------------------------------------------------------------
    def open(self, comm: Any, state: dict[str, Any]) -> None:
        """Open the store for ``state`` when checkpoints are on. Local.

        The node's writer is reached (started by the node's first rank) but
        not waited for: it imports at idle priority, and a first save queued
        before it is ready waits in its queue (docs/architecture.md,
        "Checkpoints").
        """
        if self.store is not None or not enabled(self.config):
            return
        from ulfmpy.checkpoint import CheckpointStore

        cfg = self.config
        self.store = CheckpointStore(comm, self.run_dir, keep=cfg.ckpt_keep, mode=cfg.ckpt_mode,
                                     events=self.events, meta={"config": cfg.as_dict()},
                                     node=self.node)
        self.store.prepare(state)

    def resume(self, comm: Any, state: dict[str, Any], start: int) -> int:
        """Restore ``--resume`` (none, auto, a path) into ``state``. Collective."""
        src = self.config.resume
        if src == "none":
            return start
        from ulfmpy.checkpoint import restore

        source = self.run_dir if src == "auto" else src
        rec = restore(comm, source, state, events=self.events)
        if rec is None:
            self.events.log("resume_none", source=source, reason="no committed checkpoint: fresh start")
            return start
        self.restored_from = {"step": rec.step, "path": rec.path, "fallbacks": rec.fallbacks,
                              "seconds": rec.seconds, "ckpt_ranks": rec.nranks}
        return rec.step

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    # -- at a boundary -----------------------------------------------------------------
    def plan_slots(self) -> tuple[int, int]:
        """This rank's (last exposed save time in ns, write unfinished) for the agreement. Local."""
        delta, self._delta_ns = self._delta_ns, 0
        if self.store is None:
            return delta, 0
        return delta, 0 if self.store.ready() else 1

    def at_boundary(self, comm: Any, me: Any, step: int, state: dict[str, Any], *,
                    save: bool, writes_ready: bool, hosts: list[str]) -> tuple[Any, bool]:
        """At a committed boundary: commit a finished write; save when decided. Collective.

        Returns the record of a checkpoint that committed here (or None),
        and whether this boundary saved.
        """
        store = self.store
        if store is None:
            return None, False
        self._surviving_the_writer(store.poll, ready=writes_ready)
        if not save:
            return self._newly_committed(), False
        if any(r.step == step and r.committed for r in store.records):
            # Re-running after a rollback: this step is already safe on disk
            # (replay is deterministic), and re-saving would first delete it.
            self.events.log("checkpoint_skipped", step=step, reason="already committed")
            return self._newly_committed(), False
        if store.mode == "sync":
            self.hooks.kill_point("checkpoint", step)
        rec = self._surviving_the_writer(store.save, step, state)
        if rec is None:  # the write before it was lost with the writer: nothing is pending now
            rec = store.save(step, state)
        if store.mode == "async":
            # Staged and handed to the helper, not committed: the worst moment.
            self.hooks.kill_point("checkpoint", step)
        self._delta_ns = max(1, int(rec.exposed_s * 1e9))
        if self.config.partner and me.size > 1:
            t0 = time.perf_counter()
            if self.partners is None:
                self.partners = PartnerCopies(hosts, me.rank)
            got = self.partners.exchange(comm, step, state)
            self.events.log("partner_copy", step=step, holder=self.partners.holder,
                            wards=self.partners.wards, bytes=got,
                            seconds=time.perf_counter() - t0)
        return self._newly_committed(), True

    def _newly_committed(self) -> Any:
        """The newest checkpoint committed since the last call (by a poll, or
        inside a save that first committed the write before it), or None."""
        last = self.store.last_committed
        if last is None or last.step == self._reported:
            return None
        self._reported = last.step
        return last

    def save_at_halt(self, comm: Any, state: dict[str, Any], step: int) -> None:
        """A halt with checkpoints off: one ordinary, synchronous checkpoint of
        ``step``, so the halted run can resume. Collective."""
        if self.store is not None or not self.config.resilience:
            return
        self._sync_store(comm, state).save(step, state)

    def save_final(self, comm: Any, state: dict[str, Any], step: int) -> None:
        """``--ckpt-final``: the state after the last step as a committed
        checkpoint (unless the schedule just saved that step). Collective."""
        if not self.config.ckpt_final or not self.config.resilience:
            return
        store = self.store if self.store is not None else self._sync_store(comm, state)
        if not any(r.step == step for r in store.records):
            store.save(step, state)

    def _sync_store(self, comm: Any, state: dict[str, Any]) -> Any:
        from ulfmpy.checkpoint import CheckpointStore

        cfg = self.config
        self.store = CheckpointStore(comm, self.run_dir, keep=cfg.ckpt_keep, mode="sync",
                                     events=self.events, meta={"config": cfg.as_dict()})
        self.store.prepare(state)
        return self.store

    def drain(self) -> None:
        """End of run: wait for the outstanding write and commit it. Collective."""
        if self.store is not None:
            self._surviving_the_writer(self.store.drain)

    def _surviving_the_writer(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``call``; a checkpoint lost with the node's writer is logged, not
        raised (every rank learns it in the same agreement). Collective."""
        try:
            return call(*args, **kwargs)
        except WriterLost as exc:
            self.events.log("checkpoint_writer_lost", error=str(exc))
            return None

    # -- global rollback ---------------------------------------------------------------
    def global_rollback(self, comm: Any, state: dict[str, Any], gr: GlobalRollback,
                        count: int) -> int:
        """Restore the newest committed checkpoint on every rank. Collective."""
        store = self.store
        hint = ("no committed checkpoint to roll back to: enable global checkpoints "
                "(--ckpt-every N) or raise --max-retries")
        if store is None:
            raise RetriesExhausted(f"{gr}; {hint}")
        if count > 1 + self.config.max_retries:
            raise RetriesExhausted(f"{gr}; {count - 1} global rollbacks did not cure it either")
        from ulfmpy.checkpoint import restore, restore_from_memory

        t0 = time.perf_counter()
        copy = store.memory_copy()
        held = comm.allgather(copy.step if copy is not None else None)
        if copy is not None and len(set(held)) == 1:
            restore_from_memory(state, copy)
            step, how = copy.step, "memory"
        else:
            # A save staged over the in-memory copy (the run had rolled back
            # before): the files still hold every committed checkpoint.
            got = restore(comm, self.run_dir, state, events=self.events)
            if got is None:
                raise RetriesExhausted(f"{gr}; {hint}")
            step, how = got.step, "file"
        rec = {"step": step, "from_segment": gr.first, "reason": str(gr), "how": how,
               "seconds": time.perf_counter() - t0, "lost_steps": gr.first - step}
        self.global_rollbacks.append(rec)
        self.events.log("global_rollback", **rec)
        return step

    # -- after a repair ----------------------------------------------------------------
    def last_committed_step(self) -> int | None:
        last = self.store.last_committed if self.store is not None else None
        return last.step if last is not None else None

    def restore_after_repair(self, comm: Any, me: Any, ctx: "RestoreContext",
                             build: Callable[[], Any], work: Any) -> tuple[Any, str]:
        """Application recovery: the state back to checkpoint ``ctx.target``. Collective.

        Tries the restore sources of :data:`RESTORE_SOURCES` in order; the
        partner handover before it is collective (holders send, replacements
        receive). Returns the (possibly rebuilt) work and the source used.
        """
        if ctx.same_layout and self.store is not None and ctx.target is not None:
            ctx.copy = self.store.memory_copy(ctx.target)
        if self.store is not None:
            self.store.reset(comm)
        if ctx.copy is None or work is None:
            work = build()
        ctx.state = work.state
        if (ctx.target is not None and self.config.partner and me.size > 1
                and ctx.policy in (None, "spares", "respawn")):
            ctx.partner_source = self._partner_handover(comm, me, ctx.target, ctx.replacement)
        self.partners = None  # holder and ward roles follow the new layout
        how = "factory"
        if ctx.target is not None:
            for name, source in RESTORE_SOURCES:
                if source(ctx, comm, self):
                    how = name
                    break
        if how != "memory":
            from ulfmpy.segment import Snapshot

            work.snap = Snapshot(work.state)
        if self.store is None:
            self.open(comm, work.state)
        else:
            self.store.prepare(work.state)
        return work, how

    def _partner_handover(self, comm: Any, me: Any, target: int, replacement: bool) -> int | None:
        """Hand each replacement its partner copy of checkpoint ``target``.

        Collective over the repaired compute communicator (same size and
        logical ranks as before: spares or respawn). Holders send; returns,
        on a replacement, the rank to receive from (None: read the files).
        Roles change with the new layout, so every rank drops its copies
        afterwards; the next checkpoint makes new ones.
        """
        held = {}
        if self.partners is not None and not replacement:
            held = {w: self.partners.steps(w) for w in self.partners.wards}
        senders = plan_handover(comm.allgather((replacement, held)), target)
        for r, h in senders.items():
            if h == me.rank:
                assert self.partners is not None
                self.partners.send_to_replacement(comm, r, r, target)
        self.partners = None
        self.events.log("partner_handover", step=target, senders=senders)
        return senders.get(me.rank) if replacement else None


@dataclass
class RestoreContext:
    """What a restore after a repair knows; the sources read it. Local.

    Attributes:
        target: the checkpoint step to restore (None: no checkpoint yet).
        policy: the repair policy (None: a respawned process joining).
        same_layout: this rank keeps its logical rank and the rank count.
        replacement: this process takes a failed rank's place.
        copy: this rank's in-memory copy of ``target``, if it has one.
        partner_source: the rank sending this replacement its partner copy.
        state: the state to restore into.
    """

    target: int | None
    policy: str | None
    same_layout: bool
    replacement: bool
    copy: Any = None
    partner_source: int | None = None
    state: Any = None

    @classmethod
    def after(cls, plan: Any, target: int | None, *, old_logical: int | None,
              logical: int | None) -> "RestoreContext":
        """The context after a repair by ``plan`` (None: a respawned process joining)."""
        policy = plan.policy if plan is not None else None
        return cls(target=target, policy=policy,
                   same_layout=policy in ("spares", "respawn") and old_logical == logical,
                   replacement=old_logical is None)


def _from_memory(ctx: RestoreContext, comm: Any, ck: Checkpoints) -> bool:
    """Survivors keeping their place: their in-memory copy, no file I/O."""
    if ctx.copy is None:
        return False
    from ulfmpy.checkpoint import restore_from_memory

    restore_from_memory(ctx.state, ctx.copy)
    return True


def _from_partner(ctx: RestoreContext, comm: Any, ck: Checkpoints) -> bool:
    """A replacement whose partner holds its copy: received, no file I/O."""
    if ctx.partner_source is None:
        return False
    receive_copy(comm, ctx.partner_source, ctx.state)
    return True


def _from_local_file(ctx: RestoreContext, comm: Any, ck: Checkpoints) -> bool:
    """Same rank count: this rank's own block of the checkpoint's files."""
    if not (ctx.same_layout or ctx.replacement):
        return False
    from ulfmpy import _ckpt_files as files
    from ulfmpy._ckpt_restore import _load

    step, rank = ctx.target, comm.Get_rank()
    manifest = files.read_manifest(os.path.join(ck.run_dir, "ckpt", f"step-{step:08d}.h5"))
    problem = _load(manifest, ctx.state, rank, comm.Get_size())
    if problem:
        raise RestoreError(f"rank {rank} cannot read its block of checkpoint {step}: {problem}")
    return True


def _from_files_n_to_m(ctx: RestoreContext, comm: Any, ck: Checkpoints) -> bool:
    """A new rank count (shrink): every rank reads its new block from the global view."""
    from ulfmpy.checkpoint import restore

    restore(comm, os.path.join(ck.run_dir, "ckpt", f"step-{ctx.target:08d}.h5"), ctx.state,
            events=ck.events)
    return True


#: The restore sources after a repair, tried in order (docs/architecture.md, "Checkpoints" and "Who decides where a segment ends").
RESTORE_SOURCES: tuple[tuple[str, Callable[[RestoreContext, Any, Checkpoints], bool]], ...] = (
    ("memory", _from_memory),
    ("partner", _from_partner),
    ("file", _from_local_file),
    ("file N->M", _from_files_n_to_m),
)
