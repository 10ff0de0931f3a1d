"""TDMR_INFO: its byte layout and the checks TDH.SYS.CONFIG applies to it.

The checks and their order follow the TDX module's TDH.SYS.CONFIG: for each TDMR in turn, order
and overlap with the previous TDMR, base/size alignment, reserved areas, PAMT addresses and
sizes, PAMT overlaps, PAMTs outside reserved areas, PAMTs and available memory inside CMRs.
Each failure is a status with the detail bytes the real module reports (TDMR index, PAMT page
size, other TDMR index).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from harness.seam import abi
from harness.seam.abi import PageSize, Status

U64 = (1 << 64) - 1
_HEADER = struct.Struct("<8Q")
_AREA = struct.Struct("<2Q")


@dataclass(frozen=True)
class ReservedArea:
    offset: int
    size: int


@dataclass(frozen=True)
class TdmrInfo:
    base: int
    size: int
    pamt_1g_base: int
    pamt_1g_size: int
    pamt_2m_base: int
    pamt_2m_size: int
    pamt_4k_base: int
    pamt_4k_size: int
    reserved: tuple[ReservedArea, ...]

    @property
    def end(self) -> int:
        return self.base + self.size

    def pamt(self, size: PageSize) -> tuple[int, int]:
        return {
            PageSize.PT_1GB: (self.pamt_1g_base, self.pamt_1g_size),
            PageSize.PT_2MB: (self.pamt_2m_base, self.pamt_2m_size),
            PageSize.PT_4KB: (self.pamt_4k_base, self.pamt_4k_size),
        }[size]

    def used_reserved(self) -> tuple[ReservedArea, ...]:
        """Reserved areas up to the first NULL (size 0) entry."""
        out = []
        for area in self.reserved:
            if area.size == 0:
                break
            out.append(area)
        return tuple(out)

    def available(self) -> list[tuple[int, int]]:
        """[start, end) pieces of the TDMR not covered by a reserved area (valid TDMR only)."""
        pieces, cursor = [], self.base
        for area in self.used_reserved():
            start = self.base + area.offset
            if start > cursor:
                pieces.append((cursor, start))
            cursor = max(cursor, start + area.size)
        if cursor < self.end:
            pieces.append((cursor, self.end))
        return pieces

    def pack(self) -> bytes:
        header = _HEADER.pack(self.base, self.size, self.pamt_1g_base, self.pamt_1g_size,
                              self.pamt_2m_base, self.pamt_2m_size, self.pamt_4k_base, self.pamt_4k_size)
        return header + b"".join(_AREA.pack(a.offset, a.size) for a in self.reserved)

    @classmethod
    def unpack(cls, data: bytes, max_reserved: int) -> TdmrInfo:
        base, size, pamt_1g_base, pamt_1g_size, pamt_2m_base, pamt_2m_size, pamt_4k_base, pamt_4k_size = \
            _HEADER.unpack_from(data, 0)
        areas = tuple(ReservedArea(*_AREA.unpack_from(data, abi.TDMR_INFO_HEADER_SIZE + i * _AREA.size))
                      for i in range(max_reserved))
        return cls(base, size, pamt_1g_base, pamt_1g_size, pamt_2m_base, pamt_2m_size, pamt_4k_base, pamt_4k_size,
                   areas)


def tdmr_info_size(max_reserved: int) -> int:
    """Bytes the module reads for one TDMR_INFO."""
    return abi.TDMR_INFO_HEADER_SIZE + max_reserved * abi.TDMR_RESERVED_AREA_SIZE


def pamt_bytes_needed(tdmr_size: int, page_size: PageSize, entry_size: int) -> int:
    """Minimum PAMT size for a TDMR at one page size (the module does not round it)."""
    return (tdmr_size // abi.PAGE_SIZE_BYTES[page_size]) * entry_size


def _overlap(base1: int, size1: int, base2: int, size2: int) -> bool:
    return base1 < base2 + size2 and base2 < base1 + size1


def _aligned(value: int, alignment: int) -> bool:
    return value % alignment == 0


class TdmrChecker:
    """Validates the TDMR_INFO array handed to TDH.SYS.CONFIG, one entry at a time."""

    PAMT_ORDER = (PageSize.PT_1GB, PageSize.PT_2MB, PageSize.PT_4KB)

    def __init__(self, max_pa: int, cmrs: tuple[tuple[int, int], ...], entry_sizes: tuple[int, int, int]) -> None:
        self.max_pa = max_pa
        self.cmrs = self._merge(cmrs)
        self.entry_sizes = {PageSize.PT_4KB: entry_sizes[0], PageSize.PT_2MB: entry_sizes[1],
                            PageSize.PT_1GB: entry_sizes[2]}
        self.accepted: list[TdmrInfo] = []

    @staticmethod
    def _merge(cmrs: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
        merged: list[tuple[int, int]] = []
        for base, size in sorted(cmrs):
            if merged and merged[-1][1] == base:
                merged[-1] = (merged[-1][0], base + size)
            else:
                merged.append((base, base + size))
        return merged

    def in_cmr(self, start: int, end: int) -> bool:
        return any(cmr_start <= start and end <= cmr_end for cmr_start, cmr_end in self.cmrs)

    def _pa_ok(self, pa: int) -> bool:
        return 0 <= pa < self.max_pa

    def check(self, tdmr: TdmrInfo) -> int:
        """Status of adding ``tdmr`` after the ones already accepted; accepts it on success."""
        i = len(self.accepted)
        status = (self._check_range(tdmr, i) or self._check_reserved(tdmr, i)
                  or self._check_pamts(tdmr, i) or self._check_available(tdmr, i))
        if not status:
            self.accepted.append(tdmr)
        return status

    def _check_range(self, tdmr: TdmrInfo, i: int) -> int:
        if tdmr.base + tdmr.size > U64:
            return abi.with_info(Status.TDX_INVALID_TDMR, i)
        if self.accepted:
            prev = self.accepted[-1]
            if tdmr.base < prev.base or tdmr.base < prev.end:
                return abi.with_info(Status.TDX_NON_ORDERED_TDMR, i)
        if not _aligned(tdmr.base, abi.SZ_1G) or not _aligned(tdmr.size, abi.SZ_1G) or tdmr.size == 0:
            return abi.with_info(Status.TDX_INVALID_TDMR, i)
        if not self._pa_ok(tdmr.base) or not self._pa_ok(tdmr.end - 1):
            return abi.with_info(Status.TDX_INVALID_TDMR, i)
        return 0

    def _check_reserved(self, tdmr: TdmrInfo, i: int) -> int:
        areas = tdmr.reserved
        for j, area in enumerate(areas):
            if area.size == 0:
                if j + 1 < len(areas) and areas[j + 1].size != 0:
                    return abi.with_info(Status.TDX_NON_ORDERED_RESERVED_IN_TDMR, i, j)
                continue
            if area.offset + area.size > U64:
                return abi.with_info(Status.TDX_INVALID_RESERVED_IN_TDMR, i, j)
            if j > 0:
                prev = areas[j - 1]
                if area.offset < prev.offset or area.offset < prev.offset + prev.size:
                    return abi.with_info(Status.TDX_NON_ORDERED_RESERVED_IN_TDMR, i, j)
            if not _aligned(area.offset, abi.SZ_4K) or not _aligned(area.size, abi.SZ_4K):
                return abi.with_info(Status.TDX_INVALID_RESERVED_IN_TDMR, i, j)
            start = tdmr.base + area.offset
            if start + area.size > U64 or start + area.size > tdmr.end:
                return abi.with_info(Status.TDX_INVALID_RESERVED_IN_TDMR, i, j)
        return 0

    def _check_pamts(self, tdmr: TdmrInfo, i: int) -> int:
        for size in self.PAMT_ORDER:
            base, length = tdmr.pamt(size)
            if not self._pamt_ok(base, length, size, tdmr.size):
                return abi.with_info(Status.TDX_INVALID_PAMT, i, size)
        status = self._check_pamt_overlaps(tdmr, i)
        if status:
            return status
        for size in self.PAMT_ORDER:
            base, length = tdmr.pamt(size)
            if not self.in_cmr(base, base + length):
                return abi.with_info(Status.TDX_PAMT_OUTSIDE_CMRS, i, size)
        return 0

    def _pamt_ok(self, base: int, length: int, size: PageSize, tdmr_size: int) -> bool:
        if base + length > U64:
            return False
        if not _aligned(base, abi.SZ_4K) or not _aligned(length, abi.SZ_4K):
            return False
        if not self._pa_ok(base) or not self._pa_ok((base + length - 1) & U64):
            return False
        return length >= pamt_bytes_needed(tdmr_size, size, self.entry_sizes[size])

    def _check_pamt_overlaps(self, tdmr: TdmrInfo, i: int) -> int:
        order = (PageSize.PT_4KB, PageSize.PT_2MB, PageSize.PT_1GB)
        # With the PAMTs of earlier TDMRs.
        for j, other in enumerate(self.accepted):
            for size in order:
                base, length = tdmr.pamt(size)
                if any(_overlap(base, length, *other.pamt(s)) for s in order):
                    return abi.with_info(Status.TDX_PAMT_OVERLAP, i, size, j)
        # With each other.
        for a, b in ((PageSize.PT_4KB, PageSize.PT_2MB), (PageSize.PT_4KB, PageSize.PT_1GB),
                     (PageSize.PT_2MB, PageSize.PT_1GB)):
            if _overlap(*tdmr.pamt(a), *tdmr.pamt(b)):
                return abi.with_info(Status.TDX_PAMT_OVERLAP, i, a, i)
        # PAMTs may only sit in reserved areas of any TDMR.
        tdmrs = self.accepted + [tdmr]
        for j, other in enumerate(tdmrs):
            for size in order:
                if self._hits_available(other, *tdmr.pamt(size)):
                    return abi.with_info(Status.TDX_PAMT_OVERLAP, i, size, j)
            if j < i:
                for size in order:
                    if self._hits_available(tdmr, *other.pamt(size)):
                        return abi.with_info(Status.TDX_PAMT_OVERLAP, j, size, i)
        return 0

    @staticmethod
    def _hits_available(tdmr: TdmrInfo, base: int, length: int) -> bool:
        return any(_overlap(base, length, start, end - start) for start, end in tdmr.available())

    def _check_available(self, tdmr: TdmrInfo, i: int) -> int:
        for start, end in tdmr.available():
            if not self.in_cmr(start, end):
                return abi.with_info(Status.TDX_TDMR_OUTSIDE_CMRS, i)
        return 0
