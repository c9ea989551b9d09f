# Run: ulfmpy run -n 4 tests/scenarios/apps/ulfm_smoke.py [VICTIM]
"""ULFM smoke test: proof that the installed MPI stack is fault tolerant.

One rank SIGKILLs itself; the others must see the failure as a ulfmpy
exception from the resilient communicator, revoke, shrink, agree on the
shrunken communicator and finish with exit 0. Each survivor writes
``smoke-rank-N.json`` into the run directory.
"""

import json
import os
import sys

from mpi4py import MPI

import ulfmpy
from ulfmpy import recovery
from ulfmpy.inject import kill_self


def main() -> int:
    victim = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
        comm = rt.comm
        rank = comm.Get_rank()
        comm.Barrier()
        if rank == victim:
            kill_self()
        seen = None
        try:
            for _ in range(1000):
                comm.allreduce(rank)
        except ulfmpy.ProcessFailure as exc:  # a BaseException: caught only when named
            seen = {"type": type(exc).__name__, "error_class": exc.error_class, "call": exc.call}
        recovery.revoke(comm.mpi_comm)
        new, shrink_s = recovery.shrink(comm.mpi_comm)
        failed = recovery.failed_ranks(comm.mpi_comm)
        ok = recovery.agree(new, 1 if seen else 0)
        total = new.allreduce(1)
        with open(os.path.join(rt.run_dir, f"smoke-rank-{rank}.json"), "w") as fh:
            json.dump({"rank": rank, "seen": seen, "new_size": new.Get_size(),
                       "new_rank": new.Get_rank(), "agreed": ok, "allreduce": total,
                       "failed": failed, "shrink_s": shrink_s}, fh)
        new.Free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
