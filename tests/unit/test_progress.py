"""Progress: rank 0's file and lines, the launcher's bar and lines (ulfmpy/progress.py)."""

from __future__ import annotations

import io
import json

from ulfmpy import progress
from ulfmpy.progress import Reporter, View, format_line, rate_and_eta, resolve

COUNTS = {"segments": 3, "rollbacks": 1, "checkpoints": 2, "failures": 1, "recoveries": 1}


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_resolve_auto_by_terminal():
    assert resolve("auto", True) == "bar" and resolve("auto", False) == "lines"
    assert resolve("off", True) == "off" and resolve("lines", True) == "lines"


def test_line_has_step_rate_eta_and_counts():
    first = {"t": 0.0, "step": 0}
    snap = {"t": 10.0, "step": 1000, "total": 5000, **COUNTS}
    rate, eta = rate_and_eta(first, snap)
    assert rate == 100.0 and eta == 40.0
    assert format_line(snap, rate, eta) == (
        "ulfmpy: step 1000/5000 (20 %), 100.0 steps/s, ETA 0:40; segments 3, rollbacks 1, "
        "checkpoints 2, failures 1, recoveries 1")
    assert rate_and_eta(snap, snap) == (None, None)
    assert "ETA ?" in format_line(snap, None, None)


def test_reporter_writes_the_file_at_most_once_a_second_and_at_the_end(tmp_path):
    clock = Clock()
    rep = Reporter(str(tmp_path), "lines", total=100, launch="L", clock=clock,
                   environ={progress.VIEW_ENV: "1"}, out=io.StringIO())
    assert rep.due()  # nothing written yet
    rep.update(10, COUNTS)
    assert not rep.due()  # the runtime then skips building its counts
    path = tmp_path / progress.FILE
    assert json.loads(path.read_text())["step"] == 10
    clock.t += 0.5
    rep.update(20, COUNTS)
    assert json.loads(path.read_text())["step"] == 10  # too soon
    clock.t += 0.6
    assert rep.due()
    rep.update(30, COUNTS)
    snap = json.loads(path.read_text())
    assert (snap["step"], snap["total"], snap["launch"], snap["done"]) == (30, 100, "L", False)
    rep.update(100, COUNTS, final=True)
    snap = json.loads(path.read_text())
    assert snap["done"] and snap["step"] == 100 and snap["checkpoints"] == 2
    assert rep.out.getvalue() == ""  # a launcher shows it: rank 0 prints nothing


def test_reporter_prints_lines_without_a_launcher(tmp_path):
    clock, out = Clock(), io.StringIO()
    rep = Reporter(str(tmp_path), "auto", total=100, launch="", every=10.0, clock=clock,
                   environ={}, out=out)
    for step in range(0, 100, 5):
        rep.update(step, COUNTS)
        clock.t += 2.0
    lines = out.getvalue().splitlines()
    # 40 s of run, a line every 10 s, none at the very start
    assert len(lines) == 3 and all(x.startswith("ulfmpy: step ") for x in lines)
    off = Reporter(str(tmp_path), "off", total=100, launch="", clock=clock, environ={}, out=out)
    assert not off.printing


def _snap(tmp_path, launch: str, step: int, t: float, **extra) -> None:
    (tmp_path / progress.FILE).write_text(json.dumps(
        {"launch": launch, "t": t, "step": step, "total": 100, "done": False, **COUNTS, **extra}))


def test_view_lines_follow_its_own_launch_only(tmp_path):
    clock, out = Clock(), io.StringIO()
    view = View(str(tmp_path), "lines", "L2", every=5.0, out=out, clock=clock)
    _snap(tmp_path, "L1", 90, clock.t)  # a file left by an earlier launch
    clock.t += 6
    view.poll()
    assert out.getvalue() == ""
    _snap(tmp_path, "L2", 10, clock.t)
    view.poll()
    clock.t += 6
    _snap(tmp_path, "L2", 40, clock.t)
    view.poll()
    assert out.getvalue().startswith("ulfmpy: step 40/100 (40 %), 5.0 steps/s")
    view.close()


def test_view_draws_a_bar_on_a_terminal_and_puts_output_above_it(tmp_path):
    out = Tty()
    view = View(str(tmp_path), None, "L", out=out)
    assert view.mode == "bar"
    _snap(tmp_path, "L", 25, 1.0, mode="auto")
    view.poll()
    view.write(b"a line of the job\n")
    view.close()
    text = out.getvalue()
    assert "ulfmpy:" in text and "25/100" in text and "ckpt 2" in text
    assert "a line of the job\n" in text


def test_view_follows_the_programs_setting_when_not_given(tmp_path):
    out = Tty()
    view = View(str(tmp_path), None, "L", out=out)
    _snap(tmp_path, "L", 25, 1.0, mode="off")
    view.poll()
    view.close()
    assert view.mode == "off" and out.getvalue() == ""
    given = View(str(tmp_path), "lines", "L", out=Tty())
    assert given.mode == "lines"
