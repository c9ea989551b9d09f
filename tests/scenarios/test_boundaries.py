"""Where segments end, at the default segment length (docs/architecture.md, "Who decides where a segment ends").

Users run the default (``--segment-steps auto``): the segment length grows to
hundreds of steps, and a checkpoint schedule must still land exactly where
it says. Each test here runs at the default; where a pinned length shows the
same behaviour more plainly, its twin pins it too.
"""

from __future__ import annotations

import pytest
from conftest import APPS, TEST_APPS

pytestmark = pytest.mark.scenario

STENCIL = str(APPS / "stencil.py")
RING = str(TEST_APPS / "ring.py")
GRID = ["--nx", "600", "--ny", "500"]


def committed_steps(res) -> list[int]:
    return [c["step"] for c in res.summary["checkpoints"] if c["committed"]]


def fingerprint_of(ulfmpy_run, name: str, app_args: list[str], ranks: int = 4) -> str:
    r = ulfmpy_run(["-n", str(ranks), "--no-resilience", *app_args], name=name)
    assert r.returncode == 0, str(r)
    return r.summary["fingerprint"]


@pytest.mark.parametrize("pinned", [[], ["--segment-steps", "7"]], ids=["default", "k7"])
def test_ckpt_every_lands_on_every_multiple(ulfmpy_run, pinned):
    app = [STENCIL, *GRID, "--steps", "240", "--quiet"]
    r = ulfmpy_run(["-n", "4", *pinned, "--ckpt-every", "20", *app], name="ckpt20")
    assert r.returncode == 0, str(r)
    s = r.summary
    assert committed_steps(r) == list(range(20, 240, 20))
    if not pinned:
        # The automatic length kept learning at boundaries that saved: it grew
        # past the checkpoint interval (segments between saves are cut short).
        lengths = [e["steps"] for e in r.events("segment_decision") if e["rank"] == 0]
        assert lengths and max(lengths) > 20, lengths
        assert s["segment_length"] > 20
    assert s["fingerprint"] == fingerprint_of(ulfmpy_run, "plain", app)


def test_readme_command_checkpoints_every_50(ulfmpy_run):
    """The README's ``ulfmpy run -n 4 --ckpt-every 50 apps/stencil.py`` as is."""
    r = ulfmpy_run(["-n", "4", "--ckpt-every", "50", STENCIL, "--quiet"], name="readme")
    assert r.returncode == 0, str(r)
    assert committed_steps(r) == [50, 100, 150]  # 200 steps by default; none at the end


def test_ckpt_every_on_another_app(ulfmpy_run):
    """An app with collectives every step and a random partner (not a stencil)."""
    app = [RING, "--n", "96", "--steps", "300"]
    r = ulfmpy_run(["-n", "4", "--ckpt-every", "25", *app], name="ring")
    assert r.returncode == 0, str(r)
    assert committed_steps(r) == list(range(25, 300, 25))
    assert r.summary["fingerprint"] == fingerprint_of(ulfmpy_run, "ring-plain", app)


def test_mtbf_checkpoints_where_each_decision_says(ulfmpy_run):
    r = ulfmpy_run(["-n", "4", "--mtbf", "30s", STENCIL, *GRID, "--steps", "3000", "--quiet"],
                   name="mtbf")
    assert r.returncode == 0, str(r)
    s = r.summary
    ckpts = committed_steps(r)
    decisions = [e for e in r.events("interval_decision") if e["rank"] == 0]
    assert len(ckpts) >= 2 and decisions, (ckpts, decisions)
    revised = {d["revises"] for d in decisions if "revises" in d}
    for d in decisions:
        assert d["next_step"] == max(d["last_save_step"] + d["steps"], d["at_step"])
        if d["next_step"] < s["steps"] and d["next_step"] not in revised:
            assert d["next_step"] in ckpts, (d, ckpts)
    # The first save measures δ; every later one is where a decision said.
    assert set(ckpts[1:]) <= {d["next_step"] for d in decisions}
    # The step time the decisions used is the loop's, not a start-up sample's
    # (that was 13-36x too long): within a factor 3 of (loop - saves) / steps
    # (the newest steps against the run's mean: a busy 2-core machine moves it).
    saves = sum(c["exposed_s"] for c in s["checkpoints"])
    honest = (s["wall_s"] - saves) / s["steps"]
    last = decisions[-1]["step_time"]
    assert honest / 3 < last < honest * 3, (last, honest)


POLICY_ARGS = {"shrink": ["-n", "4"], "spares": ["-n", "4", "--spares", "1"],
               "respawn": ["-n", "4"]}


@pytest.mark.parametrize("policy,pinned", [("shrink", []), ("shrink", ["--segment-steps", "5"]),
                                           ("spares", []), ("respawn", [])],
                         ids=["shrink-default", "shrink-k5", "spares-default", "respawn-default"])
def test_kill_resumes_from_the_checkpoint_that_landed(ulfmpy_run, policy, pinned):
    """A dead rank at the default length: the job goes back to a checkpoint
    that really is a multiple of --ckpt-every, and ends exact."""
    from conftest import require_ulfm

    require_ulfm()
    app = [STENCIL, *GRID, "--steps", "240", "--quiet"]
    r = ulfmpy_run([*POLICY_ARGS[policy], *pinned, "--recovery", policy, "--ckpt-every", "40",
                    "--inject", "kill:rank=2,step=130", *app], name="kill")
    assert r.returncode == 0, str(r)
    [rec] = r.summary["recoveries"]
    assert rec["policy"] == policy
    # 120 committed (heard of, or its manifest renamed as rank 2 died), or
    # staged in memory everywhere with its write in flight at 130 (spares,
    # respawn: taken); else back to the committed 80.
    assert rec["resumed_step"] in (80, 120) and rec["failed_ranks"] == [2]
    t_fail = min(x["t"] for x in r.events("recovery"))
    before = [e["step"] for e in r.events("checkpoint_committed")
              if e["rank"] == 0 and e["t"] < t_fail]
    staged = [e["step"] for e in r.events("checkpoint_saved") if e["rank"] == 0 and e["t"] < t_fail]
    adopted = {e["step"] for e in r.events("checkpoint_adopted")}
    if policy == "shrink":
        # a shrink reads the files: the newest committed checkpoint
        assert rec["resumed_step"] == max(before + sorted(adopted))
    else:
        assert rec["resumed_step"] in (max(before), max(staged))
    if rec["resumed_step"] not in before:
        assert rec["resumed_step"] == max(staged)
        # taken from memory, or committed on disk and adopted by every survivor
        if policy == "shrink":
            assert adopted == {rec["resumed_step"]}
    assert set(committed_steps(r)) >= {160, 200}
    assert r.summary["fingerprint"] == fingerprint_of(ulfmpy_run, "plain", app)


@pytest.mark.parametrize("ranks", [4, 3])
def test_resume_at_the_default_length(ulfmpy_run, tmp_path, ranks):
    """A run that stopped (here: it ended at step 240) resumes from its newest
    checkpoint, on any rank count, and continues to exactly the fault-free state."""
    from conftest import run_ulfmpy

    run_dir = tmp_path / "job"
    first = run_ulfmpy(["-n", "4", "--ckpt-every", "50", STENCIL, *GRID, "--steps", "240",
                        "--quiet"], run_dir)
    assert first.returncode == 0, str(first)
    assert committed_steps(first) == [50, 100, 150, 200]
    again = run_ulfmpy(["-n", str(ranks), "--ckpt-every", "50", "--resume", "auto", STENCIL, *GRID,
                        "--steps", "400", "--quiet"], run_dir)
    assert again.returncode == 0, str(again)
    s = again.summary
    assert s["restored_from"]["step"] == 200
    assert committed_steps(again) == [250, 300, 350]
    assert s["fingerprint"] == fingerprint_of(ulfmpy_run, "plain400",
                                              [STENCIL, *GRID, "--steps", "400", "--quiet"])


KEYWORD_APP = str(TEST_APPS / "keyword_app.py")


def segment_lengths(res) -> set[int]:
    return {e["end"] - e["step"] for e in res.events("segment") if e["rank"] == 0}


def test_the_launcher_flag_wins_over_a_keyword_and_says_so(ulfmpy_run):
    kept = ulfmpy_run(["-n", "2", KEYWORD_APP], name="keyword")
    assert kept.returncode == 0, str(kept)
    assert segment_lengths(kept) == {5} and not kept.events("config_override")
    won = ulfmpy_run(["-n", "2", "--segment-steps", "8", KEYWORD_APP], name="flag")
    assert won.returncode == 0, str(won)
    assert segment_lengths(won) == {8}
    overrides = [e for e in won.events("config_override") if e["rank"] == 0]
    assert [(o["setting"], o["keyword"], o["flag"]) for o in overrides] == \
        [("segment_steps", 5, 8)]


def test_a_flag_that_contradicts_a_keyword_is_a_clear_error(ulfmpy_run):
    """Every rank refuses the settings; the job says so once and ends (76), never hangs
    (an exception there would end in MPI_Abort, seen to hang under ULFM)."""
    for ranks in ("2", "4"):
        r = ulfmpy_run(["-n", ranks, "--soft-mtbf", "1h", KEYWORD_APP], timeout=60)
        assert r.returncode == 76, str(r)
        assert r.stderr.count("conflict") == 1, str(r)
        assert "--segment-steps" in r.stderr and "--soft-mtbf" in r.stderr, str(r)
