"""Detection latency in the runtime (DESIGN §4): a periodic diagnostic finds
a flip the per-segment detectors missed, and every rank goes back past the
checkpoints that may hold it.

The app (``tests/scenarios/apps/latent.py``) shifts integer rows around a ring of ranks and
carries their sums; a flipped bit of ``u`` stays an integer in range, so
only the ``rowsums`` diagnostic sees it. The flip strikes at step 25; the
diagnostic runs every 20 steps (latency 20 unless said), so it fires at 40,
when checkpoint 30 already holds the error.
"""

from __future__ import annotations

import math

import pytest

from conftest import TEST_APPS, reference_fingerprint

pytestmark = pytest.mark.scenario

APP = [str(TEST_APPS / "latent.py"), "--steps", "80"]
FLIP = ["--inject", "bitflip:rank=1,step=25,array=u,bit=20"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return reference_fingerprint(APP, tmp_path_factory)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_late_diagnosis_rolls_back_past_the_contaminated_checkpoints(ulfmpy_run, ref, mode):
    r = ulfmpy_run(["-n", "4", "--ckpt-every", "10", "--ckpt-mode", mode,
                    "--diagnose", "rowsums:every=20", *FLIP, *APP], name=f"late-{mode}")
    assert r.returncode == 0, str(r)
    s = r.summary
    assert s["fingerprint"] == ref
    [lr] = s["latent_rollbacks"]
    assert lr["detected_at"] == 40 and lr["latency"] == 20 and lr["detector"] == "rowsums"
    assert lr["step"] == 20 and lr["step"] < 25       # a checkpoint before the flip
    assert 30 in lr["skipped"] or mode == "async"    # 30 committed (sync), and removed
    assert s["escaped_faults"] == 0 and s["injected_faults"] == 1  # the escape was cured
    assert [e["steps"] for e in r.events("escape_cured")] == [[25]]
    # The checkpoint that held the error was removed (sync: committed) or
    # abandoned in flight (async), and saved again clean when the
    # re-execution reached it (not skipped as "already committed").
    saves_30 = [e for e in r.events("checkpoint_saved") if e["rank"] == 0 and e["step"] == 30]
    assert len(saves_30) == 2
    assert not [e for e in r.events("checkpoint_skipped") if e["step"] == 30]


def test_without_the_latency_rule_it_restores_a_contaminated_checkpoint(ulfmpy_run):
    """The counterfactual: with ``latency=0`` the newest committed checkpoint
    (30, taken after the flip at 25) comes back, the diagnostic fires again,
    and the run ends with a clear error (exit 76), never a wrong result."""
    r = ulfmpy_run(["-n", "4", "--ckpt-every", "10", "--ckpt-mode", "sync",
                    "--diagnose", "rowsums:every=20,latency=0", *FLIP, *APP], name="no-rule")
    assert r.returncode == 76, str(r)
    restored = {e["step"] for e in r.events("latent_rollback")}
    assert restored == {30}
    assert "did not cure it" in r.stderr


def test_at_the_default_segment_length_and_keep_count_raised(ulfmpy_run, ref):
    """Checkpoints every 5 steps with a 20-step latency need ceil(20/5)+1 = 5
    kept, more than --ckpt-keep 2: raised and logged, and the run ends exact
    at the default segment length and checkpoint mode."""
    r = ulfmpy_run(["-n", "4", "--ckpt-every", "5", "--diagnose", "rowsums:every=20", *FLIP,
                    *APP], name="keep")
    assert r.returncode == 0, str(r)
    assert r.summary["fingerprint"] == ref
    raised = [e for e in r.events("ckpt_keep_raised") if e["rank"] == 0]
    assert raised and raised[0]["old"] == 2 and raised[0]["new"] == 5
    [lr] = r.summary["latent_rollbacks"]
    assert lr["step"] == 20


def test_with_mtbf_the_interval_is_the_latency_aware_optimum(ulfmpy_run, ref):
    from ulfmpy import interval

    r = ulfmpy_run(["-n", "4", "--mtbf", "30s", "--diagnose", "rowsums:every=20",
                    str(TEST_APPS / "latent.py"), "--steps", "400"], name="mtbf")
    assert r.returncode == 0, str(r)
    decisions = [e for e in r.events("interval_decision") if e["rank"] == 0]
    assert decisions
    for d in decisions:
        assert d["latency"] == pytest.approx(20 * d["step_time"])
        want = interval.saxena_latency(mtbf=30.0, save=d["save"], recovery=d["recovery"],
                                       latency=d["latency"])
        assert d["period"] == pytest.approx(want, rel=1e-9)
        assert d["steps"] >= 1 and math.isfinite(d["tau"])
