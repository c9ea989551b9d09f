"""The Slurm tier's fixtures: real jobs submitted with ``sbatch`` to a running cluster.

(Not a conftest.py: the scenario tier imports helpers from its own
``conftest``, and a second module of that name would shadow it.)

``make test`` brings a one-node cluster up with ``slurm/localcluster up``
(which sets ``SLURM_CONF``) before this tier and down after it. Without a
cluster the tier fails in CI and skips, with the reason, elsewhere.
Every job a test submits is cancelled by that test if it is still there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"


def _no_cluster(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the Slurm tier needs a running cluster in CI: {reason}")
    pytest.skip(f"no Slurm cluster: {reason} (start one with: eval \"$(slurm/localcluster up)\")")


@pytest.fixture(scope="session")
def slurm():
    if not shutil.which("sbatch"):
        _no_cluster("sbatch is not installed")
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _no_cluster(f"sinfo failed: {exc}")
    state = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    if out.returncode != 0 or state not in ("idle", "mixed", "allocated"):
        _no_cluster(f"sinfo says {state or out.stderr.strip()!r} (SLURM_CONF="
                    f"{os.environ.get('SLURM_CONF', 'unset')})")
    return Cluster()


class Cluster:
    """Submit, watch and release jobs; cancel what is left at the end."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ULFMPY_")}
        env["ULFMPY_COMMAND"] = f"{sys.executable} -m ulfmpy"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.update(extra)
        return env

    def submit(self, sbatch_args: list[str], script: str, args: list[str], *, cwd: Path,
               env: dict[str, str] | None = None) -> str:
        cmd = ["sbatch", "--parsable", *sbatch_args, str(SLURM / script), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=30,
                             env=env or self.env())
        assert out.returncode == 0, f"{cmd}: {out.stderr}"
        job = out.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def show(self, job: str) -> list[dict[str, str]]:
        """``scontrol show job`` of a job (one record per array task)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True,
                             text=True, timeout=30)
        records = []
        for line in out.stdout.splitlines():
            records.append(dict(re.findall(r"(\w+)=(\S*)", line)))
        return records

    def wait(self, job: str, *, timeout: float, release: bool = True,
             until: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                       "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY")) -> list[dict]:
        """Wait until every record of ``job`` is in a state of ``until``.

        ``release``: a requeued job waits about 120 s before it may start
        again; start it at once (``scontrol update StartTime=now``, from
        outside the job, as an operator would).
        """
        t0 = time.monotonic()
        pending: dict[str, float] = {}
        while time.monotonic() - t0 < timeout:
            recs = self.show(job)
            if recs and all(r.get("JobState") in until for r in recs):
                return recs
            for r in recs:
                if not (release and r.get("JobState") == "PENDING"
                        and int(r.get("Restarts", "0")) > 0):
                    pending.pop(r.get("JobId", ""), None)
                    continue
                # Started again too soon, slurmd still holds the old start's
                # credential and kills the job ("Job credential revoked").
                seen = pending.setdefault(r["JobId"], time.monotonic())
                if time.monotonic() - seen > 5:
                    subprocess.run(["scontrol", "update", f"JobId={r['JobId']}",
                                    "StartTime=now"], capture_output=True, timeout=30)
                    pending.pop(r["JobId"])
            time.sleep(0.5)
        self.cancel(job)
        pytest.fail(f"job {job} did not end within {timeout} s: {self.show(job)}")

    def cancel(self, job: str) -> None:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)

    def cleanup(self) -> None:
        for job in self.jobs:
            recs = self.show(job)
            if any(r.get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED")
                   for r in recs):
                self.cancel(job)


@pytest.fixture
def cluster(slurm):
    yield slurm
    slurm.cleanup()
