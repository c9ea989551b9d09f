# Run: python scripts/bench_recovery.py [--nx 512 --steps 200 --repeat 3] [--out results/recovery]
"""In-job recovery (spares, respawn, shrink) against relaunching from the same checkpoint.

Each case runs the stencil on 4 ranks with a checkpoint every 20 steps and
SIGKILLs rank 2 after step 110 (so every case resumes from the checkpoint of
step 100). The time from failure to the resumed loop is read from the event
logs of the run: the kill's ``inject`` event to the first segment committed
after the recovery, for in-job recovery, and to the first segment committed
by the relaunched job for ``--max-restarts``. Also the per-phase breakdown
(from ``summary.json``) and the step time after the repair against before
it. Writes ``bench_recovery.json`` and ``bench_recovery.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ulfmpy.events import read_events  # noqa: E402

KILL_STEP = 110


def run_case(policy: str, nx: int, steps: int, workdir: Path) -> dict:
    run_dir = workdir / policy
    args = ["-n", "4", "--run-dir", str(run_dir), "--segment-steps", "10", "--ckpt-every", "20",
            "--ckpt-mode", "sync", "--inject", f"kill:rank=2,step={KILL_STEP}"]
    if policy == "relaunch":
        args += ["--recovery", "", "--max-restarts", "1"]
    elif policy == "spares":
        args += ["--spares", "1", "--recovery", "spares"]
    elif policy == "respawn-cold":
        args += ["--recovery", "respawn", "--zygote", "off"]
    else:
        args += ["--recovery", policy]
    cmd = [sys.executable, "-m", "ulfmpy", "run", *args, str(REPO / "apps" / "stencil.py"),
           "--nx", str(nx), "--ny", str(nx), "--steps", str(steps), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"{policy}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    events = list(read_events(run_dir))
    t_kill = min(e["t"] for e in events if e["event"] == "inject" and e.get("kind") == "kill")
    after = sorted(e["t"] for e in events if e["event"] == "segment" and e["t"] > t_kill
                   and e["rank"] == 0)
    resumed = [e for e in events if e["rank"] == 0 and e["t"] > t_kill
               and e["event"] in ("recovery", "restored")]
    t_resumed = min(e["t"] for e in resumed) if resumed else after[0]
    seg0 = sorted(e["t"] for e in events if e["event"] == "segment" and e["rank"] == 0)
    before = [b - a for a, b in zip(seg0, seg0[1:]) if b < t_kill]
    post = [b - a for a, b in zip(after, after[1:])]
    rec = summary["recoveries"][0] if summary.get("recoveries") else {}
    return {"policy": policy, "failure_to_resume_s": t_resumed - t_kill,
            "failure_to_first_segment_s": after[0] - t_kill,
            "phases": rec.get("phases", {}), "fingerprint": summary["fingerprint"],
            "ranks_after": summary["ranks"],
            "segment_s_before": statistics.median(before[1:]) if len(before) > 2 else None,
            "segment_s_after": statistics.median(post) if post else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nx", type=int, default=512)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "results" / "recovery"))
    args = p.parse_args()
    policies = ["spares", "respawn", "respawn-cold", "shrink", "relaunch"]
    results: dict[str, list[dict]] = {pol: [] for pol in policies}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for pol in policies:
                results[pol].append(run_case(pol, args.nx, args.steps, Path(tmp) / f"r{i}"))
    table = {}
    for pol, rows in results.items():
        table[pol] = {
            "failure_to_resume_s": statistics.median(r["failure_to_resume_s"] for r in rows),
            "failure_to_first_segment_s": statistics.median(r["failure_to_first_segment_s"] for r in rows),
            "segment_s_before": statistics.median(r["segment_s_before"] for r in rows if r["segment_s_before"]),
            "segment_s_after": statistics.median(r["segment_s_after"] for r in rows if r["segment_s_after"]),
            "phases": rows[0]["phases"], "ranks_after": rows[0]["ranks_after"],
            "fingerprints": sorted({r["fingerprint"] for r in rows}),
        }
    base = table["relaunch"]["failure_to_first_segment_s"]
    for pol in policies:
        t = table[pol]
        t["ratio_vs_relaunch"] = t["failure_to_first_segment_s"] / base
        t["step_slowdown_after"] = t["segment_s_after"] / t["segment_s_before"]
    print(f"{'policy':>12} {'to resume':>10} {'to 1st seg':>11} {'vs relaunch':>12} "
          f"{'seg after/before':>17} ranks")
    for pol in policies:
        t = table[pol]
        print(f"{pol:>12} {t['failure_to_resume_s']:>9.3f}s {t['failure_to_first_segment_s']:>10.3f}s "
              f"{t['ratio_vs_relaunch']:>12.3f} {t['step_slowdown_after']:>17.2f} {t['ranks_after']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_recovery.json").write_text(json.dumps(
        {"nx": args.nx, "steps": args.steps, "kill_step": KILL_STEP, "repeat": args.repeat,
         "table": table, "runs": results}, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        names = [pol for pol in policies]
        phase_names = ["revoke", "shrink", "agree", "spares", "respawn", "split", "restore"]
        bottom = [0.0] * len(names)
        for ph in phase_names:
            vals = [table[n]["phases"].get(ph, 0.0) for n in names]
            if any(vals):
                ax.bar(names, vals, bottom=bottom, label=ph)
                bottom = [b + v for b, v in zip(bottom, vals)]
        ax.plot(names, [table[n]["failure_to_first_segment_s"] for n in names], "k^",
                label="failure → first segment")
        ax.set_ylabel("seconds")
        ax.set_title(f"Recovery on 4 ranks, {args.nx}² stencil")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "bench_recovery.png", dpi=120)
    except ImportError:
        pass
    print(f"wrote {out / 'bench_recovery.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
