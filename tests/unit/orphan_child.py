"""The harness side of the orphan tests, run as its own process: start a machine through the
machine layer (harness.launch.start_machine -> QemuMachine.start), say where its files are,
then wait for the guest as a scenario does, until the test kills or interrupts this process.

Usage: python orphan_child.py RUN_DIR KERNEL INITRD [--no-finally]

--no-finally waits outside any try/finally, as if the Ctrl-C landed between start() and the
caller's try: the machine layer's exit handler must still stop the machine.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys
from pathlib import Path

from harness.launch import Images, start_machine
from harness.machine.qemu import QemuConfig


def main(run_dir: Path, kernel: Path, initrd: Path, with_finally: bool) -> int:
    # As in a terminal: Ctrl-C raises KeyboardInterrupt. A background job of a non-interactive
    # shell inherits SIGINT ignored, and Python then installs no handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks where a stuck child is
    images = Images(kernel, initrd, None, "orphan test kernel")
    machine = start_machine(images, QemuConfig(cpus=1, memory="256M"), run_dir)
    print(json.dumps({"qemu_pid": machine._proc.pid if machine._proc else None}), flush=True)
    if not with_finally:
        machine.wait_ready(3600)
        return 0
    try:
        # The guest never gets ready: the signal lands in the harness's wait, as Ctrl-C does
        # during a real boot (tdxh boot and the pytest fixtures stop the machine the same way).
        machine.wait_ready(3600)
    finally:
        machine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), "--no-finally" not in sys.argv[4:]))
