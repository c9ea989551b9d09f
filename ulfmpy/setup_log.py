"""The set-up log: what the inline loop's set-up code received, kept for a
replacement's fast-forward (docs/architecture.md, "The inline loop").

Between ``with ulfmpy.Runtime(...)`` and the first step of ``ulfmpy.range``
each compute rank logs its calls on ``rt.comm`` (and the communicators
derived from it) as it logs a segment. At the first step the logs are
copied out, written to ``<run dir>/setup/rank-<r>.pkl`` and dropped. A
process that later replaces rank r runs the program's own set-up code with
every message and collective result answered from that file (nothing is
sent, the survivors are not involved), then joins the loop at the restored
step. Pure: no MPI here; the communicator's side is
:meth:`ulfmpy.comm.ResilientComm.begin_setup` and ``begin_fast_forward``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from ulfmpy.msglog import MessageLog

__all__ = ["snapshot", "rebuild", "save", "load", "path"]


def snapshot(log: MessageLog) -> dict[str, Any]:
    """A copy of what ``log`` holds now, independent of its pooled buffers."""
    rx = {}
    for key, ch in log.rx.items():
        if ch.n:
            items = [np.array(v, copy=True) if isinstance(v, np.ndarray) else v
                     for v in ch.items[:ch.n]]
            tags = list(ch.tags[:ch.n]) if ch.tags is not None else None
            rx[key] = (items, tags)
    return {"rx": rx, "collectives": list(log.collectives), "sources": list(log.sources),
            "probes": list(log.probes)}


def rebuild(data: dict[str, Any]) -> MessageLog:
    """A message log holding what :func:`snapshot` copied (for a replay)."""
    log = MessageLog()
    for (src, tag), (items, tags) in data["rx"].items():
        ch = log.channel(src, tag)
        for i, v in enumerate(items):
            ch.set(i, v)
        ch.n = len(items)
        if tags is not None:
            for i, t in enumerate(tags):
                ch.tag(i, t)
    log.collectives.extend(data["collectives"])
    log.sources.extend(data["sources"])
    log.probes.extend(data["probes"])
    return log


def path(run_dir: str, logical: int) -> str:
    return os.path.join(run_dir, "setup", f"rank-{logical}.pkl")


def save(run_dir: str, logical: int, logs: list[dict[str, Any]]) -> int:
    """Write rank ``logical``'s set-up logs (one per communicator of the
    family, in slot order), durably; returns the bytes written. Local."""
    target = path(run_dir, logical)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp{os.getpid()}"
    data = pickle.dumps(logs, protocol=pickle.HIGHEST_PROTOCOL)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return len(data)


def load(run_dir: str, logical: int) -> list[dict[str, Any]]:
    """Rank ``logical``'s set-up logs, as :func:`save` wrote them. Local."""
    with open(path(run_dir, logical), "rb") as f:
        return pickle.load(f)
