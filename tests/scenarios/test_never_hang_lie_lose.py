"""What a fault campaign found on main before issue 18, one test per finding.

A correct run or a clear error, never a hang, nothing committed lost: each
test here failed on the code before the fix (the finding is in its docstring).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import APPS, REPO, TEST_APPS, _processes_of, run_ulfmpy, stop_job

STENCIL = [str(APPS / "stencil.py"), "--nx", "240", "--ny", "200", "--steps", "120"]
ESCAPE = ["--segment-steps", "10", "--ckpt-every", "10",
          "--inject", "bitflip:rank=2,step=15,bit=0,index=500", "--inject", "kill:rank=2,step=63"]


def _reference(tmp_path) -> str:
    res = run_ulfmpy(["-n", "4", "--no-resilience", *STENCIL], tmp_path / "ref")
    assert res.returncode == 0, res
    return res.summary["fingerprint"]


@pytest.mark.parametrize("policy", [["--spares", "1"], ["--recovery", "shrink"],
                                    ["--no-ft", "--max-restarts", "1"]],
                         ids=["spares", "shrink", "relaunch"])
def test_an_escaped_flip_on_a_rank_that_died_is_still_reported(tmp_path, policy):
    """Finding 1: the flip escaped, its rank died, and the job said
    ``escaped_faults: 0`` with a different fingerprint (counters summed over
    the survivors of the last launch only)."""
    ref = _reference(tmp_path)
    res = run_ulfmpy(["-n", "4", *policy, *ESCAPE, *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert s["escaped_faults"] == 1, s
    assert s["injected_faults"] == 2  # the flip and the kill
    assert s["failures"] == 1
    assert "escaped detection" in res.stderr
    # Never a wrong answer reported as right: differs only with an escape on record.
    assert s["fingerprint"] != ref or s["escaped_faults"] > 0


def test_a_plain_script_raising_on_rank_0_ends_the_job_under_ulfm(tmp_path):
    """Finding 2: a plain 4-rank mpi4py script raising on rank 0 hung under
    ``--with-ft ulfm`` (MPI_Abort); now it ends at once, status 76, one traceback."""
    script = tmp_path / "plain_raise.py"
    script.write_text("from mpi4py import MPI\nimport time\ncomm = MPI.COMM_WORLD\n"
                      "if comm.rank == 0:\n    time.sleep(0.3)\n"
                      "    raise RuntimeError('boom on rank 0')\ncomm.Barrier()\n")
    res = run_ulfmpy(["-n", "4", str(script)], tmp_path / "run", timeout=60)
    assert res.returncode == 76, res
    assert res.stderr.count("RuntimeError: boom on rank 0") == 2, res  # traceback + launcher line
    assert res.stderr.count("Traceback") == 1
    assert "the job ended on an error (rank 0: RuntimeError: boom on rank 0)" in res.stderr


def test_an_error_before_the_runtime_with_respawn_in_the_chain_ends_the_job(tmp_path):
    """Finding 2: a rank failing before the ``Runtime`` block, with respawn
    (and its zygote) in the chain, hung 4 runs of 16."""
    script = tmp_path / "early.py"
    script.write_text(
        "import sys\nfrom mpi4py import MPI\nimport ulfmpy\nsys.path.insert(0, %r)\n"
        "from apps.stencil import Heat2D\n"
        "if MPI.COMM_WORLD.rank == 2:\n    raise SystemExit('no input file on rank 2')\n"
        "with ulfmpy.Runtime(MPI.COMM_WORLD) as rt:\n"
        "    for step, g in rt.loop(lambda c: Heat2D(c, 40, 40), steps=2000):\n"
        "        g.step()\n" % str(REPO))
    res = run_ulfmpy(["-n", "4", "--recovery", "respawn,shrink", str(script)], tmp_path / "run",
                     timeout=60)
    assert res.returncode == 1, res  # SystemExit('...') is status 1, as in Python
    assert "no input file on rank 2" in res.stderr
    assert not _processes_of(tmp_path / "run")


@pytest.mark.parametrize("args, says", [
    (["--inject", "meteor:rank=1"], "unknown fault kind 'meteor'"),
    (["--inject", "kill:rank=1,step=3,phase=lunch"], "phase must be one of"),
    (["--recovery", "pray"], "unknown policy 'pray'"),
    (["--spares", "1", "--no-ft"], "--spares 1 needs in-job recovery"),
    (["--resume", "/no/such/dir"], "'/no/such/dir' does not exist"),
    (["--resume", "latest"], "'latest' does not exist"),
    (["--inject", "kill:rank=17,step=5"], "no rank 17 in this job (ranks 0..3)"),
    (["--inject", "bitflip:rank=4,step=5"], "no rank 4 computes in this job"),
    (["--dry-run", "--inject", "meteor:x=1"], "unknown fault kind"),
])
def test_bad_input_is_one_line_and_exit_2_before_mpirun(tmp_path, args, says):
    """Finding 5: these were accepted (silently doing nothing or the wrong
    thing) or refused as four interleaved tracebacks with status 1."""
    res = run_ulfmpy(["-n", "4", *args, *STENCIL], tmp_path / "run", timeout=60)
    assert res.returncode == 2, res
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ulfmpy run: error: ") and says in lines[0], res
    assert not (tmp_path / "run" / "events").exists()  # no rank ever started


def test_a_read_only_run_directory_is_refused_before_mpirun(tmp_path):
    """Finding 2: a new run directory on a read-only file system hung the job."""
    if os.geteuid() == 0:
        target = "/proc/ulfmpy-run"  # root writes through chmod; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "run")
    cmd = [sys.executable, "-m", "ulfmpy", "run", "-n", "4", "--run-dir", target, *STENCIL]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert res.returncode == 2, res.stderr
    assert "cannot write the run directory" in res.stderr


@pytest.mark.parametrize("args, says", [
    (["--inject", "kill:rank=1,step=5000"], "step 5000 is past the end of the loop (steps 0..119)"),
])
def test_a_fault_that_cannot_fire_is_refused_once(tmp_path, args, says):
    """Findings 5 and 6: ``step=5000`` past the end silently never fired."""
    res = run_ulfmpy(["-n", "4", *args, *STENCIL], tmp_path / "run", timeout=60)
    assert res.returncode == 76, res
    assert res.stderr.count(says) == 1, res


def test_a_negative_step_count_is_refused(tmp_path):
    """Finding 5: ``--steps -5`` ran and printed a negative rate."""
    res = run_ulfmpy(["-n", "4", str(APPS / "stencil.py"), "--steps", "-5"], tmp_path / "run",
                     timeout=60)
    assert res.returncode == 76, res
    assert res.stderr.count("steps must be a whole number >= 0") == 1, res


def test_a_kill_addresses_the_logical_rank_after_a_spare_took_it(tmp_path):
    """Finding 6: after a spare took logical rank 3, ``kill:rank=3,step=60``
    never fired (it meant the world rank at start-up)."""
    res = run_ulfmpy(["-n", "4", "--spares", "2", "--ckpt-every", "20",
                      "--inject", "kill:rank=3,step=30", "--inject", "kill:rank=3,step=60",
                      *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert s["failures"] == 2 and s["injected_faults"] == 2, s
    assert [r["failed_ranks"] for r in s["recoveries"]] == [[3], [3]]
    kills = res.events("inject")
    assert sorted(k["rank"] for k in kills) == [3, 4]  # the original, then the spare (uid 4)
    assert "unfired_faults" not in s


def test_a_fault_whose_point_never_comes_is_reported(tmp_path):
    """Finding 6: a kill that could not fire (no rollback ever happens) said nothing."""
    res = run_ulfmpy(["-n", "4", "--inject", "kill:rank=1,step=50,phase=rollback", *STENCIL],
                     tmp_path / "run")
    assert res.returncode == 0, res
    assert res.summary["unfired_faults"] == ["kill:rank=1,step=50,phase=rollback"]
    assert "1 injected fault(s) never fired" in res.stderr


def test_kills_failures_and_a_dead_spare_are_counted_without_tracker_warnings(tmp_path):
    """Finding 7: ``injected_faults`` counted no kills, a dead waiting spare
    was not a failure, and ``resource_tracker`` warned of leaked shared
    memory after every kill. Also found on the way: with two spares, one
    killed while waiting, the job hung at the end (the other spare's
    release matched a receive it no longer tested)."""
    res = run_ulfmpy(["-n", "4", "--spares", "2", "--ckpt-every", "20",
                      "--inject", "kill:rank=5,at=0.3s", *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert s["injected_faults"] == 1 and s["failures"] == 1 and s["spares_lost"] == 1, s
    again = run_ulfmpy(["-n", "4", "--spares", "1", "--ckpt-every", "20",
                        "--inject", "kill:rank=1,step=70", *STENCIL], tmp_path / "run2")
    assert again.returncode == 0, again
    assert again.summary["injected_faults"] == 1 and again.summary["failures"] == 1
    res = again
    assert "resource_tracker" not in res.stderr and "leaked" not in res.stderr, res
    left = [n for n in os.listdir("/dev/shm") if n.startswith("ulfmpy-ckpt-")]
    assert not any(_pid_dead(n) for n in left), left


def _pid_dead(name: str) -> bool:
    pid = int(name.split("-")[3])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_relaunched_run_reports_its_failure_and_launches(tmp_path):
    """Finding 7: relaunched summaries said ``failures: 0``."""
    res = run_ulfmpy(["-n", "4", "--no-ft", "--max-restarts", "1", "--ckpt-every", "20",
                      "--inject", "kill:rank=2,step=50", *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert s["failures"] == 1 and s["launches"] == 2 and s["injected_faults"] == 1, s


def test_a_good_resume_after_an_aborted_launch_exits_0(tmp_path):
    """Finding 4: after a run that left ``abort-rank-*.json``, a later
    successful ``--resume auto`` in that directory exited 76, printing nothing."""
    run_dir = tmp_path / "run"
    bad = run_ulfmpy(["-n", "4", "--ckpt-every", "10", str(TEST_APPS / "raise_on_rank.py"),
                      "1", "30"], run_dir, timeout=60)
    assert bad.returncode == 76, bad
    good = run_ulfmpy(["-n", "4", "--resume", "auto", "--ckpt-every", "10",
                       str(TEST_APPS / "raise_on_rank.py"), "1", "-1"], run_dir, timeout=60)
    assert good.returncode == 0, good
    assert good.summary["restored_from"]["step"] >= 10
    assert list((run_dir / "aborts").glob("*abort-rank-*.json"))


def _launch_in_background(run_dir, steps: int = 100000) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ulfmpy", "run", "-n", "4", "--spares", "1", "--ckpt-every",
           "200", "--run-dir", str(run_dir), str(APPS / "stencil.py"), "--nx", "300", "--ny",
           "300", "--steps", str(steps)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=str(REPO))


def _wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def test_sigkill_of_ulfmpy_run_ends_the_whole_job_and_the_lock_is_taken_over(tmp_path):
    """Finding 3: SIGKILL of the launcher's group left prterun, ranks, zygote
    and helpers running (they wrote ``summary.json`` 12 s later), and a
    ``--resume auto`` meanwhile failed on files the orphans pruned."""
    run_dir = tmp_path / "run"
    job = _launch_in_background(run_dir)
    try:
        assert _wait_for(lambda: any((run_dir / "ckpt").glob("step-*.h5")), 60), \
            job.stderr.read() if job.poll() is not None else "no checkpoint"
        assert len(_processes_of(run_dir)) >= 5  # launcher, mpirun, ranks...
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=10)
        assert _wait_for(lambda: not _processes_of(run_dir), 5), _processes_of(run_dir)
    finally:
        for pid in _processes_of(run_dir):
            os.kill(pid, signal.SIGKILL)
    assert not (run_dir / "summary.json").exists()
    res = run_ulfmpy(["-n", "3", "--resume", "auto", str(APPS / "stencil.py"), "--nx", "300",
                      "--ny", "300", "--steps", "100"], run_dir, timeout=120)
    assert "taking over the lock" in res.stderr, res
    assert res.returncode == 0, res


def test_a_second_job_on_a_locked_run_directory_is_refused(tmp_path):
    """Finding 3: nothing locked a run directory; two jobs wrote one."""
    run_dir = tmp_path / "run"
    job = _launch_in_background(run_dir)
    try:
        assert _wait_for(lambda: (run_dir / "events").exists(), 60)
        res = run_ulfmpy(["-n", "4", str(APPS / "stencil.py"), "--steps", "10"], run_dir,
                         timeout=60)
        assert res.returncode == 2, res
        assert "is in use by another job (ulfmpy run pid" in res.stderr
    finally:
        os.killpg(job.pid, signal.SIGTERM)  # a halt: checkpoint, exit 79
        try:
            job.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_job(job, run_dir)  # never leave the job running past the test
            raise
    assert _wait_for(lambda: not _processes_of(run_dir), 10)


def test_inspect_json_is_still_a_run_directory_reader(tmp_path):
    """The abort archive and lock files do not confuse ``ulfmpy inspect``."""
    run_dir = tmp_path / "run"
    res = run_ulfmpy(["-n", "2", "--ckpt-every", "50", *STENCIL], run_dir)
    assert res.returncode == 0, res
    out = subprocess.run([sys.executable, "-m", "ulfmpy", "inspect", str(run_dir), "--json"],
                         capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)


def test_a_flip_is_injected_once_though_a_spare_re_executes_its_step(tmp_path):
    """Found by a campaign (0039-df5804): with kills addressing logical ranks,
    the spare that took rank 2 and re-executed step 15 was struck again."""
    res = run_ulfmpy(["-n", "4", "--spares", "1", "--recovery", "spares", "--partner", "0",
                      "--inject", "bitflip:rank=2,step=15,index=495,bit=14",
                      "--inject", "kill:rank=2,step=20", *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    assert res.summary["injected_faults"] == 2, res.summary
    assert [e["rank"] for e in res.events("inject") if e["kind"] == "bitflip"] == [2]


def test_a_programs_own_exit_status_is_not_relaunched(tmp_path):
    """``--max-restarts`` relaunched any nonzero status; a program's own
    ``sys.exit(3)`` is not something a relaunch can fix."""
    script = tmp_path / "exit3.py"
    script.write_text("import sys\nfrom mpi4py import MPI\nMPI.COMM_WORLD.Barrier()\n"
                      "sys.exit(3 if MPI.COMM_WORLD.rank == 1 else 0)\n")
    res = run_ulfmpy(["-n", "2", "--max-restarts", "2", str(script)], tmp_path / "run",
                     timeout=60)
    assert res.returncode == 3, res
    assert "relaunch" not in res.stderr


def test_a_rank_leaving_for_relaunch_never_leaves_the_others_waiting(tmp_path):
    """Found by the 1000-schedule campaign (0980-d7532e): rank 1 killed in a
    checkpoint's partner exchange, rank 3 left with status 75 (``os._exit``),
    and the ranks waiting on rank 3 never learned it was gone: a hang. Now
    the launcher ends the job 5 s after an exit-for-relaunch marker."""
    ref = run_ulfmpy(["-n", "4", "--no-resilience", str(APPS / "stencil.py"), "--nx", "120",
                      "--ny", "100", "--steps", "80"], tmp_path / "ref")
    res = run_ulfmpy(["-n", "6", "--recovery", "", "--max-restarts", "2", "--virtual-nodes", "2",
                      "--ckpt-every", "10", "--detect-every", "1", "--segment-steps", "10",
                      "--inject", "kill:rank=1,step=45,phase=checkpoint",
                      str(APPS / "stencil.py"), "--nx", "120", "--ny", "100", "--steps", "80"],
                     tmp_path / "run", timeout=90)
    assert res.returncode == 0, res
    assert res.summary["fingerprint"] == ref.summary["fingerprint"]
    assert res.summary["launches"] == 2


@pytest.mark.parametrize("policy", [["--spares", "1"], ["--no-ft", "--max-restarts", "1"]],
                         ids=["spares", "relaunch"])
def test_the_escape_on_a_dead_rank_at_the_default_length(tmp_path, policy):
    """The twin of the pinned escape test at the default segment length and no
    checkpoint flag: whatever the segments, the escape is on record, and a
    fingerprint that differs always comes with it."""
    ref = _reference(tmp_path)
    res = run_ulfmpy(["-n", "4", *policy, "--inject", "bitflip:rank=2,step=15,bit=0,index=500",
                      "--inject", "kill:rank=2,step=63", *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert s["injected_faults"] == 2 and s["failures"] == 1, s
    assert s["escaped_faults"] == 1  # the flip's segment committed before the kill
    assert s["fingerprint"] == ref or s["escaped_faults"] > 0


def test_logical_kill_addressing_at_the_default_length(tmp_path):
    """The twin of the ``--ckpt-every 20`` test: at the default length (no checkpoint)
    the spare that took rank 3 is still the one the second kill strikes."""
    res = run_ulfmpy(["-n", "4", "--spares", "2", "--inject", "kill:rank=3,step=30",
                      "--inject", "kill:rank=3,step=60", *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert s["failures"] == 2 and [r["failed_ranks"] for r in s["recoveries"]] == [[3], [3]], s
    assert sorted(k["rank"] for k in res.events("inject")) == [3, 4]
