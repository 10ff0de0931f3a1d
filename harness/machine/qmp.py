"""QMP, kept apart from the machine lifecycle: a small synchronous client over qemu.qmp with a
timeout on every command, and the commands the scenarios use (status, power, MCE injection)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from harness.deadline import Deadline
from harness.machine.base import MachineError

log = logging.getLogger("harness.machine.qmp")


class QmpError(MachineError):
    """A QMP command failed: what was sent and what came back."""


class Qmp:
    def __init__(self, path: Path, deadline: Deadline) -> None:
        self.path = path
        self._qmp = QEMUMonitorProtocol(str(path))
        while True:
            try:
                self._qmp.connect(negotiate=True)
                break
            except (OSError, QMPError) as err:
                if deadline.expired():
                    raise QmpError(f"cannot connect to QMP at {path} within {deadline.seconds:.0f}s: {err}") from err
                time.sleep(min(0.1, deadline.remaining()))  # QEMU creates the socket shortly after start

    def command(self, name: str, timeout: float = 10.0, **args: Any) -> Any:
        self._qmp.settimeout(timeout)
        log.debug("QMP -> %s %s", name, args)
        try:
            reply = self._qmp.cmd_obj({"execute": name, "arguments": args} if args else {"execute": name})
        except (OSError, QMPError) as err:
            raise QmpError(f"QMP {name} {args} failed: {err}") from err
        if "error" in reply:
            raise QmpError(f"QMP {name} {args} -> {reply['error']}")
        return reply.get("return")

    def hmp(self, command_line: str, timeout: float = 10.0) -> str:
        return str(self.command("human-monitor-command", timeout, **{"command-line": command_line}))

    def status(self) -> str:
        return str(self.command("query-status")["status"])

    def close(self) -> None:
        self._qmp.close()
