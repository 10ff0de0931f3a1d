"""The statuses a sweep fails each leaf with: what the real module (intel/tdx-module, 1.5 line)
can return from that leaf, one per class, with the file that returns it.

Classes: busy (a lock the leaf takes is held: TDX_SYS_BUSY or TDX_OPERAND_BUSY with the operand
the module names), operand (the first operand check of the leaf), state (the leaf's own state
error), resource (exhaustion, where the leaf has one), vmfailinvalid (the SEAMCALL instruction
itself fails: no module in the SEAM range, or the module's SEAM_READY is clear during an
update; the CPU's VMfailInvalid, which Linux reads as TDX_SEAMCALL_VMFAILINVALID).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from harness.seam import abi
from harness.seam.abi import Leaf, OperandId, Status


class StatusClass(enum.Enum):
    BUSY = "busy"
    OPERAND = "operand"
    STATE = "state"
    RESOURCE = "resource"
    VMFAILINVALID = "vmfailinvalid"


@dataclass(frozen=True)
class Injection:
    klass: StatusClass
    status: int
    source: str  # where the real module returns it (intel/tdx-module path), or the CPU

    @property
    def name(self) -> str:
        return abi.status_name(self.status)


API = "src/vmm_dispatcher/api_calls/"
HELPERS = "src/common/helpers/helpers.c"
DISPATCHER = "src/vmm_dispatcher/tdx_vmm_dispatcher.c"
VMFAILINVALID = Injection(StatusClass.VMFAILINVALID, Status.TDX_SEAMCALL_VMFAILINVALID,
                          "the CPU: SEAMCALL VMfailInvalid (no module, or SEAM_READY clear)")


def _op(status: Status, operand: OperandId) -> int:
    return abi.with_operand(status, operand)


def _at(klass: StatusClass, status: int, where: str) -> Injection:
    return Injection(klass, status, where if where.startswith("src/") else API + where)


BUSY, OPERAND, STATE, RESOURCE = StatusClass.BUSY, StatusClass.OPERAND, StatusClass.STATE, StatusClass.RESOURCE

# Line numbers: intel/tdx-module branch tdx_1.5, commit 72d8cffb ("TDX 1.5.01"). The state errors
# a correct kernel never sees (called out of order) are here too: a sweep asks what the kernel
# does with each status the leaf has, not only the likely ones.
STATUSES: dict[int, tuple[Injection, ...]] = {
    Leaf.TDH_SYS_INIT: (
        _at(BUSY, Status.TDX_SYS_BUSY, "tdh_sys_init.c:1281"),  # the global lock, exclusive
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), "tdh_sys_init.c:1289"),
        _at(STATE, Status.TDX_SYS_INIT_NOT_PENDING, "tdh_sys_init.c:1298"),
        _at(RESOURCE, Status.TDX_RND_NO_ENTROPY, "tdh_sys_init.c:1358"),  # RDRAND for the stack canary
        VMFAILINVALID,
    ),
    Leaf.TDH_SYS_LP_INIT: (  # no operands
        _at(BUSY, Status.TDX_SYS_BUSY, "tdh_sys_lp_init.c:474"),  # the global lock, shared
        _at(STATE, Status.TDX_SYS_LP_INIT_NOT_PENDING, "tdh_sys_lp_init.c:482"),
        _at(STATE, Status.TDX_SYS_LP_INIT_DONE, "tdh_sys_lp_init.c:490"),
        _at(RESOURCE, Status.TDX_RND_NO_ENTROPY, "tdh_sys_lp_init.c:500"),  # lfsr_init_seed()
        VMFAILINVALID,
    ),
    Leaf.TDH_SYS_RD: (  # takes no lock; the field id (RDX) errors carry no operand id
        _at(OPERAND, Status.TDX_METADATA_FIELD_ID_INCORRECT, "tdh_sys_rd.c:84"),
        _at(OPERAND, Status.TDX_METADATA_FIELD_NOT_READABLE, "src/common/metadata_handlers/metadata_sys.c:454"),
        _at(STATE, Status.TDX_SYS_LP_INIT_NOT_DONE, "tdh_sys_rd.c:55"),
        VMFAILINVALID,
    ),
    Leaf.TDH_SYS_CONFIG: (
        _at(BUSY, Status.TDX_SYS_BUSY, "tdh_sys_config.c:755"),  # the global lock, exclusive
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), "tdh_sys_config.c:780"),
        _at(OPERAND, abi.with_info(Status.TDX_INVALID_TDMR, 0), "tdh_sys_config.c:126"),  # TDMR 0
        _at(STATE, Status.TDX_SYS_CONFIG_NOT_PENDING, "tdh_sys_config.c:764"),
        VMFAILINVALID,
    ),
    Leaf.TDH_SYS_KEY_CONFIG: (  # no operands
        _at(BUSY, Status.TDX_SYS_BUSY, "tdh_sys_key_config.c:46"),  # the global lock, exclusive
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.KET), HELPERS + ":88"),  # PCONFIG: MKTME_DEVICE_BUSY
        _at(STATE, Status.TDX_SYS_KEY_CONFIG_NOT_PENDING, "tdh_sys_key_config.c:56"),
        _at(STATE, Status.TDX_KEY_CONFIGURED, "tdh_sys_key_config.c:66"),  # bit 63 clear: not an error
        _at(RESOURCE, Status.TDX_KEY_GENERATION_FAILED, HELPERS + ":94"),  # PCONFIG: MKTME_ENTROPY_ERROR
        VMFAILINVALID,
    ),
    Leaf.TDH_SYS_TDMR_INIT: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RCX), "tdh_sys_tdmr_init.c:87"),  # the TDMR's mutex
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), "tdh_sys_tdmr_init.c:61"),
        _at(STATE, Status.TDX_SYS_NOT_READY, DISPATCHER + ":196"),
        _at(STATE, Status.TDX_TDMR_ALREADY_INITIALIZED, "tdh_sys_tdmr_init.c:98"),  # bit 63 clear
        VMFAILINVALID,
    ),
    # The leaves KVM builds a TD with (kvm-create). A lock's busy status names the operand whose
    # PAMT entry or lock it is (helpers.c check_and_lock_explicit_private_hpa(), :386; the TDR of
    # an implicit operand :473; the op-state lock :556; the S-EPT tree :734).
    Leaf.TDH_MNG_CREATE: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RCX), "tdh_mng_create.c:69"),  # the TDR page
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.KOT), "tdh_mng_create.c:88"),
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RDX), "tdh_mng_create.c:62"),  # the HKID
        _at(STATE, Status.TDX_HKID_NOT_FREE, "tdh_mng_create.c:100"),
        _at(RESOURCE, Status.TDX_RND_NO_ENTROPY, "tdh_mng_create.c:116"),  # RDSEED for TD_UUID
        VMFAILINVALID,
    ),
    Leaf.TDH_MNG_KEY_CONFIG: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RCX), "tdh_mng_key_config.c:61"),
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.KET), HELPERS + ":88"),  # PCONFIG
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), "tdh_mng_key_config.c:61"),
        _at(STATE, Status.TDX_LIFECYCLE_STATE_INCORRECT, "tdh_mng_key_config.c:87"),
        _at(RESOURCE, Status.TDX_KEY_GENERATION_FAILED, HELPERS + ":94"),
        VMFAILINVALID,
    ),
    Leaf.TDH_MNG_ADDCX: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RDX), "tdh_mng_add_cx.c:65"),  # the TDR
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RDX), "tdh_mng_add_cx.c:65"),
        _at(STATE, Status.TDX_TD_KEYS_NOT_CONFIGURED, "tdh_mng_add_cx.c:91"),
        _at(RESOURCE, Status.TDX_TDCX_NUM_INCORRECT, "tdh_mng_add_cx.c:100"),
        VMFAILINVALID,
    ),
    Leaf.TDH_MNG_INIT: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RCX), "tdh_mng_init.c:555"),
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), "tdh_mng_init.c:555"),
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.CPUID_CONFIG), "tdh_mng_init.c:258"),
        _at(STATE, Status.TDX_OP_STATE_INCORRECT, HELPERS + ":581"),
        VMFAILINVALID,
    ),
    Leaf.TDH_VP_CREATE: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RDX), "tdh_vp_create.c:63"),  # the TDR, shared
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.OP_STATE), HELPERS + ":556"),
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), "tdh_vp_create.c:89"),
        _at(STATE, Status.TDX_OP_STATE_INCORRECT, HELPERS + ":581"),
        VMFAILINVALID,
    ),
    Leaf.TDH_VP_ADDCX: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.TDR), "tdh_vp_addcx.c:86"),
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), "tdh_vp_addcx.c:134"),
        _at(STATE, Status.TDX_VCPU_STATE_INCORRECT, "tdh_vp_addcx.c:120"),
        _at(RESOURCE, Status.TDX_TDCX_NUM_INCORRECT, "tdh_vp_addcx.c:129"),
        VMFAILINVALID,
    ),
    Leaf.TDH_VP_INIT: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RCX), "tdh_vp_init.c:119"),
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.TDR), "tdh_vp_init.c:133"),
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), "tdh_vp_init.c:119"),
        _at(STATE, Status.TDX_VCPU_STATE_INCORRECT, "tdh_vp_init.c:173"),
        _at(RESOURCE, Status.TDX_MAX_VCPUS_EXCEEDED, "tdh_vp_init.c:188"),
        VMFAILINVALID,
    ),
    Leaf.TDH_VP_WR: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RCX), "tdh_vp_rd_wr.c:91"),
        _at(OPERAND, Status.TDX_METADATA_FIELD_ID_INCORRECT, "src/common/metadata_handlers/metadata_generic.c:710"),
        _at(STATE, Status.TDX_VCPU_ASSOCIATED, HELPERS + ":978"),
        VMFAILINVALID,
    ),
    Leaf.TDH_VP_RD: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RCX), "tdh_vp_rd_wr.c:91"),
        _at(OPERAND, Status.TDX_METADATA_FIELD_ID_INCORRECT, "src/common/metadata_handlers/metadata_generic.c:679"),
        _at(STATE, Status.TDX_VCPU_ASSOCIATED, HELPERS + ":978"),
        VMFAILINVALID,
    ),
    Leaf.TDH_MNG_RD: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.OP_STATE), HELPERS + ":556"),
        _at(OPERAND, Status.TDX_METADATA_FIELD_ID_INCORRECT, "src/common/metadata_handlers/metadata_generic.c:679"),
        _at(STATE, Status.TDX_TD_KEYS_NOT_CONFIGURED, HELPERS + ":510"),
        VMFAILINVALID,
    ),
    Leaf.TDH_MEM_SEPT_ADD: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.SEPT), HELPERS + ":734"),
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RCX), "tdh_mem_sept_add.c:401"),  # the S-EPT entry
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.R8), "tdh_mem_sept_add.c:75"),
        _at(STATE, _op(Status.TDX_EPT_ENTRY_STATE_INCORRECT, OperandId.RCX), "tdh_mem_sept_add.c:419"),
        VMFAILINVALID,
    ),
    Leaf.TDH_MEM_PAGE_ADD: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.R8), "tdh_mem_page_add.c:165"),  # the new page
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.R9), "tdh_mem_page_add.c:160"),  # the source
        _at(STATE, _op(Status.TDX_EPT_ENTRY_STATE_INCORRECT, OperandId.RCX), "tdh_mem_page_add.c:150"),
        VMFAILINVALID,
    ),
    Leaf.TDH_MR_EXTEND: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RDX), "tdh_mr_extend.c:77"),  # the TDR
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), "tdh_mr_extend.c:106"),
        _at(STATE, _op(Status.TDX_EPT_ENTRY_NOT_PRESENT, OperandId.RCX), "tdh_mr_extend.c:126"),
        VMFAILINVALID,
    ),
    Leaf.TDH_MR_FINALIZE: (
        _at(BUSY, _op(Status.TDX_OPERAND_BUSY, OperandId.RCX), "tdh_mr_finalize.c:96"),
        _at(OPERAND, _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), "tdh_mr_finalize.c:96"),
        _at(STATE, Status.TDX_NO_VCPUS, "tdh_mr_finalize.c:125"),
        VMFAILINVALID,
    ),
}


def injections_for(leaf: int) -> tuple[Injection, ...]:
    return STATUSES.get(leaf, ())


def status_classes() -> list[str]:
    return [c.value for c in StatusClass]
