"""Which node a process is on: the real host, or a virtual node (DESIGN §13). Pure.

``--virtual-nodes K`` groups the job's processes into K named nodes
``node0 .. node{K-1}`` so that everything ulfmpy decides per node (node
kills, partner copies on another node, the zygote per node, the node count
behind ``--node-mtbf``) runs on one machine. Processes are placed in blocks
by their world rank at start, as ``mpirun`` fills nodes slot by slot: with
4 ranks, 1 spare and K=2, ranks 0-2 are on node0, rank 3 and the spare on
node1. A replacement spawned for logical rank L lives on L's node. When the
ranks really run on several hosts the real host names win.
"""

from __future__ import annotations

__all__ = ["virtual_node", "node_names", "node_of"]


def node_names(k: int) -> tuple[str, ...]:
    """The names of K virtual nodes."""
    return tuple(f"node{j}" for j in range(k))


def virtual_node(world_rank: int, total: int, k: int) -> str:
    """The virtual node of the process started as ``world_rank`` of ``total``."""
    if not 0 < k <= total:
        raise ValueError(f"virtual nodes: need 1 <= K <= {total} processes, got {k}")
    return f"node{world_rank * k // total}"


def node_of(*, uid: int, logical: int | None, total: int, k: int, host: str,
            stride: int) -> str:
    """This process's node: ``host`` without virtual nodes, else its block's name.

    ``uid``: world rank at start, or ``stride * n + j`` for a replacement,
    which takes the node of the logical rank it replaces.
    """
    if k <= 0:
        return host
    place = uid if uid < stride else (logical if logical is not None else 0)
    return virtual_node(place, total, k)
