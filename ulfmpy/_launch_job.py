"""Running one ``mpirun`` of a job for ``ulfmpy run``: launch retries, the
backstop against hangs, the job's process tree (:mod:`ulfmpy.jobctl`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ulfmpy import jobctl, progress
from ulfmpy.errors import EXIT_RELAUNCH, EXIT_UNRECOVERABLE, LaunchError
from ulfmpy.halt import SAME_REQUEST_S
from ulfmpy.units import parse_duration

__all__ = ["LAUNCHER_FLAKES", "LAUNCH_RETRIES"]


# mpirun's own start-up failing before any rank ran: transient, seen about once
# in 400 launches here (also in others' CI, lfortran/lfortran#8610). Nothing
# ran, so launching again is safe.
LAUNCHER_FLAKES = ("The PMIx server's listener thread failed to start",)
LAUNCH_RETRIES = 2


def _launch(argv: list[str], env_add: dict[str, str]) -> int:
    """``_run_once``, again (up to LAUNCH_RETRIES times) when mpirun itself
    failed to start with one of LAUNCHER_FLAKES."""
    for attempt in range(LAUNCH_RETRIES + 1):
        flaked: list[str] = []
        status = _run_once(argv, env_add, flakes=flaked)
        if status == 0 or not flaked or attempt == LAUNCH_RETRIES:
            return status
        print(f"ulfmpy run: mpirun failed to start ({flaked[0]!r}) before any rank ran; "
              f"launching again ({attempt + 1}/{LAUNCH_RETRIES})", file=sys.stderr)
    return status


def _with_forwarded(argv: list[str], names: list[str]) -> list[str]:
    out = list(argv)
    at = out.index("-x")
    for name in names:
        if name not in out:
            out[at:at] = ["-x", name]
    return out


def _run_once(argv: list[str], env_add: dict[str, str], *, grace: float = 5.0,
              flakes: list[str] | None = None) -> int:
    """Run mpirun in its own process group; return its status.

    The launcher owns the job (:mod:`ulfmpy.jobctl`): earlier launches'
    abort markers are archived first; mpirun dies with this process
    (``PR_SET_PDEATHSIG``) and the ranks watch it; processes of the job
    still holding the job lock after mpirun exits are ended. Backstop
    against hangs: when a rank of this launch left an abort marker and the
    job is still alive ``grace`` seconds later, the whole job is killed and
    the status is the marker's. A SIGINT or SIGTERM is passed to mpirun's
    group, and the job killed 10 s later if still alive. mpirun's stderr is
    passed through line by line; a line matching LAUNCHER_FLAKES is
    appended to ``flakes``.
    """
    run_dir = env_add.get("ULFMPY_RUN_DIR")
    launch = f"{os.getpid()}.{time.time_ns()}"
    env_add = {**env_add, jobctl.LAUNCH_ID_ENV: launch, jobctl.LAUNCHER_PID_ENV: str(os.getpid()),
               jobctl.LAUNCHER_HOST_ENV: jobctl.host_token(), progress.VIEW_ENV: "1"}
    if "-x" in argv:
        argv = _with_forwarded(argv, [jobctl.LAUNCH_ID_ENV, jobctl.LAUNCHER_PID_ENV,
                                      jobctl.LAUNCHER_HOST_ENV, progress.VIEW_ENV])
    mode = env_add.get("ULFMPY_PROGRESS") or os.environ.get("ULFMPY_PROGRESS") or None
    every = env_add.get("ULFMPY_PROGRESS_EVERY") or os.environ.get("ULFMPY_PROGRESS_EVERY")
    view = (progress.View(run_dir, mode, launch,
                          every=parse_duration(every) if every else progress.LINE_EVERY_S)
            if run_dir else None)
    if run_dir:
        jobctl.archive_markers(run_dir)
        _wait_for_earlier_job(run_dir)
    env = {**os.environ, **env_add}
    started = time.time()
    # With a live bar the job's stdout passes through here too, so that its
    # lines land above the bar instead of inside it.
    bar = view is not None and view.mode == "bar"
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE if bar else None,
                            preexec_fn=jobctl.die_with_parent)
    write = view.write if view is not None else None
    tees = [threading.Thread(target=_tee, args=(proc.stderr, flakes, write), daemon=True)]
    if bar:
        tees.append(threading.Thread(target=_tee, args=(
            proc.stdout, None, lambda line: view.write(line, to=sys.stdout)), daemon=True))
    for tee in tees:
        tee.start()
    asked: list[float] = []
    halts = _halt_signals(env)
    halting: list[float] = []

    nprocs = int(argv[argv.index("-n") + 1]) if "-n" in argv else 0
    deferred: list[float] = []

    def forward(signum: int, _frame: object) -> None:
        if signum in halts and not halting:
            # A halt: the ranks checkpoint at their next boundary and leave
            # with EXIT_HALTED; mpirun must not end them meanwhile.
            halting.append(time.monotonic())
            print(f"ulfmpy run: {signal.Signals(signum).name}: halting the job at its next "
                  "segment boundary (a second signal stops it at once)", file=sys.stderr,
                  flush=True)
            if _ranks_started(run_dir, launch, nprocs):
                _deliver_halt(proc, run_dir, halts)
            else:
                # A rank still starting would die of the signal (its default
                # action) and the halt be lost: deliver once all have started.
                deferred.append(time.monotonic())
            return
        if signum in halts:
            if time.monotonic() - halting[0] < SAME_REQUEST_S:
                return  # the same request, delivered twice
            asked.append(time.monotonic())
            _deliver_halt(proc, run_dir, halts)  # the ranks escalate
            return
        asked.append(time.monotonic())
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in {signal.SIGINT, signal.SIGTERM, *halts}}
    for signum in _early_halts[:1]:  # asked before this launch could hear it
        forward(signum, None)
    _early_halts.clear()
    seen: float | None = None
    markers: list[dict[str, Any]] = []
    leaving: list[dict[str, Any]] = []
    try:
        while True:
            try:
                status = proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            if view is not None:
                view.poll()
            if deferred and (_ranks_started(run_dir, launch, nprocs)
                             or time.monotonic() - deferred[0] > HALT_DEFER_S):
                deferred.clear()
                _deliver_halt(proc, run_dir, halts)
            if run_dir and seen is None:
                markers = jobctl.abort_markers(run_dir, launch)
                leaving = [] if markers else jobctl.exit_markers(run_dir, launch)
                seen = time.monotonic() if markers or leaving else None
            if seen is not None and time.monotonic() - seen > grace:
                why = (f"a rank stopped on an error ({_first_error(markers)})" if markers else
                       f"rank {leaving[0]['rank']} left the job (status {leaving[0]['code']})")
                print(f"ulfmpy run: {why} and the job did not end within {grace:.0f} s; "
                      "ending it", file=sys.stderr)
                _end_job(proc, run_dir)
                seen = float("inf")  # once
            elif asked and time.monotonic() - asked[0] > 10:
                print("ulfmpy run: the job did not end within 10 s of the signal; killing it",
                      file=sys.stderr)
                _end_job(proc, run_dir)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if run_dir:
            jobctl.end_processes(jobctl.job_lock_holders(run_dir))
        _sweep_shared_memory(started)
        for tee in tees:
            tee.join(timeout=5)
        if view is not None:
            view.close()
    markers = jobctl.abort_markers(run_dir, launch) if run_dir else []
    leaving = jobctl.exit_markers(run_dir, launch) if run_dir and not markers else []
    if leaving and status != 0:
        return int(leaving[0].get("code", EXIT_RELAUNCH))
    if markers:
        code = int(min(markers, key=lambda m: m.get("t", 0)).get("code", EXIT_UNRECOVERABLE))
        print(f"ulfmpy run: the job ended on an error ({_first_error(markers)}); exit status "
              f"{code}", file=sys.stderr)
        return code
    status = status if status >= 0 else 128 - status
    if status == 0 and run_dir and _nobody_finished(run_dir, started):
        # mpirun under --with-ft ulfm does not treat a dead rank as the job's
        # failure: when every rank died it exits 0 (a whole node, the whole job).
        print("ulfmpy run: every rank of the job died before the run completed (no summary "
              f"was written); exit status {EXIT_RELAUNCH}: relaunch to resume from the newest "
              "committed checkpoint (--max-restarts K, --resume auto)", file=sys.stderr)
        return EXIT_RELAUNCH
    if status > 128 and run_dir and _recovered_spawned_death(run_dir, started):
        print(f"ulfmpy run: mpirun exited with status {status} after the run completed: a "
              "respawned rank was killed and the job recovered from it in-job (Open MPI "
              "counts a dead spawned process in mpirun's status); reporting 0",
              file=sys.stderr)
        return 0
    return status


#: Halt signals that came before the first launch could pass them on.
_early_halts: list[int] = []


def hold_halts(env: dict[str, str]) -> dict[signal.Signals, Any]:
    """From the launcher's start, keep a halt signal for the launch to pass
    on (its default action would end ``ulfmpy run`` and the job would not
    halt). Returns the handlers to put back (:func:`release_halts`). Main
    thread only."""
    _early_halts.clear()
    return {sig: signal.signal(sig, lambda signum, _f: _early_halts.append(signum))
            for sig in _halt_signals(env)}


def release_halts(held: dict[signal.Signals, Any]) -> None:
    for sig, old in held.items():
        signal.signal(sig, old)


#: A halt that comes while ranks start waits at most this long for them.
HALT_DEFER_S = 20.0


def _ranks_started(run_dir: str | None, launch: str, nprocs: int) -> bool:
    """Whether ``nprocs`` processes of this launch logged their ``start`` (their
    halt handlers are installed by then). Reads the event logs; local."""
    if not run_dir or nprocs <= 0:
        return True
    tag = f'"launch": "{launch}"'
    seen = 0
    for path in Path(run_dir, "events").glob("rank-*.jsonl"):
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                seen += any('"event": "start"' in line and tag in line for line in fh)
        except OSError:
            pass
    return seen >= nprocs


def _halt_signals(env: dict[str, str]) -> set[signal.Signals]:
    """The ranks' halt signals (``--halt-signal``), as the launcher knows them."""
    from ulfmpy.config import Config
    from ulfmpy.halt import parse_signals

    default = next(f.default for f in dataclasses.fields(Config) if f.name == "halt_signal")
    if env.get("ULFMPY_RESILIENCE", "1").lower() in ("0", "false", "no", "off"):
        return set()
    try:
        return set(parse_signals(env.get("ULFMPY_HALT_SIGNAL", default)))
    except ValueError:
        return set()


def _deliver_halt(proc: subprocess.Popen, run_dir: str | None,
                  halts: set[signal.Signals]) -> None:
    """Bring a halt to every rank: through mpirun, which passes SIGUSR1 and
    SIGUSR2 on to all ranks on all nodes, when the ranks halt on one of them;
    else straight to this host's ranks (the holders of the job lock)."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        if sig in halts:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
            return
    sig = min(halts)
    for pid in jobctl.job_lock_holders(run_dir) if run_dir else []:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _sweep_shared_memory(since: float) -> None:
    """Leave nothing in /dev/shm: the staging segments of ranks that died, and
    Open MPI's ``sm_segment.*`` files of this launch that no process maps any
    more (a killed job leaves them, 16 MB each)."""
    jobctl.sweep_staging_segments()
    try:
        ours = [e for e in os.scandir("/dev/shm") if e.name.startswith("sm_segment.")
                and e.stat().st_uid == os.getuid() and e.stat().st_mtime >= since - 1]
    except OSError:
        return
    if not ours:
        return
    mapped = _mapped_shm()
    for e in ours:
        if e.name not in mapped:
            try:
                os.unlink(e.path)
            except OSError:
                pass


def _mapped_shm() -> set[str]:
    names: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if "/dev/shm/" in line:
                        names.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
        except OSError:
            continue
    return names


def _first_error(markers: list[dict[str, Any]]) -> str:
    first = next((m for m in markers if m.get("first")), markers[0] if markers else {})
    return f"rank {first.get('rank')}: {first.get('error', '?')}"


def _wait_for_earlier_job(run_dir: str, patience: float = 10.0) -> None:
    """Wait for processes of an earlier job in ``run_dir`` to end, or refuse."""
    deadline = time.monotonic() + patience
    holders = jobctl.job_lock_holders(run_dir)
    if holders:
        print(f"ulfmpy run: waiting for processes of an earlier job in {run_dir} to end "
              f"(pids {', '.join(map(str, holders))})", file=sys.stderr)
    while holders and time.monotonic() < deadline:
        time.sleep(0.2)
        holders = jobctl.job_lock_holders(run_dir)
    if holders:
        raise LaunchError(f"processes of another job still use run directory {run_dir} (pids "
                          f"{', '.join(map(str, holders))}); end them or choose another --run-dir")


def _end_job(proc: subprocess.Popen, run_dir: str | None) -> None:
    _killpg(proc)
    if run_dir:
        jobctl.end_processes(jobctl.job_lock_holders(run_dir), grace=1.0)


def _nobody_finished(run_dir: str, started: float) -> bool:
    """Ranks of this launch ran under the runtime (their event logs), none of
    them reached its end (a log's last event ``exit``), and no summary was
    written: the job died whole, though mpirun may report 0."""
    try:
        summary = Path(run_dir) / "summary.json"
        if summary.exists() and summary.stat().st_mtime >= started:
            return False
        logs = [p for p in (Path(run_dir) / "events").glob("rank-*.jsonl")
                if p.stat().st_mtime >= started]
        if not logs:
            return False  # not a runtime program (a plain one, --no-resilience)
        for path in logs:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
            if lines and json.loads(lines[-1]).get("event") == "exit":
                return False
    except (OSError, ValueError):
        return False
    return True


def _recovered_spawned_death(run_dir: str, started: float) -> bool:
    """The run finished during this launch (rank 0 wrote ``summary.json``)
    and a respawned rank died before it: the survivors recovered from it.

    Open MPI runs respawned ranks as a child job, which ``--with-ft ulfm``
    does not cover: the death of one, though the job repaired it, makes
    mpirun exit 128+signal at the end. Without this check a completed run
    would report failure, and ``--max-restarts`` would run it again.
    """
    try:
        if (Path(run_dir) / "summary.json").stat().st_mtime < started:
            return False
        for path in (Path(run_dir) / "events").glob("rank-*.jsonl"):
            uid = int(path.stem.split("-", 1)[1])
            if uid < 100_000 or path.stat().st_mtime < started:
                continue  # not a respawned rank of this launch
            lines = path.read_text(encoding="utf-8").strip().splitlines()
            if lines and json.loads(lines[-1]).get("event") != "exit":
                return True  # it died: its log stops short of its exit
    except (OSError, ValueError):
        return False
    return False


def _tee(stream: Any, flakes: list[str] | None,
         write: Callable[[bytes], None] | None = None) -> None:
    """Pass the job's output through line by line (to ``write``, else stderr);
    lines matching LAUNCHER_FLAKES go to ``flakes``."""
    out = getattr(sys.stderr, "buffer", None)
    for line in iter(stream.readline, b""):
        if write is not None:
            write(line)
        elif out is not None:
            out.write(line)
            out.flush()
        else:
            sys.stderr.write(line.decode(errors="replace"))
        if flakes is not None:
            text = line.decode(errors="replace")
            flakes.extend(f for f in LAUNCHER_FLAKES if f in text)
    stream.close()


def _killpg(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue
