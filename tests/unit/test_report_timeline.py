"""``ulfmpy report``'s timeline from event logs written by hand (no MPI)."""

from __future__ import annotations

import json

from ulfmpy.report import build


def _log(run_dir, rank, records):
    path = run_dir / "events" / f"rank-{rank:05d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _start(rank, t, launch):
    return {"event": "start", "t": t, "logical": rank, "size": 3, "launch": launch}


def test_every_rank_whose_repair_the_first_watchdog_cut_short_shows_it_unfinished(tmp_path):
    """Rank 2's watchdog ends the job (exit 75) before rank 0's fires: rank 0
    logged the failure and nothing after, yet its repair is as unfinished as
    rank 2's. Rank 1 recovered from an earlier failure and did not fail in
    the stuck one: its finished repair is not drawn as unfinished."""
    _log(tmp_path, 0, [_start(0, 0.0, "a"),
                       {"event": "segment", "t": 0.1, "step": 0, "end": 10},
                       {"event": "failure", "t": 1.0, "step": 8}])
    _log(tmp_path, 1, [_start(1, 0.0, "a"),
                       {"event": "failure", "t": 0.5, "step": 4},
                       {"event": "recovery", "t": 0.7, "seconds": 0.2, "policy": "respawn",
                        "phases": {"shrink": 0.1, "respawn": 0.1}},
                       {"event": "segment", "t": 0.8, "step": 4, "end": 10}])
    _log(tmp_path, 2, [_start(2, 0.0, "a"),
                       {"event": "failure", "t": 1.01, "step": 8},
                       {"event": "repair_stuck", "t": 4.01, "seconds": 3.0, "phase": "agree"}])
    lanes = build(tmp_path)["timeline"]["lanes"]
    unfinished = {lane: [(it["t0"], it["t1"]) for it in items
                         if it.get("phase") == "unfinished repair"]
                  for lane, items in lanes.items()}
    assert unfinished["2"] == [(1.01, 4.01)]
    assert unfinished["0"] == [(1.0, 4.01)], "rank 0's repair ended with the job, unfinished"
    assert unfinished["1"] == [], "rank 1's repair finished; it did not fail in the stuck one"


def test_a_failure_in_a_launch_that_did_not_end_stuck_draws_no_unfinished_repair(tmp_path):
    _log(tmp_path, 0, [_start(0, 0.0, "a"), {"event": "failure", "t": 1.0, "step": 8}])
    _log(tmp_path, 1, [_start(1, 0.0, "a"), {"event": "failure", "t": 1.0, "step": 8}])
    lanes = build(tmp_path)["timeline"]["lanes"]
    assert not [it for items in lanes.values() for it in items
                if it.get("phase") == "unfinished repair"]
