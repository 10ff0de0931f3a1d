"""The platform checks of TDH.SYS.INIT and TDH.SYS.LP.INIT (TDX module 1.5.01:
src/vmm_dispatcher/api_calls/tdh_sys_init.c check_msrs()/check_cpuid_configurations()/
check_vmx_msrs()/check_key_management_config(), tdh_sys_lp_init.c, the verify masks of
include/auto_gen/cpuid_configurations.c), for a platform whose LPs are not all alike.

A platform states per LP how it deviates from the rest (PlatformConfig.lp_deviations): an MSR
that reads differently, a CPUID leaf that does, IA32_MISC_ENABLE.BOOT_NT4 set. SYS.INIT checks
the values of its own LP: a deviating MSR the module checks is a value it does not accept
(TDX_INCORRECT_MSR_VALUE + the MSR); one it only samples (IA32_TSC_ADJUST, SMRR) just becomes
the reference. LP.INIT compares every LP with the SYS.INIT LP, in the module's order, so two
LPs that deviate alike agree with each other and differ from the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.seam.abi import Status
from harness.seam.call import Call

NO_SUBLEAF = 0xFFFFFFFF

# tdh_sys_init.c check_msrs(), check_vmx_msrs(), check_key_management_config(): the MSRs whose
# value SYS.INIT checks on its LP, in that order.
SYSINIT_CHECKED_MSRS = (0x10A, 0xBD, 0xBC, 0x345,
                        0x480, 0x48D, 0x48E, 0x48B, 0x492, 0x48F, 0x490, 0x485, 0x48C, 0x486, 0x487, 0x488, 0x489,
                        0x982, 0x981, 0x99)
# tdh_sys_lp_init.c: the MSRs compared with the SYS.INIT LP's, in order, split where the CPUID
# compare (and IA32_TSC_ADJUST after it) comes between.
LPINIT_MSRS_BEFORE_CPUID = (0xCF, 0x10A, 0xBC, 0xBD)
LPINIT_MSRS_AFTER_CPUID = (0x3B,  # IA32_TSC_ADJUST
                           0xFE, 0x1F2, 0x1F3, 0x1F6, 0x1F7,  # MTRRCAP, SMRR, SMRR2
                           0x480, 0x48D, 0x48E, 0x48B, 0x492, 0x48F, 0x490, 0x485, 0x48C, 0x486, 0x487, 0x488, 0x489,
                           0x345,  # IA32_PERF_CAPABILITIES
                           0x981, 0x982, 0x87, 0x98, 0x99)  # TME, KeyID partitioning, WBINVDP/WBNOINVDP
# The CPUID entries LP.INIT compares (cpuid_lookup[] order) and their verify_same masks as
# (EBX:EAX, EDX:ECX), which it returns in RDX and R8.
_ALL = (1 << 64) - 1
LPINIT_CPUID_COMPARED: dict[tuple[int, int], tuple[int, int]] = {
    (0x1, NO_SUBLEAF): (0x0000FFFF_F000C000, 0xFFFFFFFF_F7FFFF9F),  # not family/model/stepping, APIC id
    **{(0x4, sub): (_ALL, _ALL) for sub in range(4)},
    (0x7, 0): (0xFFFFFFFB_FFFFFFFF, 0xFFEBFFFF_BFC1FF6F),
    **{(0x1F, sub): (_ALL, 0x00000000_FFFFFFFF) for sub in range(6)},  # not the x2APIC id in EDX
}


@dataclass(frozen=True)
class LpDeviation:
    """How LP ``apic_id`` differs from the platform's other LPs."""

    apic_id: int
    msrs: frozenset[int] = field(default_factory=frozenset)  # MSRs that read differently here
    cpuid: frozenset[tuple[int, int]] = field(default_factory=frozenset)  # (leaf, subleaf or NO_SUBLEAF)
    boot_nt4: bool = False  # IA32_MISC_ENABLE bit 22 (limit CPUID maxval) set on this LP

    def __post_init__(self) -> None:
        known = set(SYSINIT_CHECKED_MSRS) | set(LPINIT_MSRS_BEFORE_CPUID) | set(LPINIT_MSRS_AFTER_CPUID)
        unknown_msrs = sorted(hex(m) for m in self.msrs - known)
        unknown_leaves = sorted(self.cpuid - LPINIT_CPUID_COMPARED.keys())
        if unknown_msrs or unknown_leaves:
            raise ValueError(f"LP {self.apic_id}: the module checks no MSR {unknown_msrs} / CPUID {unknown_leaves}; "
                             f"CPUID entries modelled: {sorted(LPINIT_CPUID_COMPARED)}")


def sys_init_status(deviation: LpDeviation) -> int:
    """What SYS.INIT's platform checks answer on an LP that deviates so (0: they pass)."""
    for msr in SYSINIT_CHECKED_MSRS[:4]:
        if msr in deviation.msrs:
            return Status.TDX_INCORRECT_MSR_VALUE + msr
    if deviation.boot_nt4:
        return Status.TDX_LIMIT_CPUID_MAXVAL_SET
    for msr in SYSINIT_CHECKED_MSRS[4:]:
        if msr in deviation.msrs:
            return Status.TDX_INCORRECT_MSR_VALUE + msr
    return 0


def lp_init_status(here: LpDeviation, sysinit_lp: LpDeviation, call: Call) -> int:
    """What LP.INIT's compare of the calling LP (``here``) with the SYS.INIT LP answers (0:
    alike); a CPUID difference names the leaf in RCX and the compared bits in RDX/R8."""
    differs = _difference(here, sysinit_lp)
    for msr in LPINIT_MSRS_BEFORE_CPUID:
        if msr in differs.msrs:
            return Status.TDX_INCONSISTENT_MSR + msr
    if here.boot_nt4:
        return Status.TDX_LIMIT_CPUID_MAXVAL_SET
    for (leaf, subleaf), (low, high) in LPINIT_CPUID_COMPARED.items():
        if (leaf, subleaf) in differs.cpuid:
            call.outputs.update(rcx=subleaf << 32 | leaf, rdx=low, r8=high)
            return Status.TDX_INCONSISTENT_CPUID_FIELD
    for msr in LPINIT_MSRS_AFTER_CPUID:
        if msr in differs.msrs:
            return Status.TDX_INCONSISTENT_MSR + msr
    return 0


def _difference(a: LpDeviation, b: LpDeviation) -> LpDeviation:
    return LpDeviation(a.apic_id, msrs=frozenset(a.msrs ^ b.msrs), cpuid=frozenset(a.cpuid ^ b.cpuid))
