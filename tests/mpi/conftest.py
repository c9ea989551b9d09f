"""Fixtures and checks the in-MPI tier shares (run under mpirun, --with-mpi)."""

import pytest
from mpi4py import MPI

from ulfmpy.comm import ResilientComm


@pytest.fixture
def rc():
    """A resilient communicator over a duplicate of COMM_WORLD, and a
    duplicate of that for replay traffic. Collective."""
    base = MPI.COMM_WORLD.Dup()
    base.Set_errhandler(MPI.ERRORS_RETURN)
    replay = base.Dup()
    c = ResilientComm(base)
    yield c, replay
    base.Barrier()
    c.close()
    replay.Free()
    base.Free()


def all_true(comm, ok, what=""):
    """Every rank fails together when any rank's check failed. Collective."""
    flags = comm.allgather(bool(ok))
    where = f"{what}: " if what else ""
    assert all(flags), f"{where}check failed on ranks {[r for r, f in enumerate(flags) if not f]}"
