"""The console channel over a real socketpair, with a fake guest writing what a serial console
carries: kernel messages with "\\r\\n" line ends, reads split anywhere, megabytes of them."""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peer_thread import guest_thread

from harness.deadline import WAIT_SLICE, Deadline
from harness.machine import console as console_module
from harness.machine.channel import ChannelClosed, ChannelTimeout
from harness.machine.console import Console


class Guest:
    """The guest end of the console socket."""

    def __init__(self, sock: socket.socket, log_path: Path) -> None:
        self.sock = sock
        self.sock.settimeout(5)
        self.log_path = log_path
        self.sent = bytearray()

    def send(self, *chunks: bytes) -> None:
        """Send each chunk and wait until the console has logged it, so that every chunk comes
        to the console as a read of its own."""
        for chunk in chunks:
            self.sock.sendall(chunk)
            self.sent += chunk
            deadline = Deadline.after(5)
            while self.log_path.stat().st_size < len(self.sent):
                assert not deadline.expired(), "the console did not read what the guest sent"
                time.sleep(0.001)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "console.log"


@pytest.fixture
def pair(log_path: Path) -> Iterator[tuple[Console, Guest]]:
    host, guest = socket.socketpair()
    console = Console(host, log_path)
    try:
        yield console, Guest(guest, log_path)
    finally:
        console.close()
        guest.close()


def test_timeout_names_the_wait_and_shows_the_console_tail(pair: tuple[Console, Guest],
                                                           log_path: Path) -> None:
    console, guest = pair
    guest.send(b"".join(b"line %d\r\n" % index for index in range(30)))
    started = time.monotonic()
    with pytest.raises(ChannelTimeout) as caught:
        console.expect("never printed", Deadline.after(0.2))
    assert 0.2 <= time.monotonic() - started < 2
    message = str(caught.value)
    assert "timed out after 0.2 s waiting for pattern 'never printed'" in message
    assert str(log_path) in message
    assert caught.value.tail == [f"line {index}" for index in range(10, 30)]
    assert "  | line 29" in message and "line 9\n" not in message


def test_eof_while_waiting_raises_closed(pair: tuple[Console, Guest]) -> None:
    console, guest = pair

    def die() -> None:
        guest.send(b"Kernel panic - not syncing: test\r\n")
        guest.sock.close()

    with guest_thread(die), pytest.raises(ChannelClosed, match="EOF") as caught:
        console.expect("reboot: Restarting", Deadline.after(5))
    assert caught.value.tail == ["Kernel panic - not syncing: test"]
    with pytest.raises(ChannelClosed):  # and at once for later waits
        console.expect("anything", Deadline.after(5))


def test_text_before_eof_still_matches(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"reboot: Power down\r\n")
    guest.sock.close()
    assert console.expect(r"reboot: (\w+ \w+)", Deadline.after(5)).group(1) == "Power down"


def test_expect_moves_the_cursor(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"step 1\r\nstep 2\r\n")
    assert console.expect(re.compile(r"step (\d)"), Deadline.after(5)).group(1) == "1"
    assert console.expect(re.compile(r"step (\d)"), Deadline.after(5)).group(1) == "2"
    with pytest.raises(ChannelTimeout):
        console.expect(re.compile(r"step (\d)"), Deadline.after(0.05))


def test_line_ends_are_newlines_and_a_partial_line_matches(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"first\r\nsecond\r\r\nlogin: ")
    assert console.expect(r"first\nsecond\n", Deadline.after(5))
    assert console.expect(r"login: ", Deadline.after(5))  # the partial line counts too


def test_skip_starts_later_waits_after_what_arrived(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"PM: suspend entry (s2idle)\r\n")
    console.skip()
    with pytest.raises(ChannelTimeout):  # the record of an earlier suspend does not count
        console.expect(r"suspend entry", Deadline.after(0.05))
    guest.send(b"PM: suspend entry (deep)\r\n")
    assert console.expect(r"suspend entry \((\w+)\)", Deadline.after(5)).group(1) == "deep"


def test_a_match_late_in_a_burst_is_found(pair: tuple[Console, Guest]) -> None:
    # Far more than pexpect's search window arrives before anyone waits: every part of it is
    # searched, not only its end.
    console, guest = pair
    early = b"[    0.5] virt/tdx: 1034 KB allocated for PAMT\r\n"
    guest.send(early + b"[    1.0] filler line\r\n" * 20_000)
    assert console.expect(r"(\d+) KB allocated for PAMT", Deadline.after(5)).group(1) == "1034"


def test_a_long_console_costs_what_it_adds(pair: tuple[Console, Guest], log_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 MB read in 64-byte chunks (QEMU's serial sends a few bytes at a time) while a wait
    # watches them: appending and searching must not rescan the whole console on each chunk
    # (that took minutes here).
    monkeypatch.setattr(console_module, "CHUNK_SIZE", 64)
    console, guest = pair
    line = b"[   12.345678] " + b"x" * 84 + b"\r\n"
    flood = line * 10_000 + b"FLOOD-END\r\n"

    def send() -> None:
        for offset in range(0, len(flood), 200):
            guest.sock.sendall(flood[offset:offset + 200])

    started = time.monotonic()
    with guest_thread(send):
        console.expect(r"(FLOOD-END|Kernel panic)\n", Deadline.after(60))  # no literal prefix
    assert time.monotonic() - started < 10
    assert len(console.lines()) == 10_001
    assert log_path.stat().st_size == len(flood)


def test_log_holds_every_byte(pair: tuple[Console, Guest], log_path: Path) -> None:
    console, guest = pair
    guest.send(b"\xe2\x9c", b"\x93 ok\r\r\n", b"bad \xff byte\r\n", b"bare\rcr\n")
    console.close()
    assert log_path.read_bytes() == bytes(guest.sent)
    assert console.lines() == ["\u2713 ok", "bad \ufffd byte", "bare\rcr"]


def test_close_stops_the_reader(log_path: Path) -> None:
    host, guest = socket.socketpair()
    with guest:
        before = set(threading.enumerate())
        console = Console(host, log_path)
        (reader,) = set(threading.enumerate()) - before
        console.close()
        assert not reader.is_alive()
        assert host.fileno() == -1
        console.close()
        with pytest.raises(ChannelClosed, match="console closed"):
            console.expect("x", Deadline.after(5))


def test_close_wakes_a_waiting_caller(pair: tuple[Console, Guest]) -> None:
    console, _ = pair
    closer = threading.Timer(0.1, console.close)
    closer.start()
    with pytest.raises(ChannelClosed):
        console.expect("never", Deadline.after(10))
    closer.join()


def test_deadline() -> None:
    deadline = Deadline.after(10)
    assert 9 < deadline.remaining() <= 10 and not deadline.expired()
    assert deadline.within(1).remaining() <= 1
    assert deadline.within(100) is deadline
    assert deadline.slice() == WAIT_SLICE and deadline.slice(20) <= 10
    past = Deadline.after(0)
    assert past.expired() and past.remaining() == 0 and past.slice() == 0
    with pytest.raises(ValueError):
        Deadline.after(-1)


def test_follow_copies_what_arrives_until_done(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"before\r\n")
    out, done = io.StringIO(), threading.Event()
    follower = threading.Thread(target=console.follow, args=(out, done))
    follower.start()
    time.sleep(0.1)
    guest.send(b"[    1.0] kvm: loaded\r\n")
    deadline = Deadline.after(5)
    while "kvm: loaded" not in out.getvalue():
        assert not deadline.expired(), out.getvalue()
        time.sleep(0.01)
    done.set()
    follower.join(5)
    assert not follower.is_alive() and out.getvalue() == "[    1.0] kvm: loaded\n"


def test_wait_quiet_returns_a_period_after_the_last_byte(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    sent_at: list[float] = []

    def chatter() -> None:
        for index in range(5):
            guest.send(b"[    1.%06d] still talking\r\n" % index)
            sent_at.append(time.monotonic())
            time.sleep(0.05)

    with guest_thread(chatter):
        time.sleep(0.01)  # the first line is on its way: the wait must outlast the chatter
        console.wait_quiet(0.3, Deadline.after(10))
        returned = time.monotonic()
    assert len(sent_at) == 5 and returned - sent_at[-1] >= 0.3 - 0.01, \
        f"returned {returned - sent_at[-1]:.3f} s after the last line, the period is 0.3 s"


def test_wait_quiet_on_a_console_that_never_stops_times_out(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():
            guest.send(b"spam\r\n")
            time.sleep(0.02)

    with guest_thread(chatter), pytest.raises(ChannelTimeout, match=r"0\.3 s without console output"):
        try:
            console.wait_quiet(0.3, Deadline.after(1.0))
        finally:
            stop.set()


def test_wait_quiet_after_eof_raises_closed(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"last words\r\n")
    guest.sock.close()
    with pytest.raises(ChannelClosed, match="EOF"):
        console.wait_quiet(5, Deadline.after(5))
