"""The statistics scripts/bench_segments.py reports for its overhead figures."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_segments")


@pytest.fixture(scope="module")
def median_ci(bench):
    return bench.median_ci


def test_interval_holds_the_pooled_median(median_ci):
    rng = np.random.default_rng(1)
    groups = [list(1.02 + 0.01 * rng.standard_normal(8)) for _ in range(5)]
    lo, hi = median_ci(groups)
    assert lo < float(np.median(np.concatenate(groups))) < hi


def test_no_spread_no_width(median_ci):
    assert median_ci([[1.5] * 4, [1.5] * 9]) == (1.5, 1.5)


def test_jobs_that_disagree_widen_the_interval(median_ci):
    # Same values: pooled as one job (rounds only) and as the jobs they came from.
    rng = np.random.default_rng(2)
    groups = [list(centre + 0.002 * rng.standard_normal(10)) for centre in (1.00, 1.02, 1.04, 1.06)]
    lo_jobs, hi_jobs = median_ci(groups)
    lo_rounds, hi_rounds = median_ci([sum(groups, [])])
    assert hi_jobs - lo_jobs > 1.5 * (hi_rounds - lo_rounds)


def test_more_rounds_narrow_it(median_ci):
    rng = np.random.default_rng(3)
    few = [list(1.02 + 0.02 * rng.standard_normal(3)) for _ in range(3)]
    many = [list(1.02 + 0.02 * rng.standard_normal(30)) for _ in range(30)]
    assert np.subtract(*median_ci(many)[::-1]) < np.subtract(*median_ci(few)[::-1])


def test_reproducible_and_rejects_nothing_to_pool(median_ci):
    groups = [[1.0, 1.1, 1.05], [1.2, 1.0]]
    assert median_ci(groups) == median_ci(groups)
    with pytest.raises(ValueError, match="non-empty"):
        median_ci([[], []])


def _round(job, rnd, base, raw, nolog, full):
    times = {"baseline": base, "k=0:raw": raw, "k=0:nolog": nolog, "k=0": full}
    return [{"job": job, "round": rnd, "mode": m, "loop_s": t} for m, t in times.items()]


def test_parts_are_paired_differences_that_add_up(bench):
    # Round-to-round drift (the baseline moves) must not leak into the parts.
    trials = (_round(0, 0, 1.00, 1.01, 1.03, 1.06) + _round(0, 1, 1.20, 1.212, 1.236, 1.272)
              + _round(1, 0, 0.90, 0.909, 0.927, 0.954))
    parts = bench.parts_table(trials)
    assert parts["boundaries"]["mean_pts"] == pytest.approx(1.0)
    assert parts["communicator"]["mean_pts"] == pytest.approx(2.0)
    assert parts["logging"]["mean_pts"] == pytest.approx(3.0)
    assert parts["total"]["mean_pts"] == pytest.approx(6.0)
    assert parts["logging"]["se_pts"] == pytest.approx(0.0, abs=1e-9)
    assert all(p["rounds"] == 3 for p in parts.values())


def test_parts_skip_incomplete_rounds_and_need_two(bench):
    trials = _round(0, 0, 1.0, 1.01, 1.02, 1.04) + _round(0, 1, 1.0, 1.02, 1.04, 1.08)
    trials.append({"job": 0, "round": 2, "mode": "baseline", "loop_s": 1.0})  # its job died
    parts = bench.parts_table(trials)
    assert parts["total"]["rounds"] == 2
    assert parts["total"]["mean_pts"] == pytest.approx(6.0)
    with pytest.raises(ValueError, match="2 complete rounds"):
        bench.parts_table(trials[:4])


def test_pooling_runs_keeps_every_job_and_round(bench):
    def run(*jobs):
        return {"overhead": {"rows": [
            {"segment_steps": 10, "ratios_by_job": [[9.0, 9.0]]},  # not the default: ignored
            {"segment_steps": "auto", "ratios_by_job": [list(j) for j in jobs]}]}}

    pooled = bench.pool_runs([run([1.01, 1.02], [1.03]), run([1.05, 1.04, 1.06])])
    assert (pooled["runs"], pooled["jobs"], pooled["rounds"]) == (2, 3, 6)
    assert pooled["overhead_pct"] == pytest.approx(3.5)  # median of the six rounds
    lo, hi = pooled["overhead_pct_ci95"]
    assert lo <= 3.5 <= hi


def _ckpt_round(job, rnd, base, loop, saves, steps=(100, 200)):
    return [{"job": job, "round": rnd, "mode": "baseline", "loop_s": base},
            {"job": job, "round": rnd, "mode": "k=0:ckpt100", "loop_s": loop, "saves_s": saves,
             "checkpoint_steps": list(steps), "segment_length_end": 25}]


def test_ckpt_overhead_subtracts_each_rounds_saves(bench):
    # Drift between rounds (the baseline moves) stays out: each round is its own ratio.
    trials = (_ckpt_round(0, 0, 1.00, 1.12, 0.10) + _ckpt_round(0, 1, 2.00, 2.24, 0.20)
              + _ckpt_round(1, 0, 0.50, 0.56, 0.05, steps=(100, 250)))
    t = bench.ckpt_table(trials, steps=300, ckpt_every=100)
    assert t["overhead_excl_saves_pct"] == pytest.approx(2.0)
    assert t["overhead_incl_saves_pct"] == pytest.approx(12.0)
    for name in ("excl_saves", "incl_saves"):
        lo, hi = t[f"overhead_{name}_pct_ci95"]
        assert lo <= t[f"overhead_{name}_pct"] <= hi
        assert len(t[f"overhead_{name}_pct_per_job"]) == 2
    assert t["ratios_excl_saves_by_job"] == [pytest.approx([1.02, 1.02]), pytest.approx([1.02])]
    assert (t["rounds"], t["jobs"]) == (3, 2)
    assert t["saves_pct_of_baseline_median"] == pytest.approx(10.0)
    # Recorded, not required: where the checkpoints landed.
    assert t["checkpoint_steps_expected"] == [100, 200]
    assert t["checkpoint_steps_per_run"] == [[100, 200], [100, 200], [100, 250]]
    assert t["checkpoints_per_run"] == [2, 2, 2]
    assert t["runs_on_multiples"] == 2


def test_ckpt_overhead_skips_unpaired_rounds_and_needs_one(bench):
    trials = _ckpt_round(0, 0, 1.0, 1.1, 0.05)
    trials.append({"job": 0, "round": 1, "mode": "k=0:ckpt100", "loop_s": 9.0, "saves_s": 0.0,
                   "checkpoint_steps": []})  # its baseline never ran
    t = bench.ckpt_table(trials, steps=200, ckpt_every=100)
    assert t["rounds"] == 1
    assert t["overhead_excl_saves_pct"] == pytest.approx(5.0)
    assert t["checkpoint_steps_expected"] == [100]
    with pytest.raises(ValueError, match="both trials"):
        bench.ckpt_table(trials[:1], steps=200, ckpt_every=100)


def test_checkpoint_times_sum_a_ranks_records(load_script):
    times = load_script("overhead_job").checkpoint_times
    recs = [{"step": 100, "exposed_s": 0.01, "write_s": 0.2, "bytes": 8, "committed": True},
            {"step": 200, "exposed_s": 0.03, "write_s": None, "bytes": 8, "committed": False}]
    got = times(recs)
    assert got["steps"] == [100, 200]
    assert got["committed"] == 1
    assert got["exposed_s"] == pytest.approx(0.04)
    assert got["write_s"] == pytest.approx(0.2)  # an unfinished write adds nothing
    assert times([]) == {"steps": [], "committed": 0, "exposed_s": 0.0, "write_s": 0.0}
