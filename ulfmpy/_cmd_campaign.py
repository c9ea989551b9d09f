"""``ulfmpy campaign SPEC.toml``: run a seeded fault campaign and classify every run.

Schedules, classes and the spec format are in :mod:`ulfmpy.campaign`. Runs
go one at a time, each ``ulfmpy run`` in its own session with the spec's
timeout; on a timeout its process group is SIGKILLed, and so is every
process still carrying its run directory (``ULFMPY_RUN_DIR`` in its
environment, or the directory on its command line): only processes this
command started. Output, in ``--out`` (default ``campaigns/out/<spec stem>``):
``results.jsonl`` (one line per schedule; a rerun skips the IDs already
there), ``summary.txt``, ``summary.json``, ``classes_per_family.png``,
``reference.json`` (fingerprints of the fault-free ``--no-resilience``
runs) and ``runs/<id>/`` (run directories and output of the runs that were
not EXACT; ``--keep-runs`` keeps all). Exit status 1 when any run is HANG,
WRONG or LOST.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import asdict
from typing import Any

from ulfmpy import campaign as cp
from ulfmpy._campaign_report import _plot, format_summary, pending, read_results, summarize
from ulfmpy.errors import ConfigError

__all__ = ["configure", "run", "read_results", "pending", "summarize", "format_summary"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="campaign spec (TOML), e.g. campaigns/ci.toml")
    parser.add_argument("--out", default=None,
                        help="campaign directory (default campaigns/out/<spec stem>)")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N schedules")
    parser.add_argument("--replay", metavar="ID", default=None,
                        help="rerun one schedule (NNNN-hhhhhh or NNNN), print its commands and class")
    parser.add_argument("--list", action="store_true", help="print the schedules, run nothing")
    parser.add_argument("--keep-runs", action="store_true",
                        help="keep the run directories of EXACT runs too")


def _ulfmpy() -> list[str]:
    return [sys.executable, "-m", "ulfmpy", "run"]


# -- results and resume -------------------------------------------------------------


def schedule_record(s: cp.Schedule) -> dict[str, Any]:
    """The schedule's fields in a result line."""
    d = asdict(s)
    d.pop("args")
    d.pop("resume_args")
    return d


# -- summary -------------------------------------------------------------------------------------


def _processes_of(run_dir: str) -> list[int]:
    """PIDs (not this one) whose environment or command line names ``run_dir``."""
    tag = f"ULFMPY_RUN_DIR={run_dir}".encode()
    me, found = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        # The command line counts only for a process of ulfmpy's (it has ULFMPY_* set).
        ours = any(v.startswith(b"ULFMPY_") for v in env)
        if tag in env or (ours and run_dir.encode() in cmd):
            found.append(int(d.name))
    return found


def _kill_all(proc: subprocess.Popen, run_dir: str) -> int:
    """SIGKILL the launcher's group, then whatever of this run is left. Returns that count."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return _sweep(run_dir, patience=2.0)


def _sweep(run_dir: str, patience: float = 0.0) -> int:
    """Kill the run's processes still alive (after ``patience`` s for them to go by themselves)."""
    deadline = time.monotonic() + patience
    while True:
        left = _processes_of(run_dir)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return len(left)


def _event_sizes(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (run_dir / "events").glob("*.jsonl")}


def _new_events(run_dir: Path, before: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    for p in sorted((run_dir / "events").glob("*.jsonl")):
        with open(p, "rb") as fh:
            fh.seek(before.get(p.name, 0))
            for line in fh.read().decode("utf-8", "replace").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def _committed(run_dir: Path) -> list[int]:
    steps = []
    for p in (run_dir / "ckpt").glob("step-*.h5"):
        digits = p.name[5:-3]
        if digits.isdigit():
            steps.append(int(digits))
    return sorted(steps)


class _Trigger:
    """When to SIGKILL a whole job: ``{"at": T}`` or ``{"after_checkpoint": S, "delay": D}``."""

    def __init__(self, kill: dict[str, Any], run_dir: Path, t0: float) -> None:
        self.kill, self.run_dir, self.t0 = kill, run_dir, t0
        self.due: float | None = t0 + float(kill["at"]) if "at" in kill else None
        self.offsets: dict[Path, int] = {}
        self.seen: str | None = None

    def fire(self, now: float) -> bool:
        if self.due is None:
            self._scan(now)
        return self.due is not None and now >= self.due

    def _scan(self, now: float) -> None:
        for p in (self.run_dir / "events").glob("*.jsonl"):
            try:
                with open(p, "rb") as fh:
                    fh.seek(self.offsets.get(p, 0))
                    data = fh.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1            # whole lines only
            self.offsets[p] = self.offsets.get(p, 0) + end
            for line in data[:end].splitlines():
                if b"checkpoint_saved" not in line:
                    continue
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e.get("event") == "checkpoint_saved" and \
                        int(e.get("step", -1)) >= int(self.kill["after_checkpoint"]):
                    self.due = now + float(self.kill.get("delay", 0.0))
                    self.seen = f"{p.stem} saved step {e['step']} at {now - self.t0:.2f} s"
                    return


def launch(args: list[str], run_dir: Path, logs: Path, *, cwd: str, timeout: float,
           kill: dict[str, Any] | None = None) -> tuple[cp.RunOutcome, dict[str, Any]]:
    """One ``ulfmpy run --run-dir RUN_DIR ARGS``; ``kill``: SIGKILL its group when due."""
    cmd = [*_ulfmpy(), "--run-dir", str(run_dir), *args]
    before, committed = _event_sizes(run_dir), _committed(run_dir)
    if (run_dir / "summary.json").exists():       # a killed first run's: judge only this one's
        (run_dir / "summary.json").replace(run_dir / "summary-before-resume.json")
    logs.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    trigger = _Trigger(kill, run_dir, t0) if kill else None
    timed_out = killed = False
    killed_at = None
    with open(f"{logs}.stdout", "w") as so, open(f"{logs}.stderr", "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, stdin=subprocess.DEVNULL, cwd=cwd,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - t0 >= timeout:
                    timed_out = True
                    break
                if trigger is not None and trigger.fire(now):
                    killed, killed_at = True, round(now - t0, 2)
                    break
                time.sleep(0.01 if trigger is not None else 0.05)
        except BaseException:                     # Ctrl-C: the job must not outlive us
            _kill_all(proc, str(run_dir))
            raise
        if timed_out:
            stacks = dump_stacks(_processes_of(str(run_dir)), Path(f"{logs}.stacks"))
        if timed_out or killed:
            left = _kill_all(proc, str(run_dir))
        else:
            left = _sweep(str(run_dir), patience=0.5)
    wall = time.monotonic() - t0
    stderr = Path(f"{logs}.stderr").read_text(errors="replace")
    summary = None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    out = cp.RunOutcome(exit_code=None if timed_out or killed else proc.returncode,
                        timed_out=timed_out, stderr=stderr, summary=summary,
                        events=_new_events(run_dir, before), committed_before=committed,
                        wall_s=wall)
    info = {"command": shlex.join(cmd), "exit_code": out.exit_code, "wall_s": round(wall, 2),
            "killed_by_campaign": killed, "timed_out": timed_out, "leftover_processes": left,
            "first_error": cp.first_error_line(stderr), "last_error": cp.last_error_line(stderr)}
    if killed:
        info["killed_at_s"] = killed_at
        if trigger is not None and trigger.seen:
            info["kill_trigger"] = trigger.seen
    if timed_out:
        info["last_events"] = _last_events(run_dir)
        info["stacks"] = stacks
    return out, info


def dump_stacks(pids: list[int], path: Path, *, limit: int = 12) -> str | None:
    """Before a timed-out run is killed: every thread's C stack of its
    processes (``gdb -batch``), into ``path``, so a HANG shows where each
    rank waited (an MPI call, a lock). Returns the path, or None without
    gdb or processes. Local; at most ``limit`` processes, 20 s each."""
    gdb = shutil.which("gdb")
    if not gdb or not pids:
        return None
    with open(path, "w") as out:
        for pid in pids[:limit]:
            try:
                cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            out.write(f"=== pid {pid}: {cmd.decode(errors='replace').strip()}\n")
            out.flush()
            try:
                subprocess.run([gdb, "-batch", "-nx", "-p", str(pid), "-ex",
                                "thread apply all bt"], stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=20)
            except (OSError, subprocess.TimeoutExpired) as exc:
                out.write(f"(gdb: {exc})\n")
    return str(path)


def _last_events(run_dir: Path) -> dict[str, str]:
    last = {}
    for p in sorted((run_dir / "events").glob("*.jsonl")):
        lines = [ln for ln in p.read_text(errors="replace").splitlines() if ln.strip()]
        try:
            last[p.stem] = json.loads(lines[-1]).get("event") if lines else "-"
        except ValueError:
            last[p.stem] = "?"
    return last


# -- one schedule ----------------------------------------------------------------------------


def run_schedule(spec: cp.Spec, sch: cp.Schedule, reference: str, where: Path) -> dict[str, Any]:
    """Run a schedule (and its resume) in ``where``; return its result line."""
    if where.exists():
        shutil.rmtree(where)
    run_dir = (where / "run").resolve()
    runs = []
    if sch.kill_job is not None:
        first, info = launch(sch.args, run_dir, where / "launch-1", cwd=spec.root,
                             timeout=spec.timeout, kill=sch.kill_job)
        info["role"] = "killed job"
        runs.append(info)
        if first.timed_out:
            judged = first
        else:
            judged, info2 = launch(sch.resume_args or [], run_dir, where / "launch-2",
                                   cwd=spec.root, timeout=spec.timeout)
            info2["role"] = "resume"
            info2["committed_before"] = judged.committed_before
            runs.append(info2)
    else:
        judged, info = launch(sch.args, run_dir, where / "launch-1", cwd=spec.root,
                              timeout=spec.timeout)
        runs.append(info)
    cls, reason = cp.classify(judged, reference)
    summary = judged.summary or {}
    rec = {"id": sch.id, **schedule_record(sch), "class": cls, "reason": reason,
           "commands": [r["command"] for r in runs], "exit_code": runs[-1]["exit_code"],
           "first_error": runs[-1]["first_error"], "last_error": runs[-1]["last_error"],
           "wall_s": round(sum(r["wall_s"] for r in runs), 2),
           "fingerprint": summary.get("fingerprint"), "reference": reference,
           "escaped_faults": cp.escaped_count(judged), "injected_faults": summary.get("injected_faults"),
           "recoveries": [r.get("policy") for r in summary.get("recoveries", [])],
           "launches": summary.get("launches"), "runs": runs, "dir": str(where)}
    return rec


# -- reference fingerprints -------------------------------------------------------------------


def reference_for(spec: cp.Spec, sch: cp.Schedule, out: Path) -> str:
    """The fault-free fingerprint of the schedule's app/args/steps, cached in reference.json."""
    path = out / "reference.json"
    refs = json.loads(path.read_text()) if path.exists() else {}
    if sch.ref_key in refs:
        return refs[sch.ref_key]["fingerprint"]
    where = out / "reference" / f"ref-{len(refs)}"
    if where.exists():
        shutil.rmtree(where)
    args = ["-n", str(spec.reference_ranks), "--no-resilience", *shlex.split(sch.ref_key)]
    res, info = launch(args, (where / "run").resolve(), where / "launch", cwd=spec.root,
                       timeout=spec.timeout)
    fp = (res.summary or {}).get("fingerprint")
    if res.exit_code != 0 or not fp:
        raise ConfigError(f"the reference run failed (exit {res.exit_code}): {info['command']}: "
                          f"{(res.stderr.strip().splitlines() or ['no output'])[-1]}")
    refs[sch.ref_key] = {"fingerprint": fp, "command": info["command"], "wall_s": info["wall_s"]}
    path.write_text(json.dumps(refs, indent=2) + "\n")
    print(f"reference {fp} ({info['wall_s']} s): {info['command']}", flush=True)
    return fp


# -- the command ------------------------------------------------------------------------------


def _append(path: Path, rec: dict[str, Any]) -> None:
    """One result line, durable before the next run (a torn last line is ended first)."""
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as fh:
        if torn:
            fh.write("\n")
        fh.write(json.dumps(rec, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _finish(spec: cp.Spec, todo: list[cp.Schedule], out: Path) -> int:
    done = read_results(out / "results.jsonl")
    rows = [done[s.id] for s in todo if s.id in done]
    summary = summarize(rows)
    summary.update(spec=spec.path, seed=spec.seed, schedules=len(todo))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = format_summary(summary, f"campaign {spec.path} (seed {spec.seed}, {len(todo)} schedules)")
    (out / "summary.txt").write_text(text)
    print(text, end="")
    note = _plot(summary, out / "classes_per_family.png", f"{spec.stem}: classes per fault family")
    print(f"ulfmpy campaign: {note}" if note else
          f"results in {out}/ (results.jsonl, summary.txt, summary.json, classes_per_family.png)")
    return 1 if any(summary["classes"][c] for c in cp.FAILING) else 0


def _replay(spec: cp.Spec, sid: str, out: Path) -> int:
    sch = cp.find_schedule(spec, sid)
    print(f"schedule {sch.id}: {sch.describe()}")
    ref = reference_for(spec, sch, out)
    rec = run_schedule(spec, sch, ref, out / "replay" / sch.id)
    for r in rec["runs"]:
        print(f"  $ {r['command']}")
        print(f"    exit {r['exit_code']}  {r['wall_s']} s"
              + (f"  (SIGKILLed by the campaign at {r['killed_at_s']} s)"
                 if r["killed_by_campaign"] else "")
              + (f"  first error: {r['first_error']}" if r["first_error"] else ""))
    print(f"{sch.id} {rec['class']}: {rec['reason']}  (run directory {rec['dir']}/run)")
    return 1 if rec["class"] in cp.FAILING else 0


def run(args: argparse.Namespace) -> int:
    spec = cp.load_spec(args.spec)
    out = Path(args.out or Path("campaigns") / "out" / spec.stem).resolve()
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    todo = cp.schedules(spec, args.limit)
    if args.list:
        for s in todo:
            print(f"{s.id} {s.describe()}")
            print(f"    ulfmpy run {shlex.join(s.args)}")
            if s.resume_args:
                print(f"    ulfmpy run {shlex.join(s.resume_args)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if args.replay:
        return _replay(spec, args.replay, out)
    results = out / "results.jsonl"
    left = pending(todo, read_results(results))
    if len(left) < len(todo):
        print(f"ulfmpy campaign: {len(todo) - len(left)} of {len(todo)} schedules already in "
              f"{results}; running the other {len(left)}")
    t0 = time.monotonic()

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for i, sch in enumerate(left, 1):
            ref = reference_for(spec, sch, out)
            rec = run_schedule(spec, sch, ref, out / "runs" / sch.id)
            _append(results, rec)
            if rec["class"] == "EXACT" and not args.keep_runs:
                shutil.rmtree(out / "runs" / sch.id, ignore_errors=True)
            extra = "" if rec["class"] == "EXACT" else f"  {rec['reason'][:100]}"
            print(f"{i:>4}/{len(left)} {sch.id} {rec['class']:<16} {rec['wall_s']:6.1f}s  "
                  f"{sch.describe()}{extra}", flush=True)
    except KeyboardInterrupt:
        done = len(read_results(results))
        print(f"ulfmpy campaign: interrupted; the job in flight was killed; {done} results kept "
              f"in {results}: run the same command again to go on", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if left:
        print(f"ulfmpy campaign: {len(left)} runs in {time.monotonic() - t0:.0f} s")
    return _finish(spec, todo, out)
