"""The stencil's decomposition (no MPI communication)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apps.stencil import process_grid, split
from ulfmpy.errors import ConfigError


@given(n=st.integers(1, 500), parts=st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_split_covers_exactly(n, parts):
    if parts > n:
        return
    blocks = [split(n, parts, i) for i in range(parts)]
    assert blocks[0][0] == 0
    for (s0, c0), (s1, _) in zip(blocks, blocks[1:]):
        assert s0 + c0 == s1
    assert sum(c for _, c in blocks) == n
    assert max(c for _, c in blocks) - min(c for _, c in blocks) <= 1


@pytest.mark.parametrize("size,expect", [(1, (1, 1)), (2, (2, 1)), (4, (2, 2)), (6, (3, 2)),
                                         (3, (3, 1)), (7, (7, 1))])
def test_process_grid_square(size, expect):
    px, py = process_grid(size, 100, 100)
    assert px * py == size and (px, py) == expect


def test_process_grid_too_many_ranks():
    with pytest.raises(ConfigError, match="cannot be split"):
        process_grid(7, 3, 2)
