"""The campaign runner's stack dump of a timed-out run (``dump_stacks``)."""

import shutil
import subprocess
import sys

import pytest

from ulfmpy._cmd_campaign import dump_stacks


def test_a_timed_out_run_leaves_the_stacks_of_its_processes(tmp_path):
    if not shutil.which("gdb"):
        pytest.skip("gdb is not installed: a HANG is then reported without stacks")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        path = dump_stacks([child.pid], tmp_path / "run.stacks")
    finally:
        child.kill()
        child.wait()
    text = (tmp_path / "run.stacks").read_text()
    assert path == str(tmp_path / "run.stacks")
    assert f"=== pid {child.pid}: {sys.executable} -c import time" in text
    assert "sleep" in text and "#0" in text, text[-2000:]
    assert dump_stacks([], tmp_path / "none") is None
