"""The live availability experiment's pure parts (scripts/availability_live.py):
the run's own pace and where a run's lost time went."""

from __future__ import annotations

import pytest


def seg(rank, t, step, end):
    return {"event": "segment", "rank": rank, "t": t, "step": step, "end": end}


def test_the_own_pace_leaves_out_saves_and_rollbacks_and_weighs_by_steps(load_script):
    m = load_script("availability_live")
    segs = [seg(0, 1.0, 0, 10), seg(0, 1.1, 10, 20),    # 10 ms/step, 10 steps
            seg(0, 2.1, 20, 120),                       # 10 ms/step, 100 steps
            seg(0, 8.1, 120, 420),                      # a save at 120: left out
            seg(0, 9.0, 150, 160),                      # a rollback (150 != 420): left out
            seg(1, 1.0, 0, 10), seg(1, 1.05, 10, 20)]   # 5 ms/step, 10 steps
    assert m.clean_step_time(segs, {120}) == pytest.approx(0.01)
    # with the save counted, its 20 ms/step over 300 steps takes the median
    assert m.clean_step_time(segs) == pytest.approx(0.02)
    assert m.clean_step_time(segs[:1]) is None


def test_the_lost_time_is_split_and_adds_up(load_script):
    m = load_script("availability_live")
    events = [
        {"event": "inject", "kind": "kill", "t": 10.0},
        {"event": "recovery", "t": 10.2, "lost_steps": 30},
        {"event": "recovery", "t": 10.3, "lost_steps": 30},   # the last resumed counts
        {"event": "inject", "kind": "kill", "t": 20.0},
        {"event": "inject", "kind": "kill", "t": 20.1},        # during its repair: one repair
        {"event": "recovery", "t": 20.5, "lost_steps": 50},
    ]
    summary = {"wall_s": 12.0, "steps": 1000, "checkpoints": [{"exposed_s": 0.01}] * 20}
    out = m.loss_breakdown(events, summary, 0.01, save_s=0.02)
    assert out["kill_to_resumed_s"] == pytest.approx([0.3, 0.4])
    assert out["reexecuted_steps"] == [30, 50]
    assert out["saves_s"] == pytest.approx(0.4) and out["saves_exposed_s"] == pytest.approx(0.2)
    assert out["loss_s"] == pytest.approx(2.0)
    parts = out["saves_s"] + sum(out["kill_to_resumed_s"]) + out["reexecuted_s"] + out["other_s"]
    assert parts == pytest.approx(out["loss_s"])
    assert out["other_s"] == pytest.approx(2.0 - 0.4 - 0.7 - 0.8)
