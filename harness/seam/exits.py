"""TD exits: what TDH.VP.ENTER reports when the guest stops, scripted by the test.

The software module runs no guest code. A test queues the exits the guest would cause (a
TDVMCALL for port I/O, HLT, CPUID, MMIO, MSRs, MapGPA, a quote or a fatal error; an EPT
violation on a GPA), and each TDH.VP.ENTER returns the next one in the registers the real
module uses: RAX = TDX_SUCCESS with the VMX exit reason, RCX = exit qualification (for a
TDVMCALL, the exposed-register bitmap), RDX = extended exit qualification, R8 = GPA, R9 =
interruption info, R10-R15 = the TDVMCALL's registers. With nothing queued, the guest "reports
a fatal error" (TDVMCALL<ReportFatalError>): KVM hands that to userspace, so KVM_RUN always
returns.
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
