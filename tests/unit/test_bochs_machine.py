"""Bochs machine pieces that need no emulator: the COM2 bridge between Bochs's TCP client and the
module server's Unix socket, and reading why Bochs ended from its log."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from harness.machine.base import Boot
from harness.machine.bochs import BochsConfig, BochsMachine, _ModuleBridge
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig

TIMEOUT = 10.0


@pytest.fixture
def unix_server(tmp_path: Path):
    """A Unix listener standing in for the module server; yields (path, accepted connections)."""
    path = tmp_path / "seam"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    yield path, listener
    listener.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "peer closed early"
        data += chunk
    return data


def test_bridge_carries_both_directions_and_passes_eof(unix_server):
    path, listener = unix_server
    bridge = _ModuleBridge(path)
    try:
        guest = socket.create_connection(("127.0.0.1", bridge.port), timeout=TIMEOUT)
        module, _ = listener.accept()
        module.settimeout(TIMEOUT)
        guest.sendall(b"TX-call")
        assert _recv_exactly(module, 7) == b"TX-call"
        big = bytes(range(256)) * 64  # a MEM_DATA-sized answer
        module.sendall(big)
        assert _recv_exactly(guest, len(big)) == big
        guest.close()  # Bochs exits: the module side sees EOF
        assert module.recv(16) == b""
        module.close()
    finally:
        bridge.close()


def test_bridge_close_without_a_guest_returns_promptly(unix_server):
    path, _ = unix_server
    bridge = _ModuleBridge(path)
    done = threading.Event()
    threading.Thread(target=lambda: (bridge.close(), done.set()), daemon=True).start()
    assert done.wait(TIMEOUT)


def _machine(tmp_path: Path) -> BochsMachine:
    module = TdxModule(PlatformConfig())
    return BochsMachine(BochsConfig(), Boot(tmp_path / "bz", tmp_path / "initrd"), module, tmp_path / "run",
                        cache=tmp_path / "cache")


@pytest.mark.parametrize(("log", "reason"), [
    ("00542160480p[ACPI  ] >>PANIC<< ACPI control: soft power off\n", "power-off"),
    ("00100000000p[CPU0  ] >>PANIC<< exception(): 3rd (13) exception with no resolution\n", "reboot"),
    ("00000000000p[MEM0  ] >>PANIC<< ROM: couldn't open ROM image file '/x'.\n",
     "panic: ROM: couldn't open ROM image file '/x'."),
    ("00000000000i[SIM   ] quit_sim called with exit code 1\n", None),
])
def test_exit_reason_from_the_bochs_log(tmp_path, log, reason):
    machine = _machine(tmp_path)
    machine.bochs_log.write_text("00000000000i[      ] something\n" + log)
    assert machine.exit_reason() == reason


def test_exit_reason_without_a_log(tmp_path):
    assert _machine(tmp_path).exit_reason() is None
