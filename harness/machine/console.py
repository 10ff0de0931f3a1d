"""The guest console channel (COM1): one reader thread drains the emulator's console socket into
the console log and an in-memory buffer; callers wait for patterns on it and run shell commands
through the protocol of the initramfs shell (images/initramfs/init).

Protocol: the shell prints "TDXH-READY <uname -r>" when it reads commands. For each command the
harness writes `<cmd>; echo "<token>:$?"` with a fresh random token and reads up to
"<token>:<status>"; the command's output is what came in between, less kernel messages.

Kernel messages share the console. The kernel writes each record whole, "[    1.234567] text"
up to its line end, but between any two bytes of the shell's output: "Function not im[    2.04]
Restarting tasks\nplemented". The shell's side of the protocol (the readiness marker, the end
marker, command output) is therefore read with every such record taken out, wherever it landed;
records stay in the log and in `lines()`. A command that prints such lines itself (`dmesg`) needs
`run(..., strip_printk=False)` or a raw format (`dmesg -r`).

Every wait has a deadline; a wait that fails raises `ConsoleTimeout` or `ConsoleClosed` naming
what was awaited, with the log path and the last console lines.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import secrets
import selectors
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, TextIO

from harness.deadline import Deadline

log = logging.getLogger("harness.machine.console")

READY_PATTERN = re.compile(r"TDXH-READY (\S+)\n")
# The start of a kernel record on the console, "[    1.234567] text" (also "[    1.234567][    T1]
# text" with CONFIG_PRINTK_CALLER); the record runs to the end of its line.
KERNEL_RECORD = re.compile(r"\[\s*\d+\.\d+\]")
TAIL_LINES = 20
CHUNK_SIZE = 65536
# N_TTY keeps at most 4095 characters of a line in canonical mode and drops the rest.
MAX_LINE_BYTES = 4095
# The reader only blocks in select() and in writing the log: it stops within this after close().
READER_STOP_SECONDS = 5.0
INTERACT_LINGER = 1.0
# A serial console ends lines with "\r\n" (the 8250 console and the tty's onlcr); programs that
# write "\r\n" themselves come out as "\r\r\n". All of these are folded to "\n".
_LINE_END = re.compile(r"\r+\n")
_TRAILING_CR = re.compile(r"\r+\Z")


_Position = tuple[int, int]  # (line index, offset in the line) in the console text


class ConsoleSocket(Protocol):
    """What the console needs of its connected stream socket (a `socket.socket` fits)."""

    def fileno(self) -> int: ...

    def recv(self, bufsize: int, /) -> bytes: ...

    def sendall(self, data: bytes, /) -> None: ...

    def close(self) -> None: ...


class ConsoleError(Exception):
    """Root of the console layer's errors."""


class ConsoleWaitError(ConsoleError):
    """A wait on the console failed; says what was awaited and shows the end of the console."""

    def __init__(self, reason: str, awaited: str, tail: list[str], log_path: Path) -> None:
        self.awaited = awaited
        self.tail = tail
        self.log_path = log_path
        shown = "\n".join(f"  | {line}" for line in tail) or "  (console is empty)"
        super().__init__(f"{reason} waiting for {awaited}\n"
                         f"console log: {log_path}\n"
                         f"last {len(tail)} console lines:\n{shown}")


class ConsoleTimeout(ConsoleWaitError):
    """The deadline passed before the awaited text arrived."""


class ConsoleClosed(ConsoleWaitError):
    """The console ended (EOF: the emulator exited, or `close()` was called) before the awaited
    text arrived."""


@dataclass(frozen=True)
class CommandResult:
    status: int
    output: str


@dataclass(frozen=True)
class _Piece:
    """Shell output found at (line, offset) of the console text."""

    line: int
    offset: int
    text: str


class _ShellText:
    """The console text after a position with the kernel's records taken out: what the shell
    printed. A raw line holding a record start ends in that record; the shell's line it
    interrupted goes on in the next raw line. Each complete raw line is looked at once."""

    def __init__(self, start: _Position) -> None:
        self._next = start  # the first raw line (and offset in it) not looked at yet
        self._pending: list[_Piece] = []  # the shell's current line, not ended yet
        self.lines: list[list[_Piece]] = []  # the shell's complete lines, each with its "\n"

    def feed(self, raw: list[str]) -> list[list[_Piece]]:
        """Take in the complete raw lines after the last call; returns the shell lines they
        completed."""
        line_no, offset = self._next
        done: list[list[_Piece]] = []
        while line_no < len(raw) - 1:
            piece, ended = _shell_part(raw[line_no], line_no, offset)
            if piece.text:
                self._pending.append(piece)
            if ended:
                done.append(self._pending)
                self._pending = []
            line_no, offset = line_no + 1, 0
        self._next = (line_no, offset)
        self.lines.extend(done)
        return done

    def partial(self, raw: list[str]) -> list[_Piece]:
        """The shell's current line so far, including the partial last raw line."""
        line_no, offset = self._next
        piece, _ = _shell_part(raw[line_no], line_no, offset)
        return [*self._pending, piece]


def _shell_part(line: str, line_no: int, offset: int) -> tuple[_Piece, bool]:
    """The shell's part of one raw line from ``offset``, and whether the shell's line ends there
    (it does not when a kernel record interrupted it)."""
    # Searched from the line start: a command sent while a record was still arriving puts the
    # offset inside it, and a record runs to its line end (seen after a resume: "[    1.99" was
    # there, "8401] clocksource: ..." came after the command and was taken for its output).
    record = KERNEL_RECORD.search(line)
    if record is None:
        return _Piece(line_no, offset, line[offset:]), line.endswith("\n")
    if record.start() < offset:
        return _Piece(line_no, offset, ""), False
    # The tty writes the shell's line end as "\r\n" (ONLCR), and a record can land between the
    # two: that "\r" belongs to the line end whose "\n" follows the record (seen in a CI run:
    # "__TDXH_END_017dac__:1\r[    6.236562] Lockdown: ...\r\n\n").
    return _Piece(line_no, offset, line[offset:record.start()].removesuffix("\r")), False


def _text(pieces: list[_Piece]) -> str:
    return "".join(piece.text for piece in pieces)


def _raw_position(pieces: list[_Piece], index: int) -> _Position:
    """Where the ``index``-th character of the pieces' text is in the console text."""
    for piece in pieces:
        if index <= len(piece.text):
            return piece.line, piece.offset + index
        index -= len(piece.text)
    raise IndexError(index)


class Console:
    """A guest console on a connected stream socket, drained from the moment it is created.

    The console owns the socket and closes it in `close()`: QEMU cannot exit while its console
    socket is open and unread, so close the console before waiting for the emulator. Waits are
    meant for one caller at a time.
    """

    def __init__(self, sock: ConsoleSocket, log_path: Path) -> None:
        self.log_path = log_path
        self._sock = sock
        # Appending: a console reopened on the same run directory keeps what came before.
        self._log = open(log_path, "ab")
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held_cr = ""  # a chunk's trailing "\r"s, kept until the next chunk says if "\n" follows
        self._cond = threading.Condition()
        # Everything received, as lines ending in "\n" (folded from "\r\n"); the last element is
        # the partial line, possibly empty. Kept by line so that appending a chunk and searching
        # new text cost what they add, not the size of the console.
        self._lines = [""]
        self._cursor: _Position = (0, 0)  # where the next wait starts matching
        self._last_arrival = time.monotonic()  # when the reader last received bytes
        self._eof = False
        self._closed = False
        self._reader_error: OSError | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._reader = threading.Thread(target=self._drain, name="console-reader", daemon=True)
        self._reader.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- reader thread ---------------------------------------------------------------------

    def _drain(self) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._sock.fileno(), selectors.EVENT_READ, "console")
                selector.register(self._wake_r, selectors.EVENT_READ, "wake")
                # select() has no timeout here on purpose: close() wakes it through the pipe,
                # and the callers' waits carry their own deadlines.
                while True:
                    if any(key.data == "wake" for key, _ in selector.select()):
                        return
                    try:
                        chunk = self._sock.recv(CHUNK_SIZE)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if not chunk:
                        log.info("console: EOF from the emulator")
                        return
                    self._absorb(chunk)
        except OSError as exc:
            log.warning("console: read failed: %s", exc)
            self._reader_error = exc
        finally:
            self._absorb(b"", final=True)

    def _absorb(self, chunk: bytes, final: bool = False) -> None:
        if chunk:
            self._log.write(chunk)
            self._log.flush()
        text = self._held_cr + self._decoder.decode(chunk, final=final)
        held = _TRAILING_CR.search(text)
        if held and not final:
            self._held_cr = held.group()
            text = text[:held.start()]
        else:
            self._held_cr = ""
        first, *rest = _LINE_END.sub("\n", text).split("\n")
        with self._cond:
            self._lines[-1] += first
            if rest:
                self._lines[-1] += "\n"
                self._lines.extend(piece + "\n" for piece in rest[:-1])
                self._lines.append(rest[-1])
            if chunk:
                self._last_arrival = time.monotonic()
            self._eof = self._eof or final
            self._cond.notify_all()

    # --- waits -----------------------------------------------------------------------------

    def expect(self, pattern: re.Pattern[str] | str, deadline: Deadline) -> re.Match[str]:
        """Wait until `pattern` (a regular expression) matches after the cursor, and move the
        cursor past the match. Patterns are matched one line at a time, the line with its "\\n"
        (so a match never spans lines, and `match.string` is the line); the partial last line is
        matched too, so a pattern can match a line that is still arriving: end it with "\\n" to
        wait for the whole line.

        Raises ConsoleTimeout when `deadline` passes, ConsoleClosed on EOF or after close().
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        return self._wait(regex, deadline, f"pattern {regex.pattern!r}")[1]

    def wait_quiet(self, period: float, deadline: Deadline) -> None:
        """Wait until nothing has arrived for `period` seconds: the guest's CPUs are done with
        the console driver for now (an injected machine check must not catch one inside it).

        Raises ConsoleTimeout when the console is still talking at `deadline`, ConsoleClosed on
        EOF or after close().
        """
        awaited = f"{period:g} s without console output"
        with self._cond:
            while (silent := time.monotonic() - self._last_arrival) < period:
                self._check_waiting(deadline, awaited)
                self._cond.wait(min(period - silent, deadline.slice()))

    def wait_ready(self, deadline: Deadline) -> str:
        """Wait for the initramfs shell's readiness marker; returns the guest's `uname -r`."""
        match, _, _ = self._wait_shell(READY_PATTERN, deadline, "the readiness marker TDXH-READY")
        return match.group(1)

    def run(self, cmd: str, timeout: float, *, strip_printk: bool = True) -> CommandResult:
        """Run one shell command line in the guest and wait up to `timeout` seconds for its exit
        status. Output is stdout and stderr together, line ends "\\n", without kernel message
        lines unless `strip_printk` is False. Text that arrived before the command was sent is
        skipped. After a timeout the command may still be running: the console is then in an
        unknown state and the machine should be treated as broken.
        """
        if "\n" in cmd or "\r" in cmd:
            raise ValueError(f"run() takes one command line, got {cmd!r}: join the commands "
                             "with ';' or write a script file")
        deadline = Deadline.after(timeout)
        token = f"__TDXH_END_{secrets.token_hex(3)}__"
        line = f'{cmd}; echo "{token}:$?"'
        data = f"{line}\n".encode()
        if len(data) > MAX_LINE_BYTES:
            raise ValueError(f"command line of {len(data)} bytes is longer than the tty takes "
                             f"({MAX_LINE_BYTES}): write a script file and run that")
        awaited = f"the end of command {cmd!r} (marker {token})"
        with self._cond:
            if self._closed:
                raise ConsoleClosed("console already closed", awaited, self._tail(), self.log_path)
            start = self._cursor = (len(self._lines) - 1, len(self._lines[-1]))
        log.debug("console run: %s", cmd)
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ConsoleClosed(f"sending failed ({exc})", awaited, self._tail(),
                                self.log_path) from exc
        end, shell, end_start = self._wait_shell(re.compile(re.escape(token) + r":(\d+)\n"),
                                                  deadline, awaited, start)
        if strip_printk:
            output = "".join(_text(pieces) for pieces in shell.lines) + end.string[:end.start()]
        else:
            with self._cond:
                output = self._between(start, end_start)
        return CommandResult(int(end.group(1)), command_output(output, line))

    def send(self, cmd: str) -> None:
        """Send one command line without waiting for it to end: for commands after which the
        shell never answers (reboot, kexec -e, a sysrq crash). Later waits start after it."""
        if "\n" in cmd or "\r" in cmd:
            raise ValueError(f"send() takes one command line, got {cmd!r}")
        awaited = f"sending {cmd!r}"
        with self._cond:
            if self._closed:
                raise ConsoleClosed("console already closed", awaited, self._tail(), self.log_path)
            self._cursor = (len(self._lines) - 1, len(self._lines[-1]))
        log.debug("console send: %s", cmd)
        try:
            self._sock.sendall(f"{cmd}\n".encode())
        except OSError as exc:
            raise ConsoleClosed(f"sending failed ({exc})", awaited, self._tail(), self.log_path) from exc

    def interact(self, stdin: TextIO, stdout: TextIO) -> None:
        """Hand the console to a person: stdin lines go to the guest shell, console text goes to
        stdout as it arrives, until stdin ends or the console closes."""
        done = threading.Event()

        def show() -> None:
            with self._cond:
                line_no, offset = len(self._lines) - 1, len(self._lines[-1])
                while not done.is_set():
                    text = self._lines[line_no][offset:] + "".join(self._lines[line_no + 1:])
                    line_no, offset = len(self._lines) - 1, len(self._lines[-1])
                    if text:
                        stdout.write(text)
                        stdout.flush()
                    if self._eof or self._closed:
                        done.set()
                    else:
                        self._cond.wait(0.5)

        shower = threading.Thread(target=show, name="console-interact", daemon=True)
        shower.start()
        try:
            for line in stdin:
                if done.is_set():
                    break
                self._sock.sendall(line.encode())
            done.wait(INTERACT_LINGER)  # let the answer to the last line come out
        finally:
            done.set()
            with self._cond:
                self._cond.notify_all()
            shower.join(READER_STOP_SECONDS)

    def _wait(self, regex: re.Pattern[str], deadline: Deadline,
              awaited: str) -> tuple[int, re.Match[str]]:
        """Wait for `regex` after the cursor; returns the line index and the match."""
        with self._cond:
            line_no, offset = self._cursor
            while True:
                # Each complete line is searched once; the partial line again each time it grows.
                while True:
                    match = regex.search(self._lines[line_no], offset)
                    if match:
                        self._cursor = (line_no, match.end())
                        return line_no, match
                    if line_no == len(self._lines) - 1:
                        break
                    line_no, offset = line_no + 1, 0
                self._check_waiting(deadline, awaited)
                self._cond.wait(deadline.slice())

    def _wait_shell(self, regex: re.Pattern[str], deadline: Deadline, awaited: str,
                    start: _Position | None = None) -> tuple[re.Match[str], _ShellText, _Position]:
        """Wait for `regex` in one line of the shell's output after `start` (default: the
        cursor), kernel records taken out; moves the cursor past the match. Returns the match
        (its string is the shell's line), the shell text before it, and where the match starts in
        the console text."""
        with self._cond:
            shell = _ShellText(self._cursor if start is None else start)
            while True:
                done = shell.feed(self._lines)
                for pieces in [*done, shell.partial(self._lines)]:
                    match = regex.search(_text(pieces))
                    if match:
                        self._cursor = _raw_position(pieces, match.end())
                        if pieces in done:
                            del shell.lines[shell.lines.index(pieces):]
                        return match, shell, _raw_position(pieces, match.start())
                self._check_waiting(deadline, awaited)
                self._cond.wait(deadline.slice())

    def _check_waiting(self, deadline: Deadline, awaited: str) -> None:
        """Raise if a wait cannot go on: console closed or ended, or the deadline passed."""
        if self._closed:
            raise ConsoleClosed("console closed", awaited, self._tail(), self.log_path)
        if self._eof:
            why = f"read failed: {self._reader_error}" if self._reader_error else "EOF"
            raise ConsoleClosed(f"console ended ({why}; did the emulator exit?)",
                                awaited, self._tail(), self.log_path)
        if deadline.remaining() <= 0:
            raise ConsoleTimeout(f"timed out after {deadline.seconds:g} s", awaited,
                                 self._tail(), self.log_path)

    # --- inspection and teardown -----------------------------------------------------------

    def _between(self, start: _Position, end: _Position) -> str:
        (first, begin), (last, stop) = start, end
        if first == last:
            return self._lines[first][begin:stop]
        return "".join([self._lines[first][begin:], *self._lines[first + 1:last],
                        self._lines[last][:stop]])

    def lines(self) -> list[str]:
        """All console lines so far (kernel messages included), the last one possibly partial."""
        with self._cond:
            return _without_line_ends(self._lines)

    def _tail(self) -> list[str]:
        with self._cond:
            return _without_line_ends(self._lines[-TAIL_LINES - 1:])[-TAIL_LINES:]

    def close(self) -> None:
        """Stop the reader, close the log and the socket. Waits in progress raise ConsoleClosed.
        Safe to call more than once."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        os.write(self._wake_w, b"x")
        self._reader.join(READER_STOP_SECONDS)
        if self._reader.is_alive():
            log.warning("console reader did not stop within %g s", READER_STOP_SECONDS)
        self._log.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._sock.close()


def _without_line_ends(lines: list[str]) -> list[str]:
    # Only the partial last line can be empty: complete lines hold at least their "\n".
    return [line.removesuffix("\n") for line in lines if line]


def command_output(text: str, sent_line: str) -> str:
    """A command's output from the text between sending it and its end marker, without the
    command line itself when the tty echoed it."""
    first, newline, rest = text.partition("\n")
    return rest if newline and first == sent_line else text
