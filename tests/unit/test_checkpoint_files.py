"""Checkpoint engine without MPI: a one-rank fake communicator, files, inspect CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ulfmpy.checkpoint import (
    CheckpointStore,
    list_checkpoints,
    restore,
    restore_from_memory,
    verify_checkpoint,
)
from ulfmpy.cli import main
from ulfmpy.errors import CheckpointError, ConfigError, RestoreError
from ulfmpy.events import EventLog, read_events
from ulfmpy.state import Block


class OneRank:
    """The communicator calls the checkpoint engine makes, for a world of one rank."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def allgather(self, obj):
        return [obj]

    def gather(self, obj, root=0):
        return [obj]

    def bcast(self, obj, root=0):
        return obj

    def allreduce(self, obj, op=None):
        return obj

    def Barrier(self):
        pass


COMM = OneRank()


def make_state():
    """Every dtype kind, a 0-d scalar, an empty array and a non-contiguous Block view."""
    pad = np.zeros((8, 9))
    return {
        "u": Block(pad[1:-1, 1:-1], (6, 7), (0, 0)),
        "f32": np.zeros((3, 2), dtype=np.float32),
        "i64": np.zeros(4, dtype=np.int64),
        "c": np.zeros(2, dtype=np.complex128),
        "flag": np.zeros(3, dtype=bool),
        "bytes": np.zeros(2, dtype="S5"),
        "t": np.array(0.0),
        "empty": np.zeros((0, 3)),
    }


def fill(state, step):
    state["u"].local[...] = np.arange(42.0).reshape(6, 7) * step
    state["f32"][...] = np.float32(step) / 3
    state["i64"][...] = np.arange(4) + 2**40 * step
    state["c"][...] = step + 1j * step
    state["flag"][...] = [step % 2 == 0, True, False]
    state["bytes"][...] = [b"ab%d" % step, b"cdefg"]
    state["t"][...] = step * 0.1


def snapshot(state):
    return {k: np.array(v.local if isinstance(v, Block) else v, copy=True) for k, v in state.items()}


def scramble(state):
    for v in state.values():
        arr = v.local if isinstance(v, Block) else v
        arr[...] = 1 if arr.dtype.kind != "S" else b"?"


def assert_state(state, ref):
    for k, v in state.items():
        arr = v.local if isinstance(v, Block) else v
        assert arr.dtype == ref[k].dtype and arr.shape == ref[k].shape, k
        assert arr.tobytes() == ref[k].tobytes(), k  # bit-exact


def save_steps(run, steps, mode="sync", **kw):
    state = make_state()
    refs = {}
    with CheckpointStore(COMM, run, mode=mode, **kw) as store:
        for s in steps:
            fill(state, s)
            refs[s] = snapshot(state)
            store.save(s, state)
            store.poll()
        store.drain()
        records = store.records
    return state, refs, records


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_round_trip_bit_exact(tmp_path, mode):
    state, refs, records = save_steps(tmp_path, [5, 10], mode=mode, meta={"nx": 6})
    assert [(r.step, r.committed) for r in records] == [(5, True), (10, True)]
    assert records[-1].bytes == sum(v.nbytes for v in refs[10].values())
    assert records[-1].write_s > 0 and records[-1].exposed_s > 0
    assert set(records[-1].as_dict()) == {"step", "exposed_s", "write_s", "bytes", "committed"}
    scramble(state)
    rec = restore(COMM, tmp_path, state)
    assert (rec.step, rec.fallbacks, rec.nranks) == (10, [], 1)
    assert_state(state, refs[10])
    rec = restore(COMM, tmp_path / "ckpt" / "step-00000005", state)  # one checkpoint by path
    assert rec.step == 5
    assert_state(state, refs[5])
    with h5py.File(tmp_path / "ckpt" / "step-00000010.h5", "r") as f:
        assert json.loads(f.attrs["meta"]) == {"nx": 6}
        assert np.array_equal(f["u"][()], refs[10]["u"])  # virtual dataset: the global array
        assert f["i64"].shape == (1, 4)


def test_memory_copy_is_the_committed_staging_buffer_until_the_next_save(tmp_path):
    """One staging buffer per copy held (docs/internals.md, "Copies of the state"):
    the committed copy stays in memory until the next save stages over it."""
    state = make_state()
    with CheckpointStore(COMM, tmp_path, mode="async") as store:
        assert store.memory_copy() is None
        fill(state, 1)
        ref1 = snapshot(state)
        store.save(1, state)
        assert store.memory_copy() is None  # staged, not yet committed
        store.drain()
        copy = store.memory_copy()
        assert copy.step == 1 and not copy.arrays["i64"].flags.writeable
        assert store.held() == {0: (1, copy_key(state))}
        scramble(state)
        restore_from_memory(state, store.memory_copy(1))
        assert_state(state, ref1)
        fill(state, 2)
        store.save(2, state)  # staged over the only buffer: step 1 is on disk only
        assert store.memory_copy() is None and store.held() == {}
        store.drain()
        assert store.memory_copy().step == 2 and store.memory_copy(1) is None
        other = {"u": np.zeros(3)}
        with pytest.raises(RestoreError, match="holds"):
            restore_from_memory(other, store.memory_copy())


def copy_key(state):
    from ulfmpy._ckpt_async import layout_key
    from ulfmpy.state import normalize_state

    return layout_key(normalize_state(state))


def test_a_save_stages_from_the_data_given_not_the_state(tmp_path):
    """``save(..., data=...)``: the segment snapshot taken at the boundary is
    what is written (the state's own arrays are not read again)."""
    state = make_state()
    fill(state, 5)
    ref = snapshot(state)
    data = {n: np.array(v.local if isinstance(v, Block) else v, copy=True)
            for n, v in state.items()}
    scramble(state)
    with CheckpointStore(COMM, tmp_path, mode="sync") as store:
        store.save(5, state, data=data)
    scramble(state)
    restore(COMM, tmp_path, state)
    assert_state(state, ref)


def test_keep_prunes_only_after_commit(tmp_path):
    save_steps(tmp_path, [1, 2, 3], keep=3)
    stale = tmp_path / "ckpt" / ".step-00000004.h5.tmp999"  # a commit killed mid-write
    stale.write_bytes(b"half a manifest")
    save_steps(tmp_path, [4], keep=3)
    assert [(c.step, c.committed) for c in list_checkpoints(tmp_path)] == [(2, True), (3, True), (4, True)]
    assert not (tmp_path / "ckpt" / "step-00000001").exists() and not stale.exists()


def _flip_byte(rank_file, name="u"):
    with h5py.File(rank_file, "r") as f:
        offset = f[name].id.get_offset() + 3
    with open(rank_file, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 1]))


@pytest.mark.parametrize("kind,reason", [
    ("no_manifest", "not committed"), ("deleted", "missing"),
    ("truncated", "truncated or unreadable"), ("flipped", "checksum mismatch")])
def test_torn_newest_is_detected_and_skipped(tmp_path, kind, reason):
    state, refs, _ = save_steps(tmp_path, [1, 2])
    rank_file = tmp_path / "ckpt" / "step-00000002" / "rank-00000.h5"
    if kind == "no_manifest":
        (tmp_path / "ckpt" / "step-00000002.h5").unlink()
    elif kind == "deleted":
        rank_file.unlink()
    elif kind == "truncated":
        os.truncate(rank_file, rank_file.stat().st_size - 100)
    else:
        _flip_byte(rank_file)
    v = verify_checkpoint(tmp_path / "ckpt" / "step-00000002")
    assert not v.ok and reason in v.reason
    assert verify_checkpoint(tmp_path / "ckpt" / "step-00000001.h5").ok
    log = EventLog(tmp_path, 0)
    scramble(state)
    rec = restore(COMM, tmp_path, state, events=log)
    log.close()
    assert rec.step == 1 and [f["step"] for f in rec.fallbacks] == [2]
    assert (reason if kind != "no_manifest" else "no manifest") in rec.fallbacks[0]["reason"]
    assert_state(state, refs[1])
    assert [e["step"] for e in read_events(tmp_path, "restore_fallback")] == [2]
    if kind != "no_manifest":  # asking for the bad one by name is an error, not a fallback
        with pytest.raises(RestoreError, match=reason):
            restore(COMM, tmp_path / "ckpt" / "step-00000002.h5", state)


def test_uncommitted_write_does_not_exist(tmp_path):
    """A rank file without a manifest (killed before the commit) is never used."""
    state = make_state()
    with CheckpointStore(COMM, tmp_path, mode="async") as store:
        fill(state, 1)
        store.save(1, state)
        store.drain()
        fill(state, 2)
        store.save(2, state)  # closed before any poll: never committed
    infos = list_checkpoints(tmp_path)
    assert [(c.step, c.committed) for c in infos] == [(1, True), (2, False)]
    with pytest.raises(RestoreError, match="not committed"):
        restore(COMM, tmp_path / "ckpt" / "step-00000002", state)
    rec = restore(COMM, tmp_path, state)
    assert rec.step == 1 and "no manifest" in rec.fallbacks[0]["reason"]


def test_fresh_start_and_nothing_valid(tmp_path):
    state = make_state()
    log = EventLog(tmp_path / "fresh", 0)
    assert restore(COMM, tmp_path / "fresh", state, events=log) is None
    log.close()
    assert list(read_events(tmp_path / "fresh", "restore_none"))
    assert restore(COMM, tmp_path / "not-yet-created", state) is None
    with pytest.raises(RestoreError, match="no manifest"):
        restore(COMM, tmp_path / "ckpt" / "step-00000003.h5", state)
    save_steps(tmp_path / "bad", [1])
    _flip_byte(tmp_path / "bad" / "ckpt" / "step-00000001" / "rank-00000.h5")
    with pytest.raises(RestoreError, match="no checkpoint .* could be restored"):
        restore(COMM, tmp_path / "bad", state)


@pytest.mark.parametrize("change,match", [
    (lambda s: s.pop("t"), "holds arrays"),
    (lambda s: s.__setitem__("i64", np.zeros(4, dtype=np.int32)), "dtype"),
    (lambda s: s.__setitem__("u", Block(np.zeros((6, 8)), (6, 8), (0, 0))), "global shape"),
    (lambda s: s.__setitem__("u", np.zeros((6, 7))), "distributed ulfmpy.Block"),
    (lambda s: s.__setitem__("i64", np.zeros(5, dtype=np.int64)), "shape"),
])
def test_state_mismatch_is_a_clear_error(tmp_path, change, match):
    save_steps(tmp_path, [1])
    state = make_state()
    change(state)
    with pytest.raises(RestoreError, match=match):
        restore(COMM, tmp_path, state)


def test_save_after_rollback_supersedes_newer(tmp_path):
    state, _, _ = save_steps(tmp_path, [10, 20, 30], keep=3)
    restore(COMM, tmp_path / "ckpt" / "step-00000010.h5", state)
    log = EventLog(tmp_path, 0)
    with CheckpointStore(COMM, tmp_path, mode="sync", keep=3, events=log) as store:
        store.save(20, state)
    log.close()
    assert [c.step for c in list_checkpoints(tmp_path)] == [10, 20]
    assert [e["removed"] for e in read_events(tmp_path, "checkpoint_superseded")] == [[20, 30]]


def test_bad_arguments():
    with pytest.raises(ConfigError):
        CheckpointStore(COMM, "/nonexistent", mode="lazy")
    with pytest.raises(ConfigError):
        CheckpointStore(COMM, "/nonexistent", keep=0)
    with pytest.raises(ConfigError, match="JSON"):
        CheckpointStore(COMM, "/nonexistent", mode="sync", meta={"x": object()})


@pytest.mark.parametrize("name,arr,match", [
    ("a/b", np.zeros(2), "without '/'"), ("_ulfmpy", np.zeros(2), "without"),
    ("o", np.array([None]), "dtype object")])
def test_unstorable_state_is_refused_before_writing(tmp_path, name, arr, match):
    with CheckpointStore(COMM, tmp_path, mode="sync") as store, \
            pytest.raises(CheckpointError, match=match):
        store.save(1, {name: arr})
    assert [c.step for c in list_checkpoints(tmp_path)] == []


def test_inspect_cli(tmp_path, capsys):
    save_steps(tmp_path, [1, 2, 3], keep=3)
    _flip_byte(tmp_path / "ckpt" / "step-00000003" / "rank-00000.h5")
    (tmp_path / "ckpt" / "step-00000004").mkdir()
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step" in out and out.count(" yes ") == 3 and " no " in out
    assert main(["inspect", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert out.count(" ok") == 2 and "FAILED: checksum mismatch in array 'u'" in out
    assert main(["inspect", str(tmp_path / "ckpt" / "step-00000002.h5"), "--manifest", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in data["checkpoints"]] == [2]
    assert data["manifest"]["arrays"]["u"]["global_shape"] == [6, 7]
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_inspect_needs_no_mpi(tmp_path):
    save_steps(tmp_path, [1])
    code = ("import sys; from ulfmpy.cli import main; rc = main(['inspect', sys.argv[1], "
            "'--verify', '--manifest']); assert 'mpi4py' not in sys.modules, 'mpi4py loaded'; "
            "sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "virtual dataset /u" in res.stdout


def _start_rank_with_a_store(run_dir, *, save: bool):
    """A child process with a store on ``run_dir`` (one rank of a node); prints the writer's pid."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import numpy as np
        from test_checkpoint_files import COMM
        from ulfmpy.checkpoint import CheckpointStore
        store = CheckpointStore(COMM, {str(run_dir)!r}, mode="async")
        store._helper.info()  # started up
        if {save}:
            store.save(1, {{"u": np.arange(1000.0)}})
            store.drain()
        print(store.helper_pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def _gone_within(pid, seconds=10.0):
    # a zombie (dead, waiting for its parent to reap it) counts as gone
    deadline = time.monotonic() + seconds
    while _proc_state(pid) not in ("gone", "Z") and time.monotonic() < deadline:
        time.sleep(0.02)
    return _proc_state(pid) in ("gone", "Z")


def _segments_gone_within(pid, seconds=10.0):
    """Whether the staging segments ``pid`` created leave /dev/shm in time."""
    from ulfmpy._ckpt_async import _shm_prefix

    deadline = time.monotonic() + seconds
    while (f"{_shm_prefix()}{pid}-" in " ".join(os.listdir("/dev/shm"))
           and time.monotonic() < deadline):
        time.sleep(0.02)
    return f"{_shm_prefix()}{pid}-" not in " ".join(os.listdir("/dev/shm"))


def test_one_writer_serves_the_node_outlives_a_dead_rank_and_leaves_with_the_last(tmp_path):
    """Two ranks of a node share one writer; the death of the rank that
    started it (SIGKILL) takes it down neither for the other rank nor with a
    staging segment left behind; it leaves when the last rank closes."""
    from ulfmpy._ckpt_async import _shm_prefix

    proc, pid = _start_rank_with_a_store(tmp_path, save=True)
    try:
        store = CheckpointStore(COMM, tmp_path, mode="async")
        assert store.helper_pid == pid, "a second rank of the node must use the same writer"
        assert f"{_shm_prefix()}{proc.pid}-" in " ".join(os.listdir("/dev/shm"))
    finally:
        proc.kill()
        proc.wait()
    assert _segments_gone_within(proc.pid), "the dead rank's staging segment must be unlinked"
    assert _proc_state(pid) not in ("gone", "Z"), "the writer must outlive the rank that started it"
    state = make_state()
    fill(state, 2)
    store.save(2, state)
    assert store.drain().step == 2
    store.close()
    assert _gone_within(pid), f"writer {pid} outlived its last rank"


def test_a_rank_that_hangs_up_and_dies_a_moment_later_leaves_no_segment(tmp_path):
    """A killed rank's socket closes before the kernel has finished its exit
    (under load, a while before): the writer gives the exit time to finish
    instead of taking the still-listed process for a live one. The rank here
    hangs up, lives 0.5 s more and dies without cleaning up."""
    store = CheckpointStore(COMM, tmp_path, mode="async")
    try:
        store._helper.info()
        script = textwrap.dedent(f"""
            import os, sys, time
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            import numpy as np
            from test_checkpoint_files import COMM
            from ulfmpy.checkpoint import CheckpointStore
            store = CheckpointStore(COMM, {str(tmp_path)!r}, mode="async")
            store.save(1, {{"u": np.arange(1000.0)}})
            store.drain()
            print(store.helper_pid, flush=True)
            store._helper._conn.close()  # the connection ends, the process not yet
            time.sleep(0.5)
            os._exit(0)  # no clean-up of its own
        """)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert int(proc.stdout.readline()) == store.helper_pid
        proc.wait(timeout=60)
        assert _segments_gone_within(proc.pid), \
            "the segment of a rank that died after hanging up must be unlinked"
    finally:
        store.close()


def test_a_stopped_writer_ends_with_the_job(tmp_path):
    """A stopped writer cannot notice its ranks leaving: it holds the run
    directory's job lock, so the launcher's end of the job (SIGKILL after
    SIGTERM) ends it too. (Once its starter is gone as well, its process
    group is orphaned and the kernel's SIGHUP ends it anyway.)"""
    from ulfmpy import jobctl

    (tmp_path / jobctl.JOB_LOCK_NAME).touch()
    proc, pid = _start_rank_with_a_store(tmp_path, save=False)
    try:
        os.kill(pid, signal.SIGSTOP)
        holders = jobctl.job_lock_holders(str(tmp_path))
        assert pid in holders, holders
        jobctl.end_processes(holders, grace=1.0)
        assert _gone_within(pid), f"stopped writer {pid} outlived the job"
    finally:
        proc.kill()
        proc.wait()


def _proc_state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "gone"


def test_helper_stops_at_close(tmp_path):
    store = CheckpointStore(COMM, tmp_path, mode="async")
    pid = store.helper_pid
    assert store._helper.info()["mpi_modules"] == []
    store.close()
    assert _gone_within(pid), "the writer must leave with its last rank"
    with pytest.raises(CheckpointError, match="closed"):
        store.save(1, make_state())
    store.close()  # idempotent


def test_a_writer_started_at_open_and_never_used_leaves_with_the_store(tmp_path):
    """``prepare`` starts the node's writer without waiting for it; a run that
    never saves must not leave it waiting 30 s for a first rank (it holds
    the job lock, so the launch would wait for it)."""
    store = CheckpointStore(COMM, tmp_path, mode="async")
    store.prepare(make_state())
    started = store._helper.started
    assert started is not None and store._helper._conn is None  # started, not waited for
    t0 = time.monotonic()
    store.close()
    assert _gone_within(started.pid) and time.monotonic() - t0 < 10
    started.wait(timeout=5)


def test_a_writer_found_dead_by_the_send_is_replaced_and_the_save_goes_on(tmp_path, monkeypatch):
    """A killed writer can look alive for a moment (its pid is there while
    the kernel tears it down); the save's send then fails with a broken
    pipe. The save reaches the writer that takes over instead of losing its
    checkpoint (seen in the MPI tier: a rank's step-3 save after the kill)."""
    from ulfmpy import _ckpt_async

    store = CheckpointStore(COMM, tmp_path, mode="async")
    state = make_state()
    store.save(1, state)
    assert store.drain().step == 1
    old = store.helper_pid
    os.kill(old, signal.SIGKILL)
    assert _gone_within(old)
    # As the race leaves it: the pid looks alive once more (the save's check),
    # the send finds the pipe broken.
    real_alive, looked = _ckpt_async._jobctl.alive, []

    def alive(pid):
        if pid == old and not looked:
            looked.append(pid)
            return True
        return real_alive(pid)

    monkeypatch.setattr(_ckpt_async._jobctl, "alive", alive)

    def broken(*_a, **_k):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(store._helper._conn, "send", broken)
    fill(state, 2)
    store.save(2, state)
    assert store.drain().step == 2
    assert store.helper_pid != old
    store.close()


def test_reset_abandons_uncommitted_and_keeps_memory_copy(tmp_path):
    state = make_state()
    log = EventLog(tmp_path, 0)
    with CheckpointStore(COMM, tmp_path, mode="async", events=log) as store:
        fill(state, 1)
        store.save(1, state)
        store.drain()
        store.reset(OneRank())  # a repaired communicator, nothing in flight: the copy stays
        assert store.memory_copy().step == 1
        fill(state, 2)
        store.save(2, state)
        store.reset(OneRank())  # step 2 can no longer commit; its buffer held step 1 before
        assert store.pending_step is None and store.memory_copy() is None
        assert store.held(staged=True) == {0: (2, copy_key(state))}  # staged, whole, uncommitted
        assert store.poll() is None and store.drain() is None
        fill(state, 3)
        store.save(3, state)
        assert store.drain().step == 3
        store.reset(OneRank(), same_ranks=False)  # a shrink: ranks renumbered, copies dropped
        assert store.held() == {}
    log.close()
    assert [e["step"] for e in read_events(tmp_path, "checkpoint_abandoned")] == [2]
    assert [(c.step, c.committed) for c in list_checkpoints(tmp_path)] == [(1, True), (3, True)]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_large_arrays_take_the_one_pass_writer(tmp_path, mode):
    """Arrays >= DIRECT_BYTES bypass HDF5's writer: bytes, checksums and views must still hold."""
    from ulfmpy._ckpt_helper import DIRECT_BYTES

    rng = np.random.default_rng(7)
    pad = np.zeros((1026, 302))
    pad[1:-1, 1:-1] = rng.random((1024, 300))
    state = {
        "u": Block(pad[1:-1, 1:-1], (1024, 300), (0, 0)),
        "i": rng.integers(-2**31, 2**31, size=DIRECT_BYTES // 4 + 3, dtype=np.int32),
        "z": (rng.random(DIRECT_BYTES // 16 + 5) + 1j).astype(np.complex128),
        "flags": rng.random(DIRECT_BYTES + 1) < 0.5,
        "be": rng.random(DIRECT_BYTES // 8 + 1).astype(">f8"),
    }
    ref = snapshot(state)
    with CheckpointStore(COMM, tmp_path, mode=mode) as store:
        store.save(1, state)
        store.drain()
    assert verify_checkpoint(tmp_path / "ckpt" / "step-00000001.h5").ok
    with h5py.File(tmp_path / "ckpt" / "step-00000001" / "rank-00000.h5", "r") as f:
        assert f["u"].attrs["checksum"] != "00000000"
        assert f["be"].dtype == np.dtype(">f8") and np.array_equal(f["be"][()], ref["be"])
    scramble(state)
    restore(COMM, tmp_path, state)
    assert_state(state, ref)
    _flip_byte(tmp_path / "ckpt" / "step-00000001" / "rank-00000.h5", name="z")
    v = verify_checkpoint(tmp_path / "ckpt" / "step-00000001")
    assert not v.ok and "array 'z'" in v.reason


def test_blocks_that_do_not_tile_are_refused(tmp_path):
    with CheckpointStore(COMM, tmp_path, mode="sync") as store, \
            pytest.raises(CheckpointError, match="tile the global array.*fix the app's state"):
        store.save(1, {"u": Block(np.zeros((2, 3)), (4, 3), (0, 0))})
    assert list_checkpoints(tmp_path) == []


def test_a_save_after_a_rollback_drops_the_abandoned_future(tmp_path):
    state = make_state()
    with CheckpointStore(COMM, tmp_path, mode="sync") as store:
        for step in (10, 20):
            fill(state, step)
            store.save(step, state)
        assert store.memory_copy(20) is not None
        fill(state, 10)
        ref10 = snapshot(state)
        store.save(15, state)  # after a rollback to 10: 20 is an abandoned future
        assert store.memory_copy(20) is None and store.memory_copy().step == 15
        assert [c.step for c in list_checkpoints(tmp_path)] == [10, 15]
        scramble(state)
        restore(COMM, tmp_path / "ckpt" / "step-00000010.h5", state)
        assert_state(state, ref10)


def test_paced_helper_hurries_when_the_rank_waits(tmp_path):
    """At a tiny duty the helper crawls while the rank computes; drain() makes it hurry."""
    state = {"u": np.arange(4 << 20, dtype=np.float64)}  # 32 MiB: 32 chunks
    log = EventLog(tmp_path, 0)
    with CheckpointStore(COMM, tmp_path, mode="async", events=log, helper_duty=1e-4) as store:
        store._helper.info()  # started up
        store.save(1, state)
        for _ in range(5):  # a few boundaries: the write is still crawling
            time.sleep(0.02)
            assert store.poll() is None
        rec = store.drain()  # without the hurry this would take many minutes
    log.close()
    assert rec.committed
    (ev,) = read_events(tmp_path, "checkpoint_committed")
    assert ev["rank_paced_s"] > 0 and ev["rank_hurried"] is True
    scramble_u = np.zeros_like(state["u"])
    restore(COMM, tmp_path, {"u": scramble_u})
    assert np.array_equal(scramble_u, state["u"])
    with pytest.raises(ConfigError, match="helper_duty"):
        CheckpointStore(COMM, tmp_path, mode="async", helper_duty=0)


class Counting(OneRank):
    def __init__(self):
        self.allgathers = 0

    def allgather(self, obj):
        self.allgathers += 1
        return [obj]


def test_poll_backs_off_while_the_write_runs(tmp_path):
    """Polls 1, 2, 4, 8, 16, then every 16th communicate; the rest are free."""
    comm = Counting()
    state = {"u": np.arange(4 << 20, dtype=np.float64)}
    with CheckpointStore(comm, tmp_path, mode="async", helper_duty=1e-4) as store:
        store._helper.info()
        store.save(1, state)
        before = comm.allgathers
        for _ in range(40):  # the crawling write cannot finish in between
            assert store.poll() is None
        assert comm.allgathers - before == 6  # polls 1, 2, 4, 8, 16, 32
        assert store.drain().committed


def test_store_sweeps_staging_buffers_of_killed_ranks(tmp_path):
    from ulfmpy._ckpt_async import _shm_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = Path("/dev/shm") / f"{_shm_prefix()}{dead.pid}-feed"
    alive = Path("/dev/shm") / f"{_shm_prefix()}{os.getpid()}-beef"
    for p in (orphan, alive):
        p.write_bytes(b"x")
    try:
        log = EventLog(tmp_path, 0)
        with CheckpointStore(COMM, tmp_path, mode="async", events=log) as store:
            store.save(1, {"u": np.zeros(3)})
            store.drain()
            mine = [n for n in os.listdir("/dev/shm") if n.startswith(f"{_shm_prefix()}{os.getpid()}-")]
            assert len(mine) >= 2  # this store's buffers (and the live decoy)
        log.close()
        assert not orphan.exists() and alive.exists()
        assert [e["segments"] for e in read_events(tmp_path, "checkpoint_shm_swept")] == [[orphan.name]]
        left = [n for n in os.listdir("/dev/shm") if n.startswith(f"{_shm_prefix()}{os.getpid()}-")]
        assert left == [alive.name]  # close() unlinked the store's own buffers
    finally:
        for p in (orphan, alive):
            p.unlink(missing_ok=True)


def test_h5py_is_imported_only_when_used(tmp_path):
    """Opening the checkpoint engine does not import h5py (about 40 ms a
    replacement rank would pay before resuming); writing a file does."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "import ulfmpy.checkpoint, ulfmpy.runtime\n"
        "before = 'h5py' in sys.modules\n"
        "from ulfmpy._ckpt_helper import write_rank_file\n"
        "from ulfmpy._ckpt_files import scan_steps\n"
        "from pathlib import Path\n"
        "scan_steps(Path(sys.argv[1]))\n"
        "print(before, 'h5py' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == ["False", "False"]
    read = subprocess.run([sys.executable, "-c",
                           "import sys\nfrom ulfmpy._ckpt_helper import h5py\n"
                           "h5py.File\nprint('h5py' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert read == ["True"]


def test_ranks_reaching_for_the_writer_at_once_start_one(tmp_path):
    """Four ranks of a node at their first save together: one writer is
    started, and all four use it."""
    import threading

    from ulfmpy._ckpt_async import NodeWriter

    writers = [NodeWriter(tmp_path) for _ in range(4)]
    go = threading.Barrier(4)
    pids = {}

    def reach(i):
        go.wait()
        pids[i] = writers[i].pid

    threads = [threading.Thread(target=reach, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert len(set(pids.values())) == 1 and len(pids) == 4, pids
        assert sum(w.started is not None for w in writers) == 1
    finally:
        for w in writers:
            w.close()
    assert _gone_within(pids[0])


def test_staging_starts_no_resource_tracker(tmp_path):
    """Staging segments are made without multiprocessing's resource tracker
    (one more process per rank, and "leaked" warnings after every kill)."""
    from multiprocessing import resource_tracker

    with CheckpointStore(COMM, tmp_path, mode="async") as store:
        state = make_state()
        fill(state, 1)
        store.save(1, state)
        assert store.drain().step == 1
        assert getattr(resource_tracker._resource_tracker, "_pid", None) is None


def test_pruning_keeps_the_newest_checkpoint_older_than_the_latency(tmp_path):
    """keep=2 would leave 40 and 50; a 25-step latency also keeps 20, the newest
    at least 25 steps older than 50, and 30 (a diagnosis at 55..64 needs 30)."""
    state = make_state()
    with CheckpointStore(COMM, tmp_path, mode="sync", keep=2) as store:
        store.latency = 25
        for step in (10, 20, 30, 40, 50):
            fill(state, step)
            store.save(step, state)
    assert [c.step for c in list_checkpoints(tmp_path) if c.committed] == [20, 30, 40, 50]


def test_a_repair_drops_checkpoints_of_the_timeline_it_abandoned(tmp_path):
    """A commit the writer finished as a rank died leaves a checkpoint newer
    than the one the run goes on from: rank 0 removes it, or the next commit's
    pruning would count it and delete the one the run relies on (seen: a
    restore that found its manifest gone, exit 76)."""
    from ulfmpy.checkpoints import Checkpoints
    from ulfmpy.config import Config

    state = make_state()
    with CheckpointStore(COMM, tmp_path, mode="sync", keep=2) as store:
        for step in (10, 20, 30):
            fill(state, step)
            store.save(step, state)
    log = EventLog(tmp_path, 0)
    ck = Checkpoints(Config(), str(tmp_path), log, None)
    ck._drop_abandoned_future(COMM, 20)
    log.close()
    assert [c.step for c in list_checkpoints(tmp_path)] == [20]
    [ev] = read_events(tmp_path, "checkpoint_superseded")
    assert ev["removed"] == [30] and ev["step"] == 20
