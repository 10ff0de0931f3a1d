"""What the guest's two serial channels share: the errors of a wait on them. The console (COM1,
`console.py`) carries the kernel's messages; the command channel (COM4, `shell.py`) carries the
harness's shell. A failed wait names what was awaited, the channel's log and its last lines."""

from __future__ import annotations

import contextlib
import re
import socket
from pathlib import Path

import pexpect
from pexpect.spawnbase import SpawnBase

from harness.deadline import WAIT_SLICE

TAIL_LINES = 20
# The legacy 8250 ports the kernel registers: ttyS0 (COM1, the console), ttyS1 (COM2: the shim
# reserves its ports first, so the 8250 driver never touches it), ttyS2 (COM3, absent) and
# ttyS3 (COM4, 0x2E8, IRQ 3: the command channel). COM4 shares IRQ 3 with COM2, which the shim
# polls with interrupts off: the line is COM4's alone. COM3 would share IRQ 4 with the console,
# whose tty /dev/console is held open by init.
UARTS = "8250.nr_uarts=4"
# pexpect searches each read together with what came before it, up to SEARCH_WINDOW characters
# (pexpect's searchwindowsize), and a read returns at most READ_SIZE: every character is
# searched, a match may span up to SEARCH_WINDOW - READ_SIZE characters (kernel messages and the
# end marker are single lines), and a megabyte of output costs a bounded search per read instead
# of a search of everything so far. What a wait that timed out saw is searched again by the next
# wait only as far as its last SEARCH_WINDOW characters.
READ_SIZE = 8192
SEARCH_WINDOW = 32768
COMMAND_TTY = "ttyS3"  # images/initramfs/init starts the shell on /dev/ttyS3


class ChannelError(Exception):
    """Root of the serial channels' errors."""


class ChannelWaitError(ChannelError):
    """A wait on a channel failed; says what was awaited and shows the end of the channel."""

    def __init__(self, reason: str, awaited: str, tail: list[str], log_path: Path, channel: str = "console") -> None:
        self.awaited = awaited
        self.tail = tail
        self.log_path = log_path
        super().__init__(f"{reason} waiting for {awaited}\n{show_tail(channel, log_path, tail)}")


class ChannelTimeout(ChannelWaitError):
    """The deadline passed before the awaited text arrived."""


class ChannelClosed(ChannelWaitError):
    """The channel ended (EOF: the emulator exited, or it was closed) before the awaited text
    arrived."""


def show_tail(channel: str, log_path: Path, tail: list[str]) -> str:
    """Where a channel's log is and its last lines, for an error message."""
    shown = "\n".join(f"  | {line}" for line in tail) or f"  (the {channel} is empty)"
    return f"{channel} log: {log_path}\nlast {len(tail)} {channel} lines:\n{shown}"


def tail_lines(text: str, count: int = TAIL_LINES) -> list[str]:
    """The last ``count`` lines of ``text`` (a partial last line included)."""
    return text.splitlines()[-count:]


_ANYTHING = re.compile(r"(?s).+")


def discard_pending(spawn: SpawnBase) -> str:
    """Consume what ``spawn`` has received and not matched yet, without waiting; returns it.
    Later expects start after it."""
    dropped = []
    while spawn.expect([_ANYTHING, pexpect.TIMEOUT, pexpect.EOF], timeout=0) == 0:
        dropped.append(spawn.after)
    return "".join(dropped)


def read_slice(timeout: float | None) -> float:
    """How long one pexpect read may wait for pexpect's ``timeout`` (-1 or None: its default, no
    bound): at most WAIT_SLICE, so that a Ctrl-C meant for the waiting thread gets through while
    pexpect keeps the overall timeout."""
    return WAIT_SLICE if timeout is None or timeout == -1 else min(max(timeout, 0.0), WAIT_SLICE)


def quickack(sock: socket.socket) -> None:
    """Acknowledge at once what was read from ``sock`` (see process.QuickAckSocket)."""
    with contextlib.suppress(OSError):  # the peer may be gone already
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
