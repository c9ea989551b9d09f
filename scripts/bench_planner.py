# Run: python scripts/bench_planner.py [--out results/planner] [--ranks 4] [--mtbf-steps 6000]
"""Do checkpoints land where the schedule says, at the default segment length?

Launches ``ulfmpy run`` on the stencil at the default (automatic) segment
length and checks the run directory, in one run on this machine:

1. ``--ckpt-every 20`` over 240 steps (600x500): the committed checkpoint
   steps against the multiples of 20, and the segment length reached;
2. the README's ``ulfmpy run -n 4 --ckpt-every 50 apps/stencil.py``: its
   checkpoint steps against 50, 100, 150;
3. ``--mtbf 30s`` (600x500, ``--mtbf-steps`` steps): every ``next_step`` of
   the interval policy's decisions against the checkpoints, and the step
   time the last decision used against the loop's own: (loop wall time −
   exposed save time − rollback time) / steps, a ratio taken in the same run.

Writes ``bench_planner.json`` into ``--out`` and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STENCIL = str(REPO / "apps" / "stencil.py")
GRID = ["--nx", "600", "--ny", "500"]


def launch(run_dir: Path, ranks: int, args: list[str]) -> tuple[dict[str, Any], list[dict]]:
    """One ``ulfmpy run``; returns its summary and rank 0's events."""
    cmd = [sys.executable, "-m", "ulfmpy", "run", "-n", str(ranks), "--run-dir", str(run_dir),
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "events" / "rank-0000.jsonl") as fh:
        events = [json.loads(line) for line in fh]
    return summary, events


def committed(summary: dict[str, Any]) -> list[int]:
    return [c["step"] for c in summary["checkpoints"] if c["committed"]]


def decisions_landed(decisions: list[dict[str, Any]], ckpts: list[int], steps: int) -> dict:
    """Which decisions' ``next_step`` became a checkpoint (a revised one need not). Pure."""
    revised = {d["revises"] for d in decisions if "revises" in d}
    due = [d["next_step"] for d in decisions if d["next_step"] < steps]
    held = [s for s in due if s not in revised]
    return {"decisions": len(decisions), "revised": len(revised), "due_in_run": len(due),
            "held_and_landed": sum(s in ckpts for s in held), "held": len(held),
            "checkpoints_off_decision": [c for c in ckpts[1:]
                                         if c not in {d["next_step"] for d in decisions}]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "results" / "planner"))
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--mtbf-steps", type=int, default=6000)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"cpus": os.cpu_count(), "ranks": args.ranks,
                              "command": " ".join(["python", "scripts/bench_planner.py",
                                                   *sys.argv[1:]])}
    with tempfile.TemporaryDirectory(prefix="bench-planner-") as tmp:
        s, ev = launch(Path(tmp) / "every20", args.ranks,
                       ["--ckpt-every", "20", STENCIL, *GRID, "--steps", "240", "--quiet"])
        result["ckpt_every_20"] = {"checkpoints": committed(s),
                                   "expected": list(range(20, 240, 20)),
                                   "segment_length": s["segment_length"],
                                   "segments": s["segments"]}
        s, ev = launch(Path(tmp) / "readme", args.ranks,
                       ["--ckpt-every", "50", STENCIL, "--quiet"])
        result["readme_ckpt_every_50"] = {"checkpoints": committed(s), "expected": [50, 100, 150]}
        s, ev = launch(Path(tmp) / "mtbf", args.ranks,
                       ["--mtbf", "30s", STENCIL, *GRID, "--steps", str(args.mtbf_steps),
                        "--quiet"])
        decisions = [e for e in ev if e["event"] == "interval_decision"]
        ckpts = committed(s)
        saves = sum(c["exposed_s"] for c in s["checkpoints"])
        rollbacks = sum(r["seconds"] for r in s["rollbacks"])
        loop_step = (s["wall_s"] - saves - rollbacks) / s["steps"]
        used = decisions[-1]["step_time"] if decisions else None
        result["mtbf_30s"] = {"steps": s["steps"], "checkpoints": ckpts,
                              "next_steps": [d["next_step"] for d in decisions],
                              **decisions_landed(decisions, ckpts, s["steps"]),
                              "step_time_used": used, "step_time_loop": loop_step,
                              "step_time_ratio": used / loop_step if used else None}
    (out / "bench_planner.json").write_text(json.dumps(result, indent=2) + "\n")
    e20, rd, mt = result["ckpt_every_20"], result["readme_ckpt_every_50"], result["mtbf_30s"]
    print(f"--ckpt-every 20, 240 steps: checkpoints {e20['checkpoints']} "
          f"({'exact' if e20['checkpoints'] == e20['expected'] else 'WRONG'}), "
          f"segment length reached {e20['segment_length']}")
    print(f"README --ckpt-every 50: checkpoints {rd['checkpoints']} "
          f"({'exact' if rd['checkpoints'] == rd['expected'] else 'WRONG'})")
    print(f"--mtbf 30s, {mt['steps']} steps: checkpoints {mt['checkpoints']}; decisions "
          f"{mt['next_steps']} ({mt['revised']} revised); {mt['held_and_landed']} of "
          f"{mt['held']} held decisions landed; off-decision checkpoints "
          f"{mt['checkpoints_off_decision']}")
    if mt["step_time_used"]:
        print(f"    step time used {mt['step_time_used'] * 1e3:.3f} ms, loop "
              f"{mt['step_time_loop'] * 1e3:.3f} ms: ratio {mt['step_time_ratio']:.3f}")
    print(f"wrote {out / 'bench_planner.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
