"""State entries, snapshots, the closure rule, the fingerprint on one rank."""

import numpy as np
import pytest

from ulfmpy.errors import ConfigError
from ulfmpy.segment import Report, Snapshot, closure, trusted
from ulfmpy.state import Block, fingerprint, normalize_state


class OneRank:
    """A 1-rank stand-in for the few collectives fingerprint uses."""

    def Get_rank(self):
        return 0

    def gather(self, obj, root=0):
        return [obj]

    def bcast(self, obj, root=0):
        return obj


class Blocks:
    """Simulates a k-rank gather by handing in all blocks at once."""

    def __init__(self, parts):
        self.parts = parts

    def Get_rank(self):
        return 0

    def gather(self, obj, root=0):
        return self.parts

    def bcast(self, obj, root=0):
        return obj


def test_block_validation():
    with pytest.raises(ConfigError, match="outside global shape"):
        Block(np.zeros((3, 3)), (4, 4), (2, 0))
    with pytest.raises(ConfigError, match="dimensions"):
        Block(np.zeros(3), (4, 4), (0, 0))


def test_normalize_state_errors():
    with pytest.raises(ConfigError, match="dict"):
        normalize_state([1, 2])
    with pytest.raises(ConfigError, match=r"state\['x'\] is a list"):
        normalize_state({"x": [1.0]})
    assert list(normalize_state({"b": np.zeros(1), "a": np.zeros(1)})) == ["a", "b"]


def test_fingerprint_independent_of_decomposition():
    g = np.arange(48, dtype=float).reshape(6, 8) / 7
    whole = fingerprint(OneRank(), {"u": Block(g, g.shape, (0, 0))})
    parts = [((0, 0), g[:4, :3]), ((0, 3), g[:4, 3:]), ((4, 0), g[4:, :])]
    split = Blocks(parts)
    assert fingerprint(split, {"u": Block(g[:4, :3], g.shape, (0, 0))}) == whole
    g2 = g.copy()
    g2[5, 7] = np.nextafter(g2[5, 7], 0)
    assert fingerprint(OneRank(), {"u": Block(g2, g.shape, (0, 0))}) != whole


def test_fingerprint_detects_uncovered_blocks():
    g = np.zeros((4, 4))
    with pytest.raises(ConfigError, match="do not cover"):
        fingerprint(Blocks([((0, 0), g[:2])]), {"u": Block(g[:2], g.shape, (0, 0))})


def test_snapshot_restores_in_place_without_new_arrays():
    u = np.arange(12.0).reshape(3, 4)
    view = u[1:, 1:]
    snap = Snapshot({"u": Block(view, (3, 4), (0, 0)), "t": np.array(2.0)})
    snap.take(10)
    view *= -1
    snap.restore()
    assert np.array_equal(u, np.arange(12.0).reshape(3, 4)) and snap.step == 10
    assert snap.nbytes == view.nbytes + 8


def test_closure_rule():
    R = Report
    assert closure((), [R(), R(detected=True), R(), R()], 4) == {1}
    assert closure({1}, [R(), R(contaminated=frozenset({2})), R(), R()], 4) == {1, 2}
    assert closure({1}, [R(), R(collective_mismatch=True), R(), R()], 4) == {0, 1, 2, 3}
    assert closure({1}, [R(), R(diverged="x"), R(), R()], 4) == {0, 1, 2, 3}
    # a lone catch-up that reached a neighbour re-executes with it
    assert closure((), [R(repaired_steps=3, contaminated=frozenset({1})), R(), R()], 3) == {0, 1}


def test_rows_need_their_count_in_the_state_and_a_0d_integer_count():
    import numpy as np
    import pytest

    from ulfmpy.errors import ConfigError
    from ulfmpy.state import Rows, normalize_state

    n = np.array(3)
    rows = Rows(np.zeros(10), n)
    assert list(normalize_state({"x": rows, "n": n})) == ["n", "x"]
    with pytest.raises(ConfigError, match="count must be in the state too"):
        normalize_state({"x": rows})
    with pytest.raises(ConfigError, match="0-d integer"):
        Rows(np.zeros(10), np.array(3.0))
    with pytest.raises(ConfigError, match="outside 0..10"):
        Rows(np.zeros(10), np.array(11))


def test_a_rank_of_S_with_a_late_logged_receive_sends_every_rank_back():
    # Rank 1's log holds a receive logged after mpi4py's own class completed
    # it: if rank 1 must re-execute, nobody replays from a log (all live).
    assert trusted(frozenset({1}), {1}, 4) == frozenset(range(4))
    assert trusted(frozenset({2, 3}), {1}, 4) == frozenset({2, 3})  # rank 1 is not replayed
    assert trusted(frozenset(), {1}, 4) == frozenset()  # nothing to re-execute
    assert trusted(frozenset({0}), (), 4) == frozenset({0})
