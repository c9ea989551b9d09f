"""``ulfmpy report RUN_DIR``: what a run did, as text, JSON or a timeline picture.

Reads the run directory only (``ulfmpy/report.py``); works while the run is
still going and on runs with several launches (relaunches, requeues).
"""

from __future__ import annotations

import argparse
import json
import sys

from ulfmpy.errors import ConfigError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory ulfmpy run printed")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for tools)")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="also draw the timeline: one lane per logical rank (segments, "
                             "re-executions by round, checkpoints, failures, recovery phases, "
                             "joins) and a lane of interval decisions")


def run(args: argparse.Namespace) -> int:
    from ulfmpy import report

    try:
        rep = report.build(args.run_dir)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if args.plot:
        try:
            from ulfmpy._report_plot import draw
        except ImportError as exc:
            raise ConfigError(f"--plot needs matplotlib ({exc}); pip install 'ulfmpy[plot]'") from None
        draw(rep, args.plot)
    text = json.dumps(rep, indent=1, default=str) if args.json else report.render(rep)
    if args.plot and not args.json:
        text += f"\ntimeline: {args.plot}"
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `ulfmpy report ... | head`
        sys.stdout = None  # type: ignore[assignment]  # nothing left to flush at exit
    return 0
