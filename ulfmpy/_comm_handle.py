"""``rt.comm`` is an ``mpi4py.MPI.Intracomm`` (docs/internals.md, "rt.comm is an mpi4py communicator").

The resilient communicator subclasses mpi4py's ``Intracomm`` so it goes
wherever mpi4py expects one (``MPI.File.Open(rt.comm, ...)``, ``mpi4py.util``,
h5py's ``mpio`` driver). Its MPI handle is the communicator it runs on; a
repair replaces that communicator, so the handle is rewritten in place:
mpi4py keeps it in the object's first field after the Python header and
offers no setter. :func:`set_handle` checks that layout (the field must hold
the handle mpi4py reports) before every write and after it, and refuses
with a clear error otherwise. Every mpi4py method ulfmpy does not define is
routed through the communicator's check (:func:`install_guards`): it passes
through outside segments and is refused inside one, as before.
"""

from __future__ import annotations

import ctypes
import inspect
from typing import Any

from mpi4py import MPI

__all__ = ["set_handle", "install_guards", "free_quietly", "shim_mpi", "unshim_mpi",
           "genuine_world"]

_OFFSET = object.__basicsize__  # PyObject_HEAD: mpi4py's ob_mpi comes next


def set_handle(obj: MPI.Comm, comm: MPI.Comm) -> None:
    """Make ``obj`` (a Python subclass of ``MPI.Intracomm``) refer to ``comm``'s
    MPI communicator. Local; neither object is freed or duplicated."""
    field = ctypes.c_void_p.from_address(id(obj) + _OFFSET)
    if (field.value or 0) != obj.handle:
        raise RuntimeError(
            "ulfmpy: this mpi4py keeps a communicator's handle where ulfmpy does not "
            f"expect it (mpi4py {MPI.Get_library_version().splitlines()[0]!r}); rt.comm "
            "cannot follow repairs. Report it with `python -c 'import mpi4py; "
            "print(mpi4py.__version__)'`")
    field.value = comm.handle
    if obj.handle != comm.handle:  # pragma: no cover - the check above holds
        raise RuntimeError("ulfmpy: could not point rt.comm at the repaired communicator")


def free_quietly(comms: Any) -> None:
    """Free each communicator (None skipped); one that is already broken
    (a dead peer, revoked) has nothing left to free. Local."""
    for c in comms:
        if c is not None:
            try:
                c.Free()
            except MPI.Exception:
                pass


def install_guards(cls: type, guard: Any, keep: frozenset[str]) -> None:
    """Route every instance method of ``MPI.Intracomm`` that ``cls`` does not
    define itself (nor names in ``keep``) through ``guard(self, name)``,
    which returns the callable to use or raises."""
    own: set[str] = set()
    for k in cls.__mro__:
        if k.__module__.startswith("ulfmpy"):
            own |= set(vars(k))
    for name in dir(MPI.Intracomm):
        if name.startswith("_") or name in own or name in keep:
            continue
        attr = inspect.getattr_static(MPI.Intracomm, name)
        if isinstance(attr, (classmethod, staticmethod, property)) or not callable(attr) \
                or type(attr).__name__ in ("getset_descriptor", "member_descriptor",
                                           "classmethod_descriptor"):
            continue  # properties, class and static methods act on no instance

        def method(self: Any, *args: Any, _name: str = name, **kwargs: Any) -> Any:
            return guard(self, _name)(*args, **kwargs)

        method.__name__ = method.__qualname__ = name
        method.__doc__ = f"mpi4py's ``Comm.{name}``: passes through outside segments."
        setattr(cls, name, method)


# -- the names an app's code reaches inside the with block -------------------------
_SAVED: list[tuple[Any, Any]] = []


def shim_mpi(comm: Any, request_cls: type) -> None:
    """Inside ``with ulfmpy.Runtime(...)``: ``MPI.COMM_WORLD`` is ``rt.comm``
    and ``MPI.Request`` ulfmpy's request class, so set-up code and
    ``MPI.Request.Waitall(reqs)`` in the loop need no change (Relight's idea:
    shim the API). Local; :func:`unshim_mpi` puts mpi4py's back."""
    _SAVED.append((MPI.COMM_WORLD, MPI.Request))
    MPI.COMM_WORLD = comm
    MPI.Request = request_cls


def unshim_mpi() -> None:
    if _SAVED:
        MPI.COMM_WORLD, MPI.Request = _SAVED.pop()


def genuine_world() -> Any:
    """mpi4py's own COMM_WORLD, shimmed or not (for ulfmpy's own use)."""
    return _SAVED[0][0] if _SAVED else MPI.COMM_WORLD
