"""The interval scripts/bench_segments.py reports for its overhead figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "bench_segments.py"


@pytest.fixture(scope="module")
def median_ci():
    spec = importlib.util.spec_from_file_location("bench_segments", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.median_ci


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
