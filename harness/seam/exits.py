"""TD exits: what TDH.VP.ENTER reports when the guest stops, scripted by the test.

The software module runs no guest code. A test queues the exits the guest would cause (a
TDVMCALL for port I/O, HLT, CPUID, MMIO, MSRs, MapGPA, a quote or a fatal error; an EPT
violation on a GPA), and each TDH.VP.ENTER returns the next one in the registers the real
module uses: RAX = TDX_SUCCESS with the VMX exit reason, RCX = exit qualification (for a
TDVMCALL, the exposed-register bitmap), RDX = extended exit qualification, R8 = GPA, R9 =
interruption info, R10-R15 = the TDVMCALL's registers. With nothing queued, the guest "reports
a fatal error" (TDVMCALL<ReportFatalError>): KVM hands that to userspace, so KVM_RUN always
returns.

The non-recoverable exits are the module's asynchronous TD exits (async_tdexit_to_vmm(),
src/td_transitions/td_exit.c) with a case other than TDX_SUCCESS: RAX = the case with the exit
reason in bits 31:0, RCX = exit qualification, RDX = extended exit qualification, R8 = GPA, R9 =
interruption info, every other register 0. TDX_NON_RECOVERABLE_VCPU disables the vCPU; the
TDX_NON_RECOVERABLE_TD* cases mark the TD fatal (td.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from harness.seam import abi

# Fatal error code the module reports when the script ran out (R12; the GHCI leaves it to the TD).
SCRIPT_ENDED_ERROR = 0x5EA1_0000


@dataclass(frozen=True)
class TdExit:
    """One exit: its reason, the registers VP.ENTER returns, and whether a virtual interrupt is
    pending afterwards (TDVPS VCPU_STATE_DETAILS, which KVM reads after a HLT)."""

    reason: abi.ExitReason
    regs: dict[str, int]
    description: str
    intr_pending: bool = False
    case: abi.Status = abi.Status.TDX_SUCCESS  # async_tdexit_to_vmm()'s tdexit_case
    entry_failed: bool = False  # a VM-entry failure: exit reason bit 31
    debug_recovers: bool = False  # a debug TD gets TDX_SUCCESS instead of ``case`` (attributes.debug)


def tdvmcall(leaf: int, description: str, **regs: int) -> TdExit:
    """TDG.VP.VMCALL from the guest: R10 = 0 (a GHCI-standard call), R11 = sub-function."""
    return TdExit(abi.ExitReason.TDCALL, {"rcx": abi.TDVMCALL_EXPOSE_REGS_MASK, "r10": 0, "r11": leaf, **regs},
                  description)


def io(port: int, size: int, write: bool, value: int = 0) -> TdExit:
    """TDVMCALL<Instruction.IO>: R12 = size, R13 = direction (1 = out), R14 = port, R15 = value."""
    verb = f"out {value:#x} to" if write else "in from"
    return tdvmcall(abi.Tdvmcall.IO_INSTRUCTION, f"TDVMCALL<IO> {verb} port {port:#x} ({size} bytes)",
                    r12=size, r13=int(write), r14=port, r15=value if write else 0)


def hlt(irq_blocked: bool = False, intr_pending: bool = False) -> TdExit:
    """TDVMCALL<Instruction.HLT>: R12 = 1 when the guest halts with interrupts blocked."""
    exit_ = tdvmcall(abi.Tdvmcall.HLT, f"TDVMCALL<HLT> (interrupts {'blocked' if irq_blocked else 'enabled'}"
                     f"{', one pending' if intr_pending else ''})", r12=int(irq_blocked))
    return TdExit(exit_.reason, exit_.regs, exit_.description, intr_pending)


def cpuid(leaf: int, subleaf: int = 0) -> TdExit:
    """TDVMCALL<Instruction.CPUID>: R12 = EAX, R13 = ECX; KVM answers in R12-R15."""
    return tdvmcall(abi.Tdvmcall.CPUID, f"TDVMCALL<CPUID> leaf {leaf:#x}.{subleaf}", r12=leaf, r13=subleaf)


def fatal_error(code: int, description: str = "") -> TdExit:
    """TDVMCALL<ReportFatalError>: R12 = error code; KVM exits to userspace (SYSTEM_EVENT)."""
    return tdvmcall(abi.Tdvmcall.REPORT_FATAL_ERROR, description or f"TDVMCALL<ReportFatalError> {code:#x}",
                    r12=code)


def map_gpa(gpa: int, size: int) -> TdExit:
    """TDVMCALL<MapGPA>: R12 = start GPA (the shared bit says which way), R13 = size."""
    return tdvmcall(abi.Tdvmcall.MAP_GPA, f"TDVMCALL<MapGPA> {gpa:#x}+{size:#x}", r12=gpa, r13=size)


def mmio(gpa: int, size: int, write: bool, value: int = 0) -> TdExit:
    """TDVMCALL<#VE.RequestMMIO>: R12 = size, R13 = direction (1 = write), R14 = GPA, R15 = value."""
    verb = f"write {value:#x} to" if write else "read from"
    return tdvmcall(abi.Tdvmcall.MMIO, f"TDVMCALL<MMIO> {verb} {gpa:#x} ({size} bytes)",
                    r12=size, r13=int(write), r14=gpa, r15=value if write else 0)


def rdmsr(msr: int) -> TdExit:
    """TDVMCALL<Instruction.RDMSR>: R12 = MSR index; KVM answers in R11."""
    return tdvmcall(abi.Tdvmcall.MSR_READ, f"TDVMCALL<RDMSR> {msr:#x}", r12=msr)


def wrmsr(msr: int, value: int) -> TdExit:
    """TDVMCALL<Instruction.WRMSR>: R12 = MSR index, R13 = value."""
    return tdvmcall(abi.Tdvmcall.MSR_WRITE, f"TDVMCALL<WRMSR> {value:#x} to {msr:#x}", r12=msr, r13=value)


def get_td_vm_call_info(leaf: int) -> TdExit:
    """TDVMCALL<GetTdVmCallInfo>: R12 = leaf; the answer comes back in R11-R14."""
    return tdvmcall(abi.Tdvmcall.GET_TD_VM_CALL_INFO, f"TDVMCALL<GetTdVmCallInfo> leaf {leaf}", r12=leaf)


def get_quote(gpa: int, size: int) -> TdExit:
    """TDVMCALL<GetQuote>: R12 = the (shared) buffer's GPA, R13 = its size."""
    return tdvmcall(abi.Tdvmcall.GET_QUOTE, f"TDVMCALL<GetQuote> buffer {gpa:#x}+{size:#x}", r12=gpa, r13=size)


def setup_event_notify_interrupt(vector: int) -> TdExit:
    """TDVMCALL<SetupEventNotifyInterrupt>: R12 = the vector the VMM is to notify with."""
    return tdvmcall(abi.Tdvmcall.SETUP_EVENT_NOTIFY_INTERRUPT, f"TDVMCALL<SetupEventNotifyInterrupt> "
                    f"vector {vector:#x}", r12=vector)


def ept_violation(gpa: int, pending: bool = False) -> TdExit:
    """An EPT violation on ``gpa`` (a write); ``pending``: the page was added but the guest
    touched it before TDG.MEM.PAGE.ACCEPT (extended exit qualification type 6)."""
    eeq = abi.EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION if pending else 0
    return TdExit(abi.ExitReason.EPT_VIOLATION, {"rcx": abi.EPT_VIOLATION_ACC_WRITE, "rdx": eeq, "r8": gpa},
                  f"EPT violation at {gpa:#x}{' (page pending acceptance)' if pending else ''}")


def _async(case: abi.Status, reason: abi.ExitReason, description: str, qualification: int = 0,
           intr_info: int = 0, entry_failed: bool = False, debug_recovers: bool = False) -> TdExit:
    """An asynchronous TD exit the module ends with ``case`` (RDX and R8 are 0 for all of these).
    RCX and R9 are what the CPU left in the VMCS, which the module passes on unread: the SDM's
    values for each cause, 0 where it defines no detail."""
    return TdExit(reason, {"rcx": qualification, "r9": intr_info}, description, case=case,
                  entry_failed=entry_failed, debug_recovers=debug_recovers)


def external_interrupt(vector: int) -> TdExit:
    """A host interrupt arrives while the guest runs: an ordinary TD exit (TDX_SUCCESS), R9 = the
    interrupt's info; KVM runs the host's handler for ``vector`` and enters again."""
    return _async(abi.Status.TDX_SUCCESS, abi.ExitReason.EXTERNAL_INTERRUPT, f"external interrupt {vector:#x}",
                  intr_info=abi.INTR_INFO_VALID | abi.INTR_TYPE_EXT_INTR | vector)


def nmi() -> TdExit:
    """An NMI arrives while the guest runs: KVM hands it to the host's NMI handler and enters again."""
    return _async(abi.Status.TDX_SUCCESS, abi.ExitReason.EXCEPTION_NMI, "NMI",
                  intr_info=abi.INTR_INFO_VALID | abi.INTR_TYPE_NMI_INTR | abi.NMI_VECTOR)


def triple_fault() -> TdExit:
    """The guest triple-faults (tdx_td_dispatcher.c, also helpers.c on a #PF over a pending #DF):
    TDX_NON_RECOVERABLE_VCPU, the vCPU is disabled and the TD lives on."""
    return _async(abi.Status.TDX_NON_RECOVERABLE_VCPU, abi.ExitReason.TRIPLE_FAULT, "triple fault")


def machine_check() -> TdExit:
    """A #MC while the guest runs (td_exception_or_nmi_exit(), td_other_exits.c): the TD is
    fatal and its memory not to be touched; R9 = the #MC's interruption info. KVM hands the #MC
    to the host's handler (vmx_handle_exit_irqoff() -> kvm_machine_check()), which reads the
    banks: without a record there (this module has none to give) the host panics."""
    return _async(abi.Status.TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE, abi.ExitReason.EXCEPTION_NMI,
                  "#MC in the TD", intr_info=abi.INTR_INFO_VALID | abi.INTR_TYPE_HARD_EXCEPTION | abi.MC_VECTOR)


def vmentry_machine_check() -> TdExit:
    """VM entry fails on a machine check (handle_vm_entry_failures(), tdx_td_dispatcher.c).
    KVM runs the host's #MC handler for it too (see machine_check())."""
    return _async(abi.Status.TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE, abi.ExitReason.MCE_DURING_VMENTRY,
                  "VM entry failed: machine check", entry_failed=True)


def msmi() -> TdExit:
    """An SMI that signals a machine check (Other SMI with the MSMI qualification bit)."""
    return _async(abi.Status.TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE, abi.ExitReason.OTHER_SMI,
                  "machine-check SMI in the TD", qualification=abi.EXIT_QUAL_SMI_MSMI)


def invalid_guest_state() -> TdExit:
    """VM entry fails its guest-state checks (handle_vm_entry_failures()): fatal unless the TD is
    a debug TD, whose state the host may have written."""
    return _async(abi.Status.TDX_NON_RECOVERABLE_TD, abi.ExitReason.INVALID_STATE,
                  "VM entry failed: invalid guest state", entry_failed=True, debug_recovers=True)


def notify_context_invalid() -> TdExit:
    """A notify VM exit whose qualification says the VM context is invalid (tdx_td_dispatcher.c)."""
    return _async(abi.Status.TDX_NON_RECOVERABLE_TD, abi.ExitReason.NOTIFY, "notify exit, VM context invalid",
                  qualification=abi.EXIT_QUAL_NOTIFY_VM_CONTEXT_INVALID)


def wrong_apic_mode(vector: int) -> TdExit:
    """An external interrupt right after entry (the single-step filter, td_exit_stepping.c) on an
    LP whose local APIC is disabled: the module cannot step the guest safely and kills the TD."""
    return _async(abi.Status.TDX_NON_RECOVERABLE_TD_WRONG_APIC_MODE, abi.ExitReason.EXTERNAL_INTERRUPT,
                  f"external interrupt {vector:#x} with the LP's local APIC disabled",
                  intr_info=abi.INTR_INFO_VALID | vector)


def corrupted_metadata() -> TdExit:
    """TDG.MR.REPORT finds the TD's metadata corrupted (tdg_mr_report.c): an exit with no reason
    (async_tdexit_empty_reason(): reason, qualification and interruption info 0)."""
    return _async(abi.Status.TDX_NON_RECOVERABLE_TD_CORRUPTED_MD, abi.ExitReason.EXCEPTION_NMI,
                  "TD metadata corrupted (TDG.MR.REPORT)")


@dataclass
class ExitScript:
    """The exits the next TDH.VP.ENTERs report, in order (any vCPU)."""

    queued: deque[TdExit] = field(default_factory=deque)

    def add(self, *exits: TdExit) -> None:
        self.queued.extend(exits)

    def next(self) -> TdExit:
        if self.queued:
            return self.queued.popleft()
        return fatal_error(SCRIPT_ENDED_ERROR, "no scripted exit left: TDVMCALL<ReportFatalError>")
