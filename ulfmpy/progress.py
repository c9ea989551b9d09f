"""Progress of a run: logical rank 0 records it, the launcher shows it.

Rank 0 writes ``RUN_DIR/progress.json`` (atomically, at most once a second,
at segment boundaries: while a halt can come they are at most ~2 s apart)
with the step, the total and its counts. ``ulfmpy run`` owns the terminal,
so it draws the display (:class:`View`): a live bar (tqdm) when its stderr
is a terminal, else a line every :data:`LINE_EVERY_S` seconds. mpirun
forwards the ranks' output line by line only, so a bar drawn by a rank
would not move. Launched without ``ulfmpy run`` (plain ``mpirun``), rank 0
prints the lines itself (:class:`Reporter`). Pure apart from the file and
the stream it is given; no MPI.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, TextIO

__all__ = ["FILE", "LINE_EVERY_S", "VIEW_ENV", "resolve", "format_line", "Reporter", "View"]

FILE = "progress.json"
#: Seconds between progress lines (``--progress lines``), unless ``--progress-every``.
LINE_EVERY_S = 10.0
#: Seconds between two writes of the progress file by rank 0.
WRITE_EVERY_S = 1.0
#: Set by ``ulfmpy run`` when it shows the progress: rank 0 then prints nothing.
VIEW_ENV = "ULFMPY_PROGRESS_VIEW"

_COUNTS = ("segments", "rollbacks", "checkpoints", "failures", "recoveries")
_SHORT = ("seg", "rollb", "ckpt", "fail", "recov")


def resolve(mode: str, isatty: bool) -> str:
    """``auto`` as ``bar`` on a terminal, else ``lines``; other modes as given. Pure."""
    if mode == "auto":
        return "bar" if isatty else "lines"
    return mode


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def rate_and_eta(first: dict[str, Any], snap: dict[str, Any]) -> tuple[float | None, float | None]:
    """Steps per second since ``first`` (same launch) and seconds left. Pure."""
    dt, ds = snap["t"] - first["t"], snap["step"] - first["step"]
    if dt <= 0 or ds <= 0:
        return None, None
    rate = ds / dt
    return rate, max(0.0, (snap["total"] - snap["step"]) / rate)


def format_line(snap: dict[str, Any], rate: float | None, eta: float | None) -> str:
    """``ulfmpy: step 1200/5000 (24 %), 812.0 steps/s, ETA 0:05; segments 12, ...``. Pure."""
    total = max(1, int(snap["total"]))
    pct = 100.0 * snap["step"] / total
    speed = f"{rate:.1f} steps/s" if rate else "- steps/s"
    counts = ", ".join(f"{k} {snap.get(k, 0)}" for k in _COUNTS)
    return (f"ulfmpy: step {snap['step']}/{snap['total']} ({pct:.0f} %), {speed}, ETA "
            f"{_eta(eta)}; {counts}")


class Reporter:
    """Rank 0's side: the progress file, and lines when nobody else shows them. Local."""

    def __init__(self, run_dir: str, mode: str, *, total: int, launch: str,
                 every: float = LINE_EVERY_S, out: TextIO | None = None,
                 clock: Callable[[], float] = time.time,
                 environ: dict[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.path = os.path.join(run_dir, FILE)
        self.mode = mode
        self.total, self.launch = int(total), launch
        self.out = out if out is not None else sys.stderr
        self.clock, self.every = clock, every
        # Lines from here only when no launcher shows them and they were asked for.
        self.printing = (mode != "off" and not environ.get(VIEW_ENV)
                         and resolve(mode, False) == "lines")
        self._written = self._printed = float("-inf")
        self._first: dict[str, Any] | None = None

    def due(self) -> bool:
        """Whether an :meth:`update` now would write or print anything (cheap: the
        caller builds its counts only then, and may ask every step)."""
        now = self.clock()
        return (now - self._written >= WRITE_EVERY_S
                or (self.printing and now - self._printed >= self.every))

    def update(self, step: int, counts: dict[str, int], *, final: bool = False) -> None:
        now = self.clock()
        snap = {"launch": self.launch, "t": now, "step": int(step), "total": self.total,
                "done": final, "mode": self.mode, **{k: int(counts.get(k, 0)) for k in _COUNTS}}
        if self._first is None:
            self._first = snap
        if final or now - self._written >= WRITE_EVERY_S:
            self._written = now
            tmp = f"{self.path}.{os.getpid()}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as fh:
                    json.dump(snap, fh)
                os.replace(tmp, self.path)
            except OSError:
                pass  # progress is a courtesy: a full disk must not stop the run
        if self.printing and not final and now - self._printed >= self.every:
            if self._printed != float("-inf"):
                print(format_line(snap, *rate_and_eta(self._first, snap)), file=self.out,
                      flush=True)
            self._printed = now


class View:
    """The launcher's side: reads the progress file of its launch and shows it. Local."""

    def __init__(self, run_dir: str, mode: str | None, launch: str, *,
                 every: float = LINE_EVERY_S, out: TextIO | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``mode`` None: not given to the launcher, so the program's setting
        (``Runtime(progress=...)``, carried in the file) decides."""
        self.path = os.path.join(run_dir, FILE)
        self.out = out if out is not None else sys.stderr
        self._tty = bool(getattr(self.out, "isatty", lambda: False)())
        self._given = mode is not None
        self.mode = resolve(mode or "auto", self._tty)
        self.launch, self.clock, self.every = launch, clock, every
        self.bar: Any = None
        self._first: dict[str, Any] | None = None
        self._printed = clock()
        if self.mode == "bar" and not self._bar_ok():
            self.mode = "lines"  # a site install without tqdm still reports

    @staticmethod
    def _bar_ok() -> bool:
        try:
            import tqdm  # noqa: F401
        except ImportError:
            return False
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as fh:
                snap = json.load(fh)
        except (OSError, ValueError):
            return None
        return snap if snap.get("launch") == self.launch else None

    def poll(self) -> None:
        if self.mode == "off":
            return
        snap = self._read()
        if snap is None:
            return
        if self._first is None:
            self._first = snap
            if not self._given and snap.get("mode"):
                self.mode = resolve(snap["mode"], self._tty)
                if self.mode == "bar" and not self._bar_ok():
                    self.mode = "lines"
        if self.mode == "off":
            return
        rate, eta = rate_and_eta(self._first, snap)
        if self.mode == "bar":
            self._draw(snap)
        elif (rate is not None and self.clock() - self._printed >= self.every
              and not snap.get("done")):
            self._printed = self.clock()
            print(format_line(snap, rate, eta), file=self.out, flush=True)

    def _draw(self, snap: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None:
            import shutil

            # A terminal that reports no width (a bare pty) would get an empty bar.
            sized = shutil.get_terminal_size((0, 0)).columns > 0
            self.bar = tqdm(total=snap["total"], initial=snap["step"], file=self.out,
                            unit="step", dynamic_ncols=sized, ncols=None if sized else 100,
                            nrows=None if sized else 20,
                            leave=True, desc="ulfmpy")
        self.bar.n = snap["step"]
        self.bar.set_postfix_str(", ".join(f"{short} {snap.get(k, 0)}"
                                           for k, short in zip(_COUNTS, _SHORT)), refresh=False)
        self.bar.refresh()

    def write(self, data: bytes, to: TextIO | None = None) -> None:
        """Put a line of the job's output (on ``to``, default the display's stream)
        above the bar, or straight through."""
        to = self.out if to is None else to
        if self.bar is not None:
            self.bar.write(data.decode(errors="replace").rstrip("\n"), file=to)
            return
        buf = getattr(to, "buffer", None)
        if buf is not None:
            buf.write(data)
            buf.flush()
        else:
            to.write(data.decode(errors="replace"))
            to.flush()

    def close(self) -> None:
        if self.mode != "off":
            self.poll()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
