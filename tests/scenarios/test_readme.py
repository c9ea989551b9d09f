"""Every command of the README runs as written, and its example program is protected.

The ``sh`` blocks of the README are read in order; each line that starts
with ``ulfmpy`` runs in one scratch directory (``apps/`` and ``campaigns/``
linked in), as a newcomer would type them one after the other, and must
exit with 0, or with the status its comment names (``# exit 79``). Lines for
the shell or Slurm are covered elsewhere (``make test`` is CI itself; the
Slurm tier runs the templates) and are listed here, so a new kind of line
fails until it is handled.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, require_ulfm

pytestmark = [pytest.mark.scenario]

README = REPO / "README.md"
ELSEWHERE = ("make ", ". .venv/bin/activate", "eval ", "sbatch ", "squeue", "scancel ",
             "slurm/localcluster")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def commands() -> list[tuple[str, int]]:
    out = []
    for block in blocks("sh"):
        for line in block.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("ulfmpy "):
                cmd, _, comment = line.partition("  #")
                m = re.search(r"\bexit (\d+)\b", comment)
                out.append((cmd.strip(), int(m.group(1)) if m else 0))
            else:
                assert line.startswith(ELSEWHERE), f"README line nobody runs: {line!r}"
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _run(words: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "ulfmpy", *words], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"timed out: ulfmpy {' '.join(words)}\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(words, proc.returncode, out, err)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    for name in ("apps", "campaigns"):
        (d / name).symlink_to(REPO / name)
    return d


def test_the_readme_has_the_commands_a_newcomer_needs():
    cmds = " ".join(c for c, _ in commands())
    for word in ("--inject bitflip", "--inject kill", "--ckpt-every", "--resume auto",
                 "--recovery respawn", "--recovery shrink", "--max-restarts", "report",
                 "--plot", "campaign", "--walltime", "interval", "simulate", "inspect"):
        assert word in cmds, word
    assert not any(c.endswith("...") or " ... " in c for c, _ in commands())


def test_every_readme_command_runs(scratch):
    require_ulfm()
    done = []
    for cmd, want in commands():
        words = shlex.split(cmd)[1:]
        res = _run(words, scratch)
        assert res.returncode == want, (f"after {done}:\n$ {cmd}\nexit {res.returncode}, "
                                        f"expected {want}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        done.append(cmd.split(" apps/")[0][:60])
    assert (scratch / "runs" / "relaunched" / "timeline.png").stat().st_size > 10_000
    resumed = json.loads((scratch / "runs" / "tour" / "summary.json").read_text())
    assert resumed["ranks"] == 3 and resumed["restored_from"]["step"] == 250


def _fingerprint(scratch: Path, run: str) -> str:
    return json.loads((scratch / "runs" / run / "summary.json").read_text())["fingerprint"]


# The README's own commands show the stencil under every policy; here the
# README's program, at the default detection (end of segment) and with a kill.
@pytest.mark.parametrize("faults", [
    ["--detect", "finite,bounds", "--inject", "bitflip:rank=1,step=700,bit=62"],
    ["--spares", "1", "--ckpt-every", "500", "--inject", "kill:rank=2,step=900"],
], ids=["flip", "kill-spare"])
def test_the_readme_program_is_protected(scratch, faults, request):
    require_ulfm()
    [program] = blocks("python")
    (scratch / "rod.py").write_text(program)
    if not (scratch / "runs" / "rod-plain" / "summary.json").exists():
        res = _run(["run", "-n", "4", "--no-resilience", "--run-dir", "runs/rod-plain", "rod.py"],
                   scratch)
        assert res.returncode == 0, res.stderr
    name = "rod-" + request.node.callspec.id
    res = _run(["run", "-n", "4", *faults, "--run-dir", f"runs/{name}", "rod.py"], scratch)
    assert res.returncode == 0, res.stderr
    summary = json.loads((scratch / "runs" / name / "summary.json").read_text())
    assert summary["fingerprint"] == _fingerprint(scratch, "rod-plain")
    assert summary["injected_faults"] == 1 and summary["escaped_faults"] == 0
    assert summary["rollbacks"] or summary["recoveries"]
