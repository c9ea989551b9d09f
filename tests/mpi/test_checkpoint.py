# Run: mpirun --oversubscribe -n 4 python -m mpi4py -m pytest --with-mpi tests/mpi/test_checkpoint.py
"""Checkpoint engine under MPI: two-phase commit, async flush, fallback, N→M.

Every test combines its ranks' outcomes with an allgather before asserting,
so a failure on one rank fails all of them instead of hanging the others.
"""

from __future__ import annotations

import os
import time
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest

from ulfmpy.checkpoint import (
    CheckpointStore,
    list_checkpoints,
    restore,
    restore_from_memory,
)
from ulfmpy.errors import CheckpointError, RestoreError, WriterLost
from ulfmpy.state import Block, Rows, fingerprint

MPI = pytest.importorskip("mpi4py.MPI")

G = (37, 23)  # global shape: uneven splits on any rank count


@pytest.fixture
def comm():
    c = MPI.COMM_WORLD.Dup()
    yield c
    c.Free()


def split(n: int, parts: int, i: int) -> tuple[int, int]:
    base, extra = divmod(n, parts)
    return i * base + min(i, extra), base + (1 if i < extra else 0)


def global_field(step: int) -> np.ndarray:
    i, j = np.indices(G)
    return i * 100.0 + j + step * 0.5


def make_state(comm, step: int, *, by: str = "rows", per_rank: bool = True):
    """A state with a Block stored as the interior of a padded array (a view)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if by == "rows":
        s, n = split(G[0], size, rank)
        start, shape = (s, 0), (n, G[1])
    else:
        s, n = split(G[1], size, rank)
        start, shape = (0, s), (G[0], n)
    pad = np.zeros((shape[0] + 2, shape[1] + 2))
    state = {"u": Block(pad[1:-1, 1:-1], G, start)}
    if per_rank:
        state["r"] = np.zeros(5, dtype=np.int32)
        state["x"] = np.array(0.0)
    fill(state, comm, step)
    return state


def fill(state, comm, step: int) -> None:
    u = state["u"]
    u.local[...] = global_field(step)[u.slices]
    if "r" in state:
        state["r"][...] = np.arange(5, dtype=np.int32) + 10 * comm.Get_rank() + step
        state["x"][...] = step * 1.5 + comm.Get_rank()


def expected(state, comm, step: int) -> dict[str, np.ndarray]:
    ref = {k: (v.local.copy() if isinstance(v, Block) else v.copy()) for k, v in state.items()}
    fake = {k: (Block(ref[k], v.global_shape, v.start) if isinstance(v, Block) else ref[k])
            for k, v in state.items()}
    fill(fake, comm, step)
    return ref


def scramble(state) -> None:
    for v in state.values():
        arr = v.local if isinstance(v, Block) else v
        arr[...] = -7


def same(state, ref) -> bool:
    return all(np.array_equal(v.local if isinstance(v, Block) else v, ref[k])
               for k, v in state.items())


def agree(comm, ok, detail="") -> None:
    """Assert on every rank that every rank is ok (no rank hangs, all fail together)."""
    results = comm.allgather((bool(ok), str(detail)))
    bad = [(r, d) for r, (o, d) in enumerate(results) if not o]
    assert not bad, bad


def outcome(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - collected and asserted together
        return None, exc


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_round_trip_commit_prune_vds(comm, mpi_tmp_path, mode):
    run = mpi_tmp_path / f"rt-{mode}"
    state = make_state(comm, 1)
    ok, detail = True, []
    with CheckpointStore(comm, run, mode=mode, keep=2, meta={"app": "test"}) as store:
        pid = store.helper_pid
        if mode == "async":
            mods = store._helper.info()["mpi_modules"]  # the writer must never load MPI
            ok &= mods == []
            detail.append(f"writer modules {mods}")
            # Every rank runs on this one machine: one writer serves them all.
            writers = comm.allgather(pid)
            ok &= len(set(writers)) == 1
            detail.append(f"writers {writers}")
        for step in (1, 2, 3):
            fill(state, comm, step)
            store.save(step, state)
            if mode == "async":  # only poll/drain commit: no manifest yet on any rank
                ok &= not (run / "ckpt" / f"step-{step:08d}.h5").exists()
            store.poll()
        store.drain()
        recs = [r.as_dict() for r in store.records]
        ok &= [r["step"] for r in recs] == [1, 2, 3] and all(r["committed"] for r in recs)
        ok &= all(r["bytes"] == recs[0]["bytes"] > 0 and r["exposed_s"] > 0 for r in recs)
        detail.append(f"records {recs}")
        ref3 = expected(state, comm, 3)
        scramble(state)
        copy = store.memory_copy()
        restore_from_memory(state, copy)
        ok &= copy.step == 3 and same(state, ref3)
    if pid is not None:  # the writer leaves with the last rank, and the staging buffers are gone
        from ulfmpy._ckpt_async import _shm_prefix

        def running() -> bool:  # a zombie (waiting for the rank that started it) is gone
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False

        comm.Barrier()
        deadline = time.monotonic() + 10
        while running() and time.monotonic() < deadline:
            time.sleep(0.02)
        ok &= not running()
        mine = f"{_shm_prefix()}{os.getpid()}-"
        ok &= not [n for n in os.listdir("/dev/shm") if n.startswith(mine)]
    scramble(state)
    rec = restore(comm, run, state)
    ok &= rec.step == 3 and rec.fallbacks == [] and same(state, ref3)
    if comm.Get_rank() == 0:
        steps = [(c.step, c.committed) for c in list_checkpoints(run)]
        ok &= steps == [(2, True), (3, True)]
        detail.append(f"on disk {steps}")
        with h5py.File(run / "ckpt" / "step-00000003.h5", "r") as f:  # virtual datasets
            ok &= np.array_equal(f["u"][()], global_field(3))
            ok &= f["r"].shape == (comm.Get_size(), 5)
            ok &= np.array_equal(f["r"][1], np.arange(5) + 10 + 3)
            ok &= np.array_equal(f["x"][()], np.arange(comm.Get_size()) + 4.5)
            ok &= int(f.attrs["nranks"]) == comm.Get_size() and '"app"' in f.attrs["meta"]
    agree(comm, ok, detail)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_partner_copies_are_the_staging_buffers(comm, mpi_tmp_path, mode):
    """Each rank's state is staged in its holder's memory and written from
    there (docs/internals.md, "Copies of the state"): every rank file holds
    its own rank's data, nobody keeps its own copy, and every rank gets its
    state back from its holder's memory, or the files when the holder is gone."""
    from ulfmpy._ckpt_async import layout_key
    from ulfmpy.partner import holders, restore_from_copies
    from ulfmpy.state import normalize_state

    rank, size = comm.Get_rank(), comm.Get_size()
    run = mpi_tmp_path / f"partner-{mode}"
    hold = holders(["one-host"] * size)
    state = normalize_state(make_state(comm, 1))  # sorted by name, as layouts are
    key = layout_key(normalize_state(state))
    ok, detail = True, []
    with CheckpointStore(comm, run, mode=mode, keep=2, holders=hold) as store:
        ok &= store.holder == (rank + 1) % size and store.wards == [(rank - 1) % size]
        for step in (1, 2, 3):
            fill(state, comm, step)
            data = {n: np.array(v.local if isinstance(v, Block) else v) for n, v in state.items()}
            store.save(step, state, data=data)
            store.poll()
        store.drain()
        ref3 = expected(state, comm, 3)
        held = store.held()
        ok &= store.memory_copy() is None and list(held) == [(rank - 1) % size]
        ok &= held[(rank - 1) % size][0] == 3
        detail.append(f"held {held}")
        # Every rank back from its holder's memory.
        scramble(state)
        into = [np.empty_like(v.local if isinstance(v, Block) else v) for v in state.values()]
        step, src = restore_from_copies(comm, 3, key, held, store.copy_views, into)
        for v, a in zip(state.values(), into):
            np.copyto(v.local if isinstance(v, Block) else v, a)
        ok &= step == 3 and src == hold[rank] and same(state, ref3)
        detail.append(f"source {src}")
        # Rank 1 is a replacement: it held 0's copy, which died with it.
        scramble(state)
        mine = {} if rank == 1 else held
        _, src = restore_from_copies(comm, 3, key, mine, store.copy_views, into)
        if src is None:
            got = restore(comm, run / "ckpt" / "step-00000003.h5", state)
            ok &= got.step == 3
        else:
            restore(comm, run / "ckpt" / "step-00000003.h5", normalize_state(make_state(comm, 0)))
            for v, a in zip(state.values(), into):
                np.copyto(v.local if isinstance(v, Block) else v, a)
        ok &= (src is None) == (rank == 0) and same(state, ref3)
    if rank == 0:
        with h5py.File(run / "ckpt" / "step-00000003.h5", "r") as f:
            ok &= np.array_equal(f["u"][()], global_field(3))
            ok &= all(np.array_equal(f["r"][r], np.arange(5) + 10 * r + 3) for r in range(size))
            ok &= np.array_equal(f["x"][()], np.arange(size) + 4.5)
    agree(comm, ok, detail)


def _restore_on(sub, run, by):
    state = make_state(sub, 0, by=by, per_rank=False)
    scramble(state)
    rec = restore(sub, run, state)
    return rec.step == 7 and rec.nranks > 0 and same(state, expected(state, sub, 7))


@pytest.mark.mpi(min_size=3)
def test_restore_n_to_m(comm, mpi_tmp_path):
    rank, size = comm.Get_rank(), comm.Get_size()
    run = mpi_tmp_path / "n2m"
    with CheckpointStore(comm, run, mode="sync") as store:
        store.save(7, make_state(comm, 7, per_rank=False))
    results = []
    for m in (size - 1, 2):  # fewer ranks, and a different (column) decomposition
        sub = comm.Split(0 if rank < m else MPI.UNDEFINED, rank)
        if sub != MPI.COMM_NULL:
            results.append(outcome(_restore_on, sub, run, "cols"))
            sub.Free()
    # M > N: write on 2 ranks, restore on all of them
    run2 = mpi_tmp_path / "m2n"
    sub = comm.Split(0 if rank < 2 else MPI.UNDEFINED, rank)
    if sub != MPI.COMM_NULL:
        with CheckpointStore(sub, run2, mode="sync") as store:
            store.save(7, make_state(sub, 7, per_rank=False))
        sub.Free()
    results.append(outcome(_restore_on, comm, run2, "rows"))
    agree(comm, all(r is True and e is None for r, e in results), results)


def particles(comm, cap: int = 40, *, fill: bool = True):
    """A Rows collection: rank r holds 3r+2 items (uneven), ids and 2-vectors."""
    rank = comm.Get_rank()
    n = np.array(3 * rank + 2 if fill else 0)
    first = sum(3 * r + 2 for r in range(rank))
    ids, xy = np.full(cap, -1.0), np.full((cap, 2), -1.0)
    if fill:
        ids[:n] = np.arange(first, first + n)
        xy[:n] = np.stack([ids[:n] * 0.5, -ids[:n]], axis=1)
    return {"id": Rows(ids, n), "xy": Rows(xy, n), "n": n}


def _rows_on(sub, run, total):
    state = particles(sub, fill=False)
    rec = restore(sub, run, state)
    n = int(state["n"])
    lo, hi = total * sub.Get_rank() // sub.Get_size(), total * (sub.Get_rank() + 1) // sub.Get_size()
    ids = state["id"].local[:n]
    return (rec.step == 5 and n == hi - lo and np.array_equal(ids, np.arange(lo, hi))
            and np.array_equal(state["xy"].local[:n], np.stack([ids * 0.5, -ids], axis=1)))


@pytest.mark.mpi(min_size=3)
def test_rows_restore_onto_another_rank_count(comm, mpi_tmp_path):
    """A ulfmpy.Rows collection is dealt out N→M: the old ranks' rows in rank
    order, an even contiguous share each, the count set; its fingerprint
    does not depend on where the rows sit."""
    rank, size = comm.Get_rank(), comm.Get_size()
    total = sum(3 * r + 2 for r in range(size))
    run = mpi_tmp_path / "rows"
    state = particles(comm)
    want = fingerprint(comm, state)
    with CheckpointStore(comm, run, mode="sync") as store:
        store.save(5, state)
    results = []
    for m in (size - 1, 2):
        sub = comm.Split(0 if rank < m else MPI.UNDEFINED, rank)
        if sub != MPI.COMM_NULL:
            results.append(outcome(_rows_on, sub, run, total))
            sub.Free()
    # the same rows spread another way give the same fingerprint
    moved = particles(comm, fill=False)
    restore(comm, run, moved)
    moved["id"].local[:int(moved["n"])] = moved["id"].local[:int(moved["n"])][::-1].copy()
    moved["xy"].local[:int(moved["n"])] = moved["xy"].local[:int(moved["n"])][::-1].copy()
    results.append((fingerprint(comm, moved) == want, None))
    # a state too small for its share is refused with the reason
    sub = comm.Split(0 if rank == 0 else MPI.UNDEFINED, rank)
    if sub != MPI.COMM_NULL:
        _, exc = outcome(restore, sub, run, particles(sub, cap=total - 1, fill=False))
        ok = isinstance(exc, RestoreError) and "give the array more capacity" in str(exc)
        results.append((ok, None if ok else str(exc)))
        sub.Free()
    agree(comm, all(r is True and e is None for r, e in results), results)


@pytest.mark.mpi(min_size=3)
def test_per_rank_state_on_other_count_is_an_error(comm, mpi_tmp_path):
    rank, size = comm.Get_rank(), comm.Get_size()
    run = mpi_tmp_path / "perrank"
    with CheckpointStore(comm, run, mode="sync") as store:
        store.save(4, make_state(comm, 4))
    ok, detail = True, None
    sub = comm.Split(0 if rank < size - 1 else MPI.UNDEFINED, rank)
    if sub != MPI.COMM_NULL:
        _, exc = outcome(restore, sub, run, make_state(sub, 0))
        detail = str(exc)
        ok = isinstance(exc, RestoreError) and f"written by {size} ranks" in detail \
            and f"this run has {size - 1}" in detail and "ulfmpy.Block" in detail
        sub.Free()
    agree(comm, ok, detail)


def _damage(run: Path, kind: str, victim: int) -> None:
    step_dir = run / "ckpt" / "step-00000002"
    rank_file = step_dir / f"rank-{victim:05d}.h5"
    if kind == "no_manifest":
        (run / "ckpt" / "step-00000002.h5").unlink()
    elif kind == "deleted":
        rank_file.unlink()
    elif kind == "truncated":
        os.truncate(rank_file, rank_file.stat().st_size // 2)
    elif kind == "flipped":
        with h5py.File(rank_file, "r") as f:
            offset = f["u"].id.get_offset() + 17
        with open(rank_file, "r+b") as fh:
            fh.seek(offset)
            byte = fh.read(1)
            fh.seek(offset)
            fh.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind,reason", [("no_manifest", "no manifest"), ("deleted", "missing"),
                                         ("truncated", "truncated"), ("flipped", "checksum mismatch")])
def test_torn_newest_falls_back(comm, mpi_tmp_path, kind, reason):
    run = mpi_tmp_path / f"torn-{kind}"
    state = make_state(comm, 1)
    with CheckpointStore(comm, run, mode="sync") as store:
        store.save(1, state)
        fill(state, comm, 2)
        store.save(2, state)
    if comm.Get_rank() == 0:
        _damage(run, kind, victim=comm.Get_size() - 1)
    comm.Barrier()
    scramble(state)
    rec, exc = outcome(restore, comm, run, state)
    ok = exc is None and rec.step == 1 and len(rec.fallbacks) == 1
    ok = ok and rec.fallbacks[0]["step"] == 2 and reason in rec.fallbacks[0]["reason"]
    ok = ok and same(state, expected(state, comm, 1))
    agree(comm, ok, (rec, exc))


@pytest.mark.mpi(min_size=2)
def test_failed_write_fails_everywhere_and_keeps_committed(comm, mpi_tmp_path, monkeypatch):
    import ulfmpy.checkpoint as ck

    run = mpi_tmp_path / "fail-sync"
    state = make_state(comm, 1)
    with CheckpointStore(comm, run, mode="sync") as store:
        store.save(1, state)
        if comm.Get_rank() == 1:
            def broken(*a, **k):
                raise OSError("No space left on device (test)")
            monkeypatch.setattr(ck, "_write_rank_file", broken)
        _, exc = outcome(store.save, 2, state)
        monkeypatch.undo()
        committed = store.last_committed.step
    ok = isinstance(exc, CheckpointError) and "rank 1" in str(exc) and "No space" in str(exc)
    ok = ok and committed == 1 and not (run / "ckpt" / "step-00000002.h5").exists()
    scramble(state)
    rec = restore(comm, run, state)
    agree(comm, ok and rec.step == 1 and same(state, expected(state, comm, 1)), exc)


@pytest.mark.mpi(min_size=2)
def test_the_writers_death_fails_the_checkpoint_then_a_new_writer_takes_over(comm, mpi_tmp_path):
    run = mpi_tmp_path / "fail-async"
    state = make_state(comm, 1)
    ok, detail = True, []
    with CheckpointStore(comm, run, mode="async") as store:
        store.save(1, state)
        store.drain()
        victim = comm.Get_rank() == 1
        if victim:  # stall the writer so the jobs are queued, then kill it mid-checkpoint
            os.kill(store.helper_pid, signal.SIGSTOP)
        fill(state, comm, 2)
        store.save(2, state)
        if victim:
            os.kill(store.helper_pid, signal.SIGKILL)
        _, exc = outcome(store.drain)
        # The node's one writer served every rank: each lost its write, and
        # every rank learns it together as a WriterLost (a run goes on).
        ok &= isinstance(exc, WriterLost) and "writer died" in str(exc)
        detail.append(str(exc))
        # Staged over for step 2: step 1 is on disk only now.
        ok &= store.last_committed.step == 1 and store.memory_copy() is None
        fill(state, comm, 3)
        store.save(3, state)  # a new writer takes over
        rec = store.drain()
        ok &= rec is not None and rec.step == 3
    scramble(state)
    rec = restore(comm, run, state)
    ok &= rec.step == 3 and same(state, expected(state, comm, 3))
    agree(comm, ok, detail)


@pytest.mark.mpi(min_size=2)
def test_dimension_scales_label_the_global_views(comm, mpi_tmp_path):
    run = mpi_tmp_path / "dims"
    base = make_state(comm, 2)
    u = base["u"]
    cols = np.linspace(0.0, 1.0, G[1])
    state = {"u": Block(u.local, G, u.start, dims=("row", "col"), coords={"col": cols}),
             "r": base["r"]}
    ok, detail = True, []
    with CheckpointStore(comm, run, mode="sync", keep=2) as store:
        store.save(2, state)
    if comm.Get_rank() == 0:
        with h5py.File(run / "ckpt" / "step-00000002.h5", "r") as f:
            ok &= [d.label for d in f["u"].dims] == ["", ""]  # labels are the scales' names
            names = [[s.name for s in d.values()] for d in f["u"].dims]
            ok &= names == [["/row"], ["/col"]]
            ok &= np.array_equal(f["col"][()], cols) and np.array_equal(f["row"][()], np.arange(G[0]))
            ok &= [[s.name for s in d.values()] for d in f["r"].dims] == [["/rank"], ["/r_dim0"]]
            ok &= np.array_equal(f["rank"][()], np.arange(comm.Get_size()))
            detail.append(names)
    # a dimension named like a state array is refused, on every rank, naming both
    clash = {"u": Block(u.local, G, u.start, dims=("row", "x")), "x": base["x"]}
    with CheckpointStore(comm, mpi_tmp_path / "clash", mode="sync", keep=2) as store:
        _, err = outcome(store.save, 1, clash)
    ok &= isinstance(err, CheckpointError) and "dimension name 'x'" in str(err)
    detail.append(repr(err))
    agree(comm, ok, detail)
