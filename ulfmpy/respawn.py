"""The respawn policy (docs/architecture.md, "In-job recovery"): spawn replacements, merge, hand them who they are;
and the node's zygote that lets a replacement start warm.

Open MPI's spawn with ULFM is fragile (finalize crashes unless the
intercommunicators are disconnected), so every intercommunicator is
disconnected as soon as the merge is done.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from typing import Any

from mpi4py import MPI

__all__ = ["spawn_replacements", "join_job", "joined_identity", "start_zygote", "stop_zygote", "UID_STRIDE"]

#: A respawned process's uid: ``UID_STRIDE * n + k`` for the k-th of the n-th respawn.
UID_STRIDE = 100_000

# Read by a replacement to report its start-up (the zygote resets both in the fork).
_IMPORTED_AT = time.time()
_WARM = False
# The node's zygote this process started (one for all its Runtimes).
_ZYGOTE: dict[str, Any] = {"job": None, "name": None, "proc": None, "atexit": False}


def _spawn_one(comm: MPI.Comm, command: str, args: list[str], k: int, n: int) -> tuple[MPI.Comm, float, float]:
    """Spawn one process and merge it in as ``comm``'s last rank, telling it
    it is the ``k``-th of ``n``. Collective over ``comm`` (``command`` and
    ``args`` count at rank 0 only). Returns the merged communicator and the
    spawn and merge times; ``comm`` is left to the caller."""
    t0 = time.perf_counter()
    inter = comm.Spawn(command, args=args, maxprocs=1, root=0)
    inter.Set_errhandler(MPI.ERRORS_RETURN)
    t1 = time.perf_counter()
    merged = inter.Merge(high=False)
    merged.Set_errhandler(MPI.ERRORS_RETURN)
    t2 = time.perf_counter()
    merged.bcast({"k": k, "n": n, "command": command, "args": args}
                 if merged.Get_rank() == 0 else None, root=0)
    inter.Disconnect()
    return merged, t1 - t0, t2 - t1


def _spawn_rest(comm: MPI.Comm, command: str, args: list[str], first: int,
                n: int) -> tuple[MPI.Comm, float, float]:
    """Spawn replacements ``first``..``n-1`` one at a time, each merged into
    the communicator the previous ones grew. Collective over ``comm``, which
    is left to the caller; the intermediate communicators are freed."""
    spawn_s = merge_s = 0.0
    cur = comm
    for k in range(first, n):
        nxt, s, m = _spawn_one(cur, command, args, k, n)
        spawn_s, merge_s = spawn_s + s, merge_s + m
        if cur is not comm:
            cur.Free()
        cur = nxt
    return cur, spawn_s, merge_s


def spawn_replacements(world: MPI.Comm, plan: Any, *, target: int | None, respawns: int,
                       zygote_name: str | None, run_dir: str,
                       config: Any, virtual: bool = False,
                       halt_times: Any = (None, None),
                       setup_log: bool = False) -> tuple[MPI.Comm, Any, dict[str, float]]:
    """Spawn replacements for the dead ranks and merge them in.

    Collective over the live processes of ``world``. Returns the merged
    world, the plan completed with the replacements' uids, and the spawn
    and merge times. The old ``world`` is freed. ``setup_log`` tells the
    replacements to fast-forward through the inline loop's set-up code.

    Each replacement is a job of its own, spawned by the communicator the
    ones before it joined (docs/internals.md, "Open MPI behaviour worked
    around"): Open MPI 5.0's next spawn fails in the child's ``MPI_Init``
    (``dpm.c``, "Not supported") and leaves the parents waiting for ever
    once one process of a multi-process spawned job has died while another
    lives on.
    """
    from ulfmpy import zygote

    n = len(plan.failed)
    command, args = zygote.spawn_command(zygote_name, ["-m", "mpi4py", *sys.argv])
    merged, spawn_s, merge_s = _spawn_rest(world, command, args, 0, n)
    times = {"spawn_s": spawn_s, "merge_s": merge_s, "spawns": n}
    new_uids = [UID_STRIDE * respawns + k for k in range(n)]
    assign = dict(plan.assign)
    replaced = {}
    for r, uid in zip(plan.failed, new_uids):
        assign[uid] = r
        replaced[r] = uid
    info = {"new_uids": new_uids, "assign": assign, "size": plan.size, "target": target,
            "run_dir": run_dir, "config": config.as_dict(), "respawns": respawns,
            "zygote": zygote_name, "layout": list(plan.layout), "virtual": virtual,
            "halt": list(halt_times), "setup": setup_log}
    merged.bcast(info if merged.Get_rank() == 0 else None, root=0)
    try:
        world.Free()
    except MPI.Exception:
        pass
    return merged, dataclasses.replace(plan, assign=assign, replaced=replaced), times


def join_job(parent: MPI.Comm) -> tuple[MPI.Comm, dict[str, Any], dict[str, Any]]:
    """A spawned replacement joins the job. Collective with the parents' repair.

    Returns the merged world, what the parents sent (uids, assignment,
    size, target step, run dir, config, and ``spawn_index``: which of the
    replacements this one is) and the join's timestamps. A replacement
    spawned before the last one takes part in spawning the rest.
    """
    t_merge = time.time()
    merged = parent.Merge(high=True)
    merged.Set_errhandler(MPI.ERRORS_RETURN)
    chain = merged.bcast(None, root=0)
    # Keeping the intercommunicator open was seen to crash Open MPI's finalize.
    parent.Disconnect()
    joined = {"imported_at": _IMPORTED_AT, "warm": _WARM, "merge_called_at": t_merge,
              "merged_at": time.time()}
    world, _, _ = _spawn_rest(merged, chain["command"], chain["args"], chain["k"] + 1,
                              chain["n"])
    if world is not merged:
        merged.Free()
    info = world.bcast(None, root=0)
    return world, dict(info, spawn_index=chain["k"]), joined


def start_zygote(world: MPI.Comm, *, run_dir: str, events: Any, wanted: bool,
                 node: str | None = None) -> str | None:
    """Make sure the node's zygote (:mod:`ulfmpy.zygote`) runs; return its name.

    With respawn in the recovery chain (``wanted``), the lowest rank of each
    node starts it: one per process for all its Runtimes, stopped at
    interpreter exit. ``node``: this process's virtual node (``--virtual-nodes``),
    which then has a zygote of its own. Collective over ``world``.
    """
    from ulfmpy import zygote

    if not (wanted and zygote.available()):
        return None
    if world.Get_rank() == 0 and _ZYGOTE["job"] is None:
        _ZYGOTE["job"] = f"{os.getpid()}-{time.time_ns() % 10**12}"
    name = zygote.name_for(world.bcast(_ZYGOTE["job"], root=0))
    if node is None:
        local = world.Split_type(MPI.COMM_TYPE_SHARED)
    else:
        # Abstract socket names are per machine: each virtual node's differs.
        name = f"{name}-{node}"
        local = world.Split(int(node.removeprefix("node")), world.Get_rank())
    leader = local.Get_rank() == 0
    local.Free()
    proc = _ZYGOTE["proc"]
    if leader and (proc is None or proc.poll() is not None or _ZYGOTE["name"] != name):
        stop_zygote()
        log = os.path.join(run_dir, f"zygote-{node or socket.gethostname()}.log")
        proc = zygote.start(name, watch=os.getppid(), log=log)
        _ZYGOTE.update(proc=proc, name=name)
        events.log("zygote", name=name, pid=getattr(proc, "pid", None))
        if not _ZYGOTE["atexit"]:
            import atexit

            atexit.register(stop_zygote)
            _ZYGOTE["atexit"] = True
    return name


def stop_zygote() -> None:
    """Ask the zygote this process started to leave. Local; at exit."""
    proc, name = _ZYGOTE["proc"], _ZYGOTE["name"]
    _ZYGOTE.update(proc=None, name=None)
    if proc is None or proc.poll() is not None:
        return
    from ulfmpy import zygote

    zygote.stop(name)  # it leaves once its children (replacements) have
    try:
        proc.wait(timeout=0.05)
    except Exception:  # not yet: it also leaves on its own once the launcher's daemon has
        pass


def joined_identity(parent: MPI.Comm) -> tuple[Any, dict[str, Any]]:
    """A spawned replacement joins the job: its identity and what it was told.

    Collective with the parents' repair (:func:`spawn_replacements`): the
    merge, the parents' broadcast, then the split of the compute ranks.
    """
    from ulfmpy.identity import Identity
    from ulfmpy.recovery import Role

    world, info, joined = join_job(parent)
    uid = info["new_uids"][info["spawn_index"]]
    logical = info["assign"][uid]
    compute = world.Split(0, logical)
    compute.Set_errhandler(MPI.ERRORS_RETURN)
    me = Identity(world, compute, None, uid, logical, info["size"], role=Role.RECOVERED,
                  respawns=info["respawns"], layout=tuple(info.get("layout", ())))
    return me, dict(info, joined=joined)
