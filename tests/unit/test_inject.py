"""Fault specs and bit flips."""

import numpy as np
import pytest

from ulfmpy.errors import ConfigError
from ulfmpy.inject import BitFlip, FaultPlan, Kill, flip_bit, parse_fault
from ulfmpy.state import Block


def test_parse_bitflip_and_kill():
    f = parse_fault("bitflip:rank=1,step=57,array=u,index=3,bit=62")
    assert f == BitFlip(spec=f.spec, rank=1, step=57, array="u", index=3, bit=62)
    k = parse_fault("kill:rank=2,step=40,phase=checkpoint")
    assert isinstance(k, Kill) and k.phase == "checkpoint" and k.rank == 2
    assert parse_fault("kill:mtbf=20s,seed=3").mtbf == 20.0
    assert parse_fault("bitflip:rate=0.01,seed=4").rate == 0.01


@pytest.mark.parametrize("spec,msg", [
    ("flood:rank=1", "unknown fault kind 'flood'"),
    ("bitflip:rank=1", "give rank= and step=, or rate="),
    ("bitflip:rank=x,step=1", "rank='x' is not an integer"),
    ("bitflip:rank=1,step=2,colour=red", "unknown field"),
    ("bitflip:rank", "expected key=value"),
    ("kill:rank=1,step=2,phase=lunch", "phase must be one of"),
    ("bitflip:rate=2", "rate must be in"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_fault(spec)


def test_flip_bit_on_a_view():
    a = np.full((4, 5), 0.5)
    view = a[1:-1, 1:-1]
    before, after = flip_bit(view, 4, 63)
    assert (before, after) == (0.5, -0.5) and a[2, 2] == -0.5
    flip_bit(view, 4, 63)
    assert a[2, 2] == 0.5
    assert flip_bit(view, 0, 0)[1] == np.nextafter(0.5, 1.0)
    with pytest.raises(ConfigError, match="out of range"):
        flip_bit(view, 0, 64)


def test_plan_fires_once_and_persistent_again():
    u = np.zeros((3, 3))
    state = {"u": Block(u, (3, 6), (0, 0))}
    plan = FaultPlan(("bitflip:rank=1,step=5,index=4,bit=63",
                      "bitflip:rank=1,step=6,index=0,bit=62,persistent=1"), rank=1)
    assert plan.flips_after_step(4, state, replay=False) == []
    rec = plan.flips_after_step(5, state, replay=False)
    assert rec[0]["index"] == 4 and u[1, 1] == -0.0 and np.signbit(u[1, 1])
    assert plan.flips_after_step(5, state, replay=True) == []
    assert plan.flips_after_step(5, state, replay=False) == []  # transient: once
    assert len(plan.flips_after_step(6, state, replay=False)) == 1
    assert len(plan.flips_after_step(6, state, replay=True)) == 1
    assert len(plan.flips_after_step(6, state, replay=True)) == 1
    other = FaultPlan(plan.specs, rank=0)
    assert other.flips_after_step(5, state, replay=False) == []


def test_random_fields_are_reproducible():
    def run():
        u = np.zeros(100)
        plan = FaultPlan(("bitflip:rate=0.5,seed=9",), rank=2)
        return [r["index"] for s in range(20) for r in plan.flips_after_step(s, {"u": u}, replay=False)]

    first = run()
    assert first and first == run()


def test_bad_array_name():
    plan = FaultPlan(("bitflip:rank=0,step=0,array=v",), rank=0)
    with pytest.raises(ConfigError, match="no state array 'v'"):
        plan.flips_after_step(0, {"u": np.zeros(3)}, replay=False)


def test_repeat_strikes_the_first_n_executions():
    u = np.zeros(4)
    plan = FaultPlan(("bitflip:rank=0,step=2,index=1,bit=3,repeat=3",), rank=0)
    hits = [len(plan.flips_after_step(2, {"u": u}, replay=i > 0)) for i in range(5)]
    assert hits == [1, 1, 1, 0, 0]


def test_kill_due_fires_once_across_plans(tmp_path):
    specs = ("kill:rank=2,step=4,phase=agreement", "kill:rank=2,step=6,phase=checkpoint")
    plan = FaultPlan(specs, rank=2, marker_dir=str(tmp_path))
    f = plan.kill_due(4, "agreement")
    assert f is not None and plan.kill_due(4, "compute") is None
    assert FaultPlan(specs, rank=1).kill_due(4, "agreement") is None
    assert plan.kill_due(5, "checkpoint") is None and plan.kill_due(8, "checkpoint") is not None
    plan.mark_fired(f, step=4)
    again = FaultPlan(specs, rank=2, marker_dir=str(tmp_path))  # e.g. after a relaunch
    assert again.kill_due(4, "agreement") is None


def test_a_kill_stream_is_a_seeded_poisson_process():
    from ulfmpy.inject import FaultPlan

    f = parse_fault("kill:mtbf=2s,stream=1,seed=7")
    assert f.stream and f.mtbf == 2.0
    kills = [FaultPlan.stream_kill(f, 4, k) for k in range(400)]
    times = [t for _, t in kills]
    assert times == sorted(times) and all(0 <= v < 4 for v, _ in kills)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert 1.7 < sum(gaps) / len(gaps) < 2.3          # mean gap: the MTBF
    assert FaultPlan.stream_kill(f, 4, 5) == kills[5]  # a function of the seed and k
    other = parse_fault("kill:mtbf=2s,stream=1,seed=8")
    assert FaultPlan.stream_kill(other, 4, 0) != kills[0]
    assert FaultPlan(("kill:mtbf=2s,stream=1",), rank=0).mtbf_kill(4) is None  # not the single one
    with pytest.raises(ConfigError, match="stream=1 needs mtbf"):
        parse_fault("kill:rank=1,step=3,stream=1")
