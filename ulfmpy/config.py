"""Run configuration: one name per setting in three places.

Every setting is a ``Runtime(...)`` keyword, an ``ulfmpy run`` flag and a
``ULFMPY_*`` environment variable: ``segment_steps`` ↔ ``--segment-steps`` ↔
``ULFMPY_SEGMENT_STEPS``. Precedence, highest first:

1. a flag of ``ulfmpy run``: the launcher passes it as its ``ULFMPY_*``
   variable and names it in ``ULFMPY_FLAGS`` (the operator's choice for
   this run wins over the code);
2. a ``Runtime(...)`` keyword;
3. any other ``ULFMPY_*`` environment variable;
4. the default.

Settings that contradict each other (``--mtbf`` with ``--ckpt-every``, ...,
see :data:`CONFLICTS`) are refused with a :class:`ConfigError` naming both
and where each came from, rather than one silently doing nothing.
Pure: imports no MPI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from ulfmpy.errors import ConfigError
from ulfmpy.seglength import DEFAULT_BUDGET

__all__ = ["Config", "add_config_arguments", "config_env_from_args", "ENV_PREFIX", "FLAGS_ENV",
           "CONFLICTS", "flag_name", "RECOVERY_POLICIES", "default_text"]

ENV_PREFIX = "ULFMPY_"
#: Set by ``ulfmpy run``: the comma-separated setting names given on its
#: command line. Those settings win over ``Runtime(...)`` keywords. Not a setting.
FLAGS_ENV = ENV_PREFIX + "FLAGS"
#: The in-job recovery policies (``ulfmpy.repair.POLICIES`` implements each).
RECOVERY_POLICIES = ("spares", "respawn", "shrink")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(text).split(",") if p.strip())


def _duration(text: str) -> float:
    from ulfmpy.units import parse_duration

    return parse_duration(text)


def _steps(text: str, *, instead: str | None = None) -> int:
    """A count of steps; a duration given where steps are asked is named as such."""
    t = str(text).strip()
    try:
        return int(t)
    except ValueError:
        pass
    from ulfmpy.units import parse_duration

    try:
        parse_duration(t)
    except ConfigError:
        raise ConfigError(f"expected a whole number of steps, got {text!r}") from None
    hint = f"; for a time give {instead} {t}" if instead else ""
    raise ConfigError(f"{text!r} is a duration, but this setting counts steps{hint}")


def _int(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise ConfigError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise ConfigError(f"expected a number, got {text!r}") from None


def _segment_steps(text: str) -> int:
    return 0 if str(text).strip().lower() == "auto" else _steps(text)


def _opt(kind: Callable[[str], Any], help: str, *, choices: tuple[str, ...] | None = None,
         repeat: bool = False) -> dict[str, Any]:
    return {"kind": kind, "help": help, "choices": choices, "repeat": repeat}


@dataclass(frozen=True, kw_only=True)
class Config:
    """Settings of one run; frozen, validated, equal on all ranks.

    Build with :meth:`Config.load` (``ulfmpy run`` flags over keywords over
    other ``ULFMPY_*`` variables over defaults).
    """

    run_dir: str | None = field(default=None, metadata=_opt(
        str, "run directory (events, summary, checkpoints)"))
    resilience: bool = field(default=True, metadata=_opt(
        lambda s: _bool(s), "protect the loop (segments, detection, rollback); off = plain baseline"))
    segment_steps: int = field(default=0, metadata=_opt(
        lambda s: _segment_steps(s),
        "steps per restartable segment, or auto (0, the default): the shortest segment whose "
        "boundaries cost at most --segment-budget of the step time, measured as the run goes"))
    segment_budget: float = field(default=DEFAULT_BUDGET, metadata=_opt(
        _float, "with --segment-steps auto: fraction of the step time the segment boundaries "
        "(snapshot, detectors, agreement) may cost"))
    detect: tuple[str, ...] = field(default=("finite",), metadata=_opt(
        _csv, "detectors run at segment end, comma-separated: finite (no NaN/Inf), bounds "
        "(app.bounds = {name: (lo, hi)}), invariant (app.invariant() is True), checksum, or "
        "your own (ulfmpy.register_detector)"))
    bounds: tuple[str, ...] = field(default=(), metadata=_opt(
        _csv, "limits for the bounds detector when the app sets no app.bounds, "
        "NAME=LO:HI comma-separated (e.g. u=0:1); adds bounds to --detect"))
    detect_every: int = field(default=0, metadata=_opt(
        _steps, "also run the detectors every N steps inside a segment (1 = every step, 0 = only at segment end)"))
    max_retries: int = field(default=3, metadata=_opt(
        _int, "re-executions of a segment that detect the error again before escalating"))
    rollback: str = field(default="local", metadata=_opt(
        str, "who re-executes a corrupted segment: local (contamination closure) or global (all ranks)",
        choices=("local", "global")))
    diagnose: tuple[str, ...] = field(default=(), metadata=_opt(
        str, "an expensive detector run every N steps, whose finding may be up to L steps old "
        "(repeatable): NAME:every=N[,latency=L]; when it fires every rank goes back to a "
        "checkpoint older than that", repeat=True))
    inject: tuple[str, ...] = field(default=(), metadata=_opt(
        str, "fault to inject (repeatable), e.g. bitflip:rank=1,step=57 or kill:rank=2,step=40",
        repeat=True))
    seed: int = field(default=0, metadata=_opt(
        _int, "seed of randomized fault plans (rate flips, MTBF kills)"))
    ckpt_every: int = field(default=0, metadata=_opt(
        lambda s: _steps(s, instead="--ckpt-seconds"),
        "global checkpoint at every multiple of N steps (a segment ends there; 0 = off unless --ckpt-seconds or --mtbf)"))
    ckpt_seconds: float = field(default=0.0, metadata=_opt(
        _duration, "global checkpoint every S seconds of run time (a duration: 30s, 5m)"))
    ckpt_keep: int = field(default=2, metadata=_opt(
        _int, "committed checkpoints to keep (>= 2)"))
    ckpt_final: bool = field(default=False, metadata=_opt(
        lambda s: _bool(s), "also write the final state as a committed checkpoint when the loop "
        "ends (keeps the result as data; ulfmpy inspect and xarray open it)"))
    ckpt_mode: str = field(default="async", metadata=_opt(
        str, "async: the node's writer process writes the files while the loop goes on; sync: the "
        "save writes and commits before the loop goes on", choices=("async", "sync")))
    resume: str = field(default="none", metadata=_opt(
        str, "resume from: none, auto (newest valid checkpoint in the run dir), or a checkpoint path"))
    partner: bool = field(default=True, metadata=_opt(
        lambda s: _bool(s), "stage each rank's checkpoint in another rank's memory (on another "
        "node when there is one), which writes it and keeps it, so a replacement restores from "
        "it instead of the files (0 = every rank stages its own)"))
    recovery: tuple[str, ...] = field(default=("spares", "respawn", "shrink"), metadata=_opt(
        lambda s: () if str(s).strip().lower() == "none" else _csv(s),
        "in-job recovery policies tried in order, comma-separated (spares,respawn,shrink), or "
        "none: a dead rank ends the job (exit 75) and --max-restarts relaunches it"))
    zygote: bool = field(default=True, metadata=_opt(
        lambda s: _bool(s), "with the respawn policy: fork replacements from a pre-imported process "
        "kept on each node (off = start them as fresh interpreters)"))
    spares: int = field(default=0, metadata=_opt(
        _int, "spare ranks started beyond -n (set by ulfmpy run --spares)"))
    mtbf: float = field(default=0.0, metadata=_opt(
        _duration, "job mean time between hard failures; enables the online interval policy"))
    node_mtbf: float = field(default=0.0, metadata=_opt(
        _duration, "per-node MTBF (job MTBF = node MTBF / nodes)"))
    soft_mtbf: float = field(default=0.0, metadata=_opt(
        _duration, "mean time between soft errors; proposes the segment length"))
    interval_model: str = field(default="exact", metadata=_opt(
        str, "checkpoint interval model of --mtbf: exact (renewal optimum), young, daly, "
        "saxena (availability optimum)", choices=("exact", "young", "daly", "saxena")))
    recovery_estimate: float = field(default=5.0, metadata=_opt(
        _duration, "with --mtbf: the recovery time assumed until one is measured"))
    virtual_nodes: int = field(default=0, metadata=_opt(
        _int, "group the processes into K named nodes node0..node{K-1} on one machine (node kills, "
        "partner copies on another node, a zygote per node); 0 = the real hosts, which also "
        "win when the ranks run on several"))
    repair_timeout: float = field(default=30.0, metadata=_opt(
        _duration, "an in-job repair still unfinished after this long ends the job with exit 75 "
        "(relaunch resumes from the checkpoint) instead of hanging; 0 = wait for ever"))
    halt_signal: str = field(default="USR1,TERM", metadata=_opt(
        str, "signals that halt the run at the next segment boundary: checkpoint, then exit 79 "
        "(comma-separated names, or none)"))
    halt_before: float = field(default=120.0, metadata=_opt(
        _duration, "halt this long before the job's end (from --walltime, or Slurm's end time)"))
    walltime: float = field(default=0.0, metadata=_opt(
        _duration, "the job's wall time from its start (0: under Slurm, the job's end time)"))

    progress: str = field(default="auto", metadata=_opt(
        str, "progress display: bar (live, on a terminal), lines (one line every "
        "--progress-every), auto (bar on a terminal, else lines), off",
        choices=("auto", "bar", "lines", "off")))
    progress_every: float = field(default=10.0, metadata=_opt(
        _duration, "seconds between two progress lines"))

    def diagnostics(self) -> list[Any]:
        """The ``diagnose`` settings parsed (:class:`ulfmpy.detect.Diagnostic`). Pure."""
        from ulfmpy.detect import parse_diagnostic

        return [parse_diagnostic(t) for t in self.diagnose]

    def bounds_map(self) -> dict[str, tuple[float, float]]:
        """``--bounds u=0:1,v=-1:1`` as {name: (lo, hi)}."""
        out = {}
        for item in self.bounds:
            name, eq, rng = item.partition("=")
            lo, colon, hi = rng.partition(":")
            try:
                if not (eq and colon and name.strip()):
                    raise ValueError
                out[name.strip()] = (float(lo), float(hi))
            except ValueError:
                raise ConfigError(f"bounds {item!r}: give NAME=LO:HI, e.g. --bounds u=0:1") from None
            if not out[name.strip()][0] <= out[name.strip()][1]:
                raise ConfigError(f"bounds {item!r}: LO must not exceed HI")
        return out

    def __post_init__(self) -> None:
        if self.segment_steps < 0:
            raise ConfigError(f"segment_steps must be >= 1 (or auto / 0), got {self.segment_steps}")
        if not 0 < self.segment_budget < 1:
            raise ConfigError(f"segment_budget must be a fraction in (0, 1), e.g. 0.0025, "
                              f"got {self.segment_budget}")
        if self.detect_every < 0:
            raise ConfigError(f"detect_every must be >= 0, got {self.detect_every}")
        if self.bounds:
            self.bounds_map()  # the format, checked before any rank starts
            if "bounds" not in self.detect:
                object.__setattr__(self, "detect", (*self.detect, "bounds"))
        if self.diagnose:
            from ulfmpy.detect import parse_diagnostic

            for text in self.diagnose:
                parse_diagnostic(text)
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.ckpt_keep < 2:
            raise ConfigError(f"ckpt_keep must be >= 2 (a torn newest checkpoint needs an older one), got {self.ckpt_keep}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        for name in ("ckpt_every", "spares", "virtual_nodes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        self._check_names()
        # Built directly (not by load): a value other than the default counts as given.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        _check_conflicts(values, {f.name for f in fields(self) if values[f.name] != f.default})

    def _check_names(self) -> None:
        """Names the runtime would only trip on later: policies, fault specs, resume."""
        if tuple(self.recovery) == ("none",):  # Runtime(recovery=["none"])
            object.__setattr__(self, "recovery", ())
        bad = [p for p in self.recovery if p not in RECOVERY_POLICIES]
        if bad:  # none at all is allowed: no in-job recovery, relaunch only
            raise ConfigError(f"recovery: unknown policy {', '.join(map(repr, bad))}; give one or "
                              f"more of {', '.join(RECOVERY_POLICIES)}, comma-separated (or none)")
        if self.inject:
            from ulfmpy.inject import parse_fault

            for spec in self.inject:
                parse_fault(spec)
        from ulfmpy.halt import parse_signals

        try:
            parse_signals(self.halt_signal)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.halt_before < 0 or self.walltime < 0 or self.repair_timeout < 0:
            raise ConfigError("--halt-before, --walltime and --repair-timeout must be >= 0")
        if self.resume not in ("none", "auto") and not os.path.exists(self.resume):
            raise ConfigError(f"resume: {self.resume!r} does not exist; give none, auto (the "
                              "newest committed checkpoint in the run directory) or the path of "
                              "a run directory, its ckpt/ directory or one checkpoint")

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> "Config":
        """Settings from flags over keywords over ``ULFMPY_*`` variables over defaults.

        A setting named in ``ULFMPY_FLAGS`` (set by ``ulfmpy run``) takes
        its ``ULFMPY_*`` variable even when a keyword gives it too; see
        :meth:`load_with_sources` for the list of keywords so overridden.

        Raises :class:`ConfigError` for an unknown keyword, a bad value
        (naming the setting and where it came from) or two settings given
        together that contradict each other (:data:`CONFLICTS`).
        """
        return cls.load_with_sources(environ, **kwargs)[0]

    @classmethod
    def load_with_sources(cls, environ: Mapping[str, str] | None = None,
                          **kwargs: Any) -> "tuple[Config, list[dict[str, Any]]]":
        """Like :meth:`load`, also returning the keywords a flag overrode.

        Returns ``(config, overrides)``: one ``{"setting": name, "keyword":
        value, "flag": value}`` (both converted, e.g. seconds for a
        duration) per setting given both as a keyword and as an ``ulfmpy
        run`` flag with a different value, in field order. The flag's value
        is the one in ``config``.
        """
        environ = os.environ if environ is None else environ
        known = {f.name: f for f in fields(cls)}
        unknown = set(kwargs) - set(known)
        if unknown:
            raise ConfigError(f"unknown ulfmpy setting(s): {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(known)}")
        flags = set(_csv(environ.get(FLAGS_ENV, "")))
        if flags - set(known):
            raise ConfigError(
                f"environment variable {FLAGS_ENV} names unknown setting(s) "
                f"{', '.join(sorted(flags - set(known)))} (it lists the settings given as "
                f"ulfmpy run flags); known: {', '.join(known)}")
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        overrides: list[dict[str, Any]] = []
        for name, f in known.items():
            env = ENV_PREFIX + name.upper()
            keyword = _MISSING
            if name in kwargs:
                keyword = _from_keyword(f, kwargs[name])
            if name in flags and env in environ:
                value = _convert(f, environ[env], flag_name(name))
                values[name], sources[name] = value, "flag"
                if keyword is not _MISSING and keyword != value:
                    overrides.append({"setting": name, "keyword": keyword, "flag": value})
            elif keyword is not _MISSING:
                values[name], sources[name] = keyword, "keyword"
            elif env in environ:
                values[name] = _convert(f, environ[env], f"environment variable {env}")
                sources[name] = "environment"
        _check_conflicts(values, set(values), sources)
        return cls(**values), overrides

    def digest(self) -> str:
        """A short hash of all settings, compared across ranks."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        import hashlib  # here: OpenSSL's load is a tenth of the launcher's start-up

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


#: How a boolean setting may be spelled.
BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in BOOL_WORDS:
        return BOOL_WORDS[t]
    raise ConfigError(f"expected a boolean (1/0, true/false), got {text!r}")


_MISSING = object()


def _from_keyword(f: dataclasses.Field[Any], value: Any) -> Any:
    if isinstance(value, str) and f.type not in ("str", "str | None"):
        return _convert(f, value, f"keyword {f.name}")
    if isinstance(value, list):
        return tuple(value)
    return value


def flag_name(name: str) -> str:
    """The ``ulfmpy run`` flag of a setting: ``ckpt_every`` -> ``--ckpt-every``."""
    return "--no-resilience" if name == "resilience" else "--" + name.replace("_", "-")


_POLICY = "lets the interval policy choose when to checkpoint"
_OFF = "--no-resilience runs the plain loop"

#: Pairs of settings that must not be given together, with why. A setting
#: counts when it is given (keyword, flag or variable, not the default) and
#: on: a number > 0, a non-empty list, resilience off; ``segment_budget``
#: whenever it is given (it has no "off").
CONFLICTS: tuple[tuple[str, str, str], ...] = (
    ("mtbf", "ckpt_every", f"--mtbf {_POLICY}"),
    ("mtbf", "ckpt_seconds", f"--mtbf {_POLICY}"),
    ("node_mtbf", "ckpt_every", f"--node-mtbf {_POLICY}"),
    ("node_mtbf", "ckpt_seconds", f"--node-mtbf {_POLICY}"),
    ("mtbf", "node_mtbf", "both give the job MTBF (--node-mtbf divided by the node count)"),
    ("ckpt_every", "ckpt_seconds", "both set the checkpoint interval (in steps, in seconds)"),
    ("segment_steps", "soft_mtbf", "--segment-steps N fixes the segment length, --soft-mtbf "
     "proposes it from the soft-error rate"),
    ("segment_budget", "segment_steps", "--segment-budget only drives the automatic segment "
     "length (--segment-steps auto), so with a fixed length it would do nothing"),
    ("segment_budget", "soft_mtbf", "--segment-budget only drives the automatic segment "
     "length, which --soft-mtbf replaces, so it would do nothing"),
    *(("resilience", name, f"{_OFF}: it {what}, so {flag} would do nothing")
      for name, flag, what in (
          ("ckpt_every", "--ckpt-every", "takes no checkpoints"),
          ("ckpt_seconds", "--ckpt-seconds", "takes no checkpoints"),
          ("ckpt_final", "--ckpt-final", "takes no checkpoints"),
          ("mtbf", "--mtbf", "takes no checkpoints"),
          ("node_mtbf", "--node-mtbf", "takes no checkpoints"),
          ("inject", "--inject", "injects no faults"),
          ("detect_every", "--detect-every", "runs no detectors"))),
)

#: What a flag that turns a setting off looks like (for the hint to drop a keyword).
_OFF_FLAG = {"ckpt_every": "--ckpt-every 0", "ckpt_seconds": "--ckpt-seconds 0",
             "mtbf": "--mtbf 0", "node_mtbf": "--node-mtbf 0", "soft_mtbf": "--soft-mtbf 0",
             "segment_steps": "--segment-steps auto", "detect_every": "--detect-every 0"}


def _on(name: str, value: Any) -> bool:
    if name == "segment_budget":
        return True
    if name == "resilience":
        return not value  # counts when off
    if isinstance(value, (tuple, list)):
        return len(value) > 0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value > 0
    return bool(value)


def _where(name: str, source: str | None) -> str:
    if source == "flag":
        return "ulfmpy run flag"
    if source == "keyword":
        return f"Runtime keyword {name}"
    if source == "environment":
        return f"environment variable {ENV_PREFIX}{name.upper()}"
    return ""


def _check_conflicts(values: Mapping[str, Any], given: set[str],
                     sources: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` listing every pair of :data:`CONFLICTS` given together."""
    active = {n for n in given if n in values and _on(n, values[n])}
    found = []
    for a, b, why in CONFLICTS:
        if a not in active or b not in active:
            continue
        fa, fb = flag_name(a), flag_name(b)
        msg = f"{fa} and {fb} conflict: {why}; give one of them"
        if sources and a in sources and b in sources:
            if sources[a] != sources[b]:
                msg += f" ({fa}: {_where(a, sources[a])}; {fb}: {_where(b, sources[b])})"
            elif sources[a] == "flag":
                msg += " (both ulfmpy run flags)"
            elif sources[a] == "keyword":
                msg += f" (Runtime keywords {a} and {b})"
            else:
                msg += (f" (environment variables {ENV_PREFIX}{a.upper()} and "
                        f"{ENV_PREFIX}{b.upper()})")
            pair = {sources[a]: a, sources[b]: b}
            if set(pair) == {"flag", "keyword"} and pair["keyword"] in _OFF_FLAG:
                msg += (f"; a flag overrides a keyword: add {_OFF_FLAG[pair['keyword']]} "
                        f"to drop the keyword")
        found.append(msg)
    if len(found) == 1:
        raise ConfigError(found[0])
    if found:
        raise ConfigError("conflicting settings:\n  " + "\n  ".join(found))


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


def default_text(f: dataclasses.Field[Any]) -> str:
    """A setting's default as a user types it (``auto``, ``2m``, ``off``, ``none``)."""
    from ulfmpy.units import format_duration

    value = f.default
    if f.name == "segment_steps":
        return "auto"
    if f.name == "run_dir":
        return "runs/run-<time>"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value) if value else "none"
    if f.metadata["kind"] is _duration:
        return format_duration(value).replace(" ", "") if value else "0 (off)"
    return str(value)


#: What ``--no-resilience`` does, in the words of the flag (the setting itself
#: says what resilience does when on).
NO_RESILIENCE_HELP = ("run the plain loop, the baseline: no segments, detection, rollback, "
                      "checkpoints or fault injection")


_METAVARS = {"run_dir": "DIR", "inject": "FAULT", "diagnose": "NAME:every=N", "resume": "FROM", "halt_signal": "SIGNALS",
             "segment_steps": "N|auto", "segment_budget": "FRACTION"}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting (dest = setting name, default None)."""
    group = parser.add_argument_group("ulfmpy settings (also Runtime(...) keywords and "
                                      "ULFMPY_* variables)")
    for f in fields(Config):
        if f.name == "spares":
            continue  # ulfmpy run owns --spares, it also changes the rank count
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata['help']} (default: {default_text(f)})".replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_}
        if f.metadata.get("repeat"):
            kw["action"] = "append"
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if not f.metadata.get("choices") and f.type != "bool":
            kw["metavar"] = _METAVARS.get(f.name) or (
                "TIME" if f.metadata["kind"] is _duration else
                "N" if f.type == "int" else "LIST" if f.type.startswith("tuple") else "X")
        if f.type == "bool" and f.name != "resilience":
            # `--ckpt-final` alone turns it on; `--partner 0` still turns one off.
            kw.update(nargs="?", const="1", metavar="on|off")
        if f.name == "resilience":
            group.add_argument("--no-resilience", dest="resilience", action="store_const",
                               const="0", default=None, help=NO_RESILIENCE_HELP)
            continue
        group.add_argument(flag, **kw)


def settings_table() -> str:
    """The README's settings table (Markdown), one row per setting. Pure.

    ``tests/unit/test_readme_settings.py`` checks that the README holds exactly this;
    ``python -m ulfmpy.config --write-readme`` rewrites it.
    """
    rows = ["| `Runtime(...)` keyword | `ulfmpy run` flag | default | what it does |",
            "| --- | --- | --- | --- |"]
    for f in fields(Config):
        if f.name == "spares":
            flag, what = "--spares", "spare processes started beside the -n ranks (ulfmpy run only)"
        else:
            flag = flag_name(f.name)
            what = NO_RESILIENCE_HELP if f.name == "resilience" else f.metadata["help"]
        default = "on" if f.name == "resilience" else default_text(f)
        rows.append(f"| `{f.name}` | `{flag}` | `{default}` | {what.replace('|', '/')} |")
    rows.append("")
    rows.append("Each is also the environment variable `ULFMPY_<KEYWORD>` in capitals "
                "(`ULFMPY_CKPT_EVERY=50`).")
    return "\n".join(rows)


README_BEGIN = "<!-- settings table: generated from ulfmpy/config.py, do not edit -->"
README_END = "<!-- end of settings table -->"


def readme_with_settings(text: str) -> str:
    """``text`` (the README) with its settings table regenerated. Pure."""
    a, b = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    return text[:a] + "\n" + settings_table() + "\n" + text[b:]


def config_env_from_args(args: argparse.Namespace) -> dict[str, str]:
    """``ULFMPY_*`` variables for the settings given on a command line.

    Values are validated here, so a bad flag, or two flags that conflict,
    fail before ``mpirun`` starts. ``ulfmpy run`` adds :data:`FLAGS_ENV`
    naming these settings.
    """
    env: dict[str, str] = {}
    given: dict[str, Any] = {}
    for f in fields(Config):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        text = ";".join(value) if isinstance(value, list) else str(value)
        _convert(f, text, flag_name(f.name))  # the flag is named, not its variable
        env[ENV_PREFIX + f.name.upper()] = text
        given[f.name] = text
    Config.load(environ={**{ENV_PREFIX + k.upper(): v for k, v in given.items()},
                         FLAGS_ENV: ",".join(given)})
    return env


if __name__ == "__main__":  # python -m ulfmpy.config --write-readme [README.md]
    import sys

    if len(sys.argv) >= 2 and sys.argv[1] == "--write-readme":
        path = sys.argv[2] if len(sys.argv) > 2 else "README.md"
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(readme_with_settings(text))
    else:
        print(settings_table())
