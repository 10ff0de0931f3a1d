"""SSH target URLs (--target) and the exec retry on a channel the server closed early, without a
server (fake paramiko transport and channels)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import paramiko
import pytest

from harness.machine.ssh import EXEC_ATTEMPTS, SshError, SshMachine, SshTarget


def test_target_urls():
    assert SshTarget.parse("ssh://me@host.example:2222") == SshTarget("host.example", "me", 2222)
    assert str(SshTarget.parse("ssh://10.0.0.7")) == "ssh://root@10.0.0.7:22"
    for bad in ("http://host", "ssh://", "ssh://a@b@c", "ssh://host:port"):
        with pytest.raises(ValueError, match="expected ssh://user@host"):
            SshTarget.parse(bad)


@dataclass
class FakeChannel:
    """``closes``: the server closes the channel before it takes the exec request (dropbear's
    race); ``refuses``: it answers the request with a failure, the channel stays open."""
    closes: bool = False
    refuses: bool = False
    closed: bool = False
    ran: list[str] = field(default_factory=list)
    output: list[bytes] = field(default_factory=lambda: [b"ok\n"])
    silent: bool = False  # the command never ends: no output
    no_status: bool = False  # its output ends, its exit status never comes

    def set_combine_stderr(self, combine: bool) -> None:
        pass

    def settimeout(self, timeout: float) -> None:
        pass

    def exec_command(self, cmd: str) -> None:
        if self.closes:
            self.closed = True
            raise paramiko.SSHException("Channel closed.")
        if self.refuses:
            raise paramiko.SSHException("Channel request failed")
        self.ran.append(cmd)

    def recv(self, size: int) -> bytes:
        if self.silent:
            time.sleep(0.01)  # a slice of paramiko's channel timeout
            raise TimeoutError
        return self.output.pop(0) if self.output else b""

    @property
    def status_event(self) -> threading.Event:
        done = threading.Event()
        if not (self.silent or self.no_status):
            done.set()
        return done

    exit_status = 0


@dataclass
class FakeTransport:
    channels: list[FakeChannel]
    opened: int = 0

    def is_active(self) -> bool:
        return True

    def open_session(self, timeout: float) -> FakeChannel:
        self.opened += 1
        return self.channels.pop(0)


@dataclass
class FakeClient:
    transport: FakeTransport

    def get_transport(self) -> FakeTransport:
        return self.transport


def connected(channels: list[FakeChannel]) -> tuple[SshMachine, FakeTransport]:
    machine = SshMachine.__new__(SshMachine)  # no connection: the client is the fake
    transport = FakeTransport(channels)
    machine.target, machine._client = SshTarget("target.example"), FakeClient(transport)  # type: ignore[assignment]
    return machine, transport


def test_a_command_whose_channel_the_server_closed_first_runs_on_a_new_one():
    good = FakeChannel()
    machine, transport = connected([FakeChannel(closes=True), good])
    assert machine.run("md5sum /tmp/payload", 10).output == "ok\n"
    assert transport.opened == 2 and good.ran == ["md5sum /tmp/payload"]


def test_the_retry_is_bounded():
    machine, transport = connected([FakeChannel(closes=True) for _ in range(EXEC_ATTEMPTS + 1)])
    with pytest.raises(SshError, match="Channel closed"):
        machine.run("true", 10)
    assert transport.opened == EXEC_ATTEMPTS


def test_a_refused_request_is_not_sent_again():
    machine, transport = connected([FakeChannel(refuses=True), FakeChannel()])
    with pytest.raises(SshError, match="request failed"):
        machine.run("true", 10)
    assert transport.opened == 1


@pytest.mark.parametrize("channel", [FakeChannel(silent=True), FakeChannel(no_status=True)],
                         ids=["no_output", "no_exit_status"])
def test_a_command_that_never_ends_times_out(channel: FakeChannel):
    """Output and exit status are awaited in slices; the command's own deadline ends the wait."""
    machine, _ = connected([channel])
    started = time.monotonic()
    with pytest.raises(SshError, match="did not finish within"):
        machine.run("sleep 1000", timeout=0.3)
    assert time.monotonic() - started >= 0.3
