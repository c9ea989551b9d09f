"""ulfmpy under a real Slurm (docs/architecture.md, "Halting"): halt at the wall time or on a signal,
requeue, resume; in-job recovery inside the allocation; seeded arrays.

Each test submits the project's batch templates with ``sbatch`` as a user
would, waits for the job with a timeout and checks its run directory and
Slurm's record (state, exit code, restarts).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from slurm_cluster import Cluster, cluster, slurm  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
STENCIL = str(REPO / "apps" / "stencil.py")
SLOW = REPO / "tests" / "scenarios" / "apps" / "slow_steps.py"
GRID = ["--nx", "240", "--ny", "200"]


def reference(tmp_path: Path, steps: int) -> str:
    """The fault-free fingerprint, from a plain run outside Slurm."""
    run_dir = tmp_path / f"ref-{steps}"
    out = subprocess.run([sys.executable, "-m", "ulfmpy", "run", "-n", "4", "--run-dir",
                          str(run_dir), "--no-resilience", STENCIL, *GRID, "--steps", str(steps),
                          "--quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads((run_dir / "summary.json").read_text())["fingerprint"]


def run_app_reference(tmp_path: Path, app: list[str]) -> str:
    """The fingerprint of an uninterrupted protected run of ``app`` outside Slurm."""
    run_dir = tmp_path / "ref-app"
    out = subprocess.run([sys.executable, "-m", "ulfmpy", "run", "-n", "4", "--run-dir",
                          str(run_dir), *app], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads((run_dir / "summary.json").read_text())["fingerprint"]


def events(run_dir: Path, kind: str) -> list[dict]:
    from ulfmpy.events import read_events

    return list(read_events(run_dir, kind))


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def output(path: Path) -> str:
    return path.read_text() if path.exists() else "(no output)"


def wait_for_loop(run_dir: Path, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if run_dir.exists() and events(run_dir, "segments"):
            return
        time.sleep(0.2)
    pytest.fail(f"the job's loop did not start within {timeout} s ({run_dir})")


@pytest.mark.parametrize("how", [["--full"], ["--batch"]], ids=["full", "batch"])
def test_scancel_signal_halts_a_running_job_cleanly(cluster, tmp_path, how):
    steps = 200000
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = cluster.submit(["-n", "4", "-o", str(out)], "ulfmpy.sbatch",
                         ["--max-requeues", "0", STENCIL, *GRID, "--steps", str(steps)],
                         cwd=tmp_path, env=cluster.env(ULFMPY_RUN_DIR=str(run_dir)))
    wait_for_loop(run_dir)
    time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", *how, job], check=True, timeout=30)
    [rec] = cluster.wait(job, timeout=120, release=False)
    text = output(out)
    assert rec["ExitCode"] == "79:0", (rec, text)
    halts = events(run_dir, "halt")
    assert len(halts) == 4 and len({h["step"] for h in halts}) == 1, text
    step = halts[0]["step"]
    assert halts[0]["committed_step"] == step < steps
    assert (run_dir / "ckpt" / f"step-{step:08d}.h5").exists()
    assert not events(run_dir, "halt_escalated"), text  # one request, not two
    assert "--max-requeues 0 reached" in text


def test_a_killed_rank_is_replaced_by_a_spare_inside_the_allocation(cluster, tmp_path):
    steps = 3000
    ref = reference(tmp_path, steps)
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = cluster.submit(["-n", "5", "-o", str(out)], "ulfmpy-spares.sbatch",
                         [STENCIL, *GRID, "--steps", str(steps)], cwd=tmp_path,
                         env=cluster.env(ULFMPY_RUN_DIR=str(run_dir), ULFMPY_SPARES_PER_NODE="1",
                                         ULFMPY_INJECT="kill:rank=2,step=1200"))
    [rec] = cluster.wait(job, timeout=300)
    text = output(out)
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "0", (rec, text)
    s = summary(run_dir)
    assert s["ranks"] == 4 and s["fingerprint"] == ref, text
    assert [r["policy"] for r in s["recoveries"]] == ["spares"], s["recoveries"]


def test_no_in_job_recovery_exits_75_requeues_and_resumes(cluster, tmp_path):
    steps = 3000
    ref = reference(tmp_path, steps)
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    job = cluster.submit(["-n", "4", "-o", str(out)], "ulfmpy.sbatch",
                         ["--recovery", "", "--ckpt-every", "500", STENCIL, *GRID,
                          "--steps", str(steps)], cwd=tmp_path,
                         env=cluster.env(ULFMPY_RUN_DIR=str(run_dir),
                                         ULFMPY_INJECT="kill:rank=1,step=1700"))
    [rec] = cluster.wait(job, timeout=300)
    text = output(out)
    assert rec["JobState"] == "COMPLETED" and int(rec["Restarts"]) == 1, (rec, text)
    assert "exit 75 (no in-job recovery left): requeueing" in text
    s = summary(run_dir)
    assert s["fingerprint"] == ref, text
    # Resumed from a checkpoint before the kill at 1700: 1500, or 1000 when
    # the kill came before 1500's commit (the helper's write and the commit
    # poll run beside the loop, so how far it got depends on the machine).
    assert s["restored_from"]["step"] in (1000, 1500) and s["launches"] >= 2, s


def test_an_array_of_seeded_injection_runs_each_in_its_own_run_directory(cluster, tmp_path):
    steps = 600
    out = tmp_path / "job-%a.out"
    # Three 2-rank tasks fit the cluster's 16 CPUs at once, beside the wall-time job.
    job = cluster.submit(["--array=0-2", "-n", "2", "-o", str(out)], "ulfmpy-array.sbatch",
                         ["--detect", "finite,bounds", STENCIL, *GRID, "--steps", str(steps)],
                         cwd=tmp_path,
                         env=cluster.env(ULFMPY_INJECT="bitflip:rate=0.005,bit=62"))
    recs = cluster.wait(job, timeout=420)
    assert len(recs) == 3 and all(r["JobState"] == "COMPLETED" for r in recs), \
        [(r["ArrayTaskId"], r["JobState"], r["ExitCode"]) for r in recs]
    array = recs[0]["ArrayJobId"]
    flips = {}
    for task in range(3):
        run_dir = tmp_path / "runs" / f"slurm-{array}_{task}"
        s = summary(run_dir)
        start = events(run_dir, "start")[0]
        assert start["config"]["seed"] == task, start["config"]
        flips[task] = sorted((e["rank"], e["step"]) for e in events(run_dir, "inject"))
        assert s["injected_faults"] == len(flips[task]) > 0
    # Seeded: the three experiments struck different places.
    assert len({tuple(v) for v in flips.values()}) == 3, flips


WALLTIME_APP = [str(SLOW), "--steps", "1200"]


@pytest.fixture(scope="module", autouse=True)
def walltime_job(slurm, tmp_path_factory):
    """The wall-time job, submitted before the module's other tests and
    watched from a thread: its minute of sleeping steps overlaps them.

    1200 steps of 50 ms (sleeping: the machine stays free) need more than
    one allocation of one minute warned 50 s before its end (Slurm checks
    such signals about every 30 s: the warning comes 10-40 s in). Its own
    ``Cluster`` keeps the other tests' clean-up from cancelling it.
    """
    tmp = tmp_path_factory.mktemp("walltime")
    own = Cluster()
    run_dir, out = tmp / "run", tmp / "job.out"
    job = own.submit(["-n", "4", "--time=1", "--signal=B:USR1@50", "-o", str(out)],
                     "ulfmpy.sbatch", ["--max-requeues", "10", "--halt-before", "10s",
                                       *WALLTIME_APP, "--slow-from", "0", "--slow-s", "0.05"],
                     cwd=tmp, env=own.env(ULFMPY_RUN_DIR=str(run_dir)))
    done: dict = {}

    def watch() -> None:
        try:
            done["records"] = own.wait(job, timeout=400)
        except BaseException as exc:  # noqa: BLE001 - pytest.fail raises a BaseException
            done["error"] = exc

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield {"thread": thread, "done": done, "run_dir": run_dir, "out": out, "tmp": tmp}
    thread.join(timeout=420)
    own.cleanup()


def test_the_wall_time_signal_halts_checkpoints_requeues_and_completes(walltime_job):
    """Last in the module: the job started with its first test."""
    ref = run_app_reference(walltime_job["tmp"], [*WALLTIME_APP, "--slow-from", "100000"])
    walltime_job["thread"].join(timeout=420)
    if "error" in walltime_job["done"]:
        raise walltime_job["done"]["error"]
    [rec] = walltime_job["done"]["records"]
    run_dir, text = walltime_job["run_dir"], output(walltime_job["out"])
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", (rec, text)
    assert int(rec["Restarts"]) >= 1, text
    halts = events(run_dir, "halt")
    assert halts and all(h["committed_step"] == h["step"] for h in halts), text
    # The warning came before the kill: no allocation ran into its time limit.
    assert "TIME LIMIT" not in text and "exit 79 (halted): requeueing" in text, text
    assert any(h["reason"] == "signal SIGUSR1" for h in halts), halts
    s = summary(run_dir)
    assert s["fingerprint"] == ref, text
    assert s["restored_from"]["step"] == max(h["step"] for h in halts)
