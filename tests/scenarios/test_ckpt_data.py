"""Checkpoints as data: ``--ckpt-final`` keeps the result, xarray opens it with
named dimensions (``Block(..., dims=("x", "y"))``) and coordinates, no warning."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
from conftest import APPS, require_ulfm, run_ulfmpy

pytestmark = [pytest.mark.scenario]

STENCIL = [str(APPS / "stencil.py"), "--nx", "64", "--ny", "48", "--steps", "120"]


def _fingerprint_of(u: np.ndarray) -> str:
    """ulfmpy.state.fingerprint of a state holding one distributed array ``u``."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"u|block|{u.dtype.str}|{u.shape}\n".encode())
    h.update(np.ascontiguousarray(u).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("extra, steps", [([], [120]), (["--ckpt-every", "50"], [50, 100, 120])],
                         ids=["checkpoints-off", "ckpt-every-50"])
def test_final_checkpoint_opens_in_xarray_with_named_dimensions(tmp_path, extra, steps):
    require_ulfm()
    xr = pytest.importorskip("xarray", reason="xarray is in the test extra: pip install -e '.[test]'")
    res = run_ulfmpy(["-n", "4", "--ckpt-final", *extra, *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    s = res.summary
    assert [c["step"] for c in s["checkpoints"] if c["committed"]][-len(steps):] == steps
    path = tmp_path / "run" / "ckpt" / "step-00000120.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        ds = xr.open_dataset(path, engine="h5netcdf")
    with ds:
        assert ds["u"].dims == ("x", "y") and ds["u"].shape == (64, 48)
        assert list(ds["x"].values) == list(range(64)) and ds.attrs["step"] == 120
        assert _fingerprint_of(ds["u"].values) == s["fingerprint"]


def test_without_ckpt_final_no_checkpoint_is_written_at_the_end(tmp_path):
    require_ulfm()
    res = run_ulfmpy(["-n", "2", "--ckpt-every", "50", *STENCIL], tmp_path / "run")
    assert res.returncode == 0, res
    assert [c["step"] for c in res.summary["checkpoints"]] == [50, 100]
    assert not (tmp_path / "run" / "ckpt" / "step-00000120.h5").exists()


def test_ckpt_final_with_no_resilience_is_refused(tmp_path):
    res = run_ulfmpy(["-n", "2", "--no-resilience", "--ckpt-final", *STENCIL], tmp_path / "run")
    assert res.returncode == 2
    assert "--no-resilience and --ckpt-final conflict" in res.stderr
