"""The segment benchmark still runs end to end and measures consistently.

A smoke run (``--quick``, small grid, few rounds): it asserts what the
figures are made of — the same fingerprint in every trial, every case
present, the overhead's parts adding up, the checkpointing case's figures
finite, every flip corrected — never a timing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_segments_quick_with_parts(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "bench_segments.py"), "--quick", "--parts",
           "--parts-rounds", "2", "--also-ranks", "", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(tmp_path), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and every mpirun it started
        out, err = proc.communicate()
        raise AssertionError(f"bench_segments --quick hung\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    res = json.loads((tmp_path / "out" / "bench_segments.json").read_text())
    assert (tmp_path / "out" / "bench_segments.png").stat().st_size > 0

    ov = res["overhead"]
    assert ov["fingerprints_identical"]
    assert [r["segment_steps"] for r in ov["rows"]] == [1, 5, 10, 50, "auto"]
    for r in ov["rows"]:
        lo, hi = r["overhead_pct_ci95"]
        assert lo <= r["overhead_pct"] <= hi

    pa = res["overhead_parts"]
    assert pa["fingerprints_identical"]  # the raw and nolog variants compute the same field
    modes = {t["mode"] for t in pa["trials"]}
    assert modes == {"baseline", "k=0", "k=0:nolog", "k=0:raw"}
    p = pa["parts"]
    assert abs(p["boundaries"]["mean_pts"] + p["communicator"]["mean_pts"]
               + p["logging"]["mean_pts"] - p["total"]["mean_pts"]) < 1e-9

    oc = res["overhead_ckpt"]  # the default length with checkpoints; --quick: every 10 steps
    assert oc["fingerprints_identical"]
    assert oc["rounds"] >= 1 and oc["ckpt_every"] >= 1
    for name in ("excl_saves", "incl_saves"):
        v, (lo, hi) = oc[f"overhead_{name}_pct"], oc[f"overhead_{name}_pct_ci95"]
        assert all(math.isfinite(x) for x in (v, lo, hi)) and lo <= v <= hi
    assert math.isfinite(oc["saves_s_median"]) and oc["saves_s_median"] >= 0
    # Checkpoints landed (where exactly is recorded, not asserted).
    assert len(oc["checkpoint_steps_per_run"]) == oc["rounds"]
    assert all(n >= 1 for n in oc["checkpoints_per_run"])

    flips = res["one_flip"]["rows"]
    assert flips and all(r["exact"] for r in flips)
    local = [r for r in flips if r["mode"].startswith("local")]
    assert all(r["reexecuted_rank_steps"] < r2["reexecuted_rank_steps"]
               for r in local for r2 in flips if r2["mode"].startswith("global"))
