"""ULFM recovery steps as small functions: detect, revoke, agree, shrink.

Vocabulary from Fenix: recovery is *detection* (an MPI call fails with a
process-failure class; the detecting rank revokes), *communicator recovery*
(agree on the failure, shrink, then replace by policy), and *application
recovery* (restore and resume). Each rank learns its role.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from mpi4py import MPI

from ulfmpy.errors import UlfmUnavailable

__all__ = ["Role", "Member", "RepairPlan", "plan_repair", "ulfm_available", "revoke",
           "failed_ranks", "agree", "shrink"]


class Role(enum.Enum):
    """What a rank is after a repair."""

    INITIAL = "initial"      # started with the job, no failure seen yet
    SURVIVOR = "survivor"    # lived through a failure
    RECOVERED = "recovered"  # a spare or respawned process that took a dead rank's place


def ulfm_available(comm: MPI.Comm) -> bool:
    """True when the MPI implements the ULFM calls (Revoke, Shrink, Agree). Local."""
    try:
        comm.Is_revoked()
    except (NotImplementedError, MPI.Exception):
        return False
    return True


def _require(comm: MPI.Comm, what: str) -> None:
    if not ulfm_available(comm):
        raise UlfmUnavailable(
            f"{what} needs ULFM: use Open MPI >= 5 and launch with `mpirun --with-ft ulfm` "
            "(ulfmpy run does this); without it a dead rank ends the job and "
            "`ulfmpy run --max-restarts` relaunches it from the last checkpoint")


def revoke(comm: MPI.Comm) -> None:
    """Revoke ``comm`` so every rank's pending and future calls on it fail. Local.

    Revoking an already revoked communicator is harmless.
    """
    _require(comm, "revoke")
    try:
        comm.Revoke()
    except MPI.Exception:
        pass


def failed_ranks(comm: MPI.Comm) -> list[int]:
    """Ranks of ``comm`` this rank knows to have failed (acknowledging them). Local."""
    _require(comm, "failure detection")
    comm.Ack_failed()
    group = comm.Get_failed()
    try:
        n = group.Get_size()
        if n == 0:
            return []
        return list(MPI.Group.Translate_ranks(group, list(range(n)), comm.Get_group()))
    finally:
        group.Free()


def agree(comm: MPI.Comm, flag: int) -> int:
    """Fault-tolerant agreement: the bitwise AND of ``flag`` over live ranks.

    Collective over the live ranks of ``comm`` (works on a revoked
    communicator). Guards against ranks acting on different views of who
    failed.
    """
    _require(comm, "agree")
    return int(comm.Agree(int(flag)))


def shrink(comm: MPI.Comm) -> tuple[MPI.Comm, float]:
    """A new communicator of the live ranks of ``comm``, and the seconds it took.

    Collective over the live ranks of ``comm``; works on a revoked one. The
    new communicator returns errors (``ERRORS_RETURN``) like the old.
    """
    _require(comm, "shrink")
    t0 = time.perf_counter()
    new = comm.Shrink()
    new.Set_errhandler(MPI.ERRORS_RETURN)
    return new, time.perf_counter() - t0


@dataclass(frozen=True)
class Member:
    """What one live process tells the others at a repair."""

    uid: int                   # stable id: the world rank it started with
    logical: int | None        # its logical rank, None for a spare
    ckpt_step: int | None      # newest committed checkpoint it knows
    node: str = ""             # the node it runs on (real host or virtual node)
    layout: tuple[str, ...] = ()  # the node of each logical rank, as it last learnt


@dataclass(frozen=True)
class RepairPlan:
    """The outcome of :func:`plan_repair`, the same on every rank."""

    policy: str
    failed: tuple[int, ...]          # logical ranks that died
    assign: dict[int, int | None]    # uid -> new logical rank (None: spare)
    size: int                        # compute ranks after the repair
    replaced: dict[int, int]         # logical rank -> uid of the process that took it
    layout: tuple[str, ...] = ()     # the node of each logical rank after the repair


def _pick_spares(failed: tuple[int, ...], spares: list[int], layout: tuple[str, ...],
                 node: dict[int, str]) -> dict[int, int]:
    """Which spare takes which dead rank's place (spares per node, docs/architecture.md, "Nodes on one machine").

    A spare on the dead rank's node first, so the node's ranks stay together;
    else one from the node with the most spares left, so that no node is
    emptied of spares while another has several; ties go to the lowest uid.
    """
    left = list(spares)
    replaced: dict[int, int] = {}
    for r in failed:
        here = [u for u in left if node[u] == layout[r] and layout[r]]
        if here:
            uid = here[0]
        else:
            count = {n: sum(node[u] == n for u in left) for n in {node[u] for u in left}}
            uid = min(left, key=lambda u: (-count[node[u]], u))
        left.remove(uid)
        replaced[r] = uid
    return replaced


def plan_repair(members: list[Member], *, size: int, policies: tuple[str, ...],
                spawn_ok: bool = False) -> RepairPlan | None:
    """Decide how to go on after failures, from what every live process said. Pure.

    Every rank computes the same plan from the same (allgathered) members.

    Args:
        members: the live processes.
        size: compute ranks before the failure.
        policies: tried in order: ``spares`` (enough live spares take the dead
            ranks' places), ``respawn`` (new processes do; only when
            ``spawn_ok``), ``shrink`` (go on with the survivors).

    Returns:
        the plan, or None when no policy applies (relaunch from the checkpoint).
    """
    alive = sorted(m.logical for m in members if m.logical is not None)
    failed = tuple(r for r in range(size) if r not in set(alive))
    spares = sorted(m.uid for m in members if m.logical is None)
    keep = {m.uid: m.logical for m in members}
    node = {m.uid: m.node for m in members}
    # Every process last learnt the same layout; the lowest uid's is taken so
    # the plan is the same even if a failed repair left some behind.
    layout = next((m.layout for m in sorted(members, key=lambda m: m.uid)
                   if len(m.layout) == size), ("",) * size)
    for policy in policies:
        if policy == "spares" and failed and len(spares) >= len(failed):
            assign = dict(keep)
            replaced = _pick_spares(failed, spares, layout, node)
            assign.update({uid: r for r, uid in replaced.items()})
            new = list(layout)
            for r, uid in replaced.items():
                new[r] = node[uid]
            return RepairPlan("spares", failed, assign, size, replaced, tuple(new))
        if policy == "respawn" and failed and spawn_ok:
            # A replacement is started on the node of the rank it replaces.
            return RepairPlan("respawn", failed, dict(keep), size, {}, layout)
        if policy == "shrink" and alive:
            order = {old: new for new, old in enumerate(alive)}
            assign = {uid: (None if lg is None else order[lg]) for uid, lg in keep.items()}
            by_rank = {lg: node[uid] for uid, lg in keep.items() if lg is not None}
            return RepairPlan("shrink", failed, assign, len(alive), {},
                              tuple(by_rank[r] for r in alive))
    return None
