"""The emulator process, QEMU's and Bochs's alike: started in its own process group under a
parent-death signal (a harness killed outright leaves no emulator behind), its console
connection awaited on a loopback port while the process is watched, and ended by SIGTERM, then
SIGKILL."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
from collections.abc import Callable

from harness.deadline import Deadline
from harness.machine.base import LaunchError

LOOPBACK = "127.0.0.1"
# The emulator gets SIGKILL when the harness dies, even by SIGKILL: util-linux setpriv sets the
# parent-death signal and execs it (a Python preexec_fn is unsafe with the server threads).
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"]
TERM_TIMEOUT = 5.0  # for a clean exit after SIGTERM
KILL_TIMEOUT = 10.0
ACCEPT_POLL = 0.2  # how often the console wait looks whether the emulator is still there


def loopback_listener() -> socket.socket:
    """A listening socket on a free loopback port, for an emulator's serial port to connect to
    (the console; Bochs's COM2 bridge)."""
    return socket.create_server((LOOPBACK, 0))


def accept_console(listener: socket.socket, proc: subprocess.Popen[bytes], deadline: Deadline, emulator: str,
                   command: list[str], output: Callable[[], str]) -> socket.socket:
    """The console connection ``proc`` makes to ``listener``. LaunchError with the command line
    and ``output()`` (the emulator's own log) when it exits first or does not connect in time."""
    listener.settimeout(ACCEPT_POLL)
    while not deadline.expired():
        try:
            sock, _ = listener.accept()
            sock.setblocking(True)
            return sock
        except TimeoutError:
            if proc.poll() is not None:
                raise LaunchError(f"{emulator} exited before connecting its console", shlex.join(command),
                                  proc.returncode, output()) from None
    raise LaunchError(f"{emulator} did not connect its console within {deadline.seconds:.0f}s",
                      shlex.join(command), None, output())


def end_process_group(proc: subprocess.Popen[bytes]) -> int | None:
    """End ``proc`` and its process group if it still runs (SIGTERM; SIGKILL after
    TERM_TIMEOUT); its exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=TERM_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=KILL_TIMEOUT)
        except ProcessLookupError:
            pass
    return proc.returncode
