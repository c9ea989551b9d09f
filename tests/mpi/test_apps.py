"""The apps' communication under ulfmpy, 4 ranks: a logged step makes the
same MPI calls as the plain one (the hydro's per-step Allreduce costs no
extra message), and the steps on the resilient communicator compute the same.

Run: mpirun -n 4 python -m mpi4py -m pytest --with-mpi tests/mpi/test_apps.py
"""

from collections import Counter

import numpy as np
import pytest
from mpi4py import MPI

from apps.circuit import Circuit, CircuitSpec
from apps.hydro import Hydro, HydroSpec
from conftest import all_true

pytestmark = pytest.mark.mpi(min_size=2)

CALLS = ("Allreduce", "Isend", "Irecv", "Send", "Recv", "Sendrecv", "Bcast", "Barrier",
         "allreduce", "isend", "irecv", "send", "recv", "Iallreduce", "Allgather")


class Counting:
    """A communicator's stand-in that counts the calls made on it."""

    def __init__(self, comm):
        self._c = comm
        self.calls = Counter()

    def __getattr__(self, name):
        attr = getattr(self._c, name)
        if name in CALLS:
            def counted(*args, **kwargs):
                self.calls[name] += 1
                return attr(*args, **kwargs)
            return counted
        return attr


APPS = {"hydro": (Hydro, HydroSpec(zones=12)),
        "circuit": (Circuit, CircuitSpec(pieces=8, nodes=20, wires=60))}


@pytest.mark.parametrize("name", list(APPS))
def test_a_logged_step_makes_the_plain_steps_mpi_calls(rc, name):
    cls, spec = APPS[name]
    steps = 5
    plain_comm = MPI.COMM_WORLD.Dup()
    plain = Counting(plain_comm)
    app = cls(plain, spec)
    for _ in range(steps):
        app.step()
    c, _ = rc
    under = Counting(c._comm)
    real, c._comm = c._comm, under
    try:
        logged = cls(c, spec)
        c.begin_segment(steps)
        for _ in range(steps):
            logged.step()
        collectives = len(c.log.collectives)
        c.end_segment()
    finally:
        c._comm = real
    ok = under.calls == plain.calls
    # Each Allreduce is logged (its contribution's digest and result), not sent twice.
    ok &= collectives == plain.calls["Allreduce"] == (2 * steps if name == "hydro" else 0)
    ok &= all(np.array_equal(np.asarray(a.local), np.asarray(b.local))
              for a, b in zip(app.state.values(), logged.state.values()))
    plain_comm.Free()
    all_true(MPI.COMM_WORLD, ok, f"{name}: plain {dict(plain.calls)}, logged {dict(under.calls)}")
