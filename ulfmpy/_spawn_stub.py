"""The process ``Comm.Spawn`` starts for a respawned rank (respawn policy).

Run by path as ``python -S _spawn_stub.py NAME -- ARGV...``: standard library
only and no ``site``, so it is up in about 10 ms. It asks the node's zygote
(:mod:`ulfmpy.zygote`, listening on the abstract socket ``NAME``) to fork a
pre-imported process that becomes the replacement rank with this process's
environment (the PMIx identity the runtime gave it), working directory and
standard streams, then stands in for it towards the MPI runtime: signals it
receives go to the replacement, and it exits the way the replacement exited
(same code, or killed by the same signal), so the runtime sees a failure of
the replacement as a failure of this process.

Without a zygote (none on this node, or it refused) it becomes the
replacement itself: ``exec`` of ``python ARGV...``, the cold start.
"""

import json
import os
import signal
import socket
import struct
import sys

_FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCONT")


def _cold(argv):
    os.execv(sys.executable, [sys.executable, *argv])


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _mirror(status):
    """Exit the way the replacement exited (raw wait status)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # the signal is ignored or blocked here
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def main(args):
    name, sep, argv = args[0], args[1], args[2:]
    if sep != "--" or not argv:
        print(f"usage: python -S {__file__} NAME -- ARGV...", file=sys.stderr)
        return 2
    # Signals are caught from the start: one that comes before the child
    # exists waits for it (or, on the cold path, is raised again after all).
    child = None
    pending = []

    def forward(sig, _frame):
        if child is None:
            pending.append(sig)
            return
        try:
            os.kill(child, sig)
        except ProcessLookupError:
            pass

    for name_ in _FORWARDED:
        signal.signal(getattr(signal, name_), forward)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect("\0" + name)
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "stub": os.getpid()}).encode()
        socket.send_fds(sock, [struct.pack("!Q", len(request))], [0, 1, 2])
        sock.sendall(request)
        reply = _recv_exact(sock, 9)
    except OSError:
        reply = None
    if reply is None or reply[:1] != b"P":
        for name_ in _FORWARDED:
            signal.signal(getattr(signal, name_), signal.SIG_DFL)
        for sig in pending:
            os.kill(os.getpid(), sig)
        _cold(argv)  # no zygote here, or it could not fork: start cold
    child = struct.unpack("!q", reply[1:])[0]
    for sig in pending:
        forward(sig, None)
    status = _recv_exact(sock, 5)  # retried across the forwarded signals (PEP 475)
    if status is None or status[:1] != b"S":
        # The zygote is gone and nobody can report the replacement's end:
        # take it down and fail, rather than leave it running unsupervised.
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    _mirror(struct.unpack("!i", status[1:])[0])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
