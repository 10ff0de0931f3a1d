"""The platform the software TDX module runs on: what the BIOS programmed and what the CPU is.

A frozen dataclass, so a scenario states its platform as data and the trace can record it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from harness.seam import abi
from harness.seam.image import DEFAULT_SIGNER, ModuleImage
from harness.seam.lp_checks import LpDeviation
from harness.seam.profiles import DEFAULT_PROFILE, ModuleProfile, profile


@dataclass(frozen=True)
class LogicalCpu:
    apic_id: int
    package: int


def qemu_topology(sockets: int, cores: int, threads: int = 1) -> tuple[LogicalCpu, ...]:
    """Logical CPUs with the APIC ids QEMU assigns: thread, core and package fields each
    padded to a power of two (so -smp 6,sockets=2 gives ids 0,1,2,4,5,6)."""
    thread_bits = math.ceil(math.log2(threads)) if threads > 1 else 0
    core_bits = math.ceil(math.log2(cores)) if cores > 1 else 0
    return tuple(
        LogicalCpu(apic_id=(pkg << (core_bits + thread_bits)) | (core << thread_bits) | thread, package=pkg)
        for pkg in range(sockets) for core in range(cores) for thread in range(threads)
    )


@dataclass(frozen=True)
class CpuidValue:
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    @property
    def regs(self) -> tuple[int, int, int, int]:
        return self.eax, self.ebx, self.ecx, self.edx


@dataclass(frozen=True)
class CpuidConfig:
    """One CPUID_CONFIG entry and what TDH.MNG.INIT makes of that leaf.

    ``eax``..``edx``: CONFIG_DIRECT, the bits TD_PARAMS sets directly and the only ones TDH.SYS.RD
    reports (metadata_sys.c). ``allow_direct``: bits TD_PARAMS may set too, which the TD then sees
    only if the CPU has them. ``fixed0`` (the module's FIXED0_OR_DYNAMIC) and ``fixed1``: bits the
    TD sees as 0 or 1 whatever is configured. Those four come from the module's tables
    (include/auto_gen/cpuid_configurations.c). ``native``: what the CPU returns for the leaf,
    which TDH.SYS.INIT samples; for CPUID(1).EAX that is the platform's family/model/stepping."""

    leaf: int
    subleaf: int = 0xFFFFFFFF  # "no subleaf"
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0
    allow_direct: CpuidValue = CpuidValue()
    fixed0: CpuidValue = CpuidValue()
    fixed1: CpuidValue = CpuidValue()
    native: CpuidValue = CpuidValue()

    @property
    def leaves_field(self) -> int:
        return (self.subleaf << 32) | self.leaf

    @property
    def values_fields(self) -> tuple[int, int]:
        return (self.ebx << 32) | self.eax, (self.edx << 32) | self.ecx

    @property
    def config_direct(self) -> CpuidValue:
        return CpuidValue(self.eax, self.ebx, self.ecx, self.edx)


# The TDX 1.5.01 module's CPUID_CONFIG entries for leaves 1, 7.0 and 0x80000008
# (cpuid_configurations.c: cpuid_configurable[0], [5], [9] and cpuid_lookup[0], [5], [9]), in the
# module's order. The module has nine more (4.0-4.3, 7.1, 7.2, 0xA, 0x1C, 0x23.0), not modelled:
# NUM_CPUID_CONFIG reads 3, and TD_PARAMS carries three CPUID values.
# The native values are an illustrative Sapphire Rapids: F/M/S 0x806F8 (cpuid_fms.h
# SPR_NATIVE_FMS | SPR_LATEST_STEPPING), every CPUID(7,0) feature a VMM may allow except TSX, 46
# physical address bits (max_pa_bits), WBNOINVD.
DEFAULT_CPUID_CONFIG = (
    CpuidConfig(leaf=0x1, eax=0x0FFF3FFF, ebx=0x00FF0000,
                allow_direct=CpuidValue(ecx=0x31044D88, edx=0xB8440000),
                fixed0=CpuidValue(0xF000C000, 0xFF0000FF, 0x08010060, 0x40120400),
                fixed1=CpuidValue(ecx=0x80000000, edx=0x00000200),
                native=CpuidValue(0x000806F8, 0x00800800, 0x7FFEFBFF, 0xBFEBFBFF)),
    CpuidConfig(leaf=0x7, subleaf=0,
                allow_direct=CpuidValue(ebx=0xDC2B9B18, ecx=0x02417F65, edx=0x0005411C),
                fixed0=CpuidValue(ebx=0x00404006, ecx=0x643E8010, edx=0x002298C3),
                native=CpuidValue(0x00000002, 0xFDBFB7CB, 0x9B417F65, 0xFC0D451C)),
    CpuidConfig(leaf=0x80000008,
                allow_direct=CpuidValue(ebx=0x00000200),
                fixed0=CpuidValue(0xFFFF0000, 0xFFFFFDFF, 0xFFFFFFFF, 0xFFFFFFFF),
                native=CpuidValue(eax=0x0000302E, ebx=0x00000200)),
)


@dataclass(frozen=True)
class PlatformConfig:
    """The "BIOS and CPU" seen by the module and, through HELLO, by the kernel shim."""

    # IA32_MKTME_KEYID_PARTITIONING: KeyID 0 is the host's; then MKTME KeyIDs; then TDX KeyIDs.
    nr_mktme_keyids: int = 15
    nr_tdx_keyids: int = 48
    cpus: tuple[LogicalCpu, ...] = qemu_topology(sockets=1, cores=2)
    # Convertible memory ranges (base, size): what the BIOS reports as TDX-capable DRAM.
    cmrs: tuple[tuple[int, int], ...] = ((abi.SZ_1M, (2 << 30) - abi.SZ_1M),)
    # Physical address width; the top HKID bits of it carry the KeyID.
    max_pa_bits: int = 46
    # SEAMRR (base, size): the range the module itself lives in, outside every CMR. Size 0: the
    # emulated machine reserves none, so no address the kernel passes can overlap it.
    seamrr: tuple[int, int] = (0, 0)
    module_present: bool = True
    # Which public module release the dispatcher follows (profiles.py); the four fields after it
    # are what that release reports (for_profile() sets them; a test may change one alone).
    module_profile: str = DEFAULT_PROFILE
    major_version: int = profile(DEFAULT_PROFILE).major_version
    minor_version: int = profile(DEFAULT_PROFILE).minor_version
    update_version: int = profile(DEFAULT_PROFILE).update_version
    tdx_features0: int = profile(DEFAULT_PROFILE).tdx_features0
    # The handoff fields of the module's SIGSTRUCT (0 and off: the module source's build defaults,
    # proj_defs.mk).
    module_hv: int = 0
    min_update_hv: int = 0
    no_downgrade: bool = False
    # The P-SEAMLDR (runtime module update): whether there is one, the version SEAMLDR.INFO
    # reports, how many updates it can still install (SEAMDB entries left), which image signers
    # it trusts (image.py).
    seamldr_present: bool = True
    seamldr_version: tuple[int, int, int] = (2, 0, 0)
    seamldr_updates: int = 4
    seamldr_signers: tuple[str, ...] = (DEFAULT_SIGNER,)
    max_tdmrs: int = 64
    max_reserved_per_tdmr: int = 16
    pamt_entry_sizes: tuple[int, int, int] = (abi.PAMT_ENTRY_SIZE,) * 3  # 4K, 2M, 1G
    partial_write_erratum: bool = False
    # The CPU clears the current VMCS when a P-SEAMLDR call returns (IA32_VMX_BASIC bit 60
    # clear): Linux then refuses P-SEAMLDR calls and hides the module-update ABI.
    seamret_invd_vmcs_erratum: bool = False
    # TDMR.INIT initializes this many bytes of a TDMR per call: 4 MiB in the real module (it
    # bounds the latency of one SEAMCALL); larger only to make a test faster.
    tdmr_init_chunk: int = abi.TDMR_INIT_CHUNK
    tdr_base_size: int = 4096
    # What TDX 1.5 reports: MIN_NUM_TDCS_PAGES and MIN_TDVPS_PAGES (TDVPR + 5 TDCX) pages.
    tdcs_base_size: int = 6 * 4096
    tdvps_base_size: int = 6 * 4096
    attributes_fixed0: int = 0x80000000D0000001  # DEBUG, SEPT_VE_DISABLE, PKS, KL, PERFMON
    attributes_fixed1: int = 0
    xfam_fixed0: int = 0x000602E7
    xfam_fixed1: int = 0x00000003
    max_vcpus_per_td: int = 576
    cpuid_config: tuple[CpuidConfig, ...] = DEFAULT_CPUID_CONFIG
    # IA32_VMX_EPT_VPID_CAP: whether 5-level EPT (GPAW 52) is available to TDs.
    ept_pml5_supported: bool = False
    # Native TSC frequency: TDH.MNG.INIT derives the TD's TSC multiplier from it.
    tsc_frequency_hz: int = 2_000_000_000
    # LPs that are not like the others (lp_checks.py): SYS.INIT and LP.INIT find them.
    lp_deviations: tuple[LpDeviation, ...] = ()
    # TDH.PHYMEM.CACHE.WB writes back this many cache sub-blocks per call before answering
    # TDX_INTERRUPTED_RESUMABLE (1: one call does it all).
    cache_wb_chunks: int = 1
    # TDH.SYS.DISABLE finishes in this many calls, the earlier ones answering
    # TDX_INTERRUPTED_RESUMABLE (host_init.sys_disable(); 1: one call does it all).
    sys_disable_calls: int = 1
    # Lock contention between LPs (locks.py): a leaf of cost 1 holds its locks this many seconds
    # of the module clock after it begins, and a call from another CPU meeting one of them gets
    # the module's busy status. 0: off (the transport's serialized calls never contend).
    lock_hold_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.cpus:
            raise ValueError("platform needs at least one logical CPU")
        profile(self.module_profile)  # a clear error for an unknown name
        ids = [cpu.apic_id for cpu in self.cpus]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate APIC ids in {ids}")
        if self.nr_mktme_keyids < 0 or self.nr_tdx_keyids < 0:
            raise ValueError("KeyID counts must be >= 0")
        if 1 + self.nr_mktme_keyids + self.nr_tdx_keyids > 1 << abi.MAX_KEYID_BITS:
            raise ValueError(f"KeyID counts must fit in {abi.MAX_KEYID_BITS} bits with KeyID 0: "
                             f"{self.nr_mktme_keyids} MKTME + {self.nr_tdx_keyids} TDX")
        if self.tdmr_init_chunk <= 0 or self.tdmr_init_chunk % abi.SZ_4K:
            raise ValueError("tdmr_init_chunk must be a positive multiple of 4 KiB")
        if self.cache_wb_chunks < 1:
            raise ValueError("cache_wb_chunks must be >= 1")
        if self.sys_disable_calls < 1:
            raise ValueError("sys_disable_calls must be >= 1")
        if self.lock_hold_s < 0:
            raise ValueError("lock_hold_s must be >= 0")
        strays = [d.apic_id for d in self.lp_deviations if d.apic_id not in ids]
        if strays or len({d.apic_id for d in self.lp_deviations}) != len(self.lp_deviations):
            raise ValueError(f"lp_deviations: one per LP of the platform (APIC ids {ids}), "
                             f"got {strays or 'duplicates'}")
        if self.seamldr_updates < 0:
            raise ValueError("seamldr_updates must be >= 0")
        if self.tdcs_base_size % abi.SZ_4K or self.tdvps_base_size < 2 * abi.SZ_4K:
            raise ValueError("TDCS/TDVPS sizes are whole pages; TDVPS has a TDVPR and a TDCX at least")

    @classmethod
    def for_profile(cls, name: str, **changes: object) -> PlatformConfig:
        """The platform of module release ``name``, with ``changes`` on top."""
        found = profile(name)
        reported = {"module_profile": name, "major_version": found.major_version,
                    "minor_version": found.minor_version, "update_version": found.update_version,
                    "tdx_features0": found.tdx_features0}
        return cls(**{**reported, **changes})  # type: ignore[arg-type]

    @property
    def profile(self) -> ModuleProfile:
        return profile(self.module_profile)

    @property
    def module_image(self) -> ModuleImage:
        """The module the BIOS loaded (what runs until a runtime update replaces it)."""
        return ModuleImage(self.major_version, self.minor_version, self.update_version,
                           module_hv=self.module_hv, min_update_hv=self.min_update_hv,
                           no_downgrade=self.no_downgrade)

    @property
    def tdx_keyid_start(self) -> int:
        return self.nr_mktme_keyids + 1

    @property
    def tdx_keyids(self) -> range:
        return range(self.tdx_keyid_start, self.tdx_keyid_start + self.nr_tdx_keyids)

    @property
    def packages(self) -> frozenset[int]:
        return frozenset(cpu.package for cpu in self.cpus)

    @property
    def hkid_bits(self) -> int:
        """Number of PA bits the KeyID takes (at the top of the physical address)."""
        total = self.nr_mktme_keyids + self.nr_tdx_keyids + 1
        return max(1, math.ceil(math.log2(total))) if total > 1 else 0

    @property
    def max_pa(self) -> int:
        """First physical address that is not usable memory: the HKID bits begin here."""
        return 1 << (self.max_pa_bits - self.hkid_bits)

    @property
    def hkid_shift(self) -> int:
        """Bit position of the KeyID in a physical address."""
        return self.max_pa_bits - self.hkid_bits

    def address_of(self, pa: int) -> int:
        """The memory address ``pa`` names: its KeyID bits (which select a key, not other memory)
        cleared."""
        return pa & (self.max_pa - 1)

    @property
    def tdcs_pages(self) -> int:
        return self.tdcs_base_size // abi.SZ_4K

    @property
    def tdcx_pages(self) -> int:
        """TDCX pages per vCPU: TDVPS minus the TDVPR page."""
        return self.tdvps_base_size // abi.SZ_4K - 1

    def deviation_of(self, apic_id: int) -> LpDeviation:
        return next((d for d in self.lp_deviations if d.apic_id == apic_id), LpDeviation(apic_id))

    def package_of(self, apic_id: int) -> int | None:
        for cpu in self.cpus:
            if cpu.apic_id == apic_id:
                return cpu.package
        return None

    def replace(self, **changes: object) -> PlatformConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def cmrs_for_ram(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """CMRs for a machine whose RAM is ``ranges`` [(base, size)]: the BIOS does not report the
    first 1 MiB as convertible (Linux relies on that, see build_tdx_memlist())."""
    cmrs = []
    for base, size in sorted(ranges):
        start, end = max(base, abi.SZ_1M), base + size
        if start < end:
            cmrs.append((start, end - start))
    return tuple(cmrs)
