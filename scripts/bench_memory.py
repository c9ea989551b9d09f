# Run: python scripts/bench_memory.py --out bench_memory.json [--sizes 8,32,128] [-n 4] [--png bench_memory.png]
"""Peak memory per process and the processes and files a checkpoint takes.

Launches the stencil (``apps/stencil.py``) under ``ulfmpy run`` and watches
its processes from outside: every 20 ms it reads ``VmHWM`` (the peak
resident set) of each process whose environment names the run directory,
and sorts them into ranks, the node's checkpoint writer, the zygote and the
MPI daemons. Three parts:

- **memory**: for each state size per rank (``--sizes``, MB), the extra
  peak of a rank over the unprotected app (``--no-resilience``), in units of
  its state, at the defaults, with checkpoints (``--ckpt-every``) and with
  checkpoints without partner copies (``--partner 0``); and the node's
  extra peak (the run's processes' ``Pss`` summed, shared memory counted
  once) per rank, in the same units;
- **processes and files**: 8 ranks on 1, 2, 4 and 8 virtual nodes (8, 4, 2,
  1 ranks per node) with checkpoints: checkpoint writers seen, and files per
  committed checkpoint;
- **no leak**: the writer's and the ranks' peaks after 10 and after 50
  checkpoints of the same run shape.

Writes JSON (and a PNG with ``--png``). Nothing here is collective.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    if os.getuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _kind(cmd: bytes) -> str:
    exe = os.path.basename(cmd.split(b"\0", 1)[0])
    if exe in (b"mpirun", b"prterun", b"prted", b"ompirun_wrapper") or b"prte" in exe:
        return "mpi"
    if b"_ckpt_helper" in cmd:
        return "writer"
    if b"ulfmpy.zygote" in cmd:
        return "zygote"
    if b"ulfmpy._rank" in cmd or b"_spawn_stub" in cmd:
        return "rank"
    if b"-m\0ulfmpy\0run" in cmd:
        return "launcher"
    return "mpi"


def _hwm_kb(pid: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _pss_kb(pid: str) -> int | None:
    """The process's proportional set size: shared pages (the staging buffers in
    /dev/shm, mapped by a rank and its node's writer) split among their mappers."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def watched_run(args: list[str], run_dir: Path) -> dict[str, object]:
    """Run ``ulfmpy run --run-dir RUN_DIR ARGS``; its processes' peaks (MB) by kind.

    Per process: ``VmHWM``, the kernel's own peak of the resident set (shared
    pages count in full in every process that maps them). Per node
    (``"node"``): the largest sum over the run's processes of their ``Pss``
    seen in one sample, where shared pages count once.
    """
    cmd = [sys.executable, "-m", "ulfmpy", "run", "--run-dir", str(run_dir), *args]
    proc = subprocess.Popen(cmd, env=_env(), cwd=str(REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    tag = f"ULFMPY_RUN_DIR={run_dir}".encode()
    seen: dict[str, tuple[str, int]] = {}
    ours: set[str] = set()
    node_kb = 0
    while proc.poll() is None:
        total = 0
        for d in Path("/proc").glob("[0-9]*"):
            try:
                if d.name not in ours:
                    if tag not in d.joinpath("environ").read_bytes().split(b"\0"):
                        continue
                    ours.add(d.name)
                # Asked each time: a process forked by a rank (the writer)
                # shows the rank's command line until it execs.
                kind = _kind(d.joinpath("cmdline").read_bytes())
            except OSError:
                continue
            hwm = _hwm_kb(d.name)
            if hwm is not None:
                before = seen.get(d.name, (kind, 0))
                # an exec starts a new peak: the fork's was its parent's
                seen[d.name] = (kind, max(hwm, before[1]) if before[0] == kind else hwm)
            if kind in ("rank", "writer", "zygote"):
                total += _pss_kb(d.name) or 0
        node_kb = max(node_kb, total)
        time.sleep(0.02)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"bench_memory: {' '.join(cmd)} exited {proc.returncode}:\n{err[-2000:]}")
    by: dict[str, list[float]] = {}
    for kind, kb in seen.values():
        by.setdefault(kind, []).append(kb / 1024)
    out: dict[str, object] = {k: sorted(v) for k, v in by.items()}
    out["node"] = node_kb / 1024
    return out


def _state_mb(run_dir: Path) -> float:
    """Rank 0's state bytes, from its ``segments`` event (MB)."""
    for line in (run_dir / "events" / "rank-0000.jsonl").read_text().splitlines():
        ev = json.loads(line)
        if ev.get("event") == "segments":
            return ev["state_bytes"] / 2**20
    raise SystemExit(f"bench_memory: no segments event in {run_dir}")


def memory(sizes: list[int], ranks: int, tmp: Path, ckpt_every: int) -> list[dict[str, object]]:
    rows = []
    for mb in sizes:
        side = int(math.sqrt(mb * 2**20 * ranks / 8))
        app = ["apps/stencil.py", "--nx", str(side), "--ny", str(side), "--steps", "120", "--quiet"]
        ways = {"plain": ["--no-resilience"], "default": [],
                "checkpoints": ["--ckpt-every", str(ckpt_every)],
                "checkpoints_no_partner": ["--ckpt-every", str(ckpt_every), "--partner", "0"]}
        row: dict[str, object] = {"state_mb_per_rank": None, "grid": side, "ways": {}}
        for name, flags in ways.items():
            run_dir = tmp / f"mem-{mb}-{name}"
            peaks = watched_run(["-n", str(ranks), *flags, *app], run_dir)
            if name == "default":
                row["state_mb_per_rank"] = _state_mb(run_dir)
            node_mb = float(peaks.pop("node"))  # type: ignore[arg-type]
            row["ways"][name] = {"peaks_mb": peaks,
                                 "rank_mb": statistics.median(peaks.get("rank", [0.0])),
                                 "node_mb": node_mb,
                                 "processes": {k: len(v) for k, v in peaks.items()}}
            print(f"{mb} MB/rank {name}: rank {row['ways'][name]['rank_mb']:.0f} MB, "
                  f"processes {row['ways'][name]['processes']}", file=sys.stderr, flush=True)
        state = float(row["state_mb_per_rank"])  # type: ignore[arg-type]
        plain = row["ways"]["plain"]["rank_mb"]
        plain_node = row["ways"]["plain"]["node_mb"]
        for w in row["ways"].values():
            w["extra_mb"] = w["rank_mb"] - plain
            w["extra_per_state"] = (w["rank_mb"] - plain) / state
            # the node's extra memory (processes' Pss summed) per rank, in states
            w["node_extra_per_state"] = (w["node_mb"] - plain_node) / (state * ranks)
        rows.append(row)
    return rows


def processes_and_files(tmp: Path) -> list[dict[str, object]]:
    from ulfmpy.checkpoint import list_checkpoints

    rows = []
    app = ["apps/stencil.py", "--nx", "256", "--ny", "256", "--steps", "60", "--quiet"]
    for nodes in (1, 2, 4, 8):
        run_dir = tmp / f"nodes-{nodes}"
        peaks = watched_run(["-n", "8", "--virtual-nodes", str(nodes), "--ckpt-every", "20", *app],
                            run_dir)
        ckpts = [c for c in list_checkpoints(run_dir) if c.committed]
        newest = ckpts[-1]
        step_dir = Path(newest.path).with_suffix("")
        files = len(list(step_dir.glob("*.h5"))) + 1  # rank files + the manifest
        rows.append({"virtual_nodes": nodes, "ranks_per_node": 8 // nodes,
                     "writers": len(peaks.get("writer", [])), "files_per_checkpoint": files,
                     "writer_mb": peaks.get("writer", [])})
        print(f"{nodes} nodes: {rows[-1]['writers']} writers, {files} files", file=sys.stderr, flush=True)
    return rows


def no_leak(tmp: Path) -> dict[str, object]:
    out = {}
    for count in (10, 50):
        run_dir = tmp / f"leak-{count}"
        peaks = watched_run(["-n", "4", "--ckpt-every", "5", "--ckpt-keep", "2", "apps/stencil.py",
                             "--nx", "1024", "--ny", "1024", "--steps", str(5 * count), "--quiet"],
                            run_dir)
        out[str(count)] = {"rank_mb": max(peaks.get("rank", [0.0])),
                           "writer_mb": max(peaks.get("writer", [0.0]))}
    out["rank_growth_mb"] = out["50"]["rank_mb"] - out["10"]["rank_mb"]
    out["writer_growth_mb"] = out["50"]["writer_mb"] - out["10"]["writer_mb"]
    return out


def plot(result: dict[str, object], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["memory"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, way in enumerate(("default", "checkpoints", "checkpoints_no_partner")):
        xs = [r["state_mb_per_rank"] for r in rows]
        ys = [r["ways"][way]["extra_per_state"] for r in rows]
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=f"{way}: a rank's peak")
        ys = [r["ways"][way]["node_extra_per_state"] for r in rows]
        ax.plot(xs, ys, marker="x", linestyle="--", color=f"C{i}",
                label=f"{way}: node's peak per rank")
    ax.axhline(3.0, color="grey", linestyle=":", label="target ≤ 3× state")
    ax.axhline(2.0, color="grey", linestyle="-.", label="2× state (+ the log)")
    ax.set_xscale("log")
    ax.set_xlabel("state per rank (MB)")
    ax.set_ylabel("extra peak memory per rank / state")
    ax.legend(fontsize=7)
    ax.set_title(f"{result['ranks']} ranks, stencil, ckpt every {result['ckpt_every']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_memory.json")
    ap.add_argument("--png", default=None)
    ap.add_argument("-n", "--ranks", type=int, default=4)
    ap.add_argument("--sizes", default="8,32,128", help="state MB per rank, comma-separated")
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--skip", default="", help="parts to skip: memory,nodes,leak")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, object] = {"ranks": args.ranks, "ckpt_every": args.ckpt_every}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        if "memory" not in skip:
            result["memory"] = memory([int(s) for s in args.sizes.split(",")], args.ranks,
                                      Path(tmp), args.ckpt_every)
        if "nodes" not in skip:
            result["processes_and_files"] = processes_and_files(Path(tmp))
        if "leak" not in skip:
            result["no_leak"] = no_leak(Path(tmp))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.png and "memory" in result:
        plot(result, args.png)
    for r in result.get("memory", []):
        print(f"state {r['state_mb_per_rank']:.1f} MB/rank: " + ", ".join(
            f"{w} +{v['extra_per_state']:.2f}x (node +{v['node_extra_per_state']:.2f}x per rank)"
            for w, v in r["ways"].items() if w != "plain"))
    for r in result.get("processes_and_files", []):
        print(f"{r['ranks_per_node']} ranks/node: {r['writers']} writer(s), "
              f"{r['files_per_checkpoint']} files per checkpoint")
    if "no_leak" in result:
        nl = result["no_leak"]
        print(f"10 -> 50 checkpoints: rank peak {nl['rank_growth_mb']:+.1f} MB, "
              f"writer peak {nl['writer_growth_mb']:+.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
