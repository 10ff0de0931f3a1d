"""Property tests: whatever a (buggy or hostile) kernel sends, the module answers with a TDX
status and never raises."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from linux_replay import call

from harness.seam import abi
from harness.seam.abi import Leaf
from harness.seam.call import SeamcallRequest
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, qemu_topology

G = 1 << 30
KNOWN = [int(leaf) for leaf in Leaf]
u64 = st.integers(0, (1 << 64) - 1)
small_pa = st.integers(0, 2 * G - 1)
calls = st.tuples(st.sampled_from([0, 1, 2, 4]),  # APIC ids: 4 is not a platform CPU
                  st.one_of(st.sampled_from(KNOWN), st.integers(0, 0xFFFFFF), u64),
                  st.lists(st.one_of(small_pa, u64), min_size=13, max_size=13))


def assert_tdx_status(status: int, fn: int = 0) -> None:
    """A status the module's (or, for a P-SEAMLDR leaf ``fn``, the loader's) tables name."""
    assert isinstance(status, int) and 0 <= status < 1 << 64
    assert status == 0 or abi.status_name(status, fn) != f"{status:#018x}", f"unnamed status {status:#x}"


@settings(max_examples=300, deadline=None)
@given(st.lists(calls, max_size=40))
def test_random_call_sequences_only_produce_statuses(sequence):
    module = TdxModule(PlatformConfig(cpus=qemu_topology(1, 2)))
    memory = SparseMemory([(0, 2 * G)])
    for cpu, fn, regs in sequence:
        result = module.call(SeamcallRequest(cpu, fn, tuple(regs)), memory)
        assert_tdx_status(result.status, fn)
        assert len(result.regs) == 13


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=320, max_size=320), st.binary(min_size=320, max_size=320),
       st.integers(1, 3), st.integers(0, 64))
def test_random_tdmr_info_bytes_only_produce_statuses(info0, info1, count, hkid):
    module = TdxModule(PlatformConfig(cpus=qemu_topology(1, 1)))
    memory = SparseMemory([(0, 2 * G)])
    memory.write(0x10000, (0x20000).to_bytes(8, "little") + (0x20200).to_bytes(8, "little")
                 + (0x20400).to_bytes(8, "little"))
    memory.write(0x20000, info0)
    memory.write(0x20200, info1)
    call(module, memory, 0, Leaf.TDH_SYS_INIT)
    call(module, memory, 0, Leaf.TDH_SYS_LP_INIT)
    status = call(module, memory, 0, Leaf.TDH_SYS_CONFIG, rcx=0x10000, rdx=count, r8=hkid).status
    assert_tdx_status(status)


# --- TD management ------------------------------------------------------------------------------

TD_LEAVES = [Leaf.TDH_MNG_CREATE, Leaf.TDH_MNG_KEY_CONFIG, Leaf.TDH_MNG_ADDCX, Leaf.TDH_MNG_INIT, Leaf.TDH_MNG_RD,
             Leaf.TDH_VP_CREATE, Leaf.TDH_VP_ADDCX, Leaf.TDH_VP_INIT, Leaf.TDH_VP_RD, Leaf.TDH_VP_WR,
             Leaf.TDH_MEM_SEPT_ADD, Leaf.TDH_MEM_PAGE_ADD, Leaf.TDH_MEM_PAGE_AUG, Leaf.TDH_MR_EXTEND,
             Leaf.TDH_MR_FINALIZE, Leaf.TDH_MEM_RANGE_BLOCK, Leaf.TDH_MEM_TRACK, Leaf.TDH_MEM_PAGE_REMOVE,
             Leaf.TDH_PHYMEM_PAGE_WBINVD, Leaf.TDH_VP_FLUSH, Leaf.TDH_MNG_VPFLUSHDONE, Leaf.TDH_PHYMEM_CACHE_WB,
             Leaf.TDH_MNG_KEY_FREEID, Leaf.TDH_PHYMEM_PAGE_RECLAIM, Leaf.TDH_PHYMEM_PAGE_RDMD]
TD_TYPES = {abi.PageType.PT_TDR, abi.PageType.PT_TDCX, abi.PageType.PT_TDVPR, abi.PageType.PT_EPT,
            abi.PageType.PT_REG}


def _td_operand(pages: list[int]):
    """Register values that hit the TD's own pages, nearby pages, GPAs, levels and noise."""
    return st.one_of(st.sampled_from(pages), st.sampled_from([0, 1, 2, 3, 17, 18, 0x1000, 0x1003, 0xFFFF_0000]),
                     st.integers(0, 2 * G - 1).map(lambda x: x & ~0xFFF), u64)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_td_calls_keep_pamt_and_td_state_consistent(data):
    from kvm_replay import KVM_SUPPORTED_TDX_TD_ATTRS, new_td, ready_module

    module = ready_module()
    td = new_td(module)
    td.init_vm(attributes=KVM_SUPPORTED_TDX_TD_ATTRS)
    td.init_vcpu(0, cpu=0)
    pages = [td.tdr, *td.tdcs, td.vcpus[0].tdvpr, *td.vcpus[0].tdcx, td.pages.alloc(), td.pages.alloc()]
    for _ in range(data.draw(st.integers(1, 30))):
        leaf = data.draw(st.sampled_from(TD_LEAVES))
        version = data.draw(st.sampled_from([0, 0, 0, 1]))
        regs = tuple(data.draw(_td_operand(pages)) for _ in range(4)) + (0,) * 9
        result = module.call(SeamcallRequest(data.draw(st.sampled_from([0, 1])), leaf | version << 16, regs),
                             td.memory)
        assert_tdx_status(result.status)
        # Every TD-typed PAMT entry belongs to a live TD, and each TD counts its pages right.
        owned: dict[int, int] = {}
        for pfn, owner in module.state.pages.items():
            if owner.page_type is abi.PageType.PT_TDR:
                assert pfn << 12 in module.state.tds
            elif owner.page_type in TD_TYPES:
                assert owner.owner in module.state.tds
                owned[owner.owner] = owned.get(owner.owner, 0) + 1
        for tdr, state in module.state.tds.items():
            assert state.chldcnt == owned.get(tdr, 0)
