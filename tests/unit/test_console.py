"""The console channel over a real socketpair, with a fake guest writing what a serial console
carries: "\\r\\n" line ends, kernel messages between command output, reads split anywhere."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.deadline import WAIT_SLICE, Deadline
from harness.machine import console as console_module
from harness.machine.console import CommandResult, Console, ConsoleClosed, ConsoleTimeout, command_output

COMMAND_LINE = re.compile(r'^(.*); echo "(__TDXH_END_[0-9a-f]{6}__):\$\?"$')


class Guest:
    """The guest end of the console socket."""

    def __init__(self, sock: socket.socket, log_path: Path) -> None:
        self.sock = sock
        self.sock.settimeout(5)
        self.log_path = log_path
        self.sent = bytearray()
        self._pending = b""

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

    def read_command(self) -> tuple[str, str, str]:
        """The next command line the harness sent: (whole line, command, end token)."""
        while b"\n" not in self._pending:
            self._pending += self.sock.recv(4096)
        raw, self._pending = self._pending.split(b"\n", 1)
        line = raw.decode()
        match = COMMAND_LINE.match(line)
        assert match, f"not a protocol line: {line!r}"
        return line, match.group(1), match.group(2)


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


@contextmanager
def guest_thread(body: Callable[[], None]) -> Iterator[None]:
    """Run the guest's side in a thread while the test waits on the console; re-raise its
    failure."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, name="fake-guest")
    thread.start()
    try:
        yield
    finally:
        thread.join(10)
        assert not thread.is_alive(), "fake guest still running"
    if failures:
        raise failures[0]


def test_ready_marker_split_across_reads(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"[    0.100000] Linux version 6.1.0\r\n", b"TDXH-RE", b"ADY 6.1.0-test\r", b"\n")
    assert console.wait_ready(Deadline.after(5)) == "6.1.0-test"
    assert console.lines() == ["[    0.100000] Linux version 6.1.0", "TDXH-READY 6.1.0-test"]


def test_ready_marker_needs_the_whole_line(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"TDXH-READY 6.1.0-te")
    with pytest.raises(ConsoleTimeout):
        console.wait_ready(Deadline.after(0.1))
    guest.send(b"st\r\n")
    assert console.wait_ready(Deadline.after(5)) == "6.1.0-test"


def test_run_leaves_out_interleaved_kernel_lines(pair: tuple[Console, Guest], log_path: Path) -> None:
    console, guest = pair

    def answer() -> None:
        _, command, token = guest.read_command()
        assert command == "cat /proc/cmdline"
        guest.send(b"console=ttyS0\r\n[    1.234567] kvm: loaded\r\n",
                   b"[    1.300000][    T1] with caller id\r\n", b"panic=", b"-1\r\n",
                   f"{token}:0\r\n".encode())

    with guest_thread(answer):
        result = console.run("cat /proc/cmdline", timeout=5)
    assert (result.status, result.output) == (0, "console=ttyS0\npanic=-1\n")
    assert "[    1.234567] kvm: loaded" in console.lines()
    assert b"[    1.234567] kvm: loaded\r\n" in log_path.read_bytes()


def test_run_reports_the_exit_status(pair: tuple[Console, Guest]) -> None:
    console, guest = pair

    def answer() -> None:
        _, _, token = guest.read_command()
        guest.send(b"sh: nosuch: not found\r\n", f"{token}:1".encode(), b"27\r", b"\n")

    with guest_thread(answer):
        result = console.run("nosuch", timeout=5)
    assert (result.status, result.output) == (127, "sh: nosuch: not found\n")


def test_run_skips_the_echoed_command_line(pair: tuple[Console, Guest]) -> None:
    console, guest = pair

    def answer() -> None:
        line, _, token = guest.read_command()
        guest.send(f"{line}\r\n".encode(), f"6.1.0-test\r\n{token}:0\r\n".encode())

    with guest_thread(answer):
        result = console.run("uname -r", timeout=5)
    assert (result.status, result.output) == (0, "6.1.0-test\n")


def test_run_keeps_output_without_final_newline(pair: tuple[Console, Guest]) -> None:
    console, guest = pair

    def answer() -> None:
        _, _, token = guest.read_command()
        guest.send(f"no newline{token}:0\r\n".encode())

    with guest_thread(answer):
        assert console.run("printf 'no newline'", timeout=5).output == "no newline"


def test_run_ignores_what_came_before_it(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"left over from boot\r\n")

    def answer() -> None:
        _, _, token = guest.read_command()
        guest.send(f"{token}:0\r\n".encode())

    with guest_thread(answer):
        assert console.run("true", timeout=5).output == ""
    assert console.lines()[0] == "left over from boot"


def test_run_can_keep_kernel_lines(pair: tuple[Console, Guest]) -> None:
    console, guest = pair

    def answer() -> None:
        _, _, token = guest.read_command()
        guest.send(f"[    0.000000] Linux version 6.1.0\r\n{token}:0\r\n".encode())

    with guest_thread(answer):
        result = console.run("dmesg | head -1", timeout=5, strip_printk=False)
    assert result.output == "[    0.000000] Linux version 6.1.0\n"


def test_consecutive_commands(pair: tuple[Console, Guest]) -> None:
    console, guest = pair

    def answer() -> None:
        for index in range(3):
            _, command, token = guest.read_command()
            guest.send(f"{command}\r\n{token}:{index}\r\n".encode())

    with guest_thread(answer):
        results = [console.run(f"echo {index}", timeout=5) for index in range(3)]
    assert [(r.status, r.output) for r in results] == [(i, f"echo {i}\n") for i in range(3)]


def test_run_refuses_what_the_shell_would_split(pair: tuple[Console, Guest]) -> None:
    console, _ = pair
    with pytest.raises(ValueError, match="one command line"):
        console.run("echo a\necho b", timeout=1)
    with pytest.raises(ValueError, match="longer than the tty takes"):
        console.run("echo " + "x" * 5000, timeout=1)


def test_timeout_names_the_wait_and_shows_the_console_tail(pair: tuple[Console, Guest],
                                                           log_path: Path) -> None:
    console, guest = pair
    guest.send(b"".join(b"line %d\r\n" % index for index in range(30)))
    started = time.monotonic()
    with pytest.raises(ConsoleTimeout) as caught:
        console.expect("never printed", Deadline.after(0.2))
    assert 0.2 <= time.monotonic() - started < 2
    message = str(caught.value)
    assert "timed out after 0.2 s waiting for pattern 'never printed'" in message
    assert str(log_path) in message
    assert caught.value.tail == [f"line {index}" for index in range(10, 30)]
    assert "  | line 29" in message and "line 9\n" not in message


def test_command_timeout_names_the_command(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    def take_and_ignore() -> None:
        guest.read_command()

    with guest_thread(take_and_ignore), \
            pytest.raises(ConsoleTimeout, match="the end of command 'sleep 100'"):
        console.run("sleep 100", timeout=0.2)


def test_eof_while_waiting_raises_closed(pair: tuple[Console, Guest]) -> None:
    console, guest = pair

    def die() -> None:
        guest.read_command()
        guest.send(b"Kernel panic - not syncing: test\r\n")
        guest.sock.close()

    with guest_thread(die), pytest.raises(ConsoleClosed, match="EOF") as caught:
        console.run("echo c > /proc/sysrq-trigger", timeout=5)
    assert caught.value.tail == ["Kernel panic - not syncing: test"]
    with pytest.raises(ConsoleClosed):  # and at once for later waits
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
    with pytest.raises(ConsoleTimeout):
        console.expect(re.compile(r"step (\d)"), Deadline.after(0.05))


def test_patterns_match_within_one_line(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"first\r\nsecond\r\nlogin: ")
    with pytest.raises(ConsoleTimeout):
        console.expect(r"first\nsecond", Deadline.after(0.05))
    match = console.expect(r"login: $", Deadline.after(5))  # the partial line counts too
    assert match.string == "login: "


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
        with pytest.raises(ConsoleClosed, match="console closed"):
            console.expect("x", Deadline.after(5))
        with pytest.raises(ConsoleClosed, match="already closed"):
            console.run("true", timeout=5)


def test_close_wakes_a_waiting_caller(pair: tuple[Console, Guest]) -> None:
    console, _ = pair
    closer = threading.Timer(0.1, console.close)
    closer.start()
    with pytest.raises(ConsoleClosed):
        console.expect("never", Deadline.after(10))
    closer.join()


@pytest.mark.parametrize("text,expected", [
    ("", ""),
    ("a\nb\n", "a\nb\n"),
    ('x; echo "T:$?"\na\n', "a\n"),  # the tty echoed the command line
    ('x; echo "T:$?"', 'x; echo "T:$?"'),  # output that only looks like it
    ("partial", "partial"),
])
def test_command_output(text: str, expected: str) -> None:
    assert command_output(text, 'x; echo "T:$?"') == expected


RECORD = b"[    2.041642] OOM killer enabled.\r\n"


def interrupted(text: bytes, at: int) -> bytes:
    """``text`` with a kernel record written between its bytes ``at - 1`` and ``at``."""
    return text[:at] + RECORD + text[at:]


def test_kernel_records_between_any_two_bytes_leave_output_and_status_whole(
        pair: tuple[Console, Guest]) -> None:
    """Measured on a CI run: "sh: write error:[ 2.04] OOM killer enabled.\n Function not
    im[ 2.04] Restarting tasks: Starting\nplemented", and a record between an end marker's
    status and its line end, also between the "\r" and "\n" of a line end ("...:1\r[ 6.23]
    Lockdown: ...\r\n\n", seen later). Every cut of the output and of the marker line is tried."""
    console, guest = pair
    output = b"sh: write error: Function not implemented\r\n"
    marker_length = len("__TDXH_END_000000__:12")
    cuts = [(at_output, at_marker) for at_output in range(len(output))
            for at_marker in (0, 5, marker_length - 3, marker_length - 1, marker_length, marker_length + 1)]

    def answer() -> None:
        for _ in cuts:
            _, command, token = guest.read_command()
            at_output, at_marker = map(int, command.split())
            marker = f"{token}:12\r\n".encode()
            guest.send(interrupted(output, at_output) + interrupted(marker, at_marker))

    with guest_thread(answer):
        for at_output, at_marker in cuts:
            result = console.run(f"{at_output} {at_marker}", timeout=5)
            assert result == CommandResult(12, "sh: write error: Function not implemented\n"), \
                (at_output, at_marker)
    assert RECORD.decode().rstrip() in console.lines()


@pytest.mark.parametrize("at", [15, len("TDXH-READY 7.3.0-tdxh\r")], ids=["in_the_release", "in_the_line_end"])
def test_readiness_marker_interrupted_by_a_kernel_record(pair: tuple[Console, Guest], at: int) -> None:
    console, guest = pair
    guest.send(interrupted(b"TDXH-READY 7.3.0-tdxh\r\n", at))
    assert console.wait_ready(Deadline.after(5)) == "7.3.0-tdxh"


def test_a_record_still_arriving_is_not_output(pair: tuple[Console, Guest]) -> None:
    """The status digits stop at the record's "[": the marker only counts once its line ends."""
    console, guest = pair

    def answer() -> None:
        _, _, token = guest.read_command()
        guest.send(f"{token}:1[    3.5".encode(), b"00000] late\r\n", b"\r\n")

    with guest_thread(answer):
        assert console.run("false", timeout=5) == CommandResult(1, "")


def test_a_record_that_began_before_the_command_is_not_output(pair: tuple[Console, Guest]) -> None:
    """Seen on a resumed machine: the command went out while "[    1.99" was all of a record."""
    console, guest = pair
    guest.send(b"[    1.99")

    def answer() -> None:
        _, _, token = guest.read_command()
        guest.send(b"8401] clocksource: tsc: mask: 0xffffffffffffffff\r\n", f"7.3.4\r\n{token}:0\r\n".encode())

    with guest_thread(answer):
        assert console.run("uname -r", timeout=5) == CommandResult(0, "7.3.4\n")


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


def test_interact_forwards_lines_and_shows_the_console(tmp_path):
    import io
    import socket as socket_module
    import threading as threading_module

    host, guest = socket_module.socketpair()

    def fake_guest() -> None:
        guest.sendall(b"banner\r\n")
        line = guest.makefile("rb").readline()
        guest.sendall(b"got: " + line.strip() + b"\r\n")
        guest.close()

    thread = threading_module.Thread(target=fake_guest)
    thread.start()
    out = io.StringIO()
    console = Console(host, tmp_path / "console.log")
    console.interact(io.StringIO("hello\n"), out)
    thread.join(5)
    console.close()
    assert "got: hello\n" in out.getvalue()


def test_send_does_not_wait_and_later_waits_start_after_it(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"TDXH-READY 7.3.0\r\n")
    console.send("reboot -f")
    while b"\n" not in guest._pending:
        guest._pending += guest.sock.recv(4096)
    assert guest._pending == b"reboot -f\n"
    # The marker that came before the command does not count as the next boot's.
    with pytest.raises(ConsoleTimeout):
        console.wait_ready(Deadline.after(0.05))
    guest.send(b"[    0.000000] Linux version 7.3.0\r\nTDXH-READY 7.3.0\r\n")
    assert console.wait_ready(Deadline.after(5)) == "7.3.0"
    with pytest.raises(ValueError):
        console.send("a\nb")


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

    with guest_thread(chatter), pytest.raises(ConsoleTimeout, match=r"0\.3 s without console output"):
        try:
            console.wait_quiet(0.3, Deadline.after(1.0))
        finally:
            stop.set()


def test_wait_quiet_after_eof_raises_closed(pair: tuple[Console, Guest]) -> None:
    console, guest = pair
    guest.send(b"last words\r\n")
    guest.sock.close()
    with pytest.raises(ConsoleClosed, match="EOF"):
        console.wait_quiet(5, Deadline.after(5))
