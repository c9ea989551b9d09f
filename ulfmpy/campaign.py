"""Fault campaigns: spec loading, seeded schedules, classification. Pure (no MPI).

``ulfmpy campaign SPEC.toml`` (:mod:`ulfmpy._cmd_campaign`) runs every
schedule this module generates and judges each run with :func:`classify`.

**Schedules.** Schedule ``i`` of a spec is drawn from
``random.Random(f"ulfmpy-campaign:{seed}:{i}")`` alone, so it is fully
determined by (spec, seed, i): its ID is ``NNNN-hhhhhh``, the index and the
first six hex digits of the SHA-256 of its content (the ``ulfmpy run``
arguments, the whole-job kill). Changing the spec changes the hash of every
schedule whose content changed, so a resumed campaign re-runs exactly those.
A schedule picks an app, a step count, a rank count, a fault family (by
weight), a policy (by weight; flip-only families keep the default one and
count as policy ``-``) and one value of each setting.

**Classes** (checked in this order):

* ``HANG`` — a run did not end within the timeout (its process group and
  every process carrying its run directory were SIGKILLed).
* ``LOST`` — a committed checkpoint was skipped or could not be restored.
  Rule, from :mod:`ulfmpy._ckpt_restore`: a ``restore_fallback`` event whose
  reason starts with ``not committed`` is expected (a step directory with no
  manifest: a checkpoint newer than the failure that never committed, not
  lost); every other ``restore_fallback`` (manifest unreadable, checksum or
  coverage problem, read failure: a committed checkpoint skipped) and every
  ``restore_failed`` (committed checkpoints exist and none restored) is LOST.
  A resume after a whole-job kill is also LOST when it started fresh
  (``restore_none``) or restored an older step although a newer manifest
  (the commit point) was in ``ckpt/`` before it started.
* ``EXACT`` — exit 0 and the fingerprint equals the reference (``ulfmpy run
  -n 4 --no-resilience`` of the same app, args and steps).
* ``ESCAPED-REPORTED`` — the fingerprint differs or the run failed, and the
  run reported ``escaped_faults`` > 0 (``summary.json``, or the launcher's
  warning line when no summary was written).
* ``WRONG`` — exit 0 with another fingerprint and no escaped fault, exit 0
  with no summary, or a nonzero exit with no clear error line.
* ``CLEAR-ERROR`` — a nonzero exit whose stderr has a clear line starting
  with ``ulfmpy`` (informational launcher lines — run directory, warnings,
  relaunch notices — do not count).

Results, resume and summaries are in :mod:`ulfmpy._cmd_campaign`.

A whole-job kill (``job_kill``) SIGKILLs the ``ulfmpy run`` process group
``delay`` seconds after a rank logged ``checkpoint_saved`` for a step >= S
(S a multiple of the checkpoint interval; so the kill lands in a write, a
commit or a segment, by timing), or ``at`` seconds after the launch when the
family sets ``at = [lo, hi]``; then ``ulfmpy run --resume auto`` runs in the
same run directory on another rank count of the spec. The schedule is
judged by that second run; the first must only not hang (a first run that
ended before its kill is recorded with ``killed_by_campaign`` false).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ulfmpy.errors import ConfigError

__all__ = ["CLASSES", "FAILING", "FAMILIES", "Spec", "Schedule", "RunOutcome", "load_spec",
           "parse_spec", "generate", "schedules", "find_schedule", "classify", "lost_reasons",
           "first_error_line", "last_error_line", "escaped_count"]

CLASSES = ("EXACT", "ESCAPED-REPORTED", "CLEAR-ERROR", "HANG", "WRONG", "LOST")
FAILING = ("HANG", "WRONG", "LOST")
KILL_PHASES = ("compute", "agreement", "rollback", "checkpoint", "recovery")
RECOVERY_POLICIES = ("spares", "respawn", "shrink")

#: family -> default knobs (a spec overrides them in ``[families.NAME]``).
FAMILIES: dict[str, dict[str, Any]] = {
    "flip": {"bits": [0, 63], "persistent": 0.05, "repeat": 0.1},
    "flip_rate": {"rates": [0.002, 0.01]},
    "kill": {"phases": ["compute", "agreement", "rollback", "checkpoint"], "at": [0.1, 1.5]},
    "kill_at": {"at": [0.1, 1.5]},
    "kill_mtbf": {"mtbf": [0.5, 3.0]},
    "double_kill": {"phases": ["compute", "agreement"]},
    "kill_in_recovery": {},
    "flip_kill": {"bits": [0, 63]},
    "node_kill": {"phases": ["compute", "agreement", "checkpoint"]},
    "job_kill": {"delay": [0.0, 0.2], "at": [], "ckpt_every": 10},
}
FLIP_ONLY = ("flip", "flip_rate")
DEFAULT = "default"


def _tomllib() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib


@dataclass(frozen=True)
class App:
    name: str
    script: str
    args: tuple[str, ...] = ()
    steps: tuple[int, ...] = (80,)
    steps_flag: str = "--steps"
    arrays: tuple[str, ...] = ()
    index_max: int = 0


@dataclass(frozen=True)
class Spec:
    """A campaign spec (see ``campaigns/ci.toml`` for every key)."""

    path: str
    seed: int
    count: int
    timeout: float
    root: str
    apps: tuple[App, ...]
    ranks: tuple[int, ...]
    policies: dict[str, float]
    families: dict[str, dict[str, Any]]
    settings: dict[str, list[Any]]
    spares: tuple[int, ...] = (1,)
    max_restarts: int = 2
    relaunch_ranks: tuple[Any, ...] = ("same",)
    virtual_nodes: tuple[int, ...] = ()
    reference_ranks: int = 4

    @property
    def stem(self) -> str:
        return Path(self.path).stem


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_spec(path: str | Path) -> Spec:
    """Read and check a TOML campaign spec; :class:`ConfigError` names what is wrong."""
    p = Path(path)
    try:
        data = _tomllib().loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read campaign spec {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"campaign spec {path} is not valid TOML: {exc}") from None
    return parse_spec(data, str(p))


def parse_spec(data: dict[str, Any], path: str = "spec.toml") -> Spec:
    """Check a spec already parsed from TOML. Pure."""
    known = {"name", "seed", "schedules", "timeout", "root", "apps", "ranks", "policies",
             "families", "settings", "spares", "max_restarts", "relaunch_ranks",
             "virtual_nodes", "reference_ranks"}
    extra = set(data) - known
    if extra:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(extra))}")
    apps = []
    for a in data.get("apps") or []:
        if "script" not in a:
            raise ConfigError(f"{path}: every [[apps]] needs script = \"...\"")
        steps = tuple(int(s) for s in _list(a.get("steps", 80)))
        if any(s < 4 for s in steps):
            raise ConfigError(f"{path}: app {a['script']}: steps must be >= 4")
        apps.append(App(name=a.get("name", Path(a["script"]).stem), script=a["script"],
                        args=tuple(str(x) for x in a.get("args", [])), steps=steps,
                        steps_flag=a.get("steps_flag", "--steps"),
                        arrays=tuple(a.get("arrays", [])), index_max=int(a.get("index_max", 0))))
    if not apps:
        raise ConfigError(f"{path}: no [[apps]] given")
    families: dict[str, dict[str, Any]] = {}
    for name, val in (data.get("families") or {}).items():
        if name not in FAMILIES:
            raise ConfigError(f"{path}: unknown fault family {name!r}; known: {', '.join(FAMILIES)}")
        knobs = dict(FAMILIES[name])
        if isinstance(val, dict):
            bad = set(val) - set(knobs) - {"weight"}
            if bad:
                raise ConfigError(f"{path}: family {name}: unknown knob(s) {', '.join(sorted(bad))}")
            knobs.update(val)
        else:
            knobs["weight"] = val
        knobs["weight"] = float(knobs.get("weight", 1.0))
        if knobs["weight"] > 0:
            families[name] = knobs
    vnodes = tuple(int(k) for k in _list(data.get("virtual_nodes", [])) if int(k) > 0)
    if "node_kill" in families and not vnodes:
        raise ConfigError(f"{path}: family node_kill needs virtual_nodes = [K, ...]")
    if not families:
        raise ConfigError(f"{path}: no fault family with a positive weight")
    policies = {str(k): float(v) for k, v in (data.get("policies") or {"spares": 1}).items()}
    for pol in policies:
        chain, _, relaunch = pol.partition("+")
        names = [] if chain in ("", "none") else chain.split(",")
        if any(n not in RECOVERY_POLICIES for n in names) or relaunch not in ("", "relaunch"):
            raise ConfigError(f"{path}: policy {pol!r}: give a chain of {', '.join(RECOVERY_POLICIES)} "
                              "(comma-separated) or none, optionally followed by +relaunch")
    settings = {str(k): _list(v) for k, v in (data.get("settings") or {}).items()}
    ranks = tuple(int(r) for r in _list(data.get("ranks", [4])))
    if not ranks or min(ranks) < 2:
        raise ConfigError(f"{path}: ranks must be a list of counts >= 2")
    root = Path(path).parent / data.get("root", ".")
    return Spec(path=path, seed=int(data.get("seed", 0)), count=int(data.get("schedules", 100)),
                timeout=float(data.get("timeout", 120)), root=str(root.resolve()),
                apps=tuple(apps), ranks=ranks, policies=policies, families=families,
                settings=settings, spares=tuple(int(s) for s in _list(data.get("spares", [1]))),
                max_restarts=int(data.get("max_restarts", 2)),
                relaunch_ranks=tuple(_list(data.get("relaunch_ranks", ["same"]))),
                virtual_nodes=vnodes, reference_ranks=int(data.get("reference_ranks", 4)))


@dataclass
class Schedule:
    """One generated run (or kill-then-resume pair) of a campaign."""

    index: int
    id: str
    family: str
    app: str
    ref_key: str
    ranks: int
    policy: str
    faults: list[str]
    settings: dict[str, Any]
    args: list[str]                    # ulfmpy run arguments, --run-dir excluded
    resume_args: list[str] | None = None   # whole-job kill: the resuming run
    #: whole-job kill: {"after_checkpoint": S, "delay": D} (D s after a rank saved the
    #: checkpoint of step >= S) or {"at": T} (T s after the launch)
    kill_job: dict[str, Any] | None = None
    detectors: str = DEFAULT

    def describe(self) -> str:
        what = " ".join(self.faults) or "-"
        if self.kill_job is not None:
            m = self.resume_args[self.resume_args.index("-n") + 1] if self.resume_args else "?"
            k = self.kill_job
            when = (f"{k['at']}s" if "at" in k else
                    f"{k['delay']}s after checkpoint {k['after_checkpoint']}")
            what = f"SIGKILL job {when}, resume on {m}"
        return f"{self.family} n={self.ranks} {self.policy} {what}"


def _weighted(rng: random.Random, weights: dict[str, float]) -> str:
    names = sorted(weights)
    return rng.choices(names, [weights[n] for n in names])[0]


def _uniform(rng: random.Random, lohi: list[float]) -> float:
    return round(rng.uniform(float(lohi[0]), float(lohi[-1])), 2)


def _flip(rng: random.Random, app: App, rank: int, step: int, bits: list[int],
          extra: str = "") -> str:
    spec = f"bitflip:rank={rank},step={step}"
    if app.arrays:
        spec += f",array={rng.choice(app.arrays)}"
    if app.index_max:
        spec += f",index={rng.randrange(app.index_max)}"
    return spec + f",bit={rng.randint(int(bits[0]), int(bits[-1]))}" + extra


def _need_checkpoints(settings: dict[str, Any], every: int) -> None:
    """A fault that needs checkpoints (a checkpoint-phase kill, a job kill) gets them."""
    if settings.get("ckpt_every", DEFAULT) in (DEFAULT, 0, "0"):
        settings["ckpt_every"] = every


def generate(spec: Spec, index: int) -> Schedule:
    """Schedule ``index`` of ``spec``: a function of (spec, seed, index) only. Pure."""
    rng = random.Random(f"ulfmpy-campaign:{spec.seed}:{index}")
    app = spec.apps[rng.randrange(len(spec.apps))]
    steps = rng.choice(app.steps)
    n = rng.choice(spec.ranks)
    family = _weighted(rng, {k: v["weight"] for k, v in spec.families.items()})
    knobs = spec.families[family]
    settings = {k: rng.choice(v) for k, v in sorted(spec.settings.items())}
    policy = "-" if family in FLIP_ONLY else _weighted(rng, spec.policies)
    chain, _, relaunch = policy.partition("+")
    spares = rng.choice(spec.spares) if "spares" in chain.split(",") else 0
    vn = 0
    if family == "node_kill":
        fits = [k for k in spec.virtual_nodes if k <= n] or [min(spec.virtual_nodes)]
        vn = rng.choice(fits)
    elif spec.virtual_nodes:
        vn = rng.choice([0, *[k for k in spec.virtual_nodes if k <= n]])
    step = lambda: rng.randint(1, steps - 2)  # noqa: E731 - a step every fault can reach
    rank = lambda: rng.randrange(n)  # noqa: E731
    faults: list[str] = []
    kill_job = None
    if family == "flip":
        extra = ""
        u = rng.random()
        if u < knobs["persistent"]:
            extra = ",persistent=1"
        elif u < knobs["persistent"] + knobs["repeat"]:
            extra = f",repeat={rng.randint(2, 5)}"
        faults.append(_flip(rng, app, rank(), step(), knobs["bits"], extra))
    elif family == "flip_rate":
        rate = rng.choice(knobs["rates"])
        faults.append(f"bitflip:rate={rate},seed={rng.randrange(1, 10**6)}")
    elif family in ("kill", "kill_at"):
        r = rng.randrange(n + spares)
        if family == "kill_at" or r >= n:      # a waiting spare runs no steps: a timed kill
            faults.append(f"kill:rank={r},at={_uniform(rng, knobs['at'])}s")
        else:
            phase, s = rng.choice(knobs["phases"]), step()
            faults.append(f"kill:rank={r},step={s},phase={phase}")
            if phase == "rollback":           # something to roll back: a detectable flip there
                faults.insert(0, f"bitflip:rank={r},step={s},bit=62")
                if "bounds" not in str(settings.get("detect", "")):
                    settings["detect"] = "finite,bounds"
            if phase == "checkpoint":
                _need_checkpoints(settings, 10)
    elif family == "kill_mtbf":
        faults.append(f"kill:mtbf={_uniform(rng, knobs['mtbf'])}s,seed={rng.randrange(1, 10**6)}")
    elif family == "double_kill":
        a, b = rng.sample(range(n), 2)
        phase, s = rng.choice(knobs["phases"]), step()
        faults += [f"kill:rank={a},step={s},phase={phase}", f"kill:rank={b},step={s},phase={phase}"]
    elif family == "kill_in_recovery":
        a, b = rng.sample(range(n), 2)
        s = step()
        faults += [f"kill:rank={a},step={s}", f"kill:rank={b},step={s},phase=recovery"]
    elif family == "flip_kill":                # half the time the flipped rank dies later
        r, s = rank(), step()
        faults.append(_flip(rng, app, r, s, knobs["bits"]))
        r2 = r if rng.random() < 0.5 else rank()
        faults.append(f"kill:rank={r2},step={rng.randint(s, steps - 2)}")
    elif family == "node_kill":
        phase = rng.choice(knobs["phases"])
        faults.append(f"kill:node=node{rng.randrange(vn)},step={step()},phase={phase}")
        if phase == "checkpoint":
            _need_checkpoints(settings, 10)
    elif family == "job_kill":
        _need_checkpoints(settings, knobs["ckpt_every"])
        if knobs["at"]:
            kill_job = {"at": _uniform(rng, knobs["at"])}
        else:
            every = int(settings["ckpt_every"])
            last = max(every, (steps - 1) // every * every - every)
            kill_job = {"after_checkpoint": rng.randrange(every, last + 1, every),
                        "delay": _uniform(rng, knobs["delay"])}
    relaunch_n = None
    if relaunch:
        choice = rng.choice(spec.relaunch_ranks)
        relaunch_n = None if choice == "same" else int(choice)

    def run_args(ranks: int, inject: list[str], resume: bool) -> list[str]:
        out = ["-n", str(ranks)]
        if spares:
            out += ["--spares", str(spares)]
        if policy != "-":
            out += ["--recovery", "" if chain == "none" else chain]
        if relaunch:
            out += ["--max-restarts", str(spec.max_restarts)]
            if relaunch_n:
                out += ["--relaunch-n", str(relaunch_n)]
        if vn:
            out += ["--virtual-nodes", str(vn)]
        for key, val in settings.items():
            if val != DEFAULT:
                out += ["--" + key.replace("_", "-"), str(val)]
        if resume:
            out += ["--resume", "auto"]
        for f in inject:
            out += ["--inject", f]
        return out + [app.script, *app.args, app.steps_flag, str(steps)]

    args = run_args(n, faults, False)
    resume_args = None
    if family == "job_kill":
        others = [m for m in spec.ranks if m != n] or [n]
        resume_args = run_args(rng.choice(others), [], True)
    content = {"args": args, "resume_args": resume_args, "kill_job": kill_job}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:6]
    width = max(4, len(str(max(spec.count - 1, 0))))
    ref_key = shlex.join([app.script, *app.args, app.steps_flag, str(steps)])
    return Schedule(index=index, id=f"{index:0{width}d}-{digest}", family=family, app=app.name,
                    ref_key=ref_key, ranks=n, policy=policy, faults=faults, settings=settings,
                    args=args, resume_args=resume_args, kill_job=kill_job,
                    detectors=str(settings.get("detect", DEFAULT)))


def schedules(spec: Spec, limit: int | None = None) -> list[Schedule]:
    """The first ``limit`` (default: all ``schedules``) schedules of ``spec``. Pure."""
    count = spec.count if limit is None else min(limit, spec.count)
    return [generate(spec, i) for i in range(count)]


def find_schedule(spec: Spec, sid: str) -> Schedule:
    """The schedule with ID ``sid`` (``NNNN-hhhhhh``, or just the index ``NNNN``)."""
    head, _, digest = sid.partition("-")
    if not head.isdigit() or int(head) >= spec.count:
        raise ConfigError(f"no schedule {sid!r} in {spec.path} (IDs 0..{spec.count - 1}, "
                          "e.g. 0007 or 0007-1a2b3c)")
    sch = generate(spec, int(head))
    if digest and sch.id != sid:
        raise ConfigError(f"schedule {sid!r} is not in {spec.path} any more: index {int(head)} is "
                          f"now {sch.id} (the spec changed)")
    return sch


# -- classification ---------------------------------------------------------------------


@dataclass
class RunOutcome:
    """What one ``ulfmpy run`` did, as the classifier needs it."""

    exit_code: int | None
    timed_out: bool = False
    stderr: str = ""
    summary: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # this launch's events only
    committed_before: list[int] = field(default_factory=list)   # manifests before it started
    wall_s: float = 0.0


_INFO = re.compile(r"run directory |: warning: |relaunch \d+/\d+|launching again|^ulfmpy run: "
                   r"job exited with status")
_ESCAPED = re.compile(r"(\d+) injected bit flip\(s\) escaped detection")


def first_error_line(stderr: str) -> str | None:
    """The first line starting with ``ulfmpy`` that is not informational, or None."""
    for line in stderr.splitlines():
        line = line.strip()
        if line.startswith("ulfmpy") and not _INFO.search(line):
            return line
    return None


def last_error_line(stderr: str) -> str | None:
    """The last such line (often the launcher's verdict, e.g. why the status is 76)."""
    lines = [ln.strip() for ln in stderr.splitlines()]
    found = [ln for ln in lines if ln.startswith("ulfmpy") and not _INFO.search(ln)]
    return found[-1] if found else None


def escaped_count(out: RunOutcome) -> int:
    if out.summary is not None and "escaped_faults" in out.summary:
        return int(out.summary.get("escaped_faults") or 0)
    m = _ESCAPED.search(out.stderr)
    return int(m.group(1)) if m else 0


def lost_reasons(events: Iterable[dict[str, Any]], committed_before: list[int] = ()) -> list[str]:
    """Why a committed checkpoint was lost in these events (the module doc's rule). Pure."""
    found: dict[str, None] = {}
    restored, fresh = [], False
    for e in events:
        kind = e.get("event")
        if kind == "restore_fallback":
            reason = str(e.get("reason", ""))
            if not reason.startswith("not committed"):
                found[f"committed step {e.get('step')} skipped: {reason}"] = None
        elif kind == "restore_failed":
            why = e.get("reasons") or [f"step {f.get('step')}: {f.get('reason')}"
                                       for f in e.get("fallbacks", [])]
            found[f"restore failed ({e.get('path') or e.get('source')}): "
                  + "; ".join(map(str, why))] = None
        elif kind == "restored":
            restored.append(int(e.get("step", -1)))
        elif kind == "restore_none":
            fresh = True
    if committed_before:
        newest = max(committed_before)
        if restored and min(restored) < newest:
            found[f"resumed from step {min(restored)} although step {newest} was committed"] = None
        elif fresh and not restored:
            found[f"resume started fresh although step {newest} was committed"] = None
    return list(found)


def classify(out: RunOutcome, reference: str) -> tuple[str, str]:
    """(class, why) of one run against the reference fingerprint. Pure."""
    if out.timed_out:
        return "HANG", "no exit within the timeout"
    lost = lost_reasons(out.events, out.committed_before)
    if lost:
        return "LOST", lost[0]
    escaped = escaped_count(out)
    fp = (out.summary or {}).get("fingerprint")
    if out.exit_code == 0:
        if out.summary is None or not fp:
            return "WRONG", "exit 0 but no summary.json with a fingerprint"
        if fp == reference:
            return "EXACT", "fingerprint equals the reference"
        if escaped:
            return "ESCAPED-REPORTED", f"fingerprint differs; {escaped} escaped fault(s) reported"
        return "WRONG", f"fingerprint {fp} != reference {reference}, no escaped fault reported"
    if escaped:
        return "ESCAPED-REPORTED", f"exit {out.exit_code}; {escaped} escaped fault(s) reported"
    line = first_error_line(out.stderr)
    if line:
        return "CLEAR-ERROR", f"exit {out.exit_code}: {line}"
    return "WRONG", f"exit {out.exit_code} with no clear 'ulfmpy' error line"
