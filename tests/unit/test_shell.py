"""The command channel over a real socketpair, with a fake guest shell answering the protocol of
images/initramfs/init: output exactly as written, the end marker, errors that say what was
awaited."""

from __future__ import annotations

import io
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from peer_thread import guest_thread

from harness.deadline import Deadline
from harness.machine.channel import ChannelClosed, ChannelTimeout
from harness.machine.shell import CommandResult, Shell

COMMAND_LINE = re.compile(r'^(.*); echo "(__TDXH_END_[0-9a-f]{6}__):\$\?"$')


class Guest:
    """The guest end of the command channel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(5)
        self._pending = b""

    def read_line(self) -> str:
        while b"\n" not in self._pending:
            chunk = self.sock.recv(4096)
            assert chunk, "the harness closed the channel"
            self._pending += chunk
        raw, self._pending = self._pending.split(b"\n", 1)
        return raw.decode()

    def read_command(self) -> tuple[str, str]:
        """The next command the harness sent: (command, end token)."""
        line = self.read_line()
        match = COMMAND_LINE.match(line)
        assert match, f"not a protocol line: {line!r}"
        return match.group(1), match.group(2)

    def answer(self, output: bytes, status: int = 0) -> None:
        _, token = self.read_command()
        self.sock.sendall(output + f"{token}:{status}\n".encode())


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "commands.log"


@pytest.fixture
def pair(log_path: Path) -> Iterator[tuple[Shell, Guest]]:
    host, guest = socket.socketpair()
    shell = Shell(host, log_path)
    try:
        yield shell, Guest(guest)
    finally:
        shell.close()
        guest.close()


def test_ready_marker_split_across_reads(pair: tuple[Shell, Guest]) -> None:
    shell, guest = pair
    for part in (b"BusyBox v1.36 built-in shell\n", b"TDXH-RE", b"ADY 7.3.4-tdxh", b"\n"):
        guest.sock.sendall(part)
    assert shell.wait_ready(Deadline.after(5)) == "7.3.4-tdxh"


def test_ready_marker_needs_the_whole_line(pair: tuple[Shell, Guest]) -> None:
    shell, guest = pair
    guest.sock.sendall(b"TDXH-READY 7.3.4-td")
    with pytest.raises(ChannelTimeout, match="the readiness marker"):
        shell.wait_ready(Deadline.after(0.1))
    guest.sock.sendall(b"xh\n")
    assert shell.wait_ready(Deadline.after(5)) == "7.3.4-tdxh"


def test_output_comes_back_exactly_as_written(pair: tuple[Shell, Guest]) -> None:
    # What the old shared console could not promise: lines that look like kernel records, "\r\n"
    # written by the program, no final newline. Nothing is filtered or rewritten.
    shell, guest = pair
    output = b"[    1.234567] kvm: loaded\nwith\r\ncrlf\n\ttab\nno newline"
    with guest_thread(lambda: guest.answer(output, 3)):
        result = shell.run("dmesg | tail -2", timeout=5)
    assert result == CommandResult(3, output.decode())


def test_the_command_line_sent(pair: tuple[Shell, Guest]) -> None:
    shell, guest = pair
    seen: list[str] = []

    def answer() -> None:
        command, token = guest.read_command()
        seen.append(command)
        guest.sock.sendall(f"{token}:0\n".encode())

    with guest_thread(answer):
        assert shell.run("cat /proc/cmdline | wc -c", timeout=5) == CommandResult(0, "")
    assert seen == ["cat /proc/cmdline | wc -c"]


def test_a_megabyte_of_output_in_small_pieces(pair: tuple[Shell, Guest]) -> None:
    # A UART hands its bytes over a few at a time: a megabyte arrives in thousands of reads, and
    # every byte of it comes back.
    shell, guest = pair
    output = b"".join(b"%07d\n" % n for n in range(131_072))  # 1 MiB of numbered lines

    def answer() -> None:
        _, token = guest.read_command()
        for offset in range(0, len(output), 509):
            guest.sock.sendall(output[offset:offset + 509])
        guest.sock.sendall(f"{token}:0\n".encode())

    with guest_thread(answer):
        result = shell.run("seq -w 0 131071", timeout=60)
    assert result.status == 0 and result.output.encode() == output


def test_text_the_command_did_not_wait_for_is_not_the_next_output(pair: tuple[Shell, Guest]) -> None:
    shell, guest = pair
    shell.send("kexec -e")
    assert guest.read_line() == "kexec -e"
    guest.sock.sendall(b"kexec_core: Starting new kernel\n")  # what the old kernel's shell said
    guest.sock.sendall(b"TDXH-READY 7.3.4\n")
    assert shell.wait_ready(Deadline.after(5)) == "7.3.4"
    guest.sock.sendall(b"left over\n")
    with guest_thread(lambda: guest.answer(b"7.3.4\n")):
        assert shell.run("uname -r", timeout=5) == CommandResult(0, "7.3.4\n")


def test_expect_after_send(pair: tuple[Shell, Guest]) -> None:
    shell, guest = pair
    shell.send('echo mem > /sys/power/state; echo "TDXH-RESUMED:$?"')
    guest.read_line()
    with pytest.raises(ChannelTimeout, match="from the shell"):
        shell.expect(re.compile(r"TDXH-RESUMED:(\d+)"), Deadline.after(0.05))
    guest.sock.sendall(b"TDXH-RESUMED:0\n")
    assert shell.expect(re.compile(r"TDXH-RESUMED:(\d+)"), Deadline.after(5)).group(1) == "0"


def test_consecutive_commands(pair: tuple[Shell, Guest]) -> None:
    shell, guest = pair

    def answer() -> None:
        for index in range(3):
            command, token = guest.read_command()
            guest.sock.sendall(f"{command}\n{token}:{index}\n".encode())

    with guest_thread(answer):
        results = [shell.run(f"echo {index}", timeout=5) for index in range(3)]
    assert results == [CommandResult(i, f"echo {i}\n") for i in range(3)]


def test_run_refuses_what_the_shell_would_split(pair: tuple[Shell, Guest]) -> None:
    shell, _ = pair
    with pytest.raises(ValueError, match="one command line"):
        shell.run("echo a\necho b", timeout=1)
    with pytest.raises(ValueError, match="longer than the tty takes"):
        shell.run("echo " + "x" * 5000, timeout=1)
    with pytest.raises(ValueError):
        shell.send("a\nb")


def test_timeout_names_the_command_and_shows_its_output(pair: tuple[Shell, Guest], log_path: Path) -> None:
    shell, guest = pair

    def start_and_hang() -> None:
        guest.read_command()
        guest.sock.sendall(b"".join(b"progress %d\n" % n for n in range(30)))

    with guest_thread(start_and_hang), pytest.raises(ChannelTimeout) as caught:
        shell.run("sleep 100", timeout=0.3)
    message = str(caught.value)
    assert "timed out after 0.3 s waiting for the end of command 'sleep 100'" in message
    assert f"command channel log: {log_path}" in message
    assert caught.value.tail == [f"progress {n}" for n in range(10, 30)]


def test_eof_while_waiting_raises_closed(pair: tuple[Shell, Guest]) -> None:
    shell, guest = pair

    def die() -> None:
        guest.read_command()
        guest.sock.close()

    with guest_thread(die), pytest.raises(ChannelClosed, match="EOF"):
        shell.run("echo c > /proc/sysrq-trigger", timeout=5)


def test_the_log_holds_the_conversation(pair: tuple[Shell, Guest], log_path: Path) -> None:
    shell, guest = pair
    with guest_thread(lambda: guest.answer(b"hello\n")):
        shell.run("echo hello", timeout=5)
    shell.close()
    text = log_path.read_text()
    assert "echo hello" in text and "hello\n__TDXH_END_" in text


def test_close_then_use(log_path: Path) -> None:
    host, guest = socket.socketpair()
    with guest:
        shell = Shell(host, log_path)
        shell.close()
        shell.close()
        assert host.fileno() == -1
        with pytest.raises(ChannelClosed, match="already closed"):
            shell.run("true", timeout=5)
        with pytest.raises(ChannelClosed, match="closed"):
            shell.wait_ready(Deadline.after(1))


def test_interact_forwards_lines_and_shows_the_answers(pair: tuple[Shell, Guest]) -> None:
    shell, guest = pair

    def fake_guest() -> None:
        line = guest.read_line()
        guest.sock.sendall(f"got: {line}\n".encode())

    out = io.StringIO()
    with guest_thread(fake_guest):
        shell.interact(io.StringIO("hello\n"), out)
    assert out.getvalue() == "got: hello\n"
