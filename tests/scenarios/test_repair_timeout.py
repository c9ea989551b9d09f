"""A repair that never finishes ends the job for a relaunch instead of hanging.

An MPI call of the in-job repair was once seen not to return (a respawn on a
heavily loaded machine, campaign schedule 0190). ``--repair-timeout`` (30 s
by default) bounds the repair: every process leaves with exit 75 and
``--max-restarts`` resumes from the newest committed checkpoint. The tests
stall one process inside the repair (``kill:...,phase=recovery,stall=D``:
it stops responding, as a process stuck in I/O would), so the others wait
for it in the shrink.
"""

from __future__ import annotations

import time

import pytest

from conftest import APPS, reference_fingerprint, require_ulfm, run_ulfmpy

STENCIL = [str(APPS / "stencil.py"), "--nx", "240", "--ny", "200", "--steps", "120"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_fingerprint(STENCIL, tmp_path_factory)


@pytest.mark.parametrize("limit, stall", [(["--repair-timeout", "3s"], "20s"), ([], "60s")],
                         ids=["3s", "default"])
def test_a_stalled_repair_ends_in_a_relaunch_that_resumes(tmp_path, reference, limit, stall):
    require_ulfm()
    t0 = time.monotonic()
    res = run_ulfmpy(["-n", "4", "--spares", "1", "--ckpt-every", "20", "--max-restarts", "1",
                      *limit, "--inject", "kill:rank=2,step=50",
                      "--inject", f"kill:rank=1,step=50,phase=recovery,stall={stall}", *STENCIL],
                     tmp_path / "run", timeout=150)
    took = time.monotonic() - t0
    assert res.returncode == 0, res
    s = res.summary
    assert s["fingerprint"] == reference and s["launches"] == 2, s
    assert s["restored_from"]["step"] in (20, 40)  # the step-40 write may be in flight
    stuck = res.events("repair_stuck")
    assert stuck and {e["seconds"] for e in stuck} == {3.0 if limit else 30.0}
    assert res.stderr.count("an in-job repair did not finish within") == 1, res
    assert "relaunch 1/1" in res.stderr
    assert took < float(stall[:-1])  # it did not wait for the stalled process


def test_a_short_stall_is_waited_for_and_the_repair_completes(tmp_path, reference):
    require_ulfm()
    res = run_ulfmpy(["-n", "4", "--spares", "1", "--ckpt-every", "20", "--inject",
                      "kill:rank=2,step=50", "--inject",
                      "kill:rank=1,step=50,phase=recovery,stall=2s", *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert s["fingerprint"] == reference and s["launches"] == 1
    assert [r["policy"] for r in s["recoveries"]] == ["spares"]
    assert s["injected_faults"] == 2 and s["failures"] == 1
    assert not res.events("repair_stuck")
