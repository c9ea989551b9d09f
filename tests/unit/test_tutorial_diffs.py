"""Each course-style program in apps/tutorials is protected by at most five
changed lines: the diff between the plain and the protected file, counted."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[2] / "apps" / "tutorials"


def changed_lines(plain: str, ported: str) -> tuple[list[str], list[str]]:
    """Lines added and removed (blank lines aside)."""
    diff = difflib.ndiff(plain.splitlines(), ported.splitlines())
    added = [d[2:] for d in diff if d.startswith("+ ") and d[2:].strip()]
    diff = difflib.ndiff(plain.splitlines(), ported.splitlines())
    removed = [d[2:] for d in diff if d.startswith("- ") and d[2:].strip()]
    return added, removed


@pytest.mark.parametrize("name", ["heat2d", "life", "particles"])
def test_port_changes_at_most_five_lines(name):
    plain = (TUTORIALS / f"{name}_plain.py").read_text()
    ported = (TUTORIALS / f"{name}.py").read_text()
    added, removed = changed_lines(plain, ported)
    assert len(added) <= 5 and len(removed) <= 2, (added, removed)
    assert "import ulfmpy" not in plain and "ulfmpy." not in plain
    assert any("ulfmpy.Runtime(MPI.COMM_WORLD)" in a for a in added)
    assert any("rt.loop(" in a for a in added)


def test_the_count_sees_a_change():
    """The counter is not blind: a sixth changed line shows."""
    plain = (TUTORIALS / "life_plain.py").read_text()
    ported = (TUTORIALS / "life.py").read_text()
    base = changed_lines(plain, ported)
    added, removed = changed_lines(plain, ported.replace("self.alive = 0", "self.alive = 1"))
    assert (len(added), len(removed)) == (len(base[0]) + 1, len(base[1]) + 1)


def test_the_inline_port_changes_two_lines():
    """heat2d_inline.py: `import ulfmpy.auto` (the program after it runs in
    a runtime over COMM_WORLD) and the loop protected where it is
    (ulfmpy.range); no factory, no with block."""
    plain = (TUTORIALS / "heat2d_plain.py").read_text()
    ported = (TUTORIALS / "heat2d_inline.py").read_text()
    added, removed = changed_lines(plain, ported)
    assert len(added) == 2 and len(removed) == 1, (added, removed)
    assert "import ulfmpy.auto" in added
    assert any("ulfmpy.range(" in a for a in added) and not any("rt.loop" in a for a in added)
