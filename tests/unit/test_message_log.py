"""The message log's buffers: exact copies, pooled across segments, grown in blocks."""

import numpy as np
import pytest

from ulfmpy.comm import MessageLog


def segment(log, payloads, *, steps=0, key=(1, 7)):
    """Log ``payloads`` as one segment from ``key``; return what the log holds."""
    log.clear()
    if steps:
        log.expect(steps)
    for p in payloads:
        log.keep(*key, p)
    return [log.get(*key, i) for i in range(len(payloads))]


def test_each_message_is_its_own_copy():
    log = MessageLog()
    src = np.zeros(4)
    kept = []
    for i in range(3):
        src[:] = i  # the app reuses its receive buffer
        log.keep(1, 7, src)
        kept.append(log.get(1, 7, i))
    src[:] = -1
    for i, k in enumerate(kept):
        assert np.array_equal(k, np.full(4, float(i)))
    assert len({id(k) for k in kept}) == 3


def test_buffers_are_reused_by_the_next_segment():
    log = MessageLog()
    first = segment(log, [np.full(4, 1.0), np.full(4, 2.0)])
    second = segment(log, [np.full(4, 3.0), np.full(4, 4.0)])
    assert [id(a) for a in first] == [id(b) for b in second]
    assert [b.tolist() for b in second] == [[3.0] * 4, [4.0] * 4]


@pytest.mark.parametrize("new", [
    np.arange(4, dtype=np.float32),      # same shape, other dtype: no silent cast
    np.arange(5.0),                      # other length
    np.arange(1.0),                      # would broadcast into the old slot
    np.arange(8.0).reshape(2, 4),        # two-dimensional
    np.arange(8.0)[::2],                 # strided view, same shape: copied exactly
    np.arange(4, dtype=">f8"),           # other byte order
])
def test_a_reused_slot_never_casts_or_broadcasts(new):
    log = MessageLog()
    segment(log, [np.full(4, 9.0)])
    (got,) = segment(log, [new])
    assert got.shape == new.shape and got.dtype == new.dtype
    assert np.array_equal(got, new)
    assert got.base is not new and not np.shares_memory(got, new)


def test_expect_grows_the_pool_in_one_block_before_the_segment():
    log = MessageLog()
    segment(log, [np.full(3, float(i)) for i in range(4)], steps=2)  # 2 messages per step
    ch = log.rx[(1, 7)]
    log.clear()
    log.expect(10)  # so 20 messages expected
    assert len(ch.items) >= 20
    grown = ch.items[4:20]
    assert all(a.base is grown[0].base for a in grown)  # one allocation
    ids = [id(a) for a in ch.items[:20]]
    payloads = [np.full(3, 100.0 + i) for i in range(20)]
    for p in payloads:
        log.keep(1, 7, p)
    assert [id(a) for a in ch.items[:20]] == ids  # no allocation inside the segment
    assert all(np.array_equal(log.get(1, 7, i), p) for i, p in enumerate(payloads))


def test_expect_leaves_object_channels_alone():
    log = MessageLog()
    ch = log.channel(2, 3)
    for i in range(3):
        log.reserve(2, 3)
        ch.set(i, b"pickled")
    log.clear()
    log.expect(1)
    log.clear()
    log.expect(5)
    assert len(ch.items) == 3 and all(v == b"pickled" for v in ch.items)


def test_expect_does_not_grow_scalar_channels():
    log = MessageLog()
    segment(log, [np.float64(1.0), np.float64(2.0)], steps=2)
    ch = log.rx[(1, 7)]
    log.clear()
    log.expect(6)
    assert len(ch.items) == 2
    got = segment(log, [np.array(3.0), np.array(4.0), np.array(5.0)])
    assert [float(g) for g in got] == [3.0, 4.0, 5.0]
