"""MRTD, the TD build-time measurement, as the TDX module ABI defines it.

MRTD is one SHA-384 over a sequence of 128-byte blocks, finalized by TDH.MR.FINALIZE:
- TDH.MEM.PAGE.ADD extends one block: the ASCII string "MEM.PAGE.ADD" zero-padded to 16 bytes,
  the page GPA (8 bytes, little endian), zeros to 128 bytes. The page content is not measured.
- TDH.MR.EXTEND extends three blocks: "MR.EXTEND" padded to 16 bytes, the chunk GPA, zeros to
  128 bytes; then the 256 bytes of the chunk as the TD sees them.
Pure functions: no module state, so tests can check them against a direct computation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

SHA384_BLOCK = 128
MRTD_SIZE = 48
API_NAME_SIZE = 16
PAGE_ADD_NAME = b"MEM.PAGE.ADD"
MR_EXTEND_NAME = b"MR.EXTEND"
MR_EXTEND_CHUNK = 256


def api_block(name: bytes, gpa: int) -> bytes:
    """The 128-byte block naming the SEAMCALL and the GPA it measured."""
    if len(name) > API_NAME_SIZE:
        raise ValueError(f"API name {name!r} longer than {API_NAME_SIZE} bytes")
    return name.ljust(API_NAME_SIZE, b"\0") + gpa.to_bytes(8, "little") + bytes(SHA384_BLOCK - API_NAME_SIZE - 8)


def page_add_blocks(gpa: int) -> bytes:
    return api_block(PAGE_ADD_NAME, gpa)


def mr_extend_blocks(gpa: int, chunk: bytes) -> bytes:
    if len(chunk) != MR_EXTEND_CHUNK:
        raise ValueError(f"TDH.MR.EXTEND measures {MR_EXTEND_CHUNK} bytes, got {len(chunk)}")
    return api_block(MR_EXTEND_NAME, gpa) + chunk


@dataclass
class MrtdBuilder:
    """The running SHA-384 context the module keeps in TDCS between TDH.MNG.INIT and
    TDH.MR.FINALIZE."""

    _sha: hashlib._Hash = field(default_factory=hashlib.sha384)
    blocks: int = 0

    def page_add(self, gpa: int) -> None:
        self._extend(page_add_blocks(gpa))

    def mr_extend(self, gpa: int, chunk: bytes) -> None:
        self._extend(mr_extend_blocks(gpa, chunk))

    def _extend(self, data: bytes) -> None:
        assert len(data) % SHA384_BLOCK == 0
        self._sha.update(data)
        self.blocks += len(data) // SHA384_BLOCK

    def finalize(self) -> bytes:
        return self._sha.copy().digest()
