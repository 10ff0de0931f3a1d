"""The guest's command channel: the initramfs shell on COM4 (ttyS3), driven with pexpect over the
emulator's socket. The kernel never prints on this port (its console is COM1), so what a command
wrote is exactly what comes back: no kernel record can land inside it.

Protocol (images/initramfs/init): the shell prints "TDXH-READY <uname -r>" when it reads
commands. For each command the harness writes `<cmd>; echo "<token>:$?"` with a fresh random token
and reads up to "<token>:<status>"; the command's output is what came in between. The tty neither
echoes nor rewrites output (`stty -echo -opost`): a "\\n" the command wrote arrives as "\\n".

The channel log (`commands.log` in the run directory) holds the whole conversation: what was
sent and what came back.
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, TextIO

import pexpect
from pexpect import fdpexpect

from harness.deadline import WAIT_SLICE, Deadline
from harness.machine.channel import (
    READ_SIZE,
    SEARCH_WINDOW,
    ChannelClosed,
    ChannelTimeout,
    discard_pending,
    quickack,
    read_slice,
    tail_lines,
)

log = logging.getLogger("harness.machine.shell")

READY_PATTERN = re.compile(r"TDXH-READY (\S+)\n")
# N_TTY keeps at most 4095 characters of a line in canonical mode and drops the rest.
MAX_LINE_BYTES = 4095
INTERACT_LINGER = 1.0
TAIL_CHARS = 4000  # of the channel's text, for the last lines shown in an error


@dataclass(frozen=True)
class CommandResult:
    status: int
    output: str


class _Channel(fdpexpect.fdspawn):  # type: ignore[misc]
    """pexpect on the channel's socket. Each read waits at most WAIT_SLICE (a Ctrl-C meant for
    the waiting thread then gets through; pexpect keeps the overall timeout), and with
    ``ack_at_once`` acknowledges at once what it read (Bochs: see process.QuickAckSocket)."""

    def __init__(self, sock: socket.socket, ack_at_once: bool) -> None:
        super().__init__(sock.fileno(), timeout=None, maxread=READ_SIZE, searchwindowsize=SEARCH_WINDOW,
                         encoding="utf-8", codec_errors="replace", use_poll=True)
        self._sock = sock
        self._ack_at_once = ack_at_once

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> str:
        slice_ = read_slice(timeout)
        try:
            text: str = super().read_nonblocking(size, slice_)
        except pexpect.TIMEOUT:
            return ""
        if self._ack_at_once:
            quickack(self._sock)
        return text


class Shell:
    """The command channel on a connected stream socket; owns the socket. One caller at a time."""

    def __init__(self, sock: socket.socket, log_path: Path, *, ack_at_once: bool = False) -> None:
        self.log_path = log_path
        self._sock = sock
        # Appending: a machine restarted on the same run directory keeps the earlier conversation.
        self._log = open(log_path, "a", encoding="utf-8", errors="replace")
        self._spawn = _Channel(sock, ack_at_once)
        self._spawn.logfile_read = self._log
        self._spawn.logfile_send = self._log
        self._seen = ""  # the end of what came back, for the lines shown in an error
        self._closed = False
        self._lock = threading.Lock()  # interact's reader and the caller never read at once

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def wait_ready(self, deadline: Deadline) -> str:
        """Wait for the shell's readiness marker; returns the guest's `uname -r`."""
        return self._expect(READY_PATTERN, deadline, "the readiness marker TDXH-READY").group(1)

    def expect(self, pattern: re.Pattern[str], deadline: Deadline) -> re.Match[str]:
        """Wait for ``pattern`` in what the shell printed since the last wait (for a command sent
        with `send()` that reports back by itself)."""
        return self._expect(pattern, deadline, f"pattern {pattern.pattern!r} from the shell")

    def run(self, cmd: str, timeout: float) -> CommandResult:
        """Run one shell command line in the guest and wait up to `timeout` seconds for its exit
        status. Output is stdout and stderr together, exactly as written. What came before the
        command was sent is skipped. After a timeout the command may still be running: the
        channel is then in an unknown state and the machine should be treated as broken.
        """
        if "\n" in cmd or "\r" in cmd:
            raise ValueError(f"run() takes one command line, got {cmd!r}: join the commands "
                             "with ';' or write a script file")
        deadline = Deadline.after(timeout)
        token = f"__TDXH_END_{secrets.token_hex(3)}__"
        line = f'{cmd}; echo "{token}:$?"'
        if len(line.encode()) + 1 > MAX_LINE_BYTES:
            raise ValueError(f"command line of {len(line.encode()) + 1} bytes is longer than the tty "
                             f"takes ({MAX_LINE_BYTES}): write a script file and run that")
        awaited = f"the end of command {cmd!r} (marker {token})"
        self._send(line, awaited)
        end = self._expect(re.compile(re.escape(token) + r":(\d+)\n"), deadline, awaited)
        return CommandResult(int(end.group(1)), self._spawn.before)

    def send(self, cmd: str) -> None:
        """Send one command line without waiting for it to end: for commands after which the
        shell never answers (reboot, kexec -e, a sysrq crash). Later waits start after it."""
        if "\n" in cmd or "\r" in cmd:
            raise ValueError(f"send() takes one command line, got {cmd!r}")
        self._send(cmd, f"sending {cmd!r}")

    def _send(self, line: str, awaited: str) -> None:
        if self._closed:
            raise ChannelClosed("command channel already closed", awaited, self.tail(), self.log_path,
                                "command channel")
        self._drop_pending()
        log.debug("shell: %s", line)
        try:
            self._spawn.sendline(line)
        except OSError as exc:
            raise ChannelClosed(f"sending failed ({exc})", awaited, self.tail(), self.log_path,
                                "command channel") from exc

    def _drop_pending(self) -> None:
        """Forget what arrived and was not waited for (what a command sent with `send()` said)."""
        with self._lock:
            self._remember(discard_pending(self._spawn))

    def _remember(self, text: str) -> str:
        self._seen = (self._seen + text)[-TAIL_CHARS:]
        return text

    def _expect(self, regex: re.Pattern[str], deadline: Deadline, awaited: str) -> re.Match[str]:
        if self._closed:
            raise ChannelClosed("command channel closed", awaited, self.tail(), self.log_path, "command channel")
        with self._lock:
            try:
                self._spawn.expect(regex, timeout=deadline.remaining())
            except pexpect.TIMEOUT:
                self._remember(self._spawn.buffer)
                raise ChannelTimeout(f"timed out after {deadline.seconds:g} s", awaited, self.tail(),
                                     self.log_path, "command channel") from None
            except pexpect.EOF:
                self._remember(self._spawn.buffer)
                why = "command channel closed" if self._closed else \
                    "command channel ended (EOF; did the emulator exit?)"
                raise ChannelClosed(why, awaited, self.tail(), self.log_path, "command channel") from None
            self._remember(self._spawn.before + self._spawn.after)
            match: re.Match[str] = self._spawn.match
            return match

    def tail(self) -> list[str]:
        return tail_lines(self._seen)

    def interact(self, stdin: TextIO, stdout: TextIO) -> None:
        """Hand the shell to a person: stdin lines go to the guest shell, its output goes to
        stdout as it arrives, until stdin ends or the channel closes."""
        done = threading.Event()

        def show() -> None:
            while not done.is_set():
                try:
                    with self._lock:
                        text = self._spawn.read_nonblocking(READ_SIZE, WAIT_SLICE)
                except (pexpect.EOF, OSError, ValueError):
                    done.set()
                    return
                if text:
                    stdout.write(self._remember(text))
                    stdout.flush()

        shower = threading.Thread(target=show, name="shell-interact", daemon=True)
        shower.start()
        try:
            for line in stdin:
                if done.is_set():
                    break
                self._spawn.send(line)
            done.wait(INTERACT_LINGER)  # let the answer to the last line come out
        finally:
            done.set()
            shower.join(WAIT_SLICE * 4)

    def close(self) -> None:
        """Close the channel and its log. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        self._log.close()
