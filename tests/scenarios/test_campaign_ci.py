"""``ulfmpy campaign campaigns/ci.toml``: the 40 CI schedules end EXACT, ESCAPED-REPORTED
or CLEAR-ERROR (never HANG, WRONG or LOST), and ``--replay`` reruns one of them.

The campaign runs as a subprocess in its own session with a timeout; on a
timeout its group is SIGKILLed, and so is every process whose
``ULFMPY_RUN_DIR`` lies under the campaign directory (the ``ulfmpy run``
jobs start sessions of their own). About 100 s on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, require_ulfm

pytestmark = [pytest.mark.scenario]

CI = REPO / "campaigns" / "ci.toml"
TIMEOUT = 600


def _kill_campaign(proc: subprocess.Popen, out: Path) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    prefix = f"ULFMPY_RUN_DIR={out}".encode()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(prefix) for v in env):
            try:
                os.kill(int(d.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def campaign(*args: str, out: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ulfmpy", "campaign", str(CI), "--out", str(out), *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=str(REPO), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_campaign(proc, out)
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"campaign timed out after {timeout} s: {' '.join(cmd)}\n"
                    f"{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def ci_campaign(tmp_path_factory):
    require_ulfm()
    out = tmp_path_factory.mktemp("campaign") / "ci"
    res = campaign(out=out)
    return out, res


def test_ci_campaign_has_no_hang_wrong_or_lost(ci_campaign):
    out, res = ci_campaign
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 40, res.stdout[-3000:]
    assert len({r["id"] for r in rows}) == 40
    bad = [f"{r['id']} {r['class']}: {r['reason']}\n  " + "\n  ".join(r["commands"])
           for r in rows if r["class"] in ("HANG", "WRONG", "LOST")]
    assert not bad, "\n".join(bad)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["classes"].values()) == 40
    assert (out / "summary.txt").exists() and (out / "reference.json").exists()
    # one progress line per run
    assert sum(" 0" in line and "/40 " in line for line in res.stdout.splitlines()) == 40
    # a rerun skips every schedule already recorded
    again = campaign(out=out, timeout=120)
    assert "40 of 40 schedules already in" in again.stdout
    assert len((out / "results.jsonl").read_text().splitlines()) == 40


def test_replay_reruns_one_schedule(ci_campaign):
    out, _ = ci_campaign
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # a single transient flip: its class does not depend on timing
    row = next(r for r in rows if r["family"] == "flip" and "persistent" not in r["faults"][0]
               and "repeat" not in r["faults"][0])
    res = campaign("--replay", row["id"], out=out, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"schedule {row['id']}: flip")
    assert any(line.strip().startswith("$ ") and row["faults"][0] in line for line in lines)
    assert lines[-1].startswith(f"{row['id']} {row['class']}:"), res.stdout


def test_report_reads_every_kept_campaign_run(ci_campaign, tmp_path):
    """``ulfmpy report`` on the runner's run directories (the runs not EXACT are kept)."""
    from ulfmpy import report
    from ulfmpy._report_plot import draw

    out, _ = ci_campaign
    dirs = sorted({p.parent for p in (out / "runs").rglob("events") if p.is_dir()})
    assert dirs, "the campaign kept no run directory (it keeps every run not EXACT)"
    for d in dirs:
        rep = report.build(d)
        text = report.render(rep)
        assert text.startswith(f"run {d}:") and rep["launches"], text
        assert rep["timeline"]["lanes"], text
    draw(report.build(dirs[0]), str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 10_000
