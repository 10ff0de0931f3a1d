"""Constants of the TDX module ABI: leaf numbers, completion statuses, operand ids, metadata
field ids and structure layouts, named as the ABI specification and Linux name them.

Values are those of the TDX module ABI (Intel TDX Module v1.5 ABI) and of Linux 7.2/7.3
(arch/x86/virt/vmx/tdx/tdx.h, arch/x86/include/asm/shared/tdx_errno.h, asm/tdx.h).
"""

from __future__ import annotations

import enum

# --- SEAMCALL leaves (RAX bits 15:0; bits 23:16 are the leaf version) -------------------------


class Leaf(enum.IntEnum):
    TDH_VP_ENTER = 0
    TDH_MNG_ADDCX = 1
    TDH_MEM_PAGE_ADD = 2
    TDH_MEM_SEPT_ADD = 3
    TDH_VP_ADDCX = 4
    TDH_MEM_PAGE_AUG = 6
    TDH_MEM_RANGE_BLOCK = 7
    TDH_MNG_KEY_CONFIG = 8
    TDH_MNG_CREATE = 9
    TDH_VP_CREATE = 10
    TDH_MNG_RD = 11
    TDH_MR_EXTEND = 16
    TDH_MR_FINALIZE = 17
    TDH_VP_FLUSH = 18
    TDH_MNG_VPFLUSHDONE = 19
    TDH_MNG_KEY_FREEID = 20
    TDH_MNG_INIT = 21
    TDH_VP_INIT = 22
    TDH_MEM_PAGE_PROMOTE = 23  # not called by Linux; named for the version tables (profiles.py)
    TDH_PHYMEM_PAGE_RDMD = 24
    TDH_VP_RD = 26
    TDH_PHYMEM_PAGE_RECLAIM = 28
    TDH_MEM_PAGE_REMOVE = 29
    TDH_MEM_SEPT_REMOVE = 30  # not called by Linux; named for the version tables (profiles.py)
    TDH_SYS_KEY_CONFIG = 31
    TDH_SYS_INFO = 32  # module leaves Linux does not call (include/tdx_api_defs.h)
    TDH_SYS_INIT = 33
    TDH_SYS_RD = 34
    TDH_SYS_LP_INIT = 35
    TDH_SYS_TDMR_INIT = 36
    TDH_SYS_RDALL = 37
    TDH_MEM_TRACK = 38
    TDH_PHYMEM_CACHE_WB = 40
    TDH_PHYMEM_PAGE_WBINVD = 41
    TDH_VP_WR = 43
    TDH_SYS_LP_SHUTDOWN = 44
    TDH_SYS_CONFIG = 45
    TDH_SYS_SHUTDOWN = 52
    TDH_SYS_UPDATE = 53
    TDH_SYS_DISABLE = 69


# The platform-scope leaves (TDH.SYS.*), which a TDH.SYS.DISABLE under way locks out.
SYS_LEAVES = frozenset(leaf for leaf in Leaf if leaf.name.startswith("TDH_SYS_"))

LEAF_NUMBER_MASK = 0xFFFF
LEAF_VERSION_SHIFT = 16
LEAF_VERSION_MASK = 0xFF
# Bit 63 of RAX selects the P-SEAMLDR instead of the TDX module.
P_SEAMLDR_LEAF_BIT = 1 << 63


class SeamldrLeaf(enum.IntEnum):
    """P-SEAMLDR leaves (arch/x86/virt/vmx/tdx/seamldr.c; the loader's pseamldr_api_defs.h)."""

    SEAMLDR_INFO = P_SEAMLDR_LEAF_BIT | 0
    SEAMLDR_INSTALL = P_SEAMLDR_LEAF_BIT | 1


class SeamldrStatus(enum.IntEnum):
    """What the P-SEAMLDR returns in RAX (intel/tdx-module-loader IncludePrivate/AsmSeamcall.h;
    EBADHANDOFF, ECLEANUPREQ and EUNSUPPORTED from the loader's pseamldr_api_defs.h)."""

    PSEAMLDR_SUCCESS = 0
    PSEAMLDR_EBADPARAM = 0x8000000000000000
    PSEAMLDR_EBADCALL = 0x8000000000000003
    PSEAMLDR_EBADHANDOFF = 0x8000000000000004
    PSEAMLDR_ECLEANUPREQ = 0x8000000000000005
    PSEAMLDR_EUNSUPPORTED = 0x8000000000000006
    PSEAMLDR_ENOMEM = 0x8000000000010002
    PSEAMLDR_EUNSPECERR = 0x8000000000010003
    PSEAMLDR_EUNSUPCPU = 0x8000000000010004
    PSEAMLDR_EBADSIG = 0x8000000000020000
    PSEAMLDR_EBADHASH = 0x8000000000020001
    PSEAMLDR_EINTERRUPT = 0x8000000000030000
    PSEAMLDR_ENOENTROPY = 0x8000000000030001


# RDX after a failed SEAMLDR.INSTALL: whether the old module still runs.
PSEAMLDR_RECOVERABLE_ERROR = 0
PSEAMLDR_UNRECOVERABLE_ERROR = 1


def leaf_key(fn: int) -> int:
    """The leaf a RAX value selects, as fault rules and per-leaf counters name it: the leaf
    number, with bit 63 kept for the P-SEAMLDR's (SEAMLDR.INSTALL is not TDH.MNG.ADDCX)."""
    return fn & (P_SEAMLDR_LEAF_BIT | LEAF_NUMBER_MASK)


def leaf_name(fn: int) -> str:
    """Readable name of a SEAMCALL RAX value, e.g. ``TDH.SYS.CONFIG`` or ``leaf 99``."""
    if fn & P_SEAMLDR_LEAF_BIT:
        try:
            return SeamldrLeaf(leaf_key(fn)).name.replace("_", ".")
        except ValueError:
            return f"P-SEAMLDR leaf {fn & ~P_SEAMLDR_LEAF_BIT:#x}"
    number = fn & LEAF_NUMBER_MASK
    try:
        name = Leaf(number).name
    except ValueError:
        return f"leaf {number}"
    dotted = name.replace("_", ".")
    version = (fn >> LEAF_VERSION_SHIFT) & LEAF_VERSION_MASK
    return f"{dotted} v{version}" if version else dotted


# --- Completion status codes (RAX on return) --------------------------------------------------
# Bits 63:32 identify the status, bits 31:0 carry an operand id or details.

STATUS_MASK = 0xFFFFFFFF00000000
DETAILS_MASK = 0x00000000FFFFFFFF
# api_error_code_t's flag bits (tdx_api_defs.h): error, non-recoverable, the TD is marked fatal.
STATUS_ERROR = 1 << 63
STATUS_NON_RECOVERABLE = 1 << 62
STATUS_FATAL = 1 << 61


class Status(enum.IntEnum):
    TDX_SUCCESS = 0x0000000000000000
    TDX_NON_RECOVERABLE_VCPU = 0x4000000100000000
    TDX_NON_RECOVERABLE_TD = 0x6000000200000000
    TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE = 0x6000000500000000
    TDX_NON_RECOVERABLE_TD_WRONG_APIC_MODE = 0xE000000700000000
    TDX_NON_RECOVERABLE_TD_CORRUPTED_MD = 0x6000000A00000000
    TDX_INTERRUPTED_RESUMABLE = 0x8000000300000000
    TDX_INTERRUPTED_RESTARTABLE = 0x8000000400000000
    TDX_OPERAND_INVALID = 0xC000010000000000
    TDX_OPERAND_ADDR_RANGE_ERROR = 0xC000010100000000
    TDX_OPERAND_BUSY = 0x8000020000000000
    TDX_PREVIOUS_TLB_EPOCH_BUSY = 0x8000020100000000
    TDX_SYS_BUSY = 0x8000020200000000
    TDX_RND_NO_ENTROPY = 0x8000020300000000
    TDX_PAGE_METADATA_INCORRECT = 0xC000030000000000
    TDX_PAGE_ALREADY_FREE = 0x0000030100000000
    TDX_PAGE_NOT_OWNED_BY_TD = 0xC000030200000000
    TDX_PAGE_NOT_FREE = 0xC000030300000000
    TDX_TD_ASSOCIATED_PAGES_EXIST = 0xC000040000000000
    TDX_SYS_INIT_NOT_PENDING = 0xC000050000000000
    TDX_SYS_LP_INIT_NOT_DONE = 0xC000050200000000
    TDX_SYS_LP_INIT_DONE = 0xC000050300000000
    TDX_SYS_NOT_READY = 0xC000050500000000
    TDX_SYS_SHUTDOWN = 0xC000050600000000
    TDX_SYS_KEY_CONFIG_NOT_PENDING = 0xC000050700000000
    TDX_SYS_STATE_INCORRECT = 0xC000050800000000
    TDX_SYS_INVALID_HANDOFF = 0xC000050900000000
    TDX_SYS_LP_INIT_NOT_PENDING = 0xC000050B00000000
    TDX_SYS_CONFIG_NOT_PENDING = 0xC000050C00000000
    TDX_TD_FATAL = 0xE000060400000000
    TDX_TDCS_NOT_ALLOCATED = 0xC000060600000000
    TDX_LIFECYCLE_STATE_INCORRECT = 0xC000060700000000
    TDX_OP_STATE_INCORRECT = 0xC000060800000000
    TDX_NO_VCPUS = 0xC000060900000000
    TDX_TDCX_NUM_INCORRECT = 0xC000061000000000
    TDX_X2APIC_ID_NOT_UNIQUE = 0xC000062100000000
    TDX_VCPU_STATE_INCORRECT = 0xC000070000000000
    TDX_VCPU_ASSOCIATED = 0x8000070100000000
    TDX_VCPU_NOT_ASSOCIATED = 0x8000070200000000
    TDX_MAX_VCPUS_EXCEEDED = 0xC000070500000000
    TDX_KEY_GENERATION_FAILED = 0x8000080000000000
    TDX_TD_KEYS_NOT_CONFIGURED = 0x8000081000000000
    TDX_KEY_STATE_INCORRECT = 0xC000081100000000
    TDX_KEY_CONFIGURED = 0x0000081500000000
    TDX_WBCACHE_NOT_COMPLETE = 0x8000081700000000
    TDX_HKID_NOT_FREE = 0xC000082000000000
    TDX_NO_HKID_READY_TO_WBCACHE = 0x0000082100000000
    TDX_WBCACHE_RESUME_ERROR = 0xC000082300000000
    TDX_FLUSHVP_NOT_DONE = 0x8000082400000000
    # Platform checks of SYS.INIT and LP.INIT (lp_checks.py); MSR ones carry the MSR index.
    TDX_INCORRECT_CPUID_VALUE = 0xC000090000000000
    TDX_LIMIT_CPUID_MAXVAL_SET = 0xC000090100000000
    TDX_INCONSISTENT_CPUID_FIELD = 0xC000090200000000
    TDX_INCONSISTENT_MSR = 0xC000092000000000
    TDX_INCORRECT_MSR_VALUE = 0xC000092100000000
    TDX_INVALID_TDMR = 0xC0000A0000000000
    TDX_NON_ORDERED_TDMR = 0xC0000A0100000000
    TDX_TDMR_OUTSIDE_CMRS = 0xC0000A0200000000
    TDX_TDMR_ALREADY_INITIALIZED = 0x00000A0300000000
    TDX_INVALID_PAMT = 0xC0000A1000000000
    TDX_PAMT_OUTSIDE_CMRS = 0xC0000A1100000000
    TDX_PAMT_OVERLAP = 0xC0000A1200000000
    TDX_INVALID_RESERVED_IN_TDMR = 0xC0000A2000000000
    TDX_NON_ORDERED_RESERVED_IN_TDMR = 0xC0000A2100000000
    TDX_EPT_WALK_FAILED = 0xC0000B0000000000
    TDX_EPT_ENTRY_NOT_PRESENT = 0xC0000B0300000000
    TDX_GPA_RANGE_NOT_BLOCKED = 0xC0000B0600000000
    TDX_GPA_RANGE_ALREADY_BLOCKED = 0x00000B0700000000
    TDX_TLB_TRACKING_NOT_DONE = 0xC0000B0800000000
    TDX_EPT_ENTRY_STATE_INCORRECT = 0xC0000B0D00000000
    TDX_METADATA_FIELD_ID_INCORRECT = 0xC0000C0000000000
    TDX_METADATA_FIELD_NOT_WRITABLE = 0xC0000C0100000000
    TDX_METADATA_FIELD_NOT_READABLE = 0xC0000C0200000000
    TDX_METADATA_FIRST_FIELD_ID_IN_CONTEXT = 0x00000C0B00000000  # not an error: bit 63 clear
    # Software-defined by Linux (asm/tdx.h): what the SEAMCALL instruction itself reports.
    TDX_SEAMCALL_VMFAILINVALID = 0x8000FF00FFFF0000
    TDX_SEAMCALL_GP = 0x8000FF000000000D
    TDX_SEAMCALL_UD = 0x8000FF0000000006


TDX_SW_ERROR = 0x8000FF0000000000


class OperandId(enum.IntEnum):
    """Operand ids ORed into bits 31:0 of a status (x86 register numbering, then structures)."""

    RAX = 0
    RCX = 1
    RDX = 2
    RBX = 3
    RBP = 5
    RSI = 6
    RDI = 7
    R8 = 8
    R9 = 9
    R10 = 10
    R11 = 11
    R12 = 12
    R13 = 13
    R14 = 14
    R15 = 15
    ATTRIBUTES = 64
    XFAM = 65
    EXEC_CONTROLS = 66
    EPTP_CONTROLS = 67
    MAX_VCPUS = 68
    CPUID_CONFIG = 69
    TSC_FREQUENCY = 70
    NUM_L2_VMS = 71
    IA32_ARCH_CAPABILITIES_CONFIG = 72
    TDR = 0x80
    TDCX = 0x81
    TDVPR = 0x82
    TDCS = 0x90
    TDVPS = 0x91
    SEPT = 0x92  # the spec's OPERAND_ID_SEPT_TREE; Linux's TDX_OPERAND_ID_SEPT
    SEPT_ENTRY = 0x93
    TD_EPOCH = 0xA9
    OP_STATE = 0xAC
    KOT = 0xBA
    KET = 0xBB
    WBCACHE = 0xBC


def with_operand(status: Status, operand: OperandId) -> int:
    """``api_error_with_operand_id()``: the operand id goes in the low bits."""
    return int(status) + int(operand)


def with_info(status: Status, info0: int = 0, info1: int = 0, info2: int = 0, info3: int = 0) -> int:
    """``api_error_with_multiple_info()``: four detail bytes in bits 31:0."""
    return int(status) + (info0 & 0xFF) + ((info1 & 0xFF) << 8) + ((info2 & 0xFF) << 16) + ((info3 & 0xFF) << 24)


def status_name(status: int, fn: int = 0) -> str:
    """Readable status of a call to ``fn``, e.g. ``TDX_OPERAND_INVALID(RCX)``,
    ``TDX_INVALID_PAMT(0x00000102)`` or, for a P-SEAMLDR leaf, ``PSEAMLDR_EBADSIG``."""
    if fn & P_SEAMLDR_LEAF_BIT and status in SeamldrStatus._value2member_map_:
        return SeamldrStatus(status).name
    try:
        return Status(status).name
    except ValueError:
        pass
    base, details = status & STATUS_MASK, status & DETAILS_MASK
    try:
        name = Status(base).name
    except ValueError:
        return f"{status:#018x}"
    if base in _OPERAND_STATUSES:
        try:
            return f"{name}({OperandId(details).name})"
        except ValueError:
            pass
    return f"{name}({details:#010x})"


_OPERAND_STATUSES = frozenset({
    Status.TDX_OPERAND_INVALID, Status.TDX_OPERAND_ADDR_RANGE_ERROR, Status.TDX_OPERAND_BUSY,
    Status.TDX_PAGE_METADATA_INCORRECT, Status.TDX_EPT_WALK_FAILED, Status.TDX_EPT_ENTRY_STATE_INCORRECT,
    Status.TDX_EPT_ENTRY_NOT_PRESENT, Status.TDX_GPA_RANGE_NOT_BLOCKED, Status.TDX_TLB_TRACKING_NOT_DONE,
})


def is_error(status: int) -> bool:
    return bool(status >> 63)


# --- Page types (TDH.PHYMEM.PAGE.RDMD RCX output) ---------------------------------------------


class PageType(enum.IntEnum):
    PT_NDA = 0
    PT_RSVD = 1
    PT_REG = 3
    PT_TDR = 4
    PT_TDCX = 5
    PT_TDVPR = 6
    PT_EPT = 8


class PageSize(enum.IntEnum):
    """TDX page-size codes (PAMT levels): used in TDX_INVALID_PAMT/TDX_PAMT_OVERLAP details."""

    PT_4KB = 0
    PT_2MB = 1
    PT_1GB = 2


PAGE_SIZE_BYTES = {PageSize.PT_4KB: 4096, PageSize.PT_2MB: 2 << 20, PageSize.PT_1GB: 1 << 30}

# --- Structures -------------------------------------------------------------------------------

SZ_4K = 4096
SZ_1M = 1 << 20
SZ_1G = 1 << 30
# IA32_TME_CAPABILITY.MK_TME_MAX_KEYID_BITS is 4 bits wide: every KeyID, 0 included, fits in 15 bits
# (the shim refuses a HELLO_ACK whose counts do not).
MAX_KEYID_BITS = 15
TDMR_INFO_ALIGNMENT = 512
TDMR_INFO_PA_ARRAY_ALIGNMENT = 512
TDMR_INFO_HEADER_SIZE = 64  # base, size, pamt_1g_base/size, pamt_2m_base/size, pamt_4k_base/size
TDMR_RESERVED_AREA_SIZE = 16  # offset, size
# Size of one PAMT entry in the real module (pamt_entry_t); also what SYS.RD reports.
PAMT_ENTRY_SIZE = 16
# TDH.SYS.TDMR.INIT initializes this many 4K PAMT entries per call, i.e. 4 MiB of a TDMR
# (src/vmm_dispatcher/api_calls/tdh_sys_tdmr_init.c: TDMR_4K_PAMT_INIT_COUNT).
TDMR_4K_PAMT_INIT_COUNT = 1024
TDMR_INIT_CHUNK = TDMR_4K_PAMT_INIT_COUNT * SZ_4K

# --- Global metadata field ids (TDH.SYS.RD RDX) -----------------------------------------------
# Bits 33:32 of a field id give the element size: 0 = 8, 1 = 16, 2 = 32, 3 = 64 bits.

FIELD_ELEMENT_SIZE_SHIFT = 32
FIELD_ELEMENT_SIZE_MASK = 0x3


def field_element_bits(field_id: int) -> int:
    return 8 << ((field_id >> FIELD_ELEMENT_SIZE_SHIFT) & FIELD_ELEMENT_SIZE_MASK)


class Field(enum.IntEnum):
    """Global metadata fields: those Linux 7.2/7.3 reads (arch/x86/virt/vmx/tdx/tdx_global_metadata.c), then
    a few more of the module's."""

    MINOR_VERSION = 0x0800000100000003
    MAJOR_VERSION = 0x0800000100000004
    UPDATE_VERSION = 0x0800000100000005
    TDX_FEATURES0 = 0x0A00000300000008
    MAX_TDMRS = 0x9100000100000008
    MAX_RESERVED_PER_TDMR = 0x9100000100000009
    PAMT_4K_ENTRY_SIZE = 0x9100000100000010
    PAMT_2M_ENTRY_SIZE = 0x9100000100000011
    PAMT_1G_ENTRY_SIZE = 0x9100000100000012
    TDR_BASE_SIZE = 0x9800000100000000
    TDCS_BASE_SIZE = 0x9800000100000100
    TDVPS_BASE_SIZE = 0x9800000100000200
    ATTRIBUTES_FIXED0 = 0x1900000300000000
    ATTRIBUTES_FIXED1 = 0x1900000300000001
    XFAM_FIXED0 = 0x1900000300000002
    XFAM_FIXED1 = 0x1900000300000003
    NUM_CPUID_CONFIG = 0x9900000100000004
    MAX_VCPUS_PER_TD = 0x9900000100000008
    MODULE_HV = 0x8900000100000000
    # The rest of class 9 (TDX_MODULE_HANDOFF), include/auto_gen/global_sys_fields_lookup.h.
    MIN_UPDATE_HV = 0x8900000100000001
    NO_DOWNGRADE = 0x8900000000000002
    NUM_HANDOFF_PAGES = 0x8900000100000003
    HANDOFF_DATA_VALID = 0x8900000000000004
    HANDOFF_DATA_HV = 0x8900000100000005
    HANDOFF_DATA_SIZE = 0x8900000200000006
    # In the module's table (include/auto_gen/global_sys_fields_lookup.c), read by no Linux 7.x yet.
    NUM_PKGS = 0x0000000200000000
    NUM_CMRS = 0x9000000100000000
    CMR_BASE = 0x9000000300000080  # 32 fields
    CMR_SIZE = 0x9000000300000100  # 32 fields


# Arrays: element i of CPUID_CONFIG_LEAVES is BASE + i; CPUID_CONFIG_VALUES has two per leaf.
FIELD_CPUID_CONFIG_LEAVES = 0x9900000300000400
FIELD_CPUID_CONFIG_VALUES = 0x9900000300000500

# TDX_FEATURES0 bits.
TDX_FEATURES0_TD_PRESERVING = 1 << 1
TDX_FEATURES0_NO_RBP_MOD = 1 << 18
TDX_FEATURES0_TOPOLOGY_ENUM = 1 << 20

# --- TD management (TDH.MNG.*, TDH.VP.*, TDH.MEM.*, TDH.MR.*) -------------------------------

# TDH.MEM.* RCX "page info": bits 2:0 S-EPT level, 11:3 reserved, 51:12 GPA, 63:52 reserved.
PAGE_INFO_LEVEL_MASK = 0x7
PAGE_INFO_RESERVED_MASK = 0xFFF0_0000_0000_0FF8
# TDH.MNG.CREATE RDX: bits 15:0 HKID, the rest reserved.
HKID_MASK = 0xFFFF
# TDH.PHYMEM.CACHE.WB RCX.
TDH_PHYMEM_CACHEWB_START_CMD = 0
TDH_PHYMEM_CACHEWB_RESUME_CMD = 1


class SeptLevel(enum.IntEnum):
    """S-EPT levels as the ABI numbers them (Linux: pg_level - 1)."""

    LVL_PT = 0  # 4 KiB leaf
    LVL_PD = 1
    LVL_PDPT = 2
    LVL_PML4 = 3
    LVL_PML5 = 4


class SeptState(enum.IntEnum):
    """Architectural S-EPT entry states (RDX bits 15:8 of TDX_EPT_* errors; Linux tdx_arch.h)."""

    FREE = 0
    BLOCKED = 1
    PENDING = 2
    PENDING_BLOCKED = 3
    MAPPED = 4


SEPT_STATE_SHIFT = 8
SEPTE_SUPPRESS_VE = 1 << 63  # architectural view of a FREE entry
SEPTE_RWX = 0x7

# TD_PARAMS (1024 bytes, 1024-aligned): see harness/seam/td_params.py.
TD_PARAMS_SIZE = 1024
TD_PARAMS_ALIGN = 1024
CONFIG_FLAGS_GPAW = 1 << 0  # TDX_CONFIG_FLAGS_MAX_GPAW: the SHARED bit is GPA[51], not GPA[47]
CONFIG_FLAGS_FLEXIBLE_PENDING_VE = 1 << 1
CONFIG_FLAGS_NO_RBP_MOD = 1 << 2
CONFIG_FLAGS_FIXED0 = CONFIG_FLAGS_GPAW | CONFIG_FLAGS_FLEXIBLE_PENDING_VE | CONFIG_FLAGS_NO_RBP_MOD
CONFIG_FLAGS_FIXED1 = 0
EPTP_MT_MASK = 0x7
EPTP_MT_WB = 6
EPTP_PWL_SHIFT = 3
EPTP_PWL_MASK = 0x7
EPTP_PWL_4 = 3  # page-walk length minus one
EPTP_PWL_5 = 4
MIN_PA_FOR_PML5 = 49
VIRT_TSC_FREQUENCY_MIN = 4  # units of 25 MHz: 100 MHz
VIRT_TSC_FREQUENCY_MAX = 400  # 10 GHz
MAX_L2_VMS = 3
# Control structure pages (src/common/data_structures/td_control_structures.h, tdx_tdvps.h):
# MNG.ADDCX takes up to MAX_NUM_TDCS_PAGES, VP.ADDCX up to MAX_TDVPS_PAGES with the TDVPR; each
# L2 VM needs one more TDCS page and three more TDVPS pages (VMCS, MSR bitmaps, MSR request).
MAX_NUM_TDCS_PAGES = 9
TDCS_PAGES_PER_L2_VM = 1
MAX_TDVPS_PAGES = 15
TDVPS_PAGES_PER_L2_VM = 3

# TD ATTRIBUTES bits.
TD_ATTR_DEBUG = 1 << 0
TD_ATTR_SEPT_VE_DISABLE = 1 << 28
TD_ATTR_MIGRATABLE = 1 << 29
TD_ATTR_PKS = 1 << 30
TD_ATTR_KL = 1 << 31
TD_ATTR_PERFMON = 1 << 63

# XFAM bits whose combinations the module checks.
XFAM_AVX = 1 << 2
XFAM_AVX512 = (1 << 5) | (1 << 6) | (1 << 7)  # opmask, ZMM_Hi256, Hi16_ZMM
XFAM_CET = (1 << 11) | (1 << 12)
XFAM_AMX = (1 << 17) | (1 << 18)

# CPUID(7,0).EBX TSX bits: HLE and RTM must be virtualized alike.
CPUID_7_0_EBX_HLE = 1 << 4
CPUID_7_0_EBX_RTM = 1 << 11
# CPUID bits TDH.MNG.INIT sets itself (tdh_mng_init.c read_and_set_cpuid_configurations()):
# CPUID(7,0).ECX.PKS mirrors ATTRIBUTES.PKS, KL_SUPPORTED is virtualized as 0, LA57 decides
# CPUID(0x80000008).EAX.LA_BITS (57 or 48).
CPUID_7_0_ECX_LA57 = 1 << 16
CPUID_7_0_ECX_KL_SUPPORTED = 1 << 23
CPUID_7_0_ECX_PKS = 1 << 31
CPUID_80000008_EAX_LA_BITS_SHIFT = 8
CPUID_80000008_EAX_LA_BITS_MASK = 0xFF << CPUID_80000008_EAX_LA_BITS_SHIFT
LA57_LINEAR_ADDRESS_WIDTH = 57
LEGACY_LINEAR_ADDRESS_WIDTH = 48
# CPUID leaves named in the module's code (x86_defs.h).
CPUID_VER_INFO_LEAF = 0x1
CPUID_EXT_FEATURES_LEAF = 0x7
CPUID_EXT_FEATURES_SUBLEAF = 0x0
CPUID_GET_MAX_PA_LEAF = 0x80000008

# TDH.MR.EXTEND measures 256 bytes per call (Linux TDX_EXTENDMR_CHUNKSIZE).
MR_EXTEND_CHUNK = 256

# --- Metadata field ids of TD-scope (TDR/TDCS) and vCPU-scope (TDVPS) fields ------------------
# Bits 23:0 field code, 33:32 element size, 37:34 last element, 46:38 last field in sequence,
# 50 inc size, 51 write mask valid, 54:52 context, 61:56 class, 63 non-architectural.
FIELD_CODE_MASK = 0xFFFFFF
FIELD_CLASS_SHIFT = 56
FIELD_CLASS_MASK = 0x3F
FIELD_NON_ARCH = 1 << 63
# Bits that must be 0 in a single-element field id (md_check_as_single_element_id()): reserved
# 31:24, 49:47, 55, 62, and the LAST_ELEMENT_IN_FIELD / LAST_FIELD_IN_SEQUENCE fields.
FIELD_SINGLE_ELEMENT_MUST_BE_ZERO = ((0xFF << 24) | (0xF << 34) | (0x1FF << 38) | (0x7 << 47) | (1 << 55)
                                     | (1 << 62))


class TdClass(enum.IntEnum):
    """TDCS field classes (TDH.MNG.RD)."""

    TD_MANAGEMENT = 16
    TD_EXECUTION_CONTROLS = 17
    TD_MEASUREMENT = 19
    CPUID_VALUES = 20


class TdvpsClass(enum.IntEnum):
    """TDVPS field classes (TDH.VP.RD/WR; Linux tdx_arch.h)."""

    VMCS = 0
    GUEST_GPR = 16
    OTHER_GUEST = 17
    MANAGEMENT = 32


class TdcsExecField(enum.IntEnum):
    ATTRIBUTES = 0x0
    XFAM = 0x1
    MAX_VCPUS = 0x2
    TSC_OFFSET = 0xA
    TSC_MULTIPLIER = 0xB
    TSC_FREQUENCY = 0xC


class TdcsManagementField(enum.IntEnum):
    NUM_VCPUS = 0x1
    OP_STATE = 0x4


class VmcsField(enum.IntEnum):
    """TD VMCS fields the host may touch (field code = VMCS encoding)."""

    POSTED_INTR_NV = 0x0002
    POSTED_INTR_DESC_ADDR = 0x2016
    SHARED_EPT_POINTER = 0x203C
    PIN_BASED_VM_EXEC_CONTROL = 0x4000
    SECONDARY_VM_EXEC_CONTROL = 0x401E
    NOTIFY_WINDOW = 0x4024


TDVPS_MANAGEMENT_PEND_NMI = 0xB
TDVPS_VCPU_STATE_DETAILS = 0x100  # non-architectural, OTHER_GUEST class
PIN_BASED_POSTED_INTR = 1 << 7
SECONDARY_EXEC_BUS_LOCK_DETECTION = 1 << 30
SECONDARY_EXEC_NOTIFY_VM_EXITING = 1 << 31

# CPUID_VALUES field code: bit 0 element (0: EBX:EAX, 1: EDX:ECX), 7:1 subleaf, 8 subleaf n/a,
# 15:9 leaf bits 6:0, 16 leaf bit 31.
CPUID_NO_SUBLEAF = 0xFFFFFFFF


def field_id(cls: int, code: int, non_arch: bool = False) -> int:
    """A field id as Linux builds it (BUILD_TDX_FIELD): class and code, nothing else."""
    return (FIELD_NON_ARCH if non_arch else 0) | (cls << FIELD_CLASS_SHIFT) | code


def cpuid_field_code(leaf: int, subleaf: int, element: int) -> int:
    sub = 0x1FE if subleaf == CPUID_NO_SUBLEAF else (subleaf & 0x7F) << 1
    return ((1 if leaf & 0x80000000 else 0) << 16) | ((leaf & 0x7F) << 9) | sub | (element & 1)


# --- TD exits (TDH.VP.ENTER returns TDX_SUCCESS with the VMX exit reason in RAX[15:0]) ----------


class ExitReason(enum.IntEnum):
    """VMX basic exit reasons (SDM Appendix C) the module reports from TDH.VP.ENTER."""

    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    OTHER_SMI = 6
    CPUID = 10
    HLT = 12
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    INVALID_STATE = 33  # VM-entry failure: invalid guest state
    MCE_DURING_VMENTRY = 41  # VM-entry failure: machine-check event
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    NOTIFY = 75
    TDCALL = 77


EXIT_REASON_BASIC_MASK = 0xFFFF
EXIT_REASON_FAILED_VMENTRY = 1 << 31  # exit reason bit 31 (the module's vmenter_fail)
# VM-exit interruption information (RCX/R9 of an exception exit): vector, type, valid.
INTR_INFO_VALID = 1 << 31
INTR_TYPE_EXT_INTR = 0 << 8
INTR_TYPE_NMI_INTR = 2 << 8
INTR_TYPE_HARD_EXCEPTION = 3 << 8
NMI_VECTOR = 2
MC_VECTOR = 18
EXIT_QUAL_SMI_MSMI = 1 << 0  # Other SMI: the SMI was a machine-check SMI
EXIT_QUAL_NOTIFY_VM_CONTEXT_INVALID = 1 << 0  # Notify: the VM context is corrupted


class Tdvmcall(enum.IntEnum):
    """TDG.VP.VMCALL sub-functions (R11) of the GHCI: VMX exit reasons, and the TDX-specific ones."""

    CPUID = ExitReason.CPUID
    HLT = ExitReason.HLT
    IO_INSTRUCTION = ExitReason.IO_INSTRUCTION
    MSR_READ = ExitReason.MSR_READ
    MSR_WRITE = ExitReason.MSR_WRITE
    MMIO = ExitReason.EPT_VIOLATION  # #VE.RequestMMIO
    GET_TD_VM_CALL_INFO = 0x10000
    MAP_GPA = 0x10001
    GET_QUOTE = 0x10002
    REPORT_FATAL_ERROR = 0x10003
    SETUP_EVENT_NOTIFY_INTERRUPT = 0x10004


# GHCI: the registers a TDVMCALL exposes to the VMM, by x86 register number (RCX of the exit):
# RDX, RBX, RSI, RDI and R8-R15 (Linux's TDVMCALL_EXPOSE_REGS_MASK).
TDVMCALL_EXPOSE_REGS_MASK = 0xFFCC
# TDVMCALL completion status (R10 on return to the TD; Linux's TDVMCALL_STATUS_*).
TDVMCALL_STATUS_SUCCESS = 0
TDVMCALL_STATUS_RETRY = 1
TDVMCALL_STATUS_INVALID_OPERAND = 0x8000000000000000
TDVMCALL_STATUS_ALIGN_ERROR = 0x8000000000000002
TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED = 0x8000000000000003
EPT_VIOLATION_ACC_WRITE = 1 << 1  # exit qualification: the access was a write
EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION = 6  # RDX[3:0]: access to a page not yet accepted
VCPU_STATE_DETAILS_INTR_PENDING = 1 << 0  # TDVPS VCPU_STATE_DETAILS.VMXIP
