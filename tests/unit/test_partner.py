"""Partner copies: who holds whose checkpoint, and who restores from whom. Pure parts."""

from hypothesis import given
from hypothesis import strategies as st

from ulfmpy.partner import choose_restore, holders, plan_restore, wards_of


def test_one_host_is_a_ring():
    assert holders(["n0"] * 4) == [1, 2, 3, 0]
    assert [wards_of(r, holders(["n0"] * 4)) for r in range(4)] == [[3], [0], [1], [2]]


def test_copies_go_to_another_host_and_every_rank_holds_one():
    # Ranks packed by node: the shift by the node size. The old rule (the
    # next rank on another host) made ranks 0 and 2 hold two copies each.
    assert holders(["a", "a", "b", "b"]) == [2, 3, 0, 1]
    assert holders(["a", "a", "b", "b", "c", "c"]) == [2, 3, 4, 5, 0, 1]
    assert holders(["a", "b", "a", "b"]) == [1, 2, 3, 0]


def test_a_single_rank_holds_its_own():
    assert holders(["a"]) == [0]


def test_uneven_nodes_fall_back_to_the_next_rank_on_another_host():
    hosts = ["a", "a", "a", "b"]
    h = holders(hosts)
    assert all(hosts[h[r]] != hosts[r] for r in range(4))
    assert h == [3, 3, 3, 0]


@given(st.lists(st.sampled_from("abc"), min_size=2, max_size=12))
def test_holder_is_never_self_and_on_another_host_when_possible(hosts):
    h = holders(hosts)
    for r in range(len(hosts)):
        assert h[r] != r
        if len(set(hosts)) > 1:
            assert hosts[h[r]] != hosts[r]


@given(st.integers(1, 6), st.integers(1, 6))
def test_equal_nodes_give_a_permutation(nodes, per_node):
    hosts = [f"n{r // per_node}" for r in range(nodes * per_node)]
    h = holders(hosts)
    assert sorted(h) == list(range(len(hosts)))  # each rank holds exactly one copy


L = ("layout",)


def test_restore_plan_takes_held_copies_of_the_step_in_the_same_layout():
    # Rank 1 and 2 replaced; 2 held 1's copy (gone with it), 3 holds 2's.
    table = [(L, {3: (20, L)}, None), (L, {}, None), (L, {}, None), (L, {2: (20, L)}, None)]
    # Every rank needs its copy: 0 holds 3's, nobody holds 0's or 1's (files).
    assert plan_restore(table, 20) == {2: 3, 3: 0}
    assert plan_restore(table, 30) == {}
    # Rank 0 holds its own copy (partner copies off); rank 1 needs nothing.
    table = [(L, {0: (20, L)}, None), (None, {1: (20, L)}, None)]
    assert plan_restore(table, 20) == {0: 0}
    # Another layout (the decomposition changed): not a match.
    table = [(("other",), {}, None), (L, {0: (20, L)}, None)]
    assert plan_restore(table, 20) == {}


def test_a_snapshot_of_the_step_serves_its_own_rank():
    table = [(L, {}, 20), (L, {0: (20, L)}, 25)]
    assert plan_restore(table, 20) == {0: 0}  # rank 1's own copy is nobody's


def test_restore_plan_covers_every_rank_of_a_ring():
    n = 4
    h = holders(["x"] * n)
    table = [(L, {w: (5, L) for w in wards_of(r, h)}, None) for r in range(n)]
    assert plan_restore(table, 5) == {r: h[r] for r in range(n)}


def test_a_staged_checkpoint_is_taken_only_when_memory_holds_all_of_it():
    # Ring of 4, checkpoint 30 staged (not committed), 20 on disk. Rank 2
    # died holding rank 1's copy of 30: rank 1's snapshot still holds 30.
    offers = [(L, {3: (30, L)}, 30), (L, {0: (30, L)}, 30), (L, {}, None), (L, {2: (30, L)}, 30)]
    assert choose_restore(offers, 20, 30) == (30, {0: 0, 1: 1, 2: 3, 3: 3})
    # Rank 1 had moved past 30 (its snapshot is 35): its state of 30 is gone
    # with rank 2, so 30 cannot be rebuilt; back to 20, from the files.
    offers[1] = (L, {0: (30, L)}, 35)
    assert choose_restore(offers, 20, 30) == (20, {})
    assert choose_restore(offers, 20, None) == (20, {})


def test_a_staged_checkpoint_whose_manifest_is_on_disk_is_taken_and_files_fill_the_gaps():
    # Rank 1 had moved past 30 and rank 2 died with its copy: memory cannot
    # rebuild 30, but its manifest was renamed before the failure was seen,
    # so 30 is committed; rank 1 reads its file, the others come from memory.
    offers = [(L, {3: (30, L)}, 35), (L, {0: (30, L)}, 35), (L, {}, None), (L, {2: (30, L)}, 35)]
    assert choose_restore(offers, 20, 30) == (20, {})
    assert choose_restore(offers, 20, 30, staged_on_disk=True) == (30, {0: 1, 2: 3, 3: 0})
    # never backwards: an older "staged" step does not replace the committed one
    assert choose_restore(offers, 40, 30, staged_on_disk=True)[0] == 40
