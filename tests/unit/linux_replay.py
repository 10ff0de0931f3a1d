"""A Python replay of what Linux 7.2/7.3 does to initialize the TDX module (tdx.c: tdx_enable ->
init_tdx_module), against the software module with a simulated physical memory: TDMRs from the
memory map, PAMTs allocated and covered by reserved areas, TDMR_INFO laid out as the kernel does,
then SYS.INIT, LP.INIT per CPU, SYS.RD, SYS.CONFIG, KEY.CONFIG per package, the TDMR.INIT loop.

Used by the unit tests and the benchmark; a buggy variant is made by changing one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from harness.observe import pamt
from harness.seam import abi
from harness.seam.abi import Field, Leaf
from harness.seam.call import SeamcallRequest, SeamcallResult
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.tdmr import ReservedArea, TdmrInfo


@dataclass
class ReplayResult:
    ok: bool
    failed_leaf: int | None = None
    status: int = 0
    pamt_kb: int = 0
    tdmrs: list[TdmrInfo] = field(default_factory=list)


class Allocator:
    """Bump allocator down from the top of the highest usable range (usable = [start, end))."""

    def __init__(self, usable: list[tuple[int, int]]) -> None:
        start, end = max(usable, key=lambda r: r[1])
        self.cursor = end
        self.floor = start

    def alloc(self, size: int, align: int) -> int:
        self.cursor = (self.cursor - size) // align * align
        assert self.cursor >= self.floor, "simulated RAM exhausted"
        return self.cursor


def call(module: TdxModule, memory: SparseMemory, cpu: int, leaf: int, **regs: int) -> SeamcallResult:
    values = tuple(regs.get(name, 0) for name in ("rcx", "rdx", "r8", "r9", "r10", "r11", "r12", "r13",
                                                   "r14", "r15", "rbx", "rdi", "rsi"))
    return module.call(SeamcallRequest(cpu, leaf, values), memory)


def reserved_areas(tdmr: pamt.Tdmr, blocks: list[pamt.MemRegion], pamts: list[tuple[int, int]]) -> list[ReservedArea]:
    """tdmr_populate_rsvd_holes() + tdmr_populate_rsvd_pamts(), sorted."""
    areas, prev_end = [], tdmr.base
    for block in blocks:
        if block.start >= tdmr.end:
            break
        if block.end < tdmr.base:
            continue
        if block.start <= prev_end:
            prev_end = block.end
            continue
        areas.append((prev_end, block.start - prev_end))
        prev_end = block.end
    if prev_end < tdmr.end:
        areas.append((prev_end, tdmr.end - prev_end))
    for base, size in pamts:
        end = base + size
        if end <= tdmr.base or base >= tdmr.end:
            continue
        lo, hi = max(base, tdmr.base), min(end, tdmr.end)
        areas.append((lo, hi - lo))
    return [ReservedArea(start - tdmr.base, size) for start, size in sorted(areas)]


def replay_init(module: TdxModule, usable: list[tuple[int, int]], numa_boundaries: Sequence[int] = (),
                pamt_skew: int = 0, tdmr_info_misalign: int = 0, memory: SparseMemory | None = None) -> ReplayResult:
    """Run Linux's init sequence over ``usable`` [start, end) ranges. ``pamt_skew`` shrinks every
    4K PAMT by that many bytes and
    ``tdmr_info_misalign`` shifts the TDMR_INFO array: the two kernel bugs the tests inject.
    ``memory``: the guest RAM to use (e.g. one that corrupts what the module reads)."""
    platform = module.platform
    if memory is None:
        memory = SparseMemory([(start, end - start) for start, end in usable])
    cpus = [cpu.apic_id for cpu in platform.cpus]

    def fail(leaf: int, result: SeamcallResult) -> ReplayResult:
        return ReplayResult(False, leaf, result.status)

    for cpu in cpus:
        if cpu == cpus[0]:
            result = call(module, memory, cpu, Leaf.TDH_SYS_INIT)
            if result.status:
                return fail(Leaf.TDH_SYS_INIT, result)
        result = call(module, memory, cpu, Leaf.TDH_SYS_LP_INIT)
        if result.status:
            return fail(Leaf.TDH_SYS_LP_INIT, result)
    values = {}
    for field_id in (Field.MAX_TDMRS, Field.MAX_RESERVED_PER_TDMR, Field.PAMT_4K_ENTRY_SIZE,
                     Field.PAMT_2M_ENTRY_SIZE, Field.PAMT_1G_ENTRY_SIZE):
        result = call(module, memory, cpus[0], Leaf.TDH_SYS_RD, rdx=field_id)
        if result.status:
            return fail(Leaf.TDH_SYS_RD, result)
        values[field_id] = result.regs[2]
    max_reserved = values[Field.MAX_RESERVED_PER_TDMR]
    entry_sizes = (values[Field.PAMT_4K_ENTRY_SIZE], values[Field.PAMT_2M_ENTRY_SIZE], values[Field.PAMT_1G_ENTRY_SIZE])

    blocks = pamt.tdx_memblocks(pamt.memblock_regions(usable, numa_boundaries))
    tdmrs = pamt.fill_out_tdmrs(blocks)
    alloc = Allocator(usable)
    pamts: list[tuple[int, int, int]] = []  # base, total size, 4K part
    for tdmr in tdmrs:
        sizes = pamt.pamt_sizes(tdmr, entry_sizes)
        total = sum(sizes)
        pamts.append((alloc.alloc(total, abi.SZ_4K), total, sizes[0]))
    infos = []
    for tdmr, (base, _, size_4k) in zip(tdmrs, pamts):
        sizes = pamt.pamt_sizes(tdmr, entry_sizes)
        areas = reserved_areas(tdmr, blocks, [(b, s) for b, s, _ in pamts])
        padded = tuple(areas) + (ReservedArea(0, 0),) * (max_reserved - len(areas))
        infos.append(TdmrInfo(tdmr.base, tdmr.size,
                              pamt_1g_base=base + sizes[0] + sizes[1], pamt_1g_size=sizes[2],
                              pamt_2m_base=base + sizes[0], pamt_2m_size=sizes[1],
                              pamt_4k_base=base, pamt_4k_size=size_4k - pamt_skew, reserved=padded))
    entry_size = -(-(abi.TDMR_INFO_HEADER_SIZE + 16 * max_reserved) // 512) * 512
    array = alloc.alloc(entry_size * len(infos), 512) + tdmr_info_misalign
    for i, info in enumerate(infos):
        memory.write(array + i * entry_size, info.pack())
    pa_array = alloc.alloc(max(512, 8 * len(infos)), 512)
    memory.write(pa_array, b"".join((array + i * entry_size).to_bytes(8, "little") for i in range(len(infos))))

    result = call(module, memory, cpus[0], Leaf.TDH_SYS_CONFIG, rcx=pa_array, rdx=len(infos),
                  r8=platform.tdx_keyid_start)
    if result.status:
        return fail(Leaf.TDH_SYS_CONFIG, result)
    done_packages: set[int] = set()
    for cpu in platform.cpus:
        if cpu.package in done_packages:
            continue
        done_packages.add(cpu.package)
        result = call(module, memory, cpu.apic_id, Leaf.TDH_SYS_KEY_CONFIG)
        if result.status:
            return fail(Leaf.TDH_SYS_KEY_CONFIG, result)
    for info in infos:
        next_pa = info.base
        while next_pa < info.end:
            result = call(module, memory, cpus[0], Leaf.TDH_SYS_TDMR_INIT, rcx=info.base)
            if result.status:
                return fail(Leaf.TDH_SYS_TDMR_INIT, result)
            next_pa = result.regs[1]
    return ReplayResult(True, pamt_kb=sum(t for _, t, _ in pamts) // 1024, tdmrs=infos)
