"""Course-style mpi4py programs, protected with five changed lines, give the
plain program's result under flips and kills (apps/tutorials).

- heat2d: Create_cart/Shift, subarray datatypes for rows and columns,
  Isend/Irecv with default tags, MPI.Request.Waitall, a buffer swap;
- life: Sendrecv on a 1D split, an object allreduce every step;
- particles: Alltoall + Alltoallv migration and Reduce, per-rank arrays.

Each run's own printed checksum is compared with the plain program's, run
with ``ulfmpy run`` and no ulfmpy in it.
"""

from __future__ import annotations

import re

import pytest
from conftest import APPS, TEST_APPS, require_ulfm, run_ulfmpy

pytestmark = [pytest.mark.scenario]

STEPS = ["--steps", "100"]


def checksum(res) -> str:
    found = re.findall(r"^checksum (\S+)", res.stdout, re.M)
    assert len(found) == 1, res  # printed once, by rank 0 (never by a spare)
    return found[0]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = {}
    for name in ("heat2d", "life", "particles"):
        res = run_ulfmpy(["-n", "4", str(APPS / "tutorials" / f"{name}_plain.py"), *STEPS],
                         tmp_path_factory.mktemp(f"{name}-plain"))
        assert res.returncode == 0, res
        out[name] = checksum(res)
    return out


CASES = [
    # at the defaults: a flip found at the end of its segment (the automatic length)
    # with a spare that is never needed: it must end inside rt.loop, not run
    # the code after it (heat2d.py reports after the with block)
    ("heat2d", ["--spares", "1", "--bounds", "u=0:1", "--inject", "bitflip:rank=2,step=40,bit=62"]),
    ("heat2d", ["--spares", "1", "--detect-every", "1", "--bounds", "u=0:1",
                "--inject", "bitflip:rank=1,step=30,bit=62", "--inject", "kill:rank=2,step=60"]),
    ("heat2d", ["--recovery", "shrink", "--ckpt-every", "20", "--inject", "kill:rank=3,step=60"]),
    ("life", ["--recovery", "respawn", "--detect-every", "1", "--bounds", "board=0:1",
              "--inject", "bitflip:rank=1,step=30,bit=1", "--inject", "kill:rank=2,step=60"]),
    ("life", ["--recovery", "shrink", "--ckpt-every", "20", "--inject", "kill:rank=0,step=55"]),
    ("particles", ["--spares", "1", "--detect-every", "1", "--bounds", "x=0:1",
                   "--inject", "bitflip:rank=1,step=30,array=x,index=3,bit=62",
                   "--inject", "kill:rank=3,step=60"]),
]


@pytest.mark.parametrize("name,args", CASES,
                         ids=["heat2d-defaults", "heat2d-spare", "heat2d-shrink",
                              "life-respawn", "life-shrink", "particles-spare"])
def test_protected_port_is_exact(tmp_path, plain, name, args):
    require_ulfm()
    res = run_ulfmpy(["-n", "4", *args, str(APPS / "tutorials" / f"{name}.py"), *STEPS],
                     tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert checksum(res) == plain[name]
    kills, flips = (sum(a.startswith(k) for a in args) for k in ("kill", "bitflip"))
    assert s["escaped_faults"] == 0 and len(s["recoveries"]) == kills, s
    assert len(res.events("detection")) >= flips, s  # each flip was found


def test_the_port_runs_as_plain_mpi4py_with_no_resilience(tmp_path, plain):
    """--no-resilience: rt.comm is mpi4py's communicator, Create_cart is MPI's own."""
    res = run_ulfmpy(["-n", "4", "--no-resilience", str(APPS / "tutorials" / "heat2d.py"), *STEPS],
                     tmp_path / "run")
    assert res.returncode == 0, res
    assert checksum(res) == plain["heat2d"]


def test_set_up_code_on_comm_world_is_protected(tmp_path, plain):
    """Inside the with block MPI.COMM_WORLD is rt.comm: a factory that builds
    on it (not on its argument) gets a protected Cartesian communicator."""
    require_ulfm()
    res = run_ulfmpy(["-n", "4", "--spares", "1", "--inject", "kill:rank=1,step=60",
                      str(TEST_APPS / "world_setup.py"), *STEPS], tmp_path / "run")
    assert res.returncode == 0, res
    assert checksum(res) == plain["heat2d"]
    assert len(res.summary["recoveries"]) == 1


INLINE = str(APPS / "tutorials" / "heat2d_inline.py")


@pytest.mark.parametrize("args", [
    ["--bounds", "u=0:1", "--inject", "bitflip:rank=2,step=40,bit=62"],
    ["--detect-every", "1", "--bounds", "u=0:1", "--inject", "bitflip:rank=1,step=30,bit=62"],
], ids=["flip-defaults", "flip-per-step"])
def test_the_inline_loop_is_exact_under_flips(tmp_path, plain, args):
    """ulfmpy.range: the Cartesian grid the set-up code makes on COMM_WORLD
    inside the with block is protected, and rollbacks restore what the
    state callable names (a swapped buffer)."""
    require_ulfm()
    res = run_ulfmpy(["-n", "4", *args, INLINE, *STEPS], tmp_path / "run")
    assert res.returncode == 0, res
    assert checksum(res) == plain["heat2d"]
    assert res.summary["escaped_faults"] == 0 and res.events("detection"), res.summary


def test_the_inline_loop_recovers_a_kill_by_relaunch(tmp_path, plain):
    require_ulfm()
    res = run_ulfmpy(["-n", "4", "--max-restarts", "1", "--ckpt-every", "20",
                      "--inject", "kill:rank=1,step=60", INLINE, *STEPS], tmp_path / "run")
    assert res.returncode == 0, res
    assert "relaunch 1/1" in res.stderr
    assert checksum(res) == plain["heat2d"]
    start = res.summary["start_step"]
    assert 0 < start <= 60 and start % 20 == 0, start  # resumed from a checkpoint


def test_the_inline_loop_refuses_spares_with_a_message(tmp_path):
    require_ulfm()
    res = run_ulfmpy(["-n", "4", "--spares", "1", INLINE, *STEPS], tmp_path / "run")
    assert res.returncode == 76, res
    assert "cannot use --spares" in res.stderr, res
