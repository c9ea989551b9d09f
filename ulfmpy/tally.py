"""What happened in a run, counted from the durable event logs. Pure (no MPI).

The counters a user trusts (faults injected, flips that escaped detection,
processes that died) must survive the death of the process that saw them
and the relaunches of the job, so they are counted from every process's
``events/rank-*.jsonl`` of every launch, never from the survivors' memory
(``docs/architecture.md``, "What a run reports"). A process's log holds one
section per launch, each opened by its ``start`` event; a section that
ends without ``exit`` or ``job_end`` belongs to a process that died.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["Tally", "tally", "unfired", "current_launch", "records"]

_ENDS = ("exit", "job_end")


@dataclass(frozen=True)
class Tally:
    """Counts over all processes and launches of a run directory."""

    injected_flips: int = 0
    injected_kills: int = 0
    escaped_faults: int = 0
    launches: int = 0
    earlier_deaths: int = 0          # processes of earlier launches that died
    failed_launches: int = 0         # earlier launches in which a process died
    fired_specs: frozenset[str] = field(default_factory=frozenset)
    injected_stalls: int = 0         # processes stopped for a while (not dead)

    @property
    def injected_faults(self) -> int:
        return self.injected_flips + self.injected_kills + self.injected_stalls


def records(path: Path) -> Iterable[dict[str, Any]]:
    try:
        fh = open(path, encoding="utf-8")
    except OSError:
        return
    with fh:
        for line in fh:
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a torn last line: the process was killed mid-write


def tally(run_dir: str | os.PathLike[str], *, launch: str | None = None) -> Tally:
    """Count the run's faults, escapes and deaths. Local (reads files only).

    ``launch``: the current launch's id; its processes are still running,
    so only earlier launches' sections count as deaths.
    """
    flips = kills = stalls = escaped = 0
    launches: set[Any] = set()
    dead: dict[Any, int] = {}
    fired: set[str] = set()
    for path in sorted((Path(run_dir) / "events").glob("rank-*.jsonl")):
        section: dict[str, Any] | None = None
        for rec in records(path):
            ev = rec.get("event")
            if ev == "start":
                _died(section, launch, dead)
                section = {"launch": rec.get("launch") or f"relaunch-{rec.get('relaunch', 0)}",
                           "ended": False}
                launches.add(section["launch"])
            elif ev in _ENDS and section is not None:
                section["ended"] = True
            elif ev == "inject":
                if rec.get("kind") == "kill":
                    kills += 1
                elif rec.get("kind") == "stall":
                    stalls += 1
                elif rec.get("execution", 1) == 1:
                    flips += 1
                if rec.get("spec"):
                    fired.add(rec["spec"])
            elif ev == "escaped":
                escaped += 1
            elif ev == "escape_cured":  # a late diagnosis rolled back past it
                escaped -= len(rec.get("steps", ()))
        _died(section, launch, dead)
    return Tally(flips, kills, escaped, len(launches), sum(dead.values()), len(dead),
                 frozenset(fired), stalls)


def current_launch() -> str:
    """This launch's name as ``start`` events record it (see :func:`tally`)."""
    return os.environ.get("ULFMPY_LAUNCH_ID") or f"relaunch-{os.environ.get('ULFMPY_RELAUNCH', '0')}"


def _died(section: dict[str, Any] | None, launch: str | None, dead: dict[Any, int]) -> None:
    if section is None or section["ended"] or section["launch"] == launch:
        return
    dead[section["launch"]] = dead.get(section["launch"], 0) + 1


def unfired(specs: Iterable[str], fired: Iterable[str]) -> list[str]:
    """The fault specs that struck nothing (rate-based flips excepted: zero hits is a draw)."""
    from ulfmpy.inject import BitFlip, parse_fault

    done = set(fired)
    out = []
    for spec in specs:
        f = parse_fault(spec)
        if isinstance(f, BitFlip) and f.rate:
            continue
        if spec not in done:
            out.append(spec)
    return out
