"""The circuit and hydro apps under ulfmpy: the same fingerprint on any rank
count, and exact after flips, kills with each policy and a whole-job kill.

Sizes are small (a launch is a few seconds here); segment lengths are the
defaults, so detection at the segment's end is checked where users run it.
"""

from __future__ import annotations

import pytest

from conftest import APPS, reference_fingerprint, require_ulfm

pytestmark = pytest.mark.scenario

APPS_ARGS = {
    "circuit": [str(APPS / "circuit.py"), "--pieces", "12", "--nodes", "150", "--wires", "600",
                "--steps", "120", "--quiet"],
    "hydro": [str(APPS / "hydro.py"), "--zones", "24", "--steps", "120", "--quiet"],
}
# A flip the app's detectors see: an exponent bit of a value that is never 0.
FLIP = {"circuit": "array=voltage,bit=62", "hydro": "array=ze,bit=62"}
DETECT = {"circuit": "finite,bounds", "hydro": "finite,bounds,invariant"}


@pytest.mark.parametrize("app", list(APPS_ARGS))
def test_the_fingerprint_is_the_same_on_1_2_3_4_6_ranks(app, ulfmpy_run):
    prints = {}
    for n in (1, 2, 3, 4, 6):
        r = ulfmpy_run(["-n", str(n), "--no-resilience", *APPS_ARGS[app]], name=f"plain-{n}")
        assert r.returncode == 0, str(r)
        prints[n] = r.summary["fingerprint"]
    r = ulfmpy_run(["-n", "4", *APPS_ARGS[app]], name="protected")
    assert r.returncode == 0, str(r)
    prints["protected"] = r.summary["fingerprint"]
    assert len(set(prints.values())) == 1, prints


def _exact(r, ref: str, *, ranks: int | None = None) -> dict:
    assert r.returncode == 0, str(r)
    s = r.summary
    assert s["fingerprint"] == ref, str(r)
    if ranks is not None:
        assert s["ranks"] == ranks
    return s


@pytest.mark.parametrize("ranks", [4, 6])
@pytest.mark.parametrize("app", list(APPS_ARGS))
def test_flips_and_kills_end_exact(app, ranks, ulfmpy_run, tmp_path_factory):
    """A flip found at its segment's end, one found at its step, and a dead
    rank under each policy (a spare, a respawned process, a shrink onto one
    rank fewer from a checkpoint): each run ends with the fault-free state."""
    require_ulfm()
    ref = reference_fingerprint(APPS_ARGS[app], tmp_path_factory)
    args, flip, detect = APPS_ARGS[app], FLIP[app], ["--detect", DETECT[app]]
    n = ["-n", str(ranks)]
    for name, every in (("flip-segment-end", []), ("flip-per-step", ["--detect-every", "1"])):
        r = ulfmpy_run([*n, *detect, *every, "--inject", f"bitflip:rank=1,step=30,{flip}", *args],
                       name=name)
        s = _exact(r, ref, ranks=ranks)
        assert len(s["rollbacks"]) == 1, s["rollbacks"]
    for policy, extra, left in (("spares", ["--spares", "1"], ranks),
                                ("respawn", [], ranks),
                                ("shrink", ["--ckpt-every", "30"], ranks - 1)):
        r = ulfmpy_run([*n, *extra, "--recovery", policy, "--inject", "kill:rank=2,step=70", *args],
                       name=f"kill-{policy}")
        s = _exact(r, ref, ranks=left)
        assert [x["policy"] for x in s["recoveries"]] == [policy]


@pytest.mark.parametrize("ranks, then", [(4, 3), (6, 4)])
@pytest.mark.parametrize("app", list(APPS_ARGS))
def test_a_whole_job_killed_resumes_on_another_rank_count(app, ranks, then, ulfmpy_run,
                                                          tmp_path_factory):
    """Every process of the job SIGKILLed at step 50 (one node holds them all):
    the launch exits for a relaunch, which resumes on another rank count and
    ends exact."""
    require_ulfm()
    ref = reference_fingerprint(APPS_ARGS[app], tmp_path_factory)
    r = ulfmpy_run(["-n", str(ranks), "--virtual-nodes", "1", "--ckpt-every", "20",
                    "--max-restarts", "1", "--relaunch-n", str(then),
                    "--inject", "kill:node=node0,step=50", *APPS_ARGS[app]], name="job-kill")
    s = _exact(r, ref, ranks=then)
    assert "every rank of the job died" in r.stderr
    assert s["launches"] == 2 and s["restored_from"]["step"] in (20, 40)
    assert s["restored_from"]["ckpt_ranks"] == ranks
