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
from pathlib import Path
from typing import Any, Callable

from ulfmpy import partner as _partner
from ulfmpy.errors import GlobalRollback, RestoreError, RetriesExhausted, WriterLost

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
        self._hosts: tuple[str, ...] | None = None  # the layout the holders follow
        self.global_rollbacks: list[dict[str, Any]] = []
        self.latent_rollbacks: list[dict[str, Any]] = []
        self.restored_from: dict[str, Any] | None = None
        self._delta_ns = 0  # the last save's exposed time, reported once
        self._reported: int | None = None  # the last commit reported to the planner
        self.node: str | None = None  # the virtual node, whose own writer serves this rank

    # -- open and resume ------------------------------------------------------------
    def open(self, comm: Any, state: dict[str, Any], hosts: list[str]) -> None:
        """Open the store for ``state`` when checkpoints are on. Local.

        ``hosts``: every rank's host (virtual node), the layout partner
        copies follow. The node's writer is started (by the node's first
        rank) but not waited for: it imports at idle priority until the
        first save needs it (docs/architecture.md, "Checkpoints").
        """
        if self.store is not None or not enabled(self.config):
            return
        from ulfmpy.checkpoint import CheckpointStore

        cfg = self.config
        self._hosts = tuple(hosts)
        self.store = CheckpointStore(comm, self.run_dir, keep=cfg.ckpt_keep, mode=cfg.ckpt_mode,
                                     events=self.events, meta={"config": cfg.as_dict()},
                                     node=self.node, holders=self._holders(hosts, comm))
        self.store.latency = self.latency
        if cfg.ckpt_every:
            self.keep_for_latency(cfg.ckpt_every)
        self.store.prepare(state)

    @property
    def latency(self) -> int:
        """The longest declared detection latency (steps; 0: none)."""
        return max((d.latency_steps() for d in self.config.diagnostics()), default=0)

    def keep_for_latency(self, interval_steps: int) -> None:
        """Keep ⌈D/T⌉ + 1 committed checkpoints (DESIGN §4) for a latency of D
        steps and checkpoints every T: more than ``--ckpt-keep`` when the
        latency needs it (logged). Local (rank 0's store prunes)."""
        latency = self.latency
        if self.store is None or not latency or interval_steps < 1:
            return
        from ulfmpy.interval import retained_checkpoints

        need = retained_checkpoints(period=float(interval_steps), latency=float(latency))
        if need > self.store.keep:
            self.events.log("ckpt_keep_raised", old=self.store.keep, new=need, latency=latency,
                            interval_steps=interval_steps,
                            reason="a late diagnosis may need a checkpoint older than the latency")
            self.store.keep = need

    def relayout(self, comm: Any, state: dict[str, Any], hosts: list[str]) -> None:
        """After a repair: partner roles for the repaired layout, buffers ready. Local."""
        if self.store is None:
            self.open(comm, state, hosts)
            return
        self._follow(hosts, comm)
        self.store.prepare(state)

    def _holders(self, hosts: list[str], comm: Any) -> list[int] | None:
        if not self.config.partner or comm.Get_size() <= 1:
            return None
        return _partner.holders(hosts)

    def _follow(self, hosts: list[str], comm: Any) -> None:
        if tuple(hosts) != self._hosts:
            self._hosts = tuple(hosts)
            self.store.set_holders(self._holders(hosts, comm))

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

    def at_boundary(self, comm: Any, me: Any, step: int, work: Any, *,
                    save: bool, writes_ready: bool, hosts: list[str]) -> tuple[Any, bool]:
        """At a committed boundary: commit a finished write; save when decided. Collective.

        A save copies the state once, into the segment snapshot of the
        segment that starts here (it would copy the same bytes a moment
        later), and stages the checkpoint from that copy in its holder's
        memory (docs/internals.md, "Copies of the state").

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
        work.snap.take(step, fresh=True)
        self._follow(hosts, comm)
        data = work.snap.data
        rec = self._surviving_the_writer(store.save, step, work.state, data=data)
        if rec is None:  # the write before it was lost with the writer: nothing is pending now
            rec = store.save(step, work.state, data=data)
        if store.mode == "async":
            # Staged and handed to the helper, not committed: the worst moment.
            self.hooks.kill_point("checkpoint", step)
        self._delta_ns = max(1, int(rec.exposed_s * 1e9))
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
    def global_rollback(self, comm: Any, work: Any, gr: GlobalRollback, count: int) -> int:
        """Restore the newest committed checkpoint on every rank. Collective."""
        store = self.store
        hint = ("no committed checkpoint to roll back to: enable global checkpoints "
                "(--ckpt-every N) or raise --max-retries")
        last = store.last_committed if store is not None else None
        if last is None:
            raise RetriesExhausted(f"{gr}; {hint}")
        if count > 1 + self.config.max_retries:
            raise RetriesExhausted(f"{gr}; {count - 1} global rollbacks did not cure it either")
        from ulfmpy.checkpoint import restore

        t0 = time.perf_counter()
        _, how = self._restore_copies(comm, work, last.step, need=True)
        if all(comm.allgather(how is not None)):
            step = last.step
        else:
            # A copy staged over since (a save after a rollback), or a holder
            # without it: the files hold every committed checkpoint.
            got = restore(comm, self.run_dir, work.state, events=self.events)
            if got is None:
                raise RetriesExhausted(f"{gr}; {hint}")
            step, how = got.step, "file"
            work.snap.fresh = None
        rec = {"step": step, "from_segment": gr.first, "reason": str(gr), "how": how,
               "seconds": time.perf_counter() - t0, "lost_steps": gr.first - step}
        self.global_rollbacks.append(rec)
        self.events.log("global_rollback", **rec)
        return step

    def latent_rollback(self, comm: Any, work: Any, err: Any) -> int | None:
        """A diagnostic found an error up to ``err.latency`` steps old: restore
        the newest committed checkpoint at or before ``err.detected_at -
        err.latency`` on every rank, from its files. Collective.

        Newer checkpoints may hold the error: they are removed (a relaunch
        must not resume from one), the write in flight is abandoned, and
        copies in memory of newer steps are dropped. Returns the step
        restored, or None when no checkpoint is old enough (the caller goes
        back to the loop's start).
        """
        from ulfmpy._ckpt_files import list_checkpoints
        from ulfmpy.checkpoint import restore

        t0 = time.perf_counter()
        limit = err.detected_at - err.latency
        store = self.store
        if store is not None:
            store.reset(comm)  # the write in flight may hold the error
            store.forget_after(limit)
        plan = None
        if comm.Get_rank() == 0:
            committed = [c.step for c in list_checkpoints(self.run_dir) if c.committed]
            safe = [c for c in committed if c <= limit]
            plan = (max(safe) if safe else None, sorted(c for c in committed if c > limit))
            from ulfmpy import _ckpt_helper as writer

            for c in plan[1]:
                writer.remove_checkpoint(Path(self.run_dir) / "ckpt", c)
        target, removed = comm.bcast(plan, root=0)
        step = None
        if target is not None:
            restore(comm, os.path.join(self.run_dir, "ckpt", f"step-{target:08d}.h5"), work.state,
                    events=self.events)
            work.snap.fresh = None
            step = target
        rec = {"detected_at": err.detected_at, "latency": err.latency, "detector": err.detector,
               "finding": err.finding, "step": step, "skipped": removed,
               "seconds": time.perf_counter() - t0}
        self.latent_rollbacks.append(rec)
        self.events.log("latent_rollback", **rec)
        return step

    def _drop_abandoned_future(self, comm: Any, step: int) -> None:
        """The run goes on from ``step``: committed checkpoints after it on disk
        belong to the timeline the repair abandoned (a commit the writer
        finished as the rank died). Rank 0 removes them, or they would take
        the place of a checkpoint the run still relies on when the next commit
        prunes, and a relaunch would resume from them. Local (rank 0 acts)."""
        if comm.Get_rank() != 0:
            return
        from ulfmpy._ckpt_files import list_checkpoints
        from ulfmpy import _ckpt_helper as writer

        newer = [c.step for c in list_checkpoints(self.run_dir) if c.step > step]
        for c in newer:
            writer.remove_checkpoint(Path(self.run_dir) / "ckpt", c)
        if newer:
            self.events.log("checkpoint_superseded", step=step, removed=newer,
                            reason="written for the timeline the repair abandoned")

    def _restore_copies(self, comm: Any, work: Any, step: int, *, need: bool,
                        own_snapshot: bool = True, staged: int | None = None,
                        staged_on_disk: bool = False) -> tuple[int, str | None]:
        """This rank's state back to checkpoint ``step`` from memory, where some
        rank holds it: its own snapshot, its own copy, or its holder's.
        Collective over ``comm`` (every rank serves the copies it holds).

        ``staged``: this rank's newer checkpoint that was staged but had not
        committed when a rank died; taken instead when memory holds every
        rank's state of it, or when its manifest is on disk
        (``staged_on_disk``; :func:`ulfmpy.partner.choose_restore`).

        Returns the step restored (the same on every rank), and "memory"
        (this rank's own memory), "partner" (another rank's) or None (read
        the files).
        """
        from ulfmpy._ckpt_async import layout_key

        snap, store = work.snap, self.store
        step, src = _partner.restore_from_copies(
            comm, step, layout_key(work.state) if need else None,
            store.held(staged=staged is not None) if store is not None else {},
            store.copy_views if store is not None else None,
            snap.buffers if need else None,
            snap=snap.step if own_snapshot else None, staged=staged,
            staged_on_disk=staged_on_disk)
        if src is None:
            return step, None
        snap.filled(step)
        return step, "memory" if src == comm.Get_rank() else "partner"

    # -- after a repair ----------------------------------------------------------------
    def last_committed_step(self) -> int | None:
        last = self.store.last_committed if self.store is not None else None
        return last.step if last is not None else None

    def restore_after_repair(self, comm: Any, me: Any, ctx: "RestoreContext",
                             build: Callable[[], Any], work: Any) -> tuple[Any, str]:
        """Application recovery: the state back to checkpoint ``ctx.target``. Collective.

        Survivors that keep their logical rank keep their app; replacements,
        a new rank count and a restart from the loop's start build it anew.
        With the ranks' numbers kept (spares, respawn), every rank first
        takes its state from memory where some rank holds it (collective);
        then the sources of :data:`RESTORE_SOURCES` in order. Returns the
        (possibly rebuilt) work and the source used; ``ctx.target`` is the
        step restored, newer than the one asked when a checkpoint staged in
        memory everywhere had not committed yet. Call :meth:`relayout` once
        the repaired layout is known.
        """
        same_ranks = ctx.policy in (None, "spares", "respawn")
        staged = manifest = None
        if self.store is not None:
            staged = self.store.pending_step
            self.store.reset(comm, same_ranks=same_ranks)
        if staged is not None:
            from ulfmpy._ckpt_writers import manifest_name

            # The write in flight may have committed as the rank died (rank
            # 0's writer renamed its manifest, the rename is the commit
            # point): the run then goes on from it, not from the one before.
            manifest = str(self.store.ckpt_dir / manifest_name(staged))
        on_disk = manifest is not None and os.path.exists(manifest)
        if ctx.target is None or not same_ranks:
            # Files serve a shrink, and the first checkpoint may be the one
            # that committed: the newest manifest any rank found (ctx.target
            # is agreed, so every rank or none takes this collective).
            found = max(comm.allgather(staged if on_disk else -1))
            if found >= 0 and (ctx.target is None or found > ctx.target):
                ctx.target = found
        if work is None or not ctx.same_layout or ctx.target is None:
            work = build()
        ctx.state = work.state
        work.snap.fresh = None
        how = "factory"
        if ctx.target is not None:
            if same_ranks:
                ctx.target, ctx.from_memory = self._restore_copies(
                    comm, work, ctx.target, need=ctx.same_layout or ctx.replacement,
                    own_snapshot=ctx.same_layout, staged=staged, staged_on_disk=on_disk)
            # Taken for its manifest, or from memory: committed if the
            # manifest is there now (once any rank saw it, every rank does).
            if manifest is not None and ctx.target == staged and os.path.exists(manifest):
                self.store.adopt_committed(staged, manifest)
            for name, source in RESTORE_SOURCES:
                if source(ctx, comm, self):
                    how = name
                    break
            self._drop_abandoned_future(comm, ctx.target)
        self.events.log("restore_source", step=ctx.target, how=how,
                        holder=self.store.holder if self.store is not None else None)
        return work, how


@dataclass
class RestoreContext:
    """What a restore after a repair knows; the sources read it. Local.

    Attributes:
        target: the checkpoint step to restore (None: no checkpoint yet).
        policy: the repair policy (None: a respawned process joining).
        same_layout: this rank keeps its logical rank and the rank count.
        replacement: this process takes a failed rank's place.
        from_memory: where the state already came back from memory
            ("memory": this rank's own, "partner": its holder's), or None.
        state: the state to restore into.
    """

    target: int | None
    policy: str | None
    same_layout: bool
    replacement: bool
    from_memory: str | None = None
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
    """This rank's own memory: the snapshot of a segment that began at the
    checkpoint, or its own staged copy (partner copies off)."""
    return ctx.from_memory == "memory"


def _from_partner(ctx: RestoreContext, comm: Any, ck: Checkpoints) -> bool:
    """The copy another rank (its holder) staged for it: received, no file I/O."""
    return ctx.from_memory == "partner"


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


#: The restore sources after a repair, tried in order (docs/architecture.md,
#: "Restore sources after a repair"). The first two were filled in one
#: collective step before (:meth:`Checkpoints._restore_copies`).
RESTORE_SOURCES: tuple[tuple[str, Callable[[RestoreContext, Any, Checkpoints], bool]], ...] = (
    ("memory", _from_memory),
    ("partner", _from_partner),
    ("file", _from_local_file),
    ("file N->M", _from_files_n_to_m),
)
