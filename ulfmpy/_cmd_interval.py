"""``ulfmpy interval``: every model's checkpoint interval, scored two ways.

Prints a table of each model's compute time τ and period T (minutes) with
the availability it gets under the paper's model and the renewal model;
``--json`` prints the same numbers, ``--plot`` draws availability against
the period with each model's optimum marked. Imports no MPI; matplotlib
only for ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import numpy as np

from ulfmpy import interval
from ulfmpy.errors import ConfigError
from ulfmpy.units import format_duration, parse_duration

__all__ = ["configure", "run", "add_failure_arguments", "failure_inputs", "inputs_from_args",
           "render_table", "draw"]

_MARKERS = {"young": "o", "daly": "s", "exact": "D", "saxena": "^",
            "saxena_latency": "*", "nonblocking": "v"}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``interval`` flags to ``parser``."""
    add_failure_arguments(parser)
    parser.add_argument("--latency", metavar="D", default=None,
                        help="error-detection latency, e.g. 2m (adds the saxena_latency row)")
    parser.add_argument("--async-fraction", metavar="W", default=None,
                        help="fraction of the save overlapped with computation, in [0, 1); "
                             "--save is then the whole save (adds the nonblocking row)")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="draw availability against the period with the optima marked")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def add_failure_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with ``ulfmpy simulate``: M, δ and R as human durations."""
    parser.add_argument("--mtbf", metavar="M", default=None,
                        help="job mean time between failures, e.g. 1h, 90m, 3600")
    parser.add_argument("--node-mtbf", metavar="M", default=None,
                        help="per-node MTBF; the job MTBF is this divided by --nodes")
    parser.add_argument("--nodes", type=int, default=1, help="node count for --node-mtbf (default 1)")
    parser.add_argument("--save", metavar="DELTA", required=True,
                        help="exposed time of one checkpoint save, e.g. 30s")
    parser.add_argument("--recovery-time", dest="recovery", metavar="R", default="0",
                        help="time from a failure until computing again, e.g. 4m (default 0)")
    # `--recovery` is ulfmpy run's list of in-job policies; a duration has its own name.
    parser.add_argument("--recovery", dest="recovery_misnamed", default=None,
                        help=argparse.SUPPRESS)


def failure_inputs(args: argparse.Namespace) -> tuple[float, float, float]:
    """M, δ, R in seconds from the shared flags.

    Raises:
        ConfigError: a bad or missing value, naming the flag.
    """
    if (args.mtbf is None) == (args.node_mtbf is None):
        raise ConfigError("give exactly one of --mtbf and --node-mtbf")
    if args.nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {args.nodes}")
    if args.mtbf is not None:
        mtbf = parse_duration(args.mtbf, what="--mtbf")
    else:
        mtbf = parse_duration(args.node_mtbf, what="--node-mtbf") / args.nodes
    if getattr(args, "recovery_misnamed", None) is not None:
        raise ConfigError(f"--recovery names ulfmpy run's in-job recovery policies; the time "
                          f"to recover is --recovery-time here (--recovery-time "
                          f"{args.recovery_misnamed})")
    save = parse_duration(args.save, what="--save")
    recovery = parse_duration(args.recovery, what="--recovery-time")
    if mtbf <= 0:
        raise ConfigError(f"--mtbf must be > 0, got {args.mtbf or args.node_mtbf!r}")
    if save <= 0:
        raise ConfigError(f"--save must be > 0 (a free checkpoint has no optimal interval), got {args.save!r}")
    return mtbf, save, recovery


def inputs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`ulfmpy.interval.table` from the flags."""
    mtbf, save, recovery = failure_inputs(args)
    latency = 0.0 if args.latency is None else parse_duration(args.latency, what="--latency")
    omega = None
    if args.async_fraction is not None:
        try:
            omega = float(args.async_fraction)
        except ValueError:
            omega = math.nan
        if not 0.0 <= omega < 1.0:
            raise ConfigError(f"--async-fraction must be a number in [0, 1), got {args.async_fraction!r}")
    return {"mtbf": mtbf, "save": save, "recovery": recovery, "latency": latency,
            "async_fraction": omega}


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON), draw the plot if asked; returns 0."""
    inputs = inputs_from_args(args)
    rows = interval.table(**inputs)
    if inputs["latency"] > 0:
        for row in rows.values():
            row["retained_checkpoints"] = interval.retained_checkpoints(
                period=row["period_s"], latency=inputs["latency"])
    if args.plot:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4.4), layout="constrained")
        draw(fig, rows=rows, **inputs)
        fig.savefig(args.plot, dpi=120)
    if args.json:
        print(json.dumps({"inputs": _json_inputs(inputs), "models": rows}, indent=2))
    else:
        print(render_table(rows, **inputs))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def _json_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {"mtbf_s": inputs["mtbf"], "save_s": inputs["save"], "recovery_s": inputs["recovery"],
            "latency_s": inputs["latency"], "async_fraction": inputs["async_fraction"]}


def render_table(rows: dict[str, dict[str, float]], *, mtbf: float, save: float, recovery: float,
                 latency: float = 0.0, async_fraction: float | None = None) -> str:
    """The human table: τ and T in minutes, availabilities in percent.

    A ``*`` marks the best printed value of each availability column.
    """
    head = f"M = {format_duration(mtbf)}, save = {format_duration(save)}, recovery = {format_duration(recovery)}"
    if latency:
        head += f", latency = {format_duration(latency)}"
    lines = [head]
    if async_fraction is not None:
        lines.append(f"non-blocking saves: {async_fraction:g} overlapped, so every model sees "
                     f"save = {format_duration((1 - async_fraction) * save)} exposed and recovery = "
                     f"{format_duration(recovery + async_fraction * save)}")
    cols = [("availability_paper", "A paper"), ("availability_renewal", "A renewal")]
    text = {m: {k: f"{100 * r[k]:.4f} %" for k, _ in cols} for m, r in rows.items()}
    # ties at the printed precision share the mark
    best = {k: text[max(rows, key=lambda m: rows[m][k])][k] for k, _ in cols}
    keep = latency > 0
    header = f"{'model':<15}{'tau [min]':>10}{'period [min]':>14}{'A paper':>14}{'A renewal':>14}"
    lines += [header + (f"{'keep':>6}" if keep else ""), "-" * (len(header) + (6 if keep else 0))]
    for model, r in rows.items():
        cells = [f"{model:<15}", f"{r['tau_s'] / 60:>10.3f}", f"{r['period_s'] / 60:>14.3f}"]
        for k, _ in cols:
            mark = "*" if text[model][k] == best[k] else " "
            cells.append(f"{text[model][k]:>12}{mark:<2}")
        if keep:
            cells.append(f"{int(r['retained_checkpoints']):>6}")
        lines.append("".join(cells).rstrip())
    lines.append("* best in its column (ties at the printed precision share it).")
    lines.append("  A paper: Saxena et al., recovery and re-execution cannot fail;")
    lines.append("  A renewal: exponential failures at any time, also during saves and recovery.")
    if keep:
        lines.append("  With latency: A paper is the floor variant (M - M*save/T)/(M + T/2 + T*floor(D/T) + R);")
        lines.append("  A renewal waits D after each failure. keep = checkpoints to retain, ceil(D/T) + 1.")
    return "\n".join(lines)


def draw(fig: Any, *, rows: dict[str, dict[str, float]], mtbf: float, save: float, recovery: float,
         latency: float = 0.0, async_fraction: float | None = None) -> None:
    """Draw availability against the period, both models, optima marked.

    Args:
        fig: a ``matplotlib.figure.Figure``; two axes are added.
        rows: :func:`ulfmpy.interval.table` for the same inputs.
        mtbf: M (s).
        save: δ, or the whole save C with ``async_fraction`` (s).
        recovery: R (s).
        latency: D (s); draws the floor variant's jumps when > 0.
        async_fraction: ω, or ``None`` for blocking saves.
    """
    delta, r_eff = save, recovery
    if async_fraction is not None:
        delta, r_eff = (1 - async_fraction) * save, recovery + async_fraction * save
    kw = dict(mtbf=mtbf, save=delta, recovery=r_eff, latency=latency)
    optima = [r["period_s"] for r in rows.values()]
    hi = max(3.0 * max(optima), 1.6 * latency)
    t = np.linspace(delta * 1.001, hi, 6000)
    if latency:
        # the exact jump points, from both sides, so the steps are drawn sharp
        n = np.arange(1, int(latency / delta) + 1)
        jumps = latency / n
        jumps = jumps[(jumps > t[0]) & (jumps < hi)]
        t = np.unique(np.concatenate([t, jumps, np.nextafter(jumps, np.inf)]))
    axes = fig.subplots(1, 2)
    for ax, name, func in ((axes[0], "paper model", interval.availability_paper),
                           (axes[1], "renewal model", interval.availability_renewal)):
        a = func(period=t, **kw)
        if latency and func is interval.availability_paper:
            # break the line at each jump instead of drawing a vertical riser
            piece = np.floor(latency / t)
            a = np.where(np.r_[False, np.diff(piece) != 0], np.nan, a)
            ax.plot(t / 60, func(period=t, **{**kw, "latency": 0.0}), color="0.7", lw=1,
                    ls="--", label="without latency")
        ax.plot(t / 60, a, color="k", lw=1.3, label=f"A(T), {name}")
        for model, r in rows.items():
            ax.plot(r["period_s"] / 60, r[f"availability_{name.split()[0]}"],
                    marker=_MARKERS.get(model, "x"), ls="none", ms=8, label=model)
        if latency and func is interval.availability_paper and "saxena_latency" in rows:
            ts = rows["saxena_latency"]["period_s"]
            left = float(np.nextafter(ts, 0.0))
            if math.floor(latency / left) != math.floor(latency / ts):
                # ts is the first float past a jump: the supremum (open
                # circle) is not attained; at the jump itself A_D takes the
                # lower piece's value (filled dot)
                ax.plot(left / 60, float(func(period=left, **kw)), marker="o", ms=5, color="k",
                        ls="none")
                ax.plot(ts / 60, rows["saxena_latency"]["availability_paper"], marker="o", ms=13,
                        mfc="none", mec="k", ls="none")
                ax.annotate("supremum just above the jump",
                            (ts / 60, rows["saxena_latency"]["availability_paper"]),
                            xytext=(14, -30), textcoords="offset points", fontsize=8,
                            arrowprops={"arrowstyle": "->", "lw": 0.8})
            ax.axvline(latency / 60, color="0.6", lw=0.8, ls=":")
        visible = a[np.isfinite(a) & (t >= 0.25 * min(optima))]
        top = float(np.nanmax(a))
        low = float(visible.min()) if visible.size else 0.0
        ax.set_ylim(max(0.0, low - 0.05 * (top - low)), top + 0.08 * (top - low) + 1e-6)
        ax.set_xlim(0, hi / 60)
        ax.set_xlabel("period T = tau + save [min]")
        ax.set_ylabel("availability")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    title = (f"M = {format_duration(mtbf)}, save = {format_duration(save)}, "
             f"R = {format_duration(recovery)}")
    if latency:
        title += f", D = {format_duration(latency)}"
    fig.suptitle(title)
