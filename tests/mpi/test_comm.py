"""The resilient communicator under 4 ranks: logging, replay, digests, errors.

Run: mpirun -n 4 python -m mpi4py -m pytest --with-mpi tests/mpi
"""

import numpy as np
import pytest
from mpi4py import MPI

from ulfmpy.comm import ResilientComm
from ulfmpy.errors import UnsupportedCall

from conftest import all_true  # noqa: E402

pytestmark = pytest.mark.mpi(min_size=4)






def ring_step(c, data, out):
    rank, size = c.Get_rank(), c.Get_size()
    c.Sendrecv(data, (rank + 1) % size, 7, out, (rank - 1) % size, 7)


def test_live_copies_receives_only_and_fetch_returns_sends(rc):
    c, _ = rc
    rank, size = c.Get_rank(), c.Get_size()
    right, left = (rank + 1) % size, (rank - 1) % size
    c.begin_segment()
    out = np.empty(3)
    ring_step(c, np.full(3, float(rank)), out)
    ok = np.array_equal(c.log.received[(left, 7, 0)], np.full(3, float(left)))
    ok &= c.log.sent == {}  # an array send is counted, not copied
    # The receiver's copy comes back to the sender as its original.
    c.fetch_originals({1, 2})
    if rank in (1, 2):
        ok &= set(c.log.sent) == {(right, 7, 0)}
        ok &= np.array_equal(c.log.sent[(right, 7, 0)], np.full(3, float(rank)))
    else:
        ok &= c.log.sent == {}
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


def test_sendrecv_log_is_exact_when_the_payload_changes_shape_or_dtype(rc):
    """Sendrecv's inlined logging reuses buffers from earlier segments (and
    from blocks grown for longer ones) only for the same shape and dtype."""
    c, _ = rc
    rank, size = c.Get_rank(), c.Get_size()
    left = (rank - 1) % size
    ok = True
    payloads = [np.arange(6.0), np.arange(6.0), np.arange(6, dtype=np.float32),
                np.arange(7.0), np.arange(6.0).reshape(2, 3)]
    for steps in (1, 3, 2):
        for p in payloads:
            c.begin_segment(steps)
            got = []
            for s in range(steps):
                out = np.empty_like(p)
                ring_step(c, p + 10 * rank + s, out)
                got.append(out.copy())
            for s in range(steps):
                kept = c.log.received[(left, 7, s)]
                ok &= kept.dtype == p.dtype and kept.shape == p.shape
                ok &= np.array_equal(kept, p + 10 * left + s) and np.array_equal(kept, got[s])
            c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


@pytest.mark.parametrize("change", [False, True])
def test_lone_replay_keeps_resent_and_verifies_later(rc, change):
    """A rank re-executing alone mid-segment (no originals yet) keeps what it
    re-sends; after the fetch, a difference names the receiver."""
    c, replay = rc
    rank, size = c.Get_rank(), c.Get_size()
    c.begin_segment()
    out = np.empty(3)
    ring_step(c, np.full(3, float(rank)), out)
    ok = True
    if rank == 1:
        c.begin_replay({1}, replay)
        ring_step(c, np.full(3, 99.0 if change else 1.0), np.zeros(3))
        ok &= c.end_replay(resume_live=True).contaminated == set()  # not known yet
    c.fetch_originals({1})
    if rank == 1:
        ok &= c.verify_resent() == ({2} if change else set())
        ok &= c.verify_resent() == set()  # the stash is consumed
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


@pytest.mark.parametrize("change", [False, True])
def test_replay_alone_serves_log_and_compares_digests(rc, change):
    c, replay = rc
    rank, size = c.Get_rank(), c.Get_size()
    c.begin_segment()
    out = np.empty(3)
    ring_step(c, np.full(3, float(rank)), out)
    ok = True
    c.fetch_originals({1})
    if rank == 1:
        c.begin_replay({1}, replay)
        out2 = np.zeros(3)
        ring_step(c, np.full(3, 99.0 if change else 1.0), out2)
        outcome = c.end_replay()
        ok = np.array_equal(out2, np.full(3, 0.0))  # from rank 0, via the log
        ok &= outcome.contaminated == ({2} if change else set())
        ok &= outcome.diverged is None
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


def test_replay_pair_is_live_between_members(rc):
    c, replay = rc
    rank = c.Get_rank()
    c.begin_segment()
    out = np.empty(2)
    ring_step(c, np.full(2, float(rank)), out)
    ok = True
    c.fetch_originals({1, 2})
    if rank in (1, 2):
        c.begin_replay({1, 2}, replay)
        got = np.zeros(2)
        ring_step(c, np.full(2, 10.0 + rank), got)
        outcome = c.end_replay()
        if rank == 2:  # from rank 1, live: the new value
            ok = np.array_equal(got, np.full(2, 11.0)) and outcome.contaminated == {3}
        else:  # from rank 0, logged
            ok = np.array_equal(got, np.full(2, 0.0)) and outcome.contaminated == set()
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


def test_nonblocking_and_objects(rc):
    c, replay = rc
    rank, size = c.Get_rank(), c.Get_size()
    right, left = (rank + 1) % size, (rank - 1) % size
    c.begin_segment()
    buf = np.empty(4)
    reqs = [c.Irecv(buf, left, 3), c.Isend(np.arange(4.0) + rank, right, 3)]
    c.Waitall(reqs)
    r = c.irecv(source=left, tag=5)
    c.isend({"from": rank}, right, 5).wait()
    obj = r.wait()
    ok = np.array_equal(buf, np.arange(4.0) + left) and obj == {"from": left}
    c.fetch_originals({3})
    if rank == 3:
        c.begin_replay({3}, replay)
        buf2 = np.empty(4)
        reqs = [c.Irecv(buf2, left, 3), c.Isend(np.arange(4.0) + rank, right, 3)]
        c.Waitall(reqs)
        r = c.irecv(source=left, tag=5)
        c.isend({"from": rank}, right, 5).wait()
        ok &= np.array_equal(buf2, buf) and r.wait() == {"from": left}
        ok &= c.end_replay().contaminated == set()
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


def obj_ring_step(c, payload, out):
    """A channel carrying an array, then an object, then an array (one seq per channel)."""
    rank, size = c.Get_rank(), c.Get_size()
    right, left = (rank + 1) % size, (rank - 1) % size
    c.Sendrecv(np.full(2, float(rank)), right, 9, out, left, 9)
    got = c.sendrecv(payload, right, 9, source=left, recvtag=9)
    c.Sendrecv(np.full(2, float(rank) + 0.5), right, 9, out, left, 9)
    return got


@pytest.mark.parametrize("lone", [False, True])
@pytest.mark.parametrize("change", [False, True])
def test_object_sends_are_checked_against_the_receivers_copy(rc, change, lone):
    """Pickled sends are neither kept nor counted live; a re-execution's
    object re-send is compared with what its receiver logged, at the right
    position among the channel's array messages."""
    c, replay = rc
    rank = c.Get_rank()
    c.begin_segment()
    out = np.empty(2)
    got = obj_ring_step(c, {"r": rank}, out)
    ok = c.log.sent == {} and got == {"r": (rank - 1) % c.Get_size()}
    ok &= sorted(k[2] for k in c.log.received) == [0, 1, 2]
    if not lone:
        c.fetch_originals({1})
    if rank == 1:
        c.begin_replay({1}, replay)
        out2 = np.empty(2)
        got2 = obj_ring_step(c, {"r": 99 if change else 1}, out2)
        outcome = c.end_replay(resume_live=lone)
        ok &= got2 == {"r": 0} and np.array_equal(out2, np.full(2, 0.5))
        ok &= outcome.diverged is None
        ok &= outcome.contaminated == (set() if lone else ({2} if change else set()))
    if lone:
        c.fetch_originals({1})
        if rank == 1:
            ok &= c.verify_resent() == ({2} if change else set())
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


@pytest.mark.parametrize("change", [False, True])
def test_collectives_replay_logged_result(rc, change):
    c, replay = rc
    rank = c.Get_rank()
    c.begin_segment()
    total = c.allreduce(rank + 1)
    arr = np.full(2, float(rank))
    res = np.empty(2)
    c.Allreduce(arr, res, op=MPI.MAX)
    b = c.bcast("hello" if rank == 0 else None, root=0)
    c.Barrier()
    ok = total == 10 and res[0] == 3.0 and b == "hello"
    if rank == 2:
        c.begin_replay({2}, replay)
        t2 = c.allreduce(rank + 1 + (5 if change else 0))
        res2 = np.empty(2)
        c.Allreduce(arr, res2, op=MPI.MAX)
        b2 = c.bcast(None, root=0)
        c.Barrier()
        out = c.end_replay()
        ok &= t2 == 10 and res2[0] == 3.0 and b2 == "hello"
        ok &= out.collective_mismatch is change
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


def test_replay_divergence_is_reported(rc):
    c, replay = rc
    rank = c.Get_rank()
    c.begin_segment()
    c.Barrier()
    ok = True
    if rank == 0:
        c.begin_replay({0}, replay)
        c.allreduce(1)  # the original made a Barrier here
        out = c.end_replay()
        ok = out.diverged is not None and "allreduce" in out.diverged
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


def test_unsupported_calls_name_themselves(rc):
    c, _ = rc
    c.begin_segment()
    errors = []
    for call in (lambda: c.Alltoallw([np.zeros(4), ...], [np.zeros(4), ...]),
                 lambda: c.Irecv(np.zeros(1), MPI.ANY_SOURCE, 0),
                 lambda: c.Iprobe(MPI.ANY_SOURCE, 0),
                 lambda: c.Send([1, 2], 0, 0)):
        try:
            call()
        except UnsupportedCall as exc:
            errors.append(str(exc))
    c.end_segment()
    ok = (len(errors) == 4 and "Alltoallw" in errors[0] and "ANY_SOURCE" in errors[1]
          and "ANY_SOURCE" in errors[2] and "numpy arrays" in errors[3])
    # outside a segment the same call passes through
    out = np.zeros(c.Get_size())
    c.Alltoall(np.full(c.Get_size(), float(c.Get_rank())), out)
    ok &= np.array_equal(out, np.arange(c.Get_size(), dtype=float))
    all_true(MPI.COMM_WORLD, ok)


@pytest.mark.parametrize("op", [MPI.SUM, MPI.PROD, MPI.MAX])
def test_object_allreduce_is_bitwise_mpi4pys_on_every_size(op):
    """ulfmpy reduces Python objects over the communicator itself (a revoke
    reaches it), in mpi4py's own order: the same bits, on 1 to 4 ranks."""
    world = MPI.COMM_WORLD
    rng = np.random.default_rng(world.Get_rank() + 11)
    oks = []
    for n in range(1, world.Get_size() + 1):
        sub = world.Split(0 if world.Get_rank() < n else MPI.UNDEFINED, world.Get_rank())
        if sub != MPI.COMM_NULL:
            sub.Set_errhandler(MPI.ERRORS_RETURN)
            c = ResilientComm(sub)
            x = float(rng.standard_normal() * 1e3) if op is not MPI.PROD else 1.0 + rng.random()
            arr = rng.standard_normal(5)
            ours, theirs = c.allreduce(x, op=op), sub.allreduce(x, op=op)
            oks.append(ours == theirs and type(ours) is float)
            if op is MPI.SUM:  # elementwise only for SUM/PROD (MAX of arrays is ambiguous)
                oks.append(np.array_equal(c.allreduce(arr, op=op), sub.allreduce(arr, op=op)))
            sub.Free()
    all_true(world, all(oks))
