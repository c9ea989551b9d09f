"""The set-up log (ulfmpy/setup_log.py): what a rank received before the
inline loop, copied out of the pooled buffers, written and read back."""

import numpy as np
from mpi4py import MPI

from ulfmpy import setup_log
from ulfmpy.msglog import MessageLog


def _log() -> MessageLog:
    log = MessageLog()
    log.keep(1, 5, np.arange(4.0))
    log.keep(1, 5, np.arange(4.0) + 10)
    ch, seq = log.reserve(2, MPI.ANY_TAG)
    ch.set(seq, np.array([7], dtype=np.int64))
    ch.tag(seq, 3)
    log.collectives.append(("bcast", 11, b"payload"))
    log.sources.append(2)
    log.probes.append((True, 2, 3, 8))
    return log


def test_a_snapshot_survives_the_log_being_reused():
    log = _log()
    snap = setup_log.snapshot(log)
    log.clear()
    log.keep(1, 5, np.zeros(4))  # the pooled buffer of message 0 is overwritten
    back = setup_log.rebuild(snap)
    np.testing.assert_array_equal(back.get(1, 5, 0), np.arange(4.0))
    np.testing.assert_array_equal(back.get(1, 5, 1), np.arange(4.0) + 10)
    assert back.get(1, 5, 2) is None
    assert back.rx[(2, MPI.ANY_TAG)].tags == [3]
    assert back.collectives == [("bcast", 11, b"payload")]
    assert back.sources == [2] and back.probes == [(True, 2, 3, 8)]


def test_saved_logs_are_read_back_per_rank(tmp_path):
    logs = [setup_log.snapshot(_log()), setup_log.snapshot(MessageLog())]
    n = setup_log.save(str(tmp_path), 3, logs)
    assert n > 0 and (tmp_path / "setup" / "rank-3.pkl").stat().st_size == n
    got = setup_log.load(str(tmp_path), 3)
    assert len(got) == 2 and got[1]["rx"] == {}
    np.testing.assert_array_equal(setup_log.rebuild(got[0]).get(1, 5, 1), np.arange(4.0) + 10)
    assert not list((tmp_path / "setup").glob("*.tmp*"))
