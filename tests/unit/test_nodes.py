"""Virtual nodes (docs/architecture.md, "Nodes on one machine"): placement is pure and matches mpirun's slot filling."""

import pytest
from hypothesis import given, strategies as st

from ulfmpy.nodes import node_names, spare_ranks, virtual_node
from ulfmpy.recovery import Member, plan_repair
from ulfmpy.partner import holders


def test_blocks_fill_nodes_in_world_rank_order():
    # 4 ranks + 2 spares on 3 nodes: two processes each, spares on the last.
    assert [virtual_node(r, 6, 3) for r in range(6)] == \
        ["node0", "node0", "node1", "node1", "node2", "node2"]
    assert node_names(3) == ("node0", "node1", "node2")


@given(st.integers(1, 64), st.data())
def test_every_node_gets_processes_and_order_is_kept(total, data):
    k = data.draw(st.integers(1, total))
    nodes = [int(virtual_node(r, total, k)[4:]) for r in range(total)]
    assert sorted(set(nodes)) == list(range(k))  # no empty node
    assert nodes == sorted(nodes)                # contiguous blocks
    assert max(nodes.count(j) for j in range(k)) - min(nodes.count(j) for j in range(k)) <= 1


def test_bad_node_counts_are_refused():
    with pytest.raises(ValueError):
        virtual_node(0, 4, 5)
    with pytest.raises(ValueError):
        virtual_node(0, 4, 0)


def test_partner_copies_go_to_another_virtual_node():
    hosts = [virtual_node(r, 4, 2) for r in range(4)]
    for r in range(4):
        assert hosts[holders(hosts)[r]] != hosts[r]


# -- spares per node ------------------------------------------------------------------

def _nodes(total, k):
    return [virtual_node(r, total, k) for r in range(total)]


def test_spares_are_spread_over_the_nodes_last_processes_first():
    # 4 + 2 on 2 nodes: node0 = 0,1,2 and node1 = 3,4,5; one spare each.
    assert spare_ranks(_nodes(6, 2), 2) == (2, 5)
    # 4 + 2 on 3 nodes: the last two nodes give one each.
    assert spare_ranks(_nodes(6, 3), 2) == (3, 5)
    # One node (or one host): the last world ranks, as without nodes.
    assert spare_ranks(["h"] * 6, 2) == (4, 5)
    assert spare_ranks(_nodes(5, 2), 1) == (4,)
    assert spare_ranks(["h"] * 4, 0) == ()


@given(st.integers(1, 40), st.data())
def test_spares_per_node_are_balanced_and_leave_compute_ranks(total, data):
    k = data.draw(st.integers(1, total))
    spares = data.draw(st.integers(0, total - 1))
    hosts = _nodes(total, k)
    chosen = spare_ranks(hosts, spares)
    assert len(chosen) == len(set(chosen)) == spares and all(0 <= w < total for w in chosen)
    per = {h: sum(hosts[w] == h for w in chosen) for h in set(hosts)}
    size = {h: hosts.count(h) for h in set(hosts)}
    # No node is emptied of compute ranks while another still has two left.
    if any(size[h] - per[h] == 0 for h in per):
        assert all(size[h] - per[h] <= 1 for h in per)
    # Each node's spares are its last processes.
    for h in per:
        mine = [w for w in range(total) if hosts[w] == h]
        assert [w for w in mine if w in chosen] == mine[len(mine) - per[h]:]


def test_bad_spare_counts_are_refused():
    with pytest.raises(ValueError):
        spare_ranks(["h"] * 4, 4)


def _members(layout, spares):
    """Live members: compute ranks on their layout nodes, plus ``spares`` {uid: node}."""
    ms = [Member(uid=r, logical=r, ckpt_step=10, node=n, layout=tuple(layout))
          for r, n in enumerate(layout)]
    ms += [Member(uid=u, logical=None, ckpt_step=None, node=n, layout=tuple(layout))
           for u, n in spares.items()]
    return ms


def test_a_dead_rank_takes_the_spare_on_its_own_node():
    layout = ["node0", "node0", "node1", "node1"]
    live = [m for m in _members(layout, {10: "node0", 11: "node1"}) if m.uid != 3]
    plan = plan_repair(live, size=4, policies=("spares",))
    assert plan.replaced == {3: 11} and plan.layout == tuple(layout)
    live = [m for m in _members(layout, {10: "node0", 11: "node1"}) if m.uid != 0]
    assert plan_repair(live, size=4, policies=("spares",)).replaced == {0: 10}


def test_without_a_spare_on_its_node_the_node_richest_in_spares_gives_one():
    layout = ["node0", "node0", "node1", "node1"]
    spares = {10: "node2", 11: "node3", 12: "node3"}
    live = [m for m in _members(layout, spares) if m.uid not in (2, 3)]
    plan = plan_repair(live, size=4, policies=("spares",))
    assert plan.replaced == {2: 11, 3: 10}
    assert plan.layout == ("node0", "node0", "node3", "node2")


@given(st.data())
def test_the_spares_plan_is_the_old_one_on_one_node(data):
    # One host: the dead ranks take the spares in uid order, as before nodes.
    size = data.draw(st.integers(2, 8))
    dead = data.draw(st.sets(st.integers(0, size - 1), min_size=1, max_size=size - 1))
    spares = {100 + j: "h" for j in range(len(dead))}
    live = [m for m in _members(["h"] * size, spares) if m.uid not in dead]
    plan = plan_repair(live, size=size, policies=("spares",))
    assert plan.replaced == dict(zip(sorted(dead), sorted(spares)))


def test_shrink_keeps_the_survivors_nodes_in_their_new_order():
    layout = ["a", "b", "c", "d"]
    live = [m for m in _members(layout, {}) if m.uid != 1]
    plan = plan_repair(live, size=4, policies=("shrink",))
    assert plan.layout == ("a", "c", "d")


def test_the_layout_is_taken_from_the_lowest_uid_so_every_rank_plans_alike():
    layout = ("node0", "node0", "node1", "node1")
    live = [m for m in _members(list(layout), {10: "node0", 11: "node1"}) if m.uid != 3]
    # A member that missed the last repair's layout does not change the plan.
    stale = [Member(m.uid, m.logical, m.ckpt_step, m.node, ("x",) * 4) if m.uid == 2 else m
             for m in live]
    assert plan_repair(stale, size=4, policies=("spares",)) == \
        plan_repair(live, size=4, policies=("spares",))
