"""The console keeps every byte while the harness's reader is held up (as on a loaded host): the
kernel records written meanwhile all arrive whole, and so does the command's output on its own
channel. Over a Unix socket the console lost ~20 bytes per stall (the UART stopped, the
kernel's console gave up waiting and overwrote its FIFO: see qemu_command)."""

from __future__ import annotations

import threading
import time

from harness.machine.console import Console
from harness.machine.qemu import QemuConfig

STALL_SECONDS = 2.0
SHELL_LINES = 4000
KERNEL_RECORDS = 200


def test_a_stalled_console_reader_loses_nothing(boot, monkeypatch):
    machine = boot(QemuConfig(), reuse=True)
    stall = threading.Event()
    absorb = Console._absorb

    def held_up(self: Console, chunk: bytes, final: bool = False) -> None:
        if chunk and stall.is_set():
            stall.clear()
            time.sleep(STALL_SECONDS)
        absorb(self, chunk, final)

    monkeypatch.setattr(Console, "_absorb", held_up)
    stall.set()
    result = machine.run(f"(for i in $(seq {KERNEL_RECORDS}); do echo tdxh-stall-$i > /dev/kmsg; done) & "
                         f"seq {SHELL_LINES}; wait", 120)
    assert result.status == 0
    assert result.output.split() == [str(n) for n in range(1, SHELL_LINES + 1)]
    machine.sync_console(120)
    records = [line for line in machine.console_lines() if "tdxh-stall-" in line]
    assert [line.rsplit("tdxh-stall-", 1)[1] for line in records] == [str(n) for n in range(1, KERNEL_RECORDS + 1)]
