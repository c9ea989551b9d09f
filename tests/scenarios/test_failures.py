"""Hard failures in-job with ULFM, end to end (issue 5, docs/architecture.md, "Checkpoints" and "In-job recovery").

Every test launches ``ulfmpy run`` on the stencil, SIGKILLs ranks (the kill
injector, or the test itself for a waiting spare), and checks the run
directory: the final fingerprint must equal the fault-free run's bit for bit
(or the job must stop with the documented exit code and a relaunch must
finish it), ``summary.json`` must name the policy that repaired each
failure, and the events must show the ground truth (who was killed where)
and how every rank got its state back (``restore_after_repair``: survivors
from memory, replacements from file, everyone N->M after a shrink).

Schedule: segments of 5 steps, a global checkpoint every 10 (async unless a
test says otherwise). A kill after step 33 strikes mid-segment (30-34); the
checkpoint of step 30 is staged but commits only at the next boundary (35),
so every rank resumes from the checkpoint of step 20.

Grid: 32x24, whose halo messages stay at or below 256 bytes on 4, 3, 2 and
1 ranks. Open MPI 5.0.x crashes in ``MPI_Sendrecv`` with a ``MPI_PROC_NULL``
source when the send fails with ``MPI_ERR_REVOKED`` and the message is larger
(64x48 after a shrink to 3 ranks has 384-byte rows: a survivor segfaulted in
about a third of the shrink-then-shrink runs). The resilient communicator
now sends one-sided exchanges through Send or Recv alone;
``test_sendrecv_to_proc_null_on_a_revoked_communicator`` reproduces the
crash deterministically and guards the workaround, so the small grid here
only keeps the other tests about what they test.

A hang is a failure: every launch has a timeout, after which every process
of the run is stopped and the test reports each rank's last event (all
ranks at ``exit``: a hang in ``MPI_Finalize``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import APPS, REPO, TEST_APPS, Result, require_ulfm

pytestmark = [pytest.mark.scenario]

STENCIL = str(APPS / "stencil.py")
GATE_APP = str(TEST_APPS / "stencil_gate.py")
LINE_APP = str(TEST_APPS / "line_exchange.py")
NX, NY, STEPS = 32, 24, 60
GRID = ["--nx", str(NX), "--ny", str(NY), "--steps", str(STEPS), "--quiet"]
SCHEDULE = ["--segment-steps", "5", "--ckpt-every", "10"]
TIMEOUT = 45          # a launch takes 2-6 s here (relaunches ~10); more is a hang
EXIT_RELAUNCH = 75
MID = 33              # a step in the middle of segment 30-34
RESUMED = 20          # the newest committed checkpoint when MID strikes
STAGED = 30           # ... and the one staged in memory, its write in flight: with the
                      # ranks kept (spares, respawn) memory holds every rank's state of it
KILL_MID = f"kill:rank=2,step={MID}"
POLICIES = {          # policy -> extra launcher flags it needs
    "spares": ["--spares", "1"],
    "respawn": [],
    "shrink": [],
}


# -- helpers -------------------------------------------------------------------
#
# conftest.run_ulfmpy cannot stop a hung job: on timeout it SIGKILLs the
# launcher's process group, but ``ulfmpy run`` starts mpirun in a session of
# its own, so mpirun and the ranks live on, keep the output pipes open, and
# the ``communicate()`` that follows waits forever. The runner here sends
# SIGTERM first (the launcher forwards it to mpirun's group), then SIGKILLs
# whatever still carries this run's ULFMPY_RUN_DIR, and reports where each
# rank was (a hang in MPI_Finalize after every rank logged ``exit`` is told
# apart from a hang in the loop).

def _launch(argv: list[str], run_dir: Path) -> subprocess.Popen:
    """``python -m ulfmpy run --run-dir RUN_DIR ARGV...`` in its own session."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ulfmpy", "run", "--run-dir", str(run_dir), *argv]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, cwd=str(run_dir.parent))


def _pids_of_run(run_dir: Path) -> list[int]:
    """Processes started for this run: mpirun and the ranks carry its ULFMPY_RUN_DIR."""
    tag = f"ULFMPY_RUN_DIR={run_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tag in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _where_ranks_are(run_dir: Path) -> str:
    lines = []
    for path in sorted((run_dir / "events").glob("rank-*.jsonl")):
        last = [ln for ln in path.read_text().splitlines() if ln.strip()][-1:]
        ev = json.loads(last[0])["event"] if last else "-"
        lines.append(f"{path.stem}: last event {ev!r}")
    return "\n".join(lines)


def _stop(proc: subprocess.Popen, run_dir: Path) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)   # forwarded to mpirun's group
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for pid in _pids_of_run(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(proc: subprocess.Popen, run_dir: Path, timeout: float) -> Result:
    """Wait for the job; on timeout stop every process of the run and fail (a hang)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        where = _where_ranks_are(run_dir)
        _stop(proc, run_dir)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            out, err = "", "(output pipes still held open)"
        pytest.fail(f"timed out after {timeout} s (a hang) in {run_dir}\n{where}\n"
                    f"{out[-2000:]}\n{err[-3000:]}")
    return Result(proc.returncode, out, err, run_dir)


def run_job(argv: list[str], run_dir: Path, timeout: float = TIMEOUT) -> Result:
    proc = _launch(argv, run_dir)
    try:
        return _finish(proc, run_dir, timeout)
    finally:
        if proc.poll() is None:
            _stop(proc, run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(key, argv)``: launch once per key per module and cache the Result."""
    root = tmp_path_factory.mktemp("failures")
    cache: dict[str, Result] = {}

    def get(key: str, argv: list[str], timeout: float = TIMEOUT) -> Result:
        if key not in cache:
            cache[key] = run_job(argv, root / key, timeout=timeout)
        return cache[key]

    get.root = root
    return get


@pytest.fixture(scope="module")
def clean(runs):
    """``clean(steps)``: fingerprint of the fault-free run of the stencil grid."""
    def get(steps: int = STEPS) -> str:
        res = runs(f"clean-{steps}", ["-n", "4", "--no-resilience", "--", STENCIL,
                                      "--nx", str(NX), "--ny", str(NY), "--steps", str(steps),
                                      "--quiet"])
        assert res.returncode == 0, str(res)
        return res.summary["fingerprint"]

    return get


def stencil(*settings: str, n: int = 4, grid: list[str] = GRID) -> list[str]:
    # "--" keeps the app's flags away from the launcher's parser.
    return ["-n", str(n), *SCHEDULE, *settings, "--", STENCIL, *grid]


def kills(*specs: str) -> list[str]:
    return [a for s in specs for a in ("--inject", s)]


def ok(res: Result, clean_fp: str) -> dict:
    """The run ended well and its state equals the fault-free run's."""
    assert res.returncode == 0, str(res)
    s = res.summary
    assert s["fingerprint"] == clean_fp, f"recovered state differs from the fault-free run\n{res}"
    assert "Segmentation fault" not in res.stderr, str(res)
    return s


def by_rank(res: Result, kind: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for e in res.events(kind):
        out.setdefault(e["rank"], []).append(e)
    return out


def injected(res: Result) -> list[tuple[int, int, str]]:
    """(uid, step, phase) of every kill the injector performed."""
    return sorted((e["rank"], e["step"], e["phase"]) for e in res.events("inject")
                  if e.get("kind") == "kill")


def kinds_of_kills(res: Result) -> list[tuple[int, str]]:
    """(uid, phase) of every kill, for kill points whose step label may vary."""
    return sorted((uid, phase) for uid, _, phase in injected(res))


def detected_in_segment(rec: dict, first: int) -> None:
    """The failure was detected in the segment starting at ``first`` (the
    runtime may label it with the segment's first step or the step it was
    running), and the lost work is counted from the step this rank had
    reached back to the checkpoint (a checkpoint staged at the segment's first
    step loses only the segment's own steps)."""
    assert first <= rec["detected_at_step"] < first + 5, rec
    assert rec["detected_at_step"] <= rec["reached_step"] < first + 5, rec
    assert rec["lost_steps"] == rec["reached_step"] - rec["resumed_step"], rec


def failed_union(summary: dict) -> set[int]:
    return {r for rec in summary["recoveries"] for r in rec["failed_ranks"]}


def how_restored(res: Result) -> dict[int, list[str]]:
    return {r: [e["how"] for e in evs] for r, evs in by_rank(res, "restore_after_repair").items()}


# -- each policy alone: a middle rank dies mid-segment --------------------------

@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_alone_kill_middle_rank(runs, clean, policy):
    require_ulfm()
    res = runs(f"alone-{policy}", stencil("--recovery", policy, *POLICIES[policy],
                                          *kills(KILL_MID)))
    s = ok(res, clean())
    assert injected(res) == [(2, MID, "compute")]
    assert s["failures"] == 1
    [rec] = s["recoveries"]
    assert rec["policy"] == policy
    assert rec["failed_ranks"] == [2]
    assert rec["resumed_step"] == (RESUMED if policy == "shrink" else STAGED)
    detected_in_segment(rec, 30)
    assert rec["role"] == "survivor"          # rank 0 wrote the summary and lived
    assert rec["seconds"] > 0
    assert {"revoke", "shrink", "agree", "restore"} <= set(rec["phases"])
    assert all(v >= 0 for v in rec["phases"].values())
    how = how_restored(res)
    survivors = (0, 1, 3)
    if policy == "shrink":
        assert s["ranks"] == 3 and rec["size"] == 3
        assert rec["replaced"] == {}
        # Every survivor reads its new block of the 4-rank checkpoint (N->M).
        assert how == {r: ["file N->M"] for r in survivors}
        restored = by_rank(res, "restored")
        assert all(evs[-1]["ckpt_nranks"] == 4 and evs[-1]["nranks"] == 3
                   for evs in restored.values())
    else:
        assert s["ranks"] == 4 and rec["size"] == 4
        assert rec["phases"].get(policy, -1) >= 0
        new = 4 if policy == "spares" else 100_000   # the spare's world rank, the first spawned uid
        assert rec["replaced"] == {"2": new}
        if policy == "spares":
            assert s["spares_lost"] == 0  # used, not lost
        # Checkpoint 30 was staged, not yet committed. Survivors' snapshots
        # hold it (their segment began there), and rank 3 held rank 2's copy
        # (one host: the next rank): the replacement gets it from there.
        assert how == {0: ["memory"], 1: ["memory"], 3: ["memory"], new: ["partner"]}
        staged = [e for e in res.events("checkpoint_saved") if e["rank"] == 3 and e["step"] == STAGED]
        assert staged and staged[0]["wards"] == [2] and staged[0]["holder"] == 0
        [joined] = [e for e in res.events("recovery") if e["rank"] == new]
        assert joined["role"] == "recovered"
        # (a spare's repair event carries the agreed checkpoint; its restore, the step taken)
        assert [e["step"] for e in res.events("restore_after_repair") if e["rank"] == new] == [STAGED]
        if policy == "respawn":
            # Forked by the node's zygote, not started as a fresh interpreter.
            assert joined["warm"] is True
            [start] = [e for e in res.events("start") if e["rank"] == new]
            assert start["respawned"] is True and start["pid"] != 0
            _zygote_gone(res)
    for r in survivors:
        [e] = [e for e in res.events("recovery") if e["rank"] == r]
        assert e["policy"] == policy and e["role"] == "survivor"
    # Ground truth and the runtime agree on who died.
    assert {e["rank"] for e in res.events("failure")} >= set(survivors)


def _zygote_gone(res: Result) -> None:
    """The node's zygote was started and left with the job."""
    [z] = res.events("zygote")
    assert z["pid"], z
    deadline = time.monotonic() + 10
    while Path(f"/proc/{z['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{z['pid']}").exists(), "the zygote outlived its job"
    log = next(res.run_dir.glob("zygote-*.log")).read_text()
    assert "forked" in log and "leaving" in log, log


def test_respawn_cold_without_the_zygote(runs, clean):
    """``--zygote off``: the replacement starts as a fresh interpreter, same result."""
    require_ulfm()
    res = runs("respawn-cold", stencil("--recovery", "respawn", "--zygote", "off",
                                       *kills(KILL_MID)))
    s = ok(res, clean())
    [rec] = s["recoveries"]
    assert rec["policy"] == "respawn" and rec["replaced"] == {"2": 100_000}
    [joined] = [e for e in res.events("recovery") if e["rank"] == 100_000]
    assert joined["warm"] is False
    assert res.events("zygote") == [] and not list(res.run_dir.glob("zygote-*.log"))


def test_killing_a_forked_replacement_is_a_failure_like_any_other(runs, clean):
    """The replacement forked by the zygote dies in turn: its stub, the
    process the MPI runtime knows, must die the same way, so the survivors
    see a process failure and respawn again (a second fork)."""
    require_ulfm()
    # Kills address logical ranks: the replacement computes as rank 2.
    res = runs("respawn-twice", stencil("--recovery", "respawn",
                                        *kills(KILL_MID, "kill:rank=2,step=47")))
    s = ok(res, clean())
    assert injected(res) == [(2, MID, "compute"), (100_000, 47, "compute")]
    first, second = s["recoveries"]
    assert (first["replaced"], second["replaced"]) == ({"2": 100_000}, {"2": 200_000})
    detected_in_segment(second, 45)
    assert all(e["warm"] for e in res.events("recovery") if e["rank"] >= 100_000)
    log = next(res.run_dir.glob("zygote-*.log")).read_text()
    assert log.count("forked") == 2, log
    # mpirun counts the dead child-job process in its status; the launcher
    # sees that the run completed and recovered from it.
    assert "a respawned rank was killed and the job recovered from it in-job" in res.stderr


@pytest.mark.parametrize("partner", ["on", "0"])
def test_survivors_restore_from_their_holders_copies(runs, clean, partner):
    """Checkpoint 30 committed (sync), rank 2 dies at 38 (snapshots at 35):
    every rank's state of 30 comes from the copy its holder staged, but rank
    1's: its holder, rank 2, died with it (files). With ``--partner 0`` each
    rank staged its own: survivors restore from their own memory, the
    replacement from the files."""
    require_ulfm()
    res = runs(f"holders-{partner}", stencil("--recovery", "spares", "--spares", "1",
                                             "--ckpt-mode", "sync", "--partner", partner,
                                             *kills("kill:rank=2,step=38")))
    ok(res, clean())
    [rec] = res.summary["recoveries"]
    assert rec["resumed_step"] == 30 and rec["replaced"] == {"2": 4}
    how = how_restored(res)
    if partner == "on":
        assert how == {0: ["partner"], 1: ["file"], 3: ["partner"], 4: ["partner"]}
    else:
        assert how == {0: ["memory"], 1: ["memory"], 3: ["memory"], 4: ["file"]}


# -- rank 0 dies ------------------------------------------------------------------

@pytest.mark.parametrize("policy", list(POLICIES))
def test_kill_rank_0(runs, clean, policy):
    require_ulfm()
    res = runs(f"rank0-{policy}", stencil("--recovery", policy, *POLICIES[policy],
                                          *kills(f"kill:rank=0,step={MID}")))
    s = ok(res, clean())
    assert injected(res) == [(0, MID, "compute")]
    survivors = (1, 2, 3)
    for r in survivors:
        [e] = [e for e in res.events("recovery") if e["rank"] == r]
        assert e["policy"] == policy and e["failed_ranks"] == [0]
        assert e["resumed_step"] == (RESUMED if policy == "shrink" else STAGED)
        detected_in_segment(e, 30)
    how = how_restored(res)
    if policy == "shrink":
        assert s["ranks"] == 3
        assert how == {r: ["file N->M"] for r in survivors}
        # Old rank 1 is the new rank 0 and wrote the summary.
        [rec] = s["recoveries"]
        assert rec["policy"] == "shrink" and rec["failed_ranks"] == [0]
    else:
        assert s["ranks"] == 4
        new = 4 if policy == "spares" else 100_000
        assert how == {1: ["memory"], 2: ["memory"], 3: ["memory"], new: ["partner"]}
        # The replacement is the new logical rank 0: it wrote the summary.
        assert {e["rank"] for e in res.events("finish")} == {*survivors, new}


@pytest.mark.parametrize("policy", ["spares", "respawn"])
def test_summary_records_the_recovery_when_rank_0_is_replaced(runs, clean, policy):
    require_ulfm()
    res = runs(f"rank0-{policy}", stencil("--recovery", policy, *POLICIES[policy],
                                          *kills(f"kill:rank=0,step={MID}")))
    s = ok(res, clean())
    assert s["failures"] == 1
    [rec] = s["recoveries"]
    assert rec["policy"] == policy and rec["failed_ranks"] == [0]
    assert rec["resumed_step"] == STAGED
    detected_in_segment(rec, 30)


# -- two ranks at once ------------------------------------------------------------

@pytest.mark.parametrize("policy", list(POLICIES))
def test_kill_two_ranks_at_once(runs, clean, policy):
    require_ulfm()
    extra = ["--spares", "2"] if policy == "spares" else []
    res = runs(f"two-{policy}", stencil("--recovery", policy, *extra,
                                        *kills(f"kill:rank=1,step={MID}", f"kill:rank=2,step={MID}")))
    s = ok(res, clean())
    assert injected(res) == [(1, MID, "compute"), (2, MID, "compute")]
    # Usually one repair handles both; a rank revoked before it reached its
    # kill point dies when it re-executes the step, in a second repair.
    assert 1 <= s["failures"] <= 2
    assert failed_union(s) == {1, 2}
    assert {rec["policy"] for rec in s["recoveries"]} == {policy}
    if policy == "shrink":
        assert s["ranks"] == 2
        assert all(h == ["file N->M"] * len(h) for h in how_restored(res).values())
    else:
        assert s["ranks"] == 4
        replaced = {k: v for rec in s["recoveries"] for k, v in rec["replaced"].items()}
        assert set(replaced) == {"1", "2"}
        if policy == "spares":
            assert set(replaced.values()) == {4, 5}
        how = how_restored(res)
        if s["failures"] == 1:
            # Rank 2 held rank 1's partner copy and died with it: files. Rank 3
            # held rank 2's: memory.
            assert how[replaced["1"]][0] == "file"
            assert how[replaced["2"]][0] == "partner"
        for uid in replaced.values():
            assert how[uid][0] in ("file", "partner")


# -- a rank dies while a checkpoint is being written -------------------------------

@pytest.mark.parametrize("policy", ["spares", "shrink"])
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_kill_during_checkpoint_write(runs, clean, mode, policy):
    require_ulfm()
    res = runs(f"ckpt-{mode}-{policy}",
               stencil("--recovery", policy, *POLICIES[policy], "--ckpt-mode", mode,
                       *kills("kill:rank=2,step=30,phase=checkpoint")))
    s = ok(res, clean())
    assert injected(res) == [(2, 30, "checkpoint")]
    [rec] = s["recoveries"]
    assert rec["policy"] == policy and rec["failed_ranks"] == [2]
    # The checkpoint of step 30 never committed. Staged in memory everywhere
    # (async: rank 2 died after handing its copy to rank 3), the spares'
    # repair resumes there; otherwise everyone goes back to 20.
    back = STAGED if (mode, policy) == ("async", "spares") else RESUMED
    assert rec["resumed_step"] == back
    assert {e["step"] for e in res.events("restore_after_repair")} == {back}
    first_recovery = min(e["t"] for e in res.events("recovery"))
    assert not [e for e in res.events("checkpoint_committed")
                if e["step"] == 30 and e["t"] < first_recovery]


# -- a rank dies during the recovery from an earlier failure -----------------------

@pytest.mark.parametrize("policy", list(POLICIES))
def test_kill_during_recovery(runs, clean, policy):
    """Rank 2 dies mid-segment; rank 1 dies inside the repair (after revoke,
    before shrink). ``step=30`` (the segment's first step) fires in that
    repair however the runtime labels the recovery's step."""
    require_ulfm()
    extra = ["--spares", "2"] if policy == "spares" else []
    res = runs(f"inrec-{policy}", stencil("--recovery", policy, *extra,
                                          *kills(KILL_MID, "kill:rank=1,step=30,phase=recovery")))
    s = ok(res, clean())
    assert kinds_of_kills(res) == [(1, "recovery"), (2, "compute")]
    assert all(30 <= step < 35 for _, step, _ in injected(res))
    assert failed_union(s) == {1, 2}
    assert {rec["policy"] for rec in s["recoveries"]} == {policy}
    assert s["ranks"] == (2 if policy == "shrink" else 4)
    assert all(rec["resumed_step"] == RESUMED for rec in s["recoveries"])


def test_kill_during_recovery_at_the_failure_step(runs, clean):
    require_ulfm()
    res = runs("inrec-step33", stencil("--recovery", "shrink",
                                       *kills(KILL_MID, f"kill:rank=1,step={MID},phase=recovery")))
    s = ok(res, clean())
    assert kinds_of_kills(res) == [(1, "recovery"), (2, "compute")]
    assert all(MID <= step < 35 for _, step, _ in injected(res))
    assert failed_union(s) == {1, 2}


# -- a spare dies ------------------------------------------------------------------

def test_kill_spare_while_it_takes_over(runs, clean):
    """The spare (world rank 4) dies inside the repair: the chain falls to shrink."""
    require_ulfm()
    res = runs("spare-in-recovery",
               stencil("--spares", "1", "--recovery", "spares,shrink",
                       *kills(KILL_MID, "kill:rank=4,step=0,phase=recovery")))
    s = ok(res, clean())
    assert kinds_of_kills(res) == [(2, "compute"), (4, "recovery")]
    assert [rec["policy"] for rec in s["recoveries"]] == ["shrink"]
    assert s["ranks"] == 3
    assert failed_union(s) == {2}
    assert 4 not in how_restored(res)


def _wait_for(cond, what: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            try:
                out, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                out, err = "", ""
            pytest.fail(f"the job ended (exit {proc.returncode}) before {what}\n{out[-3000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _spare_waiting(run_dir: Path, uid: int) -> bool:
    path = run_dir / "events" / f"rank-{uid:04d}.jsonl"
    return path.exists() and '"spare_waiting"' in path.read_text()


def _run_with_spare_killed(run_dir: Path, settings: list[str]) -> Result:
    """Launch the gate app with one spare; when the compute ranks are held at
    step 20 and the spare waits, SIGKILL the spare (by the pid it wrote), then
    let the run go on. The kill injector cannot do this: a waiting spare
    reaches no kill point."""
    argv = ["-n", "4", "--spares", "1", *SCHEDULE, *settings, "--", GATE_APP,
            "--nx", str(NX), "--ny", str(NY), "--steps", str(STEPS), "--gate-step", "20"]
    proc = _launch(argv, run_dir)
    try:
        _wait_for(lambda: (run_dir / "gate-reached").exists() and _spare_waiting(run_dir, 4)
                  and (run_dir / "pids" / "world-0004.pid").exists(),
                  "the gate and the waiting spare", proc)
        pid = int((run_dir / "pids" / "world-0004.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:  # gone, or a zombie until mpirun reaps it
                if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.05)
        (run_dir / "gate").touch()
        return _finish(proc, run_dir, TIMEOUT)
    finally:
        if proc.poll() is None:
            _stop(proc, run_dir)


def test_kill_waiting_spare_run_ends_cleanly(runs, clean):
    require_ulfm()
    res = _run_with_spare_killed(runs.root / "spare-killed", ["--recovery", "spares,shrink"])
    s = ok(res, clean())
    # The dead spare is a failure (a process died), repaired by nobody.
    assert s["ranks"] == 4 and s["failures"] == 1 and s["recoveries"] == []
    # The summary still says a spare was lost (nothing else would show it).
    assert s["spares_lost"] == 1
    [lost] = res.events("spares_lost")
    assert lost["rank"] == 0 and lost["world_ranks"] == [4]
    # The dead spare never ran a step nor took part in anything after waiting.
    assert [e["event"] for e in res.events() if e["rank"] == 4][-1] == "spare_waiting"
    assert {e["rank"] for e in res.events("exit")} == {0, 1, 2, 3}


def test_kill_waiting_spare_then_a_rank_falls_to_shrink(runs, clean):
    require_ulfm()
    res = _run_with_spare_killed(runs.root / "spare-killed-then-rank",
                                 ["--recovery", "spares,shrink", *kills(KILL_MID)])
    s = ok(res, clean())
    assert injected(res) == [(2, MID, "compute")]
    [rec] = s["recoveries"]
    assert rec["policy"] == "shrink" and rec["failed_ranks"] == [2]
    assert s["ranks"] == 3
    assert how_restored(res) == {r: ["file N->M"] for r in (0, 1, 3)}


def test_kill_waiting_spare_by_injector(runs, clean):
    """``kill:rank=4,at=...`` strikes the spare while it waits (it polls);
    a later compute failure then finds no spare and falls to shrink."""
    require_ulfm()
    res = runs("spare-at", stencil("--spares", "1", "--recovery", "spares,shrink",
                                   *kills("kill:rank=4,at=0.2s", "kill:rank=2,step=53")))
    s = ok(res, clean())
    assert kinds_of_kills(res) == [(2, "compute"), (4, "at")]
    when = {e["rank"]: e["t"] for e in res.events("inject")}
    assert s["ranks"] == 3 and failed_union(s) == {2}
    policies = [rec["policy"] for rec in s["recoveries"]]
    # Normally the spare is dead long before step 53; if the machine is so
    # slow that it took rank 2's place first, it dies at its own first step.
    assert policies == (["shrink"] if when[4] < when[2] else ["spares", "shrink"])
    assert 4 not in how_restored(res) or when[4] > when[2]


# -- a second failure after the first recovery -------------------------------------

SECOND = "kill:rank=1,step=47"   # rank 1 by its rank at start, whatever it is now


@pytest.mark.parametrize("policy", list(POLICIES))
def test_second_failure_after_first_recovery(runs, clean, policy):
    require_ulfm()
    extra = ["--spares", "2"] if policy == "spares" else []
    res = runs(f"second-{policy}", stencil("--recovery", policy, *extra, *kills(KILL_MID, SECOND)))
    s = ok(res, clean())
    assert injected(res) == [(1, 47, "compute"), (2, MID, "compute")]
    assert s["failures"] == 2
    first, second = s["recoveries"]
    assert (first["policy"], second["policy"]) == (policy, policy)
    assert first["failed_ranks"] == [2] and second["failed_ranks"] == [1]
    detected_in_segment(first, 30)
    detected_in_segment(second, 45)
    assert first["resumed_step"] == (RESUMED if policy == "shrink" else STAGED)
    assert second["resumed_step"] in (RESUMED, 30, 40)
    assert s["ranks"] == (2 if policy == "shrink" else 4)
    if policy == "spares":
        assert (first["replaced"], second["replaced"]) == ({"2": 4}, {"1": 5})
    if policy == "respawn":
        assert (first["replaced"], second["replaced"]) == ({"2": 100_000}, {"1": 200_000})


# -- the default (auto) segment length across a repair ---------------------------------

@pytest.mark.parametrize("policy", list(POLICIES))
def test_auto_segment_length_survives_a_repair(runs, clean, policy):
    """With ``--segment-steps auto`` the ranks run long segments once the
    length is chosen; a replacement starts from the initial length, so every
    rank must restart from it too (a mismatch hung the job: one side in the
    end-of-segment agreement, the other in a halo exchange). No checkpoints:
    a checkpoint ends every segment, so the length would stay short; the
    repair restarts from step 0."""
    require_ulfm()
    res = runs(f"auto-{policy}", ["-n", "4", "--recovery", policy,
                                  *POLICIES[policy], *kills(KILL_MID), "--", STENCIL, *GRID])
    s = ok(res, clean())
    switched = [e for e in res.events("segment_length") if e["rank"] == 0 and e["at_step"] <= MID]
    assert switched and switched[0]["new"] > MID - switched[0]["at_step"], \
        "the kill must strike inside a segment of the chosen (longer) length"
    [rec] = s["recoveries"]
    assert rec["policy"] == policy and rec["failed_ranks"] == [2]
    assert rec["resumed_step"] == 0
    # After the repair the ranks agree on the segment length again: every
    # rank commits the same segments.
    ends: dict[int, list[tuple[int, int]]] = {}
    t_rec = min(e["t"] for e in res.events("recovery"))
    for e in res.events("segment"):
        if e["t"] > t_rec:
            ends.setdefault(e["rank"], []).append((e["step"], e["end"]))
    assert len(ends) == (3 if policy == "shrink" else 4), ends
    assert len({tuple(v) for v in ends.values()}) == 1, ends


# -- fallback chains and exhaustion --------------------------------------------------

@pytest.mark.parametrize("then", ["shrink", "respawn"])
def test_spares_exhausted_falls_to_next_policy(runs, clean, then):
    require_ulfm()
    res = runs(f"chain-{then}", stencil("--spares", "1", "--recovery", f"spares,{then}",
                                        *kills(KILL_MID, SECOND)))
    s = ok(res, clean())
    assert [rec["policy"] for rec in s["recoveries"]] == ["spares", then]
    assert [rec["failed_ranks"] for rec in s["recoveries"]] == [[2], [1]]
    assert s["ranks"] == (3 if then == "shrink" else 4)


def _exhausted(*extra: str) -> list[str]:
    return stencil("--spares", "1", "--recovery", "spares", *extra, *kills(KILL_MID, SECOND))


def test_everything_exhausted_exits_for_relaunch(runs):
    require_ulfm()
    res = runs("exhausted", _exhausted())
    assert res.returncode == EXIT_RELAUNCH, str(res)
    assert not (res.run_dir / "summary.json").exists()
    assert not list(res.run_dir.glob("abort-rank-*.json"))
    ends = res.events("job_end")
    # Every live process (3 compute ranks, one of them the former spare) says why.
    assert {e["rank"] for e in ends} == {0, 3, 4}
    assert all(e["code"] == EXIT_RELAUNCH and "RecoveryFailed" in e["reason"] for e in ends)
    # What was committed is still there for the relaunch.
    assert any(res.run_dir.glob("ckpt/step-*.h5"))
    assert "exiting for relaunch" in res.stderr


def test_everything_exhausted_relaunch_completes_from_checkpoint(runs, clean):
    require_ulfm()
    res = runs("exhausted-relaunch", _exhausted("--max-restarts", "1"), timeout=120)
    s = ok(res, clean())
    assert "job exited with status 75; relaunch 1/1" in res.stderr
    assert [e["code"] for e in res.events("job_end")] == [EXIT_RELAUNCH] * 3
    # Both kills fired once, in the first launch; the relaunch saw none.
    assert injected(res) == [(1, 47, "compute"), (2, MID, "compute")]
    src = s["restored_from"]
    assert src["step"] in (RESUMED, 30, 40) and src["ckpt_ranks"] == 4
    assert Path(src["path"]).name == f"step-{src['step']:08d}.h5"
    assert s["recoveries"] == [] and s["ranks"] == 4
    starts = res.events("start")
    assert {e["relaunch"] for e in starts} == {0, 1}


def test_relaunch_on_fewer_ranks(runs, clean):
    """No in-job policy: the job exits 75, the relaunch runs on 3 ranks (N->M)."""
    require_ulfm()
    res = runs("relaunch-3", stencil("--recovery", "", "--max-restarts", "1", "--relaunch-n", "3",
                                     *kills(KILL_MID)), timeout=120)
    s = ok(res, clean())
    assert "job exited with status 75" in res.stderr
    assert s["ranks"] == 3
    src = s["restored_from"]
    assert src["step"] == RESUMED and src["ckpt_ranks"] == 4
    # the staged checkpoint of step 30 was never committed: restore says so
    assert any(f["step"] == 30 for f in src["fallbacks"])
    assert injected(res) == [(2, MID, "compute")]


# -- soft and hard faults in one run -------------------------------------------------

def test_soft_and_hard_fault_in_one_run(runs, clean):
    require_ulfm()
    res = runs("soft-hard", stencil("--spares", "1", "--recovery", "spares",
                                    "--detect", "finite,bounds",
                                    *kills("bitflip:rank=1,step=12,bit=62", KILL_MID)))
    s = ok(res, clean())
    # The flip was caught and cured by local rollback of rank 1 alone ...
    [rb] = s["rollbacks"]
    assert rb["step"] == 10 and rb["detected_on"] == [1] and rb["reexecuted_ranks"] == [1]
    assert s["injected_faults"] == 2 and s["escaped_faults"] == 0  # the flip and the kill
    # ... and the kill by the spare and the checkpoint.
    [rec] = s["recoveries"]
    assert rec["policy"] == "spares" and rec["failed_ranks"] == [2]
    assert rec["resumed_step"] == STAGED
    assert [e["kind"] for e in res.events("inject")] == ["bitflip", "kill"]


# -- exponential failures --------------------------------------------------------------

MTBF_STEPS = 300
MTBF_GRID = ["--nx", str(NX), "--ny", str(NY), "--steps", str(MTBF_STEPS), "--quiet"]


def _mtbf_victim(spec: str) -> tuple[int, float]:
    from ulfmpy.inject import FaultPlan

    _, victim, at = FaultPlan((spec,), rank=0).mtbf_kill(4)
    return victim, at


def test_mtbf_kill_fires_and_run_is_exact(runs, clean):
    require_ulfm()
    spec = "kill:mtbf=55s,seed=10"
    victim, at = _mtbf_victim(spec)
    # The plan is a pure function of the seed: the last rank, ~0.6 s in,
    # well inside a 300-step run (~2 s here).
    assert victim == 3 and 0.3 < at < 1.0, (victim, at)
    res = runs("mtbf", stencil("--recovery", "shrink", *kills(spec), grid=MTBF_GRID))
    s = ok(res, clean(MTBF_STEPS))
    [(uid, step, phase)] = injected(res)
    assert (uid, phase) == (victim, "mtbf")
    marker = json.loads(next((res.run_dir / "injected").glob("fault-*.json")).read_text())
    assert marker["uid"] == victim and marker["step"] == step
    [rec] = s["recoveries"]
    assert rec["policy"] == "shrink" and rec["failed_ranks"] == [victim]
    assert s["ranks"] == 3


def test_mtbf_kills_one_rank_per_job(runs, clean):
    require_ulfm()
    spec = "kill:mtbf=6500ms,seed=22"
    victim, at = _mtbf_victim(spec)
    assert victim == 1 and 0.3 < at < 1.0, (victim, at)
    res = runs("mtbf-victim1", stencil("--recovery", "shrink", *kills(spec), grid=MTBF_GRID))
    s = ok(res, clean(MTBF_STEPS))
    assert [(u, p) for u, _, p in injected(res)] == [(1, "mtbf")]
    assert s["failures"] == 1 and s["ranks"] == 3


def test_a_kill_stream_strikes_again_and_again_and_the_run_is_exact(runs, clean):
    """``kill:mtbf=M,stream=1``: kill k strikes the schedule's victim once its
    time has come (a Poisson process from the launch's start); a respawn
    replaces each, and the run ends exact."""
    from ulfmpy.inject import FaultPlan, parse_fault

    require_ulfm()
    spec = "kill:mtbf=0.4s,stream=1,seed=3"
    steps = 1500
    grid = ["--nx", str(NX), "--ny", str(NY), "--steps", str(steps), "--quiet"]
    res = runs("stream", stencil("--recovery", "respawn", *kills(spec), grid=grid))
    s = ok(res, clean(steps))
    markers = sorted((json.loads(p.read_text()) for p in (res.run_dir / "injected").glob(
        "stream-*-*.json")), key=lambda m: m["k"])
    assert len(markers) >= 2 and s["failures"] == len(markers), (markers, s["recoveries"])
    f = parse_fault(spec)
    for m in markers:  # each kill k struck the schedule's victim, at or after its time
        victim, at = FaultPlan.stream_kill(f, 4, m["k"])
        assert m["rank"] == victim and m["at_s"] == at
    assert [m["k"] for m in markers] == list(range(len(markers)))
    # The loop time covers the whole loop, whichever processes lived to the end
    # (with every first rank replaced, each survivor's own loop began late).
    segments = [e["t"] for e in res.events("segment")]
    origin = float(next((res.run_dir / "events").glob(".loop-start-*")).read_text())
    assert s["wall_s"] >= max(segments) - origin - 0.05 > 0


# -- Sendrecv with MPI_PROC_NULL on a revoked communicator ----------------------------

def _line(words: int, *settings: str) -> list[str]:
    return ["-n", "3", "--spares", "1", "--segment-steps", "4", "--ckpt-every", "4", *settings,
            "--", LINE_APP, "--words", str(words)]


STALL = ["--stall-rank", "0", "--stall-step", "10"]


@pytest.fixture(scope="module")
def line_clean(runs):
    def get(words: int) -> str:
        res = runs(f"line-clean-{words}", _line(words))
        assert res.returncode == 0, str(res)
        return res.summary["fingerprint"]

    return get


def _line_after_kill(runs, words: int) -> Result:
    # Middle rank 1 dies after step 9; at step 10 rank 2's receive from it
    # fails and rank 2 revokes while rank 0 sleeps; then rank 0 calls
    # Sendrecv(dest=1, source=PROC_NULL) on the revoked communicator.
    return runs(f"line-{words}", _line(words, "--recovery", "spares",
                                        *kills("kill:rank=1,step=9")) + STALL)


def test_sendrecv_to_proc_null_on_a_revoked_communicator_small_message(runs, line_clean):
    """Control: 32-byte messages. Rank 0 learns of the failure at the agreement."""
    require_ulfm()
    res = _line_after_kill(runs, 4)
    s = ok(res, line_clean(4))
    [rec] = s["recoveries"]
    assert rec["policy"] == "spares" and rec["failed_ranks"] == [1] and rec["replaced"] == {"1": 3}


def test_sendrecv_to_proc_null_on_a_revoked_communicator(runs, line_clean):
    """1 KiB messages: Open MPI 5.0.x's MPI_Sendrecv with source=MPI_PROC_NULL
    cancels an uninitialized request when the send fails with MPI_ERR_REVOKED
    and the survivor segfaults, unless ulfmpy avoids the one-sided Sendrecv."""
    require_ulfm()
    res = _line_after_kill(runs, 128)
    s = ok(res, line_clean(128))
    [rec] = s["recoveries"]
    assert rec["policy"] == "spares" and rec["failed_ranks"] == [1]


# -- a rank dies after the checkpoint in flight committed on disk ------------------

@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("staged", [20, 10], ids=["later", "first"])
def test_a_checkpoint_committed_as_the_rank_died_is_where_the_run_goes_on(
        runs, clean, policy, staged):
    """Checkpoint ``staged``'s files are written by the boundary 5 steps
    later (rank 0 stalls 2 steps before it), rank 0's writer renames its
    manifest there (the commit point), and rank 2 dies 7 steps after the
    checkpoint, before any rank heard of the commit (that news rides the
    next boundary's agreement). The repair goes on from ``staged``,
    committed; before, it restored the one before (10, or the start for
    the first) and deleted ``staged``."""
    require_ulfm()
    res = runs(f"committed-on-disk-{staged}-{policy}",
               stencil("--recovery", policy, *POLICIES[policy],
                       *kills(f"kill:rank=0,step={staged + 3},stall=0.3s",
                              f"kill:rank=0,step={staged + 6},stall=1s",
                              f"kill:rank=2,step={staged + 7}")))
    s = ok(res, clean())
    [rec] = s["recoveries"]
    assert rec["policy"] == policy and rec["failed_ranks"] == [2]
    assert rec["resumed_step"] == staged, rec
    assert {e["step"] for e in res.events("restore_after_repair")} == {staged}
    assert {e["step"] for e in res.events("checkpoint_adopted")} == {staged}
    # every save is committed in the summary, the adopted one once
    assert [c["step"] for c in s["checkpoints"] if c["committed"]] == [10, 20, 30, 40, 50]
    assert all(c["committed"] for c in s["checkpoints"]), s["checkpoints"]
