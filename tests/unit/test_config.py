"""Settings: keyword > ULFMPY_* environment > default; validated."""

import argparse

import pytest

from ulfmpy.config import Config, add_config_arguments, config_env_from_args
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
                         "--inject", "bitflip:rank=1,step=2", "--no-resilience"])
    env = config_env_from_args(args)
    assert env == {"ULFMPY_SEGMENT_STEPS": "5", "ULFMPY_RESILIENCE": "0",
                   "ULFMPY_INJECT": "bitflip:rank=0,step=1;bitflip:rank=1,step=2"}
    c = Config.load(environ=env)
    assert c.resilience is False and len(c.inject) == 2


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
