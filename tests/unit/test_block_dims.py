"""Block(..., dims=, coords=): names and coordinates a checkpoint labels arrays with."""

from __future__ import annotations

import numpy as np
import pytest

from ulfmpy._ckpt_files import validate_infos
from ulfmpy.errors import ConfigError
from ulfmpy.state import Block


def test_dims_and_coords_are_checked():
    a = np.zeros((4, 3))
    b = Block(a, (8, 3), (4, 0), dims=["y", "x"], coords={"x": [0.0, 0.5, 1.0]})
    assert b.dims == ("y", "x") and list(b.coords["x"]) == [0.0, 0.5, 1.0]
    assert Block(a, (8, 3), (0, 0)).dims is None
    for bad, msg in [({"dims": ("y",)}, "2 distinct names"), ({"dims": ("y", "y")}, "distinct"),
                     ({"dims": ("_y", "x")}, "not starting with _"),
                     ({"coords": {"x": [1, 2, 3]}}, "coords need dims"),
                     ({"dims": ("y", "x"), "coords": {"z": [1]}}, "not one of dims"),
                     ({"dims": ("y", "x"), "coords": {"y": [1, 2]}}, "global length 8")]:
        with pytest.raises(ConfigError, match=msg):
            Block(a, (8, 3), (0, 0), **bad)


def _info(rank, entries):
    return {"rank": rank, "entries": entries}


def test_a_dimension_shared_by_two_arrays_must_agree_on_its_length():
    e = {"u": {"kind": "block", "dtype": "<f8", "global_shape": [8, 3], "shape": [8, 3],
               "start": [0, 0], "dims": ["y", "x"]},
         "v": {"kind": "block", "dtype": "<f8", "global_shape": [8, 4], "shape": [8, 4],
               "start": [0, 0], "dims": ["y", "x"]}}
    msg = validate_infos([_info(0, e)])
    assert msg and "dimension 'x' has length 4" in msg and "'u' gives it length 3" in msg
    e["v"]["dims"] = ["y", "x2"]
    assert validate_infos([_info(0, e)]) is None
