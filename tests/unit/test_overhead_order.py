"""The order scripts/overhead_job.py runs its cases in, round after round."""

from __future__ import annotations

from collections import Counter

import pytest


@pytest.fixture(scope="module")
def round_order(load_script):
    return load_script("overhead_job").round_order


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_every_case_takes_every_place_equally_often(round_order, n):
    cases = ["baseline", *(f"k={i}" for i in range(n - 1))]
    places = Counter()
    for rnd in range(2 * n):
        order = round_order(cases, rnd)
        assert sorted(order) == sorted(cases)
        places.update((case, i) for i, case in enumerate(order))
    assert set(places.values()) == {2}


def test_two_cases_alternate_who_goes_first(round_order):
    # The default-only jobs: baseline and the default length, 8 rounds.
    firsts = [round_order(["baseline", "k=0"], rnd)[0] for rnd in range(8)]
    assert firsts.count("baseline") == 4


def test_the_warm_up_round_is_a_valid_order(round_order):
    assert sorted(round_order(["a", "b", "c"], -1)) == ["a", "b", "c"]
