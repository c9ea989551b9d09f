"""Partner copies: each rank keeps one other rank's checkpoint in memory.

When a rank dies, its replacement (a spare or a respawned process) would
otherwise read its block back from the HDF5 files. With partner copies the
rank that held the dead rank's copy sends it over MPI instead: no file
system, no h5py, just one message per state array. The copy is taken at
every checkpoint save, so it always matches a checkpoint on disk (which
stays the fallback: when the holder died too, or never got the step).

Who holds whose copy (:func:`holder_of`): the next rank in the ring that
sits on another host, so a node failure does not take both a block and its
copy; the next rank when every rank shares one host.

:func:`holder_of` and :func:`ward_of` are pure; :class:`PartnerCopies`
communicates (collective calls are marked).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ulfmpy.state import local_array, normalize_state

__all__ = ["holder_of", "ward_of", "PartnerCopies", "receive_copy", "plan_handover"]

_TAG = 7401
KEEP_STEPS = 2  # like the store: the newest committed and one in flight


def holder_of(rank: int, hosts: Sequence[str]) -> int:
    """The rank that keeps ``rank``'s copy: the next one on another host, else the next one."""
    size = len(hosts)
    for d in range(1, size):
        other = (rank + d) % size
        if hosts[other] != hosts[rank]:
            return other
    return (rank + 1) % size


def ward_of(rank: int, hosts: Sequence[str]) -> int | None:
    """The rank whose copy ``rank`` keeps (None if nobody's: only with one rank)."""
    for r in range(len(hosts)):
        if r != rank and holder_of(r, hosts) == rank:
            return r
    return None


class PartnerCopies:
    """This rank's copy of its ward's checkpoints, and the exchange that keeps it.

    Args:
        hosts: host name of every rank of the compute communicator (the
            layout the holder/ward roles come from).
        rank: this rank in that communicator.
    """

    def __init__(self, hosts: Sequence[str], rank: int) -> None:
        self.hosts = list(hosts)
        self.rank = rank
        self.holder = holder_of(rank, self.hosts)
        self.ward = ward_of(rank, self.hosts)
        # Wards map to one rank each only when the ring has no host gaps;
        # every rank that holds someone's copy is listed here.
        self.wards = [r for r in range(len(self.hosts))
                      if r != rank and holder_of(r, self.hosts) == rank]
        self.copies: dict[int, dict[int, dict[str, np.ndarray]]] = {}  # ward -> step -> arrays

    def steps(self, ward: int) -> list[int]:
        return sorted(self.copies.get(ward, {}))

    def exchange(self, comm: Any, step: int, state: Mapping[str, Any]) -> float:
        """Send this rank's state to its holder, receive the wards'. Collective over ``comm``.

        Call right after the checkpoint save of ``step`` (the state is the
        saved one). Returns the bytes received. Copies of steps >= ``step``
        (an abandoned future) and all but the newest older one are dropped.
        """
        entries = normalize_state(state)
        names = sorted(entries)
        # Every array's layout travels first: a ward's shapes are not ours.
        layout = [(n, local_array(entries[n]).shape, local_array(entries[n]).dtype.str) for n in names]
        req = comm.isend(layout, dest=self.holder, tag=_TAG)
        layouts = {w: comm.recv(source=w, tag=_TAG) for w in self.wards}
        req.wait()
        sends = [np.ascontiguousarray(local_array(entries[n])) for n in names]
        received = 0
        incoming: dict[int, dict[str, np.ndarray]] = {}
        rreqs = []
        for w in self.wards:
            kept = self._recycle(w, step)
            bufs = {}
            for i, (n, shape, dtype) in enumerate(layouts[w]):
                buf = kept.get(n)
                if buf is None or buf.shape != tuple(shape) or buf.dtype.str != dtype:
                    buf = np.empty(shape, dtype)
                bufs[n] = buf
                rreqs.append(comm.Irecv(buf, source=w, tag=_TAG + 1 + i))
                received += buf.nbytes
            incoming[w] = bufs
        sreqs = [comm.Isend(a, dest=self.holder, tag=_TAG + 1 + i) for i, a in enumerate(sends)]
        # One by one, not Waitall: a dead peer then raises its own error
        # class (proc-failed, revoked), not ERR_IN_STATUS.
        for r in rreqs + sreqs:
            r.Wait()
        for w, bufs in incoming.items():
            self.copies.setdefault(w, {})[step] = bufs
        return received

    def _recycle(self, ward: int, step: int) -> dict[str, np.ndarray]:
        """Drop copies that are no longer wanted; hand back buffers to reuse."""
        held = self.copies.get(ward, {})
        for s in [s for s in held if s >= step]:
            del held[s]
        free: dict[str, np.ndarray] = {}
        while len(held) >= KEEP_STEPS:
            free = held.pop(min(held))
        return free

    def send_to_replacement(self, comm: Any, ward: int, dest: int, step: int) -> None:
        """Send the held copy of ``ward`` at ``step`` to ``dest``. Point to point."""
        arrays = self.copies[ward][step]
        for i, n in enumerate(sorted(arrays)):
            comm.Send(arrays[n], dest=dest, tag=_TAG + 1 + i)


def plan_handover(table: Sequence[tuple[bool, Mapping[int, Sequence[int]]]],
                  step: int) -> dict[int, int]:
    """Who sends whom their copy of checkpoint ``step``. Pure.

    Args:
        table: per rank, ``(needs_a_copy, {ward: steps held})``.

    Returns:
        ``{replacement rank: holder rank}`` for every replacement whose copy
        of ``step`` is held by a rank that is not itself a replacement.
    """
    out = {}
    for r, (needs, _) in enumerate(table):
        if not needs:
            continue
        for h, (h_needs, held) in enumerate(table):
            if not h_needs and step in held.get(r, ()):
                out[r] = h
                break
    return out


def receive_copy(comm: Any, source: int, state: Mapping[str, Any]) -> None:
    """Receive this rank's state from the rank that held its copy, in place. Point to point."""
    entries = normalize_state(state)
    for i, n in enumerate(sorted(entries)):
        dest = local_array(entries[n])
        if dest.flags.c_contiguous:
            comm.Recv(dest, source=source, tag=_TAG + 1 + i)
        else:
            tmp = np.empty(dest.shape, dest.dtype)
            comm.Recv(tmp, source=source, tag=_TAG + 1 + i)
            np.copyto(dest, tmp)
