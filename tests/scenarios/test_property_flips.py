"""Property: under any bit-flip schedule the answer is exact or the escape is reported.

Hypothesis draws small schedules (rank, step, bit, maybe a cell) mixing bits
that ``bounds`` always catches (62: the top exponent bit; 63 on a nonzero
value: the sign), bits it may or may not catch (61, 55, 52: exponent bits)
and mantissa bits no detector sees (51 .. 0), plus the segment length and the
per-step detection interval. A run must then end with the fault-free
fingerprint, or report ``escaped_faults > 0`` — never a wrong answer with no
escape reported. Kept small (4 ranks, a 32x24 grid, 16 steps, a handful of
examples) so it fits in CI.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from conftest import APPS, run_ulfmpy

pytestmark = pytest.mark.scenario

RANKS = 4
STEPS = 16
GRID = ["--nx", "32", "--ny", "24"]          # 2x2 blocks of 16x12 = 192 cells
CELLS = 16 * 12
STENCIL = str(APPS / "stencil.py")
BITS = [62, 63, 61, 55, 52, 51, 40, 30, 3, 0]

_counter = itertools.count()


def _argv(settings_: list[str]) -> list[str]:
    return ["-n", str(RANKS), *settings_, "--", STENCIL, *GRID, "--steps", str(STEPS), "--quiet"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("property")


@pytest.fixture(scope="module")
def clean_fingerprint(root) -> str:
    """The ``--no-resilience`` fingerprint, computed once per module."""
    res = run_ulfmpy(_argv(["--no-resilience"]), root / "baseline", timeout=90)
    assert res.returncode == 0, str(res)
    return res.summary["fingerprint"]


flip = st.tuples(st.integers(0, RANKS - 1),                 # rank
                 st.integers(0, STEPS - 1),                 # step
                 st.sampled_from(BITS),                     # bit
                 st.one_of(st.none(), st.integers(0, CELLS - 1)))  # cell (None: drawn by the injector)
schedules = st.lists(flip, min_size=1, max_size=3,
                     unique_by=lambda f: (f[0], f[1]))      # two flips of one cell could cancel


@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(plan=schedules, k=st.sampled_from([4, 7]), every=st.sampled_from([0, 1, 3]))
@example(plan=[(1, 5, 62, None), (2, 6, 3, 40)], k=4, every=0)      # caught + escaped, one segment
@example(plan=[(0, 2, 62, 100), (1, 3, 52, 13)], k=7, every=3)      # contamination before a check
def test_exact_or_reported_escape(root, clean_fingerprint, plan, k, every):
    specs = []
    for rank, step, bit, cell in plan:
        where = "" if cell is None else f",array=u,index={cell}"
        specs += ["--inject", f"bitflip:rank={rank},step={step},bit={bit}{where}"]
    argv = _argv(["--detect", "finite,bounds", "--segment-steps", str(k),
                  "--detect-every", str(every), *specs])
    res = run_ulfmpy(argv, root / f"case{next(_counter)}", timeout=90)
    assert res.returncode == 0, str(res)
    s = res.summary
    note(f"plan={plan} k={k} every={every} rollbacks={s['rollbacks']} "
         f"injected={s['injected_faults']} escaped={s['escaped_faults']}")
    assert s["injected_faults"] == len(plan)
    assert s["escaped_faults"] <= s["injected_faults"]
    exact = s["fingerprint"] == clean_fingerprint
    assert exact or s["escaped_faults"] > 0, (
        f"wrong answer reported as correct: plan={plan} k={k} every={every}\n{s}")
    if all(bit == 62 for _, _, bit, _ in plan):
        # The top exponent bit always leaves [0, 1]: nothing may escape.
        assert s["escaped_faults"] == 0 and exact, s
