"""Lock contention between LPs (harness/seam/locks.py): two CPUs whose calls overlap in the
modelled window meet the busy status of the lock the TDX module 1.5.01 would fail to take.
Each test names the module source (tag TDX_1.5.01) its statuses come from; the clock is
injected, so the windows are exact."""

from __future__ import annotations

from dataclasses import dataclass

from kvm_replay import KVM_SUPPORTED_TDX_TD_ATTRS, PAGE, RAM, KvmTd, new_td, ready_module
from linux_replay import call

from harness.seam import abi, exits
from harness.seam.abi import Leaf, OperandId, SeptState, Status
from harness.seam.locks import LEAVES
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram

HOLD = 0.01  # seconds a cost-1 leaf holds its locks in these tests
GPA = 0xFFFF_0000  # the page KVM_TDX_INIT_MEM_REGION added; its S-EPT PT covers the next ones


@dataclass
class Clock:
    """The module clock, moved by the test."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def after(self, leaf: Leaf) -> None:
        """Move to the end of ``leaf``'s window."""
        self.now += LEAVES[leaf].cost * HOLD


def contended(module: TdxModule) -> Clock:
    """Turn the model on in a module set up without it (so set-up calls never contend)."""
    clock = Clock()
    module.seam.platform = module.platform.replace(lock_hold_s=HOLD)
    module.seam.clock = clock
    return clock


def finalized_td() -> KvmTd:
    """A finalized TD with one vCPU per CPU (vCPU n on APIC id n) and one added page."""
    td = new_td(ready_module())
    td.init_vm(attributes=KVM_SUPPORTED_TDX_TD_ATTRS)
    for cpu in (0, 1):
        td.init_vcpu(cpu, cpu=cpu)
    td.add_page(GPA, td.pages.alloc(), measure=False)
    td.finalize()
    return td


def running_td() -> tuple[KvmTd, Clock]:
    td = finalized_td()
    return td, contended(td.module)


def aug(td: KvmTd, cpu: int, gpa: int) -> tuple[int, int, int]:
    """TDH.MEM.PAGE.AUG of a fresh page at ``gpa``: status, RCX, RDX."""
    result = call(td.module, td.memory, cpu, Leaf.TDH_MEM_PAGE_AUG, rcx=gpa, rdx=td.tdr, r8=td.pages.alloc())
    return result.status, result.regs[0], result.regs[1]


def block(td: KvmTd, cpu: int, gpa: int) -> int:
    return call(td.module, td.memory, cpu, Leaf.TDH_MEM_RANGE_BLOCK, rcx=gpa, rdx=td.tdr).status


def test_off_by_default_and_nothing_contends():
    """PlatformConfig.lock_hold_s is 0: the serialized transport's calls never overlap."""
    assert PlatformConfig().lock_hold_s == 0
    td = finalized_td()
    td.module.seam.clock = Clock()  # frozen: every call would overlap if the model were on
    assert block(td, 0, GPA) == 0
    assert aug(td, 1, GPA + PAGE)[0] == 0


def test_exclusive_sept_tree_lock_makes_another_cpu_busy():
    """tdh_mem_range_block.c takes the S-EPT tree lock exclusive, tdh_mem_page_aug.c shared
    (lock_sept_check_and_walk_private_gpa()); a failed acquisition is
    TDX_OPERAND_BUSY | OPERAND_ID_SEPT_TREE (helpers.c lock_sept_check_and_walk_internal()), with
    RCX and RDX as PAGE.AUG zeroed them on entry."""
    td, _ = running_td()
    assert block(td, 0, GPA) == 0
    status, rcx, rdx = aug(td, 1, GPA + PAGE)
    assert status == abi.with_operand(Status.TDX_OPERAND_BUSY, OperandId.SEPT) == 0x8000020000000092
    assert (rcx, rdx) == (0, 0)
    assert "S-EPT tree held by CPU 0 (TDH.MEM.RANGE.BLOCK)" in (td.module.trace.records[-1].note or "")
    assert GPA + PAGE not in td.module.state.tds[td.tdr].leaves, "the busy call changed nothing"


def test_shared_locks_are_shared():
    """Two PAGE.AUGs take the TDR's PAMT entry, OP_STATE and the S-EPT tree shared
    (tdh_mem_page_aug.c; acquire_sharex_lock_sh() in tdx_locks.h succeeds while no writer holds
    it), and different S-EPT entries and pages: both succeed."""
    td, _ = running_td()
    assert aug(td, 0, GPA + PAGE)[0] == 0
    assert aug(td, 1, GPA + 2 * PAGE)[0] == 0


def test_sept_entry_lock_busy_reports_the_entry():
    """tdh_mem_page_remove.c: after the shared tree lock, sept_lock_acquire_host() on the entry
    (tdx_locks.h: TDX_OPERAND_BUSY for the host, never the host-priority status) fails while
    PAGE.AUG on another CPU holds it; the status carries OPERAND_ID_RCX and
    set_arch_septe_details_in_vmm_regs() puts the entry in RCX and level | state in RDX."""
    td, _ = running_td()
    page = td.pages.next
    assert aug(td, 0, GPA + PAGE)[0] == 0
    result = call(td.module, td.memory, 1, Leaf.TDH_MEM_PAGE_REMOVE, rcx=GPA + PAGE, rdx=td.tdr)
    assert result.status == abi.with_operand(Status.TDX_OPERAND_BUSY, OperandId.RCX)
    # PAGE.AUG left the entry PENDING, without RWX, at level 0 (4K).
    assert result.regs[:2] == (page, SeptState.PENDING << abi.SEPT_STATE_SHIFT)


def test_window_expires():
    """The lock is held for the leaf's cost times lock_hold_s from the call's start: just before
    the end the tree lock is still RANGE.BLOCK's (helpers.c), at the end PAGE.AUG takes it."""
    td, clock = running_td()
    assert block(td, 0, GPA) == 0
    clock.after(Leaf.TDH_MEM_RANGE_BLOCK)
    clock.now -= HOLD / 100
    assert aug(td, 1, GPA + PAGE)[0] == abi.with_operand(Status.TDX_OPERAND_BUSY, OperandId.SEPT)
    clock.now += HOLD / 100
    assert aug(td, 1, GPA + PAGE)[0] == 0


def test_same_cpu_never_contends_and_a_new_call_ends_its_window():
    """An LP runs one SEAMCALL at a time: its own RANGE.BLOCK does not hold the tree lock
    (helpers.c) against its next PAGE.AUG, and once it has called again (TDH.SYS.RD, which takes
    no lock: tdh_sys_rd.c) its RANGE.BLOCK has returned, so another CPU's PAGE.AUG gets it too."""
    td, _ = running_td()
    assert block(td, 0, GPA) == 0
    assert aug(td, 0, GPA + PAGE)[0] == 0
    assert block(td, 0, GPA + PAGE) == 0
    assert call(td.module, td.memory, 0, Leaf.TDH_SYS_RD, rdx=abi.Field.MAJOR_VERSION).status == 0
    assert aug(td, 1, GPA + 2 * PAGE)[0] == 0


def test_mem_track_against_vp_enter():
    """tdh_mem_track.c takes the TD epoch lock exclusive (busy: OPERAND_ID_TD_EPOCH);
    tdh_vp_enter.c takes it shared in adjust_tlb_tracking_state() and fails with the same
    operand id (KVM's fastpath case). VP.ENTER releases it, and OP_STATE, before the TD runs, so
    a running vCPU does not hold off TDH.MEM.TRACK."""
    td, clock = running_td()
    td.module.exits.add(exits.hlt(), exits.hlt())
    assert call(td.module, td.memory, 0, Leaf.TDH_MEM_TRACK, rcx=td.tdr).status == 0
    assert td.enter(td.vcpus[1])[0] == abi.with_operand(Status.TDX_OPERAND_BUSY, OperandId.TD_EPOCH)
    clock.after(Leaf.TDH_MEM_TRACK)
    assert td.enter(td.vcpus[1])[0] == abi.ExitReason.TDCALL  # the HLT
    assert call(td.module, td.memory, 0, Leaf.TDH_MEM_TRACK, rcx=td.tdr).status == 0


def test_running_vcpu_holds_its_tdr_against_vpflushdone():
    """tdh_vp_enter.c keeps the TDR's PAMT entry locked shared while the TD runs (td_exit.c
    releases it); tdh_mng_vpflushdone.c wants it exclusive and fails
    TDX_OPERAND_BUSY | OPERAND_ID_RCX."""
    td, _ = running_td()
    td.module.exits.add(exits.hlt())
    assert td.enter(td.vcpus[1])[0] == abi.ExitReason.TDCALL  # the HLT
    status = call(td.module, td.memory, 0, Leaf.TDH_MNG_VPFLUSHDONE, rcx=td.tdr).status
    assert status == abi.with_operand(Status.TDX_OPERAND_BUSY, OperandId.RCX)


def test_two_mng_creates_contend_for_the_kot():
    """tdh_mng_create.c takes the KOT lock exclusive after its TDR: a second TD created on
    another CPU meanwhile fails TDX_OPERAND_BUSY | OPERAND_ID_KOT (what KVM's tdx_lock
    prevents)."""
    module = ready_module()
    contended(module)
    memory = SparseMemory(RAM)
    first, second = new_td(module, memory), new_td(module, memory)
    keyid = module.platform.tdx_keyid_start + 1  # the first is the module's own
    assert call(module, memory, 0, Leaf.TDH_MNG_CREATE, rcx=first.pages.alloc(), rdx=keyid).status == 0
    second.pages.next += 64 * PAGE
    status = call(module, memory, 1, Leaf.TDH_MNG_CREATE, rcx=second.pages.alloc(), rdx=keyid + 1).status
    assert status == abi.with_operand(Status.TDX_OPERAND_BUSY, OperandId.KOT)


def test_tdmr_init_mutex_comes_before_already_initialized():
    """tdh_sys_tdmr_init.c: RDX zeroed, the TDMR found, its mutex taken (busy:
    TDX_OPERAND_BUSY | OPERAND_ID_RCX), and only then TDX_TDMR_ALREADY_INITIALIZED."""
    module = ready_module()
    contended(module)
    memory = SparseMemory(RAM)
    base = module.state.tdmrs[0].info.base
    assert call(module, memory, 0, Leaf.TDH_SYS_TDMR_INIT, rcx=base).status == Status.TDX_TDMR_ALREADY_INITIALIZED
    result = call(module, memory, 1, Leaf.TDH_SYS_TDMR_INIT, rcx=base, rdx=0x1234)
    assert result.status == abi.with_operand(Status.TDX_OPERAND_BUSY, OperandId.RCX)
    assert result.regs[1] == 0


def test_global_lock_lp_inits_share_it_and_sys_disable_retries_until_free():
    """tdh_sys_lp_init.c takes the global lock shared, so LP.INITs on two CPUs overlap; an
    exclusive taker fails TDX_SYS_BUSY (tdh_sys_config.c, tdh_sys_key_config.c). TDH.SYS.DISABLE
    has no public source: the harness gives it the global lock exclusive, the contention Linux's
    tdx_sys_disable() retries on, and the retry succeeds once the LP.INIT has ended."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram(RAM), lock_hold_s=HOLD))
    clock = Clock()
    module.seam.clock = clock
    memory = SparseMemory(RAM)
    assert call(module, memory, 0, Leaf.TDH_SYS_INIT).status == 0
    clock.after(Leaf.TDH_SYS_INIT)
    assert call(module, memory, 0, Leaf.TDH_SYS_LP_INIT).status == 0
    assert call(module, memory, 1, Leaf.TDH_SYS_LP_INIT).status == 0
    assert call(module, memory, 0, Leaf.TDH_SYS_DISABLE).status == Status.TDX_SYS_BUSY
    clock.after(Leaf.TDH_SYS_LP_INIT)
    assert call(module, memory, 0, Leaf.TDH_SYS_DISABLE).status == 0


def test_sys_shutdown_is_busy_while_another_lp_is_in_the_module():
    """tdh_sys_shutdown.c: with the global lock taken it counts the LPs whose lp_is_busy is set
    and fails TDX_SYS_BUSY if another LP is inside the module, even in a leaf that takes no
    lock (TDH.SYS.RD)."""
    module = ready_module()
    clock = contended(module)
    memory = SparseMemory(RAM)
    hv = module.platform.module_hv
    assert call(module, memory, 1, Leaf.TDH_SYS_RD, rdx=abi.Field.MAJOR_VERSION).status == 0
    assert call(module, memory, 0, Leaf.TDH_SYS_SHUTDOWN, rcx=hv).status == Status.TDX_SYS_BUSY
    clock.now += HOLD  # TDH.SYS.RD takes no lock: a window of cost 1
    assert call(module, memory, 0, Leaf.TDH_SYS_SHUTDOWN, rcx=hv).status == 0


def test_an_operand_the_leaf_refuses_before_the_lock_takes_none():
    """tdh_mem_page_aug.c checks the page info (verify_page_info_input()) before the S-EPT tree
    lock: with RANGE.BLOCK holding the tree on another CPU, a bad GPA is still
    TDX_OPERAND_INVALID | OPERAND_ID_RCX, not busy."""
    td, _ = running_td()
    assert block(td, 0, GPA) == 0
    unaligned = GPA + PAGE + 8
    assert aug(td, 1, unaligned)[0] == abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
