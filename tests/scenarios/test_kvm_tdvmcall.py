"""TDVMCALLs from a TD through KVM's real handling (arch/x86/kvm/vmx/tdx.c, Linux 7.3:
handle_tdvmcall() and the instruction exits tdcall_to_vmx_exit_reason() turns them into).

The module returns each scripted TDVMCALL from TDH.VP.ENTER; KVM either answers it in the
kernel and re-enters at once, or exits to userspace (the agent), whose answer it completes on the
next KVM_RUN. What KVM gave the TD is read from the registers of the following TDH.VP.ENTER
(R10 = the TDVMCALL status, R11-R14 = values), what it gave userspace from the agent's line for
that KVM_RUN. The expected values come from KVM's rules (harness/observe/kvm.py, and the
functions named beside each case), never from the output.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import pytest
from checks import KVM_TIMEOUT, assert_no_td_left, kernel_log, kvm_machine, records_since, vp_entries

from harness.observe import patterns
from harness.observe.kvm import (
    FINALIZED,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_HYPERCALL_LONG_MODE,
    KVM_EXIT_IO,
    KVM_EXIT_MMIO,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_TDX,
    KVM_HC_MAP_GPA_RANGE,
    MSR_IA32_CR_PAT_DEFAULT,
    AgentStep,
    map_gpa_exits,
    map_gpa_refusal,
    run_agent,
    shared_bit,
)
from harness.seam import abi, exits
from harness.seam.abi import Tdvmcall
from harness.seam.exits import TdExit

pytestmark = [pytest.mark.vm, pytest.mark.vmx]

GPAW = 48  # the agent's init_vm default
SHARED = shared_bit(GPAW)
# set_cpuid:maxpa: KVM_GET_SUPPORTED_CPUID gives Bochs's MAXPHYADDR, below 48, and then
# kvm_vcpu_is_legal_gpa() refuses every shared GPA (bit 47): the VMM's phys-bits must cover the GPAW.
MAXPHYADDR = GPAW
MSR_IA32_CR_PAT = 0x277
MSR_EFER = 0xC0000080
UNEMULATED_MSR = 0x1234  # in no case of tdx_has_emulated_msr()
PAT_ALL_WB = 0x0606060606060606  # kvm_pat_valid(): every entry a defined memory type
MMIO_GPA = 0xD0000000  # no in-kernel device there: KVM_MMIO_BUS misses, userspace emulates
QUOTE_GPA = 0x500000
VMCALL_INFO = (0x11, 0x22, 0x33, 0x44)  # what userspace answers GetTdVmCallInfo leaf 1 with in R11-R14
UNKNOWN_TDVMCALL = 0x10005


@dataclass(frozen=True)
class Case:
    """One TDVMCALL and what KVM hands the TD back: R10, and R11-R14 where KVM sets them."""

    exit: TdExit
    r10: int = abi.TDVMCALL_STATUS_SUCCESS
    values: dict[str, int] | None = None


def map_gpa_case(gpa: int, size: int, exit_enabled: bool = True) -> Case:
    """A MapGPA KVM refuses at once (tdx_map_gpa()'s error path: R11 = the start GPA)."""
    status = map_gpa_refusal(gpa, size, GPAW, MAXPHYADDR, exit_enabled)
    assert status is not None, "a refused MapGPA was meant"
    return Case(exits.map_gpa(gpa, size), status, {"r11": gpa})


def test_kvm_tdvmcalls_in_the_kernel_and_through_userspace(vmx_boot):
    machine = kvm_machine(vmx_boot)
    converted = (SHARED | 0x400000, 3 << 20)  # to shared: two KVM_HC_MAP_GPA_RANGE exits
    retried = (0x400000, 2 << 20)  # back to private; userspace says EAGAIN
    cases = [
        map_gpa_case(SHARED | 0x400000, 0x1000, exit_enabled=False),
        Case(exits.io(0x80, 1, write=True, value=1)),  # back to userspace to enable the exit
        Case(exits.map_gpa(*converted)),
        Case(exits.map_gpa(*retried), abi.TDVMCALL_STATUS_RETRY, {"r11": retried[0]}),
        map_gpa_case(0x400800, 0x1000),
        map_gpa_case(SHARED - 0x1000, 0x2000),
        # tdx_emulate_mmio(): shared GPAs only, sizes 1/2/4/8.
        Case(exits.mmio(SHARED | MMIO_GPA, 4, write=False), values={"r11": 0x12345678}),
        Case(exits.mmio(SHARED | MMIO_GPA + 8, 8, write=True, value=0x1122334455667788)),
        Case(exits.mmio(MMIO_GPA, 4, write=False), abi.TDVMCALL_STATUS_INVALID_OPERAND),
        Case(exits.mmio(SHARED | MMIO_GPA, 3, write=False), abi.TDVMCALL_STATUS_INVALID_OPERAND),
        # tdx_get_msr()/tdx_set_msr(): KVM's emulated set; tdx_complete_emulated_msr() on refusal.
        Case(exits.rdmsr(MSR_IA32_CR_PAT), values={"r11": MSR_IA32_CR_PAT_DEFAULT}),
        Case(exits.wrmsr(MSR_IA32_CR_PAT, PAT_ALL_WB)),
        Case(exits.rdmsr(MSR_IA32_CR_PAT), values={"r11": PAT_ALL_WB}),
        Case(exits.wrmsr(MSR_EFER, 0), abi.TDVMCALL_STATUS_INVALID_OPERAND),  # tdx_is_read_only_msr()
        Case(exits.rdmsr(UNEMULATED_MSR), abi.TDVMCALL_STATUS_INVALID_OPERAND),
        # tdx_get_td_vm_call_info(): leaf 0 in the kernel, leaf 1 from userspace, others refused.
        Case(exits.get_td_vm_call_info(0), values=dict.fromkeys(("r11", "r12", "r13", "r14"), 0)),
        Case(exits.get_td_vm_call_info(1), values=dict(zip(("r11", "r12", "r13", "r14"), VMCALL_INFO))),
        Case(exits.get_td_vm_call_info(2), abi.TDVMCALL_STATUS_INVALID_OPERAND),
        # tdx_get_quote(): a shared buffer goes to userspace, which answers SUCCESS here.
        Case(exits.get_quote(SHARED | QUOTE_GPA, 0x1000)),
        Case(exits.get_quote(QUOTE_GPA, 0x1000), abi.TDVMCALL_STATUS_INVALID_OPERAND),
        # tdx_setup_event_notify_interrupt(): userspace leaves KVM's default answer.
        Case(exits.setup_event_notify_interrupt(0x40), abi.TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED),
        Case(exits.setup_event_notify_interrupt(5), abi.TDVMCALL_STATUS_INVALID_OPERAND),
        Case(exits.tdvmcall(UNKNOWN_TDVMCALL, "an unknown TDVMCALL"), abi.TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED),
    ]
    machine.module.exits.add(*(case.exit for case in cases))
    steps = [s if s != "set_cpuid" else f"set_cpuid:maxpa={MAXPHYADDR}" for s in FINALIZED]
    start = len(machine.module.trace)
    run = run_agent(machine, [
        *steps, "run",  # the port write
        "exit_hypercall", "run:ret=0", "run:ret=0", f"run:ret={errno.EAGAIN}",  # MapGPA: 2 pieces, then EAGAIN
        "run:in=0x12345678", "run",  # MMIO read, write
        "run:ret=0:" + ":".join(f"r{11 + i}={v}" for i, v in enumerate(VMCALL_INFO)),  # GetTdVmCallInfo 1
        "run:ret=0", "run",  # GetQuote, SetupEventNotifyInterrupt
        "run",  # the script's end: ReportFatalError
        "destroy"], KVM_TIMEOUT)
    assert not [s for s in run.failed() if s.step != "run"], run.failed()
    (port, piece1, piece2, private, mmio_read, mmio_write, vmcall_info, quote, notify,
     fatal) = run.all("run")

    assert port.outputs["exit_reason"] == KVM_EXIT_IO
    check_map_gpa_exits([piece1, piece2], *converted)
    check_map_gpa_exits([private], *retried)
    assert (mmio_read.outputs["exit_reason"], mmio_read.outputs["phys_addr"], mmio_read.outputs["len"],
            mmio_read.outputs["is_write"]) == (KVM_EXIT_MMIO, MMIO_GPA, 4, 0), mmio_read
    assert (mmio_write.outputs["exit_reason"], mmio_write.outputs["phys_addr"], mmio_write.outputs["len"],
            mmio_write.outputs["is_write"], mmio_write.outputs["data"]) == \
        (KVM_EXIT_MMIO, MMIO_GPA + 8, 8, 1, 0x1122334455667788), mmio_write
    assert (vmcall_info.outputs["exit_reason"], vmcall_info.outputs["nr"], vmcall_info.outputs["leaf"]) == \
        (KVM_EXIT_TDX, Tdvmcall.GET_TD_VM_CALL_INFO, 1), vmcall_info
    assert (quote.outputs["exit_reason"], quote.outputs["nr"], quote.outputs["gpa"], quote.outputs["size"],
            quote.outputs["default_ret"]) == \
        (KVM_EXIT_TDX, Tdvmcall.GET_QUOTE, QUOTE_GPA, 0x1000, abi.TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED), quote
    assert (notify.outputs["exit_reason"], notify.outputs["nr"], notify.outputs["vector"]) == \
        (KVM_EXIT_TDX, Tdvmcall.SETUP_EVENT_NOTIFY_INTERRUPT, 0x40), notify
    assert fatal.outputs["exit_reason"] == KVM_EXIT_SYSTEM_EVENT, fatal

    # Entry k returned exit k; entry k + 1 carries KVM's answer to it.
    entries = vp_entries(records_since(machine, start))
    assert len(entries) == len(cases) + 1, [r.note for r in entries]
    assert all(r.status == abi.ExitReason.TDCALL for r in entries), [hex(r.status) for r in entries]
    for case, answer in zip(cases, entries[1:]):
        got = {"r10": answer.inputs["r10"], **{r: answer.inputs[r] for r in case.values or {}}}
        assert got == {"r10": case.r10, **(case.values or {})}, f"{case.exit.description}: KVM answered {got}"
    assert_no_td_left(machine)
    kernel_log(machine).expect_absent(patterns.SEAMCALL_FAILED)


def check_map_gpa_exits(steps: list[AgentStep], gpa: int, size: int) -> None:
    """The KVM_HC_MAP_GPA_RANGE exits of one MapGPA, as __tdx_map_gpa() splits it."""
    seen = [(s.outputs["exit_reason"], s.outputs["nr"], *s.outputs["args"], s.outputs["flags"]) for s in steps]
    expected = [(KVM_EXIT_HYPERCALL, KVM_HC_MAP_GPA_RANGE, piece.gpa, piece.pages, piece.attributes,
                 KVM_EXIT_HYPERCALL_LONG_MODE) for piece in map_gpa_exits(gpa, size, GPAW)]
    assert seen == expected, f"MapGPA {gpa:#x}+{size:#x}: userspace saw {seen}"
