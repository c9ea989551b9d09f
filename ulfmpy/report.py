"""What happened in a run, read back from its run directory. Pure (no MPI).

:func:`build` reads ``events/*.jsonl`` (every process, every launch) and
``summary.json`` when the run completed, and returns a plain dict: the run's
launches, steps and rates, segments, rollbacks, checkpoints, failures and
recoveries, interval decisions, faults and lost work, and a timeline (one
lane per logical rank) that :mod:`ulfmpy._report_plot` draws. A run still
going, or one that died, has no summary: the report says so and shows what
its events hold. ``ulfmpy report`` (``ulfmpy/_cmd_report.py``) prints it.
The event names are listed in ``docs/architecture.md`` ("What a run reports").
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ulfmpy.tally import records, tally

__all__ = ["build", "render"]

#: Events after which a process computes nothing more in its section.
_STOPS = ("failure", "finish", "exit", "job_end", "halt", "repair_stuck")


def _sections(run_dir: Path) -> list[dict[str, Any]]:
    """One entry per process and launch: its start record and its events."""
    out: list[dict[str, Any]] = []
    for path in sorted((run_dir / "events").glob("rank-*.jsonl")):
        cur: dict[str, Any] | None = None
        for rec in records(path):
            if rec.get("event") == "start":
                cur = {"start": rec, "events": [], "file": path.name,
                       "launch": rec.get("launch") or f"relaunch-{rec.get('relaunch', 0)}"}
                out.append(cur)
            elif cur is not None:
                cur["events"].append(rec)
    return out


def _launches(sections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by: dict[str, dict[str, Any]] = {}
    for sec in sections:
        st = sec["start"]
        ts = [st["t"]] + [e["t"] for e in sec["events"]]
        la = by.setdefault(sec["launch"], {"id": sec["launch"], "relaunch": st.get("relaunch", 0),
                                           "t0": st["t"], "t1": st["t"], "ranks": st.get("size"),
                                           "spares": st.get("spares", 0), "processes": 0,
                                           "restored_step": None, "outcome": "running or died",
                                           "last_step": 0})
        la["t0"], la["t1"] = min(la["t0"], st["t"]), max(la["t1"], max(ts))
        la["processes"] += 1
        for e in sec["events"]:
            ev = e["event"]
            if ev == "restored" and la["restored_step"] is None:
                la["restored_step"] = e.get("step")
            elif ev == "segment":
                # A segment's start was reached; its end only when the run finished.
                la["last_step"] = max(la["last_step"], int(e.get("step", 0)))
                la["_end"] = max(la.get("_end", 0), int(e.get("end", 0)))
            elif ev == "finish":
                la["outcome"] = "completed"
                la["_done"] = True
            elif ev == "halt" and la["outcome"] != "completed":
                la["outcome"] = f"halted at step {e.get('step')} (exit 79)"
            elif ev == "failure":
                la["last_step"] = max(la["last_step"], int(e.get("step") or 0))
            elif ev == "inject" and e.get("kind") == "kill":
                la.setdefault("_kills", []).append(f"rank {st.get('logical')} at step "
                                                   f"{e.get('step')}")
            elif ev == "repair_stuck" and la["outcome"] == "running or died":
                la["outcome"] = f"repair unfinished after {e.get('seconds')} s (exit 75)"
    launches = sorted(by.values(), key=lambda la: la["t0"])
    for i, la in enumerate(launches):
        end, done, kills = la.pop("_end", 0), la.pop("_done", False), la.pop("_kills", [])
        if done:
            la["last_step"] = max(la["last_step"], end)
        elif la["outcome"] == "running or died" and i < len(launches) - 1:
            # A later launch exists, so this one ended without finishing.
            la["outcome"] = (f"ended after a kill ({'; '.join(kills)})" if kills else
                             "ended before finishing (killed, or a process died)")
    for i, la in enumerate(launches):
        la["index"] = i
        la["wall_s"] = la["t1"] - la["t0"]
    return launches


def _first_per_launch(sections: list[dict[str, Any]], event: str,
                      key: tuple[str, ...]) -> list[dict[str, Any]]:
    """Events every rank logs, once per launch and ``key`` (rank 0's copy first)."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    order = sorted(sections, key=lambda s: (s["start"].get("logical") is None,
                                            s["start"].get("logical") or 0))
    for sec in order:
        for e in sec["events"]:
            if e["event"] != event:
                continue
            k = (sec["launch"],) + tuple(json.dumps(e.get(f), sort_keys=True) for f in key)
            if k not in seen:
                seen[k] = dict(e, launch=sec["launch"])
    return sorted(seen.values(), key=lambda e: e["t"])


def _lanes(sections: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """Timeline items per logical rank, times in seconds from ``t0``."""
    lanes: dict[int, list[dict[str, Any]]] = {}
    marks: list[dict[str, Any]] = []

    def put(lane: int | None, **item: Any) -> None:
        if lane is not None:
            lanes.setdefault(int(lane), []).append(item)

    # One process's watchdog ends the job (exit 75) and the others die before
    # theirs fire: a failure with no recovery after it, in a launch that
    # ended stuck, is a repair left unfinished (up to the process's own
    # repair_stuck, or the first one's when it logged none).
    stuck_at: dict[str, float] = {}
    for sec in sections:
        for e in sec["events"]:
            if e["event"] == "repair_stuck":
                stuck_at[sec["launch"]] = min(e["t"], stuck_at.get(sec["launch"], e["t"]))

    for sec in sections:
        logical = sec["start"].get("logical")
        seg: dict[str, Any] | None = None
        rounds: list[dict[str, Any]] = []
        failed_at: float | None = None

        def close(t: float) -> None:
            nonlocal seg
            if seg is not None:
                put(seg["lane"], kind="segment", t0=seg["t"] - t0, t1=t - t0, step=seg["step"],
                    end=seg["end"])
                seg = None

        for e in sec["events"]:
            ev, t = e["event"], e["t"]
            if ev == "segment":
                close(t)
                seg = {"t": t, "step": e.get("step"), "end": e.get("end"), "lane": logical}
            elif ev == "rollback_round":
                close(t)
                rounds.append({"t": t, "round": e.get("round", 1), "S": e.get("S", [])})
            elif ev == "rollback":
                if not rounds:  # a per-step catch-up: one round, no round events
                    rounds = [{"t": t - float(e.get("seconds") or 0.0), "round": 1,
                               "S": e.get("reexecuted_ranks") or []}]
                for i, r in enumerate(rounds):
                    t_end = rounds[i + 1]["t"] if i + 1 < len(rounds) else t
                    if logical in r["S"]:
                        put(logical, kind="reexecution", t0=r["t"] - t0, t1=t_end - t0,
                            round=r["round"], step=e.get("step"))
                rounds = []
            elif ev == "checkpoint_saved":
                put(logical, kind="checkpoint", t=t - t0, step=e.get("step"),
                    exposed_s=e.get("exposed_s", 0.0))
            elif ev == "inject":
                kind = {"kill": "kill", "stall": "stall"}.get(e.get("kind"), "flip")
                put(logical, kind=kind, t=t - t0, step=e.get("step"))
            elif ev == "detection":
                put(logical, kind="detection", t=t - t0, step=e.get("step"))
            elif ev in _STOPS:
                close(t)
                if ev == "failure":
                    failed_at = t
                    put(logical, kind="failure", t=t - t0, step=e.get("step"))
            elif ev == "recovery":
                close(t)
                failed_at = None
                new = e.get("logical", logical)
                start = t - float(e.get("seconds") or 0.0)
                phases = e.get("phases") or {}
                at = start
                for name, secs in phases.items():
                    put(new, kind="phase", phase=name, t0=at - t0, t1=at + float(secs) - t0)
                    at += float(secs)
                if e.get("role") == "recovered" or (logical is None and new is not None):
                    put(new, kind="join", t=t - t0, policy=e.get("policy"))
                logical = new
            elif ev == "interval_decision" and logical == 0:
                marks.append({"kind": "interval", "t": t - t0, "steps": e.get("steps"),
                              "next_step": e.get("next_step"), "model": e.get("model")})
        if seg is not None and sec["events"]:
            close(sec["events"][-1]["t"])
        stuck = stuck_at.get(sec["launch"])
        if failed_at is not None and stuck is not None:
            put(logical, kind="phase", phase="unfinished repair", t0=failed_at - t0,
                t1=max(stuck, sec["events"][-1]["t"]) - t0)
    return {"lanes": {str(k): v for k, v in sorted(lanes.items())}, "marks": marks}


def build(run_dir: str | Path) -> dict[str, Any]:
    """The report of a run directory. Local (reads files only).

    Raises:
        FileNotFoundError: ``run_dir`` holds no event log (not a run directory).
    """
    root = Path(run_dir)
    sections = _sections(root)
    if not sections:
        raise FileNotFoundError(f"{root} has no events/rank-*.jsonl: not an ulfmpy run directory "
                                "(give the directory ulfmpy run printed, e.g. runs/run-...)")
    summary = None
    try:
        summary = json.loads((root / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    launches = _launches(sections)
    t0 = launches[0]["t0"]
    last = launches[-1]
    total_steps = summary["steps"] if summary else max(la["last_step"] for la in launches)
    elapsed = last["t1"] - t0
    this_wall = summary["wall_s"] if summary else last["wall_s"]
    this_steps = (summary.get("steps_run", summary["steps"]) if summary else
                  last["last_step"] - (last["restored_step"] or 0))
    seg_ev = [(s, e) for s in sections for e in s["events"] if e["event"] == "segment"
              and s["start"].get("logical") == 0]
    lengths = Counter(int(e["end"]) - int(e["step"]) for _, e in seg_ev)
    rollbacks = _first_per_launch(sections, "rollback", ("step", "reexecuted_ranks", "rounds"))
    # A replacement's own "recovered" record (no failed_ranks) repeats its repair's.
    recoveries = [r for r in _first_per_launch(sections, "recovery",
                                               ("detected_at_step", "attempt", "failed_ranks"))
                  if r.get("failed_ranks") is not None]
    saved = {(e["launch"], e["step"]): e for e in _first_per_launch(sections, "checkpoint_saved",
                                                                     ("step",))}
    ckpts = []
    for e in _first_per_launch(sections, "checkpoint_committed", ("step",)):
        s = saved.get((e["launch"], e["step"]), {})
        ckpts.append({"step": e["step"], "launch": e["launch"], "t": e["t"] - t0,
                      "exposed_s": s.get("exposed_s", e.get("exposed_s")),
                      "write_s": e.get("write_s"), "bytes": e.get("bytes")})
    decisions = [dict(e, t=e["t"] - t0) for s in sections for e in s["events"]
                 if e["event"] == "interval_decision" and s["start"].get("logical") == 0]
    detections = _first_per_launch(sections, "detection", ("step",))
    t = tally(root)
    lost_recovery = sum(int(r.get("lost_steps") or 0) for r in recoveries)
    lost_relaunch = 0
    for prev, nxt in zip(launches, launches[1:]):
        if nxt["restored_step"] is not None or nxt["relaunch"]:
            lost_relaunch += max(0, prev["last_step"] - (nxt["restored_step"] or 0))
    return {
        "run_dir": str(root),
        "complete": summary is not None,
        "fingerprint": summary.get("fingerprint") if summary else None,
        "ranks": summary["ranks"] if summary else last["ranks"],
        "launches": [{k: v for k, v in la.items() if k not in ("t0", "t1")} |
                     {"start_s": la["t0"] - t0} for la in launches],
        "steps": total_steps,
        "this_launch": {"steps": this_steps, "wall_s": this_wall,
                        "steps_per_s": this_steps / this_wall if this_wall else None,
                        "start_step": last["restored_step"] or 0},
        "overall": {"steps": total_steps, "elapsed_s": elapsed,
                    "steps_per_s": total_steps / elapsed if elapsed else None},
        "segments": {"count": len(seg_ev), "lengths": dict(sorted(lengths.items()))},
        "rollbacks": [{"step": r["step"], "detected_on": r.get("detected_on"),
                       "S": r.get("reexecuted_ranks"), "rounds": r.get("rounds"),
                       "seconds": r.get("seconds"),
                       "reexecuted_rank_steps": r.get("reexecuted_rank_steps")} for r in rollbacks],
        "checkpoints": ckpts,
        "failures": t.injected_kills or sum(len(r.get("failed_ranks", ())) for r in recoveries),
        "recoveries": [{"t": r["t"] - t0, "policy": r.get("policy"),
                        "failed_ranks": r.get("failed_ranks"), "step": r.get("detected_at_step"),
                        "resumed_step": r.get("resumed_step"), "seconds": r.get("seconds"),
                        "phases": r.get("phases"), "replaced": r.get("replaced")}
                       for r in recoveries],
        "interval_decisions": [{"t": d["t"], "model": d.get("model"), "at_step": d.get("at_step"),
                                "steps": d.get("steps"), "next_step": d.get("next_step"),
                                "revises": d.get("revises")} for d in decisions],
        "faults": {"injected": t.injected_faults, "flips": t.injected_flips,
                   "kills": t.injected_kills, "stalls": t.injected_stalls,
                   "detected": len(detections), "escaped": t.escaped_faults},
        "lost": {"recovery_steps": lost_recovery, "relaunch_steps": lost_relaunch,
                 "reexecuted_rank_steps": sum(int(r.get("reexecuted_rank_steps") or 0)
                                              for r in rollbacks)},
        "timeline": _lanes(sections, t0),
    }


def _s(x: float | None) -> str:
    return "-" if x is None else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")


def render(rep: dict[str, Any]) -> str:
    """The report as text, one section per topic. Pure."""
    out = [f"run {rep['run_dir']}: {rep['ranks']} ranks, "
           + ("completed" if rep["complete"] else "no summary yet (still running, or it died)")]
    if rep["fingerprint"]:
        out[-1] += f", fingerprint {rep['fingerprint']}"
    this, overall = rep["this_launch"], rep["overall"]
    rate = this["steps_per_s"]
    out.append(f"steps: {rep['steps']}; this launch {this['steps']} steps"
               + (f" from step {this['start_step']}" if this["start_step"] else "")
               + f" in {_s(this['wall_s'])}" + (f" ({rate:.1f} steps/s)" if rate else ""))
    if len(rep["launches"]) > 1:
        orate = overall["steps_per_s"]
        out.append(f"overall: {overall['steps']} steps over {_s(overall['elapsed_s'])} from the "
                   f"first start" + (f" ({orate:.1f} steps/s)" if orate else ""))
    out.append(f"launches: {len(rep['launches'])}")
    for la in rep["launches"]:
        res = f", resumed from step {la['restored_step']}" if la["restored_step"] is not None else ""
        out.append(f"  {la['index']}: at +{la['start_s']:.2f} s, {la['processes']} processes"
                   f"{res}, reached step {la['last_step']}: {la['outcome']}")
    lengths = ", ".join(f"{k} x{n}" for k, n in rep["segments"]["lengths"].items())
    out.append(f"segments (rank 0): {rep['segments']['count']}; lengths {lengths or '-'}")
    out.append(f"rollbacks: {len(rep['rollbacks'])}")
    for r in rep["rollbacks"]:
        out.append(f"  segment at step {r['step']}: S={r['S']} in {r['rounds']} round(s), "
                   f"{r['reexecuted_rank_steps']} rank-steps, {_s(r['seconds'])}")
    out.append(f"checkpoints committed: {len(rep['checkpoints'])}")
    for c in rep["checkpoints"]:
        out.append(f"  step {c['step']}: exposed {_s(c['exposed_s'])}, write {_s(c['write_s'])}")
    out.append(f"failures: {rep['failures']}; in-job recoveries: {len(rep['recoveries'])}")
    for r in rep["recoveries"]:
        ph = ", ".join(f"{k} {_s(v)}" for k, v in (r["phases"] or {}).items())
        out.append(f"  {r['policy']}: ranks {r['failed_ranks']} at step {r['step']}, resumed at "
                   f"{r['resumed_step']} in {_s(r['seconds'])} ({ph})")
    if rep["interval_decisions"]:
        out.append(f"interval decisions: {len(rep['interval_decisions'])}")
        for d in rep["interval_decisions"]:
            rev = f", revises {d['revises']}" if d.get("revises") is not None else ""
            out.append(f"  at step {d['at_step']} ({d['model']}): every {d['steps']} steps, "
                       f"next at {d['next_step']}{rev}")
    f = rep["faults"]
    out.append(f"faults: {f['injected']} injected ({f['flips']} flips, {f['kills']} kills, "
               f"{f['stalls']} stalls), {f['detected']} detections, {f['escaped']} escaped")
    lost = rep["lost"]
    out.append(f"lost work: {lost['recovery_steps']} steps redone after in-job recoveries, "
               f"{lost['relaunch_steps']} after relaunches, {lost['reexecuted_rank_steps']} "
               "rank-steps re-executed by rollbacks")
    return "\n".join(out)
