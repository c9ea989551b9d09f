"""The online interval policy in the runtime (--mtbf): checkpoints where it said."""

import math

import pytest

from conftest import APPS
from ulfmpy import interval

pytestmark = pytest.mark.scenario
K = 5


@pytest.mark.parametrize("pinned", [["--segment-steps", str(K)], []], ids=["k5", "default"])
def test_checkpoints_follow_the_logged_decisions(ulfmpy_run, pinned):
    steps = 3000
    r = ulfmpy_run(["-n", "4", "--mtbf", "0.5s", *pinned, str(APPS / "stencil.py"),
                    "--nx", "128", "--ny", "96", "--steps", str(steps), "--quiet"], timeout=120)
    assert r.returncode == 0, str(r)
    decisions = [e for e in r.events("interval_decision") if e["rank"] == 0]
    ckpts = [c["step"] for c in r.summary["checkpoints"]]
    assert len(decisions) >= 2 and len(ckpts) >= 3, (decisions, ckpts)
    if pinned:
        # The first checkpoint measures the exposed save time δ, as soon as a
        # step time is known: the first segment warms up, the second measures.
        assert ckpts[0] == 2 * K
    revised = {d["revises"] for d in decisions if "revises" in d}
    for d in decisions:
        assert d["model"] == "exact" and d["mtbf"] == 0.5
        # τ is the exact renewal optimum for the δ the runtime measured
        assert math.isclose(d["tau"], interval.exact(mtbf=0.5, save=d["save"]), rel_tol=1e-9)
        # counted from the last save, in steps of the measured step time
        assert d["steps"] >= 1
        assert d["next_step"] == max(d["last_save_step"] + d["steps"], d["at_step"])
        if d["next_step"] < steps and d["next_step"] not in revised:
            assert d["next_step"] in ckpts, (d, ckpts)  # exactly there, not rounded
    assert set(ckpts[1:]) <= {d["next_step"] for d in decisions}
    # each decision used the newest measurement: δ changes, and τ with it
    saves = [d["save"] for d in decisions]
    assert len(set(saves)) > 1
    by_save = sorted(decisions, key=lambda d: d["save"])
    assert [d["tau"] for d in by_save] == sorted(d["tau"] for d in by_save)


def test_model_is_selectable(ulfmpy_run):
    r = ulfmpy_run(["-n", "2", "--mtbf", "1m", "--interval-model", "young", "--segment-steps", str(K),
                    str(APPS / "stencil.py"), "--nx", "64", "--ny", "48", "--steps", "40", "--quiet"],
                   timeout=120)
    assert r.returncode == 0, str(r)
    d = [e for e in r.events("interval_decision") if e["rank"] == 0]
    assert d and all(x["model"] == "young" for x in d)
    assert math.isclose(d[0]["tau"], interval.young(mtbf=60.0, save=d[0]["save"]), rel_tol=1e-9)
