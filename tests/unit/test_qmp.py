"""The QMP client against a stand-in QEMU monitor on a Unix socket."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from harness.deadline import Deadline
from harness.machine.qmp import Qmp, QmpError

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}


def read_object(conn: socket.socket) -> dict[str, object]:
    """One JSON object from the client (QMP messages need not end with a newline)."""
    data = b""
    while True:
        chunk = conn.recv(4096)
        assert chunk, f"the client closed after {data!r}"
        data += chunk
        try:
            return json.loads(data)
        except ValueError:
            continue


def monitor_that_exits(path: Path, exit_now: threading.Event) -> threading.Thread:
    """Greets, accepts qmp_capabilities, then ends the connection on ``exit_now``: QEMU exiting
    (shutdown, a fatal machine check) while the harness still holds its monitor."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        with server, server.accept()[0] as conn:
            conn.sendall(json.dumps(GREETING).encode() + b"\n")
            assert read_object(conn)["execute"] == "qmp_capabilities"
            conn.sendall(b'{"return": {}}\n')
            exit_now.wait(10)

    thread = threading.Thread(target=serve, daemon=True)  # the test's deadline ends it
    thread.start()
    return thread


def test_close_after_qemu_exited_does_not_raise(tmp_path):
    exit_now = threading.Event()
    thread = monitor_that_exits(tmp_path / "qmp", exit_now)
    qmp = Qmp(tmp_path / "qmp", Deadline.after(10))
    exit_now.set()
    thread.join(10)
    with pytest.raises(QmpError, match="query-status"):  # the harness learns QEMU is gone
        qmp.status()
    qmp.close()  # the connection ended with EOF: nothing left to close (the stop path goes on)
