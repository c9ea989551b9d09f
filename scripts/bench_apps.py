# Run: python scripts/bench_apps.py --out results/apps [--apps stencil,circuit,hydro] [--jobs 2] [--rounds 6] [--quick]
"""The three apps under ulfmpy, side by side, in one run (the apps' bench_segments).

For each app (the stencil, the circuit, the hydro), on ``--ranks`` ranks:

(a) **fault-free overhead at the default settings**: the protected loop
    against the same kernels on a plain communicator, alternated round by
    round inside MPI jobs (``scripts/apps_job.py``), ``--jobs`` jobs of
    ``--rounds`` rounds, pooled: the median of (protected / baseline loop
    time of the same round) with a 95 % interval (bootstrap over jobs, then
    rounds). Both fingerprints must agree.
(b) **logged bytes per step against the state**: what the receive log holds
    per step on rank 0 (``segment_decision`` events of a protected launch),
    beside the rank's state.
(c) **one flip, local against global re-execution**: the same flip with
    ``--rollback local`` (at the segment's end, and with per-step
    detection) and ``--rollback global``, early in the third of segments of
    ``--flip-k`` steps (pinned: the automatic length differs from run to
    run): re-executed rank-steps (a count core sharing does not distort)
    and recovery seconds; every run exact.
(d) **throughput**: the plain 4-rank run's updates per second (stencil
    cells, circuit wire segments and nodes, hydro zones) against a
    numpy-only lower bound on the time: the same kernels on the whole
    problem in this process, no MPI, measured in the same run.

Writes ``bench_apps.json`` and ``bench_apps.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_segments import median_ci  # noqa: E402

SIZES = {  # the sizes of (a), (b), (d); --quick shrinks them
    "stencil": {"n": 1024},
    "circuit": {"pieces": 24, "nodes": 1000, "wires": 4000},
    "hydro": {"zones": 128},
}
FLIP = {"stencil": ("finite,bounds", "array=u,bit=62"),
        "circuit": ("finite,bounds", "array=voltage,bit=62"),
        "hydro": ("finite,bounds,invariant", "array=ze,bit=62")}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def app_argv(app: str, size: dict[str, int], steps: int) -> list[str]:
    """The app's command line at a size. Pure."""
    if app == "stencil":
        return [str(REPO / "apps" / "stencil.py"), "--nx", str(size["n"]), "--ny", str(size["n"]),
                "--steps", str(steps), "--quiet"]
    if app == "circuit":
        return [str(REPO / "apps" / "circuit.py"), "--pieces", str(size["pieces"]),
                "--nodes", str(size["nodes"]), "--wires", str(size["wires"]),
                "--steps", str(steps), "--quiet"]
    return [str(REPO / "apps" / "hydro.py"), "--zones", str(size["zones"]), "--steps", str(steps),
            "--quiet"]


def launch(run_dir: Path, ranks: int, settings: list[str], argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "ulfmpy", "run", "-n", str(ranks), "--run-dir", str(run_dir),
           *settings, "--", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=_env(),
                          cwd=str(run_dir.parent))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


# -- (a) -----------------------------------------------------------------------------

def overhead(tmp: Path, app: str, args: argparse.Namespace) -> dict[str, Any]:
    size = SIZES[app]
    groups, fps, base_s = [], set(), []
    for j in range(args.jobs):
        out = tmp / f"{app}-job{j}.json"
        cmd = [sys.executable, "-m", "ulfmpy", "run", "-n", str(args.ranks), "--run-dir",
               str(tmp / f"{app}-a{j}"), "--", str(REPO / "scripts" / "apps_job.py"),
               "--app", app, "--out", str(out), "--steps", str(args.steps),
               "--rounds", str(args.rounds), *[a for k, v in size.items() for a in (f"--{k}", str(v))]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=_env(),
                              cwd=str(tmp))
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        trials = json.loads(out.read_text())["trials"]
        by_round: dict[int, dict[str, Any]] = {}
        for t in trials:
            by_round.setdefault(t["round"], {})[t["mode"]] = t
            fps.add(t["fingerprint"])
        groups.append([r["protected"]["loop_s"] / r["baseline"]["loop_s"]
                       for r in by_round.values()])
        base_s += [r["baseline"]["loop_s"] for r in by_round.values()]
    pooled = [x for g in groups for x in g]
    lo, hi = median_ci(groups)
    return {"ratio_median": statistics.median(pooled), "ratio_ci95": [lo, hi],
            "job_medians": [statistics.median(g) for g in groups], "rounds": len(pooled),
            "same_fingerprint": len(fps) == 1, "baseline_loop_s_median": statistics.median(base_s),
            "steps": args.steps}


# -- (b) -----------------------------------------------------------------------------

def logged_bytes(tmp: Path, app: str, args: argparse.Namespace) -> dict[str, Any]:
    from ulfmpy.events import read_events

    run_dir = tmp / f"{app}-b"
    launch(run_dir, args.ranks, [], app_argv(app, SIZES[app], args.steps))
    decisions = [e for e in read_events(run_dir, "segment_decision") if e["rank"] == 0]
    last = decisions[-1] if decisions else {}
    log, state = last.get("log_bytes_per_step"), last.get("state_bytes")
    return {"log_bytes_per_step": log, "state_bytes": state,
            "log_per_step_over_state": (log / state) if log is not None and state else None,
            "segment_length": last.get("steps")}


# -- (c) -----------------------------------------------------------------------------

def one_flip(tmp: Path, app: str, args: argparse.Namespace) -> dict[str, Any]:
    detect, where = FLIP[app]
    argv = app_argv(app, SIZES[app], args.flip_steps)
    ref = launch(tmp / f"{app}-c-ref", args.ranks, ["--no-resilience"], argv)["fingerprint"]
    modes = {"local": ["--rollback", "local"],
             "local, per-step detection": ["--rollback", "local", "--detect-every", "1"],
             "global": ["--rollback", "global"]}
    rows = []
    k = args.flip_k  # pinned: the automatic length differs from run to run
    step = 2 * k + k // 4                                  # early in the third segment
    for name, extra in modes.items():
        s = launch(tmp / f"{app}-c-{len(rows)}", args.ranks,
                   ["--detect", detect, "--segment-steps", str(k), *extra, "--inject",
                    f"bitflip:rank=1,step={step},{where}"], argv)
        rb = s["rollbacks"][0] if s["rollbacks"] else {}
        rows.append({"mode": name, "exact": s["fingerprint"] == ref,
                     "reexecuted_ranks": rb.get("reexecuted_ranks"),
                     "reexecuted_rank_steps": rb.get("reexecuted_rank_steps"),
                     "recovery_s": rb.get("seconds"), "rounds": rb.get("rounds")})
    glob = rows[-1]["reexecuted_rank_steps"] or 1
    for r in rows:
        r["rank_steps_vs_global"] = (r["reexecuted_rank_steps"] or 0) / glob
    return {"flip_step": step, "segment_steps": k, "steps": args.flip_steps, "rows": rows}


# -- (d) -----------------------------------------------------------------------------

class _OneRank:
    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def Allreduce(self, send: Any, recv: Any, op: Any = None) -> None:
        np.copyto(recv, send)


def updates_per_step(app: str, size: dict[str, int]) -> int:
    """What one step updates: cells, wire segments (per sweep) and nodes, zones. Pure."""
    if app == "stencil":
        return size["n"] ** 2
    if app == "circuit":
        from apps.circuit import SWEEPS, CircuitSpec

        spec = CircuitSpec(pieces=size["pieces"], nodes=size["nodes"], wires=size["wires"])
        return spec.total_wires * spec.segments * SWEEPS + spec.total_nodes
    return size["zones"] ** 2


def numpy_alone(app: str, size: dict[str, int], steps: int) -> float:
    """Seconds per step of the app's kernels on the whole problem, here, no MPI."""
    if app == "stencil":
        from apps.stencil import Heat2D

        h: Any = Heat2D(_OneRank(), size["n"], size["n"])
        step = h.compute  # one rank: no halo to exchange
    elif app == "circuit":
        from apps.circuit import Circuit, CircuitSpec

        h = Circuit(_OneRank(), CircuitSpec(pieces=size["pieces"], nodes=size["nodes"],
                                            wires=size["wires"]))
        step = h.step
    else:
        from apps.hydro import Hydro, HydroSpec

        h = Hydro(_OneRank(), HydroSpec(zones=size["zones"]))
        step = h.step
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


# -- driver --------------------------------------------------------------------------

def figure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    apps = list(result["apps"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, app in enumerate(apps):
        ov = result["apps"][app].get("overhead")
        if ov:
            lo, hi = ov["ratio_ci95"]
            a1.errorbar([i], [(ov["ratio_median"] - 1) * 100],
                        yerr=[[(ov["ratio_median"] - lo) * 100], [(hi - ov["ratio_median"]) * 100]],
                        fmt="o", capsize=4)
    a1.axhline(3.0, color="grey", linestyle=":", label="target 3 %")
    a1.axhline(0.0, color="black", linewidth=0.5)
    a1.set_xticks(range(len(apps)), apps)
    a1.set_ylabel("fault-free overhead at the defaults (%)")
    a1.legend()
    width = 0.25
    for j, mode in enumerate(("local", "local, per-step detection", "global")):
        ys = []
        for app in apps:
            fl = result["apps"][app].get("one_flip")
            row = next((r for r in fl["rows"] if r["mode"] == mode), None) if fl else None
            ys.append(row["reexecuted_rank_steps"] or 0 if row else 0)
        a2.bar(np.arange(len(apps)) + (j - 1) * width, ys, width, label=mode)
    a2.set_xticks(range(len(apps)), apps)
    a2.set_ylabel("rank-steps re-executed after one flip")
    a2.legend(fontsize=8)
    fig.suptitle(f"{result['ranks']} ranks on {os.cpu_count()} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "results" / "apps"))
    p.add_argument("--apps", default="stencil,circuit,hydro")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--flip-steps", type=int, default=150)
    p.add_argument("--flip-k", type=int, default=20, help="segment length in (c), pinned")
    p.add_argument("--parts", default="a,b,c,d", help="which of (a)-(d) to run")
    p.add_argument("--quick", action="store_true", help="small and short: a smoke run")
    args = p.parse_args()
    if args.quick:
        SIZES.update(stencil={"n": 128}, circuit={"pieces": 8, "nodes": 50, "wires": 200},
                     hydro={"zones": 16})
        args.jobs, args.rounds, args.steps, args.flip_steps, args.flip_k = 1, 1, 60, 60, 10
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"ranks": args.ranks, "cpus": os.cpu_count(), "apps": {}}
    with tempfile.TemporaryDirectory(prefix="bench-apps-") as tmp_s:
        tmp = Path(tmp_s)
        for app in args.apps.split(","):
            row: dict[str, Any] = {"size": SIZES[app]}
            if "a" in parts:
                row["overhead"] = overhead(tmp, app, args)
            if "b" in parts:
                row["logged"] = logged_bytes(tmp, app, args)
            if "c" in parts:
                row["one_flip"] = one_flip(tmp, app, args)
            if "d" in parts:
                alone = numpy_alone(app, SIZES[app], 5 if args.quick else 20)
                per = updates_per_step(app, SIZES[app])
                row["throughput"] = {"numpy_alone_s_per_step": alone,
                                     "numpy_alone_mupdates_per_s": per / alone / 1e6}
                ov = row.get("overhead")
                if ov:
                    plain = per / (ov["baseline_loop_s_median"] / args.steps) / 1e6
                    row["throughput"].update(plain_mupdates_per_s=plain,
                                             plain_over_numpy_alone=plain / (per / alone / 1e6))
            result["apps"][app] = row
            print(json.dumps({app: row}, default=str)[:2000], flush=True)
    (out / "bench_apps.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if "a" in parts or "c" in parts:
        figure(result, out / "bench_apps.png")
    for app, row in result["apps"].items():
        ov, lg, th = row.get("overhead"), row.get("logged"), row.get("throughput")
        line = [app]
        if ov:
            line.append(f"overhead {100 * (ov['ratio_median'] - 1):+.1f} % "
                        f"(95 % {100 * (ov['ratio_ci95'][0] - 1):+.1f}..{100 * (ov['ratio_ci95'][1] - 1):+.1f})")
        if lg and lg["log_per_step_over_state"] is not None:
            line.append(f"log/step {lg['log_bytes_per_step']:.0f} B = "
                        f"{lg['log_per_step_over_state']:.4f} of the state")
        if th and "plain_over_numpy_alone" in th:
            line.append(f"{th['plain_mupdates_per_s']:.1f} M updates/s plain, "
                        f"{th['numpy_alone_mupdates_per_s']:.1f} numpy alone")
        print("; ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
