"""``ulfmpy interval`` and ``ulfmpy simulate`` through ``ulfmpy.cli.main``."""

import json

import pytest

from ulfmpy import interval
from ulfmpy.cli import main

BASE = ["--mtbf", "1h", "--save", "30s", "--recovery-time", "16m"]


def _rows(out):
    return {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in
            ("young", "daly", "exact", "saxena", "saxena_latency", "nonblocking")}


def test_interval_table(capsys):
    assert main(["interval", *BASE]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert list(rows) == ["young", "daly", "exact", "saxena"]
    # tau and period in minutes: young 464.758 s, saxena T = 553.927 s
    assert rows["young"][1] == "7.746"
    assert rows["saxena"][2] == "9.232"
    # the paper column's winner is saxena, the renewal column's is exact
    assert rows["saxena"][3:5] == ["70.3960", "%*"]
    assert rows["exact"][5:7] == ["67.1256", "%*"]
    assert "M = 1 h, save = 30 s, recovery = 16 min" in out


def test_interval_json_matches_the_library(capsys):
    assert main(["interval", "--mtbf", "2h", "--save", "1s", "--recovery-time", "4m", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["inputs"] == {"mtbf_s": 7200.0, "save_s": 1.0, "recovery_s": 240.0,
                              "latency_s": 0.0, "async_fraction": None}
    assert data["models"] == interval.table(mtbf=7200.0, save=1.0, recovery=240.0)
    for row in data["models"].values():
        assert set(row) == {"tau_s", "period_s", "availability_paper", "availability_renewal"}


def test_interval_with_latency(capsys):
    assert main(["interval", "--mtbf", "1h", "--save", "1s", "--recovery-time", "4m", "--latency", "2m",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["models"]
    assert 120.0 < data["saxena_latency"]["period_s"] < 120.000001
    assert data["saxena_latency"]["availability_paper"] == pytest.approx(3570 / 3900)
    assert data["saxena_latency"]["retained_checkpoints"] == 2
    assert data["exact"]["retained_checkpoints"] == 3
    assert main(["interval", "--mtbf", "1h", "--save", "1s", "--recovery-time", "4m", "--latency", "2m"]) == 0
    out = capsys.readouterr().out
    assert "keep" in out and "saxena_latency" in out and "floor(D/T)" in out


def test_interval_with_async_fraction(capsys):
    assert main(["interval", *BASE, "--async-fraction", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "nonblocking" in _rows(out)
    assert "save = 6 s exposed" in out


def test_node_mtbf_equals_job_mtbf(capsys):
    main(["interval", "--node-mtbf", "8h", "--nodes", "8", "--save", "30s", "--recovery-time", "16m", "--json"])
    a = json.loads(capsys.readouterr().out)
    main(["interval", *BASE, "--json"])
    assert a == json.loads(capsys.readouterr().out)


def test_interval_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "a.png"
    assert main(["interval", "--mtbf", "1h", "--save", "1s", "--recovery-time", "4m", "--latency", "2m",
                 "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(path) in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--mtbf", "2x", "--save", "1s"], "invalid --mtbf '2x'"),
    (["--mtbf", "1h", "--save", "0"], "--save must be > 0"),
    (["--mtbf", "1h", "--save", "soon"], "invalid --save 'soon'"),
    (["--mtbf", "1h", "--save", "1s", "--recovery-time=-4m"], "invalid --recovery-time"),
    (["--mtbf", "1h", "--save", "1s", "--latency", "x"], "invalid --latency"),
    (["--mtbf", "1h", "--save", "1s", "--async-fraction", "1.5"], "--async-fraction"),
    (["--mtbf", "1h", "--save", "1s", "--async-fraction", "half"], "--async-fraction"),
    (["--save", "1s"], "exactly one of --mtbf and --node-mtbf"),
    (["--mtbf", "10s", "--save", "5s", "--recovery-time", "20s", "--async-fraction", "0.5"],
     "faster than recovery"),
])
def test_interval_bad_values_exit_2_with_a_message(argv, message, capsys):
    assert main(["interval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ulfmpy interval: error: ")
    assert message in err


def test_simulate_text_and_json(capsys):
    argv = ["simulate", *BASE, "--failures", "20000", "--seed", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "seed 4" in out and "paper model" in out and "renewal model" in out
    assert "daly,exact" in out and out.count("*") >= 2
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["seed"] == 4
    assert [s["model"] for s in data["simulations"]] == ["paper", "renewal"]
    renewal = data["simulations"][1]
    best = renewal["estimates"][renewal["best"]]
    assert best["availability"] == max(e["availability"] for e in renewal["estimates"])
    for e in renewal["estimates"]:
        assert e["ci_low"] <= e["availability"] <= e["ci_high"]


def test_simulate_given_intervals_and_weibull(capsys):
    assert main(["simulate", *BASE, "--intervals", "5m,8m,12m", "--dist", "weibull", "--shape",
                 "0.6", "--model", "renewal", "--failures", "1e4", "--seed", "1", "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)["simulations"][0]
    assert [e["period"] for e in sim["estimates"]] == [300.0, 480.0, 720.0]
    assert (sim["dist"], sim["shape"], sim["failures"]) == ("weibull", 0.6, 10000)


@pytest.mark.parametrize("argv, message", [
    (["--failures", "12.5"], "--failures"),
    (["--failures", "10"], "--failures"),
    (["--intervals", "10s"], "not longer than the save time"),
    (["--intervals", "5m,x"], "invalid --intervals entry 'x'"),
    (["--shape", "0.5"], "--dist weibull only"),
    (["--dist", "weibull", "--shape", "-1"], "--shape must be > 0"),
    (["--model", "paper", "--latency", "1m"], "renewal model only"),
    (["--confidence", "95"], "--confidence"),
])
def test_simulate_bad_values(argv, message, capsys):
    assert main(["simulate", *BASE, *argv]) == 2
    assert message in capsys.readouterr().err
