"""How far back each in-job recovery of a run rolled: to the newest save, or past it.

The renewal model re-executes, per failure, the work since the newest
checkpoint (T/2 on average). A survivor resumes at the newest *committed*
checkpoint unless every rank still holds the one in flight in memory
(docs/architecture.md, "In-job recovery"), and a save commits one or two
boundaries after it was staged; so a kill between a save and its commit
re-executes the interval before it too. For each recovery that logical
rank 0's process lived through, this prints the steps it lost, the steps
since the newest save it staged and since the newest commit it saw.

    python scripts/rollback_depth.py RUN_DIR [RUN_DIR...] [--out rollback.json]

Reads the run directories' events only; JSON on stdout (and in ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ulfmpy.events import read_events  # noqa: E402


def rollback_depth(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The rollbacks of process uid 0's recoveries, from a run's events in time order. Pure."""
    saved: list[int] = []
    committed: list[int] = []
    rows = []
    for e in events:
        if e.get("rank") != 0:
            continue
        if e["event"] == "checkpoint_saved":
            saved.append(int(e["step"]))
        elif e["event"] == "checkpoint_committed":
            committed.append(int(e["step"]))
        elif e["event"] == "recovery" and "reached_step" in e:
            reached = int(e["reached_step"])
            last_save = max((s for s in saved if s <= reached), default=0)
            last_commit = max((s for s in committed if s <= reached), default=0)
            rows.append({"reached": reached, "resumed": int(e["resumed_step"]),
                         "lost": int(e["lost_steps"]), "since_save": reached - last_save,
                         "since_commit": reached - last_commit,
                         "at_newest_save": int(e["resumed_step"]) == last_save})
    lost = sum(r["lost"] for r in rows)
    since_save = sum(r["since_save"] for r in rows)
    return {"recoveries": len(rows), "lost_steps": lost, "steps_since_newest_save": since_save,
            "steps_since_newest_commit": sum(r["since_commit"] for r in rows),
            "resumed_at_newest_save": sum(r["at_newest_save"] for r in rows),
            "lost_over_since_save": lost / since_save if since_save else None, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = {}
    for rd in args.run_dirs:
        if not (rd / "events").is_dir():
            p.error(f"{rd} has no events/ directory: give the run directory of a `ulfmpy run`")
        evs = sorted(read_events(rd), key=lambda e: e["t"])
        out[str(rd)] = rollback_depth(evs)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
