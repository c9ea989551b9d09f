"""Partner copies: each rank's checkpoint is staged in another rank's memory.

A checkpoint save sends each rank's state to its **holder** (another rank,
on another host when there is one), which receives it into a shared-memory
staging buffer; the holder's node writer writes the ward's rank file from
that buffer. So the partner copy *is* the staging buffer: a checkpoint costs
a rank one copy of a state, its ward's, beside its segment snapshot
(docs/internals.md, "Copies of the state"), and after a failure a rank's
state comes back from memory, its holder's, even when the rank itself died
(a replacement). When the holder died too, or holds another step, the files
are the fallback. With partner copies off (``--partner 0``) or one rank,
every rank holds its own copy.

Who holds whose copy (:func:`holders`): the ring shifted by the smallest
distance that puts every holder on another host, so every rank holds
exactly one copy (ranks packed by node, any number of equal nodes); when no
shift does, the next rank on another host (a rank may then hold several);
the next rank when every rank shares one host.

:func:`holders`, :func:`plan_restore` and :func:`choose_restore` are pure; :func:`exchange_layouts`
and :func:`transfer` communicate (collective calls are marked).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["holders", "wards_of", "plan_restore", "choose_restore", "exchange_layouts", "transfer",
           "restore_from_copies"]

_TAG = 7401


def holders(hosts: Sequence[str]) -> list[int]:
    """The rank that keeps each rank's copy (``hosts[r]``: rank r's host). Pure.

    A single rank holds its own copy.
    """
    n = len(hosts)
    if n <= 1:
        return list(range(n))
    if len(set(hosts)) > 1:
        for d in range(1, n):
            if all(hosts[(r + d) % n] != hosts[r] for r in range(n)):
                return [(r + d) % n for r in range(n)]
    out = []
    for r in range(n):
        other = next((o for o in ((r + d) % n for d in range(1, n)) if hosts[o] != hosts[r]),
                     (r + 1) % n)
        out.append(other)
    return out


def wards_of(rank: int, holder: Sequence[int]) -> list[int]:
    """The ranks whose copies ``rank`` keeps, given every rank's holder. Pure."""
    return [r for r, h in enumerate(holder) if h == rank]


#: What a rank tells the others before a restore from copies: its layout
#: when it needs its state back (else None), the copies it holds,
#: ``{ward: (step, layout)}``, and the step its own segment snapshot holds
#: (None: it has none to offer).
Offer = tuple[Any, Mapping[int, tuple[int, Any]], Any]


def plan_restore(table: Sequence[Offer], step: int) -> dict[int, int]:
    """Who gives whom their state of ``step``. Pure.

    Returns:
        ``{rank: source}`` for every rank that needs its state and can get
        it from memory: itself (its snapshot holds ``step``, or it holds its
        own copy) or a rank holding its copy of ``step`` in the same layout.
    """
    out = {}
    for r, (needs, _, snap) in enumerate(table):
        if needs is None:
            continue
        if snap == step:
            out[r] = r
            continue
        for h, (_, held, _) in enumerate(table):
            got = held.get(r)
            if got is not None and got[0] == step and got[1] == needs:
                out[r] = h
                break
    return out


def choose_restore(table: Sequence[Offer], committed: int,
                   staged: int | None = None, *,
                   staged_on_disk: bool = False) -> tuple[int, dict[int, int]]:
    """The step to restore and who gives whom, after a failure. Pure.

    ``staged`` is a newer checkpoint that every rank staged but whose commit
    no rank had heard of. It is taken when its manifest is on disk
    (``staged_on_disk``: rank 0's writer renamed it before the failure was
    seen, so it is committed; the ranks memory cannot serve read its
    files), or when memory holds every rank's state of it (a snapshot or a
    live holder's copy), so a failure during a write neither loses the
    steps since it nor reads the files. Otherwise the committed step, with
    the ranks memory cannot serve reading their files.
    """
    if staged is not None and staged > committed:
        plan = plan_restore(table, staged)
        if staged_on_disk or all(r in plan for r, offer in enumerate(table)
                                 if offer[0] is not None):
            return staged, plan
    return committed, plan_restore(table, committed)


def exchange_layouts(comm: Any, holder: int, wards: Sequence[int], mine: Any) -> dict[int, Any]:
    """Send this rank's layout to its holder, receive its wards'. Collective over ``comm``.

    ``mine`` is any picklable description (layout key and dataset specs).
    """
    req = comm.isend(mine, dest=holder, tag=_TAG)
    got = {w: comm.recv(source=w, tag=_TAG) for w in wards}
    req.wait()
    return got


def transfer(comm: Any, sends: Mapping[int, Sequence[np.ndarray]],
             recvs: Mapping[int, Sequence[np.ndarray]]) -> int:
    """Point-to-point arrays: ``sends[dest]`` to each dest, ``recvs[src]`` from each src.

    Every array is C-contiguous; the i-th array to one peer matches its i-th
    receive. Collective in effect: every rank calls it with the pairs the
    others expect. Returns the bytes received.
    """
    rreqs = [comm.Irecv(a, source=src, tag=_TAG + 1 + i)
             for src, arrays in recvs.items() for i, a in enumerate(arrays)]
    sreqs = [comm.Isend(a, dest=dest, tag=_TAG + 1 + i)
             for dest, arrays in sends.items() for i, a in enumerate(arrays)]
    # One by one, not Waitall: a dead peer then raises its own error class
    # (proc-failed, revoked), not ERR_IN_STATUS.
    for r in rreqs + sreqs:
        r.Wait()
    return sum(a.nbytes for arrays in recvs.values() for a in arrays)


def restore_from_copies(comm: Any, step: int, need: Any, held: Mapping[int, tuple[int, Any]],
                        views: Callable[[int], Sequence[np.ndarray]] | None,
                        into: Sequence[np.ndarray] | None, *, snap: int | None = None,
                        staged: int | None = None,
                        staged_on_disk: bool = False) -> tuple[int, int | None]:
    """Every rank that needs its state of checkpoint ``step`` (or of the newer
    ``staged`` one, see :func:`choose_restore`) gets it from memory. Collective.

    Args:
        need: this rank's layout when it needs its state, else None.
        held: the copies this rank holds, ``{ward: (step, layout)}``.
        views: the arrays of a held copy, by ward, in the layout's order.
        into: C-contiguous arrays to receive this rank's state into (when it
            needs it), in the layout's order.
        snap: the step this rank's own snapshot holds (it serves itself).
        staged: this rank's uncommitted, fully staged newer checkpoint.
        staged_on_disk: this rank found ``staged``'s manifest on disk (it
            committed as the failure struck); one such rank is enough.

    Returns:
        the step chosen (the same on every rank), and the rank this rank's
        state came from: itself (its snapshot when ``snap`` is that step,
        else its own copy, already in ``into``), another rank (received into
        ``into``), or None (nobody has it: read the files).
    """
    me = comm.Get_rank()
    table = comm.allgather((need, dict(held), snap, staged, staged_on_disk))
    stageds = {t[3] for t in table if t[1] or t[2] is not None}
    newer = stageds.pop() if len(stageds) == 1 else None
    step, plan = choose_restore([t[:3] for t in table], step, newer,
                                staged_on_disk=any(t[4] and t[3] == newer for t in table))
    src = plan.get(me)
    if src == me and snap != step:
        assert into is not None and views is not None
        for dst, a in zip(into, views(me)):
            np.copyto(dst, a)
    sends = {r: views(r) for r, h in plan.items()  # type: ignore[misc]
             if h == me and r != me}
    recvs = {src: into} if src is not None and src != me and into is not None else {}
    transfer(comm, sends, recvs)
    return step, src
