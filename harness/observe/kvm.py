"""What the guest agent (images/agent/tdx-agent.c) reports, and what Linux 7.3's KVM should
report for a given module: the capability rules of arch/x86/kvm/vmx/tdx.c, written from the
kernel source so that tests compare the agent's figures with a model, not with themselves."""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness.machine.shell import CommandResult
from harness.seam import abi
from harness.seam.platform import CpuidConfig, CpuidValue, PlatformConfig

AGENT = "tdx-agent"
# kvm-intel.ko has no module dependencies in this config (kvm and irqbypass are built in): insmod
# works whether or not the build host ran depmod.
KVM_INTEL_KO = "/lib/modules/$(uname -r)/kernel/arch/x86/kvm/kvm-intel.ko"
LOAD_KVM_INTEL = f"insmod {KVM_INTEL_KO} tdx=1"
UNLOAD_KVM_INTEL = "rmmod kvm_intel"
KVM_TIMEOUT = 600.0  # Bochs: a SEAMCALL round trip is ~15 ms and a TD page costs 17 of them
# The documented order up to a TD with one initialized vCPU and private memory at GPA 0
# (Documentation/virt/kvm/x86/intel-tdx.rst, with SET_CPUID2 before INIT_VCPU as tdx.c needs).
TO_MEMORY = ("create_vm", "x2apic_api", "split_irqchip", "capabilities", "init_vm", "create_vcpu",
             "set_cpuid", "init_vcpu", "memory")
# A TD ready to run: built, one measured page range added, finalized.
FINALIZED = [*TO_MEMORY, "init_mem_region:pages=2:seed=3", "finalize"]
# KVM_SUPPORTED_TDX_TD_ATTRS (tdx.c): the only TD attribute KVM offers is SEPT_VE_DISABLE.
KVM_SUPPORTED_TD_ATTRS = 1 << 28
# TDVMCALLINFO_SETUP_EVENT_NOTIFY_INTERRUPT: the one user TDVMCALL KVM reports.
USER_TDVMCALLINFO_1_R11 = 1 << 1
KVM_TDX_CPUID_NO_SUBLEAF = 0xFFFFFFFF
GPAW_SHIFT = 16
# CPUID bits KVM clears from what it offers and refuses in INIT_VM (tdx_clear_unsupported_cpuid).
CPUID7_EBX_TSX = (1 << 4) | (1 << 11)  # HLE, RTM
CPUID7_ECX_WAITPKG = 1 << 5
# struct kvm_run exit reasons and fields (include/uapi/linux/kvm.h) the run step reports.
KVM_EXIT_IO = 2
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4  # the suberror of kvm_prepare_unexpected_reason_exit()
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_TDX = 40
KVM_SYSTEM_EVENT_TDX_FATAL = 7
# tdx_report_fatal_error(): system_event.data[] holds the TD's registers by x86 number.
VCPU_REGS_R11, VCPU_REGS_R12 = 11, 12
# TDH.VP.ENTER statuses whose RAX[31:0] KVM takes as a VMX exit reason (tdx_is_exit_reason_valid(),
# tdx_errno.h): TDX_SUCCESS, NON_RECOVERABLE_VCPU, _TD, _TD_NON_ACCESSIBLE, _TD_WRONG_APIC_MODE.
# Linux's NON_RECOVERABLE_TD (0x4000000200000000) and WRONG_APIC_MODE (0x6000000700000000)
# differ from the module's, so KVM drops the exit reason of those two.
KVM_EXIT_REASON_VALID = frozenset({0, 0x4000000100000000, 0x4000000200000000, 0x6000000500000000,
                                   0x6000000700000000})


class Runner(Protocol):
    def run(self, cmd: str, timeout: float) -> CommandResult: ...


class AgentError(Exception):
    """The agent did not run its steps (usage error, missing binary): its output says why."""


@dataclass(frozen=True)
class AgentStep:
    """One JSON line of the agent: the ioctl it issued, its return and errno, the TDX status
    KVM reported in hw_error, and the step's own outputs."""

    step: str
    ioctl: str
    ret: int
    errno: int
    hw_error: int
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.ret >= 0

    @classmethod
    def parse(cls, line: str) -> AgentStep:
        data = json.loads(line)
        return cls(data.pop("step"), data.pop("ioctl"), data.pop("ret"), data.pop("errno"),
                   data.pop("hw_error"), data)


@dataclass(frozen=True)
class AgentRun:
    command: str
    steps: list[AgentStep]

    def __getitem__(self, name: str) -> AgentStep:
        """The last step of that name (a repeated step's last outcome)."""
        found = [s for s in self.steps if s.step == name]
        if not found:
            raise KeyError(f"no step {name!r} in the run of `{self.command}`: "
                           f"{[s.step for s in self.steps]}")
        return found[-1]

    def all(self, name: str) -> list[AgentStep]:
        """Every step of that name, in order (the exits of repeated run steps)."""
        return [s for s in self.steps if s.step == name]

    def failed(self) -> list[AgentStep]:
        return [s for s in self.steps if not s.ok]


def run_agent(machine: Runner, steps: Sequence[str], timeout: float, agent: str = AGENT) -> AgentRun:
    """Run the agent (``agent``: its path, if not on the PATH) with ``steps``, each
    "name[:key=value...]"."""
    command = " ".join([agent, *steps])
    result = machine.run(command, timeout)
    lines = [line for line in result.output.splitlines() if line.startswith("{")]
    if result.status != 0 or len(lines) != len(steps):
        raise AgentError(f"`{command}` exited {result.status} after {len(lines)} of {len(steps)} "
                         f"steps:\n{result.output[-2000:]}")
    return AgentRun(command, [AgentStep.parse(line) for line in lines])


# --- KVM_RUN after TDH.VP.ENTER (tdx.c: tdx_vcpu_run(), __tdx_handle_exit()) ---------------------


@dataclass(frozen=True)
class VpEnterOutcome:
    """What KVM 7.3 does with a TDH.VP.ENTER status before its per-exit-reason handlers:
    ``kvm_exit`` is the kvm_run exit userspace sees (None: KVM re-enters or hands the VMX exit
    reason to its handler), ``data`` the INTERNAL_ERROR data[0] or FAIL_ENTRY
    hardware_entry_failure_reason, ``errno`` KVM_RUN's failure, ``vm_bugged`` a KVM_BUG_ON
    (WARN, and every later ioctl on the VM fails with EIO)."""

    kvm_exit: int | None
    data: int = 0
    errno: int = 0
    vm_bugged: bool = False


def vp_enter_outcome(status: int, virt_rebooting: bool = False) -> VpEnterOutcome:
    """__tdx_handle_exit() in its order, with the exit reason tdx_to_vmx_exit_reason() makes of
    ``status`` (none when tdx_is_exit_reason_valid() refuses the status)."""
    reason = status & abi.DETAILS_MASK if status & abi.STATUS_MASK in KVM_EXIT_REASON_VALID else None
    if status == abi.ExitReason.EPT_MISCONFIG:
        return VpEnterOutcome(None, errno=errno.EIO, vm_bugged=True)
    if status & abi.TDX_SW_ERROR == abi.TDX_SW_ERROR:  # the SEAMCALL itself failed (#UD, #GP, VMfailInvalid)
        return VpEnterOutcome(KVM_EXIT_INTERNAL_ERROR, status, vm_bugged=not virt_rebooting)
    if reason is not None and reason & abi.EXIT_REASON_FAILED_VMENTRY:
        return VpEnterOutcome(KVM_EXIT_FAIL_ENTRY, reason)
    if status & abi.STATUS_MASK == abi.Status.TDX_OPERAND_BUSY:  # tdx_exit_handlers_fastpath(): enter again
        return VpEnterOutcome(None)
    triple_fault = reason is not None and reason & abi.EXIT_REASON_BASIC_MASK == abi.ExitReason.TRIPLE_FAULT
    if status & (abi.STATUS_ERROR | abi.STATUS_NON_RECOVERABLE) and not triple_fault:
        return VpEnterOutcome(KVM_EXIT_INTERNAL_ERROR, status)  # kvm_prepare_unexpected_reason_exit()
    return VpEnterOutcome(KVM_EXIT_SHUTDOWN if triple_fault else None)


# --- KVM's capability rules (tdx.c: init_kvm_tdx_caps, td_init_cpuid_entry2) ---------------------


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    eax: int
    ebx: int
    ecx: int
    edx: int
    flags: int = 0


def supported_attrs(platform: PlatformConfig) -> int:
    """tdx_get_supported_attrs(): 0 when the module forces an attribute KVM does not offer."""
    if KVM_SUPPORTED_TD_ATTRS & platform.attributes_fixed1 != platform.attributes_fixed1:
        return 0
    return KVM_SUPPORTED_TD_ATTRS & platform.attributes_fixed0


def supported_xfam(platform: PlatformConfig, kvm_xcr0: int) -> int:
    """tdx_get_supported_xfam(): KVM's supported XCR0 within the module's XFAM bounds."""
    if kvm_xcr0 & platform.xfam_fixed1 != platform.xfam_fixed1:
        return 0
    return kvm_xcr0 & platform.xfam_fixed0


def tdx_hardware_setup_refusal(platform: PlatformConfig, kvm_xfam: int, present_cpus: int) -> str | None:
    """Why __tdx_hardware_setup() refuses the module, in its order, so that `insmod kvm-intel.ko
    tdx=1` fails with EINVAL; None when it takes it. ``kvm_xfam``: KVM's supported XCR0 | XSS."""
    if not supported_attrs(platform) or not supported_xfam(platform, kvm_xfam):
        return "no TD attributes or XFAM that both KVM and the module support"
    if not platform.tdx_features0 & abi.TDX_FEATURES0_TOPOLOGY_ENUM:
        return "no TOPOLOGY_ENUM in TDX_FEATURES0"
    if platform.max_vcpus_per_td < present_cpus:
        return f"MAX_VCPU_PER_TD ({platform.max_vcpus_per_td}) below the {present_cpus} logical CPUs"
    return None


def offered_cpuid(config: CpuidConfig) -> CpuidEntry:
    """td_init_cpuid_entry2(): a CPUID_CONFIG slot as KVM_TDX_CAPABILITIES reports it."""
    ebx, ecx, eax = config.ebx, config.ecx, config.eax
    if config.leaf == 0x80000008:  # the GPAW is KVM's to configure: shown as all ones
        eax = (eax & ~(0xFF << GPAW_SHIFT)) | 0xFF << GPAW_SHIFT
    if config.leaf == 7 and config.subleaf == 0:
        ebx &= ~CPUID7_EBX_TSX
        ecx &= ~CPUID7_ECX_WAITPKG
    index = 0 if config.subleaf == KVM_TDX_CPUID_NO_SUBLEAF else config.subleaf
    return CpuidEntry(config.leaf, index, eax, ebx, ecx, config.edx)


def cpuid_entries(step: AgentStep) -> list[CpuidEntry]:
    return [CpuidEntry(**entry) for entry in step.outputs["cpuid"]]


# --- KVM's TDVMCALL handling (tdx.c: handle_tdvmcall, tdx_map_gpa, __tdx_map_gpa) ----------------

KVM_HC_MAP_GPA_RANGE = 12  # include/uapi/linux/kvm_para.h
KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4  # arch/x86/include/uapi/asm/kvm_para.h
KVM_MAP_GPA_RANGE_DECRYPTED = 0
TDX_MAP_GPA_MAX_LEN = 2 << 20  # one KVM_HC_MAP_GPA_RANGE exit covers at most this much
MSR_IA32_CR_PAT_DEFAULT = 0x0007040600070406  # kvm_vcpu_reset()


def shared_bit(gpaw: int) -> int:
    """The GPA bit that marks a shared page: TDX_SHARED_BIT_PWL_4 (47) or _PWL_5 (51)."""
    return 1 << (gpaw - 1)


@dataclass(frozen=True)
class MapGpaExit:
    """One KVM_EXIT_HYPERCALL(KVM_HC_MAP_GPA_RANGE): args[0..2] as __tdx_map_gpa() fills them."""

    gpa: int  # without the shared bit
    pages: int
    attributes: int


def map_gpa_refusal(gpa: int, size: int, gpaw: int, maxphyaddr: int, exit_enabled: bool) -> int | None:
    """tdx_map_gpa()'s checks, in its order: the TDVMCALL status the TD gets at once, or None
    when KVM takes the conversion to userspace."""
    if not exit_enabled:  # userspace did not ask for KVM_HC_MAP_GPA_RANGE exits
        return abi.TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED
    end = gpa + size
    legal = end > gpa and gpa >> maxphyaddr == 0 and (end - 1) >> maxphyaddr == 0
    if not legal or bool(gpa & shared_bit(gpaw)) != bool((end - 1) & shared_bit(gpaw)):
        return abi.TDVMCALL_STATUS_INVALID_OPERAND
    if gpa % abi.SZ_4K or size % abi.SZ_4K:
        return abi.TDVMCALL_STATUS_ALIGN_ERROR
    return None


def map_gpa_exits(gpa: int, size: int, gpaw: int) -> list[MapGpaExit]:
    """The exits userspace sees for an accepted MapGPA that it answers with 0 each time (and no
    event is pending in between): pieces of TDX_MAP_GPA_MAX_LEN, shared bit stripped, DECRYPTED
    for a conversion to shared."""
    bit = shared_bit(gpaw)
    attributes = KVM_MAP_GPA_RANGE_DECRYPTED if gpa & bit else KVM_MAP_GPA_RANGE_ENCRYPTED
    return [MapGpaExit(at & ~bit, min(TDX_MAP_GPA_MAX_LEN, gpa + size - at) // abi.SZ_4K, attributes)
            for at in range(gpa, gpa + size, TDX_MAP_GPA_MAX_LEN)]


# --- KVM_TDX_GET_CPUID (tdx.c: tdx_vcpu_get_cpuid, tdx_vcpu_get_cpuid_leaf, tdx_read_cpuid) -------

TD_MD_FIELD_ID_CPUID_VALUES = 0x9410000300000000  # tdx_arch.h: TDH.MNG.RD's field, leaf/subleaf ORed in
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_MAX_CPUID_ENTRIES = 256
TDX_MD_UNREADABLE_LEAF_MASK = 0x7FFFFF80  # GENMASK(30, 7): leaf bits the field cannot name
TDX_MD_UNREADABLE_SUBLEAF_MASK = 0xFFFFFF80  # GENMASK(31, 7)


@dataclass(frozen=True)
class CpuidReadback:
    """What KVM_TDX_GET_CPUID gathers from the TD's CPUID: the entries (in KVM's order), the
    TDH.MNG.RD field ids it reads with whether each read succeeded, and its errno (0 or -EIO)."""

    entries: list[CpuidEntry]
    reads: list[tuple[int, bool]]
    error: int = 0

    def answer(self, nent: int) -> tuple[int, int]:
        """The ioctl's return and the nent it writes back for a buffer of ``nent`` entries:
        -E2BIG with the count it needs when they do not fit."""
        if self.error:
            return self.error, nent
        return (-errno.E2BIG if nent < len(self.entries) else 0), len(self.entries)


def td_cpuid_readback(td_cpuid: Mapping[tuple[int, int], CpuidValue], gpaw: int) -> CpuidReadback:
    """tdx_vcpu_get_cpuid() over a TD whose module answers TDH.MNG.RD of CPUID_VALUES from
    ``td_cpuid`` ((leaf, subleaf or KVM_TDX_CPUID_NO_SUBLEAF) -> value; any other field fails):
    leaves 0..CPUID(0).EAX and 0x80000000..CPUID(0x80000000).EAX, each read without a subleaf
    first and, if that fails, subleaf by subleaf until one fails."""
    entries: list[CpuidEntry] = []
    reads: list[tuple[int, bool]] = []

    def read(leaf: int, subleaf: int, subleaf_set: bool) -> int:  # tdx_read_cpuid()
        if subleaf > 0x7F or len(entries) >= KVM_MAX_CPUID_ENTRIES:
            return -errno.EINVAL
        if leaf & TDX_MD_UNREADABLE_LEAF_MASK or subleaf & TDX_MD_UNREADABLE_SUBLEAF_MASK:
            return -errno.EINVAL
        key = (leaf, subleaf if subleaf_set else KVM_TDX_CPUID_NO_SUBLEAF)
        field = TD_MD_FIELD_ID_CPUID_VALUES | abi.cpuid_field_code(*key, 0)
        value = td_cpuid.get(key)
        reads.append((field, value is not None))
        if value is None:
            return -errno.EIO
        reads.append((field | 1, True))  # EDX:ECX, read once EBX:EAX was
        eax = value.eax
        if leaf == 0x80000008:  # the guest MAXPA KVM derives from the shared bit: the GPAW
            eax = (eax & ~(0xFF << GPAW_SHIFT)) | shared_bit(gpaw).bit_length() << GPAW_SHIFT
        entries.append(CpuidEntry(leaf, subleaf, eax, value.ebx, value.ecx, value.edx,
                                  KVM_CPUID_FLAG_SIGNIFCANT_INDEX if subleaf_set else 0))
        return 0

    def read_leaf(leaf: int) -> int:  # tdx_vcpu_get_cpuid_leaf(): nonzero when nothing was read
        ret = read(leaf, 0, False)
        if ret != -errno.EIO:
            return ret
        subleaf = 0
        while not read(leaf, subleaf, True):
            subleaf += 1
        return int(not subleaf)

    for first in (0, 0x80000000):
        if read_leaf(first):
            return CpuidReadback(entries, reads, -errno.EIO)
        # The range's highest leaf: the first entry's EAX for the basic range, the last one's
        # (what 0x80000000 just gave) for the extended range.
        level = entries[0].eax if first == 0 else entries[-1].eax
        for leaf in range(first + 1, level + 1):
            read_leaf(leaf)
    return CpuidReadback(entries, reads)
