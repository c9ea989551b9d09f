"""A receive completed by mpi4py's own Request class is logged late; the log
of that rank is then never replayed from, so a rollback stays exact.

The app (apps/late_receive.py): each worker clears its receive buffer
between mpi4py's ``Waitall`` and ulfmpy's next call, so what ulfmpy logs is
the cleared buffer. Replaying rank 1 alone from that log would give it
zeros instead of rank 0's forcing, in an array it never sends: without the
guard the run ends with exit 0 and a wrong fingerprint (checked). With it,
every rank re-executes live.
"""

from __future__ import annotations

import pytest
from conftest import TEST_APPS, reference_fingerprint, require_ulfm, run_ulfmpy

pytestmark = [pytest.mark.scenario]

APP = [str(TEST_APPS / "late_receive.py"), "--steps", "200"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_fingerprint(APP, tmp_path_factory)


@pytest.mark.parametrize("args", [
    [],  # detection at the segment's end, the default
    ["--detect-every", "1"],  # per step: no lone catch-up from the untrusted log either
], ids=["segment-end", "per-step"])
def test_a_late_logged_receive_is_not_replayed_from(tmp_path, reference, args):
    require_ulfm()
    res = run_ulfmpy(["-n", "4", "--detect", "finite,bounds", *args,
                      "--inject", "bitflip:rank=1,step=57,array=acc,index=5,bit=62", *APP], tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert s["fingerprint"] == reference, s
    assert s["escaped_faults"] == 0 and len(s["rollbacks"]) == 1, s
    (rb,) = [e for e in res.events("rollback") if e["rank"] == 0]
    assert rb["reexecuted_ranks"] == [0, 1, 2, 3], rb
    late = res.events("late_receive")
    # once on each worker; rank 0 completes through ulfmpy's class
    assert sorted(e["rank"] for e in late) == [1, 2, 3], late
    assert "mpi4py's own Request class" in late[0]["hint"]
