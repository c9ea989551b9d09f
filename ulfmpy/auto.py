"""``import ulfmpy.auto``: the inline loop's port in two lines.

::

    import ulfmpy.auto                     # 1: the program runs inside a Runtime
    ...
    for it in ulfmpy.range(steps, state=lambda: {"u": u}):   # 2: the loop

Importing this module enters a :class:`~ulfmpy.runtime.Runtime` over
``MPI.COMM_WORLD`` (collective: every rank of the job imports it, at the
same point of the program) and leaves it when the program ends, as if the
whole program after the import stood in ``with ulfmpy.Runtime(MPI.COMM_WORLD):``.
So from the import on ``MPI.COMM_WORLD`` is the resilient communicator,
the set-up code's calls are logged for a replacement's fast-forward, and
a spare waits inside the import (an idle one ends there: none of the
program after it runs). ``import ulfmpy.auto`` also binds the name
``ulfmpy``. Settings come from ``ulfmpy run``'s flags or ``ULFMPY_*``
variables; a program that passes keywords to its runtime, or changes its
rank count (shrink, N→M restore), uses the factory form instead
(``docs/architecture.md``, "The inline loop").

Where the block ends: ``ulfmpy run`` starts ranks under ``ulfmpy._rank``,
which calls :func:`leave` when the program returns or raises. Started
another way (``mpirun python app.py``, a respawned rank under ``python -m
mpi4py``) the end is the interpreter's: an uncaught exception reaches
:func:`leave` through ``sys.excepthook``, a normal end through a callback
that runs after the program and before any ``atexit`` handler, so what the
runtime registers there runs in the same order as after a ``with`` block.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from mpi4py import MPI

from ulfmpy.runtime import Runtime

__all__ = ["runtime", "leave"]

runtime = Runtime(MPI.COMM_WORLD)
_left = False


def leave(exc: BaseException | None = None) -> None:
    """Leave the import's runtime as a ``with`` block would, once.
    Collective like ``Runtime.__exit__``."""
    global _left
    if _left:
        return
    _left = True
    runtime.__exit__(None if exc is None else type(exc), exc,
                     None if exc is None else exc.__traceback__)


def _excepthook(etype: Any, exc: BaseException, tb: Any) -> None:
    leave(exc)  # ends the job under ULFM; otherwise the error is printed as usual
    _previous_hook(etype, exc, tb)


def _at_end() -> None:
    leave(None)


runtime.__enter__()
_previous_hook = sys.excepthook
sys.excepthook = _excepthook
# threading's exit callbacks run when the program is done, before atexit's:
# Runtime.__exit__ registers atexit handlers that must still run.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_at_end)
else:  # pragma: no cover (every supported Python has it)
    import atexit

    atexit.register(_at_end)
