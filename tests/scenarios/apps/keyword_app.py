# Run: ulfmpy run -n 2 tests/scenarios/apps/keyword_app.py [--keyword-steps 5]
"""The stencil with a setting written into the program: ``Runtime(segment_steps=K)``.

For the precedence of a launcher flag over a keyword in the code, and for
conflicts between the two.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mpi4py import MPI

import ulfmpy

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "apps"))
from stencil import Heat2D  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keyword-steps", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    with ulfmpy.Runtime(MPI.COMM_WORLD, segment_steps=args.keyword_steps) as rt:
        for _step, grid in rt.loop(lambda comm: Heat2D(comm, 64, 48), steps=args.steps):
            grid.step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
