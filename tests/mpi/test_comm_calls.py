"""The calls apps write as tutorials write them, logged and replayed on 4 ranks:
datatypes, wildcards, mpi4py's own request completion, probes, send modes,
and the rest of MPI's collectives.

Run: mpirun -n 4 python -m mpi4py -m pytest --with-mpi tests/mpi
"""

import numpy as np
import pytest
from mpi4py import MPI

from ulfmpy._comm_request import Request, _MPIRequest

from conftest import all_true  # noqa: E402

pytestmark = pytest.mark.mpi(min_size=4)






def replay_alone(c, replay, rank, body):
    """Rank ``rank`` re-executes ``body`` alone (everything from the log);
    returns its outcome there, None elsewhere."""
    c.fetch_originals({rank})
    if c.Get_rank() != rank:
        return None
    c.begin_replay({rank}, replay)
    body()
    return c.end_replay()


def test_column_datatype_logs_the_column_and_replay_writes_only_it(rc):
    """A halo column sent as [u, 1, column]: the log holds its 6 doubles, not
    the 6x5 array; replay writes those 6 and leaves the rest alone; the same
    re-sent column is not a contamination."""
    c, replay = rc
    rank, size = c.Get_rank(), c.Get_size()
    left, right = (rank - 1) % size, (rank + 1) % size
    col = MPI.DOUBLE.Create_vector(6, 1, 5).Commit()
    u = np.arange(30.0).reshape(6, 5) + 100 * rank

    def exchange(u):
        # the last interior column to the right, into the first (ghost) column from the left
        reqs = [c.Irecv([u, 1, col], source=left),
                c.Isend([u.reshape(-1)[3:], 1, col], dest=right)]
        MPI.Request.Waitall(reqs)  # mpi4py's own class: logged at the next call

    c.begin_segment()
    exchange(u)
    c.Barrier()
    ch = c.log.rx[(left, MPI.ANY_TAG)]
    ok = ch.n == 1 and ch.items[0].nbytes == 6 * 8
    ok &= np.array_equal(ch.items[0].view(np.float64), np.arange(3.0, 30, 5) + 100 * left)
    ok &= ch.tags == [None]  # completed by mpi4py's class: no status, the tag is not known
    ok &= np.array_equal(u[:, 0], np.arange(3.0, 30, 5) + 100 * left)
    v = np.full((6, 5), -1.0)
    v.reshape(-1)[3::5] = u.reshape(-1)[3::5]
    out = replay_alone(c, replay, 2, lambda: (exchange(v), c.Barrier()))
    if out is not None:
        ok &= np.array_equal(v[:, 0], u[:, 0]) and (v[:, 1:3] == -1).all()
        ok &= out.contaminated == set() and not out.diverged
    c.end_segment()
    col.Free()
    all_true(MPI.COMM_WORLD, ok)


@pytest.mark.parametrize("change", [False, True])
def test_any_tag_with_a_named_source_replays_in_order(rc, change):
    """Default tags (Isend tag 0, Irecv ANY_TAG) and a second message with
    another tag: replay hands each receive what it got, with its tag; a
    changed re-send names its receiver."""
    c, replay = rc
    rank, size = c.Get_rank(), c.Get_size()
    left, right = (rank - 1) % size, (rank + 1) % size
    got = [np.zeros(2), np.zeros(2)]

    def body(shift):
        reqs = [c.Irecv(got[0], source=left), c.Irecv(got[1], source=left)]
        c.Isend(np.full(2, rank + shift), dest=right).Wait()
        c.Send(np.full(2, rank + 0.5), dest=right, tag=5)
        st = MPI.Status()
        Request.Waitall(reqs, [st, MPI.Status()])
        return st

    c.begin_segment()
    body(0.0)
    first = [g.copy() for g in got]
    ok = np.array_equal(first[0], np.full(2, float(left))) and np.array_equal(first[1], np.full(2, left + 0.5))
    ok &= c.log.rx[(left, MPI.ANY_TAG)].tags == [0, 5]
    got = [np.zeros(2), np.zeros(2)]
    out = replay_alone(c, replay, 1, lambda: body(7.0 if change else 0.0))
    if out is not None:
        ok &= all(np.array_equal(a, b) for a, b in zip(got, first))
        ok &= out.contaminated == ({2} if change else set())
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


def test_any_source_recv_replays_the_source_it_matched(rc):
    c, replay = rc
    rank, size = c.Get_rank(), c.Get_size()
    buf, st = np.zeros(1), MPI.Status()
    order = []

    def body():
        order.clear()
        if rank == 0:
            for _ in range(size - 1):
                c.Recv(buf, MPI.ANY_SOURCE, 3, st)
                order.append((st.Get_source(), float(buf[0])))
        else:
            c.Send(np.full(1, 10.0 * rank), 0, 3)

    c.begin_segment()
    body()
    first = list(order)
    ok = rank != 0 or sorted(first) == [(r, 10.0 * r) for r in range(1, size)]
    out = replay_alone(c, replay, 0, body)
    if out is not None:
        ok &= order == first and not out.diverged
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


def test_iprobe_answers_and_send_modes_replay(rc):
    """An Iprobe's answer depends on timing: replay gives back the logged one.
    Ssend, Bsend, Rsend and Sendrecv_replace are logged like Send."""
    c, replay = rc
    rank, size = c.Get_rank(), c.Get_size()
    left, right = (rank - 1) % size, (rank + 1) % size
    answers = []
    MPI.Attach_buffer(bytearray(1 << 16))
    buf = np.zeros(3)

    def body():
        answers.clear()
        answers.append(c.Iprobe(left, 9))
        c.Ssend(np.full(3, rank + 0.25), right, 9) if rank % 2 else None
        c.Recv(buf, left, 9) if left % 2 else None
        c.Bsend(np.full(3, rank + 0.5), right, 10)
        c.Recv(buf, left, 10)
        answers.append(float(buf[0]))
        rb = np.full(3, float(rank))
        c.Sendrecv_replace(rb, right, 11, left, 11)
        answers.append(float(rb[0]))
        c.Barrier()

    c.begin_segment()
    body()
    first = list(answers)
    ok = first[1:] == [left + 0.5, float(left)]
    out = replay_alone(c, replay, 3, body)
    if out is not None:
        ok &= answers == first and not out.diverged and out.contaminated == set()
    c.end_segment()
    MPI.Detach_buffer()
    all_true(MPI.COMM_WORLD, ok)


def test_more_collectives_equal_mpi4py_and_replay_from_the_log(rc):
    c, replay = rc
    rank, size = c.Get_rank(), c.Get_size()
    world = c.mpi_comm
    x = np.arange(size * 2, dtype=np.float64) + rank * 0.1

    def calls(comm):
        out = {}
        r = np.zeros_like(x) if comm.Get_rank() == 1 else None
        comm.Reduce(x, r, MPI.SUM, 1)
        out["Reduce"] = r
        g = np.zeros((size, 2)) if comm.Get_rank() == 0 else None
        comm.Gather(x[:2], g, 0)
        out["Gather"] = g
        s = np.zeros(2)
        comm.Scatter(x.reshape(size, 2) if comm.Get_rank() == 2 else None, s, 2)
        out["Scatter"] = s
        a = np.zeros_like(x)
        comm.Alltoall(x, a)
        out["Alltoall"] = a
        counts = np.arange(1, size + 1)
        av = np.zeros(int(counts.sum()))
        send = np.full(comm.Get_rank() + 1, float(comm.Get_rank()))
        comm.Allgatherv(send, [av, counts, np.r_[0, np.cumsum(counts)[:-1]], MPI.DOUBLE])
        out["Allgatherv"] = av
        sc = np.zeros_like(x)
        comm.Scan(x, sc, MPI.SUM)
        out["Scan"] = sc
        rs = np.zeros(2)
        comm.Reduce_scatter_block(x, rs, MPI.SUM)
        out["Reduce_scatter_block"] = rs
        f = 1.5 ** comm.Get_rank() + 0.1
        out["reduce"] = comm.reduce(f, MPI.SUM, 3)
        out["scan"] = comm.scan(f, MPI.SUM)
        out["exscan"] = comm.exscan(f, MPI.PROD)
        out["gather"] = comm.gather(("r", comm.Get_rank()), 1)
        out["scatter"] = comm.scatter(list(range(10, 10 + size)) if comm.Get_rank() == 0 else None, 0)
        out["alltoall"] = comm.alltoall([comm.Get_rank() * 10 + k for k in range(size)])
        return out

    def same(a, b):
        return all((a[k] is None and b[k] is None) or np.array_equal(np.asarray(a[k], dtype=object),
                                                                      np.asarray(b[k], dtype=object))
                   for k in a)

    plain = calls(world)
    c.begin_segment()
    live = calls(c)
    ok = same(live, plain)
    ok &= [k for k, _, _ in c.log.collectives][:3] == ["Reduce", "Gather", "Scatter"]
    got = {}
    out = replay_alone(c, replay, 2, lambda: got.update(calls(c)))
    if out is not None:
        ok &= same(got, plain) and not out.diverged and not out.collective_mismatch
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


def test_requests_are_mpi4py_requests(rc):
    """ulfmpy's requests are MPI.Request objects: mpi4py's Waitall, Testall and
    Waitany complete them; a receive completed that way is logged at the
    next call on the communicator."""
    c, _ = rc
    rank, size = c.Get_rank(), c.Get_size()
    left, right = (rank - 1) % size, (rank + 1) % size
    c.begin_segment()
    got = np.zeros(4)
    r = c.Irecv(got, left, 4)
    s = c.Isend(np.full(4, float(rank)), right, 4)
    ok = isinstance(r, _MPIRequest) and isinstance(s, _MPIRequest)
    _MPIRequest.Waitall([r, s])
    ok &= c.log.rx[(left, 4)].items[0] is None or not np.array_equal(
        c.log.rx[(left, 4)].items[0], got)  # not logged yet
    c.Barrier()  # the next call logs it
    ok &= np.array_equal(c.log.rx[(left, 4)].items[0], np.full(4, float(left)))
    r = c.Irecv(got, left, 6)
    c.Send(np.full(4, rank + 1.0), right, 6)
    ok &= Request.Waitany([r]) == 0 and Request.Testall([r])
    ok &= np.array_equal(c.log.rx[(left, 6)].items[0], np.full(4, left + 1.0))
    # Only the first was logged late (after mpi4py completed it), so only
    # that one makes this rank's log untrusted for a replay.
    ok &= c.late_receives() == 1
    c.end_segment()
    c.begin_segment()
    ok &= c.late_receives() == 0
    r = c.Irecv(got, left, 7)
    c.Send(np.full(4, 7.0), right, 7)
    r.Wait()
    ok &= c.late_receives() == 0
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


@pytest.mark.parametrize("dims,periods", [([2, 2], [False, False]), ([2, 2], [True, False]),
                                          ([4], [True]), ([1, 4], [False, True]),
                                          ([2, 1, 2], [True, True, False])])
def test_cart_topology_is_mpis(rc, dims, periods):
    """The Cartesian mapping ulfmpy computes (Open MPI's topology component is
    not fault tolerant) answers exactly as MPI's own Cartcomm does."""
    c, replay = rc
    c.open_contexts(replay)
    mine = c.Create_cart(dims, periods=periods, reorder=True)
    ref = c.mpi_comm.Create_cart(dims, periods=periods, reorder=False)
    ok = mine.Get_topo() == ref.Get_topo() and mine.dims == ref.dims
    ok &= all(mine.Get_coords(r) == ref.Get_coords(r) for r in range(c.Get_size()))
    for d in range(len(dims)):
        for disp in (1, -1, 2):
            ok &= tuple(mine.Shift(d, disp)) == tuple(ref.Shift(d, disp))
    ok &= mine.Get_cart_rank(ref.Get_coords(c.Get_rank())) == c.Get_rank()
    ref.Free()
    c.drop_children()
    all_true(MPI.COMM_WORLD, ok)


def test_derived_comm_messages_are_logged_and_unprotected_ones_refused(rc):
    """A Dup'ed communicator logs its own receives (its own context: a
    message on it never matches one on the parent); Split_type is refused."""
    c, replay = rc
    c.open_contexts(replay)
    d = c.Dup()
    rank, size = c.Get_rank(), c.Get_size()
    left, right = (rank - 1) % size, (rank + 1) % size
    c.begin_segment()
    a, b = np.zeros(2), np.zeros(2)
    r1 = d.Irecv(a, left, 0)
    r2 = c.Irecv(b, left, 0)
    c.Send(np.full(2, 1.0 + rank), right, 0)
    d.Send(np.full(2, 100.0 + rank), right, 0)
    MPI.Request.Waitall([r1, r2])
    ok = np.array_equal(a, np.full(2, 100.0 + left)) and np.array_equal(b, np.full(2, 1.0 + left))
    c.Barrier()
    ok &= np.array_equal(d.log.rx[(left, 0)].items[0], a) and c.log.rx[(left, 0)].n == 1
    c.end_segment()
    try:
        c.Split_type(MPI.COMM_TYPE_SHARED)
        ok = False
    except Exception as exc:
        ok &= "does not protect" in str(exc)
    c.drop_children()
    all_true(MPI.COMM_WORLD, ok)


def test_rt_comm_is_an_mpi4py_communicator_that_follows_repairs(rc):
    """rt.comm goes where mpi4py wants a communicator (MPI.File.Open), and
    after a reset onto another communicator (what a repair does) its handle
    is that one's; mpi4py calls ulfmpy does not log are refused in segments."""
    import os
    import tempfile

    c, _ = rc
    rank = c.Get_rank()
    ok = isinstance(c, MPI.Intracomm) and c.handle == c.mpi_comm.handle
    d = MPI.COMM_WORLD.bcast(tempfile.mkdtemp() if rank == 0 else None)
    other = c.mpi_comm.Dup()
    other.Set_errhandler(MPI.ERRORS_RETURN)
    old = c.mpi_comm
    for i, comm in enumerate((old, other)):
        c.reset(comm)
        ok &= c.handle == comm.handle and c.Get_size() == comm.Get_size()
        fh = MPI.File.Open(c, os.path.join(d, f"f{i}"),
                           MPI.MODE_CREATE | MPI.MODE_WRONLY)
        fh.Write_at_all(8 * rank, np.full(1, float(rank)))
        fh.Close()
    c.begin_segment()
    try:
        c.Ialltoallw  # exists on mpi4py's class: routed through ulfmpy's check
        c.Iallreduce(np.ones(1), np.zeros(1))
        ok = False
    except Exception as exc:
        ok &= "cannot be logged" in str(exc)
    c.end_segment()
    c.reset(old)
    other.Free()
    all_true(MPI.COMM_WORLD, ok)


def test_a_voided_lowercase_receive_stands_in_the_last_object(rc):
    """After a failure the step is thrown away, but the code using what a
    lowercase receive returned runs on: it gets the last object from that
    source and tag, not None."""
    from ulfmpy.errors import ProcessFailure

    c, _ = rc
    rank, size = c.Get_rank(), c.Get_size()
    left, right = (rank - 1) % size, (rank + 1) % size
    c.begin_segment()
    c.send({"step": 1, "from": rank}, right, 3)
    got = c.recv(source=left, tag=3)
    c.void_on_failure, c.failure = True, ProcessFailure("a test's failure")
    again = c.recv(source=left, tag=3)
    req = c.irecv(source=left, tag=3)
    ok = got == {"step": 1, "from": left} and again == got and req.wait() == got
    ok &= c.recv(source=left, tag=4) is None  # nothing ever came with that tag
    c.void_on_failure, c.failure = False, None
    c.end_segment()
    all_true(MPI.COMM_WORLD, ok)


def test_dist_graph_neighbour_collectives_equal_mpis_and_replay(rc):
    """Create_dist_graph_adjacent gives a protected communicator whose
    neighbour collectives answer as MPI's own do, logged: replayed alone
    from the log they give the same result."""
    c, replay = rc
    c.open_contexts(replay)
    rank, size = c.Get_rank(), c.Get_size()
    srcs, dsts = [(rank - 1) % size, (rank + 2) % size], [(rank + 1) % size, (rank - 2) % size]
    mine = c.Create_dist_graph_adjacent(srcs, dsts)
    ref = c.mpi_comm.Create_dist_graph_adjacent(srcs, dsts, reorder=False)
    ok = mine.Get_dist_neighbors()[:2] == ref.Get_dist_neighbors()[:2]
    send = np.arange(4.0) + 10 * rank
    want_a2a, want_ag = np.zeros(4), np.zeros(8)
    ref.Neighbor_alltoall(send, want_a2a)
    ref.Neighbor_allgather(send, want_ag)
    # v: counts that differ per neighbour (rank r sends r+1 and 2 items);
    # w: a column of a 3x4 grid to one neighbour and a row to the other,
    # received into column 3 and row 4 of a 5x4 grid
    vsend, vcounts = np.arange(8.0) + 100 * rank, [rank + 1, 2]
    rcounts = [srcs[0] + 1, 2]
    col = MPI.DOUBLE.Create_vector(3, 1, 4).Commit()
    grid = np.arange(12.0).reshape(3, 4) + 1000 * rank
    wsend = [grid, ([1, 4], [8, 0]), [col, MPI.DOUBLE]]  # column 1 (byte 8), row 0

    def vw(comm):
        gv, v, w = np.zeros(5), np.zeros(10), np.zeros((5, 4))
        comm.Neighbor_allgatherv(vsend[:2], [gv, [2, 2], [0, 3], MPI.DOUBLE])
        comm.Neighbor_alltoallv([vsend, vcounts, [0, 5], MPI.DOUBLE], [v, (rcounts, [1, 6])])
        comm.Neighbor_alltoallw(wsend, [w, ([1, 4], [24, 128]), [col, MPI.DOUBLE]])
        return gv, v, w

    want_vw = vw(ref)

    def calls():
        a2a, ag = np.zeros(4), np.zeros(8)
        mine.Neighbor_alltoall(send, a2a)
        mine.Neighbor_allgather(send, ag)
        objs = mine.neighbor_alltoall([("to", d, rank) for d in dsts])
        return a2a, ag, objs, vw(mine)

    c.begin_segment()
    a2a, ag, objs, vws = calls()
    ok &= np.array_equal(a2a, want_a2a) and np.array_equal(ag, want_ag)
    ok &= objs == [("to", rank, s) for s in srcs]
    ok &= all(np.array_equal(a, b) for a, b in zip(vws, want_vw))
    got = []
    out = replay_alone(c, replay, 1, lambda: got.append(calls()))
    if out is not None:
        r = got[0]
        ok &= np.array_equal(r[0], a2a) and np.array_equal(r[1], ag) and r[2] == objs
        ok &= all(np.array_equal(a, b) for a, b in zip(r[3], vws))
        ok &= not out.diverged and out.contaminated == set()
    c.end_segment()
    ref.Free()
    col.Free()
    c.drop_children()
    all_true(MPI.COMM_WORLD, ok)


def test_split_and_cart_sub_are_mpis_and_replay_from_the_log(rc):
    """Split and Cartcomm.Sub give protected communicators over a subset of
    the ranks: their ranks, sizes and collectives answer as MPI's own do,
    their messages are logged in their own numbering, and a rank replayed
    alone gets them back from the log (the originals exchanged in the
    parent's numbering)."""
    c, replay = rc
    c.open_contexts(replay)
    rank, size = c.Get_rank(), c.Get_size()
    odd = c.Split(rank % 2, -rank)  # keys reverse the order
    ref = c.mpi_comm.Split(rank % 2, -rank)
    ok = (odd.Get_rank(), odd.Get_size()) == (ref.Get_rank(), ref.Get_size())
    cart = c.Create_cart([2, size // 2], periods=[False, True])
    rows, cols = cart.Sub([False, True]), cart.Sub([True, False])
    refcart = c.mpi_comm.Create_cart([2, size // 2], periods=[False, True], reorder=False)
    refrows, refcols = refcart.Sub([False, True]), refcart.Sub([True, False])
    for mine, theirs in ((rows, refrows), (cols, refcols)):
        ok &= (mine.Get_rank(), mine.Get_size()) == (theirs.Get_rank(), theirs.Get_size())
        ok &= mine.Get_topo() == theirs.Get_topo()
        ok &= tuple(mine.Shift(0, 1)) == tuple(theirs.Shift(0, 1))
    none = c.Split(MPI.UNDEFINED if rank == 0 else 1, 0)
    ok &= (none == MPI.COMM_NULL) if rank == 0 else none.Get_size() == size - 1

    def calls():
        total = np.zeros(1)
        rows.Allreduce(np.full(1, 1.0 + rank), total)
        src, dst = rows.Shift(0, 1)
        got = np.zeros(2)
        rows.Sendrecv(np.full(2, 10.0 + rank), dst, 5, got, src, 5)
        peer = (odd.Get_rank() + 1) % odd.Get_size()
        back = odd.sendrecv(("from", rank), dest=peer, source=(odd.Get_rank() - 1) % odd.Get_size())
        return total[0], got.copy(), back, cols.allreduce(rank)

    want_total = refrows.allreduce(1.0 + rank)
    c.begin_segment()
    first = calls()
    ok &= first[0] == want_total and first[3] == refcols.allreduce(rank)
    src = refrows.Shift(0, 1)[0]
    ok &= np.array_equal(first[1], np.full(2, 10.0 + refrows.Get_group().Translate_ranks(
        [src], c.mpi_comm.Get_group())[0]))
    # Rank 2 is rank 0 of the odd split (keys reverse the order), rank 0 its rank 1.
    got = []
    out = replay_alone(c, replay, 2, lambda: got.append(calls()))
    if out is not None:
        r = got[0]
        ok &= r[0] == first[0] and np.array_equal(r[1], first[1]) and r[2:] == first[2:]
        ok &= not out.diverged and out.contaminated == set()
    c.fetch_originals({2})
    if rank == 2:  # a changed message on the split reaches its receiver: rank 0, by the parent's count
        c.begin_replay({2}, replay)
        odd.sendrecv(("changed", rank), dest=1, source=1)
        ok &= c.end_replay().contaminated == {0}
    c.end_segment()
    for comm in (ref, refrows, refcols, refcart):
        comm.Free()
    c.drop_children()
    all_true(MPI.COMM_WORLD, ok)


def test_a_split_follows_a_repair(rc):
    """After a repair (reset onto another communicator, open_contexts) a
    split communicator works on its new context, in the same numbering."""
    c, replay = rc
    c.open_contexts(replay)
    rank = c.Get_rank()
    half = c.Split(rank // 2, rank)
    before = half.mpi_comm
    other = c.mpi_comm.Dup()
    other.Set_errhandler(MPI.ERRORS_RETURN)
    old = c.mpi_comm
    c.reset(other)
    c.open_contexts(replay)
    ok = half.mpi_comm != before and half.Get_rank() == rank % 2
    ok &= half.allreduce(rank) == sum(r for r in range(c.Get_size()) if r // 2 == rank // 2)
    c.reset(old)
    c.open_contexts(replay)
    c.drop_children()
    other.Free()
    all_true(MPI.COMM_WORLD, ok)
