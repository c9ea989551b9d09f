# Run: ulfmpy run -n 4 tests/scenarios/apps/world_setup.py --steps 100
"""The course heat solver with set-up code that ignores the factory's
argument and builds on ``MPI.COMM_WORLD`` itself: inside the with block that
name is ``rt.comm``, so its Cartesian communicator is protected all the same."""

import argparse
import importlib.util
from pathlib import Path

from mpi4py import MPI

import ulfmpy

spec = importlib.util.spec_from_file_location(
    "heat2d", Path(__file__).resolve().parents[3] / "apps" / "tutorials" / "heat2d.py")
heat2d = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heat2d)

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=64)
p.add_argument("--steps", type=int, default=200)
args = p.parse_args()
with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:
    for it, heat in rt.loop(lambda comm: heat2d.Heat2D(MPI.COMM_WORLD, args.n), steps=args.steps):
        heat.step()
    assert isinstance(heat.cart, ulfmpy.comm.ResilientComm), type(heat.cart)
heat.report()
