# Run: python scripts/seed_figures.py --out results/seed [--parts ranks,multi,fraction,interval] [--apps stencil,circuit,hydro] [--quick]
"""The seed papers' figures, measured with ulfmpy on this machine (JSON + PNG each).

* ``ranks``: fault-free overhead at the default segment length against the
  rank count (1, 2, 4, 6, 8), for each app: the protected loop against the
  plain one, alternated inside one MPI job per point (``apps_job.py``).
  This machine has 2 cores: from 4 ranks on they share cores, so the
  points above 2 ranks measure the protection on an oversubscribed node.
* ``multi``: several soft errors in one run (0 … 16 flips, at seeded
  ranks and steps, segments of ``--segment`` steps): the loop time over the
  fault-free protected run and the rank-steps re-executed, with local rollback and with global rollback
  (every rank redoes the segment), against no protection with a restart
  from the last checkpoint (``--ckpt-every``), whose re-executed rank-steps
  are counted from the flips' steps: each error costs every rank the steps
  since the checkpoint before it (a lower bound: the relaunch itself is
  not counted).
* ``fraction``: one flip at 0.1 … 0.9 of a segment (``--segment-steps``
  pinned so that a fraction means a step): rank-steps re-executed and
  recovery seconds, local and global, found at the segment's end and at
  the step (``--detect-every 1``).
* ``interval``: the interval paper's figures (availability and lost time
  against the period, and with a detection latency above the optimum),
  from ``scripts/interval_figures.py``.

Rank-steps and counts do not depend on how the ranks share the cores;
seconds do, so each figure says which it shows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_apps import FLIP, SIZES, app_argv, launch  # noqa: E402

APPS = ("stencil", "circuit", "hydro")
# Smaller than bench_apps' sizes: many runs per point, on up to 8 ranks.
SEED_SIZES = {"stencil": {"n": 512}, "circuit": {"pieces": 24, "nodes": 400, "wires": 1600},
              "hydro": {"zones": 64}}
FLIP_INDEX = {"stencil": 5, "circuit": 5, "hydro": 5}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- ranks ---------------------------------------------------------------------------

def ranks_part(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"ranks": args.ranks_list, "cpus": os.cpu_count(), "apps": {}}
    for app in args.apps:
        size = SEED_SIZES[app]
        rows = []
        for n in args.ranks_list:
            if app == "circuit" and size["pieces"] < n:
                continue
            res = tmp / f"ranks-{app}-{n}.json"
            cmd = [sys.executable, "-m", "ulfmpy", "run", "-n", str(n), "--run-dir",
                   str(tmp / f"ranks-{app}-{n}"), "--", str(REPO / "scripts" / "apps_job.py"),
                   "--app", app, "--out", str(res), "--steps", str(args.steps),
                   "--rounds", str(args.rounds),
                   *[a for k, v in size.items() for a in (f"--{k}", str(v))]]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                                  env=_env(), cwd=str(tmp))
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
            trials = json.loads(res.read_text())["trials"]
            by: dict[int, dict[str, float]] = {}
            for t in trials:
                by.setdefault(t["round"], {})[t["mode"]] = t["loop_s"]
            ratios = [r["protected"] / r["baseline"] for r in by.values()]
            rows.append({"ranks": n, "overhead_median": statistics.median(ratios) - 1.0,
                         "overhead_min": min(ratios) - 1.0, "overhead_max": max(ratios) - 1.0,
                         "rounds": len(ratios)})
            print(f"ranks {app} n={n}: {100 * rows[-1]['overhead_median']:+.1f} %", flush=True)
        out["apps"][app] = rows
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for app, rows in out["apps"].items():
        xs = [r["ranks"] for r in rows]
        ys = [100 * r["overhead_median"] for r in rows]
        err = [[100 * (r["overhead_median"] - r["overhead_min"]) for r in rows],
               [100 * (r["overhead_max"] - r["overhead_median"]) for r in rows]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=app)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.axvline(os.cpu_count() or 2, color="grey", linestyle=":", label="cores")
    ax.set_xlabel("ranks")
    ax.set_ylabel("fault-free overhead at the default length (%)")
    ax.set_title("median and range over rounds; beyond the cores the ranks share them")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "seed_ranks.png", dpi=120)
    return out


# -- multiple failures ------------------------------------------------------------------

def _flips(app: str, n: int, steps: int, ranks: int, seed: int) -> list[str]:
    """``n`` detectable flips at distinct seeded steps and ranks. Pure."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(5, steps - 5), n))
    where = FLIP[app][1]
    return [f"bitflip:rank={rng.randrange(ranks)},step={s},{where},index={FLIP_INDEX[app]}"
            for s in chosen]


def multi_part(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    counts = [0, 1, 2, 4, 8, 16]
    out: dict[str, Any] = {"flips": counts, "ranks": args.ranks, "steps": args.flip_run_steps,
                           "ckpt_every": args.ckpt_every, "segment_steps": args.segment,
                           "apps": {}}
    for app in args.apps:
        argv = app_argv(app, SEED_SIZES[app], args.flip_run_steps)
        # Pinned: the automatic length differs from run to run, and the
        # rank-steps of a rollback scale with it.
        detect = ["--detect", FLIP[app][0], "--segment-steps", str(args.segment)]
        ref = launch(tmp / f"multi-{app}-ref", args.ranks, ["--no-resilience"], argv)
        base = launch(tmp / f"multi-{app}-base", args.ranks, detect, argv)
        rows = []
        for n in counts:
            specs = _flips(app, n, args.flip_run_steps, args.ranks, seed=n)
            row: dict[str, Any] = {"flips": n}
            for mode in ("local", "global"):
                s = launch(tmp / f"multi-{app}-{n}-{mode}", args.ranks,
                           [*detect, "--rollback", mode,
                            *[a for f in specs for a in ("--inject", f)]], argv)
                row[mode] = {"exact": s["fingerprint"] == ref["fingerprint"],
                             "reexecuted_rank_steps": s["reexecuted_rank_steps"],
                             "time_over_fault_free": s["wall_s"] / base["wall_s"],
                             "escaped": s["escaped_faults"]}
            steps = [int(f.split("step=")[1].split(",")[0]) for f in specs]
            row["restart"] = {"reexecuted_rank_steps": sum(
                args.ranks * (s - (s // args.ckpt_every) * args.ckpt_every) for s in steps),
                "counted": "from the flips' steps: every rank redoes the steps since the "
                           "checkpoint before each"}
            rows.append(row)
            print(f"multi {app} {n}: local {row['local']['reexecuted_rank_steps']}, global "
                  f"{row['global']['reexecuted_rank_steps']}, restart "
                  f"{row['restart']['reexecuted_rank_steps']} rank-steps", flush=True)
        out["apps"][app] = rows
    plt = _plt()
    fig, axes = plt.subplots(1, len(out["apps"]), figsize=(4.2 * len(out["apps"]), 3.8),
                             squeeze=False)
    for ax, (app, rows) in zip(axes[0], out["apps"].items()):
        xs = [r["flips"] for r in rows]
        for key, style in (("local", "o-"), ("global", "s-"), ("restart", "^--")):
            ax.plot(xs, [r[key]["reexecuted_rank_steps"] for r in rows], style, label=key if key
                    != "restart" else f"no protection, restart from ckpt (every {args.ckpt_every})")
        ax.set_title(app)
        ax.set_xlabel("soft errors in one run")
        ax.set_ylabel("rank-steps re-executed")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "seed_multi.png", dpi=120)
    return out


# -- fraction of the segment -----------------------------------------------------------

def fraction_part(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    fractions = [0.1, 0.3, 0.5, 0.7, 0.9]
    k = args.segment
    first = 2 * k                       # the third segment
    out: dict[str, Any] = {"fractions": fractions, "segment_steps": k, "ranks": args.ranks,
                           "apps": {}}
    modes = {"local, end of segment": ["--rollback", "local"],
             "global, end of segment": ["--rollback", "global"],
             "local, per step": ["--rollback", "local", "--detect-every", "1"],
             "global, per step": ["--rollback", "global", "--detect-every", "1"]}
    for app in args.apps:
        argv = app_argv(app, SEED_SIZES[app], 4 * k)
        detect = ["--detect", FLIP[app][0], "--segment-steps", str(k)]
        ref = launch(tmp / f"frac-{app}-ref", args.ranks, ["--no-resilience"], argv)
        rows = []
        for f in fractions:
            step = first + max(0, min(k - 1, round(f * k)))
            spec = f"bitflip:rank=1,step={step},{FLIP[app][1]},index={FLIP_INDEX[app]}"
            row: dict[str, Any] = {"fraction": f, "step": step}
            for name, extra in modes.items():
                s = launch(tmp / f"frac-{app}-{f}-{len(row)}", args.ranks,
                           [*detect, *extra, "--inject", spec], argv)
                rb = s["rollbacks"][0] if s["rollbacks"] else {}
                row[name] = {"exact": s["fingerprint"] == ref["fingerprint"],
                             "reexecuted_rank_steps": rb.get("reexecuted_rank_steps", 0),
                             "recovery_s": rb.get("seconds", 0.0),
                             "reexecuted_ranks": rb.get("reexecuted_ranks")}
            rows.append(row)
            print(f"fraction {app} {f}: " + ", ".join(
                f"{m} {row[m]['reexecuted_rank_steps']}" for m in modes), flush=True)
        out["apps"][app] = rows
    plt = _plt()
    fig, axes = plt.subplots(1, len(out["apps"]), figsize=(4.2 * len(out["apps"]), 3.8),
                             squeeze=False)
    for ax, (app, rows) in zip(axes[0], out["apps"].items()):
        for name, style in zip(modes, ("o-", "s-", "o--", "s--")):
            ax.plot([r["fraction"] for r in rows], [r[name]["reexecuted_rank_steps"] for r in rows],
                    style, label=name)
        ax.set_title(f"{app}, segments of {k} steps")
        ax.set_xlabel("fraction of the segment done when the flip struck")
        ax.set_ylabel("rank-steps re-executed")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "seed_fraction.png", dpi=120)
    return out


# -- the interval paper ----------------------------------------------------------------

def interval_part(args: argparse.Namespace) -> dict[str, Any]:
    import interval_figures

    interval_figures.main(["--out", str(args.out / "interval"),
                           "--failures", "20000" if args.quick else "200000"])
    return {"figures": sorted(p.name for p in (args.out / "interval").glob("*.png"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "results" / "seed"))
    p.add_argument("--parts", default="ranks,multi,fraction,interval")
    p.add_argument("--apps", default=",".join(APPS))
    p.add_argument("--ranks", type=int, default=4, help="ranks of multi and fraction")
    p.add_argument("--ranks-list", default="1,2,4,6,8")
    p.add_argument("--steps", type=int, default=300, help="steps per trial of ranks")
    p.add_argument("--rounds", type=int, default=4, help="rounds per point of ranks")
    p.add_argument("--flip-run-steps", type=int, default=200)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--segment", type=int, default=20, help="segment length of fraction")
    p.add_argument("--quick", action="store_true", help="small and short: a smoke run")
    args = p.parse_args()
    args.apps = args.apps.split(",")
    args.ranks_list = [int(x) for x in args.ranks_list.split(",")]
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        SEED_SIZES.update(stencil={"n": 96}, circuit={"pieces": 8, "nodes": 40, "wires": 120},
                          hydro={"zones": 16})
        args.ranks_list, args.steps, args.rounds = [1, 2], 40, 1
        args.flip_run_steps, args.segment = 60, 10
    parts = args.parts.split(",")
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="seed-figures-") as tmp_s:
        tmp = Path(tmp_s)
        for part in parts:
            if part == "ranks":
                result["ranks"] = ranks_part(tmp, args)
            elif part == "multi":
                result["multi"] = multi_part(tmp, args)
            elif part == "fraction":
                result["fraction"] = fraction_part(tmp, args)
            elif part == "interval":
                result["interval"] = interval_part(args)
            else:
                raise SystemExit(f"seed_figures: unknown part {part!r}")
            (args.out / "seed_figures.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'seed_figures.json'} and the PNGs beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
