"""``ulfmpy simulate``: Monte Carlo availability of checkpoint periods.

Simulates many failures under the paper's model and/or the renewal model
(:mod:`ulfmpy.simulate`) and prints, per period, the simulated availability
with its confidence interval, the model's formula, which interval models
chose that period, and the empirical best. Imports no MPI.
"""

from __future__ import annotations

import argparse
import json
import math
import numpy as np

from ulfmpy import interval, simulate
from ulfmpy._cmd_interval import add_failure_arguments, failure_inputs
from ulfmpy.errors import ConfigError
from ulfmpy.units import format_duration, parse_duration

__all__ = ["configure", "run", "render"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` flags to ``parser``."""
    add_failure_arguments(parser)
    parser.add_argument("--intervals", default="auto", metavar="T,T,...",
                        help="checkpoint periods T = tau + save to compare, e.g. 5m,8m,12m; "
                             "'auto' (default): every model's optimum and a grid from 1/4 to 4 "
                             "times the exact one")
    parser.add_argument("--latency", metavar="D", default=None,
                        help="error-detection latency (renewal model only)")
    parser.add_argument("--dist", choices=simulate.DISTRIBUTIONS, default="exponential",
                        help="distribution of the gaps between failures (default exponential)")
    parser.add_argument("--shape", type=float, default=None,
                        help="Weibull shape k (default 0.7; k < 1: failures cluster)")
    parser.add_argument("--model", choices=(*simulate.SIM_MODELS, "both"), default="both",
                        help="paper: recovery and re-execution cannot fail; renewal: failures at "
                             "any time (default both)")
    parser.add_argument("--failures", default="200000",
                        help="failures to simulate (default 200000; 1e6 takes about a second)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: a fresh one, printed for reruns)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="confidence level of the intervals (default 0.95)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _count(text: str) -> int:
    try:
        value = float(str(text).replace("_", ""))
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value == int(value) and value >= 100):
        raise ConfigError(f"--failures must be a whole number >= 100 (e.g. 200000 or 1e6), got {text!r}")
    return int(value)


def _periods(text: str, *, mtbf: float, save: float, recovery: float) -> list[float]:
    if text.strip() == "auto":
        return simulate.auto_periods(mtbf=mtbf, save=save, recovery=recovery)
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError("--intervals needs 'auto' or a comma-separated list such as 5m,8m,12m")
    periods = [parse_duration(p.strip(), what="--intervals entry") for p in parts]
    for p, t in zip(parts, periods, strict=True):
        if t <= save:
            raise ConfigError(f"--intervals entry {p.strip()!r} is not longer than the save time "
                              f"({format_duration(save)}): no time would be left to compute")
    return periods


def _labels(periods: list[float], *, mtbf: float, save: float, recovery: float) -> list[str]:
    # which interval models chose (within 0.1 %) each simulated period
    optima = {m: interval.optimal_tau(m, mtbf=mtbf, save=save, recovery=recovery) + save
              for m in interval.MODELS}
    return [",".join(m for m, o in optima.items() if abs(o - t) <= 1e-3 * t) for t in periods]


def run(args: argparse.Namespace) -> int:
    """Run the simulations and print them (or JSON); returns 0."""
    mtbf, save, recovery = failure_inputs(args)
    latency = 0.0 if args.latency is None else parse_duration(args.latency, what="--latency")
    if args.shape is not None and args.dist != "weibull":
        raise ConfigError("--shape applies to --dist weibull only")
    shape = 1.0 if args.dist == "exponential" else (0.7 if args.shape is None else args.shape)
    if not (math.isfinite(shape) and shape > 0):
        raise ConfigError(f"--shape must be > 0, got {args.shape!r}")
    if not 0.0 < args.confidence < 1.0:
        raise ConfigError(f"--confidence must be in (0, 1), got {args.confidence!r}")
    failures = _count(args.failures)
    models = simulate.SIM_MODELS if args.model == "both" else (args.model,)
    if latency > 0 and "paper" in models:
        if args.model == "paper":
            raise ConfigError("--latency is simulated under the renewal model only; use --model renewal")
        models = ("renewal",)
    periods = _periods(args.intervals, mtbf=mtbf, save=save, recovery=recovery)
    labels = _labels(periods, mtbf=mtbf, save=save, recovery=recovery)
    seed = args.seed if args.seed is not None else int(np.random.default_rng().integers(2**32))
    results = []
    for model in models:
        # the same seed for each model: both see the same failure gaps
        sim = simulate.simulate(periods=periods, mtbf=mtbf, save=save, recovery=recovery,
                                rng=np.random.default_rng(seed), model=model, dist=args.dist,
                                shape=shape, failures=failures, latency=latency,
                                confidence=args.confidence)
        results.append(sim)
    if args.json:
        out = {"seed": seed, "simulations": [
            {**sim.as_dict(), "labels": labels} for sim in results]}
        print(json.dumps(out, indent=2))
    else:
        print(f"seed {seed}; {failures} failures, {_gaps(args.dist, shape)} gaps with mean "
              f"{format_duration(mtbf)}; save = {format_duration(save)}, recovery = "
              f"{format_duration(recovery)}" + (f", latency = {format_duration(latency)}" if latency else ""))
        for sim in results:
            print()
            print(render(sim, labels))
    return 0


def _gaps(dist: str, shape: float) -> str:
    return "exponential" if dist == "exponential" else f"Weibull (k = {shape:g})"


def render(sim: simulate.Simulation, labels: list[str] | None = None) -> str:
    """The human table of one :class:`ulfmpy.simulate.Simulation`."""
    labels = labels or [""] * len(sim.estimates)
    pct = f"{100 * sim.confidence:g}% CI"
    lines = [f"{sim.model} model",
             f"{'period [min]':>12}{'tau [min]':>11}{'simulated':>12}  {pct:<21}{'formula':>10}  optimum of",
             "-" * 86]
    for i, (e, label) in enumerate(zip(sim.estimates, labels, strict=True)):
        mark = "*" if i == sim.best else ("~" if e.tied_with_best else " ")
        ci = f"[{100 * e.ci_low:.3f}, {100 * e.ci_high:.3f}] %"
        lines.append(f"{e.period / 60:>12.3f}{e.tau / 60:>11.3f}{100 * e.availability:>10.3f} %{mark} "
                     f"{ci:<21}{100 * e.analytic:>8.3f} %  {label}".rstrip())
    best = sim.estimates[sim.best]
    lines.append(f"best: period {best.period / 60:.3f} min (*); ~ = statistically tied with it "
                 f"(paired {pct}, same failures)")
    if sim.model == "renewal" and sim.dist != "exponential":
        lines.append("formula assumes exponential failures: with Weibull gaps it is only a reference")
    return "\n".join(lines)
