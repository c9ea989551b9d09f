"""The command line as users type it: names, durations, -np, verbatim program arguments."""

from __future__ import annotations

import shlex

import pytest

from ulfmpy.cli import main
from ulfmpy.config import Config, add_config_arguments
from ulfmpy.launch import configure, split_program


def _dry(capsys, args: list[str]) -> tuple[int, list[str], str]:
    code = main(["run", "--dry-run", *args])
    out, err = capsys.readouterr()
    words = [w for w in shlex.split(out) if not ("=" in w and w.split("=")[0].isupper())]
    return code, words, err


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "app.py"
    path.write_text("")
    return str(path)


def test_bad_duration_names_the_flag_not_its_variable(capsys, script):
    code, _, err = _dry(capsys, ["-n", "2", "--mtbf", "banana", script])
    assert code == 2
    assert err.startswith("ulfmpy run: error: --mtbf: invalid duration 'banana'")
    assert "ULFMPY_MTBF" not in err and err.count("\n") == 1


def test_a_duration_where_steps_are_asked_says_which(capsys, script):
    code, _, err = _dry(capsys, ["-n", "2", "--ckpt-every", "1m", script])
    assert code == 2
    assert "--ckpt-every: '1m' is a duration, but this setting counts steps" in err
    assert "--ckpt-seconds 1m" in err and "int()" not in err
    code, _, err = _dry(capsys, ["-n", "2", "--max-retries", "lots", script])
    assert code == 2 and "--max-retries: expected a whole number, got 'lots'" in err


def test_environment_variable_is_named_when_it_is_the_origin(monkeypatch):
    from ulfmpy.errors import ConfigError

    with pytest.raises(ConfigError, match="environment variable ULFMPY_MTBF: invalid duration"):
        Config.load(environ={"ULFMPY_MTBF": "banana"})


def test_np_as_mpirun_users_type_it(capsys, script):
    code, words, _ = _dry(capsys, ["-np", "4", script])
    assert code == 0 and words[1:3] == ["-n", "4"]


def test_mpirun_arg_is_split_like_a_shell(capsys, script):
    code, words, _ = _dry(capsys, ["-n", "2", "--mpirun-arg=--map-by ppr:1:core",
                                   "--mpirun-arg", "--bind-to core", script])
    assert code == 0
    at = words.index("--map-by")
    assert words[at:at + 4] == ["--map-by", "ppr:1:core", "--bind-to", "core"]


def test_module_arguments_reach_the_module_verbatim(capsys):
    code, words, _ = _dry(capsys, ["-n", "2", "-m", "apps.stencil", "--steps", "5", "--mtbf", "3"])
    assert code == 0
    assert words[-7:] == ["ulfmpy._rank", "-m", "apps.stencil", "--steps", "5", "--mtbf", "3"]


def test_double_dash_ends_ulfmpy_options_and_later_ones_are_the_programs(capsys, script):
    code, words, _ = _dry(capsys, ["-n", "2", "--", script, "--", "--steps", "5"])
    assert code == 0
    assert words[-4:] == [script, "--", "--steps", "5"]
    assert words[words.index("ulfmpy._rank") + 1] == script


def test_split_program_is_pure_and_knows_which_options_take_values():
    import argparse

    p = argparse.ArgumentParser()
    configure(p)
    assert split_program(["-n", "2", "--mtbf", "1h", "app.py", "--n", "9"], p) == (
        ["-n", "2", "--mtbf", "1h"], ["app.py", "--n", "9"])
    assert split_program(["--dry-run", "-m", "pkg", "-x"], p) == (["--dry-run"], ["-m", "pkg", "-x"])
    assert split_program(["--run-dir", "-m", "-m", "pkg"], p) == (["--run-dir", "-m"], ["-m", "pkg"])
    assert split_program(["-n", "2"], p) == (["-n", "2"], [])


def test_help_shows_defaults_and_reads_the_right_way(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--segment-steps N|auto" in out and "(default: auto)" in out
    assert "(default: 30s)" in out  # --repair-timeout
    assert "(default: spares,respawn,shrink)" in out
    assert "--no-resilience run the plain loop, the baseline" in out


def test_every_setting_flag_shows_its_default():
    import argparse

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    flagged = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert flagged and all("(default: " in a.help for a in flagged if a.dest != "resilience")


def test_top_level_help_has_no_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "report" in out


def test_interval_recovery_time_has_its_own_name(capsys):
    assert main(["interval", "--mtbf", "1h", "--save", "30s", "--recovery", "16m"]) == 2
    err = capsys.readouterr().err
    assert "--recovery-time" in err and "in-job recovery policies" in err
    assert main(["interval", "--mtbf", "1h", "--save", "30s", "--recovery-time", "16m"]) == 0


def test_summary_counts_this_launchs_steps_for_a_resumed_run():
    from ulfmpy.teardown import History, Summary

    s = Summary(ranks=2, steps=400, wall_s=0.31, fingerprint="f",
                history=History(restored_from={"step": 196, "path": "x", "fallbacks": []}))
    d = s.as_dict()
    assert (d["steps"], d["start_step"], d["steps_run"]) == (400, 196, 204)
    assert Summary(ranks=2, steps=400, wall_s=1, fingerprint="f").as_dict()["steps_run"] == 400


@pytest.mark.parametrize("committed", [False, True])
def test_relaunch_message_says_whether_a_checkpoint_resumes(tmp_path, monkeypatch, capsys, script,
                                                             committed):
    from ulfmpy import launch

    run = tmp_path / "r"
    if committed:
        (run / "ckpt").mkdir(parents=True)
        (run / "ckpt" / "step-00000050.h5").write_bytes(b"")
    codes = iter([75, 0])
    monkeypatch.setattr(launch, "_launch", lambda argv, env: next(codes))
    assert main(["run", "-n", "2", "--max-restarts", "1", "--run-dir", str(run), script]) == 0
    err = capsys.readouterr().err
    want = ("resuming from the newest committed checkpoint" if committed else
            "starting over: no checkpoint was committed")
    assert f"relaunch 1/1 {want}" in err
