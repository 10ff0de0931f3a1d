"""The guest console (COM1): the kernel's messages, from the first boot line to a panic. One
reader thread drains the emulator's console socket into the console log, a list of lines and a
queue that pexpect reads; callers wait for patterns on it with pexpect.

The reader never stops draining, whether or not anyone waits: a console left unread fills its
socket, stalls the UART, and the kernel's console, tired of waiting, overwrites bytes still in
its FIFO. Commands do not go through here: they have a channel of their own (`shell.py`).

Every wait has a deadline; a wait that fails raises `ChannelTimeout` or `ChannelClosed` naming
what was awaited, with the log path and the last console lines.
"""

from __future__ import annotations

import codecs
import logging
import os
import queue
import re
import selectors
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, TextIO

import pexpect
from pexpect.spawnbase import SpawnBase

from harness.deadline import WAIT_SLICE, Deadline
from harness.machine.channel import (
    READ_SIZE,
    SEARCH_WINDOW,
    TAIL_LINES,
    ChannelClosed,
    ChannelTimeout,
    discard_pending,
    read_slice,
)

log = logging.getLogger("harness.machine.console")

CHUNK_SIZE = 65536
# The reader only blocks in select() and in writing the log: it stops within this after close().
READER_STOP_SECONDS = 5.0
# A serial console ends lines with "\r\n" (the 8250 console and the tty's onlcr); programs that
# write "\r\n" themselves come out as "\r\r\n". All of these are folded to "\n".
_LINE_END = re.compile(r"\r+\n")
_TRAILING_CR = re.compile(r"\r+\Z")


class ConsoleSocket(Protocol):
    """What the console needs of its connected stream socket (a `socket.socket` fits)."""

    def fileno(self) -> int: ...

    def recv(self, bufsize: int, /) -> bytes: ...

    def close(self) -> None: ...


class _ReceivedText(SpawnBase):  # type: ignore[misc]
    """pexpect over the text the reader thread queued, as pexpect's own PopenSpawn does over its
    pipe reader: pexpect keeps the buffer, searches it and times out."""

    def __init__(self, incoming: queue.SimpleQueue[str | None]) -> None:
        super().__init__(timeout=None, maxread=READ_SIZE, searchwindowsize=SEARCH_WINDOW, encoding="utf-8",
                         codec_errors="replace")
        self._incoming = incoming
        self._held = ""  # taken from the queue, beyond the size of the last read
        self._ended = False

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> str:
        """At most ``size`` characters of what has arrived, waiting at most ``timeout`` (and one
        WAIT_SLICE, so that a Ctrl-C meant for the waiting thread gets through); "" when nothing
        came, EOF once ended and read."""
        if not self._held and not self._ended:
            slice_ = read_slice(timeout)
            try:
                self._take(self._incoming.get(timeout=slice_))
            except queue.Empty:
                return ""
        while not self._ended and len(self._held) < size:
            try:
                self._take(self._incoming.get_nowait())
            except queue.Empty:
                break
        if not self._held and self._ended:
            self.flag_eof = True
            raise pexpect.EOF("the console ended")
        text, self._held = self._held[:size], self._held[size:]
        return text

    def _take(self, item: str | None) -> None:
        if item is None:
            self._ended = True
        else:
            self._held += item


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
        # Everything received, as lines ending in "\n"; the last element is the partial line,
        # possibly empty. Kept by line so that appending a chunk costs what it adds.
        self._lines = [""]
        self._incoming: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._spawn = _ReceivedText(self._incoming)
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
        text = _LINE_END.sub("\n", text)
        first, *rest = text.split("\n")
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
        if text:
            self._incoming.put(text)
        if final:
            self._incoming.put(None)

    # --- waits -----------------------------------------------------------------------------

    def expect(self, pattern: re.Pattern[str] | str, deadline: Deadline) -> re.Match[str]:
        """Wait until `pattern` (a regular expression) matches in what arrived since the last
        match (or `skip()`); later waits start after the match. Line ends are "\\n".

        Raises ChannelTimeout when `deadline` passes, ChannelClosed on EOF or after close().
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        awaited = f"pattern {regex.pattern!r}"
        if self._closed:
            raise ChannelClosed("console closed", awaited, self.tail(), self.log_path)
        try:
            self._spawn.expect(regex, timeout=deadline.remaining())
        except pexpect.TIMEOUT:
            raise ChannelTimeout(f"timed out after {deadline.seconds:g} s", awaited, self.tail(),
                                 self.log_path) from None
        except pexpect.EOF:
            raise ChannelClosed(self._why_ended(), awaited, self.tail(), self.log_path) from None
        match: re.Match[str] = self._spawn.match
        return match

    def skip(self) -> None:
        """Later waits start after what has arrived so far."""
        discard_pending(self._spawn)

    def wait_quiet(self, period: float, deadline: Deadline) -> None:
        """Wait until nothing has arrived for `period` seconds: the guest's CPUs are done with
        the console driver for now (an injected machine check must not catch one inside it).

        Raises ChannelTimeout when the console is still talking at `deadline`, ChannelClosed on
        EOF or after close().
        """
        awaited = f"{period:g} s without console output"
        with self._cond:
            while (silent := time.monotonic() - self._last_arrival) < period:
                if self._closed or self._eof:
                    raise ChannelClosed(self._why_ended(), awaited, self.tail(), self.log_path)
                if deadline.expired():
                    raise ChannelTimeout(f"timed out after {deadline.seconds:g} s", awaited, self.tail(),
                                         self.log_path)
                self._cond.wait(min(period - silent, deadline.slice()))

    def _why_ended(self) -> str:
        if self._closed:
            return "console closed"
        why = f"read failed: {self._reader_error}" if self._reader_error else "EOF"
        return f"console ended ({why}; did the emulator exit?)"

    def follow(self, stdout: TextIO, done: threading.Event) -> None:
        """Copy console text to ``stdout`` as it arrives, from now until ``done`` is set or the
        console ends (for a person at the terminal: `Machine.interact`)."""
        with self._cond:
            line_no, offset = len(self._lines) - 1, len(self._lines[-1])
            while not done.is_set():
                text = self._lines[line_no][offset:] + "".join(self._lines[line_no + 1:])
                line_no, offset = len(self._lines) - 1, len(self._lines[-1])
                if text:
                    stdout.write(text)
                    stdout.flush()
                if self._eof or self._closed:
                    return
                self._cond.wait(WAIT_SLICE)

    # --- inspection and teardown -----------------------------------------------------------

    def lines(self) -> list[str]:
        """All console lines so far, the last one possibly partial."""
        with self._cond:
            return _without_line_ends(self._lines)

    def tail(self) -> list[str]:
        """The last console lines: what a failed wait (on either channel) is shown with."""
        with self._cond:
            return _without_line_ends(self._lines[-TAIL_LINES - 1:])[-TAIL_LINES:]

    def close(self) -> None:
        """Stop the reader, close the log and the socket. Waits in progress raise ChannelClosed.
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
