"""Per-rank JSON-lines event log and the run summary.

Every rank appends to ``RUN_DIR/events/rank-NNNN.jsonl``; each line is one
JSON object with at least ``t`` (seconds since the epoch), ``rank`` and
``event``. Lines are flushed as they are written, so a rank that is killed
leaves every event it logged. Rank 0 writes ``RUN_DIR/summary.json``
atomically at the end of a run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["EventLog", "read_events", "write_json_atomic", "read_summary"]


def _default(obj: Any) -> Any:
    # numpy scalars and arrays, sets, paths: the things events carry.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


class EventLog:
    """Append-only JSON-lines log of one rank. Local.

    Args:
        run_dir: the run directory.
        rank: the rank written into every event (the *world* rank the
            process started with, which stays its name through repairs).
    """

    def __init__(self, run_dir: str | os.PathLike[str], rank: int) -> None:
        self.path = Path(run_dir) / "events" / f"rank-{rank:04d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self._fh = open(self.path, "a", buffering=1, encoding="utf-8")

    def log(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event and return it."""
        record = {"t": time.time(), "rank": self.rank, "event": event, **fields}
        line = json.dumps(record, default=_default) + "\n"
        if self._fh.closed:
            # After the runtime closed its log, a late event (a signal that
            # escalates a halt already done) is appended all the same.
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
        else:
            self._fh.write(line)
        return record

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(run_dir: str | os.PathLike[str], event: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield the events of all ranks (file order within a rank), optionally of one kind.

    A torn last line (a rank killed mid-write) is skipped.
    """
    for path in sorted((Path(run_dir) / "events").glob("rank-*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event is None or rec.get("event") == event:
                    yield rec


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=_default)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run's ``summary.json`` as a dict."""
    with open(Path(run_dir) / "summary.json", encoding="utf-8") as fh:
        return json.load(fh)
