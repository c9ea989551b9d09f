"""The public surface is locked: changing it is a decision, not an accident."""

import subprocess
import sys

import ulfmpy

PUBLIC = {
    "Runtime", "range", "Block", "Rows", "fingerprint", "register_detector", "UlfmpyError", "ConfigError",
    "LaunchError", "UlfmUnavailable", "CheckpointError", "RestoreError", "UnsupportedCall",
    "RetriesExhausted", "RecoveryFailed", "FaultSignal", "ProcessFailure", "CommRevoked",
    "__version__",
}


def test_all_is_locked():
    assert set(ulfmpy.__all__) == PUBLIC
    for name in ulfmpy.__all__:
        assert getattr(ulfmpy, name) is not None


def test_fault_signals_escape_except_exception():
    assert not issubclass(ulfmpy.FaultSignal, Exception)
    assert issubclass(ulfmpy.ProcessFailure, ulfmpy.FaultSignal)
    assert issubclass(ulfmpy.CommRevoked, ulfmpy.ProcessFailure)
    assert issubclass(ulfmpy.ConfigError, ulfmpy.UlfmpyError)
    try:
        try:
            raise ulfmpy.ProcessFailure("rank 3 died")
        except Exception:  # what a user's handler looks like
            raise AssertionError("swallowed")
    except ulfmpy.FaultSignal:
        pass


def test_import_and_pure_commands_do_not_load_mpi():
    code = ("import sys, ulfmpy, ulfmpy.interval, ulfmpy.simulate, ulfmpy.config, ulfmpy.detect, "
            "ulfmpy.inject, ulfmpy.cli; assert 'mpi4py.MPI' not in sys.modules, 'MPI loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)
