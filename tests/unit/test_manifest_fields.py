"""Damaged manifest fields: restore falls back, ``inspect --verify`` names the same reason.

Every test writes two checkpoints, damages one field of the newest manifest
(``ckpt/step-00000002.h5``: its JSON layout or a root attribute) and checks
that restore falls back to step 1 bit-exactly, with the reason that
``ulfmpy inspect --verify`` gives for step 2 (exit status 1). No mpirun:
restore runs on ``MPI.COMM_SELF``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi4py import MPI
from test_checkpoint_files import assert_state, make_state, save_steps, scramble

from ulfmpy import _ckpt_writers as writers
from ulfmpy.checkpoint import restore
from ulfmpy.cli import main
from ulfmpy.errors import RestoreError
from ulfmpy.events import EventLog, read_events
from ulfmpy.state import Block

COMM = MPI.COMM_SELF
NEWEST = "ckpt/step-00000002.h5"


# ----------------------------------------------------------------------------
# Damaging a manifest


def edit_layout(manifest: Path, edit) -> None:
    """Rewrite the manifest's JSON layout after ``edit(layout)`` changed it in place."""
    with h5py.File(manifest, "r") as f:
        layout = json.loads(f["_ulfmpy/layout"][()])
    edit(layout)
    put_layout(manifest, json.dumps(layout).encode())


def put_layout(manifest: Path, raw: bytes) -> None:
    with h5py.File(manifest, "r+") as f:
        del f["_ulfmpy/layout"]
        f["_ulfmpy"].create_dataset("layout", data=np.bytes_(raw))


def flip_layout_bit(manifest: Path, pos: int, bit: int) -> None:
    with h5py.File(manifest, "r") as f:
        raw = bytearray(f["_ulfmpy/layout"][()])
    raw[pos % len(raw)] ^= 1 << bit
    put_layout(manifest, bytes(raw))


def flip_attr_bit(manifest: Path, key: str, bit: int) -> None:
    """Flip one bit of a root attribute's stored value (numbers in place, strings bytewise)."""
    with h5py.File(manifest, "r+") as f:
        value = f.attrs[key]
        if isinstance(value, (str, bytes)):
            raw = bytearray(value.encode() if isinstance(value, str) else value)
            raw[(bit // 8) % len(raw)] ^= 1 << (bit % 8)
            f.attrs[key] = np.bytes_(bytes(raw))
        else:
            arr = np.array(value)
            bits = arr.view(f"u{arr.itemsize}")
            mask = np.array(1 << (bit % (8 * arr.itemsize)), bits.dtype)
            f.attrs[key] = (bits ^ mask).view(arr.dtype)


def flip_char(s: str, i: int, bit: int = 0) -> str:
    return s[:i] + chr(ord(s[i]) ^ (1 << bit)) + s[i + 1:]


# ----------------------------------------------------------------------------
# Outcomes


def verify(run: Path, capsys) -> tuple[int, dict[int, dict]]:
    """``ulfmpy inspect RUN --verify --json``: exit status and the rows by step."""
    capsys.readouterr()
    rc = main(["inspect", str(run), "--verify", "--json"])
    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    return rc, {r["step"]: r for r in rows}


def assert_falls_back(run: Path, refs: dict, capsys, state=None, match: str = "") -> str:
    """Restore takes step 1, bit-exactly; inspect flags step 2 with the same reason."""
    state = make_state() if state is None else state
    scramble(state)
    log = EventLog(run, 0)
    rec = restore(COMM, run, state, events=log)
    log.close()
    assert rec.step == 1 and [f["step"] for f in rec.fallbacks] == [2], rec
    assert_state(state, refs[1])
    reason = rec.fallbacks[0]["reason"]
    assert match in reason
    assert [e["reason"] for e in read_events(run, "restore_fallback")] == [reason]
    rc, rows = verify(run, capsys)
    assert rc == 1
    assert rows[2]["verified"] is False and "; ".join(rows[2]["problems"]) == reason
    assert rows[1]["verified"] is True
    with pytest.raises(RestoreError, match="no checkpoint .* could be restored") as exc:
        restore(COMM, run / NEWEST, state)  # asked for by name: no fallback
    assert reason in str(exc.value)
    return reason


@pytest.fixture
def run(tmp_path):
    _, refs, _ = save_steps(tmp_path, [1, 2])
    return tmp_path, refs


# ----------------------------------------------------------------------------
# One damaged field of a one-rank checkpoint


def _gs(bit):
    def edit(lay):
        lay["entries"]["u"]["global_shape"][0] ^= 1 << bit
    return edit


def _set(*path_value):
    *path, value = path_value

    def edit(lay):
        obj = lay
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value(obj[path[-1]]) if callable(value) else value
    return edit


def _delete(*path):
    def edit(lay):
        obj = lay
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]
    return edit


DAMAGE = {
    "global_shape_bit0": (_gs(0), "global_shape"),
    "global_shape_bit2": (_gs(2), "global_shape"),
    "global_shape_negative": (_set("entries", "u", "global_shape", [-6, 7]), "global_shape"),
    "global_shape_garbled": (_set("entries", "u", "global_shape", "6x7"), "global_shape"),
    "dtype_unparsable": (_set("entries", "f32", "dtype", lambda s: flip_char(s, 2)), "dtype"),
    "dtype_not_a_string": (_set("entries", "i64", "dtype", 8), "dtype"),
    # '<' -> '>': still a dtype. For 'u' it is not the state's, yet restore must not call
    # that the app's error: it verifies first, and the rank file shows the damage.
    "dtype_byte_order_block": (_set("entries", "u", "dtype", lambda s: flip_char(s, 0, 1)),
                               "the manifest says >f8[6, 7]"),
    "dtype_byte_order_empty": (_set("entries", "empty", "dtype", lambda s: flip_char(s, 0, 1)),
                               "the manifest says >f8[0, 3]"),
    "kind_garbled": (_set("entries", "u", "kind", lambda s: flip_char(s, 4, 3)), "kind"),
    "kind_swapped": (_set("entries", "u", "kind", "rank"), "kind"),
    "start_bit": (_set("ranks", 0, "u", "start", [1, 0]), "start"),
    "start_negative": (_set("ranks", 0, "u", "start", [-1, 0]), "start"),
    "start_garbled": (_set("ranks", 0, "u", "start", [0, "0"]), "start"),
    "start_short": (_set("ranks", 0, "u", "start", [0]), "start"),
    "shape_of_rank_array": (_set("ranks", 0, "i64", "shape", [5]), "the manifest says <i8[5]"),
    "nranks_layout": (_set("nranks", 3), "nranks"),
    "step_layout": (_set("step", 3), "step"),
    "files_other_name": (_set("files", 0, "step-00000001/rank-00000.h5"), "file"),
    "array_missing_from_entries": (_delete("entries", "t"), "arrays"),
    "array_missing_from_ranks": (_delete("ranks", 0, "t"), "arrays"),
    "ranks_missing_key": (_delete("ranks"), "ranks"),
    "checksum_bit": (_set("ranks", 0, "u", "checksum", lambda s: flip_char(s, 7)), "checksum"),
    "checksum_garbled": (_set("ranks", 0, "c", "checksum", None), "checksum"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_layout_field_falls_back(run, capsys, damage):
    path, refs = run
    edit, match = DAMAGE[damage]
    edit_layout(path / NEWEST, edit)
    assert_falls_back(path, refs, capsys, match=match)


@pytest.mark.parametrize("key,bit,match", [
    ("nranks", 1, "nranks"), ("step", 0, "step"), ("checksum_algo", 3, "checksum_algo")])
def test_damaged_attribute_falls_back(run, capsys, key, bit, match):
    path, refs = run
    flip_attr_bit(path / NEWEST, key, bit)
    assert_falls_back(path, refs, capsys, match=match)


def test_deleted_rank_file_falls_back(run, capsys):
    path, refs = run
    (path / "ckpt" / "step-00000002" / "rank-00000.h5").unlink()
    assert_falls_back(path, refs, capsys, match="missing")


def test_intact_checkpoints_verify_and_restore_newest(run, capsys):
    path, refs = run
    assert verify(path, capsys)[0] == 0
    state = make_state()
    assert restore(COMM, path, state).step == 2
    assert_state(state, refs[2])


def test_app_mismatch_on_an_intact_checkpoint_stays_a_user_error(run):
    """A state that does not fit an intact checkpoint is the app's error: no fallback."""
    path, _ = run
    state = make_state()
    state["u"] = Block(np.zeros((6, 8)), (6, 8), (0, 0))
    with pytest.raises(RestoreError, match="global shape"):
        restore(COMM, path, state)


def test_nothing_usable_lists_every_step(run):
    path, _ = run
    edit_layout(path / NEWEST, _gs(0))
    edit_layout(path / "ckpt/step-00000001.h5", _set("entries", "f32", "dtype", "<f9"))
    with pytest.raises(RestoreError, match="step 2: .*global_shape.*; step 1: .*dtype"):
        restore(COMM, path, make_state())


# ----------------------------------------------------------------------------
# A two-rank checkpoint restored on one rank (N -> M)

GLOBAL = (4, 5)


def write_two_rank(run: Path, step: int) -> np.ndarray:
    """Write a committed checkpoint of one (4, 5) array in two row blocks, as two ranks would."""
    data = np.arange(20.0).reshape(GLOBAL) * step
    (run / "ckpt" / writers.step_dir_name(step)).mkdir(parents=True, exist_ok=True)
    infos = []
    for r in range(2):
        block = np.ascontiguousarray(data[2 * r:2 * r + 2])
        rel = f"{writers.step_dir_name(step)}/{writers.rank_file_name(r)}"
        attrs = {"kind": "block", "global_shape": np.array(GLOBAL), "start": np.array([2 * r, 0])}
        res = writers.write_rank_file(str(run / "ckpt" / rel), [("u", block, attrs)],
                                      {"step": step, "rank": r, "nranks": 2})
        infos.append({"rank": r, "file": rel, "bytes": res["bytes"], "entries": {"u": {
            "kind": "block", "dtype": block.dtype.str, "shape": [2, 5], "start": [2 * r, 0],
            "global_shape": list(GLOBAL), "checksum": res["checksums"]["u"]}}})
    writers.write_manifest(run / "ckpt", step, infos, meta_json="{}", attrs={})
    return data


TWO_RANK_DAMAGE = {
    "overlapping_starts": (_set("ranks", 1, "u", "start", [1, 0]), "overlap"),
    "start_outside": (_set("ranks", 1, "u", "start", 1, 3), "start"),
    "shape_bit": (_set("ranks", 1, "u", "shape", 0, 3), "shape"),
    "global_shape_bit": (_gs(0), "global_shape"),
    "nranks_one": (_set("nranks", 1), "nranks"),
    "files_swapped": (_set("files", lambda fs: fs[::-1]), "file"),
}


@pytest.mark.parametrize("damage", list(TWO_RANK_DAMAGE))
def test_two_rank_checkpoint_damage_falls_back(tmp_path, capsys, damage):
    refs = {s: {"u": write_two_rank(tmp_path, s)} for s in (1, 2)}
    edit, match = TWO_RANK_DAMAGE[damage]
    edit_layout(tmp_path / NEWEST, edit)
    state = {"u": Block(np.zeros(GLOBAL), GLOBAL, (0, 0))}
    assert_falls_back(tmp_path, refs, capsys, state=state, match=match)


def test_two_rank_checkpoint_restores_on_one_rank(tmp_path, capsys):
    write_two_rank(tmp_path, 1)
    data = write_two_rank(tmp_path, 2)
    assert verify(tmp_path, capsys)[0] == 0
    state = {"u": Block(np.zeros(GLOBAL), GLOBAL, (0, 0))}
    assert restore(COMM, tmp_path, state).step == 2
    assert state["u"].local.tobytes() == data.tobytes()


# ----------------------------------------------------------------------------
# Any single-bit flip: restore and inspect --verify agree, and nothing raises


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine")
    _, refs, _ = save_steps(path, [1, 2])
    with h5py.File(path / NEWEST, "r") as f:
        layout_len = len(f["_ulfmpy/layout"][()])
        attrs = sorted(f.attrs)
    return path, refs, layout_len, attrs


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["layout", "attr"]), pos=st.integers(0, 1 << 20),
       bit=st.integers(0, 63))
def test_any_single_bit_flip_falls_back_or_restores(pristine, tmp_path_factory, capsys,
                                                    where, pos, bit):
    src, refs, layout_len, attrs = pristine
    run = tmp_path_factory.mktemp("flip")
    shutil.copytree(src, run, dirs_exist_ok=True)
    if where == "layout":
        flip_layout_bit(run / NEWEST, pos % layout_len, bit % 8)
    else:
        flip_attr_bit(run / NEWEST, attrs[pos % len(attrs)], bit)
    rc, rows = verify(run, capsys)
    state = make_state()
    scramble(state)
    rec = restore(COMM, run, state)  # step 1 is intact: never raises
    if rows[2]["verified"]:
        assert rc == 0 and rec.step == 2 and rec.fallbacks == []
    else:
        assert rc == 1 and rec.step == 1
        assert rec.fallbacks[0]["reason"] == "; ".join(rows[2]["problems"])
    assert_state(state, refs[rec.step])
    shutil.rmtree(run)


def test_reason_does_not_depend_on_how_ranks_share_the_files():
    """Several ranks' problems merge into the text ``inspect --verify`` gives for one."""
    from ulfmpy._ckpt_restore import _merge

    inspect = ["rank file a is bad", "rank file b is bad"]  # files 0 and 1, read whole
    by_rank = [[(1, True, inspect[1]), (0, False, "rank file a: partial read failed")],
               [(0, True, inspect[0])]]
    assert _merge(p for ps in by_rank for p in ps) == inspect
    assert _merge([(2, False, "only read in part"), (-1, True, "m")]) == ["m", "only read in part"]
