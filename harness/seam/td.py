"""TD management: TDs, vCPUs, the Secure EPT and the leaves KVM (Linux 7.3) calls to build,
run and tear them down, with the checks and statuses of the TDX module (TDX 1.5 behaviour).

Life of a TD, as the module tracks it:
- TDR lifecycle: TDH.MNG.CREATE -> HKID_ASSIGNED -TDH.MNG.KEY.CONFIG on every package->
  KEYS_CONFIGURED -TDH.MNG.VPFLUSHDONE-> BLOCKED -TDH.MNG.KEY.FREEID-> TEARDOWN, after which
  TDH.PHYMEM.PAGE.RECLAIM gives the pages back (the TDR last).
- TDCS operation state: UNINITIALIZED -TDH.MNG.INIT-> INITIALIZED -TDH.MR.FINALIZE-> RUNNABLE.
- TDR.FATAL: set by a TDH.VP.ENTER that ends in a TDX_NON_RECOVERABLE_TD* exit; from then on
  every leaf that checks the TD's build state is TDX_TD_FATAL, while the teardown leaves
  (VP.FLUSH, MNG.VPFLUSHDONE, PHYMEM.CACHE.WB, MNG.KEY.FREEID, PHYMEM.PAGE.RECLAIM/WBINVD), which
  do not look at it, still work.
- KeyID (KOT entry): free -> ASSIGNED (TDH.MNG.CREATE) -> FLUSHED (TDH.MNG.VPFLUSHDONE) ->
  free (TDH.MNG.KEY.FREEID, once TDH.PHYMEM.CACHE.WB ran on every package).
Every page the module takes gets its PAMT type and owner (``ModuleState.assign_page``), so
TDH.PHYMEM.PAGE.RDMD answers the MCE path truthfully, and every page goes back to PT_NDA.

The handlers take the module's context and the call (state.py, call.py); the check order inside each one is
the module's, because the first failing check decides the status KVM sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.seam import abi, td_params
from harness.seam.abi import Leaf, OperandId, PageType, SeptState, Status
from harness.seam.call import Call
from harness.seam.exits import TdExit
from harness.seam.measure import MR_EXTEND_CHUNK, MrtdBuilder
from harness.seam.memory import MemoryAccessError
from harness.seam.platform import CpuidValue
from harness.seam.state import (
    Handler,
    KeyState,
    Lifecycle,
    OpState,
    Seam,
    SeptLeaf,
    Td,
    Vcpu,
    VcpuState,
    WbCacheProgress,
    private_page_status,
    shared_page_ok,
)
from harness.seam.td_params import CpuidKey, TdParams
from harness.seam.trace import REGISTERS

MASK64 = (1 << 64) - 1
PAGE = abi.SZ_4K


@dataclass(frozen=True)
class MdField:
    bits: int
    rd_mask: int
    wr_mask: int


_STATE_DETAILS = (True, abi.TdvpsClass.OTHER_GUEST, abi.TDVPS_VCPU_STATE_DETAILS)
# TDVPS fields KVM reads or writes, with the host masks of the TDX 1.5 field tables.
_VP_FIELDS: dict[tuple[bool, int, int], MdField] = {
    (False, abi.TdvpsClass.VMCS, abi.VmcsField.POSTED_INTR_NV): MdField(16, 0xFFFF, 0xFFFF),
    (False, abi.TdvpsClass.VMCS, abi.VmcsField.POSTED_INTR_DESC_ADDR): MdField(64, MASK64, MASK64 & ~0x3F),
    (False, abi.TdvpsClass.VMCS, abi.VmcsField.SHARED_EPT_POINTER):
        MdField(64, 0x000F_FFFF_FFFF_F000, 0x000F_FFFF_FFFF_F000),
    (False, abi.TdvpsClass.VMCS, abi.VmcsField.PIN_BASED_VM_EXEC_CONTROL):
        MdField(32, abi.PIN_BASED_POSTED_INTR, abi.PIN_BASED_POSTED_INTR),
    (False, abi.TdvpsClass.VMCS, abi.VmcsField.SECONDARY_VM_EXEC_CONTROL):
        MdField(32, abi.SECONDARY_EXEC_BUS_LOCK_DETECTION | abi.SECONDARY_EXEC_NOTIFY_VM_EXITING,
                abi.SECONDARY_EXEC_BUS_LOCK_DETECTION | abi.SECONDARY_EXEC_NOTIFY_VM_EXITING),
    (False, abi.TdvpsClass.VMCS, abi.VmcsField.NOTIFY_WINDOW): MdField(32, 0xFFFFFFFF, 0xFFFFFFFF),
    (False, abi.TdvpsClass.MANAGEMENT, abi.TDVPS_MANAGEMENT_PEND_NMI): MdField(8, 0xFF, 0xFF),
    _STATE_DETAILS: MdField(64, MASK64, 0),
}

_INIT, _RUN = OpState.INITIALIZED, OpState.RUNNABLE
# TDCS.OP_STATE in which each leaf is allowed (the module's seamcall_state_lookup).
_OP_STATES: dict[int, frozenset[OpState]] = {
    Leaf.TDH_MNG_ADDCX: frozenset({OpState.UNINITIALIZED}),  # checked once OP_STATE exists (page 7 on)
    Leaf.TDH_MNG_INIT: frozenset({OpState.UNINITIALIZED}),
    Leaf.TDH_VP_CREATE: frozenset({_INIT}),
    Leaf.TDH_VP_ADDCX: frozenset({_INIT}),
    Leaf.TDH_VP_INIT: frozenset({_INIT}),
    Leaf.TDH_MEM_PAGE_ADD: frozenset({_INIT}),
    Leaf.TDH_MR_EXTEND: frozenset({_INIT}),
    Leaf.TDH_MR_FINALIZE: frozenset({_INIT}),
    Leaf.TDH_MEM_SEPT_ADD: frozenset({_INIT, _RUN}),
    Leaf.TDH_MEM_PAGE_AUG: frozenset({_INIT, _RUN}),
    Leaf.TDH_MEM_RANGE_BLOCK: frozenset({_INIT, _RUN}),
    Leaf.TDH_MEM_TRACK: frozenset({_INIT, _RUN}),
    Leaf.TDH_MEM_PAGE_REMOVE: frozenset({_INIT, _RUN}),
    Leaf.TDH_MNG_RD: frozenset({_INIT, _RUN}),
    Leaf.TDH_VP_RD: frozenset({_INIT, _RUN}),
    Leaf.TDH_VP_WR: frozenset({_INIT, _RUN}),
    Leaf.TDH_VP_ENTER: frozenset({_RUN}),
}


def _op(status: Status, operand: OperandId) -> int:
    return abi.with_operand(status, operand)


# --- operand checks shared by the leaves ----------------------------------------------------------


def _explicit_tdr(seam: Seam, call: Call, reg: str, operand: OperandId) -> tuple[int, Td | None]:
    pa = call.reg(reg)
    status = private_page_status(seam, pa, operand, PageType.PT_TDR)
    if status:
        return status, None
    td = seam.state.tds.get(pa)
    if td is None:
        call.note = "PT_TDR page without TD state in the model"
        return _op(Status.TDX_PAGE_METADATA_INCORRECT, operand), None
    return 0, td


def _explicit_vcpu(seam: Seam, call: Call, reg: str, operand: OperandId) -> tuple[int, Vcpu | None, Td | None]:
    pa = call.reg(reg)
    status = private_page_status(seam, pa, operand, PageType.PT_TDVPR)
    if status:
        return status, None, None
    vcpu = seam.state.vcpus.get(pa)
    if vcpu is None:
        call.note = "PT_TDVPR page without vCPU state in the model"
        return _op(Status.TDX_PAGE_METADATA_INCORRECT, operand), None, None
    return 0, vcpu, seam.state.tds[vcpu.tdr]


def _built_vcpu(seam: Seam, call: Call, reg: str, operand: OperandId,
                leaf: Leaf) -> tuple[int, Vcpu | None, Td | None]:
    """The vCPU named by ``reg`` and its TD, if the TD's state allows ``leaf`` (_build_state)."""
    status, vcpu, td = _explicit_vcpu(seam, call, reg, operand)
    if vcpu is None or td is None:
        return status, None, None
    status = _build_state(seam, td, leaf)
    return (status, None, None) if status else (0, vcpu, td)


def _build_state(seam: Seam, td: Td, leaf: Leaf) -> int:
    """check_state_map_tdcs_and_lock(): not fatal, keys configured, TDCS complete, OP_STATE
    allows ``leaf``."""
    if td.fatal:
        return _td_fatal()
    if td.lifecycle is not Lifecycle.KEYS_CONFIGURED:
        return Status.TDX_TD_KEYS_NOT_CONFIGURED
    if len(td.tdcx) < seam.platform.tdcs_pages:
        return Status.TDX_TDCS_NOT_ALLOCATED
    if td.op_state not in _OP_STATES[leaf]:
        return Status.TDX_OP_STATE_INCORRECT
    return 0


def _td_fatal() -> int:
    """api_error_fatal(TDX_TD_FATAL) (helpers.c): the status already has the fatal bit."""
    return Status.TDX_TD_FATAL | abi.STATUS_FATAL


def _take_page(seam: Seam, td: Td, pa: int, page_type: PageType) -> None:
    seam.state.assign_page(pa, page_type, owner=td.tdr)
    td.chldcnt += 1


# --- Secure EPT ---------------------------------------------------------------------------------


def _entry_span(level: int) -> int:
    """Bytes one entry at ``level`` maps."""
    return 1 << (12 + 9 * level)


def _table_key(level: int, gpa: int) -> tuple[int, int]:
    """The S-EPT table of ``level`` that covers ``gpa`` (it spans 512 entries)."""
    return level, gpa // (_entry_span(level) * 512)


def sept_walk(td: Td, gpa: int, target: int) -> int:
    """Walk from the root towards ``target``; return the level of the deepest table reached."""
    level = td.root_level
    while level > target and _table_key(level - 1, gpa) in td.sept:
        level -= 1
    return level


def _entry(td: Td, gpa: int, level: int) -> tuple[SeptState, int]:
    """State and architectural value of the entry at ``level`` for ``gpa``."""
    if level == 0:
        leaf = td.leaves.get(gpa - gpa % PAGE)
        if leaf is None:
            return SeptState.FREE, abi.SEPTE_SUPPRESS_VE
        rwx = abi.SEPTE_RWX if leaf.state is SeptState.MAPPED else 0
        return leaf.state, leaf.pa | rwx
    table = td.sept.get(_table_key(level - 1, gpa))
    if table is None:
        return SeptState.FREE, abi.SEPTE_SUPPRESS_VE
    return SeptState.MAPPED, table | abi.SEPTE_RWX


def sept_details(call: Call, td: Td, gpa: int, level: int) -> None:
    """set_arch_septe_details_in_vmm_regs(): RCX = the entry, RDX = level and state."""
    state, value = _entry(td, gpa, level)
    call.outputs.update(rcx=value, rdx=level | (int(state) << abi.SEPT_STATE_SHIFT))


def page_info(rcx: int, min_level: int, max_level: int) -> tuple[int, int] | None:
    """verify_page_info_input(): reserved bits clear, level in range, GPA aligned to it."""
    level = rcx & abi.PAGE_INFO_LEVEL_MASK
    gpa = rcx & ~(abi.PAGE_INFO_RESERVED_MASK | abi.PAGE_INFO_LEVEL_MASK)
    if rcx & abi.PAGE_INFO_RESERVED_MASK or not min_level <= level <= max_level or gpa % _entry_span(level):
        return None
    return gpa, level


# --- TD creation -------------------------------------------------------------------------------------


def mng_create(seam: Seam, call: Call) -> int:
    hkid_input = call.reg("rdx")
    hkid = hkid_input & abi.HKID_MASK
    if hkid_input & ~abi.HKID_MASK or hkid not in seam.platform.tdx_keyids:
        return _op(Status.TDX_OPERAND_INVALID, OperandId.RDX)
    tdr = call.reg("rcx")
    status = private_page_status(seam, tdr, OperandId.RCX, PageType.PT_NDA)
    if status:
        return status
    if hkid in seam.state.kot:
        return Status.TDX_HKID_NOT_FREE
    seam.state.kot[hkid] = KeyState.ASSIGNED
    seam.state.tds[tdr] = Td(tdr=tdr, hkid=hkid)
    seam.state.assign_page(tdr, PageType.PT_TDR)
    return 0


def mng_key_config(seam: Seam, call: Call) -> int:
    status, td = _explicit_tdr(seam, call, "rcx", OperandId.RCX)
    if td is None:
        return status
    if td.fatal:  # tdh_mng_key_config.c checks it first
        return _td_fatal()
    if td.lifecycle is not Lifecycle.HKID_ASSIGNED:
        return Status.TDX_LIFECYCLE_STATE_INCORRECT
    assert call.package is not None
    if call.package in td.keyed_packages:
        return Status.TDX_KEY_CONFIGURED
    td.keyed_packages.add(call.package)
    if td.keyed_packages == set(seam.platform.packages):
        td.lifecycle = Lifecycle.KEYS_CONFIGURED
    return 0


def mng_addcx(seam: Seam, call: Call) -> int:
    status, td = _explicit_tdr(seam, call, "rdx", OperandId.RDX)
    if td is None:
        return status
    if td.fatal:  # tdh_mng_add_cx.c checks it before the lifecycle
        return _td_fatal()
    if td.lifecycle is not Lifecycle.KEYS_CONFIGURED:
        return Status.TDX_TD_KEYS_NOT_CONFIGURED
    # tdh_mng_add_cx.c: up to MAX_NUM_TDCS_PAGES; a page past the minimum (room for L2 VMs) is
    # taken only while OP_STATE, which lives in the TDCS, still allows it.
    after_minimum = len(td.tdcx) >= seam.platform.tdcs_pages
    return _add_control_page(seam, call, td, td.tdcx, abi.MAX_NUM_TDCS_PAGES,
                             Leaf.TDH_MNG_ADDCX if after_minimum else None)


def _add_control_page(seam: Seam, call: Call, td: Td, pages: list[int], limit: int,
                      op_state_leaf: Leaf | None = None) -> int:
    """TDH.MNG.ADDCX / TDH.VP.ADDCX: the page in RCX becomes the next of ``pages`` (the TD's or
    a vCPU's control structure pages, at most ``limit``), a PT_TDCX page of ``td``; with
    ``op_state_leaf``, once the page checks pass, OP_STATE must allow that leaf."""
    if len(pages) >= limit:
        return Status.TDX_TDCX_NUM_INCORRECT
    page = call.reg("rcx")
    status = private_page_status(seam, page, OperandId.RCX, PageType.PT_NDA)
    if status:
        return status
    if op_state_leaf is not None and td.op_state not in _OP_STATES[op_state_leaf]:
        return Status.TDX_OP_STATE_INCORRECT
    pages.append(page)
    _take_page(seam, td, page, PageType.PT_TDCX)
    return 0


def mng_init(seam: Seam, call: Call) -> int:
    # RCX is zeroed on entry (locks.LEAVES): no extended error unless a CPUID leaf is refused.
    status, td = _explicit_tdr(seam, call, "rcx", OperandId.RCX)
    if td is None:
        return status
    status = _build_state(seam, td, Leaf.TDH_MNG_INIT)
    if status:
        return status
    params_pa = call.reg("rdx")
    if not shared_page_ok(seam, params_pa, abi.TD_PARAMS_ALIGN):
        return _op(Status.TDX_OPERAND_INVALID, OperandId.RDX)
    platform = seam.platform
    try:
        raw = call.memory.read(platform.address_of(params_pa), abi.TD_PARAMS_SIZE)
    except MemoryAccessError as err:
        call.note = str(err)
        return _op(Status.TDX_OPERAND_INVALID, OperandId.RDX)
    params = TdParams.unpack(raw, len(platform.cpuid_config))
    verdict = td_params.check(params, platform, len(td.tdcx))
    if verdict.status:
        call.outputs["rcx"] = verdict.rcx
        return verdict.status
    td.params = params
    td.epoch = 1
    td.measurement = MrtdBuilder()
    td.tsc_multiplier = (params.tsc_frequency * 25_000_000 << 48) // platform.tsc_frequency_hz
    native_tsc = int(seam.clock() * platform.tsc_frequency_hz)
    td.tsc_offset = -(native_tsc * td.tsc_multiplier >> 48) & MASK64  # virtual TSC starts at 0
    td.cpuid = _td_cpuid(verdict.cpuid)
    td.op_state = OpState.INITIALIZED
    return 0


def _td_cpuid(stored: dict[CpuidKey, CpuidValue]) -> dict[CpuidKey, CpuidValue]:
    """The TD's virtual CPUID as far as the model knows it: the CPUID_CONFIG leaves as
    TDH.MNG.INIT stored them, and leaves 0 and 0x80000000 (no subleaf) giving the highest of those
    leaves in each range (the module's own values for 0 and 0x80000000, FIXED1 0x23 and
    0x80000008, are not modelled, nor are the leaves it virtualizes outside CPUID_CONFIG). Keyed
    as the module's cpuid_lookup[] is: a leaf without subleaves under CPUID_NO_SUBLEAF."""
    values = dict(stored)
    basic = [leaf for leaf, _ in values if leaf < 0x80000000]
    extended = [leaf for leaf, _ in values if leaf >= 0x80000000]
    values.setdefault((0, abi.CPUID_NO_SUBLEAF), CpuidValue(eax=max(basic, default=0)))
    values.setdefault((0x80000000, abi.CPUID_NO_SUBLEAF), CpuidValue(eax=max(extended, default=0x80000000)))
    return values


# --- vCPUs --------------------------------------------------------------------------------------------


def vp_create(seam: Seam, call: Call) -> int:
    status, td = _explicit_tdr(seam, call, "rdx", OperandId.RDX)
    if td is None:
        return status
    status = _build_state(seam, td, Leaf.TDH_VP_CREATE)
    if status:
        return status
    tdvpr = call.reg("rcx")
    status = private_page_status(seam, tdvpr, OperandId.RCX, PageType.PT_NDA)
    if status:
        return status
    seam.state.vcpus[tdvpr] = Vcpu(tdvpr=tdvpr, tdr=td.tdr)
    _take_page(seam, td, tdvpr, PageType.PT_TDVPR)
    return 0


def vp_addcx(seam: Seam, call: Call) -> int:
    status, vcpu, td = _built_vcpu(seam, call, "rdx", OperandId.RDX, Leaf.TDH_VP_ADDCX)
    if vcpu is None or td is None:
        return status
    if vcpu.state is not VcpuState.UNINITIALIZED:
        return Status.TDX_VCPU_STATE_INCORRECT
    # tdh_vp_addcx.c: up to MAX_TDVPS_PAGES with the TDVPR (the extra ones serve L2 VMs).
    return _add_control_page(seam, call, td, vcpu.tdcx, abi.MAX_TDVPS_PAGES - 1)


def tdcx_needed(seam: Seam, td: Td) -> int:
    """TDCX pages a vCPU of ``td`` needs besides its TDVPR (map_tdvps(): its L2 VMs included)."""
    l2_vms = td.params.num_l2_vms if td.params is not None else 0
    return seam.platform.tdcx_pages + abi.TDVPS_PAGES_PER_L2_VM * l2_vms


def vp_init(seam: Seam, call: Call) -> int:
    version = (call.request.fn >> abi.LEAF_VERSION_SHIFT) & abi.LEAF_VERSION_MASK
    status, vcpu, td = _built_vcpu(seam, call, "rcx", OperandId.RCX, Leaf.TDH_VP_INIT)
    if vcpu is None or td is None:
        return status
    if len(vcpu.tdcx) < tdcx_needed(seam, td):
        return Status.TDX_TDCX_NUM_INCORRECT
    if vcpu.state is not VcpuState.UNINITIALIZED:
        return Status.TDX_VCPU_STATE_INCORRECT
    assert td.params is not None
    if len(td.vcpus) >= td.params.max_vcpus:
        return Status.TDX_MAX_VCPUS_EXCEEDED
    if version >= 1:
        # Version 1 takes the vCPU's x2APIC ID in R8 (topology enumeration): 32 bits, unique.
        x2apic_id = call.reg("r8")
        if x2apic_id >> 32:
            return _op(Status.TDX_OPERAND_INVALID, OperandId.R8)
        taken = [seam.state.vcpus[pa].x2apic_id for pa in td.vcpus]
        if x2apic_id in taken:
            return int(Status.TDX_X2APIC_ID_NOT_UNIQUE) | x2apic_id
        vcpu.x2apic_id = x2apic_id
    vcpu.initial_rcx = call.reg("rdx")
    vcpu.state = VcpuState.READY
    td.vcpus.append(vcpu.tdvpr)
    _associate(td, vcpu, call.request.cpu)
    return 0


def _associate(td: Td, vcpu: Vcpu, cpu: int) -> int:
    """associate_vcpu(): a vCPU runs its VMCS on one LP until TDH.VP.FLUSH."""
    if vcpu.assoc_cpu is None:
        vcpu.assoc_cpu = cpu
        td.num_assoc_vcpus += 1
    elif vcpu.assoc_cpu != cpu:
        return Status.TDX_VCPU_ASSOCIATED
    return 0


def _field_key(fid: int) -> tuple[bool, int, int] | None:
    """A single-element field id as (non-arch, class, field code); None if malformed. The
    element size, context and write-mask-valid bits are ignored, as the module ignores them."""
    if fid & abi.FIELD_SINGLE_ELEMENT_MUST_BE_ZERO:
        return None
    cls = (fid >> abi.FIELD_CLASS_SHIFT) & abi.FIELD_CLASS_MASK
    return bool(fid & abi.FIELD_NON_ARCH), cls, fid & abi.FIELD_CODE_MASK


def _vp_rd_wr(seam: Seam, call: Call, write: bool) -> int:
    call.outputs["r8"] = 0
    status, vcpu, td = _built_vcpu(seam, call, "rcx", OperandId.RCX, Leaf.TDH_VP_WR if write else Leaf.TDH_VP_RD)
    if vcpu is None or td is None:
        return status
    if len(vcpu.tdcx) < tdcx_needed(seam, td):
        return Status.TDX_TDCX_NUM_INCORRECT
    # check_and_associate_vcpu(): an initialized vCPU; VP.RD also reads a disabled one.
    if vcpu.state is not VcpuState.READY and (write or vcpu.state is not VcpuState.DISABLED):
        return Status.TDX_VCPU_STATE_INCORRECT
    status = _associate(td, vcpu, call.request.cpu)
    if status:
        return status
    key = _field_key(call.reg("rdx"))
    md = _VP_FIELDS.get(key) if key is not None else None
    if key is None or md is None:
        return Status.TDX_METADATA_FIELD_ID_INCORRECT
    old = vcpu.fields.get(key, 0)
    if write:
        mask = md.wr_mask & call.reg("r9")
        if not mask:
            return Status.TDX_METADATA_FIELD_NOT_WRITABLE
        vcpu.fields[key] = ((old & ~mask) | (call.reg("r8") & mask)) & ((1 << md.bits) - 1)
    elif not md.rd_mask:
        return Status.TDX_METADATA_FIELD_NOT_READABLE
    call.outputs["r8"] = old & md.rd_mask
    return 0


def vp_enter(seam: Seam, call: Call) -> int:
    """TDH.VP.ENTER: the checks of the real leaf, then the next scripted exit instead of running
    guest code. Every register comes back (KVM reads the TDVMCALL's from R10-R15): the ones the
    exit does not set are cleared, as the module clears what it does not expose. A
    non-recoverable exit disables the vCPU or marks the TD fatal (_end_exit)."""
    status, vcpu, td = _built_vcpu(seam, call, "rcx", OperandId.RCX, Leaf.TDH_VP_ENTER)
    if vcpu is None or td is None:
        return status
    if vcpu.state is not VcpuState.READY:
        return Status.TDX_VCPU_STATE_INCORRECT
    status = _associate(td, vcpu, call.request.cpu)
    if status:
        return status
    answered = _tdvmcall_answer(vcpu, call)
    exit_ = seam.exits.next()
    call.outputs.update(dict.fromkeys(REGISTERS, 0))
    call.outputs.update(exit_.regs)
    details = vcpu.fields.get(_STATE_DETAILS, 0) & ~abi.VCPU_STATE_DETAILS_INTR_PENDING  # delivered
    vcpu.fields[_STATE_DETAILS] = details | (abi.VCPU_STATE_DETAILS_INTR_PENDING if exit_.intr_pending else 0)
    vcpu.last_exit = exit_.reason
    call.note = f"{answered}exit: {exit_.description}"
    reason = exit_.reason | (abi.EXIT_REASON_FAILED_VMENTRY if exit_.entry_failed else 0)
    return _end_exit(td, vcpu, exit_) | reason


def _end_exit(td: Td, vcpu: Vcpu, exit_: TdExit) -> int:
    """async_tdexit_internal() (td_exit.c): the exit's case decides what becomes of the vCPU and
    the TD, and is RAX[63:32]. A vCPU inside the TD when another LP marks it fatal would exit
    with TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE at its next VM exit (tdx_td_dispatcher.c); the
    model runs no vCPU between calls, so that exit happens only when scripted."""
    assert td.params is not None
    case = exit_.case
    if exit_.debug_recovers and td.params.attributes & abi.TD_ATTR_DEBUG:
        case = Status.TDX_SUCCESS
    if case is Status.TDX_NON_RECOVERABLE_VCPU:
        vcpu.state = VcpuState.DISABLED
        return case
    if case is not Status.TDX_SUCCESS:
        # Every other case is a TDX_NON_RECOVERABLE_TD*: the TDR is marked fatal. The real TDVPS
        # stays VCPU_ACTIVE, which no leaf sees: those that check it check TD_FATAL first.
        td.fatal = True
        return case | abi.STATUS_FATAL
    return case


def _tdvmcall_answer(vcpu: Vcpu, call: Call) -> str:
    """What the VMM answered to the vCPU's previous TDVMCALL (R10 status, R11 value), for the trace."""
    if vcpu.last_exit is not abi.ExitReason.TDCALL:
        return ""
    return f"TDVMCALL answered R10={call.reg('r10'):#x} R11={call.reg('r11'):#x}; "


def vp_rd(seam: Seam, call: Call) -> int:
    return _vp_rd_wr(seam, call, write=False)


def vp_wr(seam: Seam, call: Call) -> int:
    return _vp_rd_wr(seam, call, write=True)


def mng_rd(seam: Seam, call: Call) -> int:
    status, td = _explicit_tdr(seam, call, "rcx", OperandId.RCX)
    if td is None:
        return status
    status = _build_state(seam, td, Leaf.TDH_MNG_RD)
    if status:
        return status
    key = _field_key(call.reg("rdx"))
    if key is not None and key[:2] == (True, abi.TdClass.CPUID_VALUES):
        return _cpuid_field(td, key[2], call)
    value = _td_field(td, key) if key is not None else None
    if value is None:
        return Status.TDX_METADATA_FIELD_ID_INCORRECT
    call.outputs["r8"] = value
    return 0


def _td_field(td: Td, key: tuple[bool, int, int]) -> int | None:
    """TDCS fields KVM reads (and a few more that tests find useful)."""
    non_arch, cls, code = key
    params = td.params
    assert params is not None  # TDH.MNG.RD needs OP_STATE >= INITIALIZED
    if (non_arch, cls) == (False, abi.TdClass.TD_EXECUTION_CONTROLS):
        execution: dict[int, int] = {
                abi.TdcsExecField.ATTRIBUTES: params.attributes, abi.TdcsExecField.XFAM: params.xfam,
                abi.TdcsExecField.MAX_VCPUS: params.max_vcpus, abi.TdcsExecField.TSC_OFFSET: td.tsc_offset,
                abi.TdcsExecField.TSC_MULTIPLIER: td.tsc_multiplier,
                abi.TdcsExecField.TSC_FREQUENCY: params.tsc_frequency}
        return execution.get(code)
    if (non_arch, cls) == (True, abi.TdClass.TD_MANAGEMENT):
        management: dict[int, int] = {abi.TdcsManagementField.NUM_VCPUS: len(td.vcpus),
                                      abi.TdcsManagementField.OP_STATE: int(td.op_state)}
        return management.get(code)
    if (non_arch, cls) == (False, abi.TdClass.TD_MEASUREMENT) and code < 6:
        return int.from_bytes(td.mrtd[8 * code:8 * code + 8], "little")  # MRTD, element by element
    return None


def _cpuid_field(td: Td, code: int, call: Call) -> int:
    """metadata_td.c md_td_get_element(): the field names a (leaf, subleaf) of the lookup table,
    SUBLEAF_NA only a leaf without subleaves, so a leaf with subleaves is read one at a time. Set
    reserved bits are TDX_METADATA_FIELD_ID_INCORRECT; a (leaf, subleaf) the TD has no valid
    value for is TDX_METADATA_FIELD_NOT_READABLE. Not modelled: the real module answers 0 for a
    leaf in the TD's CPUID_FIXED0 bitmap that is not in its lookup table (that table is not
    part of the platform config)."""
    if code >> 17:
        return Status.TDX_METADATA_FIELD_ID_INCORRECT
    leaf = ((code >> 9) & 0x7F) | (0x80000000 if code >> 16 & 1 else 0)
    subleaf = abi.CPUID_NO_SUBLEAF if code >> 8 & 1 else (code >> 1) & 0x7F
    value = td.cpuid.get((leaf, subleaf))
    if value is None:
        return Status.TDX_METADATA_FIELD_NOT_READABLE
    call.outputs["r8"] = (value.edx << 32 | value.ecx) if code & 1 else (value.ebx << 32 | value.eax)
    return 0


# --- memory: S-EPT pages, private pages, measurement ------------------------------------------------


def mem_sept_add(seam: Seam, call: Call) -> int:
    status, td = _explicit_tdr(seam, call, "rdx", OperandId.RDX)
    if td is None:
        return status
    status = _build_state(seam, td, Leaf.TDH_MEM_SEPT_ADD)
    if status:
        return status
    info = page_info(call.reg("rcx"), abi.SeptLevel.LVL_PD, td.root_level)
    if info is None or not td.private_gpa(info[0]):
        return _op(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    gpa, level = info
    reached = sept_walk(td, gpa, level)
    if reached != level:
        sept_details(call, td, gpa, reached)
        return _op(Status.TDX_EPT_WALK_FAILED, OperandId.RCX)
    if _entry(td, gpa, level)[0] is not SeptState.FREE:
        sept_details(call, td, gpa, level)
        return _op(Status.TDX_EPT_ENTRY_STATE_INCORRECT, OperandId.RCX)
    page = call.reg("r8")
    status = private_page_status(seam, page, OperandId.R8, PageType.PT_NDA)
    if status:
        return status
    td.sept[_table_key(level - 1, gpa)] = page
    _take_page(seam, td, page, PageType.PT_EPT)
    return 0


def _leaf_target(seam: Seam, call: Call, td: Td, leaf: Leaf) -> tuple[int, int]:
    """Common start of PAGE.ADD/AUG: state, a 4K private GPA, an S-EPT path to a FREE entry.
    Returns (status, gpa)."""
    status = _build_state(seam, td, leaf)
    if status:
        return status, 0
    info = page_info(call.reg("rcx"), abi.SeptLevel.LVL_PT, abi.SeptLevel.LVL_PT)
    if info is None or not td.private_gpa(info[0]):
        return _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), 0
    gpa = info[0]
    reached = sept_walk(td, gpa, 0)
    if reached != 0:
        sept_details(call, td, gpa, reached)
        return _op(Status.TDX_EPT_WALK_FAILED, OperandId.RCX), gpa
    if _entry(td, gpa, 0)[0] is not SeptState.FREE:
        sept_details(call, td, gpa, 0)
        return _op(Status.TDX_EPT_ENTRY_STATE_INCORRECT, OperandId.RCX), gpa
    return 0, gpa


def mem_page_add(seam: Seam, call: Call) -> int:
    status, td = _explicit_tdr(seam, call, "rdx", OperandId.RDX)
    if td is None:
        return status
    status, gpa = _leaf_target(seam, call, td, Leaf.TDH_MEM_PAGE_ADD)
    if status:
        return status
    source = call.reg("r9")
    if not shared_page_ok(seam, source, PAGE):
        return _op(Status.TDX_OPERAND_INVALID, OperandId.R9)
    page = call.reg("r8")
    status = private_page_status(seam, page, OperandId.R8, PageType.PT_NDA)
    if status:
        return status
    try:
        # The module copies the source into the TD page; keep the TD's view for MR.EXTEND.
        content = call.memory.read(seam.platform.address_of(source), PAGE)
    except MemoryAccessError as err:
        call.note = str(err)
        return _op(Status.TDX_OPERAND_INVALID, OperandId.R9)
    td.leaves[gpa] = SeptLeaf(page, SeptState.MAPPED)
    td.contents[gpa] = content
    td.measurement.page_add(gpa)
    _take_page(seam, td, page, PageType.PT_REG)
    return 0


def mem_page_aug(seam: Seam, call: Call) -> int:
    status, td = _explicit_tdr(seam, call, "rdx", OperandId.RDX)
    if td is None:
        return status
    status, gpa = _leaf_target(seam, call, td, Leaf.TDH_MEM_PAGE_AUG)
    if status:
        return status
    page = call.reg("r8")
    status = private_page_status(seam, page, OperandId.R8, PageType.PT_NDA)
    if status:
        return status
    # The guest must TDG.MEM.PAGE.ACCEPT it before use: the entry is PENDING until then.
    td.leaves[gpa] = SeptLeaf(page, SeptState.PENDING)
    td.contents[gpa] = bytes(PAGE)
    _take_page(seam, td, page, PageType.PT_REG)
    return 0


def mr_extend(seam: Seam, call: Call) -> int:
    """tdh_mr_extend.c: RCX and RDX 0 (zeroed on entry, locks.LEAVES) unless the S-EPT walk
    fails; the TDR (RDX), the TD's state, the GPA 256-byte aligned and private (RCX), then a
    walk to a leaf with access rights."""
    status, td = _explicit_tdr(seam, call, "rdx", OperandId.RDX)
    if td is None:
        return status
    status = _build_state(seam, td, Leaf.TDH_MR_EXTEND)
    if status:
        return status
    gpa = call.reg("rcx")
    if gpa % MR_EXTEND_CHUNK or not td.private_gpa(gpa):
        return _op(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    # check_and_walk_private_gpa_to_leaf() fails unless the walk ends on a leaf with RWX: a
    # missing table, a FREE entry, PENDING (PAGE.AUG maps it without access) and BLOCKED
    # (RANGE.BLOCK clears RWX) all do. The module turns that EPT_WALK_FAILED into
    # EPT_ENTRY_NOT_PRESENT, with the entry where the walk stopped. Its next check, plain
    # TDX_EPT_ENTRY_NOT_PRESENT for a leaf whose state MR.EXTEND does not take, is reached only
    # by states that keep RWX (the migration states BLOCKEDW, EXPORTED_*), which the model lacks.
    level = sept_walk(td, gpa, 0)
    if level or not _entry(td, gpa, 0)[1] & abi.SEPTE_RWX:
        sept_details(call, td, gpa, level)
        return _op(Status.TDX_EPT_ENTRY_NOT_PRESENT, OperandId.RCX)
    page_gpa = gpa - gpa % PAGE
    offset = gpa - page_gpa
    td.measurement.mr_extend(gpa, td.contents[page_gpa][offset:offset + MR_EXTEND_CHUNK])
    return 0


def mr_finalize(seam: Seam, call: Call) -> int:
    status, td = _explicit_tdr(seam, call, "rcx", OperandId.RCX)
    if td is None:
        return status
    status = _build_state(seam, td, Leaf.TDH_MR_FINALIZE)
    if status:
        return status
    if not td.vcpus:
        return Status.TDX_NO_VCPUS
    td.mrtd = td.measurement.finalize()
    td.op_state = OpState.RUNNABLE
    call.note = f"MRTD {td.mrtd.hex()}"  # the trace keeps the measurement after teardown
    return 0


# --- removing private pages (the S-EPT zap path) ------------------------------------------------------


def _leaf_to_zap(seam: Seam, call: Call, leaf_fn: Leaf) -> tuple[int, Td | None, int]:
    """Common start of RANGE.BLOCK and PAGE.REMOVE. Returns (status, td, gpa)."""
    status, td = _explicit_tdr(seam, call, "rdx", OperandId.RDX)
    if td is None:
        return status, None, 0
    status = _build_state(seam, td, leaf_fn)
    if status:
        return status, None, 0
    info = page_info(call.reg("rcx"), abi.SeptLevel.LVL_PT, abi.SeptLevel.LVL_PDPT)
    if info is None or not td.private_gpa(info[0]):
        return _op(Status.TDX_OPERAND_INVALID, OperandId.RCX), None, 0
    gpa, level = info
    reached = sept_walk(td, gpa, level)
    if reached != level:
        sept_details(call, td, gpa, reached)
        return _op(Status.TDX_EPT_WALK_FAILED, OperandId.RCX), None, 0
    if level != 0 or gpa not in td.leaves:
        # Free entries, and non-leaf ones (KVM never blocks or removes those: the model neither).
        if level and _entry(td, gpa, level)[0] is not SeptState.FREE:
            call.note = "blocking/removing a non-leaf S-EPT entry is not modelled"
        sept_details(call, td, gpa, level)
        return _op(Status.TDX_EPT_ENTRY_STATE_INCORRECT, OperandId.RCX), None, 0
    return 0, td, gpa


def mem_range_block(seam: Seam, call: Call) -> int:
    status, td, gpa = _leaf_to_zap(seam, call, Leaf.TDH_MEM_RANGE_BLOCK)
    if td is None:
        return status
    leaf = td.leaves[gpa]
    if leaf.state in (SeptState.BLOCKED, SeptState.PENDING_BLOCKED):
        return Status.TDX_GPA_RANGE_ALREADY_BLOCKED
    leaf.state = SeptState.BLOCKED if leaf.state is SeptState.MAPPED else SeptState.PENDING_BLOCKED
    leaf.bepoch = td.epoch
    return 0


def mem_track(seam: Seam, call: Call) -> int:
    status, td = _explicit_tdr(seam, call, "rcx", OperandId.RCX)
    if td is None:
        return status
    status = _build_state(seam, td, Leaf.TDH_MEM_TRACK)
    if status:
        return status
    # No vCPU runs in the model, so the previous epoch never has references left.
    td.epoch += 1
    return 0


def mem_page_remove(seam: Seam, call: Call) -> int:
    status, td, gpa = _leaf_to_zap(seam, call, Leaf.TDH_MEM_PAGE_REMOVE)
    if td is None:
        return status
    leaf = td.leaves[gpa]
    # Before the TD ever ran no vCPU can cache a translation: blocking and tracking are needed
    # only once it is RUNNABLE, and only for pages the guest could have reached.
    if td.op_state is OpState.RUNNABLE and leaf.state is not SeptState.PENDING:
        if leaf.state is not SeptState.BLOCKED and leaf.state is not SeptState.PENDING_BLOCKED:
            sept_details(call, td, gpa, 0)
            return _op(Status.TDX_GPA_RANGE_NOT_BLOCKED, OperandId.RCX)
        if not leaf.bepoch < td.epoch:
            return _op(Status.TDX_TLB_TRACKING_NOT_DONE, OperandId.RCX)
    del td.leaves[gpa]
    td.contents.pop(gpa, None)
    seam.state.free_page(leaf.pa)
    td.chldcnt -= 1
    call.outputs["rcx"] = leaf.pa
    return 0


def phymem_page_wbinvd(seam: Seam, call: Call) -> int:
    # RCX carries the KeyID above the PA bits; the page itself must be free again.
    pa = seam.platform.address_of(call.reg("rcx"))
    return private_page_status(seam, pa, OperandId.RCX, PageType.PT_NDA)


# --- teardown -------------------------------------------------------------------------------------------


def vp_flush(seam: Seam, call: Call) -> int:
    status, vcpu, td = _explicit_vcpu(seam, call, "rcx", OperandId.RCX)
    if vcpu is None or td is None:
        return status
    if td.lifecycle is not Lifecycle.KEYS_CONFIGURED:
        return Status.TDX_TD_KEYS_NOT_CONFIGURED
    if len(vcpu.tdcx) < tdcx_needed(seam, td):
        return Status.TDX_TDCX_NUM_INCORRECT
    if vcpu.assoc_cpu != call.request.cpu:
        return Status.TDX_VCPU_NOT_ASSOCIATED
    vcpu.assoc_cpu = None
    td.num_assoc_vcpus -= 1
    return 0


def mng_vpflushdone(seam: Seam, call: Call) -> int:
    status, td = _explicit_tdr(seam, call, "rcx", OperandId.RCX)
    if td is None:
        return status
    if td.lifecycle not in (Lifecycle.HKID_ASSIGNED, Lifecycle.KEYS_CONFIGURED):
        return Status.TDX_LIFECYCLE_STATE_INCORRECT
    if (len(td.tdcx) >= seam.platform.tdcs_pages and td.op_state is not OpState.UNINITIALIZED
            and td.num_assoc_vcpus):
        call.note = f"{td.num_assoc_vcpus} vCPU(s) still associated"
        return Status.TDX_FLUSHVP_NOT_DONE
    # From now on no LP uses the KeyID; every package must write back its caches for it.
    seam.state.wbinvd_pending[td.hkid] = set(seam.platform.packages)
    seam.state.kot[td.hkid] = KeyState.FLUSHED
    td.lifecycle = Lifecycle.BLOCKED
    return 0


def phymem_cache_wb(seam: Seam, call: Call) -> int:
    cmd = call.reg("rcx")
    if cmd > abi.TDH_PHYMEM_CACHEWB_RESUME_CMD:
        return _op(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    assert call.package is not None
    progress = seam.state.wbcache.get(call.package)
    if cmd == abi.TDH_PHYMEM_CACHEWB_START_CMD:
        flushed = frozenset(h for h, s in seam.state.kot.items() if s is KeyState.FLUSHED)
        if not flushed:
            seam.state.wbcache.pop(call.package, None)
            return Status.TDX_NO_HKID_READY_TO_WBCACHE
        progress = seam.state.wbcache[call.package] = WbCacheProgress(flushed)
    elif progress is None or not progress.chunks_done:
        return Status.TDX_WBCACHE_RESUME_ERROR
    progress.chunks_done += 1
    if progress.chunks_done < seam.platform.cache_wb_chunks:
        return Status.TDX_INTERRUPTED_RESUMABLE
    del seam.state.wbcache[call.package]
    for hkid in progress.hkids:
        seam.state.wbinvd_pending.get(hkid, set()).discard(call.package)
    return 0


def mng_key_freeid(seam: Seam, call: Call) -> int:
    status, td = _explicit_tdr(seam, call, "rcx", OperandId.RCX)
    if td is None:
        return status
    if td.lifecycle is not Lifecycle.BLOCKED:
        return Status.TDX_LIFECYCLE_STATE_INCORRECT
    if seam.state.wbinvd_pending.get(td.hkid):
        call.note = f"packages {sorted(seam.state.wbinvd_pending[td.hkid])} not written back"
        return Status.TDX_WBCACHE_NOT_COMPLETE
    seam.state.wbinvd_pending.pop(td.hkid, None)
    del seam.state.kot[td.hkid]
    td.lifecycle = Lifecycle.TEARDOWN
    return 0


def phymem_page_reclaim(seam: Seam, call: Call) -> int:
    pa = call.reg("rcx")
    if pa % PAGE or pa >= seam.platform.max_pa:
        return _op(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    tdmr = seam.state.tdmr_of(pa)
    if tdmr is None or pa >= tdmr.ready_end:
        return _op(Status.TDX_OPERAND_ADDR_RANGE_ERROR, OperandId.RCX)
    owner = seam.state.pages.get(pa >> 12)
    if owner is None or owner.page_type in (PageType.PT_NDA, PageType.PT_RSVD):
        return _op(Status.TDX_PAGE_METADATA_INCORRECT, OperandId.RCX)
    call.outputs.update(rcx=int(owner.page_type), rdx=owner.owner, r8=int(abi.PageSize.PT_4KB))
    td = seam.state.tds.get(pa if owner.page_type is PageType.PT_TDR else owner.owner)
    if td is None:
        call.note = "page typed by hand (assign_page) without TD state in the model"
        return _op(Status.TDX_PAGE_METADATA_INCORRECT, OperandId.RCX)
    if owner.page_type is PageType.PT_TDR:
        if td.lifecycle is not Lifecycle.TEARDOWN:
            return Status.TDX_LIFECYCLE_STATE_INCORRECT
        if td.chldcnt:
            call.note = f"TD still owns {td.chldcnt} page(s)"
            return Status.TDX_TD_ASSOCIATED_PAGES_EXIST
        del seam.state.tds[pa]
    else:
        if td.lifecycle is not Lifecycle.TEARDOWN:
            return Status.TDX_LIFECYCLE_STATE_INCORRECT
        _forget_page(seam, td, pa, owner.page_type)
        td.chldcnt -= 1
    seam.state.free_page(pa)
    return 0


def _forget_page(seam: Seam, td: Td, pa: int, page_type: PageType) -> None:
    """Drop the module's bookkeeping of a reclaimed TD page."""
    if page_type is PageType.PT_TDVPR:
        seam.state.vcpus.pop(pa, None)
    elif page_type is PageType.PT_EPT:
        td.sept = {key: page for key, page in td.sept.items() if page != pa}
    elif page_type is PageType.PT_REG:
        td.leaves = {gpa: leaf for gpa, leaf in td.leaves.items() if leaf.pa != pa}


HANDLERS: dict[int, Handler] = {
    Leaf.TDH_MNG_CREATE: mng_create,
    Leaf.TDH_MNG_KEY_CONFIG: mng_key_config,
    Leaf.TDH_MNG_ADDCX: mng_addcx,
    Leaf.TDH_MNG_INIT: mng_init,
    Leaf.TDH_MNG_RD: mng_rd,
    Leaf.TDH_VP_CREATE: vp_create,
    Leaf.TDH_VP_ADDCX: vp_addcx,
    Leaf.TDH_VP_INIT: vp_init,
    Leaf.TDH_VP_RD: vp_rd,
    Leaf.TDH_VP_WR: vp_wr,
    Leaf.TDH_VP_ENTER: vp_enter,
    Leaf.TDH_MEM_SEPT_ADD: mem_sept_add,
    Leaf.TDH_MEM_PAGE_ADD: mem_page_add,
    Leaf.TDH_MEM_PAGE_AUG: mem_page_aug,
    Leaf.TDH_MR_EXTEND: mr_extend,
    Leaf.TDH_MR_FINALIZE: mr_finalize,
    Leaf.TDH_MEM_RANGE_BLOCK: mem_range_block,
    Leaf.TDH_MEM_TRACK: mem_track,
    Leaf.TDH_MEM_PAGE_REMOVE: mem_page_remove,
    Leaf.TDH_PHYMEM_PAGE_WBINVD: phymem_page_wbinvd,
    Leaf.TDH_VP_FLUSH: vp_flush,
    Leaf.TDH_MNG_VPFLUSHDONE: mng_vpflushdone,
    Leaf.TDH_PHYMEM_CACHE_WB: phymem_cache_wb,
    Leaf.TDH_MNG_KEY_FREEID: mng_key_freeid,
    Leaf.TDH_PHYMEM_PAGE_RECLAIM: phymem_page_reclaim,
}
# The versions above 0 the TD leaves model (the profile decides which the dispatcher takes):
# TDH.VP.INIT version 1 takes the x2APIC ID (Linux 7.3 always uses it).
MODELLED_VERSION: dict[int, int] = {Leaf.TDH_VP_INIT: 1}
