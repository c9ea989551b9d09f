"""ulfmpy: make mpi4py timestep loops survive faults.

Local re-execution of loop segments on soft errors, global HDF5 checkpoints
at an optimized interval, ULFM in-job recovery from dead ranks, and fault
injection to prove it. See ``Runtime``.
"""

from ulfmpy.errors import (CheckpointError, CommRevoked, ConfigError, FaultSignal,
                           LaunchError, ProcessFailure, RecoveryFailed, RestoreError,
                           RetriesExhausted, UlfmpyError, UlfmUnavailable, UnsupportedCall)

__version__ = "0.1.0"

__all__ = [
    "Runtime",
    "range",
    "Block",
    "Rows",
    "fingerprint",
    "register_detector",
    "UlfmpyError",
    "ConfigError",
    "LaunchError",
    "UlfmUnavailable",
    "CheckpointError",
    "RestoreError",
    "UnsupportedCall",
    "RetriesExhausted",
    "RecoveryFailed",
    "FaultSignal",
    "ProcessFailure",
    "CommRevoked",
    "__version__",
]


def __getattr__(name: str):
    # Runtime pulls in mpi4py; keep `import ulfmpy` (and `ulfmpy interval`) MPI-free.
    if name == "Runtime":
        from ulfmpy.runtime import Runtime

        return Runtime
    if name == "range":  # the inline loop: ulfmpy.range(steps, state=lambda: {...})
        from ulfmpy.runtime import inline_range

        return inline_range
    if name in ("Block", "Rows", "fingerprint"):
        # numpy too is imported on first use: the respawn zygote starts as
        # ``python -m ulfmpy.zygote`` and imports it at idle priority.
        from ulfmpy import state

        return getattr(state, name)
    if name == "register_detector":
        from ulfmpy.detect import register_detector

        return register_detector
    raise AttributeError(f"module 'ulfmpy' has no attribute {name!r}")
