"""The ``ulfmpy`` command: ``run | interval | simulate | inspect | report | campaign``.

Each subcommand lives in its own module exposing ``configure(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so
``ulfmpy interval`` never loads MPI.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

__all__ = ["main", "COMMANDS"]

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("ulfmpy.launch", "launch an mpi4py program under mpirun with fault tolerance"),
    "interval": ("ulfmpy._cmd_interval", "optimal checkpoint interval under several models"),
    "simulate": ("ulfmpy._cmd_simulate", "Monte Carlo availability of checkpoint intervals"),
    "inspect": ("ulfmpy._cmd_inspect", "list, verify and print checkpoints"),
    "report": ("ulfmpy._cmd_report", "what a run did: text, JSON or a timeline picture"),
    "campaign": ("ulfmpy._cmd_campaign", "run a seeded fault campaign and classify every run"),
}


def _parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object, Any]:
    parser = argparse.ArgumentParser(
        prog="ulfmpy", allow_abbrev=False,
        description="Make mpi4py timestep loops survive faults: run a protected program, pick "
                    "a checkpoint interval, look at runs and checkpoints, run fault campaigns.",
        epilog="Each command has its own help: ulfmpy COMMAND --help")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    name = next((a for a in argv if not a.startswith("-")), None)
    module = chosen = None
    for cmd, (modname, help_) in COMMANDS.items():
        # No prefix matching: `ulfmpy run -n 2 app.py --n 96` must reach the app.
        p = sub.add_parser(cmd, help=help_, description=help_, allow_abbrev=False)
        if cmd == name:
            module, chosen = importlib.import_module(modname), p
            module.configure(p)
    return parser, module, chosen


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ulfmpy`` console script and ``python -m ulfmpy``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module, sub = _parser(argv)
    split = getattr(module, "split_program", None)
    if split is not None:
        # The program's own arguments never reach argparse (``-m mod --steps 5``).
        at = argv.index(next(a for a in argv if not a.startswith("-"))) + 1
        head, program = split(argv[at:], sub)
        args = parser.parse_args(argv[:at] + head)
        args.program = program
    else:
        args = parser.parse_args(argv)
    from ulfmpy.errors import UlfmpyError

    try:
        return int(module.run(args) or 0)  # type: ignore[attr-defined]
    except UlfmpyError as exc:
        print(f"ulfmpy {args.command}: error: {exc}", file=sys.stderr)
        return 2
