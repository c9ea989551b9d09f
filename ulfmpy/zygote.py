"""A warm process per node that forks respawned replacement ranks.

A respawned rank started cold spends most of its start-up before it can
join: the interpreter, ``numpy``, ``mpi4py.MPI`` (loading the MPI library),
ulfmpy and ``h5py`` (about 0.15 s here, far more on a loaded node), all on
the recovery's critical path. The zygote pays that once, at job start, and
keeps the modules imported with MPI *not* initialized. At a respawn,
``Comm.Spawn`` starts the tiny stub :mod:`ulfmpy._spawn_stub`, which hands
the zygote its environment (the PMIx identity of the new process), working
directory and standard streams; the zygote forks, and the child initializes
MPI with that identity and runs the program as ``python -m mpi4py`` would.
The stub stays as the process the MPI runtime knows: it forwards signals to
the child and exits as the child did (a SIGKILLed replacement shows up as a
SIGKILLed stub), and the child kills itself when the stub is gone.

The socket is in Linux's abstract namespace (node-local, no file to clean
up); the zygote serves only processes of its own user (``SO_PEERCRED``).
It leaves when told to (:func:`stop`) or when the process it watches (the
launcher's daemon that started the job's ranks) is gone, after its children.

Anything going wrong on this path falls back to the cold start: no zygote on
the node (its start failed, or it is not Linux), a refused connection, a
failed fork. Local functions; nothing here is collective.
"""

from __future__ import annotations

import importlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable

from ulfmpy.jobctl import own_process_group

__all__ = ["PRELOAD", "available", "name_for", "start", "stop", "spawn_command", "serve"]

#: Imported by the zygote before it listens: what a replacement would import
#: first. ``mpi4py.MPI`` is loaded with ``rc.initialize = False``.
PRELOAD = ("numpy", "mpi4py.MPI", "ulfmpy.runtime", "ulfmpy.checkpoint", "h5py")

_STUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_spawn_stub.py")


def available() -> bool:
    """Whether this platform has what the zygote needs (abstract sockets, fd passing)."""
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds")


def name_for(job: str) -> str:
    """The socket name of a job's zygotes (one per node, same name on every node)."""
    return f"ulfmpy-zygote-{os.getuid()}-{job}"


def spawn_command(name: str | None, argv: list[str]) -> tuple[str, list[str]]:
    """``(command, args)`` for ``Comm.Spawn`` to start a replacement running
    ``python ARGV``: through the zygote ``name`` when given, else cold."""
    if name is None:
        return sys.executable, list(argv)
    return sys.executable, ["-S", _STUB, name, "--", *argv]


def start(name: str, *, watch: int, log: str | None = None,
          preload: tuple[str, ...] = PRELOAD) -> subprocess.Popen | None:
    """Start the zygote ``name`` in the background. Local.

    ``watch``: the pid whose exit ends the zygote (the daemon that launched
    this rank). Its output goes to ``log`` (or nowhere): never to the rank's
    streams, which the launcher waits on. Returns ``None`` when the platform
    has no zygote support or the process cannot start.
    """
    if not available():
        return None
    out: Any = subprocess.DEVNULL
    try:
        if log:
            out = open(log, "ab")  # noqa: SIM115 (closed below: the child keeps its copy)
        # Not started with the halt signals blocked (as checkpoint helpers
        # are): the programs it forks and its own stop need them. A zygote
        # ended by a halt's signal costs nothing: the job is leaving. A
        # process group of its own, not a session: the kernel's autogroup
        # scheduling gives every session a fair share of the CPU, which made
        # the "idle" preload take half a core from the starting ranks.
        return subprocess.Popen(
            [sys.executable, "-m", "ulfmpy.zygote", name, str(watch), ",".join(preload)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            close_fds=True, **own_process_group())
    except OSError:
        return None
    finally:
        if out is not subprocess.DEVNULL:
            out.close()


def stop(name: str, timeout: float = 1.0) -> bool:
    """Ask the zygote ``name`` on this node to leave once its children have. Local."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect("\0" + name)
            body = json.dumps({"quit": True}).encode()
            s.sendall(struct.pack("!Q", len(body)) + body)
            return s.recv(1) == b"Q"
    except OSError:
        return False


def _log(msg: str) -> None:
    print(f"[ulfmpy zygote {os.getpid()} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class _Job:
    """What a forked child becomes: the replacement rank's program."""

    def __init__(self, request: dict[str, Any], conn: socket.socket) -> None:
        self.request = request
        self.conn = conn

    def run(self) -> None:
        req = self.request
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])

        def watch() -> None:
            # The stub never writes after its request: recv returns at its
            # end. Without it nobody reports this process to the MPI runtime.
            try:
                self.conn.recv(1)
            except OSError:
                pass
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="ulfmpy-stub-watch", daemon=True).start()
        from mpi4py.run import main as run_main
        from mpi4py.run import run_command_line

        argv = list(req["argv"])
        if argv[:2] != ["-m", "mpi4py"]:
            # Not an MPI rank (MPI stays uninitialized): ``python ARGV``.
            run_command_line(argv)
            return
        from mpi4py import MPI, rc

        levels = {"single": MPI.THREAD_SINGLE, "funneled": MPI.THREAD_FUNNELED,
                  "serialized": MPI.THREAD_SERIALIZED, "multiple": MPI.THREAD_MULTIPLE}
        MPI.Init_thread(levels.get(str(rc.thread_level), MPI.THREAD_MULTIPLE))
        # The start-up a respawned rank reports is this process's, not the zygote's.
        rs = sys.modules.get("ulfmpy.respawn")
        if rs is not None:
            rs._IMPORTED_AT = time.time()
            rs._WARM = True
        sys.argv[:] = ["mpi4py", *argv[2:]]
        run_main()


def _fork(conn: socket.socket, request: dict[str, Any], fds: list[int],
          closing: list[Any]) -> int | _Job:
    with warnings.catch_warnings():
        # Python >= 3.12 warns on fork with threads running (BLAS pools);
        # the child only initializes MPI and runs the program, as a
        # multiprocessing fork child would.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return pid
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for thing in closing:
            thing.close() if hasattr(thing, "close") else os.close(thing)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        # Python's streams were set up for /dev/null: line-buffer them now
        # that they reach the job's output.
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True)
        return _Job(request, conn)
    except BaseException:
        traceback.print_exc()
        os._exit(70)


def serve(name: str, watch: int, preload: tuple[str, ...] = PRELOAD) -> _Job | None:
    """The zygote's loop. Returns ``None`` in the zygote when it is done, and
    a :class:`_Job` in each forked child (which the caller runs)."""
    import mpi4py

    mpi4py.rc.initialize = False  # the children initialize, with their identity
    mpi4py.rc.finalize = True
    t0 = time.perf_counter()

    loader_tid: list[int] = []

    def load() -> None:
        # Scheduling policy is per thread on Linux: the imports run only
        # when the job's ranks leave a core idle (SCHED_IDLE; nice 10 still
        # took about 0.1 s from busy-polling ranks at the start of every
        # job), and the children, forked from the main thread, run at the
        # job's own policy and priority. A fork request lifts it (lift()).
        loader_tid.append(threading.get_native_id())
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        except (OSError, AttributeError):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except OSError:
                pass
        for mod in preload:
            try:
                importlib.import_module(mod)
            except Exception as exc:  # a missing optional module only costs its import later
                _log(f"preload {mod}: {exc!r}")

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind("\0" + name)
    except OSError as exc:
        _log(f"not serving {name}: {exc}")  # another zygote has it
        return None
    # Listening before the preload: a replacement asked for while it runs
    # (a failure early in the run, when the busy ranks left no idle core)
    # waits for it in the backlog and still starts warm; the ranks are
    # idle then, in the repair, so the preload goes ahead.
    # A quit is answered at once; a fork waits for the preload (no thread
    # may be importing when the process forks).
    listener.listen(64)
    from ulfmpy.jobctl import alive as _alive

    def load_and_log() -> None:
        load()
        _log(f"serving {name} (preloaded in {time.perf_counter() - t0:.3f} s, watching {watch})")

    loader = threading.Thread(target=load_and_log, name="ulfmpy-zygote-preload", daemon=True)
    loader.start()

    def lift() -> None:
        """A replacement waits for the preload: run it at the normal policy
        now. Ranks busy-polling in the repair leave no core idle, and an
        idle-priority preload held the first replacement of a run back for
        3 s here (4 ranks on 2 cores)."""
        if loader.is_alive() and loader_tid:
            try:
                os.sched_setscheduler(loader_tid[0], os.SCHED_OTHER, os.sched_param(0))
            except (OSError, AttributeError):
                pass
            _log("preload lifted to the normal policy: a replacement waits for it")
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    quitting = False
    while True:
        for key, _ in sel.select(timeout=0.5):
            if key.fileobj is listener:
                try:
                    conn, _addr = listener.accept()
                except OSError:
                    continue
                got = _handle(conn, children, [listener, sel, wake_r, wake_w], loader, lift)
                if isinstance(got, _Job):
                    return got
                quitting = quitting or got == "quit"
            else:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
        _reap(children)
        if (quitting or not _alive(watch)) and not children:
            _log("leaving")
            if loader.is_alive():
                # Told to leave mid-preload (a short job): the importing
                # thread must not hold up the exit, nor run at finalization.
                sys.stdout.flush()
                os._exit(0)
            return None


def _handle(conn: socket.socket, children: dict[int, socket.socket],
            closing: list[Any], loader: threading.Thread,
            lift: Callable[[], None] = lambda: None) -> _Job | str | None:
    fds: list[int] = []
    try:
        conn.settimeout(5.0)
        if _peer_uid(conn) != os.getuid():
            conn.close()
            return None
        head, fds, _flags, _addr = socket.recv_fds(conn, 8, 3)
        if len(head) < 8:
            head += _recv_exact(conn, 8 - len(head))
        request = json.loads(_recv_exact(conn, struct.unpack("!Q", head)[0]))
        if request.get("quit"):
            conn.sendall(b"Q")
            conn.close()
            return "quit"
        if len(fds) != 3:
            raise ValueError(f"expected 3 descriptors, got {len(fds)}")
        conn.settimeout(None)
        lift()
        loader.join()
        got = _fork(conn, request, fds, closing + list(children.values()))
        if isinstance(got, _Job):
            return got
        conn.sendall(b"P" + struct.pack("!q", got))
        children[got] = conn
        _log(f"forked {got} for stub {request.get('stub')}")
    except (OSError, ValueError, ConnectionError) as exc:
        _log(f"request failed: {exc!r}")
        for fd in fds:
            os.close(fd)
        conn.close()  # the stub starts cold
    return None


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            try:
                conn.sendall(b"S" + struct.pack("!i", status))
            except OSError:
                pass
            conn.close()


def main(argv: list[str]) -> int:
    """``python -m ulfmpy.zygote NAME WATCH_PID [MODULE,...]`` (what :func:`start` runs)."""
    name, watch = argv[0], int(argv[1])
    preload = tuple(m for m in argv[2].split(",") if m) if len(argv) > 2 else PRELOAD
    job = serve(name, watch, preload)
    if job is not None:
        job.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
