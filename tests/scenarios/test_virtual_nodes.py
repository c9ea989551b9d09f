"""``--virtual-nodes K``: node-level faults on one machine (docs/architecture.md, "Nodes on one machine")."""

from __future__ import annotations

import pytest

from conftest import APPS, reference_fingerprint, run_ulfmpy

STENCIL = [str(APPS / "stencil.py"), "--nx", "240", "--ny", "200", "--steps", "120"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_fingerprint(STENCIL, tmp_path_factory)


def _hosts(res) -> dict[int, str]:
    return {e["rank"]: e["host"] for e in res.events("start")}


@pytest.mark.parametrize("ckpt", [["--ckpt-every", "20"], []], ids=["ckpt20", "default"])
def test_a_node_kill_takes_every_rank_of_the_node_and_spares_replace_them(tmp_path, reference,
                                                                          ckpt):
    res = run_ulfmpy(["-n", "4", "--spares", "2", "--virtual-nodes", "3", *ckpt,
                      "--inject", "kill:node=node1,step=50", *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    assert _hosts(res) == {0: "node0", 1: "node0", 2: "node1", 3: "node1", 4: "node2",
                           5: "node2"}
    # Spares per node: the last process of node2 and of node1 wait.
    assert _spares(res) == {3: 0, 5: 1}
    s = res.summary
    assert s["fingerprint"] == reference
    # node1 holds logical rank 2 and a waiting spare: both die with it, and
    # the spare on node2 takes rank 2's place.
    assert s["failures"] == 2 and s["injected_faults"] == 2
    [rec] = s["recoveries"]
    assert rec["policy"] == "spares" and rec["failed_ranks"] == [2]
    assert rec["replaced"] == {"2": 5} and rec["nodes"] == {"2": "node2"}
    assert sorted(e["rank"] for e in res.events("inject")) == [2, 3]


def _spares(res) -> dict[int, int]:
    return {e["rank"]: e["spare_slot"] for e in res.events("start")
            if e.get("spare_slot") is not None}


@pytest.mark.parametrize("ckpt", [["--ckpt-every", "20"], []], ids=["ckpt20", "default"])
def test_a_dead_rank_takes_the_spare_on_its_own_node(tmp_path, reference, ckpt):
    # 4 ranks + 2 spares on 2 nodes: node0 = world 0,1,2 and node1 = 3,4,5;
    # world 2 and 5 wait. Logical rank 2 (world 3, node1) dies first: the
    # node1 spare takes it; then logical 0 (node0): the node0 spare does.
    res = run_ulfmpy(["-n", "4", "--spares", "2", "--virtual-nodes", "2", *ckpt,
                      "--inject", "kill:rank=2,step=40", "--inject", "kill:rank=0,step=80",
                      *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    assert _spares(res) == {2: 0, 5: 1}
    s = res.summary
    assert s["fingerprint"] == reference and s["failures"] == 2
    assert [(r["failed_ranks"], r["replaced"], r["nodes"]) for r in s["recoveries"]] == [
        ([2], {"2": 5}, {"2": "node1"}), ([0], {"0": 2}, {"0": "node0"})]


def test_a_node_kill_with_respawn_uses_a_zygote_per_node_and_strikes_once(tmp_path, reference):
    res = run_ulfmpy(["-n", "4", "--virtual-nodes", "2", "--recovery", "respawn",
                      "--ckpt-every", "20", "--inject", "kill:node=node1,step=50", *STENCIL],
                     tmp_path / "run")
    assert res.returncode == 0, res
    assert sorted(p.name for p in res.run_dir.glob("zygote-*.log")) == \
        ["zygote-node0.log", "zygote-node1.log"]
    s = res.summary
    assert s["fingerprint"] == reference
    # The replacements live on node1 again, and the node kill does not strike them.
    assert s["failures"] == 2 and [r["policy"] for r in s["recoveries"]] == ["respawn"]
    replacements = {e["rank"]: e["host"] for e in res.events("start") if e["rank"] >= 100_000}
    assert sorted(replacements.values()) == ["node1", "node1"]


@pytest.mark.parametrize("args, says", [
    (["--virtual-nodes", "2", "--inject", "kill:node=node7,step=5"], "no node 'node7'"),
    (["--virtual-nodes", "9"], "more nodes than the 4 processes"),
])
def test_bad_virtual_node_settings_are_refused_before_mpirun(tmp_path, args, says):
    res = run_ulfmpy(["-n", "4", *args, *STENCIL], tmp_path / "run", timeout=60)
    assert res.returncode == 2 and says in res.stderr, res


def test_a_replacement_of_a_pair_dies_and_the_next_respawn_still_joins(tmp_path, reference):
    """A node kill takes two ranks at once and a respawn replaces both; then one
    of the pair dies, and then another rank. Open MPI 5.0 cannot spawn again
    once one process of a multi-process spawned job died while another lives
    (docs/internals.md, "Open MPI traps"): each replacement is spawned alone,
    so the third repair is in-job like the first two."""
    res = run_ulfmpy(["-n", "4", "--virtual-nodes", "2", "--recovery", "respawn",
                      "--ckpt-every", "20", "--inject", "kill:node=node1,step=50",
                      "--inject", "kill:rank=2,step=70", "--inject", "kill:rank=0,step=90",
                      *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert s["fingerprint"] == reference
    recs = s["recoveries"]
    assert [r["policy"] for r in recs] == ["respawn"] * 3, recs
    assert [sorted(r["failed_ranks"]) for r in recs] == [[2, 3], [2], [0]], recs
    # The pair was one repair; the rank-2 kill struck one of its two replacements.
    pair = set(recs[0]["replaced"].values())
    assert len(pair) == 2
    killed = [e["rank"] for e in res.events("inject") if e.get("kind") == "kill"]
    assert pair & set(killed) and len(pair - set(killed)) == 1, (pair, killed)
    assert not res.events("repair_stuck")
