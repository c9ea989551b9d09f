"""scripts/rollback_depth.py: how far back each recovery rolled."""

from __future__ import annotations


def ev(event, **fields):
    return {"event": event, "rank": fields.pop("rank", 0), **fields}


def test_a_kill_between_a_save_and_its_commit_rolls_back_past_the_save(load_script):
    m = load_script("rollback_depth")
    events = [
        ev("checkpoint_saved", step=100), ev("checkpoint_committed", step=100),
        ev("checkpoint_saved", step=200),
        ev("checkpoint_saved", step=250, rank=1),  # another process's: not counted
        # killed at 240, 200 staged but not committed: resumed at 100
        ev("recovery", reached_step=240, resumed_step=100, lost_steps=140),
        ev("checkpoint_saved", step=300), ev("checkpoint_committed", step=300),
        # killed at 330: resumed at the newest save
        ev("recovery", reached_step=330, resumed_step=300, lost_steps=30),
        ev("recovery", rank=1, reached_step=330, resumed_step=300, lost_steps=30),
    ]
    r = m.rollback_depth(events)
    assert r["recoveries"] == 2
    assert r["lost_steps"] == 170
    assert r["steps_since_newest_save"] == 40 + 30
    assert r["steps_since_newest_commit"] == 140 + 30
    assert r["resumed_at_newest_save"] == 1
    assert r["lost_over_since_save"] == 170 / 70
    assert [row["at_newest_save"] for row in r["rows"]] == [False, True]


def test_no_recovery_no_ratio(load_script):
    m = load_script("rollback_depth")
    r = m.rollback_depth([ev("checkpoint_saved", step=10)])
    assert r["recoveries"] == 0 and r["lost_over_since_save"] is None
