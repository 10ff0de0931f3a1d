"""What Linux 7.2/7.3 concludes about a machine check on a TDX host, as a model tests compute
expectations from (never from output).

The partial-write erratum message, "Machine check: TDX private memory error. Possible kernel
bug.", comes from one chain (arch/x86/kernel/cpu/mce/core.c, arch/x86/virt/vmx/tdx/tdx.c):

    mce_panic()                        only on a fatal #MC (never for a logged-only record)
      mce_dump_aux_info()              only with X86_BUG_TDX_PW_MCE (check_tdx_erratum())
        tdx_dump_mce_info()            mce_is_memory_error() && mce_usable_address()
          paddr_is_tdx_private()       X86_FEATURE_TDX_HOST_PLATFORM, then
            TDH.PHYMEM.PAGE.RDMD       RCX = addr & PAGE_MASK; any error status -> not private
                                       (#UD outside VMX operation: TDX_SEAMCALL_UD, an error)
            page type in RCX           PT_NDA -> no; PT_RSVD -> is_pamt_page(); others -> yes
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from harness.machine.mce import Mce
from harness.seam.abi import PageType
from harness.seam.tdmr import TdmrInfo

# check_tdx_erratum(): boot_cpu_data.x86_vfm of INTEL_SAPPHIRERAPIDS_X or INTEL_EMERALDRAPIDS_X.
PW_MCE_ERRATUM_CPUS = frozenset({(6, 0x8F), (6, 0xCF)})


def has_pw_mce_erratum(vendor: str, family: int, model: int) -> bool:
    """Whether the CPU model has the partial-write erratum, as check_tdx_erratum() lists them."""
    return vendor == "GenuineIntel" and (family, model) in PW_MCE_ERRATUM_CPUS


def sets_pw_mce_bug(vendor: str, family: int, model: int, host_platform: bool) -> bool:
    """Whether Linux sets X86_BUG_TDX_PW_MCE ("tdx_pw_mce" in /proc/cpuinfo bugs):
    check_tdx_erratum() runs last in tdx_init(), after X86_FEATURE_TDX_HOST_PLATFORM is set, so
    a platform the kernel does not take for a TDX host never gets the flag."""
    return host_platform and has_pw_mce_erratum(vendor, family, model)


def pamt_ranges(tdmrs: Iterable[TdmrInfo]) -> list[tuple[int, int]]:
    """[start, end) of each TDMR's PAMT as tdmr_get_pamt() sees it: one allocation starting at
    the 4K PAMT, as long as the three PAMTs together (empty for a TDMR without PAMT)."""
    ranges = []
    for tdmr in tdmrs:
        size = tdmr.pamt_4k_size + tdmr.pamt_2m_size + tdmr.pamt_1g_size
        if size:
            ranges.append((tdmr.pamt_4k_base, tdmr.pamt_4k_base + size))
    return ranges


def is_pamt_page(pa: int, pamts: Sequence[tuple[int, int]]) -> bool:
    return any(start <= pa < end for start, end in pamts)


@dataclass(frozen=True)
class RdmdAnswer:
    """What TDH.PHYMEM.PAGE.RDMD returned: its status and, on success, the page type in RCX."""

    status: int
    page_type: int = PageType.PT_NDA


def paddr_is_tdx_private(pa: int, answer: RdmdAnswer, pamts: Sequence[tuple[int, int]]) -> bool:
    """paddr_is_tdx_private() after the SEAMCALL: a failed RDMD means "no working module, so no
    private pages"; PAMT pages are PT_RSVD to the module yet private to the kernel."""
    if answer.status:
        return False
    if answer.page_type == PageType.PT_NDA:
        return False
    if answer.page_type == PageType.PT_RSVD:
        return is_pamt_page(pa, pamts)
    return True


@dataclass(frozen=True)
class MceConditions:
    """The facts the kernel's decision depends on, apart from the module's answer."""

    erratum: bool  # X86_BUG_TDX_PW_MCE
    host_platform: bool  # X86_FEATURE_TDX_HOST_PLATFORM ("tdx_host_platform" in cpuinfo flags)
    reaches_panic: bool  # the record reaches mce_panic(): a fatal #MC, not a logged-only record
    # The CPU is in VMX operation. tdx_enable() takes a reference on every online CPU through its
    # cpuhp state and, when init_tdx_module() fails, cpuhp_remove_state() drops them again.
    vmx_operation: bool = True


def rdmd_expected(mce: Mce, cond: MceConditions) -> bool:
    """Whether the kernel issues TDH.PHYMEM.PAGE.RDMD for this machine check."""
    return (cond.reaches_panic and cond.erratum and mce.is_memory_error() and mce.has_usable_address()
            and cond.host_platform)


def rdmd_reaches_module(mce: Mce, cond: MceConditions) -> bool:
    """Whether the kernel's RDMD gets to the module: outside VMX operation SEAMCALL is #UD, which
    the SEAMCALL fixup turns into TDX_SEAMCALL_UD before SEAM is entered."""
    return rdmd_expected(mce, cond) and cond.vmx_operation


def tdx_message_expected(mce: Mce, cond: MceConditions, answer: RdmdAnswer | None,
                         pamts: Sequence[tuple[int, int]]) -> bool:
    """Whether the kernel prints the TDX private memory message, given the RDMD's answer: the
    module's, or TDX_SEAMCALL_UD outside VMX operation (None when no RDMD was issued)."""
    if not rdmd_expected(mce, cond):
        return False
    if answer is None:
        raise ValueError("the kernel must have asked the module (RDMD) before deciding")
    return paddr_is_tdx_private(mce.addr, answer, pamts)


# --- addresses to aim machine checks at, computed from what the module received ----------------

SZ_1M = 1 << 20
PAGE_SIZE = 4096


def pamt_page(tdmrs: Sequence[TdmrInfo]) -> int:
    """A page in the middle of the first PAMT the kernel handed to TDH.SYS.CONFIG."""
    ranges = pamt_ranges(tdmrs)
    if not ranges:
        raise ValueError("no TDMR with a PAMT: the module was never configured")
    start, end = ranges[0]
    return (start + (end - start) // 2) & ~(PAGE_SIZE - 1)


def ordinary_pages(ram: Sequence[tuple[int, int]], tdmrs: Sequence[TdmrInfo], count: int) -> list[int]:
    """``count`` RAM pages that are plain kernel memory to TDX: above the first MiB (never TDX
    memory), outside every PAMT and, once TDMRs exist, inside a TDMR's available (not reserved)
    part. ``ram`` is (base, size) pairs, as QemuConfig.ram_ranges() gives them."""
    pamts = pamt_ranges(tdmrs)
    pieces = [piece for tdmr in tdmrs for piece in tdmr.available()] if tdmrs else \
        [(base, base + size) for base, size in ram]
    ram_spans = [(base, base + size) for base, size in ram]
    pages: list[int] = []
    for start, end in sorted(pieces):
        pa = (max(start, SZ_1M) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        while pa + PAGE_SIZE <= end and len(pages) < count:
            if is_pamt_page(pa, pamts):
                pa = next(stop for begin, stop in pamts if begin <= pa < stop)
                continue
            if any(lo <= pa and pa + PAGE_SIZE <= hi for lo, hi in ram_spans):
                pages.append(pa)
            pa += PAGE_SIZE
    if len(pages) < count:
        raise ValueError(f"found only {len(pages)} of {count} ordinary pages")
    return pages
