"""How the module reaches guest physical memory: an interface, a sparse in-process memory for
tests, and the error a refused access raises."""

from __future__ import annotations

from typing import Protocol


class MemoryAccessError(Exception):
    """The guest refused an access (not RAM, or the transport failed)."""

    def __init__(self, pa: int, size: int, reason: str) -> None:
        super().__init__(f"guest memory access [{pa:#x}, +{size:#x}) failed: {reason}")
        self.pa, self.size, self.reason = pa, size, reason


class PhysicalMemory(Protocol):
    def read(self, pa: int, size: int) -> bytes: ...

    def write(self, pa: int, data: bytes) -> None: ...


class SparseMemory:
    """Guest RAM for unit tests: given RAM ranges, unwritten bytes read as zero, and accesses
    outside RAM raise like the shim's refusal would."""

    PAGE = 4096

    def __init__(self, ram: list[tuple[int, int]]) -> None:
        self.ram = sorted(ram)
        self.pages: dict[int, bytearray] = {}
        self.reads = 0
        self.bytes_read = 0

    def _check(self, pa: int, size: int) -> None:
        if size <= 0 or not any(base <= pa and pa + size <= base + length for base, length in self.ram):
            raise MemoryAccessError(pa, size, "not RAM")

    def read(self, pa: int, size: int) -> bytes:
        self._check(pa, size)
        self.reads += 1
        self.bytes_read += size
        out = bytearray()
        while size:
            page, offset = divmod(pa, self.PAGE)
            chunk = min(size, self.PAGE - offset)
            data = self.pages.get(page)
            out += data[offset:offset + chunk] if data is not None else bytes(chunk)
            pa, size = pa + chunk, size - chunk
        return bytes(out)

    def write(self, pa: int, data: bytes) -> None:
        self._check(pa, len(data))
        view = memoryview(data)
        while view:
            page, offset = divmod(pa, self.PAGE)
            chunk = min(len(view), self.PAGE - offset)
            self.pages.setdefault(page, bytearray(self.PAGE))[offset:offset + chunk] = view[:chunk]
            pa, view = pa + chunk, view[chunk:]
