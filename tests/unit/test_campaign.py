"""ulfmpy.campaign: seeded schedules, stable IDs, replay lookup, classification, resume. Pure."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from ulfmpy import _cmd_campaign as cmd
from ulfmpy import campaign as cp
from ulfmpy.errors import ConfigError
from ulfmpy.inject import parse_fault

REPO = Path(__file__).resolve().parents[2]
CI = REPO / "campaigns" / "ci.toml"
FULL = REPO / "campaigns" / "full.toml"
REF = "48c8b40433f2b2ebd63d12677da9e13a"


def small_spec(**over) -> cp.Spec:
    data = {
        "seed": 7, "schedules": 50, "ranks": [4, 6], "virtual_nodes": [2],
        "apps": [{"script": "apps/stencil.py", "args": ["--nx", "120"], "steps": [60, 80],
                  "arrays": ["u"], "index_max": 2000}],
        "policies": {"spares": 2, "shrink": 1, "none+relaunch": 1},
        "families": {name: 1 for name in cp.FAMILIES},
        "settings": {"ckpt_every": ["default", 10], "partner": ["default", 0]},
    }
    data.update(over)
    return cp.parse_spec(data, str(REPO / "campaigns" / "test.toml"))


# -- generation -----------------------------------------------------------------------------


def test_generation_is_deterministic_for_a_seed():
    a, b = cp.schedules(small_spec()), cp.schedules(small_spec())
    assert [s.id for s in a] == [s.id for s in b]
    assert [s.args for s in a] == [s.args for s in b]
    other = cp.schedules(small_spec(seed=8))
    assert [s.id for s in other] != [s.id for s in a]


def test_schedule_depends_on_index_only_not_on_limit():
    spec = small_spec()
    assert [s.id for s in cp.schedules(spec, limit=10)] == [s.id for s in cp.schedules(spec)[:10]]
    assert cp.generate(spec, 33).args == cp.schedules(spec)[33].args


def test_ids_are_index_and_content_hash():
    spec = small_spec()
    ids = [s.id for s in cp.schedules(spec)]
    assert len(set(ids)) == len(ids)
    for i, sid in enumerate(ids):
        head, _, digest = sid.partition("-")
        assert head == f"{i:04d}" and len(digest) == 6 and int(digest, 16) >= 0


def test_the_shipped_specs_load_and_ci_is_40_fixed_schedules():
    ci = cp.load_spec(CI)
    todo = cp.schedules(ci)
    assert len(todo) == 40 and ci.count == 40
    assert [s.id for s in todo] == [s.id for s in cp.schedules(cp.load_spec(CI))]
    assert Path(ci.root) == REPO and (REPO / ci.apps[0].script).exists()
    full = cp.load_spec(FULL)
    assert full.count == 1000 and set(full.ranks) == {4, 6} and full.virtual_nodes
    fams = {s.family for s in cp.schedules(full, limit=300)}
    assert {"node_kill", "job_kill", "kill_in_recovery", "double_kill", "flip"} <= fams


def test_every_generated_fault_parses_and_addresses_the_job():
    for s in cp.schedules(small_spec(schedules=300)):
        assert s.args[:2] == ["-n", str(s.ranks)]
        spares = int(s.args[s.args.index("--spares") + 1]) if "--spares" in s.args else 0
        for spec in s.faults:
            f = parse_fault(spec)
            if getattr(f, "step", None) is not None:
                assert 1 <= f.step < 80
            if getattr(f, "rank", None) is not None:
                assert 0 <= f.rank < s.ranks + spares
            if spec.startswith("bitflip") and f.rank is not None:
                assert f.rank < s.ranks
        assert all(spec in s.args for spec in s.faults)


def test_families_have_their_shape():
    todo = cp.schedules(small_spec(schedules=400))
    by = {}
    for s in todo:
        by.setdefault(s.family, []).append(s)
    assert set(by) == set(cp.FAMILIES)
    for s in by["double_kill"]:
        a, b = (parse_fault(f) for f in s.faults)
        assert a.step == b.step and a.rank != b.rank
    for s in by["kill_in_recovery"]:
        assert parse_fault(s.faults[1]).phase == "recovery"
    for s in by["node_kill"]:
        assert "--virtual-nodes" in s.args and s.faults[0].startswith("kill:node=node")
    for s in by["job_kill"]:
        assert s.kill_job is not None and s.resume_args is not None
        assert "--resume" in s.resume_args and not any(a == "--inject" for a in s.resume_args)
        assert s.resume_args[1] != s.args[1]          # another rank count
        every = int(s.args[s.args.index("--ckpt-every") + 1])
        assert s.kill_job["after_checkpoint"] % every == 0
    for s in by["kill"]:
        if any("phase=rollback" in f for f in s.faults):
            assert s.faults[0].startswith("bitflip") and "bounds" in s.detectors
    for s in by["flip"] + by["flip_rate"]:
        assert s.policy == "-" and "--recovery" not in s.args


def test_policies_become_flags():
    todo = cp.schedules(small_spec(schedules=200))
    for s in todo:
        if s.policy == "none+relaunch":
            assert s.args[s.args.index("--recovery") + 1] == "" and "--max-restarts" in s.args
        elif s.policy == "spares":
            assert "--spares" in s.args and s.args[s.args.index("--recovery") + 1] == "spares"


def test_node_kills_only_with_virtual_nodes():
    with pytest.raises(ConfigError, match="virtual_nodes"):
        small_spec(virtual_nodes=[])
    spec = small_spec(virtual_nodes=[], families={"kill": 1, "flip": 1})
    assert not any("--virtual-nodes" in s.args for s in cp.schedules(spec))


def test_bad_specs_are_one_clear_error():
    with pytest.raises(ConfigError, match="unknown fault family"):
        small_spec(families={"meteor": 1})
    with pytest.raises(ConfigError, match="policy"):
        small_spec(policies={"pray": 1})
    with pytest.raises(ConfigError, match="unknown key"):
        small_spec(sedd=3)


# -- replay ---------------------------------------------------------------------------------


def test_replay_finds_the_same_schedule():
    spec = small_spec()
    s = cp.schedules(spec)[17]
    assert cp.find_schedule(spec, s.id).args == s.args
    assert cp.find_schedule(spec, s.id.split("-")[0]).id == s.id
    with pytest.raises(ConfigError, match="spec changed"):
        cp.find_schedule(spec, s.id.split("-")[0] + "-000000")
    with pytest.raises(ConfigError, match="no schedule"):
        cp.find_schedule(spec, "9999")


# -- classification -------------------------------------------------------------------------


def out(code=0, fp=REF, escaped=0, stderr="ulfmpy run: run directory /x\n", events=(),
        committed=(), summary=True, timed_out=False):
    s = {"fingerprint": fp, "escaped_faults": escaped} if summary else None
    return cp.RunOutcome(exit_code=code, timed_out=timed_out, stderr=stderr, summary=s,
                         events=list(events), committed_before=list(committed))


def test_classes_of_synthetic_runs():
    assert cp.classify(out(), REF)[0] == "EXACT"
    assert cp.classify(out(escaped=1), REF)[0] == "EXACT"        # escaped but harmless
    assert cp.classify(out(fp="bad", escaped=2), REF)[0] == "ESCAPED-REPORTED"
    assert cp.classify(out(fp="bad"), REF)[0] == "WRONG"
    assert cp.classify(out(summary=False), REF)[0] == "WRONG"
    assert cp.classify(out(code=None, timed_out=True), REF)[0] == "HANG"
    err = "ulfmpy run: run directory /x\nulfmpy: rank 0: persistent fault at step 5\n"
    cls, why = cp.classify(out(code=76, summary=False, stderr=err), REF)
    assert cls == "CLEAR-ERROR" and "exit 76: ulfmpy: rank 0: persistent fault" in why
    # a failed run that reported its escaped flips (no summary: the launcher's warning)
    warn = ("ulfmpy: warning: 1 injected bit flip(s) escaped detection: the result may differ\n"
            "Traceback ...\n")
    assert cp.classify(out(code=1, summary=False, stderr=warn), REF)[0] == "ESCAPED-REPORTED"
    # a nonzero exit with nothing clear said
    assert cp.classify(out(code=139, summary=False, stderr="Segmentation fault\n"), REF)[0] == "WRONG"


def test_first_error_line_skips_informational_lines():
    err = ("ulfmpy run: run directory runs/x\n"
           "ulfmpy run: warning: something\n"
           "ulfmpy run: job exited with status 75; relaunch 1/2 resuming from the newest\n"
           "ulfmpy: rank 2: no recovery policy of spares applies\n"
           "ulfmpy run: the job ended on an error (rank 0: X); exit status 76\n")
    assert cp.first_error_line(err) == "ulfmpy: rank 2: no recovery policy of spares applies"
    assert cp.last_error_line(err).startswith("ulfmpy run: the job ended on an error")
    assert cp.first_error_line("ulfmpy run: run directory x\n") is None


UNCOMMITTED = {"event": "restore_fallback", "step": 30, "path": "ckpt/step-00000030",
               "reason": "not committed: no manifest (the run stopped before every rank's "
                         "write was durable)"}


def test_lost_rule():
    # a newer checkpoint that never committed is not lost
    restored = {"event": "restored", "step": 20}
    assert cp.lost_reasons([UNCOMMITTED, restored]) == []
    assert cp.classify(out(events=[UNCOMMITTED, restored]), REF)[0] == "EXACT"
    # a committed one skipped is
    skipped = {"event": "restore_fallback", "step": 20, "path": "ckpt/step-00000020.h5",
               "reason": "rank file 2: checksum mismatch"}
    cls, why = cp.classify(out(events=[skipped, {"event": "restored", "step": 10}]), REF)
    assert cls == "LOST" and "committed step 20 skipped" in why
    failed = {"event": "restore_failed", "source": "run", "fallbacks": [
        {"step": 20, "reason": "manifest unreadable"}]}
    assert cp.classify(out(code=76, summary=False, events=[failed],
                           stderr="ulfmpy: rank 0: cannot restore\n"), REF)[0] == "LOST"
    # a resume must take the newest manifest that was there before it started
    assert cp.lost_reasons([{"event": "restored", "step": 40}], [30, 40]) == []
    assert cp.lost_reasons([{"event": "restored", "step": 30}], [30, 40])
    assert cp.lost_reasons([{"event": "restore_none"}], [30, 40])
    assert cp.lost_reasons([{"event": "restore_none"}], []) == []
    # a hang stays a hang
    assert cp.classify(out(timed_out=True, events=[skipped]), REF)[0] == "HANG"


# -- results and resume ---------------------------------------------------------------------


def test_resume_skips_ids_already_recorded(tmp_path):
    spec = small_spec(schedules=10)
    todo = cp.schedules(spec)
    results = tmp_path / "results.jsonl"
    with open(results, "w") as fh:
        for s in todo[:4]:
            fh.write(json.dumps({"id": s.id, "class": "EXACT"}) + "\n")
        fh.write('{"id": "torn')                         # an interrupted write
    done = cmd.read_results(results)
    assert set(done) == {s.id for s in todo[:4]}
    assert [s.id for s in cmd.pending(todo, done)] == [s.id for s in todo[4:]]
    # a changed spec changes the IDs of changed schedules: they run again
    changed = cp.schedules(small_spec(schedules=10, settings={"ckpt_every": [5]}))
    assert len(cmd.pending(changed, done)) == 10


def test_summary_counts():
    rows = [
        {"id": "0", "class": "EXACT", "family": "kill", "policy": "spares", "ranks": 4,
         "faults": ["kill:rank=1,step=3"], "detectors": "default", "wall_s": 2.0},
        {"id": "1", "class": "ESCAPED-REPORTED", "family": "flip", "policy": "-", "ranks": 4,
         "faults": ["bitflip:rank=1,step=3"], "detectors": "default", "wall_s": 2.0},
        {"id": "2", "class": "EXACT", "family": "flip", "policy": "-", "ranks": 6,
         "faults": ["bitflip:rank=1,step=3"], "detectors": "finite,bounds", "wall_s": 2.0},
        {"id": "3", "class": "HANG", "family": "kill", "policy": "shrink", "ranks": 6,
         "faults": ["kill:rank=1,step=3"], "detectors": "default", "wall_s": 30.0,
         "reason": "no exit", "commands": ["ulfmpy run ..."]},
    ]
    s = cmd.summarize(rows)
    assert s["classes"]["EXACT"] == 2 and s["classes"]["HANG"] == 1
    assert s["families"]["kill"] == {"EXACT": 1, "HANG": 1}
    assert s["policies"]["-"] == {"ESCAPED-REPORTED": 1, "EXACT": 1}
    assert s["escaped_share_by_detectors"]["default"] == {"flip_runs": 1, "escaped_reported": 1,
                                                          "share": 1.0}
    assert s["escaped_share_by_detectors"]["finite,bounds"]["share"] == 0.0
    assert [f["id"] for f in s["failing"]] == ["3"]
    text = cmd.format_summary(s)
    assert "HANG" in text and "3 HANG: no exit" in text


def test_commands_round_trip_through_the_shell():
    for s in cp.schedules(small_spec(schedules=30)):
        assert shlex.split(shlex.join(s.args)) == s.args


def test_a_result_after_a_torn_line_is_kept(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text('{"id": "0000-aaaaaa", "class": "EXACT"}\n{"id": "00')
    cmd._append(results, {"id": "0001-bbbbbb", "class": "EXACT"})
    assert set(cmd.read_results(results)) == {"0000-aaaaaa", "0001-bbbbbb"}
