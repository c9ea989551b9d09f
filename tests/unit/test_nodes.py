"""Virtual nodes (DESIGN §13): placement is pure and matches mpirun's slot filling."""

import pytest
from hypothesis import given, strategies as st

from ulfmpy.nodes import node_names, node_of, virtual_node
from ulfmpy.partner import holder_of


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


def test_a_replacement_lives_on_the_node_of_the_rank_it_replaces():
    stride = 100_000
    assert node_of(uid=stride + 1, logical=3, total=6, k=3, host="h", stride=stride) == "node1"
    assert node_of(uid=5, logical=2, total=6, k=3, host="h", stride=stride) == "node2"  # a spare
    assert node_of(uid=5, logical=2, total=6, k=0, host="h", stride=stride) == "h"     # off


def test_partner_copies_go_to_another_virtual_node():
    hosts = [virtual_node(r, 4, 2) for r in range(4)]
    for r in range(4):
        assert hosts[holder_of(r, hosts)] != hosts[r]
