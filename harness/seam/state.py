"""What the software TDX module keeps: the global state machine, the TDMRs and how far each is
initialized, the owner of every page it took (the PAMT as TDH.PHYMEM.PAGE.RDMD reports it), the
TDs and vCPUs, the KOT; the context a leaf handler works on, and the page checks the
host-initialization leaves (host_init.py) and the TD leaves (td.py) share.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from harness.seam import abi
from harness.seam.abi import OperandId, PageType, SeptState, Status
from harness.seam.call import Call
from harness.seam.exits import ExitScript
from harness.seam.image import ModuleImage
from harness.seam.measure import MrtdBuilder
from harness.seam.platform import CpuidValue, PlatformConfig
from harness.seam.td_params import TdParams
from harness.seam.tdmr import TdmrInfo


class SysState(enum.Enum):
    SYSINIT_PENDING = "sysinit-pending"
    SYSINIT_DONE = "sysinit-done"
    SYSCONFIG_DONE = "sysconfig-done"
    SYS_READY = "ready"
    SYS_SHUTDOWN = "shutdown"


@dataclass
class TdmrState:
    info: TdmrInfo
    initialized: int = 0  # bytes from the base already initialized by TDH.SYS.TDMR.INIT

    @property
    def done(self) -> bool:
        return self.initialized >= self.info.size

    @property
    def ready_end(self) -> int:
        """End of the part of the TDMR pages may be used in: whole GiB blocks only
        (pamt_manager.c pamt_get_block(): last_initialized rounded down to 1 GiB)."""
        return self.info.base + (self.initialized & ~(abi.SZ_1G - 1))


@dataclass
class PageOwner:
    page_type: PageType
    owner: int = 0  # TDR PA for TD pages


class Lifecycle(enum.Enum):
    HKID_ASSIGNED = "hkid-assigned"
    KEYS_CONFIGURED = "keys-configured"
    BLOCKED = "blocked"
    TEARDOWN = "teardown"


class OpState(enum.IntEnum):
    UNINITIALIZED = 0
    INITIALIZED = 1
    RUNNABLE = 2


class KeyState(enum.Enum):
    """A KOT entry that is not free (free KeyIDs are simply absent)."""

    ASSIGNED = "assigned"
    FLUSHED = "flushed"


class VcpuState(enum.Enum):
    UNINITIALIZED = "uninitialized"
    READY = "ready"
    DISABLED = "disabled"  # after TDX_NON_RECOVERABLE_VCPU: never entered again


@dataclass
class SeptLeaf:
    pa: int
    state: SeptState
    bepoch: int = 0  # TD epoch when the entry was blocked


@dataclass
class Vcpu:
    tdvpr: int
    tdr: int
    tdcx: list[int] = field(default_factory=list)
    state: VcpuState = VcpuState.UNINITIALIZED
    assoc_cpu: int | None = None  # the LP the vCPU is associated with (VMCS loaded there)
    x2apic_id: int | None = None
    initial_rcx: int = 0
    fields: dict[tuple[bool, int, int], int] = field(default_factory=dict)
    last_exit: abi.ExitReason | None = None  # the exit the last TDH.VP.ENTER reported


@dataclass
class Td:
    tdr: int
    hkid: int
    lifecycle: Lifecycle = Lifecycle.HKID_ASSIGNED
    fatal: bool = False  # TDR.FATAL, set by a TDX_NON_RECOVERABLE_TD* exit
    keyed_packages: set[int] = field(default_factory=set)
    tdcx: list[int] = field(default_factory=list)
    op_state: OpState = OpState.UNINITIALIZED
    params: TdParams | None = None
    chldcnt: int = 0  # pages the TD owns besides its TDR
    vcpus: list[int] = field(default_factory=list)  # TDVPR PAs, by VP.INIT index
    num_assoc_vcpus: int = 0
    epoch: int = 1
    sept: dict[tuple[int, int], int] = field(default_factory=dict)  # (level, index) -> S-EPT page
    leaves: dict[int, SeptLeaf] = field(default_factory=dict)  # 4K GPA -> leaf entry
    contents: dict[int, bytes] = field(default_factory=dict)  # 4K GPA -> page as the TD sees it
    measurement: MrtdBuilder = field(default_factory=MrtdBuilder)
    mrtd: bytes = bytes(48)
    tsc_offset: int = 0
    tsc_multiplier: int = 0
    cpuid: dict[tuple[int, int], CpuidValue] = field(default_factory=dict)

    @property
    def root_level(self) -> int:
        """Level of the S-EPT root (a TDCS page): 3 for 4-level EPT, 4 for 5-level."""
        return (self.params.ept_levels if self.params else 4) - 1

    def private_gpa(self, gpa: int) -> bool:
        width = 52 if self.params is not None and self.params.gpaw else 48
        return gpa < 1 << width and not gpa & (1 << (width - 1))


@dataclass
class WbCacheProgress:
    """A TDH.PHYMEM.CACHE.WB in progress on one package (the interruption point)."""

    hkids: frozenset[int]
    chunks_done: int = 0


@dataclass(frozen=True)
class HandoffHeader:
    """The handoff data's header (loader_data.h: valid, HV, size), as TDH.SYS.RD reports it."""

    valid: bool = False
    hv: int = 0
    size: int = 0


NO_HANDOFF = HandoffHeader()
# The software module's handoff area: one page (NUM_HANDOFF_PAGES reads pages - 1). Its handoff
# has no byte layout, so HANDOFF_DATA_SIZE of a valid one is the whole area less the header.
HANDOFF_PAGES = 1
HANDOFF_DATA_SIZE = HANDOFF_PAGES * abi.SZ_4K - 8


@dataclass
class Handoff:
    """What TDH.SYS.SHUTDOWN leaves for the next module (prepare_handoff_data(), helpers.c) and
    TDH.SYS.UPDATE takes back: the KOT, WBT, TDMR table, global HKID and configured packages.
    The software module hands over its whole state, as the rest (PAMT, TDR, TDCS, TD pages) is
    memory that an update does not touch on hardware."""

    hv: int
    preserved: ModuleState

    @property
    def header(self) -> HandoffHeader:
        return HandoffHeader(True, self.hv, HANDOFF_DATA_SIZE)


@dataclass
class ModuleState:
    sys: SysState = SysState.SYSINIT_PENDING
    handoff: Handoff | None = None  # written by TDH.SYS.SHUTDOWN, kept in the SEAM range
    sysinit_lp: int | None = None  # the LP TDH.SYS.INIT ran on: LP.INIT compares the others with it
    lp_initialized: set[int] = field(default_factory=set)
    packages_configured: set[int] = field(default_factory=set)
    global_keyid: int | None = None
    tdmrs: list[TdmrState] = field(default_factory=list)
    pages: dict[int, PageOwner] = field(default_factory=dict)  # by PFN
    calls_per_leaf: dict[int, int] = field(default_factory=dict)
    # TD management (harness/seam/td.py).
    tds: dict[int, Td] = field(default_factory=dict)  # by TDR PA
    vcpus: dict[int, Vcpu] = field(default_factory=dict)  # by TDVPR PA
    kot: dict[int, KeyState] = field(default_factory=dict)  # KeyIDs not free, by HKID
    wbinvd_pending: dict[int, set[int]] = field(default_factory=dict)  # HKID -> packages to write back
    wbcache: dict[int, WbCacheProgress] = field(default_factory=dict)  # by package
    disable_calls: int = 0  # TDH.SYS.DISABLE calls of a teardown still under way (0: none)

    # Page ownership: what TDH.PHYMEM.PAGE.RDMD reports and the leaves check.

    def assign_page(self, pa: int, page_type: PageType, owner: int = 0) -> None:
        self.pages[pa >> 12] = PageOwner(page_type, owner)

    def free_page(self, pa: int) -> None:
        """The page is back to PT_NDA (reclaimed or removed from a TD)."""
        self.pages.pop(pa >> 12, None)

    def page_type(self, pa: int) -> PageType:
        owner = self.pages.get(pa >> 12)
        if owner is not None:
            return owner.page_type
        tdmr = self.tdmr_of(pa)
        if tdmr is not None and any(tdmr.info.base + a.offset <= pa < tdmr.info.base + a.offset + a.size
                                    for a in tdmr.info.used_reserved()):
            return PageType.PT_RSVD
        return PageType.PT_NDA

    def tdmr_of(self, pa: int) -> TdmrState | None:
        for tdmr in self.tdmrs:
            if tdmr.info.base <= pa < tdmr.info.end:
                return tdmr
        return None


@dataclass
class LoaderState:
    """The P-SEAMLDR's state (the loader's pseamldr_data_t) and the module it loaded: it outlives
    the module's TDH.SYS.INIT; a power cycle starts it over from the platform."""

    running: ModuleImage
    remaining_updates: int
    seam_ready: bool = True  # SEAMEXTEND.SEAM_READY: SEAMCALLs reach the module
    update_lps: set[int] = field(default_factory=set)  # LPs that ran SEAMLDR.INSTALL this session
    seam_ready_before: bool = True  # SEAM_READY when the session's first INSTALL cleared it

    @classmethod
    def for_platform(cls, platform: PlatformConfig) -> LoaderState:
        return cls(platform.module_image, platform.seamldr_updates)


@dataclass
class Seam:
    """What a leaf handler works on: the platform, the module's state (replaced whole by
    TDH.SYS.INIT and a power cycle), the P-SEAMLDR's, what TDH.VP.ENTER reports, and the
    module's clock."""

    platform: PlatformConfig
    state: ModuleState
    loader: LoaderState
    exits: ExitScript
    clock: Callable[[], float]  # seconds since the module started

    @property
    def handoff_header(self) -> HandoffHeader:
        handoff = self.state.handoff
        return NO_HANDOFF if handoff is None else handoff.header


Handler = Callable[[Seam, Call], int]


# Operand checks the host-initialization and TD leaves share.


def private_page_status(seam: Seam, pa: int, operand: OperandId, expected: PageType) -> int:
    """check_and_lock_explicit_4k_private_hpa(): aligned, no KeyID bits, inside an initialized
    1 GiB block of a TDMR, and the PAMT says ``expected``."""
    if pa % abi.SZ_4K or pa >= seam.platform.max_pa:
        return abi.with_operand(Status.TDX_OPERAND_INVALID, operand)
    tdmr = seam.state.tdmr_of(pa)
    if tdmr is None or pa >= tdmr.ready_end:
        return abi.with_operand(Status.TDX_OPERAND_ADDR_RANGE_ERROR, operand)
    if seam.state.page_type(pa) != expected:
        return abi.with_operand(Status.TDX_PAGE_METADATA_INCORRECT, operand)
    return 0


def shared_page_ok(seam: Seam, pa: int, alignment: int) -> bool:
    """shared_hpa_check_with_pwr_2_alignment() (src/common/helpers/helpers.c): aligned, below
    2^MAXPA, outside SEAMRR, and a shared KeyID (0 or MKTME) in the HKID bits."""
    platform = seam.platform
    seamrr_base, seamrr_size = platform.seamrr
    address = platform.address_of(pa)
    return (pa % alignment == 0 and pa < 1 << platform.max_pa_bits
            and not (seamrr_size and address < seamrr_base + seamrr_size and seamrr_base < address + alignment)
            and pa >> platform.hkid_shift < platform.tdx_keyid_start)
