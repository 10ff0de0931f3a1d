"""PAMT accounting on several memory layouts: the KB the kernel prints, the model computed from
the guest's own e820 map and NUMA nodes, and the PAMTs the module received in TDH.SYS.CONFIG
must agree, and so must the TDMRs."""

from __future__ import annotations

import pytest
from checks import kernel_log

from harness.machine.qemu import QemuConfig
from harness.observe import pamt, patterns

LAYOUTS = {
    "q35-2G": (QemuConfig(memory="2G"), ""),
    "q35-4G": (QemuConfig(memory="4G"), ""),
    "q35-8G": (QemuConfig(memory="8G"), ""),
    "pc-4G": (QemuConfig(machine="pc", memory="4G"), ""),
    "numa-1G-3G": (QemuConfig(cpus=2, numa=("1G", "3G")), ""),
    "numa-512M-1536M-2G": (QemuConfig(cpus=3, numa=("512M", "1536M", "2G")), ""),
    "memmap-hole": (QemuConfig(memory="2G"), "memmap=256M$0x40000000"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pamt_accounting(boot, layout):
    config, append = LAYOUTS[layout]
    machine = boot(config, append=append)
    log = kernel_log(machine)
    printed_kb = int(log.expect(patterns.PAMT_ALLOCATED)["kb"])
    log.expect(patterns.INITIALIZED)

    text = "\n".join(record.text for record in log.records)
    model = pamt.model(pamt.parse_e820(text), pamt.parse_numa_boundaries(text),
                       machine.module.platform.pamt_entry_sizes)
    received = [t.info for t in machine.module.state.tdmrs]
    received_kb = sum(t.pamt_4k_size + t.pamt_2m_size + t.pamt_1g_size for t in received) // 1024
    assert printed_kb == model.pamt_kb == received_kb, (
        f"{layout}: kernel printed {printed_kb} KB, model {model.pamt_kb} KB, module received {received_kb} KB")
    assert [(t.base, t.size) for t in received] == [(t.base, t.size) for t in model.tdmrs]
    assert [(t.pamt_4k_size, t.pamt_2m_size, t.pamt_1g_size) for t in received] == list(model.pamt_sizes)
