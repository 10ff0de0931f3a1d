"""A guest that stops answering is reported with what QEMU knows of its CPUs (hang.txt in the
run directory, named in the error), so a hang can be told from a slow guest after the fact."""

from __future__ import annotations

import pytest

from harness.machine.channel import ChannelTimeout
from harness.machine.qemu import QemuConfig


def test_a_guest_that_does_not_answer_leaves_its_cpu_state(boot):
    machine = boot(QemuConfig(), reuse=True)
    with pytest.raises(ChannelTimeout) as caught:
        machine.run("sleep 30", 1.0)  # a shell busy past the deadline stands in for a hung guest
    report = machine.run_dir / "hang.txt"
    assert f"guest state at the timeout: {report}" in getattr(caught.value, "__notes__", [])
    text = report.read_text()
    assert "QEMU run state: running" in text
    assert text.count("RIP=") == machine.config.cpus, "one register dump per vCPU"
    assert "SEAMCALLs answered: " in text and "TDH.SYS" in text
