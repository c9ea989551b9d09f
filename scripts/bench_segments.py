# Run: python scripts/bench_segments.py [--out results/segments] [--repeats 12] [--jobs 3] [--default-jobs 4] [--ckpt-jobs 2] [--bind core|none] [--parts] [--quick]
#      python scripts/bench_segments.py --pool results/segments1 results/segments2 ...
"""Segments with local rollback: what they cost and what they save, in one run.

Three measurements (issue 3), each a ratio taken on this machine in this run:

(a) **Fault-free overhead** of the protected stencil against the same kernel
    without ulfmpy, for segment lengths 1, 5, 10, 50 and the default (auto),
    at 4 ranks. Trials run inside MPI jobs (``scripts/overhead_job.py``),
    alternating round by round, because separate launches differ by more
    than the overhead measured. Jobs differ too: the same code has
    measured from about 0 to 5 % depending on the job, for reasons not
    pinned down, so the rounds are spread over several jobs (``--jobs``,
    default 3) and pooled; the default length, which the 3 % target is
    about, gets ``--default-jobs`` (4) more jobs of ``--default-rounds``
    (8) rounds that alternate only it and the baseline. The figure is the
    median over all rounds of (protected loop time / baseline loop time of
    the same round and job), with a 95 % interval (bootstrap over jobs,
    then rounds), the quartiles and each job's own median; loop times
    exclude start-up on both sides (a protected run still includes its
    first two 10-step segments, before the default length is chosen). Ranks are bound
    to cores (``--bind core``, two per core when oversubscribed), as Open
    MPI binds them by default whenever a node is not oversubscribed; the
    default length is also measured unbound (the kernel places and moves
    the ranks), and at 2 ranks. ``overhead_other_ranks`` in the JSON holds
    these extra cases, each with its ``ranks`` and ``bind``. With
    ``--parts``, ``--jobs`` more jobs take the default's overhead apart
    (``overhead_parts``: the boundaries with the app on the plain
    communicator, the resilient communicator with its receive log off, the
    logging), as paired per-round differences. ``--ckpt-jobs`` (2) more
    jobs of ``--ckpt-rounds`` (8) rounds alternate the baseline and the
    default length with global checkpoints every ``--ckpt-every`` (100)
    steps (``overhead_ckpt``): the protection's overhead *excluding the
    saves*, per round (loop time - the loop time spent in saves, i.e. the
    sum of the checkpoints' ``exposed_s``) / the round's baseline, pooled
    like the default's figure, beside the raw ratio including them and
    the steps each run checkpointed at. ``--pool`` measures nothing:
    it pools the default's rounds from earlier runs' JSON into one figure.
(b) **Snapshot throughput**: ``ulfmpy.segment.Snapshot.take`` (and
    ``restore``) against ``np.copyto`` of the same arrays into preallocated
    buffers, in this process (no MPI): a stencil-like padded block (the
    state is a strided interior view) and a contiguous array.
(c) **One injected flip**: recovery time and rank-steps re-executed with
    local rollback (flip inside a block, flip on a block edge, and with
    per-step detection) against ``--rollback global`` (every rank redoes the
    segment), same grid, same flip.

Writes ``bench_segments.json`` and ``bench_segments.png`` into ``--out``
and prints a short table. Needs matplotlib (Agg) and an MPI for (a), (c).
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
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STENCIL = REPO / "apps" / "stencil.py"
SEGMENT_LENGTHS: list[int | None] = [1, 5, 10, 50, None]  # None: the default


# -- launching ------------------------------------------------------------------

def launch(run_dir: Path, ranks: int, settings: list[str], app_args: list[str],
           timeout: float = 900) -> dict[str, Any]:
    """Run one job under ``ulfmpy run``; return its summary plus event-derived times."""
    cmd = [sys.executable, "-m", "ulfmpy", "run", "-n", str(ranks), "--run-dir", str(run_dir),
           *settings, "--", str(STENCIL), *app_args, "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(run_dir.parent))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["loop_s"] = loop_seconds(run_dir) if summary.get("resilience") else summary["wall_s"]
    summary["catch_up_s"] = catch_up_seconds(run_dir)
    return summary


def _events(run_dir: Path) -> list[dict[str, Any]]:
    from ulfmpy.events import read_events

    return list(read_events(run_dir))


def loop_seconds(run_dir: Path) -> float:
    """Loop time: from the last rank entering the loop to the last rank's last commit.

    The baseline starts its clock after a barrier (when the last rank is
    ready) and stops it at the slowest rank's end; this is the same span,
    read from the events (``segments``: loop entered, app built; ``segment``:
    a commit), so start-up skew between ranks is not charged to ulfmpy.
    """
    start: dict[int, float] = {}
    end: dict[int, float] = {}
    for e in _events(run_dir):
        if e["event"] == "segments":
            start[e["rank"]] = e["t"]
        elif e["event"] == "segment":
            end[e["rank"]] = max(end.get(e["rank"], 0.0), e["t"])
    return max(end.values()) - max(start.values())


def catch_up_seconds(run_dir: Path) -> float:
    """Time ranks spent catching up alone after per-step detections (slowest rank).

    Read from the events (each step-``detection`` to the ``catch_up`` after
    it): a cross-check of the summary's rollback ``seconds``, which include it.
    """
    per_rank: dict[int, float] = {}
    pending: dict[int, float] = {}
    for e in _events(run_dir):
        if e["event"] == "detection" and e.get("when") == "step":
            pending[e["rank"]] = e["t"]
        elif e["event"] == "catch_up" and e["rank"] in pending:
            per_rank[e["rank"]] = per_rank.get(e["rank"], 0.0) + e["t"] - pending.pop(e["rank"])
    return max(per_rank.values(), default=0.0)


# -- (a) fault-free overhead ---------------------------------------------------------

# Open MPI's spelling: one core per rank, several ranks per core when there
# are more ranks than cores (plain "core" refuses to oversubscribe).
BIND_CORE = ["--mpirun-arg=--bind-to", "--mpirun-arg=core:overload-allowed"]


def median_ci(groups: list[list[float]], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the median of all values pooled, by a two-level bootstrap.

    ``groups`` are the per-round values of each job. Jobs differ by more
    than rounds do, so each resample draws the jobs with replacement and
    then, within each drawn job, its rounds with replacement: an interval
    from rounds alone would be too narrow when jobs disagree. Pure.
    """
    groups = [list(g) for g in groups if len(g)]
    if not groups:
        raise ValueError("median_ci needs at least one non-empty group")
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(g, dtype=float) for g in groups]
    meds = np.empty(resamples)
    for i in range(resamples):
        picked = rng.integers(len(arrays), size=len(arrays))
        meds[i] = np.median(np.concatenate(
            [arrays[j][rng.integers(len(arrays[j]), size=len(arrays[j]))] for j in picked]))
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(lo), float(hi)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def _overhead_job(tmp: Path, args: argparse.Namespace, bind: str, name: str, rounds: int,
                  ks: str, env: dict[str, str]) -> list[dict[str, Any]]:
    out = tmp / f"overhead-{args.ranks}-{bind}-{name}.json"
    cmd = [sys.executable, "-m", "ulfmpy", "run", "-n", str(args.ranks), "--run-dir",
           str(tmp / f"a-{args.ranks}-{bind}-{name}"), *(BIND_CORE if bind == "core" else []),
           "--", str(REPO / "scripts" / "overhead_job.py"), "--out", str(out),
           "--nx", str(args.nx), "--ny", str(args.ny), "--steps", str(args.steps),
           "--rounds", str(rounds), "--k", ks]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env,
                          cwd=str(tmp))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())["trials"]


def overhead(tmp: Path, args: argparse.Namespace, lengths: list[int | None] | None = None,
             bind: str = "core", default_jobs: int = 0) -> dict[str, Any]:
    """Run scripts/overhead_job.py ``args.jobs`` times (trials alternating) and compare in pairs.

    The overhead of segment length k in round r of job j is its loop time
    over the baseline's of the same round and job; the figure is the median
    over all rounds of all jobs (with the quartiles, each job's median and
    a 95 % interval from :func:`median_ci`), which cancels drift a
    min-over-runs cannot. ``args.repeats`` rounds are split evenly over the
    jobs. ``default_jobs`` more jobs of ``args.default_rounds`` rounds each
    alternate only the baseline and the default length, the figure the
    target is about: its interval is set mostly by how many jobs it pools.
    ``bind`` is "core" (ranks bound to cores) or "none" (the kernel places
    them).
    """
    lengths = SEGMENT_LENGTHS if lengths is None else lengths
    jobs = max(1, min(args.jobs, args.repeats))
    rounds = -(-args.repeats // jobs)
    ks = ",".join(str(k or 0) for k in lengths)
    env = _env()
    runs = [(str(j), rounds, ks) for j in range(jobs)]
    if None in lengths:
        runs += [(f"d{j}", args.default_rounds, "0") for j in range(default_jobs)]
    trials: list[dict[str, Any]] = []
    for j, (name, n, which) in enumerate(runs):
        trials += [{**t, "job": j} for t in _overhead_job(tmp, args, bind, name, n, which, env)]
    base = {(t["job"], t["round"]): t["loop_s"] for t in trials if t["mode"] == "baseline"}
    rows = []
    for k in lengths:
        mine = [t for t in trials if t["mode"] == f"k={k or 0}"]
        ratios = [t["loop_s"] / base[t["job"], t["round"]] for t in mine]
        q1, med, q3 = (statistics.quantiles(ratios, n=4) if len(ratios) > 1
                       else [ratios[0]] * 3)
        by_job = [[t["loop_s"] / base[j, t["round"]] for t in mine if t["job"] == j]
                  for j in sorted({t["job"] for t in mine})]
        lo, hi = median_ci(by_job)
        rows.append({"segment_steps": k or "auto", "label": f"k={k}" if k else "auto (default)",
                     "segment_length_end": mine[-1]["segment_length_end"],
                     "rounds": len(ratios), "jobs": len(by_job),
                     "overhead_pct": 100.0 * (statistics.median(ratios) - 1.0),
                     "overhead_pct_q1": 100.0 * (q1 - 1.0), "overhead_pct_q3": 100.0 * (q3 - 1.0),
                     "overhead_pct_ci95": [100.0 * (lo - 1.0), 100.0 * (hi - 1.0)],
                     "overhead_pct_per_job": [100.0 * (statistics.median(g) - 1.0) for g in by_job],
                     "ratios_by_job": by_job,  # so runs can be pooled later
                     "overhead_pct_min": 100.0 * (min(t["loop_s"] for t in mine)
                                                  / min(base.values()) - 1.0),
                     "loop_s_median": statistics.median(t["loop_s"] for t in mine),
                     "loop_s_all": [t["loop_s"] for t in mine]})
    return {"ranks": args.ranks, "nx": args.nx, "ny": args.ny, "steps": args.steps,
            "repeats": rounds * jobs, "jobs": jobs, "rounds_per_job": rounds, "bind": bind,
            "default_jobs": default_jobs if None in lengths else 0,
            "default_rounds_per_job": args.default_rounds,
            "method": "alternating trials in each job; median over all rounds of all jobs "
                      "of per-round ratios; 95 % interval by resampling jobs, then rounds",
            "baseline_loop_s_median": statistics.median(base.values()),
            "baseline_loop_s_min": min(base.values()),
            "baseline_loop_s_all": list(base.values()),
            "step_ms_baseline": 1e3 * statistics.median(base.values()) / args.steps,
            "fingerprints_identical": len({t["fingerprint"] for t in trials}) == 1, "rows": rows}


# Each part is the paired difference of two trials of one round, over the baseline's time.
PARTS = {
    "boundaries": ("k=0:raw", "baseline"),      # snapshot, detectors, agreement; app on the plain comm
    "communicator": ("k=0:nolog", "k=0:raw"),   # the resilient communicator, receive log off
    "logging": ("k=0", "k=0:nolog"),            # copying what each rank receives
    "total": ("k=0", "baseline"),
}


def parts_table(trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Where the default length's overhead goes, from alternating trials.

    ``trials`` carry ``job``, ``round``, ``mode`` (baseline, k=0, k=0:nolog,
    k=0:raw) and ``loop_s``. Each part is, per round, the difference of two
    loop times over that round's baseline, in points; reported as the mean
    with its standard error (the parts then add up to the total) and the
    median. Pure: tested without MPI.
    """
    by: dict[tuple[int, int], dict[str, float]] = {}
    for t in trials:
        by.setdefault((t["job"], t["round"]), {})[t["mode"]] = t["loop_s"]
    need = {m for pair in PARTS.values() for m in pair}
    rounds = [r for r in by.values() if need <= r.keys()]
    if len(rounds) < 2:
        raise ValueError(f"parts need at least 2 complete rounds, got {len(rounds)}")
    out = {}
    for name, (a, b) in PARTS.items():
        d = [100.0 * (r[a] - r[b]) / r["baseline"] for r in rounds]
        out[name] = {"mean_pts": statistics.fmean(d),
                     "se_pts": statistics.stdev(d) / math.sqrt(len(d)),
                     "median_pts": statistics.median(d), "rounds": len(d)}
    return out


def parts(tmp: Path, args: argparse.Namespace, bind: str = "core") -> dict[str, Any]:
    """Take the default's overhead apart: ``args.jobs`` jobs of
    ``args.parts_rounds`` rounds alternating the baseline, the default, the
    default with the receive log off, and the default with the app on the
    plain communicator."""
    jobs, rounds = args.jobs, args.parts_rounds
    trials: list[dict[str, Any]] = []
    for j in range(jobs):
        trials += [{**t, "job": j} for t in _overhead_job(
            tmp, args, bind, f"parts{j}", rounds, "0,0:nolog,0:raw", _env())]
    return {"ranks": args.ranks, "bind": bind, "jobs": jobs, "rounds_per_job": rounds,
            "fingerprints_identical": len({t["fingerprint"] for t in trials}) == 1,
            "parts": parts_table(trials), "trials": trials}


def ckpt_table(trials: list[dict[str, Any]], steps: int, ckpt_every: int) -> dict[str, Any]:
    """The default length with checkpoints against the baseline, per round.

    ``trials`` carry ``job``, ``round``, ``mode`` ("baseline" or the
    checkpointing case), ``loop_s`` and, for the checkpointing case,
    ``saves_s`` (the loop time spent in saves: the sum of its checkpoints'
    exposed times and of the partner copies they made) and ``checkpoint_steps``. Per round of each job two
    ratios to that round's baseline: excluding the saves ((loop - saves) /
    baseline) and including them (loop / baseline). Each is reported like
    the default's figure (median over all rounds, quartiles, each job's
    median, 95 % interval from :func:`median_ci`, the per-job ratios) in
    per cent overhead, with each run's checkpoint steps beside the steps
    a checkpoint every ``ckpt_every`` steps would land at (multiples of
    it before ``steps``; recorded, not required). Pure.
    """
    base = {(t["job"], t["round"]): t["loop_s"] for t in trials if t["mode"] == "baseline"}
    mine = sorted((t for t in trials if t["mode"] != "baseline" and (t["job"], t["round"]) in base),
                  key=lambda t: (t["job"], t["round"]))
    if not mine:
        raise ValueError("ckpt_table needs at least one round with both trials")
    jobs = sorted({t["job"] for t in mine})
    out: dict[str, Any] = {}
    for name, saves in (("excl_saves", True), ("incl_saves", False)):
        def ratio(t: dict[str, Any], saves: bool = saves) -> float:
            return (t["loop_s"] - (t["saves_s"] if saves else 0.0)) / base[t["job"], t["round"]]

        by_job = [[ratio(t) for t in mine if t["job"] == j] for j in jobs]
        ratios = [x for g in by_job for x in g]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        med = statistics.median(ratios)
        lo, hi = median_ci(by_job)
        out.update({f"overhead_{name}_pct": 100.0 * (med - 1.0),
                    f"overhead_{name}_pct_q1": 100.0 * (q1 - 1.0),
                    f"overhead_{name}_pct_q3": 100.0 * (q3 - 1.0),
                    f"overhead_{name}_pct_ci95": [100.0 * (lo - 1.0), 100.0 * (hi - 1.0)],
                    f"overhead_{name}_pct_per_job": [100.0 * (statistics.median(g) - 1.0)
                                                     for g in by_job],
                    f"ratios_{name}_by_job": by_job})
    expected = list(range(ckpt_every, steps, ckpt_every)) if ckpt_every > 0 else []
    runs = [[int(x) for x in t.get("checkpoint_steps", [])] for t in mine]
    out.update({
        "rounds": len(mine), "jobs": len(jobs),
        "saves_s_median": statistics.median(t["saves_s"] for t in mine),
        "saves_pct_of_baseline_median": statistics.median(
            100.0 * t["saves_s"] / base[t["job"], t["round"]] for t in mine),
        "loop_s_median": statistics.median(t["loop_s"] for t in mine),
        "baseline_loop_s_median": statistics.median(base[t["job"], t["round"]] for t in mine),
        "segment_length_end": [t.get("segment_length_end") for t in mine],
        "checkpoints_per_run": [len(r) for r in runs],
        "checkpoint_steps_per_run": runs,
        "checkpoint_steps_expected": expected,
        "runs_on_multiples": sum(1 for r in runs if r == expected)})
    return out


def ckpt_overhead(tmp: Path, args: argparse.Namespace, bind: str = "core") -> dict[str, Any]:
    """The default length with global checkpoints every ``args.ckpt_every``
    steps: ``args.ckpt_jobs`` jobs of ``args.ckpt_rounds`` rounds
    alternating it and the baseline; figures from :func:`ckpt_table`."""
    case = f"0:ckpt{args.ckpt_every}"
    trials: list[dict[str, Any]] = []
    for j in range(args.ckpt_jobs):
        trials += [{**t, "job": j} for t in _overhead_job(
            tmp, args, bind, f"ckpt{j}", args.ckpt_rounds, case, _env())]
    return {"ranks": args.ranks, "nx": args.nx, "ny": args.ny, "steps": args.steps,
            "bind": bind, "ckpt_every": args.ckpt_every, "segment_steps": "auto",
            "jobs": args.ckpt_jobs, "rounds_per_job": args.ckpt_rounds,
            "method": "alternating trials in each job; per round (protected loop time - the "
                      "time the loop spent in checkpoint saves, the sum of the checkpoints' "
                      "exposed_s) / the round's baseline loop time; median over all rounds of "
                      "all jobs, 95 % interval by resampling jobs, then rounds; incl_saves: the "
                      "same without subtracting the saves",
            "fingerprints_identical": len({t["fingerprint"] for t in trials}) == 1,
            **ckpt_table(trials, args.steps, args.ckpt_every),
            "trials": [t for t in trials if t["mode"] != "baseline"]}


def pool_runs(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The default length's overhead over several runs' rounds, jobs kept apart.

    ``results`` are bench_segments.json contents; each contributes the
    per-job ratios of its default (auto) row. Pure.
    """
    groups: list[list[float]] = []
    for res in results:
        row = next(r for r in res["overhead"]["rows"] if r["segment_steps"] == "auto")
        groups += row["ratios_by_job"]
    ratios = [x for g in groups for x in g]
    lo, hi = median_ci(groups)
    return {"runs": len(results), "jobs": len(groups), "rounds": len(ratios),
            "overhead_pct": 100.0 * (statistics.median(ratios) - 1.0),
            "overhead_pct_ci95": [100.0 * (lo - 1.0), 100.0 * (hi - 1.0)]}


# -- (b) snapshot throughput -------------------------------------------------------------

def best_seconds(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def snapshot(args: argparse.Namespace) -> dict[str, Any]:
    from ulfmpy.segment import Snapshot
    from ulfmpy.state import Block

    n = args.snap_n
    rng = np.random.default_rng(0)
    padded = rng.random((n + 2, n + 2))
    cases = {"strided block (stencil interior)": padded[1:-1, 1:-1],
             "contiguous array": rng.random((n, n))}
    rows = []
    for name, arr in cases.items():
        state = {"u": Block(arr, arr.shape, (0, 0))} if arr.base is not None else {"u": arr}
        snap = Snapshot(state)
        buf = np.empty_like(arr)
        snap.take(0)  # first touch of the buffers
        np.copyto(buf, arr)
        t_take = t_copy = t_restore = float("inf")
        for i in range(args.snap_repeat):
            # Interleaved, in alternating order, so both see the same machine and
            # neither always runs right after the other has warmed the source.
            if i % 2:
                t_copy = min(t_copy, best_seconds(lambda b=buf, a=arr: np.copyto(b, a), 1))
            t_take = min(t_take, best_seconds(lambda s=snap: s.take(0), 1))
            if not i % 2:
                t_copy = min(t_copy, best_seconds(lambda b=buf, a=arr: np.copyto(b, a), 1))
            t_restore = min(t_restore, best_seconds(snap.restore, 1))
        gb = arr.nbytes / 1e9
        rows.append({"case": name, "bytes": arr.nbytes,
                     "take_gb_s": gb / t_take, "restore_gb_s": gb / t_restore,
                     "copyto_gb_s": gb / t_copy,
                     "take_vs_copyto": t_copy / t_take, "restore_vs_copyto": t_copy / t_restore})
    return {"n": n, "repeat": args.snap_repeat, "rows": rows}


# -- (c) one flip: local against global rollback --------------------------------------------

def one_flip(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    from apps.stencil import process_grid, split

    px, py = process_grid(args.ranks, args.nx, args.ny)
    victim = 1 % args.ranks
    (_, lx), (_, ly) = split(args.nx, px, victim // py), split(args.ny, py, victim % py)
    middle = (lx // 2) * ly + ly // 2
    edge = (lx - 1) * ly + ly // 2           # last row: the south neighbour gets it next step
    k = args.flip_k
    step = k * 2 + k // 4                    # early in the third segment
    flip = "bitflip:rank={r},step={s},array=u,index={i},bit=62"
    modes = {
        "local, flip inside a block": (["--rollback", "local"], middle),
        "local, flip on a block edge": (["--rollback", "local"], edge),
        "local, per-step detection": (["--rollback", "local", "--detect-every", "1"], middle),
        "global (all ranks redo)": (["--rollback", "global"], middle),
    }
    app = ["--nx", str(args.nx), "--ny", str(args.ny), "--steps", str(args.flip_steps)]
    common = ["--detect", "finite,bounds", "--segment-steps", str(k)]
    out: dict[str, Any] = {"ranks": args.ranks, "nx": args.nx, "ny": args.ny,
                           "steps": args.flip_steps, "segment_steps": k, "flip_step": step,
                           "victim": victim, "rows": []}
    ref = launch(tmp / "c-ref", args.ranks, common, app)
    out["fault_free_loop_s"] = ref["loop_s"]
    n = 0
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(args.flip_repeats):
        for mode, (extra, index) in modes.items():
            n += 1
            spec = flip.format(r=victim, s=step, i=index)
            results[mode].append(launch(tmp / f"c{n}", args.ranks,
                                        [*common, *extra, "--inject", spec], app))
    for mode, rs in results.items():
        rb = [r["rollbacks"][0] for r in rs]
        rec = [b["seconds"] for b in rb]
        out["rows"].append({
            "mode": mode, "reexecuted_ranks": rb[0]["reexecuted_ranks"],
            "rounds": rb[0]["rounds"], "reexecuted_rank_steps": rb[0]["reexecuted_rank_steps"],
            "recovery_s_median": statistics.median(rec), "recovery_s_min": min(rec),
            "catch_up_s_from_events_median": statistics.median(r["catch_up_s"] for r in rs),
            "loop_s_median": statistics.median(r["loop_s"] for r in rs),
            "exact": all(r["fingerprint"] == ref["fingerprint"] for r in rs),
            "escaped_faults": max(r["escaped_faults"] for r in rs)})
    glob = next(r for r in out["rows"] if r["mode"].startswith("global"))
    for r in out["rows"]:
        r["rank_steps_vs_global"] = r["reexecuted_rank_steps"] / glob["reexecuted_rank_steps"]
        r["time_vs_global"] = (r["recovery_s_min"] / glob["recovery_s_min"]
                               if glob["recovery_s_min"] > 0 else None)
    return out


# -- report ----------------------------------------------------------------------------

def figure(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.6), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    if "overhead" in result:
        ov = result["overhead"]
        labels = [r["label"] for r in ov["rows"]]
        med = np.array([r["overhead_pct"] for r in ov["rows"]])
        err = np.array([[m - r["overhead_pct_q1"] for m, r in zip(med, ov["rows"])],
                        [r["overhead_pct_q3"] - m for m, r in zip(med, ov["rows"])]])
        ax1.bar(labels, med, yerr=np.clip(err, 0, None), capsize=3, color="tab:blue",
                label="median of per-round ratios (bars: quartiles)")
        jobs = [(r["label"], x) for r in ov["rows"] for x in r.get("overhead_pct_per_job", [])]
        if ov.get("jobs", 1) > 1 and jobs:
            ax1.plot(*zip(*jobs), "_", color="k", ms=14, label="one job's median")
        ci = [(i + 0.3, *r["overhead_pct_ci95"]) for i, r in enumerate(ov["rows"])
              if "overhead_pct_ci95" in r]
        if ci:  # beside its bar, clear of the quartiles
            ax1.vlines([c[0] for c in ci], [c[1] for c in ci], [c[2] for c in ci], color="tab:red",
                       lw=4, alpha=0.6, label="95 % interval of the median (jobs, then rounds)")
        if "overhead_ckpt" in result:  # beside the default's bar, left of it
            oc = result["overhead_ckpt"]
            at = next((i for i, r in enumerate(ov["rows"]) if r["segment_steps"] == "auto"),
                      len(ov["rows"]) - 1)
            for dx, name, m, c, what in ((-0.3, "excl_saves", "P", "tab:green", "saves excluded"),
                                         (-0.15, "incl_saves", "X", "tab:olive", "saves included")):
                v, (lo, hi) = oc[f"overhead_{name}_pct"], oc[f"overhead_{name}_pct_ci95"]
                ax1.errorbar([at + dx], [v], yerr=[[max(v - lo, 0)], [max(hi - v, 0)]], fmt=m,
                             color=c, ms=8, capsize=3,
                             label=f"auto, checkpoint every {oc['ckpt_every']} steps, {what} "
                                   f"(median, 95 % interval)")
        marks = iter([("D", "tab:orange"), ("s", "tab:purple"), ("^", "tab:gray")])
        for other in result.get("overhead_other_ranks", []):
            m, c = next(marks, ("o", "k"))
            how = "unbound" if other.get("bind") == "none" else "bound"
            per_core = "one per core" if other["ranks"] <= (result.get("cpus") or 0) else "2 per core"
            ax1.plot([r["label"] for r in other["rows"]], [r["overhead_pct"] for r in other["rows"]],
                     m, color=c, label=f"{other['ranks']} ranks {how} ({per_core}), median")
        ax1.axhline(3.0, color="tab:red", ls="--", lw=1, label="3 % target")
        ax1.axhline(0.0, color="k", lw=0.5)
        top = max((r.get("jobs", 1) for r in ov["rows"]), default=1)
        ax1.set_title(f"(a) fault-free overhead vs no ulfmpy (up to {top} jobs pooled)\n"
                      f"{ov['ranks']} ranks "
                      f"{'bound to cores' if ov.get('bind') == 'core' else 'unbound'}, "
                      f"{ov['nx']}x{ov['ny']}, {ov['steps']} steps, "
                      f"{ov['step_ms_baseline']:.1f} ms/step")
        ax1.set_ylabel("loop time overhead (%)")
        ax1.set_xlabel("segment length")
        # Room above the tallest bar for the legend, clear of every marker.
        ax1.set_ylim(top=1.9 * max(ax1.get_ylim()[1], 1.0))
        ax1.legend(fontsize=7, loc="upper right")
    sn = result["snapshot"]
    x = np.arange(len(sn["rows"]))
    ax2.bar(x - 0.27, [r["take_gb_s"] for r in sn["rows"]], 0.27, label="Snapshot.take")
    ax2.bar(x, [r["restore_gb_s"] for r in sn["rows"]], 0.27, label="Snapshot.restore")
    ax2.bar(x + 0.27, [r["copyto_gb_s"] for r in sn["rows"]], 0.27, label="np.copyto")
    ax2.set_xticks(x, [f"{r['case']}\n{r['bytes'] / 1e6:.0f} MB, take/copyto "
                       f"{r['take_vs_copyto']:.2f}x" for r in sn["rows"]], fontsize=8)
    ax2.set_ylabel("GB/s (bytes of state per second)")
    ax2.set_title("(b) snapshot throughput vs np.copyto")
    ax2.legend(fontsize=8)
    if "one_flip" in result:
        fl = result["one_flip"]
        rows = fl["rows"]
        x = np.arange(len(rows))
        ax3.bar(x - 0.2, [r["reexecuted_rank_steps"] for r in rows], 0.4, color="tab:orange",
                label="rank-steps re-executed")
        ax3.set_ylabel("rank-steps re-executed")
        ax3b = ax3.twinx()
        ax3b.bar(x + 0.2, [1e3 * r["recovery_s_min"] for r in rows], 0.4, color="tab:green",
                 label="recovery time (ms)")
        ax3b.set_ylabel("recovery time (ms, best of runs)")
        short = {"local, flip inside a block": "local\ninside a block",
                 "local, flip on a block edge": "local\nblock edge",
                 "local, per-step detection": "local\nper-step check",
                 "global (all ranks redo)": "global\n(all ranks)"}
        ax3.set_xticks(x, [short.get(r["mode"], r["mode"]) for r in rows], fontsize=8)
        ax3.set_title(f"(c) one flip (rank {fl['victim']}, step {fl['flip_step']}, "
                      f"k={fl['segment_steps']}): local vs global")
        h1, l1 = ax3.get_legend_handles_labels()
        h2, l2 = ax3b.get_legend_handles_labels()
        ax3.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    fig.savefig(path, dpi=110)


def print_table(result: dict[str, Any]) -> None:
    for ov in [result["overhead"], *result.get("overhead_other_ranks", [])] if "overhead" in result else []:
        bound = "bound to cores" if ov.get("bind") == "core" else "unbound"
        print(f"(a) fault-free overhead, {ov['ranks']} ranks {bound}, {ov['nx']}x{ov['ny']}, "
              f"{ov['steps']} steps, {ov['repeats']} rounds in {ov.get('jobs', 1)} job(s)"
              + (f" + {ov['default_jobs']} job(s) of {ov['default_rounds_per_job']} rounds of the "
                 f"default only" if ov.get("default_jobs") else "") + ": baseline median "
              f"{ov['baseline_loop_s_median']:.3f} s ({ov['step_ms_baseline']:.2f} ms/step); "
              f"fingerprints identical: {ov['fingerprints_identical']}")
        print(f"    {'segment':>15} {'k at end':>8} {'overhead':>9} {'95% interval':>15} "
              f"{'quartiles':>16} {'rounds':>6} {'median s':>9}  per job")
        for r in ov["rows"]:
            q = f"{r['overhead_pct_q1']:.1f} .. {r['overhead_pct_q3']:.1f}%"
            lo, hi = r.get("overhead_pct_ci95", (float("nan"), float("nan")))
            jobs = " ".join(f"{x:.1f}" for x in r.get("overhead_pct_per_job", []))
            print(f"    {r['label']:>15} {r['segment_length_end']:>8} {r['overhead_pct']:>8.1f}% "
                  f"{f'{lo:.1f} .. {hi:.1f}%':>15} {q:>16} {r.get('rounds', 0):>6} "
                  f"{r['loop_s_median']:>9.3f}  {jobs}")
    if "overhead_ckpt" in result:
        oc = result["overhead_ckpt"]
        print(f"(a) the default length with checkpoints every {oc['ckpt_every']} steps, "
              f"{oc['ranks']} ranks, {oc['rounds']} rounds in {oc['jobs']} job(s); saves median "
              f"{oc['saves_s_median']:.3f} s ({oc['saves_pct_of_baseline_median']:.1f} % of the "
              f"baseline); fingerprints identical: {oc['fingerprints_identical']}")
        for name, what in (("excl_saves", "saves excluded"), ("incl_saves", "saves included")):
            lo, hi = oc[f"overhead_{name}_pct_ci95"]
            q = f"{oc[f'overhead_{name}_pct_q1']:.1f} .. {oc[f'overhead_{name}_pct_q3']:.1f}%"
            jobs = " ".join(f"{x:.1f}" for x in oc[f"overhead_{name}_pct_per_job"])
            print(f"    {what:>15} {oc[f'overhead_{name}_pct']:>8.1f}% "
                  f"{f'{lo:.1f} .. {hi:.1f}%':>15} {q:>16}  per job {jobs}")
        steps = sorted({tuple(r) for r in oc["checkpoint_steps_per_run"]})
        print(f"    checkpoints per run {sorted(set(oc['checkpoints_per_run']))}, at steps "
              + "; ".join(", ".join(map(str, r)) or "none" for r in steps)
              + f" ({oc['runs_on_multiples']} of {oc['rounds']} runs exactly at multiples of "
                f"{oc['ckpt_every']})")
    if "overhead_parts" in result:
        pa = result["overhead_parts"]
        print(f"(a) where the default's overhead goes, {pa['ranks']} ranks, {pa['jobs']} job(s) x "
              f"{pa['rounds_per_job']} rounds (paired, points of the baseline's time, mean +- s.e.; "
              f"fingerprints identical: {pa['fingerprints_identical']})")
        for name, r in pa["parts"].items():
            print(f"    {name:>15} {r['mean_pts']:+6.2f} +- {r['se_pts']:.2f}  (median {r['median_pts']:+.2f})")
    sn = result["snapshot"]
    print(f"(b) snapshot throughput ({sn['n']}x{sn['n']} float64, best of {sn['repeat']})")
    for r in sn["rows"]:
        print(f"    {r['case']:<34} take {r['take_gb_s']:6.2f} GB/s  restore "
              f"{r['restore_gb_s']:6.2f} GB/s  np.copyto {r['copyto_gb_s']:6.2f} GB/s  "
              f"take/copyto {r['take_vs_copyto']:.2f}x")
    if "one_flip" in result:
        fl = result["one_flip"]
        print(f"(c) one bit-62 flip on rank {fl['victim']} at step {fl['flip_step']}, "
              f"k={fl['segment_steps']}, {fl['nx']}x{fl['ny']}, {fl['ranks']} ranks")
        print(f"    {'mode':<30} {'S':<14} {'rank-steps':>10} {'recovery ms':>12} "
              f"{'(median)':>9} {'vs global':>10} {'exact':>6}")
        for r in fl["rows"]:
            tg = f"{r['time_vs_global']:.2f}x" if r["time_vs_global"] is not None else "-"
            print(f"    {r['mode']:<30} {str(r['reexecuted_ranks']):<14} "
                  f"{r['reexecuted_rank_steps']:>10} {1e3 * r['recovery_s_min']:>12.1f} "
                  f"{1e3 * r['recovery_s_median']:>9.1f} {tg:>10} {str(r['exact']):>6}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "results" / "segments"))
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--nx", type=int, default=1024)
    p.add_argument("--ny", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=12, help="rounds of (a), over all its jobs")
    p.add_argument("--jobs", type=int, default=None,
                   help="(a): MPI jobs the rounds are spread over, default 3 (1 with --quick); "
                        "jobs differ by more than rounds do")
    p.add_argument("--default-jobs", type=int, default=None,
                   help="(a): more jobs alternating only the baseline and the default length, "
                        "pooled with the others for its figure; default 4 (0 with --quick)")
    p.add_argument("--default-rounds", type=int, default=8,
                   help="(a): rounds in each of those jobs (default 8)")
    p.add_argument("--ckpt-jobs", type=int, default=None,
                   help="(a): jobs alternating the baseline and the default length with global "
                        "checkpoints every --ckpt-every steps (overhead excluding the saves); "
                        "default 2 (1 with --quick), 0 = skip")
    p.add_argument("--ckpt-rounds", type=int, default=None,
                   help="(a): rounds in each of those jobs (default 8, 2 with --quick)")
    p.add_argument("--ckpt-every", type=int, default=None,
                   help="(a): their checkpoint interval in steps (default 100, 10 with --quick)")
    p.add_argument("--bind", choices=("core", "none"), default="core",
                   help="(a): bind ranks to cores (default; two per core when oversubscribed) "
                        "or leave them to the scheduler")
    p.add_argument("--snap-n", type=int, default=2048, help="snapshot array side for (b)")
    p.add_argument("--snap-repeat", type=int, default=20)
    p.add_argument("--flip-steps", type=int, default=100)
    p.add_argument("--flip-k", type=int, default=20, help="segment length in (c)")
    p.add_argument("--flip-repeats", type=int, default=3)
    p.add_argument("--skip-mpi", action="store_true", help="only (b)")
    p.add_argument("--also-ranks", type=lambda t: [int(x) for x in t.split(",") if x], default=[2],
                   help="also measure (a) at the default length at these rank counts "
                        "(default 2: one rank per core here)")
    p.add_argument("--parts", action="store_true",
                   help="(a): also take the default's overhead apart (boundaries, communicator, "
                        "logging) in --jobs more jobs, about 5 min")
    p.add_argument("--parts-rounds", type=int, default=12,
                   help="(a): rounds in each job of --parts (default 12)")
    p.add_argument("--pool", nargs="+", metavar="DIR", default=None,
                   help="measure nothing: pool the default's rounds of earlier runs' --out "
                        "directories into one figure with its 95 %% interval")
    p.add_argument("--quick", action="store_true", help="small and short: a smoke run")
    args = p.parse_args()
    if args.pool:
        try:
            runs = [json.loads((Path(d) / "bench_segments.json").read_text()) for d in args.pool]
        except (OSError, ValueError) as exc:
            p.error(f"--pool: cannot read a run: {exc}")
        try:
            pooled = pool_runs(runs)
        except (KeyError, StopIteration):
            p.error("--pool: a run has no per-job rounds of the default length "
                    "(written by an older bench_segments, or with --skip-mpi); leave it out")
        lo, hi = pooled["overhead_pct_ci95"]
        print(f"default length, {pooled['rounds']} rounds in {pooled['jobs']} jobs of "
              f"{pooled['runs']} runs: overhead {pooled['overhead_pct']:.1f} % "
              f"(95 % interval {lo:.1f} .. {hi:.1f} %)")
        return 0
    if args.quick:
        args.nx = args.ny = 256
        args.steps, args.repeats, args.snap_n, args.snap_repeat = 40, 2, 512, 5
        args.flip_steps, args.flip_repeats, args.flip_k = 40, 1, 10
    if args.jobs is None:
        args.jobs = 1 if args.quick else 3
    if args.default_jobs is None:
        args.default_jobs = 0 if args.quick else 4
    if args.ckpt_jobs is None:
        args.ckpt_jobs = 1 if args.quick else 2
    if args.ckpt_rounds is None:
        args.ckpt_rounds = 2 if args.quick else 8
    if args.ckpt_every is None:
        args.ckpt_every = 10 if args.quick else 100
    if args.jobs < 1 or args.repeats < 1:
        p.error("--jobs and --repeats must be at least 1")
    if args.parts_rounds < 2:
        p.error("--parts-rounds must be at least 2")
    if args.default_jobs < 0 or args.default_rounds < 1:
        p.error("--default-jobs must be at least 0 and --default-rounds at least 1")
    if args.ckpt_jobs < 0 or args.ckpt_rounds < 1 or args.ckpt_every < 1:
        p.error("--ckpt-jobs must be at least 0, --ckpt-rounds and --ckpt-every at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Other jobs on the machine distort every timing: keep the load with the figures.
    result: dict[str, Any] = {"cpus": os.cpu_count(), "numpy": np.__version__,
                              "loadavg_before": os.getloadavg(),
                              "command": " ".join(["python", "scripts/bench_segments.py",
                                                   *sys.argv[1:]])}
    result["snapshot"] = snapshot(args)
    if not args.skip_mpi:
        with tempfile.TemporaryDirectory(prefix="bench-segments-") as tmp:
            result["overhead"] = overhead(Path(tmp), args, bind=args.bind,
                                          default_jobs=args.default_jobs)
            others = result["overhead_other_ranks"] = []
            if args.bind == "core":
                # The default length with the ranks left to the scheduler.
                others.append(overhead(Path(tmp), args, [None], bind="none"))
            # The same at one rank per core: how much of (a) is 2:1 oversubscription.
            for n in args.also_ranks:
                sub = argparse.Namespace(**{**vars(args), "ranks": n})
                others.append(overhead(Path(tmp), sub, [None], bind=args.bind))
            if args.ckpt_jobs:
                result["overhead_ckpt"] = ckpt_overhead(Path(tmp), args, bind=args.bind)
            if args.parts:
                result["overhead_parts"] = parts(Path(tmp), args, bind=args.bind)
            result["one_flip"] = one_flip(Path(tmp), args)
    result["loadavg_after"] = os.getloadavg()
    print_table(result)
    print(f"load average before/after: {result['loadavg_before'][0]:.2f} / "
          f"{result['loadavg_after'][0]:.2f} on {result['cpus']} cores")
    (out / "bench_segments.json").write_text(json.dumps(result, indent=2) + "\n")
    figure(result, out / "bench_segments.png")
    print(f"wrote {out / 'bench_segments.json'} and {out / 'bench_segments.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
