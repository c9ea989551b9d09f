# Run: ulfmpy run -n 4 --walltime 4s --halt-before 2s tests/scenarios/apps/finalize_hangs.py --steps 100 --slow-from 0 --slow-s 0.05
"""slow_steps.py with an ``MPI_Finalize`` that never returns on rank 1: a
halted job whose processes do not all end (seen once in 26 halts) must
still end, with the halt's exit status."""

import runpy
import sys
import time
from pathlib import Path

from mpi4py import MPI

if MPI.COMM_WORLD.Get_rank() == 1:
    MPI.Finalize = lambda: time.sleep(3600)

sys.argv[0] = str(Path(__file__).with_name("slow_steps.py"))
runpy.run_path(sys.argv[0], run_name="__main__")
