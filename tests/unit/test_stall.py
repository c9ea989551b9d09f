"""``kill:...,stall=D``: a process that stops responding for a while (pure parts)."""

import json

import pytest

from ulfmpy.errors import ConfigError
from ulfmpy.inject import parse_fault
from ulfmpy.tally import tally


def test_stall_parses_as_a_duration_and_must_be_positive():
    f = parse_fault("kill:rank=1,step=50,phase=recovery,stall=1m")
    assert f.stall == 60.0 and f.phase == "recovery"
    assert parse_fault("kill:rank=1,step=5").stall == 0.0
    with pytest.raises(ConfigError, match="stall"):
        parse_fault("kill:rank=1,step=5,stall=0s")


def test_a_stall_is_an_injected_fault_but_no_death(tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    recs = [{"event": "start", "launch": "a"},
            {"event": "inject", "kind": "stall", "spec": "kill:rank=1,step=5,stall=2s"},
            {"event": "exit"}]
    (events / "rank-0001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    t = tally(tmp_path, launch="b")
    assert t.injected_stalls == 1 and t.injected_kills == 0 and t.injected_faults == 1
    assert t.earlier_deaths == 0
