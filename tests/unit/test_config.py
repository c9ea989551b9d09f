"""Settings: ulfmpy run flag > keyword > ULFMPY_* environment > default;
validated, and contradicting settings refused."""

import argparse
from dataclasses import fields

import pytest

from ulfmpy.config import (CONFLICTS, FLAGS_ENV, Config, add_config_arguments,
                           config_env_from_args, flag_name)
from ulfmpy.errors import ConfigError


def test_defaults():
    c = Config.load(environ={})
    assert c.segment_steps == 0 and c.detect == ("finite",) and c.rollback == "local"
    assert c.segment_budget == 0.0025  # segment_steps 0 = auto: the overhead budget decides


def test_segment_steps_auto_by_name():
    assert Config.load(environ={"ULFMPY_SEGMENT_STEPS": "auto"}).segment_steps == 0
    assert Config.load(environ={}, segment_steps="AUTO").segment_steps == 0
    assert Config.load(environ={}, segment_steps="12").segment_steps == 12


def test_env_then_keyword_precedence():
    env = {"ULFMPY_SEGMENT_STEPS": "7", "ULFMPY_DETECT": "finite,bounds",
           "ULFMPY_INJECT": "bitflip:rank=1,step=2;kill:rank=0,step=3", "ULFMPY_MTBF": "2m"}
    c = Config.load(environ=env)
    assert c.segment_steps == 7 and c.detect == ("finite", "bounds")
    assert c.inject == ("bitflip:rank=1,step=2", "kill:rank=0,step=3")
    assert c.mtbf == 120.0
    c = Config.load(environ=env, segment_steps=3, detect="bounds")
    assert c.segment_steps == 3 and c.detect == ("bounds",)


@pytest.mark.parametrize("kw,msg", [
    ({"segment_steps": -1}, "segment_steps must be >= 1"),
    ({"segment_budget": 0.0}, "segment_budget must be a fraction"),
    ({"segment_budget": 1.5}, "segment_budget must be a fraction"),
    ({"ckpt_keep": 1}, "ckpt_keep must be >= 2"),
    ({"rollback": "sideways"}, "rollback must be one of local, global"),
    ({"bogus": 1}, "unknown ulfmpy setting"),
])
def test_bad_keywords(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        Config.load(environ={}, **kw)


def test_bad_env_names_variable():
    with pytest.raises(ConfigError, match="ULFMPY_SEGMENT_STEPS"):
        Config.load(environ={"ULFMPY_SEGMENT_STEPS": "ten"})
    with pytest.raises(ConfigError, match="ULFMPY_MTBF"):
        Config.load(environ={"ULFMPY_MTBF": "soon"})


def test_flags_become_env():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    args = p.parse_args(["--segment-steps", "5", "--inject", "bitflip:rank=0,step=1",
                         "--inject", "bitflip:rank=1,step=2"])
    env = config_env_from_args(args)
    assert env == {"ULFMPY_SEGMENT_STEPS": "5",
                   "ULFMPY_INJECT": "bitflip:rank=0,step=1;bitflip:rank=1,step=2"}
    c = Config.load(environ=env)
    assert c.segment_steps == 5 and len(c.inject) == 2
    env = config_env_from_args(p.parse_args(["--no-resilience", "--detect", "bounds"]))
    assert env == {"ULFMPY_RESILIENCE": "0", "ULFMPY_DETECT": "bounds"}
    assert Config.load(environ=env).resilience is False


class _FakeComm:
    def __init__(self, digests):
        self.digests = digests

    def allgather(self, value):
        return self.digests


def test_uniformity_check():
    c = Config.load(environ={})
    c.check_uniform(_FakeComm([c.digest()] * 3))
    with pytest.raises(ConfigError, match=r"ranks \[2\] differ"):
        c.check_uniform(_FakeComm([c.digest(), c.digest(), "other"]))


# -- conflicting settings -------------------------------------------------------

# (setting, value given, its ULFMPY_* text) for each setting of a conflict
ON = {"mtbf": (3600.0, "1h"), "node_mtbf": (86400.0, "1d"), "ckpt_every": (5, "5"),
      "ckpt_seconds": (60.0, "1m"), "segment_steps": (10, "10"), "soft_mtbf": (600.0, "10m"),
      "segment_budget": (0.01, "0.01"), "resilience": (False, "0"),
      "inject": (("bitflip:rank=0,step=1",), "bitflip:rank=0,step=1"), "detect_every": (1, "1"),
      "ckpt_final": (True, "1")}
PAIRS = [(a, b) for a, b, _ in CONFLICTS]


def test_the_conflicts_listed():
    assert set(PAIRS) == {
        ("mtbf", "ckpt_every"), ("mtbf", "ckpt_seconds"), ("node_mtbf", "ckpt_every"),
        ("node_mtbf", "ckpt_seconds"), ("mtbf", "node_mtbf"), ("ckpt_every", "ckpt_seconds"),
        ("segment_steps", "soft_mtbf"), ("segment_budget", "segment_steps"),
        ("segment_budget", "soft_mtbf"),
        *(("resilience", x) for x in ("ckpt_every", "ckpt_seconds", "ckpt_final", "mtbf",
                                      "node_mtbf", "inject", "detect_every"))}


def _flags_of(a, b):
    return rf"{flag_name(a)} and {flag_name(b)} conflict: "


@pytest.mark.parametrize("a,b", PAIRS)
def test_conflict_as_keywords(a, b):
    with pytest.raises(ConfigError, match=_flags_of(a, b)) as exc:
        Config.load(environ={}, **{a: ON[a][0], b: ON[b][0]})
    assert f"Runtime keywords {a} and {b}" in str(exc.value)
    assert "give one of them" in str(exc.value)


@pytest.mark.parametrize("a,b", PAIRS)
def test_conflict_as_environment(a, b):
    env = {f"ULFMPY_{a.upper()}": ON[a][1], f"ULFMPY_{b.upper()}": ON[b][1]}
    with pytest.raises(ConfigError, match=_flags_of(a, b)) as exc:
        Config.load(environ=env)
    assert f"environment variables ULFMPY_{a.upper()} and ULFMPY_{b.upper()}" in str(exc.value)


@pytest.mark.parametrize("a,b", PAIRS)
def test_conflict_flag_against_keyword_names_both_sources(a, b):
    env = {f"ULFMPY_{a.upper()}": ON[a][1], FLAGS_ENV: a}
    with pytest.raises(ConfigError, match=_flags_of(a, b)) as exc:
        Config.load(environ=env, **{b: ON[b][0]})
    msg = str(exc.value)
    assert f"{flag_name(a)}: ulfmpy run flag" in msg
    assert f"{flag_name(b)}: Runtime keyword {b}" in msg


@pytest.mark.parametrize("a,b", PAIRS)
def test_conflict_between_flags_in_the_launcher(a, b):
    """``ulfmpy run`` refuses it while turning its flags into variables."""
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    argv = []
    for name in (a, b):
        if name == "resilience":
            argv.append("--no-resilience")
        else:
            argv += [flag_name(name), ON[name][1]]
    with pytest.raises(ConfigError, match=_flags_of(a, b)) as exc:
        config_env_from_args(p.parse_args(argv))
    assert "(both ulfmpy run flags)" in str(exc.value)


@pytest.mark.parametrize("a,b", [p for p in PAIRS if "segment_budget" not in p])
def test_conflict_caught_from_values_alone(a, b):
    """Built directly (no sources known), values off their defaults still conflict."""
    with pytest.raises(ConfigError, match=_flags_of(a, b)) as exc:
        Config(**{a: ON[a][0], b: ON[b][0]})
    assert "ulfmpy run flag" not in str(exc.value) and "keyword" not in str(exc.value)


@pytest.mark.parametrize("off", [False, 0, "off", "0"])
def test_resilience_off_in_any_spelling_conflicts(off):
    with pytest.raises(ConfigError, match="--no-resilience and --ckpt-every conflict"):
        Config.load(environ={}, resilience=off, ckpt_every=5)


def test_budget_given_at_its_default_value_still_conflicts():
    budget = Config().segment_budget
    with pytest.raises(ConfigError, match="--segment-budget and --segment-steps conflict"):
        Config.load(environ={"ULFMPY_SEGMENT_BUDGET": str(budget)}, segment_steps=10)
    with pytest.raises(ConfigError, match="--segment-budget and --soft-mtbf conflict"):
        Config.load(environ={}, segment_budget=budget, soft_mtbf="10m")
    # From values alone the default budget cannot be told from a given one.
    assert Config(segment_budget=budget, segment_steps=10).segment_steps == 10


def test_the_conflict_message():
    with pytest.raises(ConfigError) as exc:
        Config.load(environ={"ULFMPY_MTBF": "1h", FLAGS_ENV: "mtbf"}, ckpt_every=5)
    assert str(exc.value) == (
        "--mtbf and --ckpt-every conflict: --mtbf lets the interval policy choose when to "
        "checkpoint; give one of them (--mtbf: ulfmpy run flag; --ckpt-every: Runtime keyword "
        "ckpt_every); a flag overrides a keyword: add --ckpt-every 0 to drop the keyword")
    with pytest.raises(ConfigError) as exc:
        Config.load(environ={"ULFMPY_MTBF": "1h"}, ckpt_every=5)
    assert "(--mtbf: environment variable ULFMPY_MTBF; --ckpt-every: Runtime keyword ckpt_every)" \
        in str(exc.value)


def test_several_conflicts_in_one_error():
    with pytest.raises(ConfigError) as exc:
        Config.load(environ={}, mtbf="1h", node_mtbf="1d", ckpt_every=5)
    msg = str(exc.value)
    assert msg.startswith("conflicting settings:\n")
    for a, b in [("mtbf", "ckpt_every"), ("node_mtbf", "ckpt_every"), ("mtbf", "node_mtbf")]:
        assert f"{flag_name(a)} and {flag_name(b)} conflict" in msg


def test_defaults_never_conflict():
    Config()
    Config.load(environ={})
    for f in fields(Config):
        # A setting given at its default alone conflicts with nothing.
        Config.load(environ={}, **{f.name: f.default})


@pytest.mark.parametrize("a,b", PAIRS)
def test_each_setting_of_a_pair_alone_is_fine(a, b):
    Config.load(environ={}, **{a: ON[a][0]})
    Config.load(environ={}, **{b: ON[b][0]})


@pytest.mark.parametrize("given", [
    {"mtbf": 0, "ckpt_every": 5},              # 0 = off: nothing to conflict with
    {"node_mtbf": "0", "ckpt_seconds": "1m"},
    {"mtbf": "1h", "ckpt_every": 0, "ckpt_seconds": 0},
    {"segment_steps": 0, "soft_mtbf": "10m"},  # auto: --soft-mtbf proposes the length
    {"segment_steps": "auto", "segment_budget": 0.01},
    {"resilience": True, "ckpt_every": 5, "inject": ["kill:rank=1,step=3"], "detect_every": 1},
    {"resilience": False, "detect_every": 0, "inject": [], "ckpt_every": 0},
    {"resilience": False, "detect": "bounds", "segment_steps": 10},
])
def test_settings_that_are_off_do_not_conflict(given):
    Config.load(environ={}, **given)


def test_a_flag_turning_a_keyword_off_resolves_the_conflict():
    env = {"ULFMPY_MTBF": "1h", "ULFMPY_CKPT_EVERY": "0", FLAGS_ENV: "mtbf,ckpt_every"}
    c, overrides = Config.load_with_sources(environ=env, ckpt_every=5)
    assert c.mtbf == 3600.0 and c.ckpt_every == 0
    assert overrides == [{"setting": "ckpt_every", "keyword": 5, "flag": 0}]


# -- precedence: flag > keyword > environment > default ----------------------------

def test_flag_wins_over_keyword_over_environment():
    env = {"ULFMPY_SEGMENT_STEPS": "7", "ULFMPY_DETECT": "finite,bounds", "ULFMPY_SEED": "4"}
    # Without ULFMPY_FLAGS the variables are the environment's: keywords win.
    c = Config.load(environ=env, segment_steps=3, detect="bounds", max_retries=1)
    assert (c.segment_steps, c.detect, c.seed, c.max_retries) == (3, ("bounds",), 4, 1)
    # Named in ULFMPY_FLAGS they came from ulfmpy run's command line: they win.
    c = Config.load(environ={**env, FLAGS_ENV: "segment_steps"}, segment_steps=3,
                    detect="bounds", max_retries=1)
    assert (c.segment_steps, c.detect, c.seed, c.max_retries) == (7, ("bounds",), 4, 1)
    c = Config.load(environ={**env, FLAGS_ENV: "segment_steps,detect"}, segment_steps=3,
                    detect="bounds")
    assert (c.segment_steps, c.detect) == (7, ("finite", "bounds"))
    # A flag without a keyword is simply the value; defaults fill the rest.
    c = Config.load(environ={**env, FLAGS_ENV: "seed"})
    assert (c.seed, c.segment_steps, c.rollback) == (4, 7, "local")


def test_flags_list_without_the_variable_is_ignored():
    c = Config.load(environ={FLAGS_ENV: "segment_steps"}, segment_steps=3)
    assert c.segment_steps == 3
    assert Config.load(environ={FLAGS_ENV: ""}, segment_steps=3).segment_steps == 3


def test_flags_list_names_only_settings():
    with pytest.raises(ConfigError, match="ULFMPY_FLAGS names unknown setting.*bogus"):
        Config.load(environ={FLAGS_ENV: "seed,bogus", "ULFMPY_SEED": "1"})


def test_bad_flag_value_names_the_flag():
    with pytest.raises(ConfigError, match=r"^--mtbf: invalid duration 'soon'"):
        Config.load(environ={"ULFMPY_MTBF": "soon", FLAGS_ENV: "mtbf"}, mtbf="1h")


def test_flags_variable_is_not_a_setting():
    env = {"ULFMPY_SEED": "4", "ULFMPY_MTBF": "1h"}
    plain = Config.load(environ=env)
    flagged = Config.load(environ={**env, FLAGS_ENV: "seed,mtbf"})
    assert plain == flagged and plain.digest() == flagged.digest()
    assert plain.as_dict() == flagged.as_dict()
    assert "flags" not in plain.as_dict() and "flags" not in {f.name for f in fields(Config)}


def test_overrides_list():
    env = {"ULFMPY_MTBF": "1h", "ULFMPY_SEGMENT_STEPS": "7", "ULFMPY_SEED": "4",
           "ULFMPY_DETECT": "finite", "ULFMPY_INJECT": "kill:rank=1,step=3",
           FLAGS_ENV: "mtbf,segment_steps,detect,inject"}
    c, overrides = Config.load_with_sources(
        environ=env, mtbf="2h", segment_steps=7, seed=9, detect=["finite"],
        inject="bitflip:rank=0,step=1")
    assert (c.mtbf, c.segment_steps, c.seed, c.inject) == (3600.0, 7, 9, ("kill:rank=1,step=3",))
    # Only keywords a flag overrode with another value; converted like the values.
    assert overrides == [
        {"setting": "inject", "keyword": ("bitflip:rank=0,step=1",),
         "flag": ("kill:rank=1,step=3",)},
        {"setting": "mtbf", "keyword": 7200.0, "flag": 3600.0},
    ]
    assert Config.load(environ=env, mtbf="2h").mtbf == 3600.0  # load: the same, config only
    assert Config.load_with_sources(environ={})[1] == []
    assert Config.load_with_sources(environ={"ULFMPY_SEED": "4"}, seed=9)[1] == []
