"""The zygote and its stub, without MPI: a program run through them behaves as
``python ARGV`` run by the stub would (output, cwd, environment, exit status,
signals), only forked from a pre-imported process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from ulfmpy import zygote

pytestmark = pytest.mark.skipif(not zygote.available(), reason="the zygote needs Linux")

# A module no interpreter imports at start-up: present in the child only if
# the zygote preloaded it.
MARK = "colorsys"
REPORT = (f"import os, sys; print('warm' if {MARK!r} in sys.modules else 'cold', os.getpid(), "
          "os.getcwd(), os.environ.get('ZYGOTE_TEST'), sys.argv[1:], flush=True)")


def _wait_listening(name: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the zygote exited before listening"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect("\0" + name)
                return
            except OSError:
                time.sleep(0.02)
    raise AssertionError(f"zygote {name} not listening after {timeout} s")


@pytest.fixture
def warm(tmp_path):
    """A zygote preloading MARK, watching this test process."""
    name = f"test-{uuid.uuid4().hex}"
    proc = zygote.start(name, watch=os.getpid(), log=str(tmp_path / "zygote.log"),
                        preload=(MARK,))
    assert proc is not None
    _wait_listening(name, proc)
    yield name, proc
    zygote.stop(name)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("the zygote did not leave when asked")


def _stub(name: str, argv: list[str], **kw) -> subprocess.Popen:
    command, args = zygote.spawn_command(name, argv)
    return subprocess.Popen([command, *args], stdout=subprocess.PIPE, text=True, **kw)


def _report(line: str) -> tuple[str, int, str, str, str]:
    how, pid, cwd, env, rest = line.split(" ", 4)
    return how, int(pid), cwd, env, rest


def test_without_a_zygote_the_stub_starts_the_program_cold(tmp_path):
    stub = _stub(f"absent-{uuid.uuid4().hex}", ["-c", REPORT + "; sys.exit(3)", "a", "b"],
                 cwd=tmp_path, env={**os.environ, "ZYGOTE_TEST": "x"})
    out, _ = stub.communicate(timeout=60)
    how, pid, cwd, env, rest = _report(out.strip())
    assert (how, pid, cwd, env) == ("cold", stub.pid, str(tmp_path), "x")  # exec'd in place
    assert rest == "['a', 'b']"
    assert stub.returncode == 3


def test_a_forked_program_has_the_stubs_identity_and_exit_status(warm, tmp_path):
    name, _ = warm
    stub = _stub(name, ["-c", REPORT + "; sys.exit(5)", "x y"], cwd=tmp_path,
                 env={**os.environ, "ZYGOTE_TEST": "from-stub"})
    out, _ = stub.communicate(timeout=60)
    how, pid, cwd, env, rest = _report(out.strip())
    assert how == "warm"
    assert pid != stub.pid  # forked by the zygote, the stub stands in for it
    assert (cwd, env, rest) == (str(tmp_path), "from-stub", "['x y']")
    assert stub.returncode == 5


def test_a_killed_program_kills_its_stub_with_the_same_signal(warm):
    name, _ = warm
    stub = _stub(name, ["-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    stub.communicate(timeout=60)
    assert stub.returncode == -signal.SIGKILL


def test_signals_to_the_stub_reach_the_program(warm):
    name, _ = warm
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    stub = _stub(name, ["-c", code])
    assert stub.stdout.readline().strip() == "ready"
    stub.send_signal(signal.SIGTERM)
    stub.wait(timeout=30)
    assert stub.returncode == 42


def test_the_program_dies_with_its_stub(warm):
    name, _ = warm
    stub = _stub(name, ["-c", REPORT + "; import time; time.sleep(120)"])
    how, pid, *_ = _report(stub.stdout.readline().strip())
    assert how == "warm"
    stub.kill()
    stub.wait(timeout=30)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)  # the zygote reaps it once it is gone
    assert not os.path.exists(f"/proc/{pid}"), "the program outlived its stub"


def test_the_zygote_leaves_when_the_watched_process_does(tmp_path):
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    name = f"test-{uuid.uuid4().hex}"
    proc = zygote.start(name, watch=watched.pid, preload=(MARK,))
    try:
        _wait_listening(name, proc)
        watched.kill()
        watched.wait()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_other_users_are_refused(warm):
    """The zygote forks only for its own user (``SO_PEERCRED``): another
    user's request is dropped, which sends that stub down the cold path."""
    import json
    import socket
    import struct

    name, _ = warm
    pid = os.fork()
    if pid == 0:  # connect as "nobody"; the credentials are taken at connect
        code = 2
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(20)
                s.connect("\0" + name)
                code = 3
                body = json.dumps({"argv": ["-c", "pass"], "cwd": "/", "env": {},
                                   "stub": os.getpid()}).encode()
                try:
                    socket.send_fds(s, [struct.pack("!Q", len(body))], [0, 1, 2])
                    s.sendall(body)
                    reply = s.recv(9)
                except (BrokenPipeError, ConnectionResetError):  # dropped mid-request
                    reply = b""
                code = 0 if reply == b"" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) not in (2, 3), "could not connect as another user"
    assert os.waitstatus_to_exitcode(status) == 0, "a request from another user was served"
