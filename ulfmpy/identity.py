"""What a rank *is*: one small record handed to every mechanism (DESIGN §8).

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

__all__ = ["Identity", "Work"]


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
        role: INITIAL, SURVIVOR or RECOVERED (DESIGN §5).
        respawns: how many respawns the job has done.
    """

    world: Any
    compute: Any
    replay: Any
    uid: int
    logical: int | None
    size: int
    role: Role = Role.INITIAL
    respawns: int = 0

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
