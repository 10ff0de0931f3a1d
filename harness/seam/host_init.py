"""The host-initialization leaves Linux calls (TDH.SYS.*) and TDH.PHYMEM.PAGE.RDMD, with the
statuses the TDX module 1.5 returns for bad input and bad order (src/vmm_dispatcher/api_calls/
tdh_sys_*.c, tdh_phymem_page_rdmd.c).
"""

from __future__ import annotations

from harness.seam import abi, lp_checks, metadata
from harness.seam.abi import Leaf, OperandId, PageSize, PageType, Status
from harness.seam.call import Call
from harness.seam.state import (
    Handler,
    Handoff,
    KeyState,
    ModuleState,
    Seam,
    SysState,
    TdmrState,
    shared_page_ok,
)
from harness.seam.tdmr import TdmrChecker, TdmrInfo, tdmr_info_size


def sys_init(seam: Seam, call: Call) -> int:
    """tdh_sys_init.c: RCX, RDX, R8-R10 zeroed (locks.LEAVES); the attributes in RCX (all
    reserved in 1.5) checked before the state."""
    if call.reg("rcx"):
        return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    if seam.state.sys not in (SysState.SYSINIT_PENDING, SysState.SYS_SHUTDOWN):
        return Status.TDX_SYS_INIT_NOT_PENDING
    refused = lp_checks.sys_init_status(seam.platform.deviation_of(call.request.cpu))
    if refused:
        return refused
    pending = seam.state.sys is SysState.SYSINIT_PENDING
    # A module the P-SEAMLDR loaded as an update finds its predecessor's handoff data; SYS.INIT
    # itself runs the same either way (tdh_sys_init.c has no update mode).
    handoff = seam.state.handoff if pending else None
    pages = seam.state.pages if pending else {}
    seam.state = ModuleState(sys=SysState.SYSINIT_DONE, handoff=handoff, pages=pages,
                             calls_per_leaf=seam.state.calls_per_leaf, sysinit_lp=call.request.cpu)
    return 0


def sys_lp_init(seam: Seam, call: Call) -> int:
    """tdh_sys_lp_init.c: RCX, RDX, R8 zeroed (locks.LEAVES); the state, this LP not done yet,
    then this LP against the SYS.INIT LP (lp_checks.py)."""
    state = seam.state
    if state.sys is not SysState.SYSINIT_DONE:
        return Status.TDX_SYS_LP_INIT_NOT_PENDING
    if call.request.cpu in state.lp_initialized:
        return Status.TDX_SYS_LP_INIT_DONE
    assert state.sysinit_lp is not None, "SYSINIT_DONE is set by TDH.SYS.INIT only"
    platform = seam.platform
    refused = lp_checks.lp_init_status(platform.deviation_of(call.request.cpu),
                                       platform.deviation_of(state.sysinit_lp), call)
    if refused:
        return refused
    state.lp_initialized.add(call.request.cpu)
    return 0


def sys_rd(seam: Seam, call: Call) -> int:
    """tdh_sys_rd.c: RDX = MD_FIELD_ID_NA and R8 = 0 on entry; the LP must have run
    LP.INIT; the null id answers the first field id (a non-error status); a single-element
    id is looked up on class and field code only (metadata.py); RDX the next element."""
    call.outputs.update(rdx=metadata.MD_FIELD_ID_NA, r8=0)
    if call.request.cpu not in seam.state.lp_initialized:
        return Status.TDX_SYS_LP_INIT_NOT_DONE
    table = metadata.global_metadata(seam.platform, seam.loader.running, seam.handoff_header)
    field_id = call.reg("rdx")
    if metadata.is_null_field_id(field_id):
        call.outputs["rdx"] = table.next_element(field_id)
        return Status.TDX_METADATA_FIRST_FIELD_ID_IN_CONTEXT
    entry = table.lookup(field_id)
    if field_id & abi.FIELD_SINGLE_ELEMENT_MUST_BE_ZERO or entry is None:
        return Status.TDX_METADATA_FIELD_ID_INCORRECT
    call.outputs.update(rdx=table.next_element(field_id), r8=entry.value(field_id))
    return 0


def sys_config(seam: Seam, call: Call) -> int:
    if seam.state.sys is not SysState.SYSINIT_DONE:
        return Status.TDX_SYS_CONFIG_NOT_PENDING
    if len(seam.state.lp_initialized) < len(seam.platform.cpus):
        call.note = f"{len(seam.state.lp_initialized)} of {len(seam.platform.cpus)} LPs initialized"
        return Status.TDX_SYS_CONFIG_NOT_PENDING
    array_pa, count, hkid = call.reg("rcx"), call.reg("rdx"), call.reg("r8")
    if not shared_page_ok(seam, array_pa, abi.TDMR_INFO_PA_ARRAY_ALIGNMENT):
        return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    if count < 1 or count > seam.platform.max_tdmrs:
        return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RDX)
    if hkid >> 16 or hkid not in seam.platform.tdx_keyids:
        return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.R8)
    # tdh_sys_config.c reserves the KOT entry before it reads a TDMR: a failed SYS.CONFIG
    # leaves the KeyID taken.
    seam.state.global_keyid = hkid
    seam.state.kot[hkid] = KeyState.ASSIGNED  # the module's own KeyID is never free
    entry_pas = [int.from_bytes(call.memory.read(seam.platform.address_of(array_pa) + 8 * i, 8), "little")
                 for i in range(count)]
    checker = TdmrChecker(seam.platform.max_pa, seam.platform.cmrs, seam.platform.pamt_entry_sizes)
    size = tdmr_info_size(seam.platform.max_reserved_per_tdmr)
    for entry_pa in entry_pas:
        if not shared_page_ok(seam, entry_pa, abi.TDMR_INFO_ALIGNMENT):
            return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
        status = checker.check(TdmrInfo.unpack(call.memory.read(seam.platform.address_of(entry_pa), size),
                                                seam.platform.max_reserved_per_tdmr))
        if status:
            return status
    seam.state.tdmrs = [TdmrState(info) for info in checker.accepted]
    seam.state.sys = SysState.SYSCONFIG_DONE
    return 0


def sys_key_config(seam: Seam, call: Call) -> int:
    """tdh_sys_key_config.c: the state, then the caller's package (no LP check)."""
    if seam.state.sys is not SysState.SYSCONFIG_DONE:
        return Status.TDX_SYS_KEY_CONFIG_NOT_PENDING
    if call.package in seam.state.packages_configured:
        return Status.TDX_KEY_CONFIGURED
    assert call.package is not None  # the dispatcher refuses CPUs outside the platform
    seam.state.packages_configured.add(call.package)
    if seam.state.packages_configured == set(seam.platform.packages):
        seam.state.sys = SysState.SYS_READY
    return 0


def sys_tdmr_init(seam: Seam, call: Call) -> int:
    """tdh_sys_tdmr_init.c: RDX zeroed on entry (locks.LEAVES); a 1 GiB-aligned TDMR base
    without KeyID bits; TDMR_4K_PAMT_INIT_COUNT entries (4 MiB) a call; RDX = the next address
    to initialize rounded down to 1 GiB, so most calls return the same RDX."""
    base = call.reg("rcx")
    if base % abi.SZ_1G or base >= seam.platform.max_pa:
        return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    tdmr = next((t for t in seam.state.tdmrs if t.info.base == base), None)
    if tdmr is None:
        return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    if tdmr.done:
        return Status.TDX_TDMR_ALREADY_INITIALIZED
    tdmr.initialized = min(tdmr.info.size, tdmr.initialized + seam.platform.tdmr_init_chunk)
    call.outputs["rdx"] = (base + tdmr.initialized) & ~(abi.SZ_1G - 1)
    return 0


def sys_disable(seam: Seam, call: Call) -> int:
    """No public module source implements it; the harness's reading of Linux's tdx_sys_disable():
    a long-running leaf that takes ``platform.sys_disable_calls`` calls, answering
    TDX_INTERRUPTED_RESUMABLE until the last, in any state (before init as after it, and again
    after it finished). From its first call the module is shut down: meanwhile a new TDH.SYS.*
    call is TDX_SYS_BUSY and any other TDX_SYS_SHUTDOWN (the dispatcher), and when it is done
    the module may start over with TDH.SYS.INIT, a handoff for an update discarded."""
    state = seam.state
    state.sys = SysState.SYS_SHUTDOWN
    state.disable_calls += 1
    if state.disable_calls < seam.platform.sys_disable_calls:
        return Status.TDX_INTERRUPTED_RESUMABLE
    state.disable_calls = 0
    state.lp_initialized.clear()
    state.handoff = None
    return 0


def sys_shutdown(seam: Seam, call: Call) -> int:
    """tdh_sys_shutdown.c (1.5.01 and the 2.0 snapshot): the handoff version in RCX, the whole
    register, within [MIN_UPDATE_HV, MODULE_HV] of the running module and equal to MODULE_HV
    under NO_DOWNGRADE, checked before the global lock; then SYS_SHUTDOWN and the handoff data
    written. The global lock and its busy-LP check (TDX_SYS_BUSY while another LP is in SEAM)
    are the contention model's (locks.py); there they come before the RCX check. (Later
    sources take bits 15:0 as the version, bit 16 as AVOID_COMPAT_SENSITIVE and the rest as
    reserved; Linux 7.3 passes MODULE_HV, which both readings accept.)"""
    running, hv = seam.loader.running, call.reg("rcx")
    if not running.takes_handoff(hv) or (running.no_downgrade and hv != running.module_hv):
        return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    seam.state.sys = SysState.SYS_SHUTDOWN
    seam.state.handoff = Handoff(hv, preserved=seam.state)
    return 0


def sys_update(seam: Seam, call: Call) -> int:
    """tdh_sys_update.c: SYS.INIT done, LP.INIT on every LP and no SYS.CONFIG yet (else
    TDX_SYS_STATE_INCORRECT); a valid handoff whose version is within this module's
    [MIN_UPDATE_HV, MODULE_HV] (else TDX_SYS_INVALID_HANDOFF; NO_DOWNGRADE is not checked again);
    then the handed-off KOT, TDMRs, PAMT and TDs, and SYS_READY, without SYS.CONFIG, KEY.CONFIG
    or TDMR.INIT."""
    state, running = seam.state, seam.loader.running
    if state.sys is not SysState.SYSINIT_DONE or len(state.lp_initialized) < len(seam.platform.cpus):
        return Status.TDX_SYS_STATE_INCORRECT
    handoff = state.handoff
    if handoff is None or not running.takes_handoff(handoff.hv):
        return Status.TDX_SYS_INVALID_HANDOFF
    restored = handoff.preserved
    restored.sys, restored.handoff = SysState.SYS_READY, None
    restored.lp_initialized, restored.calls_per_leaf = state.lp_initialized, state.calls_per_leaf
    seam.state = restored
    return 0


def phymem_page_rdmd(seam: Seam, call: Call) -> int:
    """tdh_phymem_page_rdmd.c: RCX, RDX, R8-R11 zeroed on entry (locks.LEAVES); the PA
    page-aligned, below MAXPA and without KeyID bits; inside an initialized 1 GiB block of a
    TDMR; R9 the blocking epoch for PT_REG and PT_EPT pages."""
    pa = call.reg("rcx")
    if pa % abi.SZ_4K or pa >= seam.platform.max_pa:
        return abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    tdmr = seam.state.tdmr_of(pa)
    if tdmr is None or pa >= tdmr.ready_end:
        return abi.with_operand(Status.TDX_OPERAND_ADDR_RANGE_ERROR, OperandId.RCX)
    owner = seam.state.pages.get(pa >> 12)
    page_type = seam.state.page_type(pa)
    call.outputs.update(rcx=int(page_type), rdx=owner.owner if owner else 0, r8=int(PageSize.PT_4KB))
    if owner is not None and page_type in (PageType.PT_REG, PageType.PT_EPT):
        call.outputs["r9"] = _bepoch(seam, pa, owner.owner)
    return 0


def _bepoch(seam: Seam, pa: int, tdr: int) -> int:
    """The TD epoch at which the S-EPT entry mapping ``pa`` was blocked (0: not blocked,
    or an S-EPT page, whose blocking the model does not track)."""
    owner = seam.state.tds.get(tdr)
    leaf = next((leaf for leaf in owner.leaves.values() if leaf.pa == pa), None) if owner else None
    return leaf.bepoch if leaf is not None else 0


HANDLERS: dict[int, Handler] = {
    Leaf.TDH_SYS_INIT: sys_init,
    Leaf.TDH_SYS_LP_INIT: sys_lp_init,
    Leaf.TDH_SYS_RD: sys_rd,
    Leaf.TDH_SYS_CONFIG: sys_config,
    Leaf.TDH_SYS_KEY_CONFIG: sys_key_config,
    Leaf.TDH_SYS_TDMR_INIT: sys_tdmr_init,
    Leaf.TDH_SYS_DISABLE: sys_disable,
    Leaf.TDH_SYS_SHUTDOWN: sys_shutdown,
    Leaf.TDH_SYS_UPDATE: sys_update,
    Leaf.TDH_PHYMEM_PAGE_RDMD: phymem_page_rdmd,
}
