"""Non-recoverable TD exits and fatal TDs: what TDH.VP.ENTER returns when the module ends a TD
exit with a case other than TDX_SUCCESS, what that does to the vCPU and the TD, which leaves then
answer TDX_TD_FATAL and which still tear the TD down, and how KVM 7.3 classifies each status
(harness/observe/kvm.py). Expected values come from intel/tdx-module TDX_1.5.01 and Linux 7.3."""

from __future__ import annotations

import pytest
from kvm_replay import KVM_SUPPORTED_TDX_TD_ATTRS, KvmTd, KvmVcpu, new_td, ready_module
from linux_replay import call

from harness.observe.kvm import (
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_SHUTDOWN,
    VpEnterOutcome,
    vp_enter_outcome,
)
from harness.seam import abi, exits
from harness.seam.abi import ExitReason, Leaf, OperandId, PageType, Status
from harness.seam.exits import TdExit

MC_INTR_INFO = abi.INTR_INFO_VALID | abi.INTR_TYPE_HARD_EXCEPTION | abi.MC_VECTOR
TD_FATAL = Status.TDX_TD_FATAL | abi.STATUS_FATAL  # api_error_fatal(TDX_TD_FATAL), helpers.c
VP_STATE_DETAILS = abi.field_id(abi.TdvpsClass.OTHER_GUEST, abi.TDVPS_VCPU_STATE_DETAILS, non_arch=True)


def running_td(vcpus: int = 2, attributes: int = KVM_SUPPORTED_TDX_TD_ATTRS) -> KvmTd:
    td = new_td(ready_module())
    td.init_vm(attributes=attributes)
    for i in range(vcpus):
        td.init_vcpu(i, cpu=td.module.platform.cpus[i % len(td.module.platform.cpus)].apic_id)
    td.add_page(0, td.pages.alloc(), measure=True)  # one private page, so the S-EPT has tables
    td.finalize()
    return td


def enter(td: KvmTd, vcpu: KvmVcpu) -> int:
    return call(td.module, td.memory, vcpu.cpu, Leaf.TDH_VP_ENTER, rcx=vcpu.tdvpr).status


def vp_rd(td: KvmTd, vcpu: KvmVcpu) -> int:
    return call(td.module, td.memory, vcpu.cpu, Leaf.TDH_VP_RD, rcx=vcpu.tdvpr, rdx=VP_STATE_DETAILS).status


def vp_wr(td: KvmTd, vcpu: KvmVcpu) -> int:
    return call(td.module, td.memory, vcpu.cpu, Leaf.TDH_VP_WR, rcx=vcpu.tdvpr,
                rdx=abi.VmcsField.NOTIFY_WINDOW, r8=1, r9=0xFFFFFFFF).status


# The TD-fatal exits: (exit, RAX, RCX, R9), each as async_tdexit_internal() builds it: the case,
# the fatal bit, the exit reason in bits 31:0 (bit 31 for a failed VM entry).
FATAL_EXITS = [
    pytest.param(exits.machine_check(), Status.TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE | ExitReason.EXCEPTION_NMI,
                 0, MC_INTR_INFO, id="machine_check"),
    pytest.param(exits.vmentry_machine_check(), Status.TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE
                 | abi.EXIT_REASON_FAILED_VMENTRY | ExitReason.MCE_DURING_VMENTRY, 0, 0, id="vmentry_machine_check"),
    pytest.param(exits.msmi(), Status.TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE | ExitReason.OTHER_SMI,
                 abi.EXIT_QUAL_SMI_MSMI, 0, id="msmi"),
    pytest.param(exits.invalid_guest_state(), Status.TDX_NON_RECOVERABLE_TD | abi.EXIT_REASON_FAILED_VMENTRY
                 | ExitReason.INVALID_STATE, 0, 0, id="invalid_guest_state"),
    pytest.param(exits.notify_context_invalid(), Status.TDX_NON_RECOVERABLE_TD | ExitReason.NOTIFY,
                 abi.EXIT_QUAL_NOTIFY_VM_CONTEXT_INVALID, 0, id="notify_context_invalid"),
    pytest.param(exits.wrong_apic_mode(0xEC), Status.TDX_NON_RECOVERABLE_TD_WRONG_APIC_MODE
                 | ExitReason.EXTERNAL_INTERRUPT, 0, abi.INTR_INFO_VALID | 0xEC, id="wrong_apic_mode"),
    pytest.param(exits.corrupted_metadata(), Status.TDX_NON_RECOVERABLE_TD_CORRUPTED_MD, 0, 0,
                 id="corrupted_metadata"),
]


# --- TDH.VP.ENTER's non-recoverable exits ------------------------------------------------------------


def test_triple_fault_disables_the_vcpu_and_leaves_the_td_running():
    """src/td_dispatcher/tdx_td_dispatcher.c (VMEXIT_REASON_TRIPLE_FAULT) and
    src/td_transitions/td_exit.c async_tdexit_internal(): TDX_NON_RECOVERABLE_VCPU without the
    fatal bit, the vCPU VCPU_DISABLED. check_and_associate_vcpu() (src/common/helpers/helpers.c,
    used by src/td_transitions/tdh_vp_enter.c and tdh_vp_rd_wr.c) then refuses it for VP.ENTER
    and VP.WR but lets VP.RD read it; the other vCPU and the TD go on."""
    td = running_td()
    first, second = td.vcpus
    td.module.exits.add(exits.triple_fault(), exits.hlt())
    status, regs = td.enter(first)
    assert status == Status.TDX_NON_RECOVERABLE_VCPU | ExitReason.TRIPLE_FAULT
    assert not status & abi.STATUS_FATAL
    assert set(regs.values()) == {0}
    assert enter(td, first) == Status.TDX_VCPU_STATE_INCORRECT
    assert len(td.module.exits.queued) == 1, "the refused entry consumed no exit"
    assert (vp_rd(td, first), vp_wr(td, first)) == (0, Status.TDX_VCPU_STATE_INCORRECT)
    status, regs = td.enter(second)
    assert (status, regs["r11"]) == (ExitReason.TDCALL, abi.Tdvmcall.HLT)
    assert td.sc(Leaf.TDH_MNG_RD, rcx=td.tdr, rdx=abi.field_id(abi.TdClass.TD_MANAGEMENT,
                                                               abi.TdcsManagementField.NUM_VCPUS,
                                                               non_arch=True)).regs[2] == 2


@pytest.mark.parametrize("exit_,rax,rcx,r9", FATAL_EXITS)
def test_fatal_exit_registers_and_the_td_is_fatal_for_every_vcpu(exit_: TdExit, rax: int, rcx: int, r9: int):
    """src/td_transitions/td_exit.c async_tdexit_internal(): a TDX_NON_RECOVERABLE_TD* case sets
    TDR.FATAL and the status's fatal bit (bit 61, already part of each of these codes in
    include/auto_gen/tdx_error_codes_defs.h), RAX[31:0] = the exit reason, RCX = exit
    qualification, R9 = interruption info, RDX, R8 and R10-R15/RBX/RSI/RDI 0. The causes:
    tdx_td_dispatcher.c (VM-entry failures, notify, MSMI), td_other_exits.c (#MC),
    td_exit_stepping.c (wrong APIC mode), tdg_mr_report.c (corrupted metadata). Every later
    VP.ENTER, on any vCPU, fails check_state_map_tdcs_and_lock() (helpers.c) with
    api_error_fatal(TDX_TD_FATAL) before its vCPU checks."""
    td = running_td()
    first, second = td.vcpus
    td.module.exits.add(exit_, exits.hlt())
    status, regs = td.enter(first)
    assert status == rax and status & abi.STATUS_FATAL
    assert (regs.pop("rcx"), regs.pop("r9")) == (rcx, r9)
    assert set(regs.values()) == {0}
    assert (enter(td, first), enter(td, second)) == (TD_FATAL, TD_FATAL)
    assert TD_FATAL == Status.TDX_TD_FATAL, "bit 61 is part of TDX_TD_FATAL itself"
    assert len(td.module.exits.queued) == 1


def test_invalid_guest_state_of_a_debug_td_is_an_ordinary_exit():
    """src/td_dispatcher/tdx_td_dispatcher.c handle_vm_entry_failures(): VMEXIT_REASON_FAILED_VMENTER_GS
    is TDX_SUCCESS for a TD with ATTRIBUTES.DEBUG (its guest state is the host's to write), so
    the TD stays runnable."""
    td = running_td(vcpus=1, attributes=KVM_SUPPORTED_TDX_TD_ATTRS | abi.TD_ATTR_DEBUG)
    td.module.exits.add(exits.invalid_guest_state(), exits.hlt())
    assert td.enter(td.vcpus[0])[0] == abi.EXIT_REASON_FAILED_VMENTRY | ExitReason.INVALID_STATE
    assert td.enter(td.vcpus[0])[0] == ExitReason.TDCALL


# --- the leaves on a fatal TD ------------------------------------------------------------------------


def fatal_td() -> KvmTd:
    td = running_td()
    td.module.exits.add(exits.machine_check())
    td.enter(td.vcpus[0])
    return td


def test_build_and_run_leaves_answer_td_fatal_first():
    """check_state_map_tdcs_and_lock() -> check_td_in_correct_build_state()
    (src/common/helpers/helpers.c) checks TDR.FATAL before the lifecycle, TDCS and OP_STATE, and
    every TD leaf KVM uses while the TD lives calls it right after the TDR (tdh_mng_rd_wr.c,
    tdh_vp_rd_wr.c, tdh_vp_create.c, tdh_mem_page_add.c, tdh_mem_page_aug.c,
    tdh_mem_sept_add.c, tdh_mem_range_block.c, tdh_mem_track.c, tdh_mem_page_remove.c,
    tdh_mr_extend.c, tdh_mr_finalize.c): TDX_TD_FATAL even where OP_STATE (RUNNABLE) would refuse
    the leaf anyway. tdh_mng_key_config.c and tdh_mng_add_cx.c test TDR.FATAL themselves, before
    the lifecycle."""
    td = fatal_td()
    vcpu = td.vcpus[1]
    page, gpa = td.pages.alloc(), 0x200000
    source = td.pages.alloc()
    calls: list[tuple[int, int, dict[str, int]]] = [
        (Leaf.TDH_MNG_RD, 0, {"rcx": td.tdr, "rdx": abi.field_id(abi.TdClass.TD_EXECUTION_CONTROLS,
                                                                  abi.TdcsExecField.ATTRIBUTES)}),
        (Leaf.TDH_VP_RD, vcpu.cpu, {"rcx": vcpu.tdvpr, "rdx": VP_STATE_DETAILS}),
        (Leaf.TDH_VP_WR, vcpu.cpu, {"rcx": vcpu.tdvpr, "rdx": abi.VmcsField.NOTIFY_WINDOW, "r8": 1, "r9": 1}),
        (Leaf.TDH_VP_CREATE, 0, {"rcx": page, "rdx": td.tdr}),
        (Leaf.TDH_MEM_PAGE_ADD, 0, {"rcx": gpa, "rdx": td.tdr, "r8": page, "r9": source}),
        (Leaf.TDH_MEM_PAGE_AUG, 0, {"rcx": gpa, "rdx": td.tdr, "r8": page}),
        (Leaf.TDH_MEM_SEPT_ADD, 0, {"rcx": gpa | abi.SeptLevel.LVL_PD, "rdx": td.tdr, "r8": page}),
        (Leaf.TDH_MEM_RANGE_BLOCK, 0, {"rcx": next(iter(td.private), gpa), "rdx": td.tdr}),
        (Leaf.TDH_MEM_TRACK, 0, {"rcx": td.tdr}),
        (Leaf.TDH_MEM_PAGE_REMOVE, 0, {"rcx": gpa, "rdx": td.tdr}),
        (Leaf.TDH_MR_EXTEND, 0, {"rcx": gpa, "rdx": td.tdr}),
        (Leaf.TDH_MR_FINALIZE, 0, {"rcx": td.tdr}),
        (Leaf.TDH_MNG_ADDCX, 0, {"rcx": page, "rdx": td.tdr}),
        (Leaf.TDH_MNG_KEY_CONFIG, 0, {"rcx": td.tdr}),
    ]
    statuses = {abi.leaf_name(fn): call(td.module, td.memory, cpu, fn, **regs).status for fn, cpu, regs in calls}
    assert statuses == {abi.leaf_name(fn): TD_FATAL for fn, _, _ in calls}


def test_teardown_leaves_work_on_a_fatal_td_and_reclaim_every_page():
    """The leaves KVM tears a TD down with do not look at TDR.FATAL: tdh_vp_flush.c,
    tdh_mng_vpflushdone.c, tdh_phymem_cache_wb.c, tdh_mng_key_freeid.c, tdh_phymem_page_reclaim.c
    and tdh_phymem_page_wbinvd.c. With RANGE.BLOCK/PAGE.REMOVE refused (TDX_TD_FATAL), the private
    pages come back through PAGE.RECLAIM once the TD is in TEARDOWN, and nothing is left."""
    td = fatal_td()
    assert td.private, "the TD has private pages to give back"
    td.release_hkid()  # VP.FLUSH of each vCPU, VPFLUSHDONE, CACHE.WB on each package, KEY.FREEID
    pages = [p for v in td.vcpus for p in (*v.tdcx, v.tdvpr)] + list(td.private.values()) \
        + list(td.sept_pages.values()) + td.tdcs
    reclaimed = [td.reclaim(page) for page in pages]
    assert {r.status for r in reclaimed} == {0}
    assert td.reclaim(td.tdr).status == 0
    keyed = td.keyed(td.tdr, td.module.platform.tdx_keyid_start)
    assert call(td.module, td.memory, 0, Leaf.TDH_PHYMEM_PAGE_WBINVD, rcx=keyed).status == 0
    assert not {owner.page_type for owner in td.module.state.pages.values()} & {
        PageType.PT_TDR, PageType.PT_TDCX, PageType.PT_TDVPR, PageType.PT_EPT, PageType.PT_REG}
    assert td.tdr not in td.module.state.tds and td.hkid not in td.module.state.kot


def test_reclaim_before_teardown_is_refused_on_a_fatal_td_too():
    """tdh_phymem_page_reclaim.c: the owner TD must be in TEARDOWN whatever TDR.FATAL says."""
    td = fatal_td()
    reclaim = call(td.module, td.memory, 0, Leaf.TDH_PHYMEM_PAGE_RECLAIM, rcx=td.vcpus[0].tdvpr)
    assert reclaim.status == Status.TDX_LIFECYCLE_STATE_INCORRECT


# --- how KVM 7.3 classifies these statuses (arch/x86/kvm/vmx/tdx.c __tdx_handle_exit()) ---------------


def outcome_of(exit_: TdExit) -> VpEnterOutcome:
    td = running_td(vcpus=1)
    td.module.exits.add(exit_)
    return vp_enter_outcome(td.enter(td.vcpus[0])[0])


def test_kvm_turns_a_triple_fault_into_a_shutdown_exit():
    """tdx.c: TDX_NON_RECOVERABLE_VCPU is a valid exit status (tdx_is_exit_reason_valid()) and a
    TRIPLE_FAULT exit reason bypasses the TDX_ERROR|TDX_NON_RECOVERABLE check: KVM_EXIT_SHUTDOWN."""
    assert outcome_of(exits.triple_fault()) == VpEnterOutcome(KVM_EXIT_SHUTDOWN)


def test_kvm_reports_a_machine_check_on_vm_entry_as_a_failed_entry():
    """tdx.c tdx_failed_vmentry(): TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE has the same value in
    Linux's tdx_errno.h as in the module, so KVM keeps the exit reason, sees bit 31 and reports
    KVM_EXIT_FAIL_ENTRY with the full exit reason."""
    reason = abi.EXIT_REASON_FAILED_VMENTRY | ExitReason.MCE_DURING_VMENTRY
    assert outcome_of(exits.vmentry_machine_check()) == VpEnterOutcome(KVM_EXIT_FAIL_ENTRY, reason)


@pytest.mark.parametrize("exit_", [p.values[0] for p in FATAL_EXITS if p.id != "vmentry_machine_check"],
                         ids=[p.id for p in FATAL_EXITS if p.id != "vmentry_machine_check"])
def test_kvm_reports_other_fatal_exits_as_an_unexpected_exit_reason(exit_: TdExit):
    """tdx.c: a status with TDX_ERROR or TDX_NON_RECOVERABLE and no TRIPLE_FAULT reason goes to
    kvm_prepare_unexpected_reason_exit(): KVM_EXIT_INTERNAL_ERROR with data[0] = the status. For
    an invalid guest state this replaces a failed entry: Linux's TDX_NON_RECOVERABLE_TD
    (0x4000000200000000, tdx_errno.h) is not the module's 0x6000000200000000, so
    tdx_is_exit_reason_valid() refuses the status and bit 31 is never looked at."""
    outcome = outcome_of(exit_)
    assert outcome.kvm_exit == KVM_EXIT_INTERNAL_ERROR and outcome.data & abi.STATUS_NON_RECOVERABLE
    assert not outcome.vm_bugged


def test_kvm_reports_entering_a_fatal_td_or_a_disabled_vcpu_as_an_unexpected_exit_reason():
    """A KVM_RUN after the TD went fatal gets TDX_TD_FATAL (helpers.c), after a triple fault on
    the same vCPU TDX_VCPU_STATE_INCORRECT (check_and_associate_vcpu()): both error statuses
    without an exit reason, KVM_EXIT_INTERNAL_ERROR in tdx.c."""
    td = fatal_td()
    assert vp_enter_outcome(enter(td, td.vcpus[1])) == VpEnterOutcome(KVM_EXIT_INTERNAL_ERROR, TD_FATAL)
    td = running_td(vcpus=1)
    td.module.exits.add(exits.triple_fault())
    td.enter(td.vcpus[0])
    assert vp_enter_outcome(enter(td, td.vcpus[0])) == \
        VpEnterOutcome(KVM_EXIT_INTERNAL_ERROR, Status.TDX_VCPU_STATE_INCORRECT)


def test_kvm_leaves_busy_and_ordinary_exits_to_itself():
    """tdx.c tdx_exit_handlers_fastpath(): TDX_OPERAND_BUSY re-enters without a userspace exit;
    a TDX_SUCCESS exit goes to the exit-reason handlers. The SEAMCALL's own failures
    (TDX_SW_ERROR) are a KVM_BUG_ON unless the machine is rebooting; RAX = EPT_MISCONFIG is a
    KVM_BUG_ON and -EIO."""
    busy = abi.with_operand(Status.TDX_OPERAND_BUSY, OperandId.SEPT)
    assert vp_enter_outcome(busy) == VpEnterOutcome(None)
    assert vp_enter_outcome(Status.TDX_SUCCESS | ExitReason.HLT) == VpEnterOutcome(None)
    assert vp_enter_outcome(Status.TDX_SEAMCALL_UD) == \
        VpEnterOutcome(KVM_EXIT_INTERNAL_ERROR, Status.TDX_SEAMCALL_UD, vm_bugged=True)
    assert vp_enter_outcome(Status.TDX_SEAMCALL_UD, virt_rebooting=True).vm_bugged is False
    assert vp_enter_outcome(ExitReason.EPT_MISCONFIG).vm_bugged
