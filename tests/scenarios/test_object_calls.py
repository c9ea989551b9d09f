"""Lowercase ``allreduce`` and ``sendrecv`` each step, and a rank killed: every
in-job policy recovers exactly.

The call that met the failure returned None (the calls after it in the same
step already returned this rank's own contribution), so the program's own
arithmetic on it failed (a TypeError, exit 76) or hung the job. Both now
return the placeholder; the step is thrown away and re-run after the repair.
"""

from __future__ import annotations

import pytest
from conftest import TEST_APPS, reference_fingerprint, require_ulfm, run_ulfmpy

pytestmark = [pytest.mark.scenario]

APP = [str(TEST_APPS / "object_calls.py"), "--steps", "300"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_fingerprint(APP, tmp_path_factory)


@pytest.mark.parametrize("policy", [["--spares", "1"], ["--recovery", "respawn"],
                                    ["--recovery", "shrink", "--ckpt-every", "50"], []],
                         ids=["spares", "respawn", "shrink", "default"])
def test_object_calls_recover_from_a_kill_with_every_policy(tmp_path, reference, policy):
    require_ulfm()
    res = run_ulfmpy(["-n", "4", *policy, "--inject", "kill:rank=2,step=120", *APP],
                     tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert s["fingerprint"] == reference and len(s["recoveries"]) == 1, s
