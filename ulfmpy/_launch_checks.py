"""What ``ulfmpy run`` checks before ``mpirun`` starts (and under ``--dry-run``). Pure.

A setting or fault that cannot work is refused here, as one line and exit
status 2, rather than on every rank at once (interleaved tracebacks) or
never (a kill that silently cannot fire). What only the program knows (its
step count, the detectors it registers) is checked by the runtime, once.
"""

from __future__ import annotations

import os
from typing import Mapping

from ulfmpy.config import ENV_PREFIX, Config
from ulfmpy.errors import ConfigError, LaunchError

__all__ = ["check_settings", "check_faults", "check_run_dir"]


def check_settings(env: Mapping[str, str], *, ranks: int, spares: int, ft: bool,
                   ulfm: bool, relaunch_ranks: int | None = None,
                   environ: Mapping[str, str] | None = None) -> Config:
    """The job's settings as every rank will load them, or :class:`LaunchError`.

    ``env``: the ``ULFMPY_*`` variables the launcher passes; ``environ``
    the launcher's own environment (its ``ULFMPY_*`` reach the ranks too).
    """
    environ = os.environ if environ is None else environ
    merged = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    merged.update(env)
    try:
        cfg = Config.load(merged)
    except ConfigError as exc:
        raise LaunchError(str(exc)) from None
    if spares and not (ft and ulfm):
        why = "--no-ft was given" if not ft else "this MPI has no ULFM"
        raise LaunchError(f"--spares {spares} needs in-job recovery (ULFM), but {why}: drop "
                          "--spares, or run with an Open MPI >= 5 built with ULFM and without --no-ft")
    if relaunch_ranks is not None and relaunch_ranks < 1:
        raise LaunchError(f"--relaunch-n must be >= 1, got {relaunch_ranks}")
    nodes: tuple[str, ...] = ()
    if cfg.virtual_nodes:
        from ulfmpy.nodes import node_names

        total = min(ranks, relaunch_ranks or ranks) + spares
        if cfg.virtual_nodes > total:
            raise LaunchError(f"--virtual-nodes {cfg.virtual_nodes}: more nodes than the "
                              f"{total} processes of the job")
        nodes = node_names(cfg.virtual_nodes)
    check_faults(cfg.inject, ranks=ranks, spares=spares,
                 relaunch_ranks=relaunch_ranks, nodes=nodes)
    return cfg


def check_faults(specs: tuple[str, ...], *, ranks: int, spares: int,
                 relaunch_ranks: int | None = None, nodes: tuple[str, ...] = ()) -> None:
    """Refuse faults that address no process of the job. Pure.

    Ranks are logical: ``kill:rank=R`` strikes whichever process computes as
    rank R when the fault is due; ranks ``n .. n+spares-1`` name the spares
    while they wait (in start order). A flip needs a computing rank.
    """
    from ulfmpy.inject import BitFlip, Kill, parse_fault

    most = max(ranks, relaunch_ranks or 0)
    for spec in specs:
        f = parse_fault(spec)
        if isinstance(f, Kill) and f.rank is not None:
            top = most + spares - 1
            if not 0 <= f.rank <= top:
                spare_txt = f" and spares {most}..{top}" if spares else ""
                raise LaunchError(f"fault {spec!r}: no rank {f.rank} in this job (ranks "
                                  f"0..{most - 1}{spare_txt}); kill ranks are logical ranks")
        if isinstance(f, Kill) and f.node is not None and nodes and f.node not in nodes:
            raise LaunchError(f"fault {spec!r}: no node {f.node!r}; the job's nodes are "
                              f"{', '.join(nodes)}")
        if isinstance(f, BitFlip) and f.rank is not None and not 0 <= f.rank < most:
            raise LaunchError(f"fault {spec!r}: no rank {f.rank} computes in this job (ranks "
                              f"0..{most - 1}); a flip strikes a computing rank's state")
        if getattr(f, "step", None) is not None and f.step < 0:
            raise LaunchError(f"fault {spec!r}: step must be >= 0")


def check_run_dir(run_dir: str) -> None:
    """Create the run directory (or :class:`LaunchError`) and check it is writable."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as fh:
            fh.write("ok")
        os.unlink(probe)
    except OSError as exc:
        raise LaunchError(f"cannot write the run directory {run_dir} ({exc.strerror or exc}); "
                          "give a writable --run-dir") from None
