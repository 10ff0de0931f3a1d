"""The Bochs backend: the patched kernel boots under Bochs (emulated VMX) with the software module
on COM2 and initializes TDX the way it does under QEMU; the VMX the KVM scenarios need is there.

Skipped when Bochs cannot be fetched or run here (the reason names what is missing). Under Bochs
the guest runs about an order of magnitude slower than under TCG: deadlines are wall time and
generous; guest time (the shim's timeout) runs at its own pace.
"""

from __future__ import annotations

import pytest
from checks import assert_init_sequence, assert_kvm_refused_tdx, kernel_log, kvm_takes_tdx, model_from_log

from harness.machine.bochs import BochsConfig
from harness.observe import patterns
from harness.observe.kvm import LOAD_KVM_INTEL
from harness.seam.abi import Field, Leaf

pytestmark = [pytest.mark.vm, pytest.mark.bochs, pytest.mark.slow]

COMMAND_TIMEOUT = 300.0
POWER_OFF_TIMEOUT = 300.0

def test_bochs_boot_initializes_tdx(bochs_boot):
    machine = bochs_boot(BochsConfig())
    platform = machine.module.platform
    log = kernel_log(machine)
    found = log.expect_in_order([patterns.BIOS_ENABLED, patterns.MODULE_VERSION, patterns.PAMT_ALLOCATED,
                                 patterns.INITIALIZED])
    # The e820 map Bochs's BIOS gave the guest is the layout the module's CMRs were built from.
    printed_kb = int(patterns.PAMT_ALLOCATED.search(found[2].text)["kb"])
    received = machine.module.state.tdmrs
    assert printed_kb == model_from_log(log).pamt_kb
    assert [(t.info.base, t.info.size) for t in received] == [(t.base, t.size) for t in model_from_log(log).tdmrs]
    assert_init_sequence(machine.module.trace.records, [c.apic_id for c in platform.cpus],
                         {c.apic_id: c.package for c in platform.cpus})
    log.expect_absent(patterns.SEAMCALL_FAILED)
    # The CPU model gives the guest VMX with EPT and MOVDIR64B (so setcpuid is not needed).
    flags = machine.run("grep -m1 '^flags' /proc/cpuinfo", COMMAND_TIMEOUT).output.split()
    assert {"vmx", "ept", "movdir64b"} <= set(flags)
    assert machine.power_off(POWER_OFF_TIMEOUT) == 0


def test_bochs_two_cpus_lp_init_on_each(bochs_boot):
    """SMP under Bochs: LP.INIT on both CPUs (APIC ids 0 and 1, as the module's platform says).
    Only the trace is checked: with two CPUs Bochs's idle time crawls (a halted CPU advances the
    clock one quantum per round), and reading the whole kernel log over the command channel takes
    20-35 s instead of 3 s."""
    machine = bochs_boot(BochsConfig(cpus=2))
    platform = machine.module.platform
    assert [c.apic_id for c in platform.cpus] == [0, 1]
    assert_init_sequence(machine.module.trace.records, [0, 1], {0: 0, 1: 0})
    assert machine.run("cat /sys/devices/system/cpu/online", COMMAND_TIMEOUT).output.strip() == "0-1"
    assert machine.power_off(POWER_OFF_TIMEOUT) == 0


# What KVM's TDX setup relies on the core having read from the module at boot (tdx_get_sysinfo).
TD_FIELDS = (Field.TDR_BASE_SIZE, Field.TDCS_BASE_SIZE, Field.TDVPS_BASE_SIZE, Field.ATTRIBUTES_FIXED0,
             Field.ATTRIBUTES_FIXED1, Field.XFAM_FIXED0, Field.XFAM_FIXED1, Field.NUM_CPUID_CONFIG,
             Field.MAX_VCPUS_PER_TD)


@pytest.mark.vmx
def test_bochs_kvm_intel_loads_with_tdx(bochs_boot):
    """kvm_intel loads on Bochs's emulated VMX with tdx=1 on top of the initialized module (and
    fails to, as the kernel does, on a module release KVM cannot use)."""
    machine = bochs_boot(BochsConfig())
    kernel_log(machine).expect(patterns.INITIALIZED)
    read = {r.inputs["rdx"] for r in machine.module.trace.records if r.number == Leaf.TDH_SYS_RD}
    assert {int(f) for f in TD_FIELDS} <= read
    before = len(machine.module.trace)
    result = machine.run(LOAD_KVM_INTEL, COMMAND_TIMEOUT)
    if not kvm_takes_tdx(machine.module.platform):
        assert_kvm_refused_tdx(machine, result)
        return
    assert result.status == 0, result.output
    assert machine.run("cat /sys/module/kvm_intel/parameters/tdx", COMMAND_TIMEOUT).output.strip() == "Y"
    # Linux 7.3's KVM takes the module's metadata from the boot-time read: loading it issues no
    # SEAMCALL of its own on a one-CPU machine (LP.INIT was done at boot). Whatever it issues
    # must succeed.
    failed = [(r.leaf, r.status_name) for r in machine.module.trace.records[before:] if r.status]
    assert not failed, f"SEAMCALLs from kvm_intel failed: {failed}"
    kernel_log(machine).expect_absent(patterns.SEAMCALL_FAILED)
    assert machine.power_off(POWER_OFF_TIMEOUT) == 0
