"""Halting on request (docs/architecture.md, "Halting"): a signal or the wall time → checkpoint → exit 79 → resume.

Each test starts ``ulfmpy run`` as a user would, signals it as a batch
system does, and checks the run directory. The halt must commit a
checkpoint at the step it stopped at and the resumed run must end with the
fault-free fingerprint.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import (APPS, TEST_APPS, finish_ulfmpy, reference_fingerprint, run_ulfmpy,
                      start_ulfmpy)

from ulfmpy.errors import EXIT_HALTED

# 30000 steps: several seconds at any speed seen here, so a signal 1 s in lands mid-run.
STENCIL = [str(APPS / "stencil.py"), "--nx", "240", "--ny", "200", "--steps", "30000"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_fingerprint(STENCIL, tmp_path_factory)


def wait_for(what, predicate, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"{what} did not happen within {timeout} s")


def loop_started(run_dir):
    from ulfmpy.events import read_events

    return lambda: run_dir.exists() and any(True for _ in read_events(run_dir, "segments"))


def halt_events(res):
    return res.events("halt")


def signalled(args, run_dir, *, after=1.0, timeout=120):
    """Start ``ulfmpy run ARGS``, SIGUSR1 it ``after`` s into its loop (what
    Slurm's ``--signal=B:USR1`` does to the batch shell), wait for the end."""
    proc = start_ulfmpy(args, run_dir)
    wait_for("the loop's start", loop_started(run_dir))
    time.sleep(after)
    proc.send_signal(signal.SIGUSR1)
    return finish_ulfmpy(proc, run_dir, timeout=timeout)


def _halted_and_resumes(tmp_path, reference, args, *, resume_ranks=3):
    run_dir = tmp_path / "run"
    res = signalled(["-n", "4", *args, *STENCIL], run_dir)
    assert res.returncode == EXIT_HALTED, res
    halts = halt_events(res)
    assert len(halts) == 4, halts  # every compute rank halted
    [step] = {h["step"] for h in halts}
    assert {h["committed_step"] for h in halts} == {step}
    assert 0 < step < 30000
    assert (run_dir / "ckpt" / f"step-{step:08d}.h5").exists()
    assert res.stderr.count("ulfmpy: halted at step") == 1
    assert not (run_dir / "summary.json").exists()  # the run is not over
    assert any(h["reason"] == "signal SIGUSR1" for h in halts)
    resumed = run_ulfmpy(["-n", str(resume_ranks), "--resume", "auto", *STENCIL], run_dir,
                         timeout=300)
    assert resumed.returncode == 0, resumed
    s = resumed.summary
    assert s["restored_from"]["step"] == step
    assert s["fingerprint"] == reference
    return res, step


def test_a_signal_halts_at_the_default_settings_and_the_run_resumes_on_3_ranks(
        tmp_path, reference):
    # Checkpoints are off by default: the halt writes one all the same.
    res, step = _halted_and_resumes(tmp_path, reference, [])
    assert "SIGUSR1: halting the job" in res.stderr


def test_a_signal_halts_with_async_checkpoints_in_flight(tmp_path, reference):
    res, step = _halted_and_resumes(tmp_path, reference, ["--ckpt-every", "500"])
    # The halt's save is committed last, after the periodic ones before it.
    committed = sorted({e["step"] for e in res.events("checkpoint_committed")})
    assert committed[-1] == step and len(committed) >= 2, committed


def test_spares_leave_with_the_halt(tmp_path, reference):
    run_dir = tmp_path / "run"
    res = signalled(["-n", "4", "--spares", "1", *STENCIL], run_dir)
    assert res.returncode == EXIT_HALTED, res
    released = [e for e in res.events("spare_released") if e.get("halted")]
    assert len(released) == 1
    resumed = run_ulfmpy(["-n", "4", "--resume", "auto", *STENCIL], run_dir, timeout=300)
    assert resumed.returncode == 0 and resumed.summary["fingerprint"] == reference, resumed


def test_the_wall_time_halts_without_any_signal(tmp_path):
    # Sleeping steps (100 x 50 ms): the halt at 2 s lands mid-run on any
    # machine. The state does not depend on the sleep: the reference skips it.
    app = [str(TEST_APPS / "slow_steps.py"), "--steps", "100"]
    ref = run_ulfmpy(["-n", "4", *app, "--slow-from", "1000"], tmp_path / "ref", timeout=120)
    assert ref.returncode == 0, ref
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    res = run_ulfmpy(["-n", "4", "--walltime", "4s", "--halt-before", "2s", *app,
                      "--slow-from", "0", "--slow-s", "0.05"], run_dir, timeout=120)
    assert res.returncode == EXIT_HALTED, res
    assert time.monotonic() - t0 < 4 + 5  # before the end, not after it
    [reason] = {h["reason"] for h in res.events("halt")}
    assert reason == "deadline"
    [step] = {h["step"] for h in res.events("halt")}
    assert 0 < step < 100
    resumed = run_ulfmpy(["-n", "4", "--resume", "auto", *app, "--slow-from", "1000"], run_dir,
                         timeout=120)
    assert resumed.returncode == 0, resumed
    assert resumed.summary["restored_from"]["step"] == step
    assert resumed.summary["fingerprint"] == ref.summary["fingerprint"]


def test_a_halted_job_that_does_not_end_is_ended_with_the_halt_status(tmp_path):
    """Every rank halted, but one never gets out of MPI_Finalize: the
    launcher ends the job after its grace period and reports 79 (without
    the halt's exit markers this run hangs until the test's timeout)."""
    app = [str(TEST_APPS / "finalize_hangs.py"), "--steps", "100"]
    res = run_ulfmpy(["-n", "4", "--walltime", "4s", "--halt-before", "2s", *app,
                      "--slow-from", "0", "--slow-s", "0.05"], tmp_path / "run", timeout=60)
    assert res.returncode == EXIT_HALTED, res
    assert "did not end within 5 s; ending it" in res.stderr, res
    assert len({h["step"] for h in res.events("halt")}) == 1
    assert res.events("halt") and all(h["committed_step"] == h["step"]
                                      for h in res.events("halt")), res


def test_with_halting_off_a_signal_ends_the_job_without_a_checkpoint(tmp_path):
    # The test above fails when halt handling is switched off: this is what a
    # user gets then (and the off switch works).
    run_dir = tmp_path / "run"
    res = signalled(["-n", "4", "--halt-signal", "none", *STENCIL], run_dir, after=0.5,
                    timeout=60)
    assert res.returncode not in (0, EXIT_HALTED), res
    assert not res.events("halt") and not (run_dir / "ckpt").exists()


def test_a_second_signal_while_halting_stops_at_once_and_keeps_the_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    app = [str(TEST_APPS / "slow_steps.py"), "--steps", "40", "--slow-from", "20",
           "--slow-s", "8"]
    proc = start_ulfmpy(["-n", "4", "--ckpt-every", "5", "--ckpt-mode", "sync", *app], run_dir)
    wait_for("the slow step", lambda: (run_dir / "slow-20").exists())
    t0 = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    time.sleep(2.5)
    proc.send_signal(signal.SIGUSR1)
    res = finish_ulfmpy(proc, run_dir, timeout=60)
    assert res.returncode == EXIT_HALTED, res
    assert time.monotonic() - t0 < 8  # did not wait for the slow step to end
    assert res.events("halt_escalated") and not res.events("halt")
    assert res.stderr.count("ulfmpy: halt escalated") == 1, res
    # Committed checkpoints are intact: the newest is step 20, and it restores.
    ver = subprocess.run(
        [sys.executable, "-m", "ulfmpy", "inspect", "--verify", str(run_dir)],
        capture_output=True, text=True, timeout=60)
    assert ver.returncode == 0, ver.stdout + ver.stderr
    fast = [str(TEST_APPS / "slow_steps.py"), "--steps", "40", "--slow-from", "1000"]
    resumed = run_ulfmpy(["-n", "4", "--resume", "auto", *fast], run_dir, timeout=120)
    ref = run_ulfmpy(["-n", "4", *fast], tmp_path / "ref", timeout=120)
    assert resumed.returncode == 0 and ref.returncode == 0, (resumed, ref)
    assert resumed.summary["restored_from"]["step"] == 20
    assert resumed.summary["fingerprint"] == ref.summary["fingerprint"]


def test_bad_halt_settings_are_refused_before_mpirun(tmp_path):
    res = run_ulfmpy(["-n", "4", "--halt-signal", "KILL", *STENCIL], tmp_path / "run",
                     timeout=60)
    assert res.returncode == 2 and "KILL" in res.stderr, res
    assert not (tmp_path / "run" / "events").exists()


@pytest.mark.parametrize("moment", [".lock", "events"], ids=["launcher-starting", "ranks-starting"])
def test_a_signal_during_start_up_is_not_lost(tmp_path, reference, moment):
    """A halt asked before the ranks run (a requeue signal right after the job
    starts) used to kill a rank that had no handler yet, and the halt was lost:
    the launcher, waiting for the halt, then waited for the whole run. The
    launcher now brings the signal once every rank has started, and a rank holds
    a signal that comes before its runtime does."""
    run_dir = tmp_path / "run"
    proc = start_ulfmpy(["-n", "4", *STENCIL], run_dir)
    # .lock: the launcher holds the run directory and has not started mpirun;
    # events: the first rank opened its log, the others may not have started
    wait_for(moment, (run_dir / moment).exists, timeout=60)
    proc.send_signal(signal.SIGUSR1)
    res = finish_ulfmpy(proc, run_dir, timeout=120)
    assert res.returncode == EXIT_HALTED, res
    halts = halt_events(res)
    assert len(halts) == 4 and {h["reason"] for h in halts} >= {"signal SIGUSR1"}, halts
    [step] = {h["step"] for h in halts}
    assert step < 30000 and not (run_dir / "summary.json").exists()
    resumed = run_ulfmpy(["-n", "4", "--resume", "auto", *STENCIL], run_dir, timeout=300)
    assert resumed.returncode == 0 and resumed.summary["fingerprint"] == reference, resumed


def test_an_early_signal_in_a_rank_waits_for_its_runtime():
    """ulfmpy._rank holds a halt signal until the runtime's watch takes it over."""
    code = ("import os, signal, time\n"
            "from ulfmpy import halt\n"
            "halt.catch_early((signal.SIGUSR1,))\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(0.05)\n"
            "w = halt.HaltWatch((signal.SIGUSR1,), halt_at=None, end_at=None,\n"
            "                   on_escalate=lambda r: None)\n"
            "w.install()\n"
            "print(w.due())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "signal SIGUSR1", res
    # a program that never makes a runtime still ends on the signal, after the patience
    code = ("import os, signal, time\n"
            "from ulfmpy import halt\n"
            "halt.EARLY_PATIENCE_S = 0.2\n"
            "halt.catch_early((signal.SIGUSR1,))\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(5)\n"
            "print('survived')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 128 + signal.SIGUSR1 and "survived" not in res.stdout, res
    assert "no ulfmpy Runtime took it" in res.stderr
