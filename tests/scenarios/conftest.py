"""Scenario tests: launch ``ulfmpy run`` as a subprocess and inspect the run directory.

Each launch runs in its own process group with a timeout; on timeout the
whole group is killed and the test fails (a hang is a failure, never a skip).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APPS = REPO / "apps"
TEST_APPS = Path(__file__).resolve().parent / "apps"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def summary(self) -> dict:
        with open(self.run_dir / "summary.json") as fh:
            return json.load(fh)

    def events(self, kind: str | None = None) -> list[dict]:
        from ulfmpy.events import read_events

        return list(read_events(self.run_dir, kind))

    def __str__(self) -> str:
        return (f"exit {self.returncode}\n--- stdout ---\n{self.stdout[-4000:]}"
                f"\n--- stderr ---\n{self.stderr[-4000:]}")


def run_ulfmpy(args: list[str], run_dir: Path, *, timeout: float = 120,
               env: dict[str, str] | None = None) -> Result:
    """``python -m ulfmpy run --run-dir RUN_DIR ARGS...``; kill the group on timeout."""
    return finish_ulfmpy(start_ulfmpy(args, run_dir, env=env), run_dir, timeout=timeout)


def start_ulfmpy(args: list[str], run_dir: Path, *,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``ulfmpy run`` in its own process group; :func:`finish_ulfmpy` waits."""
    cmd = [sys.executable, "-m", "ulfmpy", "run", "--run-dir", str(run_dir), *args]
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, start_new_session=True, cwd=str(run_dir.parent))
    proc.cmd = cmd  # type: ignore[attr-defined]
    return proc


def finish_ulfmpy(proc: subprocess.Popen, run_dir: Path, *, timeout: float = 120) -> Result:
    """Wait for a started job; on timeout kill its whole tree and fail (a hang)."""
    cmd = getattr(proc, "cmd", [])
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_job(proc, run_dir)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out, err = "", ""
        pytest.fail(f"timed out after {timeout} s (a hang): {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}")
    return Result(proc.returncode, out, err, run_dir)


_REFERENCES: dict[tuple, str] = {}


def reference_fingerprint(program: list[str], tmp_path_factory, *, ranks: int = 4,
                          timeout: float = 300) -> str:
    """The fault-free fingerprint of ``program`` (``--no-resilience``), computed
    once per session for each program and rank count."""
    key = (ranks, tuple(program))
    if key not in _REFERENCES:
        res = run_ulfmpy(["-n", str(ranks), "--no-resilience", *program],
                         tmp_path_factory.mktemp("ref") / "run", timeout=timeout)
        assert res.returncode == 0, res
        _REFERENCES[key] = res.summary["fingerprint"]
    return _REFERENCES[key]


def _processes_of(run_dir: Path) -> list[int]:
    """PIDs whose environment names this run directory (mpirun, ranks, helpers)."""
    tag = f"ULFMPY_RUN_DIR={run_dir}".encode()
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if tag in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def stop_job(proc: subprocess.Popen, run_dir: Path) -> None:
    """End a hung job: SIGTERM the launcher (it forwards to mpirun's group), then
    SIGKILL whatever of this run is left. Only processes this test started."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *_processes_of(run_dir)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def ulfmpy_run(tmp_path):
    """Call as ``ulfmpy_run(args, name="run")`` to launch a job in a fresh run dir."""
    counter = {"n": 0}

    def launch(args: list[str], *, name: str | None = None, timeout: float = 120,
               env: dict[str, str] | None = None) -> Result:
        counter["n"] += 1
        run_dir = tmp_path / (name or f"run{counter['n']}")
        return run_ulfmpy(args, run_dir, timeout=timeout, env=env)

    return launch


def require_ulfm() -> None:
    """Fail in CI, skip elsewhere, when the MPI has no ULFM."""
    from ulfmpy.launch import LaunchError, detect_mpi, find_mpirun

    try:
        info = detect_mpi(find_mpirun())
    except LaunchError as exc:
        reason = f"no usable mpirun: {exc}"
    else:
        if info.ulfm:
            return
        reason = f"{info.mpirun} ({info.implementation}) has no ULFM"
    if os.environ.get("CI"):
        pytest.fail(f"ULFM is required in CI: {reason}")
    pytest.skip(reason)
