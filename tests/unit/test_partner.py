"""Partner copies: who holds whose checkpoint, and who hands it over. Pure parts."""

from hypothesis import given
from hypothesis import strategies as st

from ulfmpy.partner import holder_of, plan_handover, ward_of


def test_one_host_is_a_ring():
    hosts = ["n0"] * 4
    assert [holder_of(r, hosts) for r in range(4)] == [1, 2, 3, 0]
    assert [ward_of(r, hosts) for r in range(4)] == [3, 0, 1, 2]


def test_copies_go_to_another_host():
    hosts = ["a", "a", "b", "b"]
    assert [holder_of(r, hosts) for r in range(4)] == [2, 2, 0, 0]
    assert all(hosts[holder_of(r, hosts)] != hosts[r] for r in range(4))


def test_single_rank_holds_nothing():
    assert ward_of(0, ["a"]) is None


@given(st.lists(st.sampled_from("abc"), min_size=2, max_size=12))
def test_holder_is_never_self_and_on_another_host_when_possible(hosts):
    for r in range(len(hosts)):
        h = holder_of(r, hosts)
        assert h != r
        if len(set(hosts)) > 1:
            assert hosts[h] != hosts[r]


def test_handover_skips_dead_holders_and_missing_steps():
    # Rank 1 and 2 replaced; 2 held 1's copy (gone with it), 3 holds 2's.
    table = [(False, {3: [10, 20]}), (True, {}), (True, {}), (False, {2: [10, 20]})]
    assert plan_handover(table, 20) == {2: 3}
    assert plan_handover(table, 30) == {}
    # A replacement never serves another: its copies are gone.
    table = [(False, {}), (True, {0: [20]}), (False, {1: [20]})]
    assert plan_handover(table, 20) == {1: 2}
