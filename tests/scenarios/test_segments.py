"""Segments with local rollback, end to end (issue 3, docs/architecture.md, "Segments and local rollback").

Every test launches ``ulfmpy run`` on the stencil (halo exchange) or on the
ring test app (ring + random partners with Isend/Irecv/Waitall and
isend/irecv, sendrecv, Allreduce/allreduce, Allgather, bcast/Bcast, Barrier;
see apps/ring.py), injects bit flips, and checks the run
directory: the final fingerprint must equal the fault-free run's bit for bit,
the summary and events must say who re-executed, and faults that cannot be
cured must end the job with a clear error, never a hang.

Bit 62 (the top exponent bit) of a float64 in [0, 1] turns it into something
>= 2 (or Inf), which ``bounds`` always catches; bit 63 flips the sign; bit 30
is a mantissa bit that no detector sees. Flips name ``index`` where the cell
matters (an interior cell, value well inside the bounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import APPS, TEST_APPS, Result, run_ulfmpy

pytestmark = pytest.mark.scenario

STEPS = 28          # 3 segments of 10 steps: 0-9, 10-19, 20-27 (a short last one)
K = 10
DETECT = ["--detect", "finite,bounds"]
TIMEOUT = 90        # a launch takes ~2 s here; more means a hang
RANKS = (4, 6)


@dataclass(frozen=True)
class App:
    name: str
    path: Path
    args: tuple[str, ...]
    array: str           # the distributed state array
    interior: int        # a flat local index of an interior cell on every rank

    def argv(self, ranks: int, settings: list[str], extra: tuple[str, ...] = ()) -> list[str]:
        # "--" keeps app flags away from the launcher's parser (see
        # test_app_flag_that_abbreviates_a_launcher_flag).
        return ["-n", str(ranks), *settings, "--", str(self.path), *self.args, *extra]


# 48x40 on 4 ranks: 2x2 blocks of 24x20; on 6 ranks: 3x2 blocks of 16x20.
# Local index 105 = (5, 5) is interior on every rank.
STENCIL = App("stencil", APPS / "stencil.py",
              ("--nx", "48", "--ny", "40", "--steps", str(STEPS), "--quiet"), "u", 105)
# 96 values: blocks of 24 (4 ranks) or 16 (6 ranks); index 5 is neither an
# end value (ring exchange) nor the middle one (sendrecv).
RING = App("ring", TEST_APPS / "ring.py", ("--n", "96", "--steps", str(STEPS)), "x", 5)
APPS_UNDER_TEST = {a.name: a for a in (STENCIL, RING)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(key, argv)``: launch once per key per module, cache the Result."""
    root = tmp_path_factory.mktemp("segments")
    cache: dict[str, Result] = {}

    def get(key: str, argv: list[str], timeout: float = TIMEOUT) -> Result:
        if key not in cache:
            cache[key] = run_ulfmpy(argv, root / key, timeout=timeout)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def clean(runs):
    """``clean(app, ranks)``: the fingerprint of the ``--no-resilience`` baseline."""
    def get(app: App, ranks: int) -> str:
        res = runs(f"{app.name}-{ranks}-baseline", app.argv(ranks, ["--no-resilience"]))
        assert res.returncode == 0, str(res)
        return res.summary["fingerprint"]

    return get


def ok(res: Result) -> dict:
    assert res.returncode == 0, str(res)
    return res.summary


def protected(app: App, ranks: int, *settings: str, k: int = K) -> list[str]:
    return app.argv(ranks, [*DETECT, "--segment-steps", str(k), *settings])


def flips(*specs: str) -> list[str]:
    return [a for s in specs for a in ("--inject", s)]


def segment_of(step: int, k: int = K) -> int:
    return step // k * k


# -- fault-free --------------------------------------------------------------

@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("app", APPS_UNDER_TEST.values(), ids=list(APPS_UNDER_TEST))
def test_fault_free_matches_baseline(runs, clean, app, ranks):
    res = runs(f"{app.name}-{ranks}-faultfree", protected(app, ranks))
    s = ok(res)
    assert s["fingerprint"] == clean(app, ranks)
    assert s["resilience"] is True
    assert s["segments"] == -(-STEPS // K)
    assert s["rollbacks"] == [] and s["reexecuted_rank_steps"] == 0
    assert s["injected_faults"] == 0 and s["escaped_faults"] == 0


def test_stencil_fingerprint_does_not_depend_on_rank_count(clean):
    assert clean(STENCIL, 4) == clean(STENCIL, 6)


# -- the schedules of the issue, on 4 and 6 ranks, both apps ------------------

def _schedules(app: App, ranks: int) -> dict[str, list[tuple[int, int, str]]]:
    """Schedule name -> [(rank, step, spec)]; every flip here must be detected."""
    last = ranks - 1  # a corner of the 2x2 and 3x2 process grids; a ring end
    hi = "bit=62"
    sign = f"array={app.array},index={app.interior},bit=63"
    raw = {
        "corner_rank": [(last, 13, hi)],
        "rank0": [(0, 5, hi)],
        # rank 1 early, another rank at the segment's last step (sign flip,
        # caught by the segment-end check before it can be averaged away).
        "two_ranks_same_segment": [(1, 12, hi), (ranks - 2, 19, sign)],
        # the last step of one segment and the first of the next
        "consecutive_segments": [(2, 9, hi), (3, 10, hi)],
        "last_step_of_run": [(1, STEPS - 1, hi)],
    }
    return {name: [(r, s, f"bitflip:rank={r},step={s},{extra}") for r, s, extra in fl]
            for name, fl in raw.items()}


SCHEDULES = list(_schedules(STENCIL, 4))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("app", APPS_UNDER_TEST.values(), ids=list(APPS_UNDER_TEST))
def test_schedule_is_exact(runs, clean, app, ranks, schedule):
    plan = _schedules(app, ranks)[schedule]
    res = runs(f"{app.name}-{ranks}-{schedule}",
               protected(app, ranks, *flips(*(spec for _, _, spec in plan))))
    s = ok(res)
    assert s["fingerprint"] == clean(app, ranks), \
        f"{schedule}: recovered state differs from the fault-free run\n{s['rollbacks']}"
    assert s["injected_faults"] == len(plan)
    assert s["escaped_faults"] == 0
    # One recovery per corrupted segment, and each flipped rank re-executed it.
    by_segment = {rb["step"]: rb for rb in s["rollbacks"]}
    assert set(by_segment) == {segment_of(step) for _, step, _ in plan}
    for rank, step, _ in plan:
        rb = by_segment[segment_of(step)]
        assert rank in rb["reexecuted_ranks"], rb
        assert rb["rounds"] >= 1
    assert s["reexecuted_rank_steps"] == sum(rb["reexecuted_rank_steps"] for rb in s["rollbacks"])
    assert s["segments"] == -(-STEPS // K)
    # The injector's ground truth: one original-run flip per spec, none replayed.
    injected = res.events("inject")
    assert sorted((e["rank"], e["step"]) for e in injected) == sorted((r, st) for r, st, _ in plan)
    assert not any(e["replay"] for e in injected)


# -- who re-executes: per-step versus end-of-segment detection -------------------

FLIP_EARLY = "bitflip:rank=2,step=2,array={array},index={index},bit=62"


@pytest.mark.parametrize("ranks", RANKS)
def test_per_step_detection_reexecutes_only_the_flipped_rank(runs, clean, ranks):
    app = STENCIL
    spec = FLIP_EARLY.format(array=app.array, index=app.interior)
    res = runs(f"perstep-{ranks}",
               protected(app, ranks, "--detect-every", "1", *flips(spec), k=STEPS))
    s = ok(res)
    assert s["fingerprint"] == clean(app, ranks)
    assert s["escaped_faults"] == 0 and s["injected_faults"] == 1
    [rb] = s["rollbacks"]
    assert rb["detected_on"] == [2]
    assert rb["reexecuted_ranks"] == [2]
    # Caught right after step 2: rank 2 alone redid steps 0, 1, 2.
    assert rb["reexecuted_rank_steps"] == 3
    # The events agree: only rank 2 caught up, nobody ran a rollback round,
    # and every rank logged the same recovery.
    assert {e["rank"] for e in res.events("catch_up")} == {2}
    assert all(set(e["S"]) <= {2} for e in res.events("rollback_round"))
    assert {e["rank"] for e in res.events("detection")} == {2}
    assert len(res.events("rollback")) == ranks
    assert all(e["reexecuted_ranks"] == [2] for e in res.events("rollback"))


@pytest.mark.parametrize("ranks", RANKS)
def test_late_detection_grows_S_and_stays_exact(runs, clean, ranks):
    """The same flip, checked only at the end of a 28-step segment, has spread."""
    app = STENCIL
    spec = FLIP_EARLY.format(array=app.array, index=app.interior)
    res = runs(f"latedetect-{ranks}", protected(app, ranks, *flips(spec), k=STEPS))
    s = ok(res)
    assert s["fingerprint"] == clean(app, ranks)
    assert s["escaped_faults"] == 0
    [rb] = s["rollbacks"]
    assert 2 in rb["reexecuted_ranks"]
    assert len(rb["reexecuted_ranks"]) > 1, rb
    assert rb["reexecuted_rank_steps"] >= len(rb["reexecuted_ranks"]) * STEPS


def test_catch_up_time_is_reported(runs, clean):
    """A per-step catch-up takes time; the summary must not report it as 0 s."""
    spec = FLIP_EARLY.format(array=STENCIL.array, index=STENCIL.interior)
    res = runs("perstep-4", protected(STENCIL, 4, "--detect-every", "1", *flips(spec), k=STEPS))
    [rb] = ok(res)["rollbacks"]
    assert rb["reexecuted_rank_steps"] == 3
    assert rb["seconds"] > 0, (
        "rollback of a per-step catch-up reports seconds == 0.0: runtime.py _segment "
        "records lone catch-ups with seconds=0.0 instead of the measured catch-up time")


def test_detected_on_lists_every_detecting_rank(runs, clean):
    """Rank 1 detects at a per-step check, rank 3 at the segment's end: both detected."""
    a = f"bitflip:rank=1,step=12,array=u,index={STENCIL.interior},bit=62"
    b = f"bitflip:rank=3,step=19,array=u,index={STENCIL.interior},bit=62"
    res = runs("stencil-4-perstep-and-end",
               protected(STENCIL, 4, "--detect-every", "1", *flips(a, b)))
    s = ok(res)
    assert s["fingerprint"] == clean(STENCIL, 4)
    [rb] = s["rollbacks"]
    assert rb["reexecuted_ranks"] == [1, 3]
    assert {e["rank"] for e in res.events("detection")} == {1, 3}
    assert rb["detected_on"] == [1, 3], (
        "runtime.py _segment builds detected_on from the segment-end reports only; a rank "
        "that detected at a per-step check and caught up alone is left out")


# -- the ring app: corruption through the collective -----------------------------

LINE = App("line", TEST_APPS / "line_exchange.py", ("--steps", "24"), "x", 7)


def test_lone_catch_up_finds_a_receiver_it_reached_silently(runs, clean):
    """Rank 2's flip (0.46 -> 1.86) is checked only after step 4; at step 4 it
    already sent the bad value to rank 3, whose update keeps it in bounds, so
    rank 3 never detects anything. Rank 2 catches up alone; at the segment's
    end rank 3 hands back the original of what rank 2 re-sent, they differ,
    and rank 3 re-executes too: exact, though only rank 2 detected."""
    spec = "bitflip:rank=2,step=3,array=x,index=7,bit=53"
    res = runs("line-lone-reached",
               LINE.argv(4, [*DETECT, "--segment-steps", "24", "--detect-every", "5", "--inject", spec]))
    s = ok(res)
    assert s["fingerprint"] == clean(LINE, 4)
    assert s["escaped_faults"] == 0 and s["injected_faults"] == 1
    assert {e["rank"] for e in res.events("detection")} == {2}
    assert {e["rank"] for e in res.events("catch_up")} == {2}
    [verified] = res.events("catch_up_verified")
    assert verified["rank"] == 2 and verified["contaminated"] == [3]
    [rb] = s["rollbacks"]
    assert rb["detected_on"] == [2]
    assert rb["reexecuted_ranks"] == [2, 3]


@pytest.mark.parametrize("ranks", RANKS)
def test_ring_corruption_through_collective_makes_S_all_ranks(runs, clean, ranks):
    """Flip at the second-last step: the last step's Allreduce carries it.

    The ring app's limiter keeps the other ranks' values in bounds, so only
    the flipped rank (and perhaps its random partner) detects anything; the
    contribution digest must still pull every rank into S.
    """
    spec = f"bitflip:rank=2,step={K - 2},array=x,index={RING.interior},bit=62"
    res = runs(f"ring-{ranks}-collective", protected(RING, ranks, *flips(spec)))
    s = ok(res)
    assert s["fingerprint"] == clean(RING, ranks)
    [rb] = s["rollbacks"]
    assert rb["step"] == 0
    assert 2 in rb["detected_on"] and len(rb["detected_on"]) < ranks, rb
    assert rb["reexecuted_ranks"] == list(range(ranks))
    assert rb["rounds"] >= 2
    rounds = [e for e in res.events("rollback_round") if e["rank"] == 0]
    assert rounds[0]["S"] != list(range(ranks)) and rounds[0]["grown"], rounds
    assert rounds[-1]["S"] == list(range(ranks))


def test_ring_per_step_detection_stays_local(runs, clean):
    """Caught before the next collective, the flip never leaves its rank."""
    spec = f"bitflip:rank=2,step=3,array=x,index={RING.interior},bit=62"
    res = runs("ring-4-perstep", protected(RING, 4, "--detect-every", "1", *flips(spec)))
    s = ok(res)
    assert s["fingerprint"] == clean(RING, 4)
    [rb] = s["rollbacks"]
    assert rb["reexecuted_ranks"] == [2]
    assert rb["reexecuted_rank_steps"] == 4
    assert {e["rank"] for e in res.events("catch_up")} == {2}


def test_global_rollback_reexecutes_everyone(runs, clean):
    spec = f"bitflip:rank=3,step=13,array=u,index={STENCIL.interior},bit=62"
    res = runs("stencil-4-global", protected(STENCIL, 4, "--rollback", "global", *flips(spec)))
    s = ok(res)
    assert s["fingerprint"] == clean(STENCIL, 4)
    [rb] = s["rollbacks"]
    assert rb["reexecuted_ranks"] == [0, 1, 2, 3]
    assert rb["reexecuted_rank_steps"] == 4 * K


def test_global_rollback_with_per_step_detection_reexecutes_everyone(runs, clean):
    """``--rollback global`` is the comparison mode: every rank redoes the segment."""
    spec = f"bitflip:rank=3,step=13,array=u,index={STENCIL.interior},bit=62"
    res = runs("stencil-4-global-perstep",
               protected(STENCIL, 4, "--rollback", "global", "--detect-every", "1", *flips(spec)))
    s = ok(res)
    assert s["fingerprint"] == clean(STENCIL, 4)
    [rb] = s["rollbacks"]
    assert rb["reexecuted_ranks"] == [0, 1, 2, 3], (
        "with --detect-every the detecting rank catches up alone (runtime.py _segment -> "
        "_catch_up) whatever --rollback says, so global mode re-executes one rank")


# -- faults local rollback cannot cure, and calls it cannot log -------------------

@pytest.mark.parametrize("every", [0, 1])
def test_persistent_fault_ends_with_clear_error(ulfmpy_run, every):
    spec = f"bitflip:rank=1,step=4,array=u,index={STENCIL.interior},bit=62,persistent=1"
    res = ulfmpy_run(protected(STENCIL, 4, "--max-retries", "2", "--detect-every", str(every),
                               *flips(spec)), timeout=TIMEOUT)
    assert res.returncode != 0, str(res)
    assert "RetriesExhausted" in res.stderr, str(res)
    assert "persistent fault" in res.stderr and "re-executions" in res.stderr, str(res)
    assert "--max-retries" in res.stderr, str(res)  # says what to do about it
    assert not (res.run_dir / "summary.json").exists()
    assert {e["rank"] for e in res.events("retries_exhausted")} == {0, 1, 2, 3}
    # The fault really was re-injected in the re-executions.
    assert any(e["replay"] for e in res.events("inject"))


UNSUPPORTED = TEST_APPS / "unsupported.py"


@pytest.mark.parametrize("call,only_rank", [("Alltoallw", None), ("Alltoallw", 1)],
                         ids=["Alltoallw-all-ranks", "Alltoallw-rank1-only"])
def test_unsupported_call_in_segment_is_a_clear_error(ulfmpy_run, call, only_rank):
    extra = ["--only-rank", str(only_rank)] if only_rank is not None else []
    res = ulfmpy_run(["-n", "4", "--", str(UNSUPPORTED), "--call", call, "--at-step", "3",
                      *extra], timeout=TIMEOUT)
    assert res.returncode != 0, str(res)
    assert "UnsupportedCall" in res.stderr, str(res)
    assert f"Comm.{call} cannot be logged" in res.stderr, str(res)
    assert not (res.run_dir / "summary.json").exists()


def test_unsupported_call_outside_the_loop_passes_through(ulfmpy_run):
    res = ulfmpy_run(["-n", "4", "--", str(UNSUPPORTED), "--call", "gather", "--before-loop"],
                     timeout=TIMEOUT)
    assert res.returncode == 0, str(res)
    assert res.summary["segments"] > 0


# -- escapes are reported -------------------------------------------------------------

def test_low_mantissa_flip_is_reported_as_escaped(runs, clean):
    spec = f"bitflip:rank=1,step=12,array=u,index={STENCIL.interior},bit=30"
    res = runs("stencil-4-escape", protected(STENCIL, 4, *flips(spec)))
    s = ok(res)
    assert s["injected_faults"] == 1
    assert s["escaped_faults"] == 1
    assert s["rollbacks"] == []
    assert [e["rank"] for e in res.events("escaped")] == [1]
    # The escape is real: the answer is wrong, and the summary says so.
    assert s["fingerprint"] != clean(STENCIL, 4)


def test_low_flip_cured_when_its_rank_reexecutes(runs, clean):
    """A low flip on a rank that re-executes anyway (it also has a detected flip) is cured."""
    lo = f"bitflip:rank=1,step=11,array=u,index={STENCIL.interior},bit=30"
    hi = f"bitflip:rank=1,step=15,array=u,index={STENCIL.interior + 1},bit=62"
    res = runs("stencil-4-lo-hi", protected(STENCIL, 4, *flips(lo, hi)))
    s = ok(res)
    assert s["injected_faults"] == 2
    assert s["escaped_faults"] == 0
    assert s["fingerprint"] == clean(STENCIL, 4)


# -- the launcher and app flags ---------------------------------------------------------

def test_app_flag_that_abbreviates_a_launcher_flag(tmp_path):
    """``ulfmpy run -n 2 ring.py --n 96`` must hand ``--n 96`` to the app.

    argparse's prefix matching (allow_abbrev) makes the launcher reject it as
    an ambiguous abbreviation of --np/--no-ft/--node-mtbf/... before
    REMAINDER can collect it.
    """
    res = run_ulfmpy(["-n", "2", "--dry-run", str(RING.path), "--n", "96"], tmp_path / "dry",
                     timeout=60)
    assert res.returncode == 0, str(res)
    assert "--n 96" in res.stdout


# -- the default segment length: an overhead budget (--segment-steps auto) ----------------

AUTO_STEPS = 240
AUTO_ARGS = ("--nx", "48", "--ny", "40", "--steps", str(AUTO_STEPS), "--quiet")


def test_auto_segment_length_grows_to_the_budget_and_stays_exact(runs):
    """No --segment-steps: short segments first, then the length the budget allows.

    On this tiny grid a boundary (snapshot, detectors, agreement) costs far
    more than 1 % of a step, so the policy must lengthen the segments; a flip
    after the switch is still repaired exactly.
    """
    base = runs("auto-baseline", STENCIL.argv(4, ["--no-resilience"], AUTO_ARGS))
    assert base.returncode == 0, str(base)
    spec = f"bitflip:rank=1,step=200,array=u,index={STENCIL.interior},bit=62"
    res = runs("auto-flip", STENCIL.argv(4, [*DETECT, *flips(spec)], AUTO_ARGS))
    s = ok(res)
    assert s["segment_steps"] == 0  # auto
    assert s["fingerprint"] == base.summary["fingerprint"]
    assert s["injected_faults"] == 1 and s["escaped_faults"] == 0 and len(s["rollbacks"]) == 1
    [start] = [e for e in res.events("segments") if e["rank"] == 0]
    assert start["auto"] is True and start["k"] == 10
    decisions = [e for e in res.events("segment_decision") if e["rank"] == 0]
    assert decisions, "the budget policy never proposed a length"
    first = decisions[0]
    assert first["policy"] == "budget" and first["old"] == 10 and first["steps"] > 10
    assert first["overhead"] <= first["budget"] * 1.0001 or first["steps"] >= 1000
    # Every rank switched at the same boundary, to rank 0's proposal.
    switches = res.events("segment_length")
    assert {e["rank"] for e in switches} == set(range(4))
    assert len({(e["at_step"], e["new"]) for e in switches}) == len(decisions)
    assert s["segment_length"] == decisions[-1]["steps"]
    # Segment commits follow the lengths: 10-step segments before the switch, longer after.
    commits = sorted({(e["step"], e["end"]) for e in res.events("segment") if e["rank"] == 0})
    assert commits[0] == (0, 10)
    assert any(end - step > 10 for step, end in commits)
