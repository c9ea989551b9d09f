# python scripts/interval_figures.py [--out results/interval] [--failures 1000000] [--seed 0]
"""Paper-style figures of the checkpoint interval, plus the table as JSON.

Writes into ``--out``:

* ``availability_vs_interval.png``: availability against the period under
  the paper's and the renewal model for a few (M, δ, R), optima marked;
* ``lost_time_vs_interval.png``: Young's lost time per failure against τ;
* ``latency_D2min.png``: the floor variant with detection latency D = 2 min,
  once with the latency-free optimum below D (supremum just above D) and
  once above it;
* ``simulated_vs_analytic.png``: Monte Carlo availability with 95 % CIs
  against both formulas, and Weibull failures against the exponential one;
* ``table.json``: ``ulfmpy interval --json`` for every case above.

Needs numpy and matplotlib; no MPI.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any, cast

import numpy as np
from matplotlib.figure import Figure

from ulfmpy import interval, simulate
from ulfmpy._cmd_interval import draw
from ulfmpy.units import format_duration

# (M, δ, R): the two cases of the closing note, and a large machine
# with a slow file system.
CASES = [(3600.0, 30.0, 960.0), (7200.0, 1.0, 240.0), (86400.0, 300.0, 600.0)]
LATENCY = 120.0
LATENCY_CASES = [(3600.0, 1.0, 240.0), (7200.0, 1.0, 240.0)]
MARKERS = {"young": "o", "daly": "s", "exact": "D", "saxena": "^"}


def _label(mtbf: float, save: float, recovery: float, latency: float = 0.0) -> str:
    text = f"M={format_duration(mtbf)}, save={format_duration(save)}, R={format_duration(recovery)}"
    return text + (f", D={format_duration(latency)}" if latency else "")


def _subfigures(fig: Figure, rows: int) -> list[Any]:
    return list(cast("np.ndarray", fig.subfigures(rows, 1)).ravel())


def availability_figure(path: pathlib.Path) -> None:
    """Availability against the period, one row per case."""
    fig = Figure(figsize=(11, 4.2 * len(CASES)), layout="constrained")
    for sub, (m, d, r) in zip(_subfigures(fig, len(CASES)), CASES, strict=True):
        draw(sub, rows=interval.table(mtbf=m, save=d, recovery=r), mtbf=m, save=d, recovery=r)
    fig.savefig(path, dpi=110)


def lost_time_figure(path: pathlib.Path) -> None:
    """Young's L(τ) = Mδ/τ + τ/2 + R with every model's τ marked."""
    fig = Figure(figsize=(5 * len(CASES), 4), layout="constrained")
    for ax, (m, d, r) in zip(fig.subplots(1, len(CASES)), CASES, strict=True):
        rows = interval.table(mtbf=m, save=d, recovery=r)
        top = 4 * max(row["tau_s"] for row in rows.values())
        tau = np.linspace(top / 200, top, 2000)
        ax.plot(tau / 60, interval.lost_time(tau=tau, mtbf=m, save=d, recovery=r) / 60, "k-", lw=1.3)
        for model, row in rows.items():
            loss = interval.lost_time(tau=row["tau_s"], mtbf=m, save=d, recovery=r)
            ax.plot(row["tau_s"] / 60, loss / 60, marker=MARKERS[model], ls="none", ms=8, label=model)
        ax.set_ylim(r / 60, (r + 4 * (interval.lost_time(tau=rows["young"]["tau_s"], mtbf=m, save=d,
                                                         recovery=r) - r)) / 60)
        ax.set_xlabel("compute time between checkpoints tau [min]")
        ax.set_ylabel("lost time per failure [min]")
        ax.set_title(_label(m, d, r), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def latency_figure(path: pathlib.Path) -> None:
    """The discontinuous floor variant with D = 2 min."""
    fig = Figure(figsize=(11, 4.2 * len(LATENCY_CASES)), layout="constrained")
    for sub, (m, d, r) in zip(_subfigures(fig, len(LATENCY_CASES)), LATENCY_CASES, strict=True):
        rows = interval.table(mtbf=m, save=d, recovery=r, latency=LATENCY)
        draw(sub, rows=rows, mtbf=m, save=d, recovery=r, latency=LATENCY)
    fig.savefig(path, dpi=110)


def simulation_figure(path: pathlib.Path, *, failures: int, seed: int) -> dict[str, object]:
    """Simulated availability (95 % CI) against the analytic curves."""
    m, d, r = CASES[0]
    best = interval.exact(mtbf=m, save=d) + d
    periods = (best * np.geomspace(0.2, 5.0, 11)).tolist()
    fine = np.geomspace(0.15 * best, 6 * best, 400)
    runs = [("paper", "exponential", 1.0, interval.availability_paper),
            ("renewal", "exponential", 1.0, interval.availability_renewal),
            ("renewal", "weibull", 0.7, interval.availability_renewal)]
    fig = Figure(figsize=(5 * len(runs), 4), layout="constrained")
    out: dict[str, object] = {}
    for ax, (model, dist, shape, formula) in zip(fig.subplots(1, len(runs)), runs, strict=True):
        sim = simulate.simulate(periods=periods, mtbf=m, save=d, recovery=r, model=model, dist=dist,
                                shape=shape, failures=failures, rng=np.random.default_rng(seed))
        est = sim.estimates
        ax.plot(fine / 60, formula(period=fine, mtbf=m, save=d, recovery=r), "k-", lw=1,
                label=f"{model} formula (exponential)")
        ax.errorbar([e.period / 60 for e in est], [e.availability for e in est],
                    yerr=[[e.availability - e.ci_low for e in est], [e.ci_high - e.availability for e in est]],
                    fmt="o", ms=4, capsize=3, label=f"simulated, {dist}" + (f" k={shape:g}" if dist == "weibull" else ""))
        ax.axvline(sim.best_period / 60, color="C1", ls=":", lw=1, label="empirical best")
        ax.set_xscale("log")
        ax.set_xlabel("period T [min]")
        ax.set_ylabel("availability")
        ax.set_title(f"{model} model, {failures:.0e} failures", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        out[f"{model}-{dist}"] = sim.as_dict()
    fig.suptitle(_label(m, d, r))
    fig.savefig(path, dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    """Write every figure and the JSON table; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/interval", help="output directory")
    parser.add_argument("--failures", type=int, default=1_000_000, help="failures per simulation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulations")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    availability_figure(out / "availability_vs_interval.png")
    lost_time_figure(out / "lost_time_vs_interval.png")
    latency_figure(out / "latency_D2min.png")
    sims = simulation_figure(out / "simulated_vs_analytic.png", failures=args.failures, seed=args.seed)
    tables = []
    for m, d, r in CASES:
        tables.append({"inputs": {"mtbf_s": m, "save_s": d, "recovery_s": r, "latency_s": 0.0},
                       "models": interval.table(mtbf=m, save=d, recovery=r)})
    for m, d, r in LATENCY_CASES:
        tables.append({"inputs": {"mtbf_s": m, "save_s": d, "recovery_s": r, "latency_s": LATENCY},
                       "models": interval.table(mtbf=m, save=d, recovery=r, latency=LATENCY)})
    (out / "table.json").write_text(json.dumps({"tables": tables, "simulations": sims}, indent=2))
    for name in sorted(p.name for p in out.iterdir()):
        print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
