"""A machine reached over SSH: a real TDX host (``--target ssh://user@host[:port]``), or, in this
harness's own tests, a QEMU guest running dropbear. Commands run over exec channels with a
deadline each, files are copied over SFTP. There is no software module, fault plan or console
here: scenarios on a target only observe what the host's kernel did (tests/target/)."""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import paramiko

from harness.deadline import WAIT_SLICE, Deadline
from harness.machine.base import MachineError
from harness.machine.console import CommandResult

log = logging.getLogger("harness.machine.ssh")

CONNECT_TIMEOUT = 30.0
# dropbear since 2022.82 (Debian 12: 2022.83) may close a new session channel that has no process
# yet when another session's process has just ended (mkj/dropbear#173, #258): here, the exec
# right after an SFTP copy. The command never ran then, so it is sent again on a new channel, this often at most.
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
            channel = self._exec(cmd, deadline)
            chunks = []
            while data := _recv(channel, deadline):
                chunks.append(data)
            # Not recv_exit_status(): it waits with no end.
            while not channel.status_event.wait(deadline.slice()):
                if deadline.expired():
                    raise TimeoutError
            status = channel.exit_status
        except TimeoutError as err:
            raise SshError(f"`{cmd}` on {self.target} did not finish within {timeout:.0f}s") from err
        except (paramiko.SSHException, OSError) as err:
            raise SshError(f"`{cmd}` on {self.target} failed: {err}") from err
        return CommandResult(status, b"".join(chunks).decode(errors="replace"))

    def _exec(self, cmd: str, deadline: Deadline) -> paramiko.Channel:
        """A channel running ``cmd``. A channel the server closed before it took the exec request
        (paramiko: "Channel closed." from exec_command) never ran the command: tried again."""
        attempt = 1
        while True:
            channel = self._transport().open_session(timeout=deadline.remaining())
            channel.set_combine_stderr(True)
            channel.settimeout(WAIT_SLICE)  # recv() returns to Python code each slice (see _recv)
            try:
                channel.exec_command(cmd)
                return channel
            except paramiko.SSHException:
                if not channel.closed or attempt >= EXEC_ATTEMPTS:
                    raise
            log.warning("%s closed a new channel before it ran `%s` (attempt %d of %d; a dropbear race, "
                        "mkj/dropbear#173): again on a new channel", self.target, cmd, attempt, EXEC_ATTEMPTS)
            attempt += 1

    def put(self, local: Path, remote: str, mode: int = 0o755) -> None:
        """Copy ``local`` to ``remote`` over SFTP."""
        log.info("sftp %s -> %s:%s", local, self.target, remote)
        try:
            with self._client.open_sftp() as sftp:
                sftp.put(str(local), remote)
                sftp.chmod(remote, mode)
        except (paramiko.SSHException, OSError) as err:
            raise SshError(f"cannot copy {local} to {self.target}:{remote}: {err}") from err

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
