# Run: python scripts/bench_stencil.py [--sizes 256,512,1024,2048] [--out results/stencil]
"""Stencil kernel throughput against np.copyto bandwidth, in one run.

For each grid size, on one rank (``MPI.COMM_SELF``, so no halo traffic):
Mcells/s of the Jacobi sweep (``compute``) and of a whole step (exchange +
compute), against element copies per second of ``np.copyto`` on an array of
the same shape. The kernel reads 4 neighbours and writes through a
temporary, so it moves ~5-6x the bytes of a copy: a ratio near 0.2-0.3 means
the kernel runs at memory bandwidth. Also the 4-rank job's Mcells/s per rank
(``ulfmpy run -n 4 --no-resilience``), which adds halo exchange and
oversubscription on small machines. Writes ``bench_stencil.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def best_of(fn, repeat: int, inner: int) -> float:
    """Best seconds per call of ``fn`` over ``repeat`` batches of ``inner`` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def kernel_figures(n: int, repeat: int) -> dict:
    from mpi4py import MPI

    from apps.stencil import Heat2D

    app = Heat2D(MPI.COMM_SELF, n, n)
    inner = max(3, int(2e7 // (n * n)))
    t_compute = best_of(app.compute, repeat, inner)
    t_step = best_of(app.step, repeat, inner)
    src = np.random.default_rng(0).random((n, n))
    dst = np.empty_like(src)
    t_copy = best_of(lambda: np.copyto(dst, src), repeat, inner)
    cells = n * n
    return {"n": n, "bytes": src.nbytes,
            "compute_mcells_s": cells / t_compute / 1e6,
            "step_mcells_s": cells / t_step / 1e6,
            "copyto_melems_s": cells / t_copy / 1e6,
            "copyto_gb_s": 2 * src.nbytes / t_copy / 1e9,
            "ratio_compute_vs_copyto": t_copy / t_compute,
            "ratio_step_vs_copyto": t_copy / t_step}


def job_figures(n: int, steps: int, ranks: int) -> dict:
    cmd = [sys.executable, "-m", "ulfmpy", "run", "-n", str(ranks), "--no-resilience",
           "--run-dir", str(REPO / "runs" / "bench-stencil"), str(REPO / "apps" / "stencil.py"),
           "--nx", str(n), "--ny", str(n), "--steps", str(steps), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    res = json.loads(out.strip().splitlines()[-1])
    return {"ranks": ranks, "n": n, "steps": steps, "mcells_s": res["mcells_per_s"],
            "mcells_s_per_rank": res["mcells_per_s"] / ranks}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,512,1024,2048")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--job-size", type=int, default=1024)
    p.add_argument("--job-steps", type=int, default=200)
    p.add_argument("--out", default=str(REPO / "results" / "stencil"))
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [kernel_figures(n, args.repeat) for n in sizes]
    job = job_figures(args.job_size, args.job_steps, 4)
    print(f"{'n':>6} {'MB':>7} {'compute Mc/s':>13} {'step Mc/s':>10} {'copyto Me/s':>12} "
          f"{'compute/copy':>13}")
    for r in rows:
        print(f"{r['n']:>6} {r['bytes'] / 1e6:>7.1f} {r['compute_mcells_s']:>13.1f} "
              f"{r['step_mcells_s']:>10.1f} {r['copyto_melems_s']:>12.1f} "
              f"{r['ratio_compute_vs_copyto']:>13.3f}")
    print(f"4-rank job, {job['n']}^2, {job['steps']} steps: {job['mcells_s']:.1f} Mcells/s "
          f"({job['mcells_s_per_rank']:.1f} per rank)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"kernel": rows, "job": job, "cpus": os.cpu_count(), "numpy": np.__version__}
    (out / "bench_stencil.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'bench_stencil.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
