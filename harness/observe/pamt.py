"""The PAMT model: TDMRs and the PAMT size Linux 7.2/7.3 computes from a memory map.

Follows arch/x86/virt/vmx/tdx/tdx.c: memblock memory regions (e820 RAM, trimmed to pages,
adjacent ranges merged, split at NUMA node boundaries), the first 1 MiB dropped
(build_tdx_memlist), one 1 GiB-aligned TDMR per region unless the previous TDMR already covers
it (fill_out_tdmrs), and per TDMR a PAMT per page size of entries x entry size rounded up to
4 KiB (tdmr_get_pamt_sz). ``pamt_kb`` is what the kernel prints in "N KB allocated for PAMT".
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

SZ_4K = 4096
SZ_1M = 1 << 20
SZ_1G = 1 << 30
PAGE_SHIFTS = (12, 21, 30)  # 4K, 2M, 1G

E820_LINE = re.compile(r"(?P<src>BIOS-e820|user): \[mem (?P<start>0x[0-9a-fA-F]+)-(?P<end>0x[0-9a-fA-F]+)\]"
                       r"\s+(?P<type>.+?)\s*$")
E820_ENTRY = re.compile(r"(BIOS-e820|user): \[mem ")
# E820_TYPE_RAM as e820_print_type() names it: "System RAM" since Linux 7.x, "usable" before.
RAM_TYPES = ("System RAM", "usable")


class E820Error(ValueError):
    """The memory map cannot be used; the message names the offending line."""


@dataclass(frozen=True)
class MemRegion:
    start: int
    end: int  # exclusive
    nid: int = 0


@dataclass(frozen=True)
class Tdmr:
    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class PamtModel:
    regions: tuple[MemRegion, ...]  # TDX memory blocks (after dropping the first 1 MiB)
    tdmrs: tuple[Tdmr, ...]
    pamt_sizes: tuple[tuple[int, int, int], ...]  # per TDMR: 4K, 2M, 1G PAMT bytes

    @property
    def pamt_bytes(self) -> int:
        return sum(sum(sizes) for sizes in self.pamt_sizes)

    @property
    def pamt_kb(self) -> int:
        return self.pamt_bytes // 1024

    def to_json(self) -> dict[str, object]:
        return {"tdmrs": [[t.base, t.size] for t in self.tdmrs], "pamt_kb": self.pamt_kb}


def parse_e820(text: str) -> list[tuple[int, int]]:
    """Usable [start, end) ranges from the kernel's e820 map lines. A ``user:`` map (printed when
    ``memmap=`` or ``mem=`` changed the map) replaces the BIOS one. Other lines are ignored,
    including the kernel's own ``e820: update``/``remove`` notes (they touch the first MiB,
    which TDX does not cover)."""
    maps: dict[str, list[tuple[int, int]]] = {"BIOS-e820": [], "user": []}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not E820_ENTRY.search(line):  # also skips "[gap ...]" lines
            continue
        match = E820_LINE.search(line)
        if match is None:
            raise E820Error(f"line {line_no}: cannot parse e820 entry: {line.strip()!r}")
        start, end = int(match["start"], 16), int(match["end"], 16) + 1
        if end <= start:
            raise E820Error(f"line {line_no}: empty or reversed range: {line.strip()!r}")
        if match["type"] in RAM_TYPES:
            maps[match["src"]].append((start, end))
    # A console log can hold the map twice (the console replays the log buffer): dedupe.
    ranges = sorted(set(maps["user"] or maps["BIOS-e820"]))
    if not ranges:
        raise E820Error("no RAM in the e820 map (expected lines like "
                        "'BIOS-e820: [mem 0x0000000000100000-0x000000007ffdffff]  System RAM')")
    return ranges


SRAT_LINE = re.compile(r"ACPI: SRAT: Node (?P<node>\d+) PXM \d+ "
                       r"\[mem (?P<start>0x[0-9a-fA-F]+)-(?P<end>0x[0-9a-fA-F]+)\]")


def parse_numa_boundaries(text: str) -> list[int]:
    """Where a new NUMA node's memory starts, from the kernel's "ACPI: SRAT: Node N PXM P
    [mem A-B]" lines (none without NUMA)."""
    ranges = sorted({(int(m["start"], 16), int(m["node"])) for m in SRAT_LINE.finditer(text)})
    return [start for (start, node), (_, prev) in zip(ranges[1:], ranges) if node != prev]


def memblock_regions(usable: Sequence[tuple[int, int]], numa_boundaries: Sequence[int] = ()) -> list[MemRegion]:
    """memblock.memory as for_each_mem_pfn_range() walks it: page-trimmed, merged, split per node."""
    trimmed: list[tuple[int, int]] = []
    for raw_start, raw_end in sorted(usable):
        start, end = -(-raw_start // SZ_4K) * SZ_4K, raw_end // SZ_4K * SZ_4K
        if start < end:
            if trimmed and trimmed[-1][1] >= start:
                trimmed[-1] = (trimmed[-1][0], max(trimmed[-1][1], end))
            else:
                trimmed.append((start, end))
    boundaries = sorted(set(numa_boundaries))
    regions = []
    for start, end in trimmed:
        cuts = [start] + [b for b in boundaries if start < b < end] + [end]
        for lo, hi in itertools.pairwise(cuts):
            regions.append(MemRegion(lo, hi, nid=sum(1 for b in boundaries if b <= lo)))
    return regions


def tdx_memblocks(regions: list[MemRegion]) -> list[MemRegion]:
    """build_tdx_memlist(): the first 1 MiB is not TDX convertible memory."""
    out = []
    for region in regions:
        start = max(region.start, SZ_1M)
        if start < region.end:
            out.append(MemRegion(start, region.end, region.nid))
    return out


def fill_out_tdmrs(blocks: list[MemRegion]) -> list[Tdmr]:
    """One 1 GiB-aligned TDMR per block, skipping what the previous TDMR already covers."""
    tdmrs: list[Tdmr] = []
    for block in blocks:
        start = block.start // SZ_1G * SZ_1G
        end = -(-block.end // SZ_1G) * SZ_1G
        if tdmrs:
            last = tdmrs[-1]
            if end <= last.end:
                continue
            start = max(start, last.end)
        tdmrs.append(Tdmr(start, end - start))
    return tdmrs


def pamt_sizes(tdmr: Tdmr, entry_sizes: tuple[int, int, int]) -> tuple[int, int, int]:
    """tdmr_get_pamt_sz() for 4K, 2M and 1G: entries x entry size, rounded up to 4 KiB."""
    pamt_4k, pamt_2m, pamt_1g = (-(-((tdmr.size >> shift) * entry) // SZ_4K) * SZ_4K
                                 for shift, entry in zip(PAGE_SHIFTS, entry_sizes))
    return pamt_4k, pamt_2m, pamt_1g


def model(usable: Sequence[tuple[int, int]], numa_boundaries: Sequence[int] = (),
          entry_sizes: tuple[int, int, int] = (16, 16, 16)) -> PamtModel:
    blocks = tdx_memblocks(memblock_regions(usable, numa_boundaries))
    if not blocks:
        raise E820Error("no memory above 1 MiB: nothing for TDX to cover")
    tdmrs = fill_out_tdmrs(blocks)
    return PamtModel(tuple(blocks), tuple(tdmrs), tuple(pamt_sizes(t, entry_sizes) for t in tdmrs))
