"""Which node a process is on: the real host, or a virtual node (docs/architecture.md, "Nodes on one machine"). Pure.

``--virtual-nodes K`` groups the job's processes into K named nodes
``node0 .. node{K-1}`` so that everything ulfmpy decides per node (node
kills, partner copies on another node, the zygote per node, the node count
behind ``--node-mtbf``) runs on one machine. Processes are placed in blocks
by their world rank at start, as ``mpirun`` fills nodes slot by slot: with
4 ranks, 1 spare and K=2, ranks 0-2 are on node0, rank 3 and the spare on
node1. A replacement spawned for logical rank L lives on L's node. When the
ranks really run on several hosts the real host names win.

Spares per node (:func:`spare_ranks`): the ``--spares`` waiting processes
are spread over the nodes, the last processes of each node, so that a
process crash finds a spare on its own node and a node loss leaves spares
elsewhere. A repair gives a dead rank's place to a spare on its node first
(:func:`ulfmpy.recovery.plan_repair`). On one node the spares are the last
world ranks, as before.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["virtual_node", "node_names", "spare_ranks"]


def node_names(k: int) -> tuple[str, ...]:
    """The names of K virtual nodes."""
    return tuple(f"node{j}" for j in range(k))


def virtual_node(world_rank: int, total: int, k: int) -> str:
    """The virtual node of the process started as ``world_rank`` of ``total``."""
    if not 0 < k <= total:
        raise ValueError(f"virtual nodes: need 1 <= K <= {total} processes, got {k}")
    return f"node{world_rank * k // total}"


def spare_ranks(hosts: Sequence[str], spares: int) -> tuple[int, ...]:
    """The world ranks that start as spares, spread over the nodes. Pure.

    ``hosts``: the node of every world rank. One spare per node per round,
    from the last node back (a node keeps at least one compute rank while
    another node still can give one), each node giving its last processes.
    Every rank computes the same answer from the same ``hosts``.
    """
    total = len(hosts)
    if not 0 <= spares < total:
        raise ValueError(f"spares: need 0 <= spares < {total} processes, got {spares}")
    order: list[str] = list(dict.fromkeys(hosts))
    members = {h: [w for w in range(total) if hosts[w] == h] for h in order}
    taken: dict[str, int] = {h: 0 for h in order}
    chosen: list[int] = []

    def take(h: str) -> None:
        taken[h] += 1
        chosen.append(members[h][-taken[h]])

    while len(chosen) < spares:
        before = len(chosen)
        for h in reversed(order):
            if len(chosen) < spares and len(members[h]) - taken[h] >= 2:
                take(h)
        if len(chosen) == before:  # every node is down to one process: empty some
            for h in reversed(order):
                if len(chosen) < spares and len(members[h]) - taken[h] >= 1:
                    take(h)
    return tuple(sorted(chosen))
