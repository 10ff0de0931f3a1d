"""Property tests: whatever a (buggy or hostile) kernel sends, the module answers with a TDX
status and never raises."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from linux_replay import call

from harness.seam import abi
from harness.seam.abi import Leaf
from harness.seam.memory import SparseMemory
from harness.seam.module import SeamcallRequest, TdxModule
from harness.seam.platform import PlatformConfig, qemu_topology

G = 1 << 30
KNOWN = [int(leaf) for leaf in Leaf]
u64 = st.integers(0, (1 << 64) - 1)
small_pa = st.integers(0, 2 * G - 1)
calls = st.tuples(st.sampled_from([0, 1, 2, 4]),  # APIC ids: 4 is not a platform CPU
                  st.one_of(st.sampled_from(KNOWN), st.integers(0, 0xFFFFFF), u64),
                  st.lists(st.one_of(small_pa, u64), min_size=13, max_size=13))


def assert_tdx_status(status: int) -> None:
    assert isinstance(status, int) and 0 <= status < 1 << 64
    assert status == 0 or abi.status_name(status) != f"{status:#018x}", f"unnamed status {status:#x}"


@settings(max_examples=300, deadline=None)
@given(st.lists(calls, max_size=40))
def test_random_call_sequences_only_produce_statuses(sequence):
    module = TdxModule(PlatformConfig(cpus=qemu_topology(1, 2)))
    memory = SparseMemory([(0, 2 * G)])
    for cpu, fn, regs in sequence:
        result = module.call(SeamcallRequest(cpu, fn, tuple(regs)), memory)
        assert_tdx_status(result.status)
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
