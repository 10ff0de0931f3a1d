"""The ``--target ssh://`` scenarios (tests/target/) against an SSH server this test starts:
dropbear in a guest of the harness, its port 22 forwarded to 127.0.0.1. That guest's kernel
initialized TDX (with the software module), so the observation-only checks must pass there;
KVM cannot run under TCG, so the KVM ones must skip, saying why."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paramiko
import pytest

from harness.machine.base import Machine
from harness.machine.qemu import QemuConfig
from harness.machine.ssh import SshError, SshMachine, SshTarget
from harness.paths import REPO

pytestmark = pytest.mark.vm

TIMEOUT = 120.0
DROPBEAR_LOG = "/tmp/dropbear.log"  # where images/initramfs/init sends dropbear's log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def dropbear_log_on_failure(machine: Machine) -> Iterator[None]:
    """An SSH failure also shows what dropbear logged in the guest (read over the command channel)."""
    try:
        yield
    except SshError as err:
        dropbear = machine.run(f"cat {DROPBEAR_LOG}", TIMEOUT).output
        raise SshError(f"{err}\n--- {DROPBEAR_LOG} in the guest:\n{dropbear}") from err


def test_target_scenarios_pass_against_a_guest_over_ssh(boot, tmp_path: Path, caplog):
    # paramiko's transport log, in the report on failure: it shows which channel the server
    # opened and closed, and when (dropbear's early close, ssh.EXEC_ATTEMPTS).
    caplog.set_level(logging.DEBUG, logger="paramiko")
    key, key_file = paramiko.ECDSAKey.generate(), tmp_path / "id_ecdsa"
    key.write_private_key_file(str(key_file))
    port = free_port()
    machine = boot(QemuConfig(ssh_port=port), append=f"tdxh.ssh_key={key.get_name()},{key.get_base64()}")
    release = machine.run("uname -r", TIMEOUT).output.strip()

    target = SshTarget.parse(f"ssh://root@127.0.0.1:{port}", key_file)
    with SshMachine(target) as ssh, dropbear_log_on_failure(machine):
        assert ssh.run("uname -r", TIMEOUT).output.strip() == release
        assert ssh.run("exit 3", TIMEOUT).status == 3
        payload = tmp_path / "payload"
        payload.write_bytes(bytes(range(256)) * 64)
        ssh.put(payload, "/tmp/payload", mode=0o600)  # over SFTP
        assert ssh.run("md5sum /tmp/payload", TIMEOUT).output.split()[0] == \
            subprocess.run(["md5sum", str(payload)], capture_output=True, text=True, check=True).stdout.split()[0]
    with pytest.raises(SshError, match="cannot log in"):
        SshMachine(SshTarget("127.0.0.1", "root", port, tmp_path / "no-such-key"), timeout=10)

    command = [sys.executable, "-m", "pytest", "-q", "-n0", "-rs", "tests/target", "--target", str(target),
               "--target-key", str(key_file)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-4000:]
    assert summary.startswith("3 passed, 2 skipped"), result.stdout[-2000:]
    assert re.search(r"SKIPPED \[2\] .*kvm_intel is not loaded on ssh://root@127\.0\.0\.1", result.stdout), \
        result.stdout[-2000:]

