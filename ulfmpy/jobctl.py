"""Who owns a job: the run directory's locks, the launcher watchdog, abort markers.

A job's processes must never outlive the ``ulfmpy run`` that started them,
and two jobs must never write one run directory (``docs/architecture.md``,
"Owning the job"). Three mechanisms, none of them MPI:

* **The launcher lock** ``RUN_DIR/.lock``: ``ulfmpy run`` holds an exclusive
  ``flock`` on it for its whole life (relaunches included). A second
  launcher is refused; a lock file left by a launcher that died (the
  ``flock`` went with it) is taken over with a message.
* **The job lock** ``RUN_DIR/.job.lock``: every rank process holds a shared
  ``flock`` on it while it runs. The kernel lists the holders
  (``/proc/locks``), so a launcher can tell that processes of an earlier
  job still use the directory, and after each launch end any of its own
  job's processes that outlived ``mpirun`` (a replacement forked by the
  zygote is not in ``mpirun``'s session).
* **The watchdog**: each rank on the launcher's host watches the launcher's
  pid (a pidfd, so no pid reuse) and SIGKILLs itself the moment the
  launcher is gone; ``mpirun`` itself gets ``PR_SET_PDEATHSIG``. So killing
  ``ulfmpy run``, even with SIGKILL, ends the whole job.

Abort markers (``abort-rank-N.json``) carry the launch they belong to
(``ULFMPY_LAUNCH_ID``); the launcher moves older ones to ``RUN_DIR/aborts/``
before each launch, so a marker never outlives its launch.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import select
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["LAUNCHER_PID_ENV", "own_process_group", "sweep_staging_segments", "LAUNCH_ID_ENV", "RunDirLock", "lock_run_dir",
           "hold_job_lock", "job_lock_holders", "watch_launcher", "die_with_parent",
           "archive_markers", "abort_markers", "write_abort_marker", "claim_first_error",
           "write_exit_marker", "exit_markers"]

LAUNCHER_PID_ENV = "ULFMPY_LAUNCHER_PID"
LAUNCHER_HOST_ENV = "ULFMPY_LAUNCHER_HOST"
LAUNCH_ID_ENV = "ULFMPY_LAUNCH_ID"
LOCK_NAME, JOB_LOCK_NAME = ".lock", ".job.lock"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def host_token() -> str:
    """This machine's name and boot: a pid means the same process only where both match."""
    return f"{socket.gethostname()}/{_boot_id()}"


# -- the launcher's lock ---------------------------------------------------------------
class RunDirLock:
    """The exclusive lock of one run directory, held by ``ulfmpy run``. Local."""

    def __init__(self, path: Path, fh: Any) -> None:
        self.path, self._fh = path, fh

    def release(self) -> None:
        if self._fh is None:
            return
        try:
            self._fh.truncate(0)  # a clean release leaves no owner to report
            self._fh.flush()
        except OSError:
            pass
        self._fh.close()  # closing drops the flock
        self._fh = None


def lock_run_dir(run_dir: str, *, say: Any = print) -> RunDirLock:
    """Take ``RUN_DIR/.lock`` or raise :class:`~ulfmpy.errors.LaunchError`. Local.

    ``say`` prints the one message about a stale lock taken over.
    """
    from ulfmpy.errors import LaunchError

    path = Path(run_dir) / LOCK_NAME
    try:
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
    except OSError as exc:
        raise LaunchError(f"cannot lock run directory {run_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        fh.seek(0)
        owner = _owner(fh.read())
        fh.close()
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise LaunchError(f"cannot lock run directory {run_dir}: {exc}") from exc
        raise LaunchError(f"run directory {run_dir} is in use by another job ({owner}); "
                          "wait for it to end or choose another --run-dir") from None
    fh.seek(0)
    previous = fh.read().strip()
    if previous:
        say(f"ulfmpy run: taking over the lock of run directory {run_dir} from an earlier "
            f"job that is no longer running ({_owner(previous)})")
    fh.seek(0)
    fh.truncate(0)
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    fh.flush()
    return RunDirLock(path, fh)


def _owner(text: str) -> str:
    try:
        d = json.loads(text.strip().splitlines()[0])
        return f"ulfmpy run pid {d['pid']} on {d['host']} since {d['since']}"
    except (ValueError, IndexError, KeyError, TypeError):
        return "owner unknown"


# -- the job's lock --------------------------------------------------------------------
_JOB_LOCK: Any = None


def hold_job_lock(run_dir: str) -> None:
    """Hold a shared lock on ``RUN_DIR/.job.lock`` for this process's life. Local.

    Idempotent; a file system without locks costs nothing but the check.
    """
    global _JOB_LOCK
    if _JOB_LOCK is not None:
        return
    try:
        fh = open(Path(run_dir) / JOB_LOCK_NAME, "a", encoding="utf-8")  # noqa: SIM115
        fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return
    _JOB_LOCK = fh


def job_lock_holders(run_dir: str) -> list[int]:
    """The pids holding ``RUN_DIR/.job.lock`` (from ``/proc/locks``), this one excluded."""
    try:
        st = os.stat(Path(run_dir) / JOB_LOCK_NAME)
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  READ 1234 08:01:5678 0 EOF" (a "->" marks a waiter)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        if parts[5] == want or parts[5].lower() == want:
            try:
                pids.add(int(parts[4]))
            except ValueError:
                pass
    pids.discard(os.getpid())
    return sorted(pids)


def end_processes(pids: list[int], *, grace: float = 2.0) -> list[int]:
    """SIGTERM, then SIGKILL, the given processes of this launcher's own job. Local."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        signalled = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                signalled.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        if not signalled:
            return []
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in signalled):
            time.sleep(0.05)
        pids = [p for p in signalled if alive(p)]
    return pids


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: it holds no lock, maps nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie holds no lock and does no harm
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def own_process_group() -> dict[str, Any]:
    """``subprocess.Popen`` arguments for a helper in a process group of its own. Local.

    Out of the starting rank's group, so a signal to it (a halt, an interrupt)
    does not end the helper; not a session of its own, because the kernel's
    autogroup scheduling gives each session a fair share of the CPU whatever
    its nice level (docs/internals.md, "The writer").
    """
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": lambda: os.setpgid(0, 0)}  # pragma: no cover (3.10)


def sweep_staging_segments() -> list[str]:
    """Unlink checkpoint staging segments whose creating rank is gone. Local.

    A rank killed with SIGKILL together with its process group (resource
    tracker included) cannot unlink its buffers; the next store on the node
    does, and so does ``ulfmpy run`` after each launch (here, not beside the
    buffers in ``_ckpt_async``: the launcher must not import numpy). Segment
    names carry the PID namespace and the creator's pid.
    """
    from ulfmpy._ckpt_helper import shm_prefix

    prefix = shm_prefix()
    removed: list[str] = []
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        try:
            pid = int(name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        if alive(pid):  # a zombie counts as gone: its segments are orphans too
            continue
        try:
            os.unlink(f"/dev/shm/{name}")
            removed.append(name)
        except OSError:
            pass
    return removed


# -- the watchdog ----------------------------------------------------------------------
_WATCHING = False


def watch_launcher(environ: Any = None) -> bool:
    """SIGKILL this process as soon as the launching ``ulfmpy run`` is gone. Local.

    Only where the launcher runs (same host and boot): a pid on another host
    names another process. Returns whether a watch is in place.
    """
    global _WATCHING
    environ = os.environ if environ is None else environ
    if _WATCHING or not environ.get(LAUNCHER_PID_ENV):
        return _WATCHING
    if environ.get(LAUNCHER_HOST_ENV) != host_token():
        return False
    pid = int(environ[LAUNCHER_PID_ENV])
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        _die("ulfmpy run is gone")
    except (OSError, AttributeError):
        fd = None  # no pidfd (old kernel): poll
    _WATCHING = True
    threading.Thread(target=_watch, args=(pid, fd), name="ulfmpy-launcher-watch",
                     daemon=True).start()
    return True


def _watch(pid: int, fd: int | None) -> None:
    if fd is not None:
        select.select([fd], [], [])
    else:
        while alive(pid):
            time.sleep(0.5)
    _die("ulfmpy run is gone")


def _die(_why: str) -> None:
    # The job's shared memory (MPI's segments, 16 MB each, and the staging
    # buffers): every rank dies now, and nobody would be left to unlink it.
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for path in {ln.split()[-1] for ln in fh
                         if "/dev/shm/sm_segment." in ln or "/dev/shm/ulfmpy-ckpt-" in ln}:
                try:
                    os.unlink(path)
                except OSError:
                    pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """``PR_SET_PDEATHSIG``: get ``sig`` when the parent dies (a ``preexec_fn``). Linux only."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, int(sig))
        except (OSError, AttributeError):
            pass


def shared_time(path: str) -> float | None:
    """A moment every process of a launch agrees on, through a file: the first
    to ask writes ``time.time()`` to ``path`` (O_EXCL), the others read it.
    None when ``path`` cannot be written or read. Local."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        for _ in range(200):  # another process is writing it
            try:
                with open(path, encoding="ascii") as fh:
                    return float(fh.read())
            except (OSError, ValueError):
                time.sleep(0.005)
        return None
    except OSError:
        return None
    now = time.time()
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(repr(now))
    return now


def loop_origin(run_dir: str) -> float | None:
    """When this launch's loop started (``time.time()``), the same for every
    process of the launch, replacements included (``RUN_DIR/events/.loop-start-LAUNCH``).
    Local."""
    return shared_time(os.path.join(run_dir, "events", f".loop-start-{launch_id() or 'x'}"))


# -- abort markers ---------------------------------------------------------------------
def launch_id() -> str:
    return os.environ.get(LAUNCH_ID_ENV, "")


def write_abort_marker(run_dir: str, uid: int, **record: Any) -> None:
    """Leave this launch's abort marker for process ``uid``. Local."""
    from ulfmpy.events import write_json_atomic

    write_json_atomic(os.path.join(run_dir, f"abort-rank-{uid:04d}.json"),
                      {"rank": uid, "launch": launch_id(), "t": time.time(), **record})


def write_exit_marker(run_dir: str, uid: int, code: int) -> None:
    """Say that process ``uid`` leaves this launch with ``code`` (a relaunch, a halt). Local.

    A rank that leaves with ``os._exit`` is not always seen by its peers as
    failed under ULFM (they were found waiting on it for good): the
    launcher ends the job a few seconds after such a marker.
    """
    from ulfmpy.events import write_json_atomic

    write_json_atomic(os.path.join(run_dir, f"exit-rank-{uid:04d}.json"),
                      {"rank": uid, "launch": launch_id(), "t": time.time(), "code": code})


def exit_markers(run_dir: str, launch: str | None = None) -> list[dict[str, Any]]:
    """The exit markers (relaunch, halt) of this launch (or of ``launch``). Local."""
    return abort_markers(run_dir, launch, pattern="exit-rank-*.json")


def abort_markers(run_dir: str, launch: str | None = None, *,
                  pattern: str = "abort-rank-*.json") -> list[dict[str, Any]]:
    """The abort markers of this launch (or of ``launch``), oldest name first. Local."""
    want = launch_id() if launch is None else launch
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, pattern))):
        try:
            with open(path, encoding="utf-8") as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            continue
        if rec.get("launch", "") == want:
            out.append({**rec, "file": os.path.basename(path)})
    return out


def archive_markers(run_dir: str) -> int:
    """Move earlier launches' abort markers and first-error claims to ``RUN_DIR/aborts/``."""
    moved = 0
    for path in glob.glob(os.path.join(run_dir, "abort-rank-*.json")) + \
            glob.glob(os.path.join(run_dir, "exit-rank-*.json")) + \
            glob.glob(os.path.join(run_dir, ".first-error*")):
        dest = Path(run_dir) / "aborts"
        dest.mkdir(exist_ok=True)
        try:
            shutil.move(path, dest / f"{time.time_ns()}-{os.path.basename(path)}")
            moved += 1
        except OSError:
            pass
    return moved


def claim_first_error(run_dir: str | None) -> bool:
    """True for the first process of this launch to claim the right to print its error."""
    if not run_dir:
        return True
    try:
        fd = os.open(os.path.join(run_dir, f".first-error-{launch_id() or 'x'}"),
                     os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError:
        return True
    os.close(fd)
    return True
