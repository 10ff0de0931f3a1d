"""A Python replay of what Linux 7.3's KVM (arch/x86/kvm/vmx/tdx.c) asks of the TDX module, from
`modprobe kvm_intel tdx=1` to VM teardown, leaf by leaf, with the registers the kernel's tdh_*
wrappers (arch/x86/virt/vmx/tdx/tdx.c) load. Pages come from a bump allocator in simulated RAM.

Written from the kernel source, not from the module: TD_PARAMS is laid out as KVM's struct
td_params, levels as pg_level_to_tdx_sept_level(), KeyIDs as mk_keyed_paddr().
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from linux_replay import call, replay_init

from harness.seam import abi
from harness.seam.abi import Field, Leaf, Status
from harness.seam.call import SeamcallResult
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram
from harness.seam.trace import REGISTERS

G = 1 << 30
M = 1 << 20
PAGE = 4096
RAM = [(0, 2 * G)]
USABLE = [(M, 2 * G)]

# KVM constants (arch/x86/kvm/vmx/tdx.c, tdx_arch.h, asm/vmx.h).
KVM_SUPPORTED_TDX_TD_ATTRS = 1 << 28  # TDX_TD_ATTR_SEPT_VE_DISABLE
TOPOLOGY_ENUM = 1 << 20
TDX_CONFIG_FLAGS_NO_RBP_MOD = 1 << 2
VMX_EPTP_MT_WB = 6
VMX_EPTP_PWL_4 = 3 << 3
POSTED_INTR_VECTOR = 0xF2
# KVM's supported_xcr0 on a typical AVX-512 host: x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM, PKRU.
KVM_SUPPORTED_XFAM = 0x2E7
TDVPS_VMCS = 0
TDVPS_CLASS_OTHER_GUEST = 17
TD_CLASS_EXECUTION_CONTROLS = 17


class SeamcallFailed(Exception):
    def __init__(self, leaf: int, result: SeamcallResult) -> None:
        super().__init__(f"{abi.leaf_name(leaf)} failed: {abi.status_name(result.status)}")
        self.leaf, self.status, self.regs = leaf, result.status, result.regs


def seamcall(module: TdxModule, memory: SparseMemory, cpu: int, fn: int, ok: tuple[int, ...] = (0,),
             **regs: int) -> SeamcallResult:
    result = call(module, memory, cpu, fn, **regs)
    if result.status not in ok:
        raise SeamcallFailed(fn, result)
    return result


class PageAllocator:
    """alloc_page(): 4K pages from a range the host kernel owns (inside the TDMRs)."""

    def __init__(self, start: int = 512 * M, end: int = 1024 * M) -> None:
        self.next, self.end = start, end

    def alloc(self) -> int:
        page, self.next = self.next, self.next + PAGE
        assert page < self.end
        return page


def ready_module(platform: PlatformConfig | None = None, **changes: object) -> TdxModule:
    base = platform or PlatformConfig(cmrs=cmrs_for_ram(RAM))
    module = TdxModule(base.replace(**changes) if changes else base)
    assert replay_init(module, USABLE).ok
    return module


# --- (a) kvm_intel load: tdx_hardware_setup() ----------------------------------------------------


@dataclass
class TdxSysinfo:
    """struct tdx_sys_info as tdx_global_metadata.c fills it at boot (TDH.SYS.RD per field)."""

    values: dict[int, int]
    cpuid_leaves: list[int]
    cpuid_values: list[tuple[int, int]]

    def __getitem__(self, field_id: int) -> int:
        return self.values[field_id]


SYSINFO_FIELDS = (Field.MINOR_VERSION, Field.MAJOR_VERSION, Field.UPDATE_VERSION, Field.TDX_FEATURES0,
                  Field.MAX_TDMRS, Field.MAX_RESERVED_PER_TDMR, Field.PAMT_4K_ENTRY_SIZE,
                  Field.PAMT_2M_ENTRY_SIZE, Field.PAMT_1G_ENTRY_SIZE, Field.TDR_BASE_SIZE,
                  Field.TDCS_BASE_SIZE, Field.TDVPS_BASE_SIZE, Field.ATTRIBUTES_FIXED0,
                  Field.ATTRIBUTES_FIXED1, Field.XFAM_FIXED0, Field.XFAM_FIXED1, Field.NUM_CPUID_CONFIG,
                  Field.MAX_VCPUS_PER_TD)


def read_sysinfo(module: TdxModule, memory: SparseMemory, cpu: int = 0) -> TdxSysinfo:
    def rd(field_id: int) -> int:
        return seamcall(module, memory, cpu, Leaf.TDH_SYS_RD, rdx=field_id).regs[2]

    values = {int(f): rd(f) for f in SYSINFO_FIELDS}
    n = values[Field.NUM_CPUID_CONFIG]
    leaves = [rd(abi.FIELD_CPUID_CONFIG_LEAVES + i) for i in range(n)]
    cpuid = [(rd(abi.FIELD_CPUID_CONFIG_VALUES + 2 * i), rd(abi.FIELD_CPUID_CONFIG_VALUES + 2 * i + 1))
             for i in range(n)]
    return TdxSysinfo(values, leaves, cpuid)


def supported_attrs(info: TdxSysinfo) -> int:
    val = KVM_SUPPORTED_TDX_TD_ATTRS
    if val & info[Field.ATTRIBUTES_FIXED1] != info[Field.ATTRIBUTES_FIXED1]:
        return 0
    return val & info[Field.ATTRIBUTES_FIXED0]


def supported_xfam(info: TdxSysinfo, kvm_xfam: int = KVM_SUPPORTED_XFAM) -> int:
    if kvm_xfam & info[Field.XFAM_FIXED1] != info[Field.XFAM_FIXED1]:
        return 0
    return kvm_xfam & info[Field.XFAM_FIXED0]


def kvm_tdx_hardware_setup(info: TdxSysinfo | None, present_cpus: int) -> int:
    """__tdx_hardware_setup(): 0 (tdx=Y), -19 (-ENODEV: tdx=N, load succeeds) or -22 (load fails)."""
    if info is None:
        return -19
    if not supported_attrs(info) or not supported_xfam(info):
        return -22
    if not info[Field.TDX_FEATURES0] & TOPOLOGY_ENUM:
        return -22
    if info[Field.MAX_VCPUS_PER_TD] < present_cpus:
        return -22
    if info[Field.NUM_CPUID_CONFIG] > 128:  # get_tdx_sys_info_td_conf() refuses it at boot
        return -22
    return 0


# --- (b) VM creation --------------------------------------------------------------------------------


def kvm_capabilities(info: TdxSysinfo) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """KVM_TDX_CAPABILITIES cpuid entries (td_init_cpuid_entry2): (function, index, regs)."""
    entries = []
    for leaves, (v0, v1) in zip(info.cpuid_leaves, info.cpuid_values):
        function, index = leaves & 0xFFFFFFFF, leaves >> 32
        eax, ebx, ecx, edx = v0 & 0xFFFFFFFF, v0 >> 32, v1 & 0xFFFFFFFF, v1 >> 32
        if index == 0xFFFFFFFF:
            index = 0
        if function == 0x80000008:
            eax = (eax & ~0xFF0000) | 0xFF << 16
        if (function, index) == (7, 0):
            ebx &= ~((1 << 4) | (1 << 11))  # TSX
            ecx &= ~(1 << 5)  # WAITPKG
        entries.append((function, index, (eax, ebx, ecx, edx)))
    return entries


def kvm_td_params(info: TdxSysinfo, attributes: int, xfam: int, max_vcpus: int, tsc_khz: int,
                  mrconfigid: bytes = bytes(48), gpaw_bits: int = 48, fms: int = 0) -> bytes:
    """setup_tdparams(): struct td_params exactly as KVM lays it out (1024 bytes), from the
    CAPABILITIES entries as userspace passes them back, but for CPUID(1).EAX: CAPABILITIES offers
    its CONFIG_DIRECT mask there, which the module refuses as a family/model/stepping, so
    userspace puts ``fms`` (a VMM its vCPU model's; 0 asks the module for the platform's)."""
    eptp = VMX_EPTP_MT_WB | VMX_EPTP_PWL_4
    header = struct.pack("<QQH6sQQH38s48s48s48s32s", attributes | info[Field.ATTRIBUTES_FIXED1],
                         xfam | info[Field.XFAM_FIXED1], max_vcpus, bytes(6), eptp,
                         TDX_CONFIG_FLAGS_NO_RBP_MOD, tsc_khz // 25000, bytes(38), mrconfigid,
                         bytes(48), bytes(48), bytes(32))
    assert len(header) == 256
    values = b""
    for function, _index, (eax, ebx, ecx, edx) in kvm_capabilities(info):
        # Userspace sets GPAW 48 in 0x80000008 EAX[23:16]; KVM turns it into EPTP/CONFIG_FLAGS
        # and clears it, since the module does not take it here.
        assert gpaw_bits == 48
        value_eax = {0x80000008: eax & ~0xFF0000, 1: fms}.get(function, eax)
        values += struct.pack("<IIII", value_eax, ebx, ecx, edx)
    return (header + values).ljust(abi.TD_PARAMS_SIZE, b"\0")


@dataclass
class KvmVcpu:
    vcpu_id: int
    cpu: int  # the LP it was loaded on (vcpu->cpu)
    tdvpr: int = 0
    tdcx: list[int] = field(default_factory=list)


@dataclass
class KvmTd:
    """One TD as struct kvm_tdx sees it, driving the module like tdx.c does."""

    module: TdxModule
    memory: SparseMemory
    pages: PageAllocator
    info: TdxSysinfo
    hkid: int = 0
    tdr: int = 0
    tdcs: list[int] = field(default_factory=list)
    vcpus: list[KvmVcpu] = field(default_factory=list)
    sept_pages: dict[tuple[int, int], int] = field(default_factory=dict)  # (tdx level, gpa base) -> page
    private: dict[int, int] = field(default_factory=dict)  # gpa -> pfn page
    runnable: bool = False
    hw_error: int = 0

    @property
    def cpus_by_package(self) -> list[int]:
        """First online CPU of each package, as the for_each_online_cpu loops pick them."""
        seen: dict[int, int] = {}
        for cpu in self.module.platform.cpus:
            seen.setdefault(cpu.package, cpu.apic_id)
        return list(seen.values())

    def sc(self, fn: int, cpu: int | None = None, ok: tuple[int, ...] = (0,), **regs: int) -> SeamcallResult:
        return seamcall(self.module, self.memory, self.cpus_by_package[0] if cpu is None else cpu, fn, ok, **regs)

    # KVM_TDX_INIT_VM -> tdx_td_init() -> __tdx_td_init()
    def init_vm(self, attributes: int = 0, xfam: int = 0x3, max_vcpus: int | None = None,
                tsc_khz: int = 2_000_000, params: bytes | None = None) -> None:
        platform = self.module.platform
        self.hkid = self.hkid or platform.tdx_keyid_start + 1  # tdx_guest_keyid_alloc(): first free
        self.tdr = self.pages.alloc()
        self.sc(Leaf.TDH_MNG_CREATE, rcx=self.tdr, rdx=self.hkid)
        for cpu in self.cpus_by_package:
            self.sc(Leaf.TDH_MNG_KEY_CONFIG, cpu=cpu, rcx=self.tdr)
        for _ in range(self.info[Field.TDCS_BASE_SIZE] // PAGE):
            page = self.pages.alloc()
            self.sc(Leaf.TDH_MNG_ADDCX, rcx=page, rdx=self.tdr)
            self.tdcs.append(page)
        if params is None:
            vcpus = len(platform.cpus) if max_vcpus is None else max_vcpus
            params = kvm_td_params(self.info, attributes, xfam, vcpus, tsc_khz)
        params_pa = self.pages.alloc() & ~(abi.TD_PARAMS_ALIGN - 1)
        self.memory.write(params_pa, params)
        result = call(self.module, self.memory, self.cpus_by_package[0], Leaf.TDH_MNG_INIT, rcx=self.tdr,
                      rdx=params_pa)
        if result.status & abi.STATUS_MASK == Status.TDX_OPERAND_INVALID:
            self.hw_error = result.status  # -EINVAL, cmd->hw_error for userspace
        if result.status:
            raise SeamcallFailed(Leaf.TDH_MNG_INIT, result)
        for code in (abi.TdcsExecField.TSC_OFFSET, abi.TdcsExecField.TSC_MULTIPLIER):
            self.sc(Leaf.TDH_MNG_RD, rcx=self.tdr, rdx=TD_CLASS_EXECUTION_CONTROLS << 56 | code)

    # KVM_TDX_INIT_VCPU -> tdx_vcpu_init() -> tdx_td_vcpu_init()
    def init_vcpu(self, vcpu_id: int, cpu: int, initial_rcx: int = 0) -> KvmVcpu:
        vcpu = KvmVcpu(vcpu_id, cpu, tdvpr=self.pages.alloc())
        self.sc(Leaf.TDH_VP_CREATE, cpu=cpu, rcx=vcpu.tdvpr, rdx=self.tdr)
        for _ in range(self.info[Field.TDVPS_BASE_SIZE] // PAGE - 1):
            page = self.pages.alloc()
            self.sc(Leaf.TDH_VP_ADDCX, cpu=cpu, rcx=page, rdx=vcpu.tdvpr)
            vcpu.tdcx.append(page)
        self.sc(Leaf.TDH_VP_INIT | 1 << abi.LEAF_VERSION_SHIFT, cpu=cpu, rcx=vcpu.tdvpr, rdx=initial_rcx,
                r8=vcpu_id)
        self.vcpus.append(vcpu)
        pi_desc = 0x100040 + 64 * vcpu_id
        for fid, data, mask in ((abi.VmcsField.POSTED_INTR_NV, POSTED_INTR_VECTOR, 0xFFFF),
                                (abi.VmcsField.POSTED_INTR_DESC_ADDR, pi_desc, (1 << 64) - 1),
                                (abi.VmcsField.PIN_BASED_VM_EXEC_CONTROL, abi.PIN_BASED_POSTED_INTR,
                                 abi.PIN_BASED_POSTED_INTR)):
            self.sc(Leaf.TDH_VP_WR, cpu=cpu, rcx=vcpu.tdvpr, rdx=TDVPS_VMCS << 56 | fid, r8=data, r9=mask)
        return vcpu

    # KVM_TDX_INIT_MEM_REGION -> tdx_gmem_post_populate(), one page
    def add_page(self, gpa: int, source: int, measure: bool, cpu: int | None = None) -> int:
        for tdx_level in (3, 2, 1):  # PML4E -> PDPT, PDPTE -> PD, PDE -> PT
            base = gpa & ~((1 << (12 + 9 * tdx_level)) - 1)
            if (tdx_level, base) not in self.sept_pages:
                page = self.pages.alloc()
                self.sc(Leaf.TDH_MEM_SEPT_ADD, cpu=cpu, rcx=base | tdx_level, rdx=self.tdr, r8=page)
                self.sept_pages[(tdx_level, base)] = page
        pfn_page = self.pages.alloc()
        fn = Leaf.TDH_MEM_PAGE_AUG if self.runnable else Leaf.TDH_MEM_PAGE_ADD
        self.sc(fn, cpu=cpu, rcx=gpa, rdx=self.tdr, r8=pfn_page, r9=0 if self.runnable else source)
        self.private[gpa] = pfn_page
        if measure:
            for offset in range(0, PAGE, abi.MR_EXTEND_CHUNK):
                self.sc(Leaf.TDH_MR_EXTEND, cpu=cpu, rcx=gpa + offset, rdx=self.tdr)
        return pfn_page

    # KVM_TDX_FINALIZE_VM
    def finalize(self) -> None:
        self.sc(Leaf.TDH_MR_FINALIZE, rcx=self.tdr)
        self.runnable = True

    # KVM_RUN -> tdx_vcpu_enter_exit(): RCX = TDVPR, the other registers as KVM left them
    def enter(self, vcpu: KvmVcpu, **regs: int) -> tuple[int, dict[str, int]]:
        result = call(self.module, self.memory, vcpu.cpu, Leaf.TDH_VP_ENTER, **{**regs, "rcx": vcpu.tdvpr})
        return result.status, dict(zip(REGISTERS, result.regs))

    def mrtd(self) -> bytes:
        elements = [self.sc(Leaf.TDH_MNG_RD, rcx=self.tdr, rdx=19 << 56 | i).regs[2] for i in range(6)]
        return b"".join(e.to_bytes(8, "little") for e in elements)

    # --- (c) teardown ---------------------------------------------------------------------------

    def keyed(self, pa: int, hkid: int) -> int:
        """mk_keyed_paddr()."""
        return pa | hkid << self.module.platform.hkid_shift

    def remove_page(self, gpa: int) -> None:
        """tdx_sept_remove_leaf_spte(): guest_memfd release or a private->shared conversion."""
        self.sc(Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa, rdx=self.tdr)
        if self.runnable:  # tdx_track() does nothing before FINALIZE
            self.sc(Leaf.TDH_MEM_TRACK, rcx=self.tdr)
        pfn_page = self.private.pop(gpa)
        self.sc(Leaf.TDH_MEM_PAGE_REMOVE, rcx=gpa, rdx=self.tdr)
        self.sc(Leaf.TDH_PHYMEM_PAGE_WBINVD, rcx=self.keyed(pfn_page, self.hkid))

    def release_hkid(self) -> None:
        """tdx_mmu_release_hkid()."""
        for vcpu in self.vcpus:
            self.sc(Leaf.TDH_VP_FLUSH, cpu=vcpu.cpu, ok=(0, Status.TDX_VCPU_NOT_ASSOCIATED), rcx=vcpu.tdvpr)
        self.sc(Leaf.TDH_MNG_VPFLUSHDONE, rcx=self.tdr)
        for cpu in self.cpus_by_package:  # smp_func_do_phymem_cache_wb()
            resume = 0
            while True:
                status = self.sc(Leaf.TDH_PHYMEM_CACHE_WB, cpu=cpu, rcx=resume,
                                 ok=(0, Status.TDX_INTERRUPTED_RESUMABLE, Status.TDX_NO_HKID_READY_TO_WBCACHE)).status
                if status != Status.TDX_INTERRUPTED_RESUMABLE:
                    break
                resume = 1
        self.sc(Leaf.TDH_MNG_KEY_FREEID, rcx=self.tdr)

    def reclaim(self, page: int) -> SeamcallResult:
        return self.sc(Leaf.TDH_PHYMEM_PAGE_RECLAIM, rcx=page)

    def destroy(self) -> None:
        """kvm_destroy_vm(): guest_memfd gone first, then pre_destroy, vCPUs, the mirror EPT, the TD."""
        for gpa in list(self.private):
            self.remove_page(gpa)
        self.release_hkid()
        for vcpu in self.vcpus:  # tdx_vcpu_free()
            for page in vcpu.tdcx:
                self.reclaim(page)
            self.reclaim(vcpu.tdvpr)
        for page in self.sept_pages.values():  # tdx_sept_free_private_spt()
            self.reclaim(page)
        for page in self.tdcs:  # tdx_reclaim_td_control_pages()
            self.reclaim(page)
        self.reclaim(self.tdr)
        self.sc(Leaf.TDH_PHYMEM_PAGE_WBINVD, rcx=self.keyed(self.tdr, self.module.platform.tdx_keyid_start))


def new_td(module: TdxModule, memory: SparseMemory | None = None, pages: PageAllocator | None = None) -> KvmTd:
    memory = memory or SparseMemory(RAM)
    return KvmTd(module, memory, pages or PageAllocator(), read_sysinfo(module, memory))
