"""The fingerprint does not depend on the rank count (sub-communicators of 1..4)."""

import numpy as np
import pytest
from mpi4py import MPI

from apps.stencil import Heat2D
from ulfmpy.state import fingerprint

pytestmark = pytest.mark.mpi(min_size=4)


def test_same_fingerprint_on_1_to_4_ranks():
    world = MPI.COMM_WORLD
    results = {}
    for n in (1, 2, 3, 4):
        sub = world.Split(0 if world.Get_rank() < n else MPI.UNDEFINED, world.Get_rank())
        fp = None
        if sub != MPI.COMM_NULL:
            app = Heat2D(sub, 37, 29)
            for _ in range(15):
                app.step()
            fp = fingerprint(sub, app.state)
            sub.Free()
        results[n] = world.bcast(fp, root=0)
    assert len(set(results.values())) == 1, results


def test_fingerprint_sees_one_bit():
    world = MPI.COMM_WORLD
    app = Heat2D(world, 20, 20)
    a = fingerprint(world, app.state)
    if world.Get_rank() == 2:
        app.u[1, 1] = np.nextafter(app.u[1, 1], 2.0)
    assert fingerprint(world, app.state) != a
