"""A machine reached over SSH: a real TDX host (``--target ssh://user@host[:port]``), or, in this
harness's own tests, a QEMU guest running dropbear. Commands run over exec channels with a
deadline each, files are copied over SFTP. There is no software module, fault plan or console
here: scenarios on a target only observe what the host's kernel did (tests/target/)."""

from __future__ import annotations

import logging
import re
import shlex
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import paramiko

from harness.deadline import WAIT_SLICE, Deadline
from harness.machine.base import MachineError
from harness.machine.shell import CommandResult

log = logging.getLogger("harness.machine.ssh")

CONNECT_TIMEOUT = 30.0
SFTP_TIMEOUT = 120.0  # a copy and the SFTP server's exit
# dropbear 2022.82 to 2024.85 (Debian 12: 2022.83) closes a new session channel that has no process
# yet if a signal wakes its main loop before the exec request comes (mkj/dropbear#173; fixed in
# 2024.86, #326); an exec request that still reaches that channel starts the command, and its
# output then ends the whole connection (dropbear asserts, #321). A child's exit (SIGCHLD) is
# such a signal: put() waits until the SFTP server has exited. A channel closed before the exec
# request went out is replaced by a new one, this often at most.
EXEC_ATTEMPTS = 3
_URL = re.compile(r"ssh://(?:(?P<user>[^@/:]+)@)?(?P<host>[^@/:]+)(?::(?P<port>\d+))?/?")


class SshError(MachineError):
    """The target cannot be reached, refused the login, or a command outlived its deadline."""


@dataclass(frozen=True)
class SshTarget:
    host: str
    user: str = "root"
    port: int = 22
    key: Path | None = None  # a private key file; else the SSH agent and ~/.ssh keys

    @classmethod
    def parse(cls, url: str, key: Path | None = None) -> SshTarget:
        match = _URL.fullmatch(url)
        if match is None:
            raise ValueError(f"not an SSH target: {url!r} (expected ssh://user@host[:port])")
        return cls(match["host"], match["user"] or "root", int(match["port"] or 22), key)

    def __str__(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"


class _LogUnknownHostKey(paramiko.MissingHostKeyPolicy):
    """A lab host's key is often not in known_hosts (and the test server's is new each boot):
    accepted, with a warning in the log, never silently."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        log.warning("accepting the unknown %s host key of %s (fingerprint %s): add it to known_hosts to pin it",
                    key.get_name(), hostname, key.fingerprint)


class SshMachine:
    """A connected target: ``run`` as the console-backed machines offer it, ``put`` for files."""

    def __init__(self, target: SshTarget, timeout: float = CONNECT_TIMEOUT) -> None:
        self.target = target
        self._client = paramiko.SSHClient()
        self._client.load_system_host_keys()
        self._client.set_missing_host_key_policy(_LogUnknownHostKey())
        try:
            self._client.connect(target.host, target.port, username=target.user,
                                 key_filename=str(target.key) if target.key else None,
                                 look_for_keys=target.key is None, allow_agent=target.key is None,
                                 timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
        except (paramiko.SSHException, OSError) as err:
            raise SshError(f"cannot log in to {target}: {err}") from err
        log.info("connected to %s", target)

    def run(self, cmd: str, timeout: float) -> CommandResult:
        """Run ``cmd`` by the target's shell; output is stdout and stderr as they came."""
        deadline = Deadline.after(timeout)
        log.info("%s$ %s", self.target, cmd)
        try:
            channel = self._start(f"`{cmd}`", partial(_exec_request, cmd=cmd), deadline)
            channel.settimeout(WAIT_SLICE)  # recv() returns to Python code each slice (see _recv)
            with _closed_at(channel, deadline):
                chunks = []
                while data := _recv(channel, deadline):
                    chunks.append(data)
                status = _exit_status(channel, deadline)
        except TimeoutError as err:
            raise SshError(f"`{cmd}` on {self.target} did not finish within {timeout:.0f}s") from err
        except (paramiko.SSHException, EOFError, OSError) as err:
            raise SshError(f"`{cmd}` on {self.target} failed: {err}") from err
        return CommandResult(status, b"".join(chunks).decode(errors="replace"))

    def put(self, local: Path, remote: str, mode: int = 0o755) -> None:
        """Copy ``local`` to ``remote`` over SFTP. Returns once the target's SFTP server has
        exited, so that its exit cannot close the next command's channel (EXEC_ATTEMPTS)."""
        log.info("sftp %s -> %s:%s", local, self.target, remote)
        deadline = Deadline.after(SFTP_TIMEOUT)
        try:
            channel = self._start("the SFTP server", lambda channel: channel.invoke_subsystem("sftp"), deadline)
            with _closed_at(channel, deadline), paramiko.SFTPClient(channel) as sftp:
                sftp.put(str(local), remote)
                sftp.chmod(remote, mode)
                channel.shutdown_write()  # EOF: the SFTP server exits
                _exit_status(channel, deadline)
        except TimeoutError as err:
            raise SshError(f"copying {local} to {self.target}:{remote} and the SFTP server's exit took "
                           f"over {SFTP_TIMEOUT:.0f}s") from err
        except (paramiko.SSHException, EOFError, OSError) as err:
            raise SshError(f"cannot copy {local} to {self.target}:{remote}: {err}") from err

    def _start(self, what: str, request: Callable[[paramiko.Channel], None], deadline: Deadline) -> paramiko.Channel:
        """A new session channel on which ``request`` (exec, subsystem) was accepted. One the server
        closed before the request went out is replaced (EXEC_ATTEMPTS); one it closed after is
        an error: ``what`` may have started."""
        for attempt in range(1, EXEC_ATTEMPTS + 1):
            channel = self._open_session(deadline)
            if channel is not None and not channel.closed:
                try:
                    with _closed_at(channel, deadline):
                        request(channel)
                except paramiko.SSHException as err:
                    if channel.closed:
                        raise SshError(f"{self.target} closed the channel of {what} as it was requested ({err}): "
                                       "it may have started; a dropbear before 2024.86 does so "
                                       "(mkj/dropbear#173)") from err
                    raise
                return channel
            log.warning("%s closed a new channel before %s was requested (attempt %d of %d; a dropbear race, "
                        "mkj/dropbear#173): again on a new channel", self.target, what, attempt, EXEC_ATTEMPTS)
        raise SshError(f"{self.target} closed {EXEC_ATTEMPTS} new channels in a row before {what} was requested")

    def _open_session(self, deadline: Deadline) -> paramiko.Channel | None:
        """A new session channel; None if the server closed it before open_session() took it
        (paramiko then raises a bare SSHException, "Unable to open channel.", on a live
        connection; a refused open raises ChannelException, a timeout comes past the deadline)."""
        transport = self._transport()
        try:
            return transport.open_session(timeout=deadline.remaining())
        except paramiko.ChannelException:
            raise
        except paramiko.SSHException:
            if deadline.expired() or not transport.is_active():
                raise
            return None

    def remove(self, remote: str) -> None:
        self.run(f"rm -f {shlex.quote(remote)}", CONNECT_TIMEOUT)

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SshError(f"the connection to {self.target} is gone")
        return transport

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SshMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recv(channel: paramiko.Channel, deadline: Deadline) -> bytes:
    """The next output of ``channel`` (b"" at its end); waits in slices (deadline.WAIT_SLICE)
    until ``deadline``, then raises TimeoutError."""
    while True:
        try:
            return channel.recv(65536)
        except TimeoutError:
            if deadline.expired():
                raise


@contextmanager
def _closed_at(channel: paramiko.Channel, deadline: Deadline) -> Iterator[None]:
    """Bounds paramiko's own waits on ``channel`` (a request's answer, an SFTP reply: no end):
    the channel is closed at ``deadline``, which ends them; TimeoutError then."""
    fired = threading.Event()

    def close() -> None:
        fired.set()
        channel.close()

    timer = threading.Timer(deadline.remaining(), close)
    timer.daemon = True
    timer.start()
    try:
        yield
    except (paramiko.SSHException, EOFError, OSError) as err:
        if fired.is_set():
            raise TimeoutError from err
        raise
    finally:
        timer.cancel()
    if fired.is_set():  # a closed channel's output ends; its status is -1: not a result
        raise TimeoutError


def _exec_request(channel: paramiko.Channel, cmd: str) -> None:
    channel.set_combine_stderr(True)
    channel.exec_command(cmd)


def _exit_status(channel: paramiko.Channel, deadline: Deadline) -> int:
    """The exit status of ``channel``'s command (-1 if the server closed the channel without
    one), awaited in slices until ``deadline``, then TimeoutError. Not recv_exit_status(): it
    waits with no end."""
    while not channel.status_event.wait(deadline.slice()):
        if deadline.expired():
            raise TimeoutError
    return int(channel.exit_status)
