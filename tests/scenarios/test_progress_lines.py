"""Progress during a run: ``ulfmpy run`` prints a line every ``--progress-every``
while its stderr is not a terminal (the default ``--progress auto``), from
the file logical rank 0 keeps (``RUN_DIR/progress.json``)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import TEST_APPS, require_ulfm, run_ulfmpy

pytestmark = [pytest.mark.scenario]

LINE = re.compile(r"^ulfmpy: step (\d+)/(?:10|30) \(\d+ %\), [\d.]+ steps/s, ETA [\d:]+; segments \d+, "
                  r"rollbacks 0, checkpoints \d+, failures 0, recoveries 0$")
# 30 sleeping steps of 0.2 s: 6 s however fast the machine is
SLOW = [str(TEST_APPS / "slow_steps.py"), "--steps", "30", "--slow-from", "0", "--slow-s", "0.2"]
SHORT = [str(TEST_APPS / "slow_steps.py"), "--steps", "10", "--slow-from", "0", "--slow-s", "0.2"]


# Explicit lines on short segments (a boundary every 0.4 s, 2 s in all); the
# default at its own segment length (boundaries 2 s apart, 6 s in all).
@pytest.mark.parametrize("mode, app", [
    (["--progress", "lines", "--segment-steps", "2"], SHORT), ([], SLOW)], ids=["lines", "default"])
def test_progress_lines_while_the_run_goes(tmp_path, mode, app):
    require_ulfm()
    res = run_ulfmpy(["-n", "2", *mode, "--progress-every", "0.5s", *app], tmp_path / "run")
    assert res.returncode == 0, res
    lines = [x for x in res.stderr.splitlines() if x.startswith("ulfmpy: step ")]
    assert lines and all(LINE.match(x) for x in lines), res.stderr
    total = int(app[app.index("--steps") + 1])
    steps = [int(LINE.match(x).group(1)) for x in lines]
    assert steps == sorted(steps) and steps[-1] < total
    snap = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert snap["done"] and snap["step"] == snap["total"] == total


def test_progress_off_prints_nothing(tmp_path):
    require_ulfm()
    res = run_ulfmpy(["-n", "2", "--progress", "off", "--progress-every", "0.5s",
                      "--segment-steps", "2", *SHORT], tmp_path / "run")
    assert res.returncode == 0, res
    assert not [x for x in res.stderr.splitlines() if x.startswith("ulfmpy: step ")]
