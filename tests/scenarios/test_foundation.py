"""Foundation scenarios: the launcher, the stencil, the run directory, ULFM itself."""

import json
import re

import pytest

from conftest import APPS, TEST_APPS, require_ulfm

pytestmark = pytest.mark.scenario
STENCIL = str(APPS / "stencil.py")
GRID = ["--nx", "37", "--ny", "29", "--steps", "25", "--quiet"]


def fingerprint_of(result):
    assert result.returncode == 0, str(result)
    fp = result.summary["fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{32}", fp)
    # the app prints the same fingerprint it recorded
    printed = json.loads(result.stdout.strip().splitlines()[-1])["fingerprint"]
    assert printed == fp
    return fp


def test_fingerprint_same_on_1_2_3_4_6_ranks(ulfmpy_run):
    fps = {n: fingerprint_of(ulfmpy_run(["-n", str(n), STENCIL, *GRID], name=f"n{n}"))
           for n in (1, 2, 3, 4, 6)}
    assert len(set(fps.values())) == 1, fps


def test_protected_equals_baseline_and_run_dir_layout(ulfmpy_run):
    base = ulfmpy_run(["-n", "4", "--no-resilience", STENCIL, *GRID], name="base")
    prot = ulfmpy_run(["-n", "4", "--segment-steps", "4", STENCIL, *GRID], name="prot")
    assert fingerprint_of(base) == fingerprint_of(prot)
    s = prot.summary
    assert s["ranks"] == 4 and s["steps"] == 25 and s["wall_s"] > 0
    assert s["segments"] == 7 and s["rollbacks"] == [] and s["injected_faults"] == 0
    for rank in range(4):
        assert (prot.run_dir / "events" / f"rank-{rank:04d}.jsonl").exists()
    kinds = {e["event"] for e in prot.events()}
    assert {"start", "segment", "finish", "exit"} <= kinds
    assert len(prot.events("segment")) == 4 * 7


def test_user_exception_on_one_rank_ends_the_job(ulfmpy_run):
    r = ulfmpy_run(["-n", "4", str(TEST_APPS / "raise_on_rank.py"), "2", "7"], timeout=90)
    assert r.returncode == 76, str(r)  # EXIT_UNRECOVERABLE
    assert "user code failed at step 7" in r.stderr
    assert (r.run_dir / "abort-rank-0002.json").exists()


def test_ulfm_smoke(ulfmpy_run):
    """A rank SIGKILLs itself; the others see ProcessFailure, revoke, shrink, agree, exit 0."""
    require_ulfm()
    r = ulfmpy_run(["-n", "4", str(TEST_APPS / "ulfm_smoke.py"), "2"], timeout=90)
    assert r.returncode == 0, str(r)
    files = sorted(r.run_dir.glob("smoke-rank-*.json"))
    assert [f.name for f in files] == ["smoke-rank-0.json", "smoke-rank-1.json", "smoke-rank-3.json"]
    for f in files:
        d = json.loads(f.read_text())
        assert d["seen"]["type"] in ("ProcessFailure", "CommRevoked")
        assert d["new_size"] == 3 and d["agreed"] == 1 and d["allreduce"] == 3
        assert d["failed"] == [2]


def test_ulfm_smoke_fails_without_ulfm(ulfmpy_run):
    """The same program without --with-ft ulfm: the job dies, nobody shrinks."""
    r = ulfmpy_run(["-n", "4", "--no-ft", str(TEST_APPS / "ulfm_smoke.py"), "2"], timeout=90)
    assert r.returncode != 0
    assert not list(r.run_dir.glob("smoke-rank-*.json"))
