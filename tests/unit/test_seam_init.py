"""The module driven through Linux's init sequence, its ordering rules and its fault plans."""

from __future__ import annotations

import pytest
from linux_replay import call, replay_init

from harness.seam import abi
from harness.seam.abi import Field, Leaf, OperandId, Status
from harness.seam.faults import FaultPlan, FaultRule, busy, no_entropy, not_loaded
from harness.seam.memory import SparseMemory
from harness.seam.module import SysState, TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram, qemu_topology

G = 1 << 30
M = 1 << 20

# (name, guest RAM (base, size), usable e820 [start, end), NUMA boundaries): QEMU-like layouts.
LAYOUTS = [
    ("q35-2G", [(0, 2 * G)], [(0, 0x9FC00), (M, 0x7FFDF000)], []),
    ("q35-4G", [(0, 2 * G), (4 * G, 2 * G)], [(0, 0x9FC00), (M, 0x7FFDF000), (4 * G, 6 * G)], []),
    ("q35-8G", [(0, 2 * G), (4 * G, 6 * G)], [(0, 0x9FC00), (M, 0x7FFDF000), (4 * G, 10 * G)], []),
    ("numa-1G-3G", [(0, 2 * G), (4 * G, 2 * G)], [(M, 2 * G), (4 * G, 6 * G)], [1 * G]),
    ("numa-3-nodes", [(0, 2 * G), (4 * G, 4 * G)], [(M, 2 * G), (4 * G, 8 * G)], [G + 512 * M, 5 * G]),
]
TOPOLOGIES = [(1, 1), (1, 2), (2, 2), (2, 3)]


@pytest.mark.parametrize("name,ram,usable,numa", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
@pytest.mark.parametrize("sockets,cores", TOPOLOGIES)
def test_linux_init_sequence_reaches_ready(name, ram, usable, numa, sockets, cores):
    platform = PlatformConfig(cpus=qemu_topology(sockets, cores), cmrs=cmrs_for_ram(ram))
    module = TdxModule(platform)
    result = replay_init(module, usable, numa)
    assert result.ok, abi.status_name(result.status)
    assert module.state.sys is SysState.SYS_READY
    assert all(t.done for t in module.state.tdmrs)
    key_configs = module.trace.of_leaf(Leaf.TDH_SYS_KEY_CONFIG)
    assert sorted(platform.package_of(r.cpu) for r in key_configs) == list(range(sockets))
    lp_inits = module.trace.of_leaf(Leaf.TDH_SYS_LP_INIT)
    assert sorted(r.cpu for r in lp_inits) == sorted(c.apic_id for c in platform.cpus)


def test_tdmr_init_returns_progress_in_chunks():
    chunk = 256 * M
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)]), tdmr_init_chunk=chunk))
    assert replay_init(module, [(M, 2 * G)]).ok
    calls = module.trace.of_leaf(Leaf.TDH_SYS_TDMR_INIT)
    # One 2 GiB TDMR initialized 256 MiB at a time.
    assert len(calls) == (2 * G) // chunk
    assert [r.outputs["rdx"] for r in calls] == [chunk * (i + 1) for i in range(len(calls))]


TWO_CPUS = qemu_topology(1, 2)


def fresh(cpus=TWO_CPUS) -> tuple[TdxModule, SparseMemory]:
    return TdxModule(PlatformConfig(cpus=cpus)), SparseMemory([(0, 2 * G)])


def test_nothing_but_sys_init_before_lp_init():
    module, mem = fresh()
    assert call(module, mem, 0, Leaf.TDH_SYS_LP_INIT).status == Status.TDX_SYS_LP_INIT_NOT_PENDING
    assert call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=Field.MAX_TDMRS).status == Status.TDX_SYS_LP_INIT_NOT_DONE
    assert call(module, mem, 0, Leaf.TDH_SYS_INIT).status == 0
    assert call(module, mem, 0, Leaf.TDH_SYS_INIT).status == Status.TDX_SYS_INIT_NOT_PENDING
    # LP 1 has not run LP.INIT: it may not read metadata even though LP 0 could.
    assert call(module, mem, 0, Leaf.TDH_SYS_LP_INIT).status == 0
    assert call(module, mem, 0, Leaf.TDH_SYS_LP_INIT).status == Status.TDX_SYS_LP_INIT_DONE
    assert call(module, mem, 1, Leaf.TDH_SYS_RD, rdx=Field.MAX_TDMRS).status == Status.TDX_SYS_LP_INIT_NOT_DONE


def test_sys_init_rejects_reserved_attributes():
    module, mem = fresh()
    status = call(module, mem, 0, Leaf.TDH_SYS_INIT, rcx=1).status
    assert status == abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)


def test_sys_config_needs_every_lp():
    module, mem = fresh()
    call(module, mem, 0, Leaf.TDH_SYS_INIT)
    call(module, mem, 0, Leaf.TDH_SYS_LP_INIT)
    status = call(module, mem, 0, Leaf.TDH_SYS_CONFIG, rcx=0x1000, rdx=1, r8=16).status
    assert status == Status.TDX_SYS_CONFIG_NOT_PENDING


def test_key_config_once_per_package_and_tdmr_init_after_all_packages():
    module = TdxModule(PlatformConfig(cpus=qemu_topology(2, 1), cmrs=cmrs_for_ram([(0, 2 * G)])))
    module.faults.add(FaultRule(leaf=Leaf.TDH_SYS_KEY_CONFIG, status=Status.TDX_KEY_GENERATION_FAILED, package=1))
    result = replay_init(module, [(M, 2 * G)])
    assert (result.failed_leaf, result.status) == (Leaf.TDH_SYS_KEY_CONFIG, Status.TDX_KEY_GENERATION_FAILED)
    mem = SparseMemory([(0, 2 * G)])
    # Package 0 is configured, package 1 is not: TDMR.INIT must wait.
    assert call(module, mem, 0, Leaf.TDH_SYS_TDMR_INIT, rcx=0).status == Status.TDX_SYS_NOT_READY
    assert call(module, mem, 0, Leaf.TDH_SYS_KEY_CONFIG).status == Status.TDX_KEY_CONFIGURED
    module.faults.clear()
    assert call(module, mem, 1, Leaf.TDH_SYS_KEY_CONFIG).status == 0
    assert module.state.sys is SysState.SYS_READY
    assert call(module, mem, 0, Leaf.TDH_SYS_TDMR_INIT, rcx=0).status == 0


def test_sys_disable_then_only_sys_init():
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    assert replay_init(module, [(M, 2 * G)]).ok
    mem = SparseMemory([(0, 2 * G)])
    assert call(module, mem, 0, Leaf.TDH_SYS_DISABLE).status == 0
    for leaf, regs in ((Leaf.TDH_SYS_RD, {"rdx": Field.MAX_TDMRS}), (Leaf.TDH_SYS_LP_INIT, {}),
                       (Leaf.TDH_SYS_KEY_CONFIG, {}), (Leaf.TDH_PHYMEM_PAGE_RDMD, {"rcx": M})):
        assert call(module, mem, 0, leaf, **regs).status == Status.TDX_SYS_SHUTDOWN, leaf.name
    # A new kernel (kexec) initializes it again from scratch.
    module.hello(2, 0)
    assert replay_init(module, [(M, 2 * G)]).ok
    assert module.boots == 1


def test_reboot_without_disable_cannot_reinitialize_but_power_cycle_can():
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    assert replay_init(module, [(M, 2 * G)]).ok
    again = replay_init(module, [(M, 2 * G)])
    assert (again.failed_leaf, again.status) == (Leaf.TDH_SYS_INIT, Status.TDX_SYS_INIT_NOT_PENDING)
    module.power_cycle()
    assert replay_init(module, [(M, 2 * G)]).ok


def test_sys_rd_element_sizes_and_unknown_field():
    module, mem = fresh()
    module = TdxModule(PlatformConfig(max_tdmrs=0x12345))  # wider than the 16-bit field
    call(module, mem, 0, Leaf.TDH_SYS_INIT)
    call(module, mem, 0, Leaf.TDH_SYS_LP_INIT)
    assert call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=Field.MAX_TDMRS).regs[2] == 0x2345
    features = call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=Field.TDX_FEATURES0).regs[2]
    assert features & abi.TDX_FEATURES0_NO_RBP_MOD and features & abi.TDX_FEATURES0_TOPOLOGY_ENUM
    bad = call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=0x1234)
    assert bad.status == abi.with_operand(Status.TDX_METADATA_FIELD_ID_INCORRECT, OperandId.RDX)


def test_unknown_and_unmodelled_leaves_and_versions():
    module, mem = fresh()
    invalid_rax = abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX)
    assert call(module, mem, 0, 99).status == invalid_rax
    assert call(module, mem, 0, Leaf.TDH_SYS_UPDATE).status == invalid_rax
    assert module.trace.records[-1].note == "leaf not modelled by the software module yet"
    assert call(module, mem, 0, Leaf.TDH_SYS_INIT | (3 << 16)).status == invalid_rax
    assert call(module, mem, 0, abi.P_SEAMLDR_LEAF_BIT).status == Status.TDX_SEAMCALL_VMFAILINVALID


def test_rdmd_reports_pamt_pages_as_reserved():
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    result = replay_init(module, [(M, 2 * G)])
    mem = SparseMemory([(0, 2 * G)])
    pamt_base = result.tdmrs[0].pamt_4k_base
    rdmd = call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=pamt_base + 0x123)
    assert (rdmd.status, rdmd.regs[0]) == (0, abi.PageType.PT_RSVD)
    ordinary = call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=16 * M)
    assert (ordinary.status, ordinary.regs[0]) == (0, abi.PageType.PT_NDA)
    module.assign_page(32 * M, abi.PageType.PT_REG, owner=0x5000)
    td = call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=32 * M)
    assert (td.regs[0], td.regs[1]) == (abi.PageType.PT_REG, 0x5000)
    outside = call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=4 * G)
    assert outside.status == abi.with_operand(Status.TDX_OPERAND_ADDR_RANGE_ERROR, OperandId.RCX)


# --- fault plans -----------------------------------------------------------------------------


def ready_module(plan: FaultPlan, cpus=TWO_CPUS) -> TdxModule:
    return TdxModule(PlatformConfig(cpus=cpus, cmrs=cmrs_for_ram([(0, 2 * G)])), faults=plan)


def test_fault_nth_call_of_a_leaf():
    module = ready_module(FaultPlan([FaultRule(leaf=Leaf.TDH_SYS_TDMR_INIT, status=Status.TDX_SYS_BUSY, nth=2)]))
    result = replay_init(module, [(M, 2 * G)])
    assert (result.failed_leaf, result.status) == (Leaf.TDH_SYS_TDMR_INIT, Status.TDX_SYS_BUSY)
    calls = module.trace.of_leaf(Leaf.TDH_SYS_TDMR_INIT)
    assert [r.status for r in calls] == [0, Status.TDX_SYS_BUSY]
    assert calls[1].injected and "nth=2" in calls[1].injected


def test_fault_on_one_cpu():
    module = ready_module(FaultPlan([FaultRule(leaf=Leaf.TDH_SYS_LP_INIT, status=Status.TDX_SYS_BUSY, cpu=1)]))
    result = replay_init(module, [(M, 2 * G)])
    assert result.failed_leaf == Leaf.TDH_SYS_LP_INIT
    assert [r.cpu for r in module.trace.of_leaf(Leaf.TDH_SYS_LP_INIT)] == [0, 1]


def test_fault_on_one_metadata_field():
    plan = FaultPlan([FaultRule(leaf=Leaf.TDH_SYS_RD, status=Status.TDX_METADATA_FIELD_NOT_READABLE,
                                rdx=Field.PAMT_2M_ENTRY_SIZE)])
    module = ready_module(plan)
    result = replay_init(module, [(M, 2 * G)])
    assert (result.failed_leaf, result.status) == (Leaf.TDH_SYS_RD, Status.TDX_METADATA_FIELD_NOT_READABLE)
    assert len(module.trace.of_leaf(Leaf.TDH_SYS_RD)) == 4  # failed on the fourth field read


def test_busy_for_n_calls_then_works():
    plan = FaultPlan([busy(Leaf.TDH_SYS_CONFIG, calls=3)])
    module = ready_module(plan)
    statuses = [replay_init(module, [(M, 2 * G)]).status for _ in range(1)]
    assert statuses == [Status.TDX_OPERAND_BUSY]
    mem = SparseMemory([(0, 2 * G)])
    for _ in range(2):
        assert call(module, mem, 0, Leaf.TDH_SYS_CONFIG).status == Status.TDX_OPERAND_BUSY
    # The fourth call is executed (and fails validation because RCX points at nothing useful).
    status = call(module, mem, 0, Leaf.TDH_SYS_CONFIG).status
    assert status == abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RDX)


def test_entropy_failures_are_bounded():
    module = ready_module(FaultPlan([no_entropy(Leaf.TDH_SYS_KEY_CONFIG, calls=9)]))
    mem = SparseMemory([(0, 2 * G)])
    # Linux's sc_retry() retries TDX_RND_NO_ENTROPY up to RDRAND_RETRY_LOOPS (10) times.
    statuses = [call(module, mem, 0, Leaf.TDH_SYS_KEY_CONFIG).status for _ in range(10)]
    assert statuses[:9] == [Status.TDX_RND_NO_ENTROPY] * 9
    assert statuses[9] != Status.TDX_RND_NO_ENTROPY


def test_not_loaded_fails_every_leaf_with_vmfailinvalid():
    module = ready_module(FaultPlan([not_loaded()]))
    result = replay_init(module, [(M, 2 * G)])
    assert (result.failed_leaf, result.status) == (Leaf.TDH_SYS_INIT, Status.TDX_SEAMCALL_VMFAILINVALID)
    mem = SparseMemory([(0, 2 * G)])
    assert call(module, mem, 0, Leaf.TDH_SYS_DISABLE).status == Status.TDX_SEAMCALL_VMFAILINVALID


def test_module_absent_platform():
    module = TdxModule(PlatformConfig(module_present=False))
    ack = module.hello(2, 0)
    assert not ack.module_present and ack.nr_tdx_keyids == 48
    mem = SparseMemory([(0, 2 * G)])
    assert call(module, mem, 0, Leaf.TDH_SYS_INIT).status == Status.TDX_SEAMCALL_VMFAILINVALID


def test_fault_plan_json_round_trip():
    plan = FaultPlan([busy(Leaf.TDH_SYS_CONFIG, calls=2, cpu=1), not_loaded()])
    again = FaultPlan.from_json(plan.to_json())
    assert again.rules == plan.rules
    with pytest.raises(ValueError, match="bad fault plan"):
        FaultPlan.from_json('[{"leaf": 1}]')
