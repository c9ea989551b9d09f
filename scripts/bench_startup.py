# Run: python scripts/bench_startup.py --out bench_startup.json [--n 512] [--steps 100,600] [--rounds 7] [-n 4]
"""What a launch costs before it computes: the fixed part of a run's wall time.

Four ways to run the stencil (``apps/stencil.py``, ``--n``², ``-n`` ranks):

- ``mpirun``: ``mpirun -n N python apps/stencil.py --no-resilience``, the
  plain app as a user runs it without ulfmpy (the yardstick);
- ``plain``: ``ulfmpy run --no-resilience``;
- ``protected``: ``ulfmpy run`` at the defaults;
- ``checkpoints``: ``ulfmpy run --ckpt-every 100``, so the node's writer
  starts and writes.

Each is timed from outside (the whole process: launcher, ``mpirun``, ranks,
writer), two ways:

- **tiny** (the headline): a 64² grid for 120 steps (the checkpoints way
  saves at step 100), where compute is negligible, so the wall time is the
  launch's fixed cost; the figure per
  way is its median over ``mpirun``'s (``tiny_over_mpirun_s``);
- **intercept**: ``--n``² at two step counts, and the fixed cost is the
  intercept of the line through the two medians, ``t(a) - a (t(b) - t(a))
  / (b - a)``. On a noisy shared host the step time drifts between runs by
  more than the fixed cost, and the extrapolation multiplies that drift by
  ``a``: this one is reported, not trusted.

Runs go round-robin over ways and sizes, round after round, so a drift of
the host's speed reaches all of them alike. Writes JSON; nothing here is
collective.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ways(python: str, ranks: int) -> dict[str, list[str]]:
    mpirun = shutil.which("mpirun", path=str(Path(python).parent)) or "mpirun"
    run = [python, "-m", "ulfmpy", "run", "-n", str(ranks)]
    return {
        "mpirun": [mpirun, "-n", str(ranks), "--oversubscribe", "--mca", "btl", "^ofi", python],
        "plain": [*run, "--no-resilience"],
        "protected": run,
        "checkpoints": [*run, "--ckpt-every", "100"],
    }


def timed(cmd: list[str], env: dict[str, str]) -> float:
    for attempt in range(2):  # Open MPI's rare start-up flake ("PMIx server's listener ...")
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, cwd=str(REPO), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, timeout=600, check=False)
        wall = time.perf_counter() - t0
        if res.returncode == 0 or "PMIx" not in res.stderr:
            break
    if res.returncode != 0:
        raise SystemExit(f"bench_startup: {' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-2000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_startup.json")
    ap.add_argument("-n", "--ranks", type=int, default=4)
    ap.add_argument("--n", type=int, default=512, help="grid side (1024² switches between two speeds on the 2-core test host)")
    ap.add_argument("--steps", default="100,600", help="the two step counts, a,b")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    a, b = (int(x) for x in args.steps.split(","))
    env = dict(os.environ)
    if os.getuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    app = ["apps/stencil.py", "--nx", str(args.n), "--ny", str(args.n), "--quiet"]
    tiny = ["apps/stencil.py", "--nx", "64", "--ny", "64", "--quiet"]
    times: dict[str, dict[int, list[float]]] = {w: {0: [], a: [], b: []}
                                                for w in ways(sys.executable, 1)}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for rnd in range(args.rounds + 1):  # round 0 warms caches and is not recorded
            for name, head in ways(sys.executable, args.ranks).items():
                for steps in (0, a, b):
                    cmd = list(head)
                    prog = [*tiny, "--steps", "120"] if steps == 0 else [*app, "--steps", str(steps)]
                    if name != "mpirun":
                        cmd[6:6] = ["--run-dir", os.path.join(tmp, f"{name}-{steps}-{rnd}")]
                        cmd += prog
                    else:
                        cmd += [*prog, "--no-resilience"]
                    wall = timed(cmd, env)
                    if rnd:
                        times[name][steps].append(wall)
            print(f"round {rnd}/{args.rounds} done", file=sys.stderr, flush=True)
    out: dict[str, object] = {"ranks": args.ranks, "grid": args.n, "steps": [a, b],
                              "rounds": args.rounds, "ways": {}}
    fixed = {}
    for name, per in times.items():
        ta, tb = statistics.median(per[a]), statistics.median(per[b])
        per_step = (tb - ta) / (b - a)
        fixed[name] = ta - a * per_step
        out["ways"][name] = {"tiny_s": statistics.median(per[0]),
                             "median_s": {str(a): ta, str(b): tb},
                             "runs_s": {("tiny" if k == 0 else str(k)): v for k, v in per.items()},
                             "per_step_s": per_step, "fixed_s": fixed[name]}
    ways_out = out["ways"]
    for name in times:
        w = ways_out[name]
        w["tiny_over_mpirun_s"] = w["tiny_s"] - ways_out["mpirun"]["tiny_s"]
        w["tiny_over_plain_s"] = w["tiny_s"] - ways_out["plain"]["tiny_s"]
        w["fixed_over_mpirun_s"] = fixed[name] - fixed["mpirun"]
        w["fixed_over_plain_s"] = fixed[name] - fixed["plain"]
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, w in out["ways"].items():
        print(f"{name:12s} tiny run {w['tiny_s']:.3f} s: over mpirun {w['tiny_over_mpirun_s']:+.3f} s, "
              f"over plain {w['tiny_over_plain_s']:+.3f} s | intercept {w['fixed_s']:.3f} s: "
              f"over mpirun {w['fixed_over_mpirun_s']:+.3f} s (step {1e3 * w['per_step_s']:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
