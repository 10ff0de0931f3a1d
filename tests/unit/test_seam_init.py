"""The module driven through Linux's init sequence, its ordering rules and its fault plans."""

from __future__ import annotations

import pytest
from linux_replay import call, replay_init

from harness.seam import abi
from harness.seam.abi import Field, Leaf, OperandId, Status
from harness.seam.call import UNLOADED_REGISTER, SeamcallRequest, Variant, as_loaded
from harness.seam.faults import FaultPlan, FaultRule, busy, no_entropy, not_loaded
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram, qemu_topology
from harness.seam.state import SysState

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


def test_tdmr_init_initializes_4_mib_a_call_and_reports_whole_gib():
    """src/vmm_dispatcher/api_calls/tdh_sys_tdmr_init.c: TDMR_4K_PAMT_INIT_COUNT (1024) 4K PAMT
    entries a call; RDX = next-to-initialize rounded down to 1 GiB (zeroed on entry)."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    assert replay_init(module, [(M, 2 * G)]).ok
    calls = module.trace.of_leaf(Leaf.TDH_SYS_TDMR_INIT)
    per_call = 1024 * 4096
    assert len(calls) == (2 * G) // per_call == 512  # one 2 GiB TDMR: 256 calls per GiB
    # The first 255 calls leave RDX at the base, the 256th reports the first GiB done, ...
    expected = [(per_call * (i + 1)) & ~(G - 1) for i in range(512)]
    assert [r.outputs.get("rdx", 0) for r in calls] == expected
    assert expected[254] == 0 and expected[255] == G and expected[-1] == 2 * G


def test_tdmr_init_operands_and_already_initialized():
    """tdh_sys_tdmr_init.c: a base not 1 GiB-aligned, with KeyID bits, or of no TDMR is
    OPERAND_INVALID(RCX); a TDMR already done is TDX_TDMR_ALREADY_INITIALIZED (not an error)
    with RDX 0, since RDX is zeroed on entry."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    assert replay_init(module, [(M, 2 * G)]).ok
    mem = SparseMemory([(0, 2 * G)])
    bad_rcx = abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    for rcx in (M, G, module.platform.max_pa):  # unaligned; aligned but no TDMR; a KeyID bit set
        result = call(module, mem, 0, Leaf.TDH_SYS_TDMR_INIT, rcx=rcx, rdx=0x55)
        assert (result.status, result.regs[1]) == (bad_rcx, 0), hex(rcx)
    done = call(module, mem, 0, Leaf.TDH_SYS_TDMR_INIT, rcx=0, rdx=0x55)
    assert (done.status, done.regs[1]) == (Status.TDX_TDMR_ALREADY_INITIALIZED, 0)
    assert not done.status >> 63


def test_pages_are_usable_per_initialized_gib():
    """pamt_manager.c pamt_get_block(): a PA past last_initialized rounded down to 1 GiB is out
    of range, so RDMD of a page in a GiB still being initialized is ADDR_RANGE_ERROR(RCX)."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    module.faults.add(FaultRule(leaf=Leaf.TDH_SYS_TDMR_INIT, status=Status.TDX_SYS_BUSY, nth=300))
    replay_init(module, [(M, 2 * G)])  # stops after 299 calls: 1 GiB + 43 * 4 MiB done
    mem = SparseMemory([(0, 2 * G)])
    out_of_range = abi.with_operand(Status.TDX_OPERAND_ADDR_RANGE_ERROR, OperandId.RCX)
    assert call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=G - 4096).status == 0
    assert call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=G).status == out_of_range  # initialized, GiB not


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


def test_sys_disable_runs_long_and_locks_out_new_sys_calls():
    """TDH.SYS.DISABLE has no public source; the harness follows tdx_sys_disable()'s comment
    (arch/x86/virt/vmx/tdx/tdx.c): TDX_INTERRUPTED_RESUMABLE guarantees progress between calls,
    and a teardown under way makes new TDH.SYS.* calls TDX_SYS_BUSY. Other leaves see a module
    that is shutting down; once done, SYS.INIT starts over."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)]), sys_disable_calls=3))
    assert replay_init(module, [(M, 2 * G)]).ok
    mem = SparseMemory([(0, 2 * G)])
    assert call(module, mem, 0, Leaf.TDH_SYS_DISABLE).status == Status.TDX_INTERRUPTED_RESUMABLE
    assert call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=Field.MAX_TDMRS).status == Status.TDX_SYS_BUSY
    assert call(module, mem, 0, Leaf.TDH_SYS_INIT).status == Status.TDX_SYS_BUSY
    assert call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=M).status == Status.TDX_SYS_SHUTDOWN
    assert [call(module, mem, 0, Leaf.TDH_SYS_DISABLE).status for _ in range(2)] == \
        [Status.TDX_INTERRUPTED_RESUMABLE, 0]
    assert call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=Field.MAX_TDMRS).status == Status.TDX_SYS_SHUTDOWN
    module.hello(2, 0)
    assert replay_init(module, [(M, 2 * G)]).ok


def test_reboot_without_disable_cannot_reinitialize_but_power_cycle_can():
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    assert replay_init(module, [(M, 2 * G)]).ok
    again = replay_init(module, [(M, 2 * G)])
    assert (again.failed_leaf, again.status) == (Leaf.TDH_SYS_INIT, Status.TDX_SYS_INIT_NOT_PENDING)
    module.power_cycle()
    assert replay_init(module, [(M, 2 * G)]).ok


def initialized_lp(platform: PlatformConfig) -> tuple[TdxModule, SparseMemory]:
    module, mem = TdxModule(platform), SparseMemory([(0, 2 * G)])
    call(module, mem, 0, Leaf.TDH_SYS_INIT)
    call(module, mem, 0, Leaf.TDH_SYS_LP_INIT)
    return module, mem


def test_sys_rd_element_sizes_and_unknown_field():
    """metadata_sys.c md_sys_read_element(): the value masked to the table entry's element
    size; metadata_generic.c md_read_element(): an id no entry covers is plain
    TDX_METADATA_FIELD_ID_INCORRECT (no operand id), with RDX = -1 and R8 = 0 (tdh_sys_rd.c)."""
    module, mem = initialized_lp(PlatformConfig(max_tdmrs=0x12345))  # wider than the 16-bit field
    assert call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=Field.MAX_TDMRS).regs[2] == 0x2345
    features = call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=Field.TDX_FEATURES0).regs[2]
    assert features & abi.TDX_FEATURES0_NO_RBP_MOD and features & abi.TDX_FEATURES0_TOPOLOGY_ENUM
    bad = call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=0x1234, r8=0x77)
    assert bad.status == Status.TDX_METADATA_FIELD_ID_INCORRECT
    assert (bad.regs[1], bad.regs[2]) == ((1 << 64) - 1, 0)


def test_sys_rd_matches_class_and_field_code_only():
    """metadata_generic.c: md_find_entry_idx() compares class and field code;
    md_check_as_single_element_id() ignores element size, inc size, write-mask-valid and
    context, but refuses reserved bits and a non-zero LAST_ELEMENT/LAST_FIELD."""
    module, mem = initialized_lp(PlatformConfig(max_tdmrs=0x40))
    size_bits = 3 << 32  # MAX_TDMRS is a 16-bit field: ask with the 64-bit size code
    for extra in (size_bits, 1 << 50, 1 << 51, 5 << 52):
        result = call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=(Field.MAX_TDMRS & ~size_bits) | extra)
        assert (result.status, result.regs[2]) == (0, 0x40), hex(extra)
    for bad in (1 << 24, 1 << 34, 1 << 38, 1 << 47, 1 << 55, 1 << 62):
        result = call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=Field.MAX_TDMRS | bad)
        assert result.status == Status.TDX_METADATA_FIELD_ID_INCORRECT, hex(bad)


def test_sys_rd_enumerates_the_table_from_the_null_id():
    """tdh_sys_rd.c: the null id (all ones) answers TDX_METADATA_FIRST_FIELD_ID_IN_CONTEXT with
    RDX = the first field; each read's RDX is the next element in table order (class, then
    field code), -1 after the last. Id 0 is class 0 field 0: NUM_PKGS, not the null id."""
    platform = PlatformConfig(cpus=qemu_topology(2, 1), cmrs=cmrs_for_ram([(0, 2 * G), (4 * G, G)]))
    module, mem = initialized_lp(platform)
    first = call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=(1 << 64) - 1)
    assert (first.status, first.regs[1]) == (Status.TDX_METADATA_FIRST_FIELD_ID_IN_CONTEXT, Field.NUM_PKGS)
    assert call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=0).regs[2] == 2  # two packages
    seen, field_id = {}, first.regs[1]
    while field_id != (1 << 64) - 1:
        result = call(module, mem, 0, Leaf.TDH_SYS_RD, rdx=field_id)
        assert result.status == 0, hex(field_id)
        seen[field_id], field_id = result.regs[2], result.regs[1]
    order = list(seen)
    classes = [(i >> 56) & 0x3F for i in order]
    assert classes == sorted(classes), "table order is by class (0x08 before 0x89 before 0x0A ...)"
    assert order.index(Field.MODULE_HV) < order.index(Field.TDX_FEATURES0)
    # metadata_sys.c: NUM_CMRS reads MAX_CMR (32); CMR_BASE/SIZE hold the CMRs, then zeros.
    assert seen[Field.NUM_CMRS] == 32
    assert [seen[Field.CMR_BASE + i] for i in range(3)] == [M, 4 * G, 0]
    assert [seen[Field.CMR_SIZE + i] for i in range(3)] == [2 * G - M, G, 0]
    assert sum(1 for i in order if Field.CMR_BASE <= i < Field.CMR_BASE + 32) == 32
    # CPUID_CONFIG_LEAVES past the configurable ones read as all ones.
    count = seen[Field.NUM_CPUID_CONFIG]
    assert seen[abi.FIELD_CPUID_CONFIG_LEAVES + count] == (1 << 64) - 1


def test_unknown_and_unmodelled_leaves_and_versions():
    """src/vmm_dispatcher/tdx_vmm_dispatcher.c: the leaf encoding and version first; then
    SYS_SHUTDOWN and "not SYS_READY" (all but the init leaves); an unknown leaf is
    OPERAND_INVALID(RAX) only at the switch's default."""
    module, mem = fresh()
    invalid_rax = abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RAX)
    assert call(module, mem, 0, 99).status == Status.TDX_SYS_NOT_READY  # before the leaf is looked at
    assert call(module, mem, 0, Leaf.TDH_SYS_INIT | (3 << 16)).status == invalid_rax
    assert call(module, mem, 0, Leaf.TDH_SYS_LP_SHUTDOWN).status == invalid_rax  # an init leaf: no state check
    assert module.trace.records[-1].note == "leaf not modelled by the software module yet"
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    assert replay_init(module, [(M, 2 * G)]).ok
    assert call(module, mem, 0, 99).status == invalid_rax  # ready: now the leaf itself
    call(module, mem, 0, Leaf.TDH_SYS_DISABLE)
    assert call(module, mem, 0, 99).status == Status.TDX_SYS_SHUTDOWN


def test_sys_init_checks_its_attributes_before_the_state():
    """tdh_sys_init.c: RCX (attributes, reserved in 1.5) before the state; RCX, RDX, R8-R10
    zeroed."""
    module, mem = fresh()
    assert call(module, mem, 0, Leaf.TDH_SYS_INIT, rdx=5).regs[1] == 0
    again = call(module, mem, 0, Leaf.TDH_SYS_INIT, rcx=1)
    assert again.status == abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    assert call(module, mem, 0, Leaf.TDH_SYS_INIT).status == Status.TDX_SYS_INIT_NOT_PENDING


def test_rdmd_reports_pamt_pages_as_reserved():
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    result = replay_init(module, [(M, 2 * G)])
    mem = SparseMemory([(0, 2 * G)])
    pamt_base = result.tdmrs[0].pamt_4k_base
    rdmd = call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=pamt_base)
    assert (rdmd.status, rdmd.regs[0]) == (0, abi.PageType.PT_RSVD)
    ordinary = call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=16 * M)
    assert (ordinary.status, ordinary.regs[0]) == (0, abi.PageType.PT_NDA)
    module.state.assign_page(32 * M, abi.PageType.PT_REG, owner=0x5000)
    td = call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=32 * M)
    assert (td.regs[0], td.regs[1]) == (abi.PageType.PT_REG, 0x5000)
    outside = call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=4 * G)
    assert outside.status == abi.with_operand(Status.TDX_OPERAND_ADDR_RANGE_ERROR, OperandId.RCX)


def test_rdmd_refuses_unaligned_and_keyed_addresses_and_zeroes_its_outputs():
    """tdh_phymem_page_rdmd.c: RCX, RDX, R8-R11 zeroed on entry; a PA not 4K-aligned, or with
    KeyID bits, is OPERAND_INVALID(RCX) (Linux masks the PA: tdx.c's paddr_is_tdx_private)."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    assert replay_init(module, [(M, 2 * G)]).ok
    mem = SparseMemory([(0, 2 * G)])
    bad_rcx = abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    for pa in (16 * M + 0x123, 16 * M | module.platform.max_pa):
        result = call(module, mem, 0, Leaf.TDH_PHYMEM_PAGE_RDMD, rcx=pa, rdx=1, r8=2, r9=3, r10=4, r11=5)
        assert result.status == bad_rcx and result.regs[:6] == (0,) * 6, hex(pa)


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


def test_only_the_saved_variant_passes_r12_to_rsi():
    """arch/x86/virt/vmx/tdx/tdxcall.S: __seamcall and __seamcall_ret load RCX, RDX, R8-R11
    only; the module must not see the struct's R12-R15, RBX, RDI, RSI from them."""
    module, mem = fresh()
    regs = tuple(range(1, 14))
    for variant in (Variant.SEAMCALL, Variant.SEAMCALL_RET, Variant.SEAMCALL_SAVED_RET):
        module.call(SeamcallRequest(0, Leaf.TDH_SYS_RD, regs, variant), mem)
        seen = module.trace.records[-1].inputs  # what the module received
        assert [seen[r] for r in ("rcx", "rdx", "r8", "r9", "r10", "r11")] == list(regs[:6])
        beyond = [seen.get(r) for r in ("r12", "r13", "r14", "r15", "rbx", "rdi", "rsi")]
        assert beyond == (list(regs[6:]) if variant is Variant.SEAMCALL_SAVED_RET else [None] * 7), variant
        assert as_loaded(SeamcallRequest(0, Leaf.TDH_SYS_RD, regs, variant)).regs[6:] == (
            regs[6:] if variant is Variant.SEAMCALL_SAVED_RET else tuple(UNLOADED_REGISTER | i for i in range(6, 13)))
