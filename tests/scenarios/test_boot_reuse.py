"""Boot reuse: ``boot(..., reuse=True)`` saves the first ready machine of a configuration (QEMU
migration to a file, the module's snapshot beside it) and resumes it for the next scenario that
asks for the same configuration. The resumed machine must be the booted one: same module state
and trace, same kernel, and it goes on issuing SEAMCALLs that the restored module answers."""

from __future__ import annotations

from checks import kernel_log

from harness.machine.qemu import QemuConfig
from harness.observe import patterns
from harness.seam.abi import Leaf

REBOOT_TIMEOUT = 300.0


def test_a_resumed_machine_is_the_saved_one_and_keeps_talking_to_its_module(boot):
    booted = boot(QemuConfig(), reuse=True)
    saved_records, saved_state = list(booted.module.trace.records), booted.module.state
    resumed = boot(QemuConfig(), reuse=True)
    assert (resumed.run_dir / "console.boot.log").is_file(), "a resumed machine has no boot console"
    assert booted.run_dir != resumed.run_dir and resumed.module is not booted.module
    assert resumed.module.trace.records == saved_records
    assert (resumed.module.state.sys, resumed.module.state.tdmrs, resumed.module.state.lp_initialized) == \
        (saved_state.sys, saved_state.tdmrs, saved_state.lp_initialized)
    assert resumed.run("uname -r", 30).output.strip() == booted.run("uname -r", 30).output.strip()
    kernel_log(resumed).expect_in_order([patterns.PAMT_ALLOCATED, patterns.INITIALIZED])  # its boot, from kmsg

    # The resumed kernel reboots through TDH.SYS.DISABLE, and the next one initializes the module.
    start = len(resumed.module.trace)
    resumed.reboot(REBOOT_TIMEOUT)
    leaves = [r.number for r in resumed.module.trace.records[start:]]
    assert leaves[0] == Leaf.TDH_SYS_DISABLE and Leaf.TDH_SYS_TDMR_INIT in leaves
    assert leaves.index(Leaf.TDH_SYS_INIT) > 0
    kernel_log(resumed).expect(patterns.INITIALIZED)
    assert booted.module.trace.records == saved_records, "the first machine's module saw the second's calls"
