"""The emulator process, QEMU's and Bochs's alike: started in its own process group under a
parent-death signal (a harness killed outright leaves no emulator behind), its console and
command channel connections awaited on loopback ports while the process is watched, and ended
by SIGTERM, then SIGKILL."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from harness.deadline import Deadline
from harness.machine.base import LaunchError
from harness.machine.channel import quickack
from harness.machine.console import Console
from harness.machine.shell import Shell

LOOPBACK = "127.0.0.1"
# The emulator gets SIGKILL when the harness dies, even by SIGKILL: util-linux setpriv sets the
# parent-death signal and execs it (a Python preexec_fn is unsafe with the server threads).
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"]
TERM_TIMEOUT = 5.0  # for a clean exit after SIGTERM
KILL_TIMEOUT = 10.0
ACCEPT_POLL = 0.2  # how often a connection wait looks whether the emulator is still there


def loopback_listener() -> socket.socket:
    """A listening socket on a free loopback port, for an emulator's serial port to connect to
    (the console, the command channel; Bochs's COM2 bridge)."""
    return socket.create_server((LOOPBACK, 0))


def accept_channel(listener: socket.socket, proc: subprocess.Popen[bytes], deadline: Deadline, emulator: str,
                   command: list[str], output: Callable[[], str], channel: str) -> socket.socket:
    """The connection ``proc`` makes to ``listener`` for ``channel`` (its console, its command
    channel). LaunchError with the command line and ``output()`` (the emulator's own log) when it
    exits first or does not connect in time."""
    listener.settimeout(ACCEPT_POLL)
    while not deadline.expired():
        try:
            sock, _ = listener.accept()
            sock.setblocking(True)
            return sock
        except TimeoutError:
            if proc.poll() is not None:
                raise LaunchError(f"{emulator} exited before connecting its {channel}", shlex.join(command),
                                  proc.returncode, output()) from None
    raise LaunchError(f"{emulator} did not connect its {channel} within {deadline.seconds:.0f}s",
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


def connect_channels(listeners: tuple[socket.socket, socket.socket], proc: subprocess.Popen[bytes],
                     deadline: Deadline, emulator: str, command: list[str], output: Callable[[], str],
                     logs: tuple[Path, Path], ack_at_once: bool = False) -> tuple[Console, Shell]:
    """The console and the command channel ``proc`` connects to ``listeners`` (in that order),
    logged to ``logs``. ``ack_at_once``: acknowledge every read at once (Bochs: see QuickAckSocket)."""
    sock = accept_channel(listeners[0], proc, deadline, emulator, command, output, "console")
    console = Console(QuickAckSocket(sock) if ack_at_once else sock, logs[0])
    try:
        sock = accept_channel(listeners[1], proc, deadline, emulator, command, output, "command channel")
    except BaseException:
        console.close()
        raise
    return console, Shell(sock, logs[1], ack_at_once=ack_at_once)


class QuickAckSocket:
    """A connected TCP socket from Bochs that acknowledges every read at once.

    Why: Bochs writes its UARTs to the socket one byte per send() with Nagle's algorithm on, so
    after the first byte of a burst it waits for an ACK, and Linux delays ACKs by up to 40 ms:
    every frame from the guest arrived as 1 byte, then the rest ~40 ms later. TCP_QUICKACK is
    not sticky, so it is set again after each read."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        quickack(sock)

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self, bufsize: int, /) -> bytes:
        data = self._sock.recv(bufsize)
        quickack(self._sock)
        return data

    def sendall(self, data: bytes, /) -> None:
        self._sock.sendall(data)

    def close(self) -> None:
        self._sock.close()
