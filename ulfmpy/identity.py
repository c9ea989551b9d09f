"""What a rank *is*: one small record handed to every mechanism (docs/architecture.md, "Who decides where a segment ends").

A repair does not rewrite a rank's attributes in place; it returns a new
:class:`Identity` (``dataclasses.replace``), so every mechanism sees one
consistent view: the communicators, the logical rank, the process's uid,
its role, and the app with its state and snapshot.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ulfmpy.recovery import Role

__all__ = ["Identity", "Work", "build_work", "with_replay", "open_world", "initial_identity"]


@dataclass(frozen=True)
class Identity:
    """A process of the job. Local.

    Attributes:
        world: every live process of the job, spares included (ERRORS_RETURN).
        compute: the compute ranks (or the spares, on a spare).
        replay: the compute ranks' communicator for replay traffic, or None.
        uid: the process's id for its lifetime (world rank at start;
            ``100000 * n + k`` for the k-th process of the n-th respawn).
        logical: the rank it computes as, or None on a spare.
        size: the number of compute ranks.
        role: INITIAL, SURVIVOR or RECOVERED (docs/architecture.md, "In-job recovery").
        respawns: how many respawns the job has done.
        layout: the node of each logical rank (spares per node, docs/architecture.md, "Nodes on one machine").
        spare_slot: j for the j-th spare the job started with (faults
            address it as logical rank ``size + j``), else None.
    """

    world: Any
    compute: Any
    replay: Any
    uid: int
    logical: int | None
    size: int
    role: Role = Role.INITIAL
    respawns: int = 0
    layout: tuple[str, ...] = ()
    spare_slot: int | None = None

    @property
    def is_spare(self) -> bool:
        return self.logical is None

    @property
    def rank(self) -> int:
        """The logical rank, -1 on a spare."""
        return self.logical if self.logical is not None else -1

    def replace(self, **changes: Any) -> "Identity":
        return dataclasses.replace(self, **changes)


@dataclass
class Work:
    """The app a rank runs, the state it carries and its snapshot buffers. Local.

    Rebuilt (not edited) when the factory runs again after a repair.
    """

    app: Any
    state: dict[str, Any]
    view: Any
    snap: Any


class _AppView:
    """The app as detectors see it, with a ``Runtime(invariant=...)`` override."""

    def __init__(self, app: Any, invariant: Any, bounds: Any = None) -> None:
        self._app, self._invariant, self._bounds = app, invariant, bounds

    def __getattr__(self, name: str) -> Any:
        if name == "invariant" and self._invariant is not None:
            return lambda: self._invariant(self._app)
        if name == "bounds" and self._bounds and not getattr(self._app, "bounds", None):
            return self._bounds  # --bounds, for an app that sets none
        return getattr(self._app, name)


def build_work(factory: Any, comm: Any, *, invariant: Any = None, snapshot: bool = True,
               bounds: Any = None) -> Work:
    """Run the app's factory on ``comm`` and wrap what it built. Local (the
    factory may communicate: then collective, as the app's own set-up is)."""
    from ulfmpy.segment import Snapshot
    from ulfmpy.state import normalize_state

    app = factory(comm)
    state = normalize_state(app.state)
    return Work(app, state, _AppView(app, invariant, bounds), Snapshot(state) if snapshot else None)


def _same_memory(a: Any, b: Any) -> bool:
    return (a is b or (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
                       and a.ctypes.data == b.ctypes.data))


def sync_state(work: Work) -> None:
    """Follow the arrays ``app.state`` names now: an app may swap buffers between
    steps (``u, unew = unew, u``), so the snapshot, restore, checkpoints and the
    fingerprint read the state by name at every boundary, not the arrays first
    seen. ``work.state`` is updated in place (every holder sees the new arrays);
    the snapshot's buffers stay (same shapes: nothing is allocated). Local.

    Raises:
        ConfigError: the state's names, an array's shape or dtype, or a
            block's place in the global array changed.
    """
    from ulfmpy.errors import ConfigError
    from ulfmpy.state import Block, local_array, normalize_state

    cur, raw = work.state, work.app.state
    try:
        if len(raw) == len(cur) and all(
                _same_memory(local_array(raw[k]), local_array(v)) for k, v in cur.items()):
            return  # the common case: the same arrays
    except (KeyError, TypeError, AttributeError):
        pass  # normalize_state below names the problem
    new = normalize_state(raw)
    if list(new) != list(cur):
        raise ConfigError(f"app.state changed its names from {sorted(cur)} to {sorted(new)}; "
                          "it must name the same arrays at every step (swap buffers, keep names)")
    for name, old in cur.items():
        a, b = local_array(old), local_array(new[name])
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ConfigError(f"app.state[{name!r}] changed from {a.dtype}{list(a.shape)} to "
                              f"{b.dtype}{list(b.shape)}; a swapped array must have the same "
                              "shape and dtype")
        if isinstance(old, Block) != isinstance(new[name], Block) or (
                isinstance(old, Block) and (old.start, old.global_shape)
                != (new[name].start, new[name].global_shape)):
            raise ConfigError(f"app.state[{name!r}] moved in the global array; a swapped block "
                              "must cover the same cells")
    cur.update(new)


def with_replay(me: Identity) -> Identity:
    """A duplicate of the compute communicator for replay traffic, so it never
    matches a message of the live run (docs/architecture.md, "Segments and local rollback"). Collective over ``me.compute``."""
    from mpi4py import MPI

    replay = me.compute.Dup()
    replay.Set_errhandler(MPI.ERRORS_RETURN)
    return me.replace(replay=replay)


def open_world(user_comm: Any, config: Any) -> tuple[Any, str]:
    """The runtime's duplicate of the job's communicator, and the run directory.

    Collective over ``user_comm``: errors are returned (ULFM needs it), the
    settings are checked equal on every rank, rank 0 picks the run
    directory when none is set and creates it before anyone uses it.
    """
    import os

    from mpi4py import MPI

    world = user_comm.Dup()
    world.Set_errhandler(MPI.ERRORS_RETURN)
    run_dir = config.run_dir
    if run_dir is None:
        from ulfmpy.launch import default_run_dir

        run_dir = world.bcast(default_run_dir() if world.Get_rank() == 0 else None, root=0)
    config.check_uniform(world)
    if world.Get_rank() == 0:
        os.makedirs(os.path.abspath(run_dir), exist_ok=True)
    world.Barrier()
    return world, os.path.abspath(run_dir)


def initial_identity(world: Any, size: int, hosts: Any) -> Identity:
    """At the start: the spares are spread over the nodes (``hosts``: the node
    of every world rank, :func:`ulfmpy.nodes.spare_ranks`); the other world
    ranks compute, in world-rank order. Collective."""
    from mpi4py import MPI

    from ulfmpy.nodes import spare_ranks

    uid = world.Get_rank()
    spares = spare_ranks(hosts, len(hosts) - size)
    computing = [w for w in range(len(hosts)) if w not in spares]
    logical = computing.index(uid) if uid in computing else None
    compute = world.Split(0 if logical is not None else 1, uid)
    compute.Set_errhandler(MPI.ERRORS_RETURN)
    return Identity(world, compute, None, uid, logical, size,
                    layout=tuple(hosts[w] for w in computing),
                    spare_slot=spares.index(uid) if uid in spares else None)
