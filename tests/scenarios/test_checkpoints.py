"""Global HDF5 checkpoints end to end (issue 4, docs/architecture.md, "Checkpoints").

Every test launches ``ulfmpy run`` on the stencil (or on a stencil with
per-rank state, ``apps/ckpt_rank_state.py``) with ``--ckpt-every``, then
kills, tears or resumes and checks the run directory: a resumed run must end
with the fault-free run's fingerprint bit for bit, restore must say which
checkpoint it used and why it skipped newer ones, and impossible resumes
must end with a clear error, never a hang.

The fault-free fingerprints come from ``--no-resilience`` runs, computed once
per module. A run directory that several tests start from is copied per
test (its ``summary.json`` removed), so no test sees another's leftovers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import APPS, REPO, TEST_APPS, Result, run_ulfmpy

pytestmark = pytest.mark.scenario

EXIT_RELAUNCH, EXIT_UNRECOVERABLE = 75, 76
TIMEOUT = 90                 # a launch takes 2-8 s here; more means a hang
STENCIL = APPS / "stencil.py"
RANK_STATE_APP = TEST_APPS / "ckpt_rank_state.py"

# Small job: 64x48 grid, 60 steps, segments of 5, a checkpoint every 10 steps
# (committed 10, 20, ..., 50; the newest two kept on disk).
NX, NY, STEPS = 64, 48, 60
SMALL = ("--nx", str(NX), "--ny", str(NY), "--steps", str(STEPS), "--quiet")
CKPT = ("--segment-steps", "5", "--ckpt-every", "10")
BLOCK_BYTES = NX * NY * 8

# Long job for the kill of the whole job: ~3 s of compute on 4 ranks.
LONG_STEPS = 6000
LONG = ("--nx", "128", "--ny", "128", "--steps", str(LONG_STEPS), "--quiet")
LONG_CKPT = ("--segment-steps", "20", "--ckpt-every", "500")
KILL_AFTER_STEP = 1000       # kill once a checkpoint >= this step has committed

MANIFEST_RE = re.compile(r"step-(\d{8})\.h5$")


# -- launching and caching -------------------------------------------------------

def argv(ranks: int, *settings: str, app: Path = STENCIL, app_args: tuple[str, ...] = SMALL) -> list[str]:
    return ["-n", str(ranks), *settings, "--", str(app), *app_args]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def runs(root):
    """``runs(key, argv, copy_of=None)``: launch once per key per module, cache the Result.

    With ``copy_of`` (a run directory) the job runs in a fresh copy of it.
    """
    cache: dict[str, Result] = {}

    def get(key: str, args: list[str], *, copy_of: Path | None = None,
            timeout: float = TIMEOUT) -> Result:
        if key not in cache:
            run_dir = root / key
            if copy_of is not None:
                copy_run_dir(copy_of, run_dir)
            cache[key] = run_ulfmpy(args, run_dir, timeout=timeout)
            LEFT_BEHIND[run_dir] = _reap_job(run_dir)
        return cache[key]

    return get


# Processes of a finished launch still alive 10 s after it ended, by run dir.
LEFT_BEHIND: dict[Path, dict[int, str]] = {}


def _processes_of(run_dir: Path) -> dict[int, str]:
    """pid -> command line of live processes whose environment names this run dir.

    ``ulfmpy run`` hands ``ULFMPY_RUN_DIR`` to ``mpirun``, the ranks inherit it
    and so do their checkpoint helpers: it tells a job's processes apart from
    those of any other job on the machine.
    """
    tag = f"ULFMPY_RUN_DIR={run_dir}".encode()
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as fh:
                if tag not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                found[int(d)] = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def _reap_job(run_dir: Path, grace: float = 10.0) -> dict[int, str]:
    """Wait for a finished launch's processes to end; SIGKILL and return any that did not."""
    deadline = time.monotonic() + grace
    while (left := _processes_of(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        _sigkill(pid)
    return left


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def left_behind(res: Result) -> dict[int, str]:
    """Processes of this launch (ranks, helpers, mpirun) that outlived it by 10 s."""
    return LEFT_BEHIND.get(res.run_dir, {})


def copy_run_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "summary.json").unlink(missing_ok=True)
    return dst


def ok(res: Result) -> dict:
    assert res.returncode == 0, str(res)
    return res.summary


@pytest.fixture(scope="module")
def baseline(runs):
    """The fault-free fingerprint of the small job (plain mpi4py, no ulfmpy)."""
    return ok(runs("small-baseline", argv(4, "--no-resilience")))["fingerprint"]


@pytest.fixture(scope="module")
def small(runs):
    """The small job with checkpoints, fault-free: the source of >= 2 committed ones."""
    res = runs("small-ckpt", argv(4, *CKPT, "--resume", "auto"))
    ok(res)
    return res


def manifests(run_dir: Path) -> list[int]:
    """Steps of the committed checkpoints (manifests) on disk, oldest first."""
    return sorted(int(m.group(1)) for p in (run_dir / "ckpt").glob("step-*.h5")
                  if (m := MANIFEST_RE.search(p.name)))


def inspect(path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ulfmpy", "inspect", str(path), *flags],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


def ulfm_available() -> bool:
    from ulfmpy.launch import LaunchError, detect_mpi, find_mpirun

    try:
        return detect_mpi(find_mpirun()).ulfm
    except LaunchError:
        return False


# -- a fault-free checkpointed run -------------------------------------------------

def test_checkpointed_run_is_exact_and_starts_fresh(small, baseline):
    s = small.summary
    assert s["fingerprint"] == baseline
    # --resume auto on an empty run directory: a fresh start, said in the log.
    assert "restored_from" not in s
    assert small.events("restore_none") or small.events("resume_none"), \
        "a fresh start under --resume auto must be logged"
    assert [c["step"] for c in s["checkpoints"]] == [10, 20, 30, 40, 50]
    for c in s["checkpoints"]:
        assert c["committed"] is True, c
        assert c["bytes"] == BLOCK_BYTES, c
        assert c["exposed_s"] > 0 and c["write_s"] > 0, c
    # --ckpt-keep defaults to 2: only the newest two stay, with their files.
    assert manifests(small.run_dir) == [40, 50]
    for step in (40, 50):
        files = sorted(p.name for p in (small.run_dir / "ckpt" / f"step-{step:08d}").iterdir())
        assert files == [f"rank-{r:05d}.h5" for r in range(4)]
    assert not (small.run_dir / "ckpt" / "step-00000030").exists()
    assert len(small.events("checkpoint_committed")) == 4 * 5
    assert not left_behind(small), "the checkpoint writer must stop at the end of the run"


def test_sync_writer_writes_the_same_checkpoint(runs, small, baseline):
    res = runs("small-ckpt-sync", argv(4, *CKPT, "--ckpt-mode", "sync"))
    s = ok(res)
    assert s["fingerprint"] == baseline
    assert [(c["step"], c["committed"]) for c in s["checkpoints"]] == \
        [(step, True) for step in (10, 20, 30, 40, 50)]
    with h5py.File(res.run_dir / "ckpt" / "step-00000050.h5") as a, \
            h5py.File(small.run_dir / "ckpt" / "step-00000050.h5") as b:
        assert a.attrs["mode"] == "sync" and b.attrs["mode"] == "async"
        np.testing.assert_array_equal(a["u"][()], b["u"][()])


# -- (1) the whole job SIGKILLed mid-run, resumed on 4, 3 and 6 ranks -------------

def _procs() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) of every process, from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        out[int(d)] = (int(f[1]), int(f[2]), f[0])
    return out


@pytest.fixture(scope="module")
def killed(root):
    """A long job SIGKILLed (launcher, mpirun, every rank) after a checkpoint committed.

    Launched as ``python -m ulfmpy run`` in its own session. ``ulfmpy run``
    starts ``mpirun`` in a session of its own and PRRTE puts every rank in a
    process group of its own, so ``os.killpg`` of the launcher's or
    ``mpirun``'s group alone leaves the ranks running for a while: both groups
    are killed and every rank by pid, all at once, as a node crash would. The
    node's checkpoint writer is not killed: it must leave with the ranks.

    Returns a dict: ``run_dir``, ``at_kill`` (committed steps seen when
    killing), ``pids`` (the job's processes then), ``survivors`` (those still
    alive 15 s after the kill; killed before the fixture returns).
    """
    run_dir = root / "long-killed"
    run_dir.mkdir()
    cmd = [sys.executable, "-m", "ulfmpy", "run", "--run-dir", str(run_dir),
           *argv(4, *LONG_CKPT, app_args=LONG)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = root / "long-killed.out"
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, cwd=str(root))
    try:
        deadline = time.monotonic() + 60
        while True:
            at_kill = manifests(run_dir) if (run_dir / "ckpt").is_dir() else []
            if at_kill and at_kill[-1] >= KILL_AFTER_STEP:
                break
            if launcher.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the job ended (status {launcher.returncode}) or stalled before a "
                            f"checkpoint >= step {KILL_AFTER_STEP} committed: "
                            f"{log.read_text()[-3000:]}")
            time.sleep(0.02)
        assert not (run_dir / "summary.json").exists(), "the job finished before the kill"
        procs = _procs()
        [mpirun] = [pid for pid, info in procs.items() if info[0] == launcher.pid]
        ranks = [pid for pid, info in procs.items() if info[0] == mpirun]
        started = _processes_of(run_dir)  # mpirun, ranks, helpers (+ their resource trackers)
        assert procs[mpirun][1] not in (os.getpgrp(), 0)
        os.killpg(launcher.pid, signal.SIGKILL)
        os.killpg(procs[mpirun][1], signal.SIGKILL)
        for pid in ranks:
            _sigkill(pid)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 15
        while (survivors := _processes_of(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        # Whatever happened above, nothing this fixture started may outlive it.
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        for _ in range(100):
            if not (left := _processes_of(run_dir)):
                break
            for pid in left:
                _sigkill(pid)
            time.sleep(0.1)
    return {"run_dir": run_dir, "at_kill": at_kill, "pids": started, "survivors": survivors}


@pytest.fixture(scope="module")
def long_baseline(runs):
    return ok(runs("long-baseline", argv(4, "--no-resilience", app_args=LONG)))["fingerprint"]


def test_killed_job_leaves_no_process_behind(killed):
    writers = [cmd for cmd in killed["pids"].values() if "_ckpt_helper" in cmd]
    assert len(writers) == 1, f"expected one checkpoint writer for the node: {killed['pids']}"
    assert not killed["survivors"], (
        "processes of the killed job were still alive 15 s after the launcher, mpirun and "
        f"every rank were SIGKILLed: {killed['survivors']}")


def test_killed_job_left_only_committed_checkpoints(killed):
    run_dir = killed["run_dir"]
    assert not (run_dir / "summary.json").exists()
    committed = manifests(run_dir)
    assert committed and committed[-1] >= KILL_AFTER_STEP
    assert committed[-1] < LONG_STEPS
    rows = json.loads(inspect(run_dir, "--verify", "--json").stdout)["checkpoints"]
    for row in rows:
        if row["committed"]:
            assert row["verified"] is True, row


@pytest.mark.parametrize("ranks", [4, 3, 6])
def test_resume_after_killing_the_whole_job_is_exact(runs, killed, long_baseline, ranks):
    src = killed["run_dir"]
    newest = manifests(src)[-1]
    res = runs(f"long-resume-{ranks}", argv(ranks, *LONG_CKPT, "--resume", "auto", app_args=LONG),
               copy_of=src)
    s = ok(res)
    assert s["fingerprint"] == long_baseline, f"resumed on {ranks} ranks from step {newest}"
    assert s["ranks"] == ranks
    rf = s["restored_from"]
    assert rf["step"] == newest
    assert rf["ckpt_ranks"] == 4
    assert Path(rf["path"]).name == f"step-{newest:08d}.h5"
    # A newer step killed mid-write is skipped as uncommitted, nothing else.
    for fb in rf["fallbacks"]:
        assert fb["step"] > newest and "not committed" in fb["reason"], fb
    restored = res.events("restored")
    assert sorted(e["rank"] for e in restored) == list(range(ranks))
    assert all(e["step"] == newest and e["nranks"] == ranks and e["ckpt_nranks"] == 4
               for e in restored)


# -- (2) a torn newest checkpoint: fall back to the previous one, say why ----------

TORN_STEP, TORN_RANK = 50, 2
TEARS = {
    "no-manifest": "not committed: no manifest",
    "rank-file-deleted": f"rank file step-{TORN_STEP:08d}/rank-{TORN_RANK:05d}.h5 is missing",
    "rank-file-truncated": f"rank file step-{TORN_STEP:08d}/rank-{TORN_RANK:05d}.h5 is truncated",
    "byte-flipped": f"checksum mismatch in array 'u' of step-{TORN_STEP:08d}/rank-{TORN_RANK:05d}.h5",
}


def tear(run_dir: Path, how: str, step: int = TORN_STEP, rank: int = TORN_RANK) -> None:
    ckpt = run_dir / "ckpt"
    rank_file = ckpt / f"step-{step:08d}" / f"rank-{rank:05d}.h5"
    if how == "no-manifest":
        (ckpt / f"step-{step:08d}.h5").unlink()
    elif how == "rank-file-deleted":
        rank_file.unlink()
    elif how == "rank-file-truncated":
        os.truncate(rank_file, rank_file.stat().st_size // 2)
    elif how == "byte-flipped":
        with h5py.File(rank_file, "r") as f:
            offset = f["u"].id.get_offset()
            nbytes = f["u"].nbytes
        assert offset is not None, "expected a contiguous dataset"
        with open(rank_file, "r+b") as fh:
            fh.seek(offset + nbytes // 2)
            byte = fh.read(1)[0]
            fh.seek(offset + nbytes // 2)
            fh.write(bytes([byte ^ 0x10]))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", list(TEARS))
def test_torn_newest_checkpoint_falls_back_to_the_previous_one(runs, root, small, baseline, how):
    src = copy_run_dir(small.run_dir, root / f"torn-{how}-src")
    tear(src, how)
    # ulfmpy inspect sees the same damage restore will.
    v = inspect(src, "--verify", "--json")
    rows = {r["step"]: r for r in json.loads(v.stdout)["checkpoints"]}
    assert rows[40]["verified"] is True
    if how == "no-manifest":
        assert rows[TORN_STEP]["committed"] is False and v.returncode == 0
    else:
        assert rows[TORN_STEP]["verified"] is False and v.returncode == 1, v.stdout
        assert TEARS[how] in rows[TORN_STEP]["problems"][0]

    res = runs(f"torn-{how}", argv(4, *CKPT, "--resume", "auto"), copy_of=src)
    s = ok(res)
    assert s["fingerprint"] == baseline
    rf = s["restored_from"]
    assert rf["step"] == 40, rf
    [fb] = rf["fallbacks"]
    assert fb["step"] == TORN_STEP
    assert TEARS[how] in fb["reason"], fb
    # Every rank logged the fallback with its reason, then the restore.
    logged = res.events("restore_fallback")
    assert sorted(e["rank"] for e in logged) == [0, 1, 2, 3]
    assert all(e["step"] == TORN_STEP and TEARS[how] in e["reason"] for e in logged)
    assert all(e["step"] == 40 for e in res.events("restored"))


def test_torn_checkpoint_is_caught_when_resuming_on_another_rank_count(runs, root, small, baseline):
    """4 -> 3 ranks: each rank checksums a share of the four files (rank 0: files 0 and 3)."""
    src = copy_run_dir(small.run_dir, root / "torn-flip-3-src")
    tear(src, "byte-flipped", rank=3)
    res = runs("torn-flip-3", argv(3, *CKPT, "--resume", "auto"), copy_of=src)
    s = ok(res)
    assert s["fingerprint"] == baseline
    assert s["restored_from"]["step"] == 40
    [fb] = s["restored_from"]["fallbacks"]
    assert "checksum mismatch in array 'u' of step-00000050/rank-00003.h5" in fb["reason"]


# -- (3) a kill between the rank files and the manifest ---------------------------

KILL_AT_CKPT = ("--recovery", "", "--ckpt-mode", "async",
                "--inject", "kill:rank=1,step=30,phase=checkpoint")


@pytest.fixture(scope="module")
def killed_in_commit(runs):
    if not ulfm_available():
        pytest.skip("the job exits 75 after a dead rank only under ULFM")
    return runs("kill-in-commit", argv(4, *CKPT, *KILL_AT_CKPT))


def test_kill_between_rank_files_and_manifest_commits_nothing(killed_in_commit):
    res = killed_in_commit
    assert res.returncode == EXIT_RELAUNCH, str(res)
    ckpt = res.run_dir / "ckpt"
    # Step 30 was staged and handed to the helpers, then rank 1 died: its
    # directory exists, its manifest does not; 10 and 20 are intact.
    assert (ckpt / "step-00000030").is_dir()
    assert manifests(res.run_dir) == [10, 20]
    assert not list(ckpt.glob("step-00000030.h5*")) and not list(ckpt.glob(".step-00000030.h5*"))
    assert [e["rank"] for e in res.events("inject")] == [1]
    assert not left_behind(res), "the writer must leave with the ranks (no orphans)"
    v = inspect(res.run_dir, "--verify", "--json")
    assert v.returncode == 0, v.stdout + v.stderr
    rows = {r["step"]: r for r in json.loads(v.stdout)["checkpoints"]}
    assert rows[30]["committed"] is False
    assert rows[10]["verified"] is True and rows[20]["verified"] is True
    text = inspect(res.run_dir).stdout
    assert re.search(r"^\s+30\s+\d+\s+[\d,]+\s+no\b", text, re.MULTILINE), text


def test_resume_skips_the_uncommitted_checkpoint_and_is_exact(runs, killed_in_commit, baseline):
    res = runs("kill-in-commit-resume", argv(4, *CKPT, "--resume", "auto"),
               copy_of=killed_in_commit.run_dir)
    s = ok(res)
    assert s["fingerprint"] == baseline
    rf = s["restored_from"]
    assert rf["step"] == 20
    [fb] = rf["fallbacks"]
    assert fb["step"] == 30 and "not committed: no manifest" in fb["reason"]


def test_checkpoint_cadence_continues_from_the_restored_step(runs, killed_in_commit):
    """After resuming at step 20 with --ckpt-every 10 the next saves are 30, 40, 50.

    (Not 25, 35, ...: a save right after a restore is wasted I/O, and the
    interval policy would measure the step time over steps never run here.)
    """
    res = runs("kill-in-commit-resume", argv(4, *CKPT, "--resume", "auto"),
               copy_of=killed_in_commit.run_dir)
    s = ok(res)
    assert s["restored_from"]["step"] == 20
    assert [c["step"] for c in s["checkpoints"]] == [30, 40, 50]


def test_explicit_resume_from_the_uncommitted_step_is_refused(runs, root, killed_in_commit):
    key = "kill-in-commit-explicit"
    step_dir = root / key / "ckpt" / "step-00000030"   # in the copy the job runs in
    res = runs(key, argv(4, *CKPT, "--resume", str(step_dir)), copy_of=killed_in_commit.run_dir)
    assert res.returncode != 0, str(res)
    assert res.returncode != EXIT_RELAUNCH, "a relaunch cannot fix a bad --resume path"
    assert f"{step_dir} is not committed" in res.stderr, res.stderr[-3000:]
    assert not (res.run_dir / "summary.json").exists()


# -- (4) per-rank state resumed on another rank count ------------------------------

@pytest.fixture(scope="module")
def rank_state(runs):
    res = runs("rank-state", argv(4, *CKPT, app=RANK_STATE_APP, app_args=()))
    ok(res)
    assert manifests(res.run_dir) == [40, 50]
    return res


@pytest.mark.parametrize("ranks", [3, 6])
def test_per_rank_state_on_another_rank_count_is_a_clear_error(runs, rank_state, ranks):
    res = runs(f"rank-state-on-{ranks}",
               argv(ranks, *CKPT, "--resume", "auto", app=RANK_STATE_APP, app_args=()),
               copy_of=rank_state.run_dir)
    assert res.returncode != 0, str(res)
    assert res.returncode != EXIT_RELAUNCH, "relaunching on the same count would fail again"
    assert "tally" in res.stderr and "per-rank state" in res.stderr, res.stderr[-3000:]
    assert f"written by 4 ranks but this run has {ranks}" in res.stderr, res.stderr[-3000:]
    assert not (res.run_dir / "summary.json").exists()
    assert res.events("restore_failed")
    assert not left_behind(res)


def test_per_rank_state_on_the_same_rank_count_is_exact(runs, rank_state):
    res = runs("rank-state-on-4", argv(4, *CKPT, "--resume", "auto", app=RANK_STATE_APP, app_args=()),
               copy_of=rank_state.run_dir)
    s = ok(res)
    assert s["restored_from"]["step"] == 50
    assert s["fingerprint"] == rank_state.summary["fingerprint"]


# -- (5) local rollback exhausted -> global rollback -------------------------------

GLOBAL = ("--detect", "finite,bounds", "--max-retries", "1")
FLIP_27 = "bitflip:rank=1,step=27,bit=62"


@pytest.fixture(scope="module")
def global_rollback(runs):
    return runs("global-rollback", argv(4, *CKPT, *GLOBAL, "--inject", f"{FLIP_27},repeat=3"))


def test_global_rollback_after_local_retries_is_exact(global_rollback, baseline):
    res = global_rollback
    s = ok(res)
    assert s["fingerprint"] == baseline
    # Segment 25-29: the flip struck the run and both re-executions (retry 1
    # of --max-retries 1, then one more), so every rank went back to the
    # newest committed checkpoint; the fourth execution of step 27 is clean.
    [gr] = s["global_rollbacks"]
    assert gr["from_segment"] == 25
    assert gr["step"] in (10, 20), gr
    assert gr["lost_steps"] == 25 - gr["step"]
    assert "persistent" in gr["reason"]
    assert sorted(e["rank"] for e in res.events("global_rollback")) == [0, 1, 2, 3]
    assert all(e["step"] == gr["step"] for e in res.events("global_rollback"))
    assert {e["step"] for e in res.events("retries_exhausted")} == {25}
    injected = res.events("inject")
    assert [(e["rank"], e["step"]) for e in injected] == [(1, 27)] * 3
    assert s["escaped_faults"] == 0


def test_global_rollback_counts_the_injected_fault(global_rollback):
    """The flip struck once in the original run; the global rollback cured it."""
    s = ok(global_rollback)
    assert s["injected_faults"] == 1, (
        f"summary says {s['injected_faults']} injected faults; the injector logged "
        f"{len(global_rollback.events('inject'))} strikes of one fault")


def test_persistent_fault_ends_the_job_with_a_clear_error(runs):
    res = runs("global-rollback-persistent",
               argv(4, *CKPT, *GLOBAL, "--inject", f"{FLIP_27},persistent=1"), timeout=60)
    assert res.returncode != 0, str(res)
    if ulfm_available():
        assert res.returncode == EXIT_UNRECOVERABLE, str(res)
    assert "persistent fault" in res.stderr, res.stderr[-3000:]
    assert "global rollbacks did not cure it" in res.stderr, res.stderr[-3000:]
    assert not (res.run_dir / "summary.json").exists()
    # It tried: --max-retries 1 global rollbacks after the first, on every rank.
    assert len(res.events("global_rollback")) == 4 * 2
    assert not left_behind(res), "the writer must stop when the job ends on an error"


# -- (6) ulfmpy inspect and the manifest's virtual datasets ------------------------

def _serial_stencil(steps: int) -> np.ndarray:
    """The stencil's field after ``steps`` steps, on one array (the same arithmetic)."""
    i, j = np.meshgrid(np.arange(NX), np.arange(NY), indexing="ij")
    u = ((i * 7 + j * 13) % 29) / 28.0
    u = np.where((i == NX - 1) | (j == 0) | (j == NY - 1), 0.0, u)
    u = np.where(i == 0, 1.0, u)
    for _ in range(steps):
        t = u[:-2, 1:-1] + u[2:, 1:-1]
        t += u[1:-1, :-2]
        t += u[1:-1, 2:]
        t *= 0.25
        u[1:-1, 1:-1] = t
    return u


class _OneRank:
    """Enough of a communicator for ``ulfmpy.fingerprint`` on one process."""

    def Get_rank(self) -> int:
        return 0

    def gather(self, obj, root=0):
        return [obj]

    def bcast(self, obj, root=0):
        return obj


def test_inspect_lists_and_verifies_checkpoints(small):
    v = inspect(small.run_dir, "--verify")
    assert v.returncode == 0, v.stdout + v.stderr
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([\d,]+)\s+(yes|no)\s+(\S+)", v.stdout, re.MULTILINE)
    assert rows == [("40", "4", f"{BLOCK_BYTES:,}", "yes", "ok"),
                    ("50", "4", f"{BLOCK_BYTES:,}", "yes", "ok")], v.stdout
    data = json.loads(inspect(small.run_dir, "--verify", "--json", "--manifest").stdout)
    assert [(r["step"], r["committed"], r["verified"]) for r in data["checkpoints"]] == \
        [(40, True, True), (50, True, True)]
    m = data["manifest"]
    assert m["step"] == 50 and m["nranks"] == 4
    assert m["arrays"]["u"]["kind"] == "block" and m["arrays"]["u"]["global_shape"] == [NX, NY]


def test_manifest_virtual_dataset_is_the_global_array(small, baseline, tmp_path, monkeypatch):
    from ulfmpy import Block, fingerprint

    # The serial reference reproduces the run's fingerprint: it is the right state.
    assert fingerprint(_OneRank(), {"u": Block(_serial_stencil(STEPS), (NX, NY), (0, 0))}) == baseline
    # Move the run directory and read from elsewhere: the sources are relative.
    moved = shutil.copytree(small.run_dir / "ckpt", tmp_path / "elsewhere" / "ckpt")
    monkeypatch.chdir(tmp_path)
    for step in (40, 50):
        manifest = moved / f"step-{step:08d}.h5"
        assembled = np.full((NX, NY), np.nan)
        covered = np.zeros((NX, NY), dtype=int)
        for r in range(4):
            with h5py.File(moved / f"step-{step:08d}" / f"rank-{r:05d}.h5", "r") as f:
                d = f["u"]
                (x0, y0), (lx, ly) = d.attrs["start"], d.shape
                assembled[x0:x0 + lx, y0:y0 + ly] = d[()]
                covered[x0:x0 + lx, y0:y0 + ly] += 1
        assert (covered == 1).all(), "the rank blocks must tile the global array"
        with h5py.File(manifest, "r") as f:
            assert f["u"].is_virtual and f["u"].shape == (NX, NY)
            assert int(f.attrs["step"]) == step and int(f.attrs["nranks"]) == 4
            global_u = f["u"][()]
        np.testing.assert_array_equal(global_u, assembled)
        np.testing.assert_array_equal(global_u, _serial_stencil(step))
