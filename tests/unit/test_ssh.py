"""SSH target URLs (--target); without a server (fake paramiko transport and channels): what
happens to a command whose channel the server closes early (dropbear's race), bounded waits,
and the SFTP copy's wait for the SFTP server's exit."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import paramiko
import pytest

from harness.machine import ssh
from harness.machine.ssh import EXEC_ATTEMPTS, SshError, SshMachine, SshTarget


def test_target_urls():
    assert SshTarget.parse("ssh://me@host.example:2222") == SshTarget("host.example", "me", 2222)
    assert str(SshTarget.parse("ssh://10.0.0.7")) == "ssh://root@10.0.0.7:22"
    for bad in ("http://host", "ssh://", "ssh://a@b@c", "ssh://host:port"):
        with pytest.raises(ValueError, match="expected ssh://user@host"):
            SshTarget.parse(bad)


@dataclass
class FakeChannel:
    """A session channel as the server treats it. ``closed``: the server closed it before the
    request went out (dropbear's race); ``closes``: it closes it as the request is sent;
    ``refuses``: it answers the request with a failure; ``hangs``: it never answers it."""
    closed: bool = False
    closes: bool = False
    refuses: bool = False
    hangs: bool = False
    ran: list[str] = field(default_factory=list)
    output: list[bytes] = field(default_factory=lambda: [b"ok\n"])
    silent: bool = False  # the command never ends: no output
    no_status: bool = False  # its output ends, its exit status never comes
    eof_sent: bool = False
    _closing: threading.Event = field(default_factory=threading.Event)

    def set_combine_stderr(self, combine: bool) -> None:
        pass

    def settimeout(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        self._closing.set()

    def shutdown_write(self) -> None:
        self.eof_sent = True

    def exec_command(self, cmd: str) -> None:
        self._request(cmd)

    def invoke_subsystem(self, name: str) -> None:
        self._request(f"subsystem {name}")

    def _request(self, what: str) -> None:
        if self.closed:  # paramiko's open_only check
            raise paramiko.SSHException("Channel is not open")
        if self.hangs:
            self._closing.wait()  # until the harness closes it
            raise paramiko.SSHException("Channel closed.")
        if self.closes:
            self.closed = True
            raise paramiko.SSHException("Channel closed.")
        if self.refuses:
            raise paramiko.SSHException("Channel request failed")
        self.ran.append(what)

    def recv(self, size: int) -> bytes:
        if self.silent and not self.closed:
            time.sleep(0.01)  # a slice of paramiko's channel timeout
            raise TimeoutError
        return self.output.pop(0) if self.output and not self.closed else b""

    @property
    def status_event(self) -> threading.Event:
        done = threading.Event()
        if self.closed or not (self.silent or self.no_status):
            done.set()
        return done

    @property
    def exit_status(self) -> int:
        return -1 if self.closed else 0


# What paramiko's Transport.open_channel raises (paramiko/transport.py): the server closed the new
# channel before open_session took it from the transport's table; the server refused the open.
CLOSED_BEFORE_TAKEN = paramiko.SSHException("Unable to open channel.")
OPEN_REFUSED = paramiko.ChannelException(1, "Administratively prohibited")


@dataclass
class FakeTransport:
    channels: list[FakeChannel | paramiko.SSHException]  # what each open_session returns or raises
    opened: int = 0

    def is_active(self) -> bool:
        return True

    def open_session(self, timeout: float) -> FakeChannel:
        self.opened += 1
        channel = self.channels.pop(0)
        if isinstance(channel, paramiko.SSHException):
            raise channel
        return channel


@dataclass
class FakeClient:
    transport: FakeTransport

    def get_transport(self) -> FakeTransport:
        return self.transport


def connected(channels: list[FakeChannel | paramiko.SSHException]) -> tuple[SshMachine, FakeTransport]:
    machine = SshMachine.__new__(SshMachine)  # no connection: the client is the fake
    transport = FakeTransport(channels)
    machine.target, machine._client = SshTarget("target.example"), FakeClient(transport)  # type: ignore[assignment]
    return machine, transport


def closed_early() -> list[FakeChannel | paramiko.SSHException]:
    """The two ways the server's close comes before the request went out; in stop 16's CI run,
    dropbear's EOF and CLOSE came right after the open confirmation (the first)."""
    return [CLOSED_BEFORE_TAKEN, FakeChannel(closed=True)]


@pytest.mark.parametrize("early", range(2), ids=["before_open_returned", "before_the_request"])
def test_a_command_whose_channel_the_server_closed_early_runs_on_a_new_one(early: int):
    good = FakeChannel()
    machine, transport = connected([closed_early()[early], good])
    assert machine.run("md5sum /tmp/payload", 10).output == "ok\n"
    assert transport.opened == 2 and good.ran == ["md5sum /tmp/payload"]


def test_the_retry_is_bounded():
    early = (closed_early() * EXEC_ATTEMPTS)[:EXEC_ATTEMPTS]
    machine, transport = connected([*early, FakeChannel()])
    with pytest.raises(SshError, match=f"closed {EXEC_ATTEMPTS} new channels in a row before `true`"):
        machine.run("true", 10)
    assert transport.opened == EXEC_ATTEMPTS


def test_a_channel_closed_as_the_command_was_sent_is_not_run_again():
    """The command may have run (dropbear starts it on a channel it has closed)."""
    machine, transport = connected([FakeChannel(closes=True), FakeChannel()])
    with pytest.raises(SshError, match=r"closed the channel of `touch /tmp/once` as it was requested.*may have"):
        machine.run("touch /tmp/once", 10)
    assert transport.opened == 1


@pytest.mark.parametrize("first", [OPEN_REFUSED, FakeChannel(refuses=True)], ids=["open", "request"])
def test_a_refusal_is_not_tried_again(first: FakeChannel | paramiko.SSHException):
    machine, transport = connected([first, FakeChannel()])
    with pytest.raises(SshError, match=r"Administratively prohibited|request failed"):
        machine.run("true", 10)
    assert transport.opened == 1


@pytest.mark.parametrize("channel", [FakeChannel(silent=True), FakeChannel(no_status=True), FakeChannel(hangs=True)],
                         ids=["no_output", "no_exit_status", "no_answer_to_the_request"])
def test_a_command_that_never_ends_times_out(channel: FakeChannel):
    """Output and exit status are awaited in slices; a request's answer (paramiko waits for it
    with no end) by closing the channel at the deadline; the command's deadline ends each."""
    machine, _ = connected([channel])
    started = time.monotonic()
    with pytest.raises(SshError, match="did not finish within"):
        machine.run("sleep 1000", timeout=0.3)
    assert time.monotonic() - started >= 0.3


@dataclass
class FakeSftp:
    channel: FakeChannel
    copied: list[tuple[str, str, int]] = field(default_factory=list)

    def __enter__(self) -> FakeSftp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def put(self, local: str, remote: str) -> None:
        self.copied.append((local, remote, 0))

    def chmod(self, remote: str, mode: int) -> None:
        self.copied[-1] = (*self.copied[-1][:2], mode)


def test_a_copy_returns_once_the_sftp_server_has_exited(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Its exit (a SIGCHLD in dropbear) must not come as the next command's channel opens."""
    sessions: list[FakeSftp] = []
    monkeypatch.setattr(paramiko, "SFTPClient", lambda channel: sessions.append(FakeSftp(channel)) or sessions[-1])
    channel = FakeChannel()
    machine, _ = connected([CLOSED_BEFORE_TAKEN, channel])
    machine.put(tmp_path / "agent", "/tmp/agent", mode=0o700)
    assert channel.ran == ["subsystem sftp"] and sessions[0].copied == [(str(tmp_path / "agent"), "/tmp/agent", 0o700)]
    assert channel.eof_sent  # the SFTP server's stdin ends: it exits, then the exit status came


def test_a_copy_whose_sftp_server_never_exits_times_out(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setattr(paramiko, "SFTPClient", FakeSftp)
    monkeypatch.setattr(ssh, "SFTP_TIMEOUT", 0.3)
    machine, _ = connected([FakeChannel(no_status=True)])
    with pytest.raises(SshError, match="SFTP server's exit took over 0s"):
        machine.put(tmp_path / "agent", "/tmp/agent")
