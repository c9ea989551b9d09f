# Run: python scripts/bench_halt.py [--nx 512 --repeat 5] [--out results/halt]
"""How long a halt takes: from the signal to the committed halt checkpoint.

Runs the stencil on 4 ranks at the default settings (automatic segment
length, no periodic checkpoints: the halt writes its own) and with async
checkpoints every 200 steps, sends SIGUSR1 to ``ulfmpy run`` once the loop
has run ``--after`` seconds, and reads from the event logs, per run: the
seconds from the signal's arrival on each rank to the halt's commit (the
``halt`` event's ``seconds_from_request``, maximum over ranks), the longest
segment before the halt (wall time between consecutive ``segment`` events of
rank 0) and the halt checkpoint's own save. The target: at most one segment
plus one save. Writes ``bench_halt.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ulfmpy.events import read_events  # noqa: E402

CASES = {"default": [], "ckpt-every-200": ["--ckpt-every", "200"]}


def run_once(case: str, extra: list[str], nx: int, after: float, workdir: Path, i: int) -> dict:
    run_dir = workdir / f"{case}-{i}"
    cmd = [sys.executable, "-m", "ulfmpy", "run", "-n", "4", "--run-dir", str(run_dir), *extra,
           str(REPO / "apps" / "stencil.py"), "--nx", str(nx), "--ny", str(nx),
           "--steps", "10000000", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        while not (run_dir.exists() and list(read_events(run_dir, "segments"))):
            if time.monotonic() - t0 > 120 or proc.poll() is not None:
                raise RuntimeError(f"{case}: the loop did not start")
            time.sleep(0.05)
        time.sleep(after)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if proc.returncode != 79:
        raise RuntimeError(f"{case}: exit {proc.returncode}: {err[-2000:]}")
    halts = list(read_events(run_dir, "halt"))
    seg = [e["t"] for e in read_events(run_dir, "segment") if e["rank"] == 0]
    gaps = [b - a for a, b in zip(seg, seg[1:])]
    step = halts[0]["step"]
    saves = [e for e in read_events(run_dir, "checkpoint_saved") if e.get("step") == step]
    commits = [e for e in read_events(run_dir, "checkpoint_committed") if e.get("step") == step]
    return {"halt_s": max(h["seconds_from_request"] for h in halts),
            "longest_segment_s": max(gaps) if gaps else None,
            "segments": len(seg), "step": step, "saves_at_halt": len(saves),
            "committed": bool(commits) or all(h["committed_step"] == step for h in halts)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nx", type=int, default=512)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--after", type=float, default=3.0, help="seconds of loop before the signal")
    p.add_argument("--out", default="results/halt")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"nx": args.nx, "ranks": 4, "repeat": args.repeat, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="bench-halt-") as tmp:
        for case, extra in CASES.items():
            runs = [run_once(case, extra, args.nx, args.after, Path(tmp), i)
                    for i in range(args.repeat)]
            halt = [r["halt_s"] for r in runs]
            seg = [r["longest_segment_s"] for r in runs if r["longest_segment_s"] is not None]
            result["cases"][case] = {
                "runs": runs, "halt_s_median": statistics.median(halt), "halt_s_max": max(halt),
                "longest_segment_s_max": max(seg) if seg else None,
                "all_committed": all(r["committed"] for r in runs)}
            print(f"{case}: signal -> committed halt checkpoint median "
                  f"{statistics.median(halt):.2f} s, max {max(halt):.2f} s; longest segment "
                  f"{max(seg) if seg else float('nan'):.2f} s; all committed: "
                  f"{result['cases'][case]['all_committed']}")
    (out / "bench_halt.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'bench_halt.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
