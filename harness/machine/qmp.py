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

    def wait_event(self, name: str, deadline: Deadline) -> dict[str, Any]:
        """The next event called ``name`` (events before it are logged and dropped)."""
        while True:
            if deadline.expired():
                raise QmpError(f"no QMP event {name} within {deadline.seconds:.0f}s")
            try:
                event = self._qmp.pull_event(wait=deadline.slice())
            except TimeoutError:
                continue
            if event is None:  # a slice of 0 s does not wait
                continue
            log.debug("QMP event %s", event)
            if event.get("event") == name:
                return dict(event)

    def clear_events(self) -> None:
        self._qmp.clear_events()

    def wait_status(self, deadline: Deadline, *statuses: str) -> str:
        """Poll query-status until QEMU's run state is one of ``statuses``; returns it."""
        seen = self.status()
        while seen not in statuses:
            if deadline.expired():
                raise QmpError(f"QEMU run state still {seen!r}, expected one of {statuses} within "
                               f"{deadline.seconds:.0f}s")
            time.sleep(0.05)
            seen = self.status()
        return seen

    def add_dimm(self, name: str, size: int) -> int:
        """Hot-plug a DIMM of ``size`` bytes backed by anonymous RAM; returns its guest
        physical address (QEMU places it in the hotplug area above RAM)."""
        backend: dict[str, Any] = {"qom-type": "memory-backend-ram", "id": f"{name}-ram", "size": size}
        self.command("object-add", **backend)
        self.command("device_add", driver="pc-dimm", id=name, memdev=f"{name}-ram")
        for device in self.command("query-memory-devices"):
            if device.get("data", {}).get("id") == name:
                return int(device["data"]["addr"])
        raise QmpError(f"DIMM {name} was added but query-memory-devices does not list it")

    def close(self) -> None:
        try:
            self._qmp.close()
        except (EOFError, OSError, QMPError) as err:
            # QEMU already ended the connection (it exited: shutdown, -no-reboot after a panic);
            # qemu.qmp re-raises that on disconnect. Nothing is left to close.
            log.debug("QMP at %s was already closed by QEMU: %r", self.path, err)
