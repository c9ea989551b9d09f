"""An app that swaps its two buffers every step stays exact under flips and kills.

The runtime used to read ``app.state`` once and snapshot and restore the
arrays it first saw; after a swap those were the other buffer, and a killed
rank's run ended with exit 0 and a wrong fingerprint. The state is now read
by name at every boundary (``identity.sync_state``).
"""

from __future__ import annotations

import pytest
from conftest import TEST_APPS, reference_fingerprint, require_ulfm, run_ulfmpy

pytestmark = [pytest.mark.scenario]

APP = [str(TEST_APPS / "swap_heat.py"), "--steps", "200"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_fingerprint(APP, tmp_path_factory)


@pytest.mark.parametrize("args", [
    ["--detect", "finite,bounds", "--inject", "bitflip:rank=1,step=57,bit=62"],
    ["--detect", "finite,bounds", "--detect-every", "1", "--inject",
     "bitflip:rank=1,step=57,bit=62"],
    ["--spares", "1", "--ckpt-every", "50", "--inject", "kill:rank=2,step=120"],
    ["--recovery", "respawn", "--inject", "kill:rank=2,step=121"],
    ["--recovery", "shrink", "--ckpt-every", "50", "--inject", "kill:rank=1,step=133"],
], ids=["flip", "flip-per-step", "kill-spare", "kill-respawn-default", "kill-shrink"])
def test_swapping_app_is_exact(tmp_path, reference, args):
    require_ulfm()
    res = run_ulfmpy(["-n", "4", *args, *APP], tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert s["fingerprint"] == reference, s
    assert s["escaped_faults"] == 0 and (s["rollbacks"] or s["recoveries"])


def test_a_state_that_changes_dtype_is_named(tmp_path):
    require_ulfm()
    res = run_ulfmpy(["-n", "2", *APP, "--grow-at", "30"], tmp_path / "run")
    assert res.returncode == 76, res
    # one rank's traceback, ending in the message, and the launcher's line naming it
    assert res.stderr.count("Traceback") == 1, res.stderr
    assert "ulfmpy.errors.ConfigError: app.state['u'] changed from float64[48, 64] to " \
        "float32[48, 64]; a swapped array must have the same shape and dtype" in res.stderr
    assert "exit status 76" in res.stderr
