"""One checkpoint writer per node: its death is a failure the run survives,
and each virtual node has its own (docs/architecture.md, "Checkpoints")."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import APPS, _processes_of, finish_ulfmpy, reference_fingerprint, require_ulfm, start_ulfmpy, stop_job

pytestmark = [pytest.mark.scenario]

APP = [str(APPS / "stencil.py"), "--nx", "240", "--ny", "200", "--steps", "400", "--quiet"]


def _writers(run_dir: Path) -> list[int]:
    out = []
    for pid in _processes_of(run_dir):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"_ckpt_helper" in cmd and state != "Z":
            out.append(pid)
    return out


def _events(run_dir: Path, kind: str) -> list[dict]:
    out = []
    for f in sorted((run_dir / "events").glob("rank-*.jsonl")) if (run_dir / "events").is_dir() else []:
        for line in f.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:  # a line being written
                continue
            if ev.get("event") == kind:
                out.append(ev)
    return out


def _wait_for(what, timeout: float, proc) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        if proc.poll() is not None:
            return None
        time.sleep(0.01)
    return None


def test_killing_the_writer_mid_write_loses_that_checkpoint_only(tmp_path, tmp_path_factory):
    """SIGSTOP the node's writer once a checkpoint committed, let the next
    save queue behind it, SIGKILL it: that checkpoint is not committed, the
    run goes on, the next save starts a new writer, and the run ends exact
    with nothing left behind."""
    require_ulfm()
    ref = reference_fingerprint(APP, tmp_path_factory)
    run_dir = tmp_path / "run"
    proc = start_ulfmpy(["-n", "4", "--ckpt-every", "40", *APP], run_dir)
    try:
        first = _wait_for(lambda: _events(run_dir, "checkpoint_committed"), 60, proc)
        assert first, "no checkpoint committed before the run ended"
        [writer] = _writers(run_dir)
        os.kill(writer, signal.SIGSTOP)
        done = first[0]["step"]
        queued = _wait_for(lambda: [e for e in _events(run_dir, "checkpoint_saved")
                                    if e["step"] > done], 60, proc)
        assert queued, "no later checkpoint was handed to the writer"
        os.kill(writer, signal.SIGKILL)
        res = finish_ulfmpy(proc, run_dir, timeout=120)
    finally:
        if proc.poll() is None:
            stop_job(proc, run_dir)
    assert res.returncode == 0, res
    assert res.summary["fingerprint"] == ref
    lost = res.events("checkpoint_writer_lost")
    assert lost and {e["rank"] for e in lost} == {0, 1, 2, 3}, lost
    failed = res.events("checkpoint_failed")
    assert failed and all(e["writer_died"] for e in failed), failed
    lost_step = failed[0]["step"]
    committed = sorted({e["step"] for e in res.events("checkpoint_committed")})
    assert lost_step not in committed and any(s > lost_step for s in committed), committed
    from ulfmpy.checkpoint import list_checkpoints

    on_disk = [c.step for c in list_checkpoints(run_dir) if c.committed]
    assert lost_step not in on_disk and max(on_disk) > lost_step, on_disk
    assert not _writers(run_dir) and not _processes_of(run_dir)
    from ulfmpy._ckpt_helper import shm_prefix

    assert not [n for n in os.listdir("/dev/shm") if n.startswith(shm_prefix())
                and not _creator_alive(n)]


def _creator_alive(name: str) -> bool:
    from ulfmpy._ckpt_helper import shm_prefix

    try:
        pid = int(name[len(shm_prefix()):].split("-")[0])
    except ValueError:
        return False
    return Path(f"/proc/{pid}").exists()


def test_each_virtual_node_has_its_own_writer(tmp_path, tmp_path_factory):
    """``--virtual-nodes 2``: two writers for four ranks, and the run exact."""
    require_ulfm()
    ref = reference_fingerprint(APP, tmp_path_factory)
    run_dir = tmp_path / "run"
    proc = start_ulfmpy(["-n", "4", "--virtual-nodes", "2", "--ckpt-every", "40", *APP], run_dir)
    try:
        seen = _wait_for(lambda: _events(run_dir, "checkpoint_committed") and _writers(run_dir),
                         60, proc)
        writers = _writers(run_dir)
        res = finish_ulfmpy(proc, run_dir, timeout=120)
    finally:
        if proc.poll() is None:
            stop_job(proc, run_dir)
    assert seen, res
    assert res.returncode == 0, res
    assert len(writers) == 2, f"expected one writer per virtual node, saw {writers}"
    assert res.summary["fingerprint"] == ref
    assert not _writers(run_dir)
