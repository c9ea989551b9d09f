"""Run configuration: one name per setting in three places.

Every setting is a ``Runtime(...)`` keyword, an ``ulfmpy run`` flag and a
``ULFMPY_*`` environment variable: ``segment_steps`` ↔ ``--segment-steps`` ↔
``ULFMPY_SEGMENT_STEPS``. Precedence: keyword > environment > default, so
the launcher can inject faults or set policies without touching the app.
Pure: imports no MPI.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from ulfmpy.errors import ConfigError
from ulfmpy.seglength import DEFAULT_BUDGET

__all__ = ["Config", "add_config_arguments", "config_env_from_args", "ENV_PREFIX"]

ENV_PREFIX = "ULFMPY_"


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(text).split(",") if p.strip())


def _duration(text: str) -> float:
    from ulfmpy.units import parse_duration

    return parse_duration(text)


def _segment_steps(text: str) -> int:
    return 0 if str(text).strip().lower() == "auto" else int(text)


def _opt(kind: Callable[[str], Any], help: str, *, choices: tuple[str, ...] | None = None,
         repeat: bool = False) -> dict[str, Any]:
    return {"kind": kind, "help": help, "choices": choices, "repeat": repeat}


@dataclass(frozen=True, kw_only=True)
class Config:
    """Settings of one run; frozen, validated, equal on all ranks.

    Build with :meth:`Config.load` (keywords over ``ULFMPY_*`` environment).
    """

    run_dir: str | None = field(default=None, metadata=_opt(
        str, "run directory (events, summary, checkpoints); default runs/run-<time>"))
    resilience: bool = field(default=True, metadata=_opt(
        lambda s: _bool(s), "protect the loop (segments, detection, rollback); off = plain baseline"))
    segment_steps: int = field(default=0, metadata=_opt(
        lambda s: _segment_steps(s),
        "steps per restartable segment, or auto (0, the default): the shortest segment whose "
        "boundaries cost at most --segment-budget of the step time, measured as the run goes"))
    segment_budget: float = field(default=DEFAULT_BUDGET, metadata=_opt(
        float, "with --segment-steps auto: fraction of the step time the segment boundaries "
        "(snapshot, detectors, agreement) may cost"))
    detect: tuple[str, ...] = field(default=("finite",), metadata=_opt(
        _csv, "detectors run at segment end, comma-separated (finite,bounds,invariant,...)"))
    detect_every: int = field(default=0, metadata=_opt(
        int, "also run the detectors every N steps inside a segment (1 = every step, 0 = only at segment end)"))
    max_retries: int = field(default=3, metadata=_opt(
        int, "re-executions of a segment that detect the error again before escalating"))
    rollback: str = field(default="local", metadata=_opt(
        str, "who re-executes a corrupted segment: local (contamination closure) or global (all ranks)",
        choices=("local", "global")))
    inject: tuple[str, ...] = field(default=(), metadata=_opt(
        str, "fault to inject (repeatable), e.g. bitflip:rank=1,step=57 or kill:rank=2,step=40",
        repeat=True))
    seed: int = field(default=0, metadata=_opt(int, "seed of randomized fault plans"))
    ckpt_every: int = field(default=0, metadata=_opt(
        int, "global checkpoint every N steps (rounded to segment boundaries; 0 = off unless --ckpt-seconds or --mtbf)"))
    ckpt_seconds: float = field(default=0.0, metadata=_opt(
        _duration, "global checkpoint every S seconds of run time"))
    ckpt_keep: int = field(default=2, metadata=_opt(int, "committed checkpoints to keep (>= 2)"))
    ckpt_mode: str = field(default="async", metadata=_opt(
        str, "checkpoint writer", choices=("async", "sync")))
    resume: str = field(default="none", metadata=_opt(
        str, "resume from: none, auto (newest valid checkpoint in the run dir), or a checkpoint path"))
    partner: bool = field(default=True, metadata=_opt(
        lambda s: _bool(s), "at each checkpoint also keep one partner rank's copy in memory, so a "
        "replacement restores from it instead of the files"))
    recovery: tuple[str, ...] = field(default=("spares", "respawn", "shrink"), metadata=_opt(
        _csv, "in-job recovery policies tried in order (spares,respawn,shrink)"))
    zygote: bool = field(default=True, metadata=_opt(
        lambda s: _bool(s), "with the respawn policy: fork replacements from a pre-imported process "
        "kept on each node (off = start them as fresh interpreters)"))
    spares: int = field(default=0, metadata=_opt(int, "spare ranks started beyond -n (set by ulfmpy run --spares)"))
    mtbf: float = field(default=0.0, metadata=_opt(
        _duration, "job mean time between hard failures; enables the online interval policy"))
    node_mtbf: float = field(default=0.0, metadata=_opt(
        _duration, "per-node MTBF (job MTBF = node MTBF / nodes)"))
    soft_mtbf: float = field(default=0.0, metadata=_opt(
        _duration, "mean time between soft errors; proposes the segment length"))
    interval_model: str = field(default="exact", metadata=_opt(
        str, "checkpoint interval model", choices=("exact", "young", "daly", "saxena")))
    recovery_estimate: float = field(default=5.0, metadata=_opt(
        _duration, "recovery time assumed until one is measured"))

    def __post_init__(self) -> None:
        if self.segment_steps < 0:
            raise ConfigError(f"segment_steps must be >= 1 (or auto / 0), got {self.segment_steps}")
        if not 0 < self.segment_budget < 1:
            raise ConfigError(f"segment_budget must be a fraction in (0, 1), e.g. 0.0025, "
                              f"got {self.segment_budget}")
        if self.detect_every < 0:
            raise ConfigError(f"detect_every must be >= 0, got {self.detect_every}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.ckpt_keep < 2:
            raise ConfigError(f"ckpt_keep must be >= 2 (a torn newest checkpoint needs an older one), got {self.ckpt_keep}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        for name in ("ckpt_every", "spares"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> "Config":
        """Settings from keywords over ``ULFMPY_*`` variables over defaults.

        Raises :class:`ConfigError` for an unknown keyword or a bad value,
        naming the setting and where it came from.
        """
        environ = os.environ if environ is None else environ
        known = {f.name: f for f in fields(cls)}
        unknown = set(kwargs) - set(known)
        if unknown:
            raise ConfigError(f"unknown ulfmpy setting(s): {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(known)}")
        values: dict[str, Any] = {}
        for name, f in known.items():
            env = ENV_PREFIX + name.upper()
            if name in kwargs:
                value = kwargs[name]
                if isinstance(value, str) and f.type not in ("str", "str | None"):
                    value = _convert(f, value, f"keyword {name}")
                elif isinstance(value, list):
                    value = tuple(value)
                values[name] = value
            elif env in environ:
                values[name] = _convert(f, environ[env], f"environment variable {env}")
        return cls(**values)

    def digest(self) -> str:
        """A short hash of all settings, compared across ranks."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_uniform(self, comm: Any) -> None:
        """Raise :class:`ConfigError` on every rank if ranks hold different settings.

        Collective over ``comm``.
        """
        digests = comm.allgather(self.digest())
        if len(set(digests)) != 1:
            bad = [r for r, d in enumerate(digests) if d != digests[0]]
            raise ConfigError(
                f"ulfmpy settings differ between ranks (ranks {bad} differ from rank 0); "
                "pass the same Runtime keywords and ULFMPY_* variables to every rank")


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected a boolean (1/0, true/false), got {text!r}")


def _convert(f: dataclasses.Field[Any], text: str, origin: str) -> Any:
    kind = f.metadata["kind"]
    try:
        if f.metadata.get("repeat"):
            # Several faults travel in one variable separated by ';'.
            return tuple(p.strip() for p in text.split(";") if p.strip())
        return kind(text)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: bad value {text!r} for {f.name}: {exc}") from exc


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting (dest = setting name, default None)."""
    group = parser.add_argument_group("ulfmpy settings (also ULFMPY_* variables)")
    for f in fields(Config):
        if f.name == "spares":
            continue  # ulfmpy run owns --spares, it also changes the rank count
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": f.metadata["help"]}
        if f.metadata.get("repeat"):
            kw["action"] = "append"
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if f.name == "resilience":
            group.add_argument("--no-resilience", dest="resilience", action="store_const",
                               const="0", default=None, help=f.metadata["help"])
            continue
        group.add_argument(flag, **kw)


def config_env_from_args(args: argparse.Namespace) -> dict[str, str]:
    """``ULFMPY_*`` variables for the settings given on a command line.

    Values are validated here, so a bad flag fails before ``mpirun`` starts.
    """
    env: dict[str, str] = {}
    given: dict[str, Any] = {}
    for f in fields(Config):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        text = ";".join(value) if isinstance(value, list) else str(value)
        env[ENV_PREFIX + f.name.upper()] = text
        given[f.name] = text
    Config.load(environ={ENV_PREFIX + k.upper(): v for k, v in given.items()})
    return env
