"""Fault-injection hooks of a running rank: one object, a no-op when nothing is planned.

The runtime calls the hooks at fixed points (after each step, at each kill
phase, while a spare waits); :func:`hooks_for` returns :class:`NoFaults`
when the plan is empty, so a fault-free run pays one method call that
returns at once. Injected flips of the current segment are kept in
``flips`` (steps of first executions) for the segment protocol to count
and to classify as cured or escaped at the commit. Local.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from ulfmpy.inject import FaultPlan, kill_self

__all__ = ["FaultHooks", "NoFaults", "hooks_for"]


class NoFaults:
    """The hooks of a rank with no planned fault: each returns at once."""

    active = False

    def __init__(self) -> None:
        self.flips: list[int] = []

    def after_step(self, step: int, state: Mapping[str, Any], *, replay: bool,
                   logical: int | None) -> None:
        pass

    def kill_point(self, phase: str, step: int) -> None:
        pass

    def timed_kill(self, step: int | None) -> None:
        pass


class FaultHooks(NoFaults):
    """The hooks of a rank with a fault plan (``--inject``).

    Args:
        plan: the rank's :class:`~ulfmpy.inject.FaultPlan`.
        events: the rank's event log.
        uid: the process's uid (recorded in fired markers).
        size: compute ranks (``kill:mtbf`` picks its victim among them).
        host: this node's name (``kill:node=HOST``).
        t0: the process's start (``perf_counter``) for timed kills.
        whoami: the logical rank this process computes as now (``n + j``
            for the j-th spare while it waits): faults address logical ranks.
    """

    active = True

    def __init__(self, plan: FaultPlan, events: Any, *, uid: int, size: int, host: str,
                 t0: float, whoami: Callable[[], int] | None = None) -> None:
        super().__init__()
        self.plan, self.events, self.uid, self.host, self.t0 = plan, events, uid, host, t0
        self.whoami = whoami or (lambda: plan.rank)
        self._mtbf_kill = plan.mtbf_kill(size)
        self._node_kills = any(getattr(f, "node", None) for f in plan.kills)
        self.size = size
        self._streams = [[f, None, 0] for f in plan.streams()]  # fault, origin, next kill

    def _fire(self, f: Any, step: int | None, phase: str, **extra: Any) -> None:
        self.plan.mark_fired(f, self.whoami(), step=step, phase=phase, uid=self.uid, **extra)
        if getattr(f, "stall", 0):
            self.events.log("inject", kind="stall", spec=f.spec, step=step, phase=phase,
                            logical=self.whoami(), execution=1, seconds=f.stall)
            time.sleep(f.stall)
            return
        self.events.log("inject", kind="kill", spec=f.spec, step=step, phase=phase,
                        logical=self.whoami(), execution=1)
        self.events.close()
        kill_self()

    def _stream_kill(self, step: int, logical: int) -> None:
        """The next kill of each ``stream=1`` fault that is due: this process
        fires it when it holds the victim's logical rank; kills another
        process fired (their markers) are passed over."""
        import json
        import os

        from ulfmpy.jobctl import launch_id

        launch = launch_id() or "x"
        for entry in self._streams:
            f, origin, k = entry
            if origin is None:
                origin = entry[1] = self.plan.stream_origin(f, launch)
                if origin is None:
                    continue
            elapsed = time.time() - origin
            while True:
                victim, at = self.plan.stream_kill(f, self.size, k)
                if at > elapsed:
                    break
                marker = self.plan.stream_marker(f, launch, k)
                if marker is not None and os.path.exists(marker):
                    k += 1
                    continue
                if victim != logical:
                    break  # due, but the victim's process fires it
                entry[2] = k + 1
                if marker is not None:
                    with open(marker, "w", encoding="utf-8") as fh:
                        json.dump({"spec": f.spec, "rank": logical, "k": k, "at_s": at,
                                   "step": step, "uid": self.uid}, fh)
                        fh.flush()
                        os.fsync(fh.fileno())
                self.events.log("inject", kind="kill", spec=f.spec, step=step, phase="mtbf",
                                logical=logical, execution=1, stream_k=k, at_s=at)
                self.events.close()
                kill_self()
            entry[2] = k

    def kill_point(self, phase: str, step: int) -> None:
        f = self.plan.kill_due(step, phase, host=self.host, rank=self.whoami())
        if f is not None:
            self._fire(f, step, phase)

    def timed_kill(self, step: int | None) -> None:
        f = self.plan.timed_kill_due(time.perf_counter() - self.t0, self.whoami())
        if f is not None:
            self._fire(f, step, "at")
        if step is None and self._node_kills:
            # A waiting spare (``step`` None) dies with its node.
            f = self.plan.node_down(self.host, self.whoami())
            if f is not None:
                self._fire(f, None, "node")

    def after_step(self, step: int, state: Mapping[str, Any], *, replay: bool,
                   logical: int | None) -> None:
        if not replay:
            self.kill_point("compute", step)
            self.timed_kill(step)
            if self._mtbf_kill is not None and self._mtbf_kill[1] == logical:
                f, _, at = self._mtbf_kill
                if self.plan.fired(f):
                    # Another process held this logical rank and was the victim.
                    self._mtbf_kill = None
                elif time.perf_counter() - self.t0 >= at:
                    self._mtbf_kill = None
                    self._fire(f, step, "mtbf", at_s=at)
            if self._streams and logical is not None:
                self._stream_kill(step, logical)
        else:
            self.kill_point("rollback", step)
        for rec in self.plan.flips_after_step(step, state, replay=replay, rank=self.whoami()):
            self.events.log("inject", **rec)
            if rec["execution"] == 1:
                self.flips.append(step)


def hooks_for(plan: FaultPlan, events: Any, *, uid: int, size: int, host: str,
              t0: float, whoami: Callable[[], int] | None = None) -> NoFaults:
    """The hooks for ``plan``: :class:`NoFaults` when it plans nothing. Local."""
    if not plan.faults:
        return NoFaults()
    return FaultHooks(plan, events, uid=uid, size=size, host=host, t0=t0, whoami=whoami)
