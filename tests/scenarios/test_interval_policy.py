"""The online interval policy in the runtime (--mtbf): checkpoints where it said."""

import math

import pytest

from conftest import APPS
from ulfmpy import interval

pytestmark = pytest.mark.scenario
K = 5


def test_checkpoints_follow_the_logged_decisions(ulfmpy_run):
    r = ulfmpy_run(["-n", "4", "--mtbf", "20s", "--segment-steps", str(K), str(APPS / "stencil.py"),
                    "--nx", "128", "--ny", "96", "--steps", "160", "--quiet"], timeout=120)
    assert r.returncode == 0, str(r)
    decisions = [e for e in r.events("interval_decision") if e["rank"] == 0]
    ckpts = [c["step"] for c in r.summary["checkpoints"]]
    assert len(decisions) >= 2 and len(ckpts) >= 2
    # The first checkpoint comes at once, to measure the exposed save time δ.
    assert ckpts[0] == K
    for d in decisions:
        assert d["model"] == "exact" and d["mtbf"] == 20.0
        # τ is the exact renewal optimum for the δ the runtime measured
        assert math.isclose(d["tau"], interval.exact(mtbf=20.0, save=d["save"]), rel_tol=1e-9)
        assert d["steps"] >= 1 and d["next_step"] == d["at_step"] + d["steps"]
        due = math.ceil(d["next_step"] / K) * K  # checkpoints land on segment boundaries
        if due < 160:
            assert due in ckpts, (d, ckpts)
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
