"""``python -m ulfmpy._rank (SCRIPT | -m MODULE) [ARGS...]``: how ``ulfmpy run`` starts a rank.

What ``python -m mpi4py`` does (run the program as ``__main__``), plus what
a fault-tolerant job needs (``docs/architecture.md``, "Owning the job"):

* the rank dies with the launcher (:func:`ulfmpy.jobctl.watch_launcher`)
  and holds the run directory's job lock while it runs;
* an error outside the ``Runtime`` block (before it, after it, or in a plain
  mpi4py script) ends the job instead of hanging it. ``python -m mpi4py``
  calls ``MPI_Abort``, which was seen to hang a job under ``--with-ft
  ulfm``; here the rank leaves this launch's abort marker (the launcher
  ends the job within seconds and exits with the marker's status), revokes
  ``COMM_WORLD`` so peers blocked in MPI wake, and SIGKILLs itself (which
  ULFM reliably detects). Only the first rank to fail prints its
  traceback; the others print nothing.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import traceback


def _run(argv: list[str]) -> None:
    if argv[:1] == ["-m"]:
        if len(argv) < 2:
            raise SystemExit("ulfmpy._rank: -m needs a module name")
        sys.argv = [argv[1], *argv[2:]]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    if not argv:
        raise SystemExit("ulfmpy._rank: no program given")
    script = argv[0]
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


def _fail(code: int, summary: str, exc: BaseException | None) -> None:
    from ulfmpy import jobctl

    run_dir = os.environ.get("ULFMPY_RUN_DIR")
    first = jobctl.claim_first_error(run_dir)
    if first and exc is not None:
        tb = exc.__traceback__
        # The program's frames only: ours and runpy's are not the user's concern.
        while tb is not None and tb.tb_next is not None and (
                tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__)
                or tb.tb_frame.f_code.co_filename.startswith("<frozen runpy")):
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb, file=sys.stderr)
    if run_dir:
        try:
            uid = _world_rank()
            jobctl.write_abort_marker(run_dir, uid, code=code, error=summary, first=first)
        except OSError:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    _revoke_world()
    os.kill(os.getpid(), signal.SIGKILL)


def _world(mpi: object) -> object:
    """mpi4py's own COMM_WORLD (the runtime shims the name inside its block)."""
    handle = sys.modules.get("ulfmpy._comm_handle")
    return handle.genuine_world() if handle is not None else mpi.COMM_WORLD


def _world_rank() -> int:
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None:
        try:
            if mpi.Is_initialized() and not mpi.Is_finalized():
                return _world(mpi).Get_rank()
        except Exception:  # noqa: BLE001 (a broken MPI must not hide the first error)
            pass
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return os.getpid()


def _revoke_world() -> None:
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None:
        return
    try:
        if mpi.Is_initialized() and not mpi.Is_finalized():
            _world(mpi).Revoke()
    except Exception:  # noqa: BLE001 (no ULFM: mpirun ends the job on our death anyway)
        pass


def _leave_auto(exc: BaseException | None) -> None:
    """The end of the program is the end of ``import ulfmpy.auto``'s block
    (as ``Runtime.__exit__`` sees it: the error, or none)."""
    auto = sys.modules.get("ulfmpy.auto")
    if auto is not None and hasattr(auto, "leave"):
        auto.leave(None if isinstance(exc, SystemExit) and exc.code in (None, 0) else exc)


def _hold_early_halts() -> None:
    """A halt signal before the runtime starts is kept for it (``ulfmpy.halt.catch_early``)."""
    if os.environ.get("ULFMPY_RESILIENCE", "1").lower() in ("0", "false", "no", "off"):
        return
    from ulfmpy.halt import catch_early, parse_signals

    try:
        catch_early(parse_signals(os.environ.get("ULFMPY_HALT_SIGNAL", "USR1,TERM")))
    except ValueError:
        pass  # a bad --halt-signal is refused by the runtime, with its message


def main(argv: list[str]) -> None:
    from ulfmpy import jobctl
    from ulfmpy.errors import EXIT_UNRECOVERABLE

    _hold_early_halts()
    jobctl.watch_launcher()
    run_dir = os.environ.get("ULFMPY_RUN_DIR")
    if run_dir and os.path.isdir(run_dir):
        jobctl.hold_job_lock(run_dir)
    try:
        try:
            _run(argv)
        except BaseException as exc:
            _leave_auto(exc)
            raise
        _leave_auto(None)
    except SystemExit as exc:
        code = exc.code
        if code is None or code == 0:
            return
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        # A rank that leaves early while its peers still compute would hang
        # them: end the job like an error, with the program's status.
        _fail(code, f"exit status {code}", None)
    except BaseException as exc:  # noqa: BLE001 (every error must end the job)
        first_line = (traceback.format_exception_only(type(exc), exc) or [repr(exc)])[-1].strip()
        _fail(EXIT_UNRECOVERABLE, first_line, exc)


if __name__ == "__main__":
    main(sys.argv[1:])
