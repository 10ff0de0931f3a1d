"""Host events while a TD runs, through KVM's real exit handling (arch/x86/kvm/vmx/tdx.c,
Linux 7.3): an external interrupt and an NMI end the TDH.VP.ENTER as ordinary TD exits; KVM runs
the host's handler (vmx_handle_exit_irqoff() for the interrupt, vmx_handle_nmi() from
tdx_vcpu_enter_exit() for the NMI) and enters the TD again without going to userspace
(__tdx_handle_exit(): EXTERNAL_INTERRUPT counts an irq exit and returns 1,
tdx_handle_exception_nmi() returns 1 for an NMI).
"""

from __future__ import annotations

import pytest
from checks import KVM_TIMEOUT, assert_no_td_left, kernel_log, kvm_machine, records_since, vp_entries

from harness.observe import patterns
from harness.observe.kvm import FINALIZED, KVM_EXIT_IO, KVM_EXIT_SYSTEM_EVENT, run_agent
from harness.seam import abi, exits

pytestmark = [pytest.mark.vm, pytest.mark.vmx]

# arch/x86/include/asm/irq_vectors.h: an IPI whose handler only marks the CPU for rescheduling,
# so the host's run of it changes nothing the scenario depends on.
RESCHEDULE_VECTOR = 0xFD


def test_kvm_host_interrupt_and_nmi_reenter_the_td_without_userspace(vmx_boot):
    machine = kvm_machine(vmx_boot)
    machine.module.exits.add(exits.external_interrupt(RESCHEDULE_VECTOR), exits.nmi(),
                             exits.io(0x80, 1, write=True, value=1))
    start = len(machine.module.trace)
    run = run_agent(machine, [*FINALIZED, "run", "run", "destroy"], KVM_TIMEOUT)
    assert not run.failed(), run.failed()
    port, fatal = run.all("run")
    assert (port.outputs["exit_reason"], fatal.outputs["exit_reason"]) == (KVM_EXIT_IO, KVM_EXIT_SYSTEM_EVENT), \
        f"the first KVM_RUN must come back at the port write, after both events: {port}"
    entries = vp_entries(records_since(machine, start))
    assert [r.status for r in entries] == [abi.ExitReason.EXTERNAL_INTERRUPT, abi.ExitReason.EXCEPTION_NMI,
                                           abi.ExitReason.TDCALL, abi.ExitReason.TDCALL], \
        [hex(r.status) for r in entries]
    # The NMI came from nowhere the host knows: its handler says so, once, on the vCPU's CPU.
    log = kernel_log(machine)
    nmis = log.matches(patterns.UNKNOWN_NMI)
    assert [int(m["cpu"]) for m in nmis] == [entries[1].cpu], [m.string for m in nmis]
    assert_no_td_left(machine)
