"""TDH.SYS.CONFIG validation: each test breaks exactly one rule of a valid TDMR_INFO array and
expects the status (and detail bytes) the TDX module returns for that rule."""

from __future__ import annotations

import dataclasses

import pytest
from linux_replay import call

from harness.observe.pamt import Tdmr, pamt_sizes
from harness.seam import abi
from harness.seam.abi import Leaf, OperandId, PageSize, Status
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram
from harness.seam.state import SysState
from harness.seam.tdmr import ReservedArea, TdmrInfo

G, M = 1 << 30, 1 << 20
RAM = [(0, 2 * G), (4 * G, 2 * G)]  # q35 with 4 GiB
MAX_RESERVED = 16
INFO_STRIDE = 512  # 64 + 16 * 16 = 320 bytes, aligned to 512
ARRAY_PA, INFOS_PA = 0x10000, 0x20000
ENTRY_SIZES = (16, 16, 16)


def tdmr(base: int, size: int, pamt_base: int, holes: list[tuple[int, int]]) -> TdmrInfo:
    """A TDMR whose PAMTs sit contiguously at pamt_base (4K, 2M, 1G, as Linux lays them out),
    with ``holes`` [(start, end)] and the PAMT range (if inside) as reserved areas."""
    s4k, s2m, s1g = pamt_sizes(Tdmr(base, size), ENTRY_SIZES)
    ranges = list(holes)
    if base <= pamt_base < base + size:
        ranges.append((pamt_base, pamt_base + s4k + s2m + s1g))
    areas = [ReservedArea(start - base, end - start) for start, end in sorted(ranges)]
    areas += [ReservedArea(0, 0)] * (MAX_RESERVED - len(areas))
    return TdmrInfo(base, size, pamt_base + s4k + s2m, s1g, pamt_base + s4k, s2m, pamt_base, s4k, tuple(areas))


def valid_tdmrs() -> list[TdmrInfo]:
    # TDMR 0 covers [0, 2G): [0, 1M) is not convertible; its PAMT lives in it at 1G.
    # TDMR 1 covers [4G, 6G): its PAMT lives in TDMR 0's memory too, at 1G + 16M.
    second = tdmr(4 * G, 2 * G, G + 16 * M, [])
    first = tdmr(0, 2 * G, G, [(0, M)])
    s4k, s2m, s1g = pamt_sizes(Tdmr(4 * G, 2 * G), ENTRY_SIZES)
    areas = sorted([(0, M), (G, G + sum(pamt_sizes(Tdmr(0, 2 * G), ENTRY_SIZES))),
                    (G + 16 * M, G + 16 * M + s4k + s2m + s1g)])
    first = dataclasses.replace(first, reserved=tuple(ReservedArea(a, b - a) for a, b in areas)
                                + (ReservedArea(0, 0),) * (MAX_RESERVED - len(areas)))
    return [first, second]


def configure(infos: list[TdmrInfo], array_pa: int = ARRAY_PA, infos_pa: int = INFOS_PA,
              count: int | None = None, hkid: int = 16,
              platform: PlatformConfig | None = None, keyid: int = 0) -> tuple[int, TdxModule]:
    """SYS.CONFIG of ``infos`` at ``infos_pa``, their PAs at ``array_pa``; RCX carries ``keyid``
    in its HKID bits."""
    module = TdxModule(platform or PlatformConfig(cmrs=cmrs_for_ram(RAM)))
    memory = SparseMemory(RAM)
    for i, info in enumerate(infos):
        memory.write(infos_pa + i * INFO_STRIDE, info.pack())
    memory.write(array_pa, b"".join((infos_pa + i * INFO_STRIDE).to_bytes(8, "little") for i in range(len(infos))))
    for cpu in module.platform.cpus:
        if cpu.apic_id == module.platform.cpus[0].apic_id:
            assert call(module, memory, cpu.apic_id, Leaf.TDH_SYS_INIT).status == 0
        assert call(module, memory, cpu.apic_id, Leaf.TDH_SYS_LP_INIT).status == 0
    n = len(infos) if count is None else count
    rcx = array_pa | keyid << module.platform.hkid_shift
    status = call(module, memory, 0, Leaf.TDH_SYS_CONFIG, rcx=rcx, rdx=n, r8=hkid).status
    return status, module


def with_areas(info: TdmrInfo, areas: list[tuple[int, int]]) -> TdmrInfo:
    padded = [ReservedArea(o, s) for o, s in areas] + [ReservedArea(0, 0)] * (MAX_RESERVED - len(areas))
    return dataclasses.replace(info, reserved=tuple(padded))


def test_valid_configuration_is_accepted():
    status, module = configure(valid_tdmrs())
    assert status == 0
    assert module.state.sys is SysState.SYSCONFIG_DONE
    assert [t.info.base for t in module.state.tdmrs] == [0, 4 * G]


def test_pa_array_must_be_512_aligned():
    status, _ = configure(valid_tdmrs(), array_pa=ARRAY_PA + 8)
    assert status == abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)


@pytest.mark.parametrize("count", [0, 65])
def test_tdmr_count_within_max(count):
    status, _ = configure(valid_tdmrs(), count=count)
    assert status == abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RDX)


@pytest.mark.parametrize("hkid", [0, 15, 64, 16 | (1 << 16)])
def test_global_keyid_must_be_a_tdx_keyid(hkid):
    status, _ = configure(valid_tdmrs(), hkid=hkid)
    assert status == abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.R8)


def test_shared_keyids_and_seamrr_as_the_module_checks_them():
    """src/common/helpers/helpers.c shared_hpa_check() (tdh_sys_config.c uses it for the array
    and each entry): below 2^MAXPA, outside SEAMRR, and a shared KeyID: 0 or an MKTME one."""
    platform = PlatformConfig(cmrs=cmrs_for_ram(RAM))
    assert configure(valid_tdmrs(), keyid=1)[0] == 0  # MKTME KeyID 1
    bad_rcx = abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    assert configure(valid_tdmrs(), keyid=platform.tdx_keyid_start)[0] == bad_rcx
    with_seamrr = dataclasses.replace(platform, seamrr=(ARRAY_PA, 0x1000))
    assert configure(valid_tdmrs(), platform=with_seamrr)[0] == bad_rcx


def test_a_failed_config_keeps_the_global_keyid_reserved():
    """tdh_sys_config.c marks the KOT entry of the global KeyID reserved before it reads the
    TDMRs: a SYS.CONFIG that fails on a TDMR leaves the KeyID taken."""
    status, module = configure(valid_tdmrs(), infos_pa=INFOS_PA + 64, hkid=20)
    assert status == abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)
    assert 20 in module.state.kot and module.state.sys is SysState.SYSINIT_DONE


def test_tdmr_info_entries_must_be_512_aligned():
    status, _ = configure(valid_tdmrs(), infos_pa=INFOS_PA + 64)
    assert status == abi.with_operand(Status.TDX_OPERAND_INVALID, OperandId.RCX)


@pytest.mark.parametrize("base,size", [(2 * M, 2 * G), (0, 2 * G - 4096), (0, 0)])
def test_tdmr_base_and_size_1g_aligned_and_non_empty(base, size):
    infos = valid_tdmrs()
    infos[0] = dataclasses.replace(infos[0], base=base, size=size)
    status, _ = configure(infos[:1])
    assert status == abi.with_info(Status.TDX_INVALID_TDMR, 0)


def test_tdmr_beyond_max_pa():
    infos = valid_tdmrs()
    platform = PlatformConfig(cmrs=cmrs_for_ram(RAM), max_pa_bits=38)  # 6 KeyID bits: max PA 4 GiB
    status, _ = configure(infos, platform=platform)
    assert status == abi.with_info(Status.TDX_INVALID_TDMR, 1)


def test_tdmrs_must_ascend():
    first, second = valid_tdmrs()
    status, _ = configure([second, first])
    assert status == abi.with_info(Status.TDX_NON_ORDERED_TDMR, 1)


def test_tdmrs_must_not_overlap():
    first, second = valid_tdmrs()
    status, _ = configure([first, dataclasses.replace(second, base=G)])
    assert status == abi.with_info(Status.TDX_NON_ORDERED_TDMR, 1)


def test_reserved_areas_4k_aligned():
    first, second = valid_tdmrs()
    areas = [(a.offset, a.size) for a in first.used_reserved()]
    areas[0] = (0, M + 100)
    status, _ = configure([with_areas(first, areas), second])
    assert status == abi.with_info(Status.TDX_INVALID_RESERVED_IN_TDMR, 0, 0)


def test_reserved_areas_sorted():
    first, second = valid_tdmrs()
    areas = [(a.offset, a.size) for a in first.used_reserved()]
    status, _ = configure([with_areas(first, [areas[1], areas[0]] + areas[2:]), second])
    assert status == abi.with_info(Status.TDX_NON_ORDERED_RESERVED_IN_TDMR, 0, 1)


def test_reserved_areas_do_not_overlap():
    first, second = valid_tdmrs()
    areas = [(a.offset, a.size) for a in first.used_reserved()]
    areas[1] = (areas[1][0], areas[2][0] - areas[1][0] + 4096)  # runs into the next area
    status, _ = configure([with_areas(first, areas), second])
    assert status == abi.with_info(Status.TDX_NON_ORDERED_RESERVED_IN_TDMR, 0, 2)


def test_reserved_area_inside_its_tdmr():
    first, second = valid_tdmrs()
    areas = [(a.offset, a.size) for a in first.used_reserved()] + [(2 * G - 4096, 8192)]
    status, _ = configure([with_areas(first, areas), second])
    assert status == abi.with_info(Status.TDX_INVALID_RESERVED_IN_TDMR, 0, 3)


def test_null_reserved_area_only_followed_by_null():
    first, second = valid_tdmrs()
    areas = [(a.offset, a.size) for a in first.used_reserved()]
    status, _ = configure([with_areas(first, areas[:1] + [(0, 0)] + areas[1:]), second])
    assert status == abi.with_info(Status.TDX_NON_ORDERED_RESERVED_IN_TDMR, 0, 1)


def test_reserved_areas_within_max():
    """The module reads only max_reserved_per_tdmr areas: with 2, TDMR 0's third area (which
    covers TDMR 1's PAMT) is not seen, so TDMR 1's PAMT lies in TDMR 0's available memory."""
    platform = PlatformConfig(cmrs=cmrs_for_ram(RAM), max_reserved_per_tdmr=2)
    first, second = valid_tdmrs()
    first = dataclasses.replace(first, reserved=first.reserved[:2])
    second = dataclasses.replace(second, reserved=second.reserved[:2])
    status, _ = configure([first, second], platform=platform)
    assert status == abi.with_info(Status.TDX_PAMT_OVERLAP, 1, PageSize.PT_4KB, 0)


def test_pamt_base_4k_aligned():
    first, second = valid_tdmrs()
    status, _ = configure([first, dataclasses.replace(second, pamt_2m_base=second.pamt_2m_base + 512)])
    assert status == abi.with_info(Status.TDX_INVALID_PAMT, 1, PageSize.PT_2MB)


def test_pamt_large_enough():
    first, second = valid_tdmrs()
    status, _ = configure([dataclasses.replace(first, pamt_4k_size=first.pamt_4k_size - 4096), second])
    assert status == abi.with_info(Status.TDX_INVALID_PAMT, 0, PageSize.PT_4KB)


def test_pamt_size_4k_aligned():
    first, second = valid_tdmrs()
    status, _ = configure([dataclasses.replace(first, pamt_1g_size=first.pamt_1g_size + 8), second])
    assert status == abi.with_info(Status.TDX_INVALID_PAMT, 0, PageSize.PT_1GB)


def test_pamts_do_not_overlap_each_other():
    first, second = valid_tdmrs()
    status, _ = configure([first, dataclasses.replace(second, pamt_4k_base=first.pamt_4k_base)])
    assert status == abi.with_info(Status.TDX_PAMT_OVERLAP, 1, PageSize.PT_4KB, 0)


def test_pamt_inside_a_tdmr_must_be_reserved():
    first, second = valid_tdmrs()
    # Forget the reserved area that covers TDMR 1's PAMT (the last one of TDMR 0).
    areas = [(a.offset, a.size) for a in first.used_reserved()][:-1]
    status, _ = configure([with_areas(first, areas), second])
    assert status == abi.with_info(Status.TDX_PAMT_OVERLAP, 1, PageSize.PT_4KB, 0)


def test_pamt_inside_cmrs():
    platform = PlatformConfig(cmrs=cmrs_for_ram([(0, G), (4 * G, 2 * G)]))
    moved = tdmr(4 * G, 2 * G, 3 * G, [])  # PAMT at 3G: a PCI hole, not convertible
    status, _ = configure([tdmr(0, 2 * G, 512 * M, [(0, M), (G, 2 * G)]), moved], platform=platform)
    assert status == abi.with_info(Status.TDX_PAMT_OUTSIDE_CMRS, 1, PageSize.PT_1GB)


def test_available_memory_inside_cmrs():
    first, second = valid_tdmrs()
    areas = [(a.offset, a.size) for a in first.used_reserved()][1:]  # forget the [0, 1M) hole
    status, _ = configure([with_areas(first, areas), second])
    assert status == abi.with_info(Status.TDX_TDMR_OUTSIDE_CMRS, 0)
