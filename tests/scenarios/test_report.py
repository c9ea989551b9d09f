"""``ulfmpy report RUN_DIR``: a run with a flip, a kill with respawn and a relaunch.

The run: 4 ranks, respawn only, checkpoints every 20 steps; a flip on rank 1
caught by per-step detection (local rollback, S = {1}); rank 2 killed at
step 50 (respawned in-job); rank 3 killed at step 90 while rank 1 stalls in
the repair, so the repair times out (exit 75) and ``--max-restarts 1``
relaunches from the checkpoint. The report is read back as text, JSON and a
PNG, and once more while a run is still going.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import APPS, REPO, TEST_APPS, finish_ulfmpy, reference_fingerprint, require_ulfm, \
    run_ulfmpy, start_ulfmpy

pytestmark = [pytest.mark.scenario]

STENCIL = [str(APPS / "stencil.py"), "--nx", "240", "--ny", "200", "--steps", "160"]
FAULTS = ["--inject", "bitflip:rank=1,step=30,bit=62", "--inject", "kill:rank=2,step=50",
          "--inject", "kill:rank=3,step=90",
          "--inject", "kill:rank=1,step=90,phase=recovery,stall=20s"]


def report(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "ulfmpy", "report", *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def eventful(tmp_path_factory):
    require_ulfm()
    ref = reference_fingerprint(STENCIL, tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("report") / "run"
    res = run_ulfmpy(["-n", "4", "--recovery", "respawn", "--ckpt-every", "20",
                      "--max-restarts", "1", "--repair-timeout", "3s", "--detect", "finite,bounds",
                      "--detect-every", "1", *FAULTS, *STENCIL], run_dir, timeout=180)
    assert res.returncode == 0, res
    assert res.summary["fingerprint"] == ref and res.summary["launches"] == 2
    return run_dir


def test_report_text_tells_the_story(eventful):
    res = report(str(eventful))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert ", completed, fingerprint " in text.splitlines()[0]
    assert "launches: 2" in text
    assert "repair unfinished after 3.0 s (exit 75)" in text
    assert "resumed from step" in text and "reached step 160: completed" in text
    assert "segment at step 20: S=[1] in 1 round(s)" in text
    assert "respawn: ranks [2] at step" in text
    assert "faults: 4 injected (1 flips, 2 kills, 1 stalls), 1 detections, 0 escaped" in text
    # this launch's rate counts only the steps it computed
    line = next(x for x in text.splitlines() if x.startswith("steps: 160; this launch"))
    assert " from step " in line and "this launch 160 steps" not in line


def test_report_json_and_timeline(eventful, tmp_path):
    png = tmp_path / "timeline.png"
    res = report(str(eventful), "--json", "--plot", str(png))
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert [la["outcome"] for la in rep["launches"]][1] == "completed"
    assert rep["launches"][1]["restored_step"] in (40, 60, 80)
    assert [r["S"] for r in rep["rollbacks"]] == [[1]]
    assert [(r["policy"], r["failed_ranks"]) for r in rep["recoveries"]] == [("respawn", [2])]
    lanes = rep["timeline"]["lanes"]
    assert sorted(lanes, key=int) == ["0", "1", "2", "3"]
    kinds = {lane: {it["kind"] for it in items} for lane, items in lanes.items()}
    assert "join" in kinds["2"] and all("join" not in kinds[x] for x in "013")
    assert "reexecution" in kinds["1"] and all("reexecution" not in kinds[x] for x in "023")
    assert "flip" in kinds["1"] and "kill" in kinds["2"] and "stall" in kinds["1"]
    assert all("segment" in k and "checkpoint" in k for k in kinds.values())
    phases = {it["phase"] for it in lanes["0"] if it["kind"] == "phase"}
    assert {"shrink", "respawn", "restore", "unfinished repair"} <= phases
    assert rep["lost"]["relaunch_steps"] > 0 and rep["lost"]["recovery_steps"] > 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_report_on_a_run_still_going(tmp_path):
    require_ulfm()
    run_dir = tmp_path / "run"
    app = [str(TEST_APPS / "slow_steps.py"), "--steps", "40", "--slow-from", "10", "--slow-s", "0.5"]
    proc = start_ulfmpy(["-n", "2", *app], run_dir)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "slow-10").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (run_dir / "slow-10").exists(), "the run never reached its slow steps"
        res = report(str(run_dir))
        assert res.returncode == 0, res.stderr
        assert "no summary yet (still running, or it died)" in res.stdout
        assert "launches: 1" in res.stdout and "running or died" in res.stdout
    finally:
        proc.send_signal(signal.SIGUSR1)  # halt it: a checkpoint, then exit 79
        done = finish_ulfmpy(proc, run_dir, timeout=120)
    assert done.returncode == 79, done
    res = report(str(run_dir))
    assert "halted at step" in res.stdout and "(exit 79)" in res.stdout, res.stdout


def test_report_refuses_what_is_not_a_run_directory(tmp_path):
    res = report(str(tmp_path))
    assert res.returncode == 2
    assert "not an ulfmpy run directory" in res.stderr and res.stderr.count("\n") == 1
