"""How a rank ends a job it cannot continue (``teardown.end_job``) and the launch's markers."""

import subprocess
import sys
import textwrap

from ulfmpy import jobctl
from ulfmpy.errors import EXIT_RELAUNCH


def test_exit_for_relaunch_survives_a_closed_stderr(tmp_path):
    """mpirun closes the ranks' streams as it tears a job down: the goodbye
    line raised BrokenPipeError, and the rank's status became 76 (an error
    relaunching cannot fix) instead of 75 (found by a campaign, 0000-8f987a)."""
    script = textwrap.dedent(f"""
        import sys
        from ulfmpy import teardown
        from ulfmpy.errors import ProcessFailure
        from ulfmpy.events import EventLog

        class Closed:
            def write(self, s): raise BrokenPipeError(32, "Broken pipe")
            def flush(self): raise BrokenPipeError(32, "Broken pipe")

        sys.stderr = Closed()
        teardown.end_job(ProcessFailure("peer died"), uid=0, run_dir={str(tmp_path)!r},
                         events=EventLog({str(tmp_path)!r}, 0), comms=())
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert res.returncode == EXIT_RELAUNCH, res.stderr.decode()[-2000:]


def test_markers_belong_to_their_launch(tmp_path, monkeypatch):
    monkeypatch.setenv(jobctl.LAUNCH_ID_ENV, "old")
    jobctl.write_abort_marker(str(tmp_path), 3, code=76, error="boom")
    assert [m["rank"] for m in jobctl.abort_markers(str(tmp_path))] == [3]
    monkeypatch.setenv(jobctl.LAUNCH_ID_ENV, "new")
    assert jobctl.abort_markers(str(tmp_path)) == []  # not this launch's
    assert jobctl.archive_markers(str(tmp_path)) == 1
    assert not list(tmp_path.glob("abort-rank-*.json"))
    assert len(list((tmp_path / "aborts").glob("*abort-rank-0003.json"))) == 1


def test_only_the_first_error_of_a_launch_is_printed(tmp_path, monkeypatch):
    monkeypatch.setenv(jobctl.LAUNCH_ID_ENV, "L1")
    assert jobctl.claim_first_error(str(tmp_path)) is True
    assert jobctl.claim_first_error(str(tmp_path)) is False
    monkeypatch.setenv(jobctl.LAUNCH_ID_ENV, "L2")
    assert jobctl.claim_first_error(str(tmp_path)) is True


def test_the_run_directory_lock_refuses_a_second_owner_and_reports_a_stale_one(tmp_path):
    from ulfmpy.errors import LaunchError
    import pytest

    said = []
    lock = jobctl.lock_run_dir(str(tmp_path), say=said.append)
    assert said == []
    child = subprocess.run(
        [sys.executable, "-c", "from ulfmpy import jobctl; jobctl.lock_run_dir(%r)" % str(tmp_path)],
        capture_output=True, text=True, timeout=60)
    assert child.returncode != 0 and "is in use by another job (ulfmpy run pid" in child.stderr
    lock.release()
    # A lock file whose owner died without releasing (the flock went with it).
    (tmp_path / ".lock").write_text('{"pid": 999999, "host": "h", "since": "then"}\n')
    lock = jobctl.lock_run_dir(str(tmp_path), say=said.append)
    assert len(said) == 1 and "taking over the lock" in said[0] and "999999" in said[0]
    lock.release()
    with pytest.raises(LaunchError):
        jobctl.lock_run_dir(str(tmp_path / "missing" / "dir"))
