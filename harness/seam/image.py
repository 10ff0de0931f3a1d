"""TDX module update images: the on-disk format Linux's seamldr.c parses (struct tdx_image_header,
then the sigstruct pages, then the module pages) and what the software P-SEAMLDR reads inside.

A real image carries Intel's SIGSTRUCT (RSA-3072 over the module's measurement, with the module's
SVN and handoff fields) and the module's code. The software loader keeps the SIGSTRUCT's role and
drops its cryptography: the sigstruct page holds the module's identity (version, handoff fields),
the SHA-384 of the module pages (the real SEAMHASH) and a seal, the SHA-384 of the signer's name
and those fields (standing in for the RSA signature). Which signers the loader trusts is the
platform's (PlatformConfig.seamldr_signers): an "unsigned" image is one whose signer the platform
does not trust. The module pages are opaque to the loader, as code is; the first one names the
module in text for a human reading the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import struct
from dataclasses import dataclass

PAGE_SIZE = 4096
TDX_IMAGE_VERSION_2 = 0x200  # seamldr.c: the only tdx_image ABI version Linux takes
TDX_IMAGE_SIGNATURE = b"TDX-BLOB"
# struct tdx_image_header: u16 version, u16 checksum, u8 signature[8], u32 sigstruct_nr_pages,
# u32 module_nr_pages, u8 reserved[4076].
IMAGE_HEADER = struct.Struct("<HH8sII4076s")
SEAMLDR_MAX_NR_MODULE_PAGES = 496
SEAMLDR_MAX_NR_SIG_PAGES = 1

SIGSTRUCT_MAGIC = b"TDXH-SIG"
# magic, signer[32], seal[48], module digest[48], major, minor, update, build_num, build_date,
# module_hv, min_update_hv, no_downgrade
_SIGSTRUCT = struct.Struct("<8s32s48s48sHHHHIHHB")
DEFAULT_SIGNER = "intel"

# What `tdxh module-image --corrupt` can break, and where the break is caught: the first five by
# Linux's init_seamldr_params() (EINVAL before any SEAMCALL), the last two by the loader.
CORRUPTIONS = ("header-version", "signature", "reserved", "size", "sigstruct-pages", "module-pages",
               "seal", "digest")


@dataclass(frozen=True)
class ModuleImage:
    """A TDX module as its SIGSTRUCT describes it: the version TDH.SYS.RD reports and the handoff
    fields TDH.SYS.SHUTDOWN/UPDATE check (MODULE_HV, MIN_UPDATE_HV, NO_DOWNGRADE)."""

    major_version: int
    minor_version: int
    update_version: int
    build_num: int = 0
    build_date: int = 0
    module_hv: int = 0
    min_update_hv: int = 0
    no_downgrade: bool = False

    @property
    def version(self) -> tuple[int, int, int]:
        return self.major_version, self.minor_version, self.update_version

    def takes_handoff(self, hv: int) -> bool:
        """Whether this module can take over from handoff data of version ``hv``: within
        [MIN_UPDATE_HV, MODULE_HV], the range the loader, TDH.SYS.SHUTDOWN and TDH.SYS.UPDATE
        all check."""
        return self.min_update_hv <= hv <= self.module_hv

    @property
    def version_text(self) -> str:
        """As Linux prints it (TDX_VERSION_FMT "%u.%u.%02u")."""
        return f"{self.major_version}.{self.minor_version}.{self.update_version:02d}"

    def replace(self, **changes: object) -> ModuleImage:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def parse_version(text: str) -> tuple[int, int, int]:
    """``1.5.20`` -> (1, 5, 20)."""
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"module version {text!r}: expected MAJOR.MINOR.UPDATE, e.g. 1.5.20")
    major, minor, update = (int(part) for part in match.groups())
    if max(major, minor, update) > 0xFFFF:
        raise ValueError(f"module version {text!r}: each part is a 16-bit number")
    return major, minor, update


@dataclass(frozen=True)
class Sigstruct:
    signer: str
    seal: bytes
    module_digest: bytes
    module: ModuleImage

    def pack(self) -> bytes:
        page = _SIGSTRUCT.pack(SIGSTRUCT_MAGIC, self.signer.encode(), self.seal, self.module_digest,
                               *_module_fields(self.module))
        return page.ljust(PAGE_SIZE, b"\0")

    @classmethod
    def parse(cls, page: bytes) -> Sigstruct | None:
        """None: not a sigstruct (wrong magic)."""
        fields = _SIGSTRUCT.unpack_from(page)
        if fields[0] != SIGSTRUCT_MAGIC:
            return None
        signer = fields[1].rstrip(b"\0").decode(errors="replace")
        major, minor, update, build_num, build_date, module_hv, min_update_hv, no_downgrade = fields[4:]
        module = ModuleImage(major, minor, update, build_num, build_date, module_hv, min_update_hv, bool(no_downgrade))
        return cls(signer, fields[2], fields[3], module)

    @property
    def sealed(self) -> bool:
        """The seal matches the signer and the fields (what an RSA check would establish)."""
        return self.seal == seal_of(self.signer, self.module_digest, self.module)


def _module_fields(module: ModuleImage) -> tuple[int, ...]:
    return (module.major_version, module.minor_version, module.update_version, module.build_num,
            module.build_date, module.module_hv, module.min_update_hv, int(module.no_downgrade))


def seal_of(signer: str, module_digest: bytes, module: ModuleImage) -> bytes:
    body = struct.pack("<32s48sHHHHIHHB", signer.encode(), module_digest, *_module_fields(module))
    return hashlib.sha384(body).digest()


def module_digest(pages: bytes) -> bytes:
    return hashlib.sha384(pages).digest()


def module_pages(module: ModuleImage, count: int) -> bytes:
    text = f"tdx-harness software TDX module {module.version_text} (build {module.build_num})\n".encode()
    return text.ljust(count * PAGE_SIZE, b"\0")


def build_image(module: ModuleImage, *, signer: str = DEFAULT_SIGNER, nr_module_pages: int = 1,
                corrupt: str | None = None) -> bytes:
    """The image file: header, one sigstruct page, ``nr_module_pages`` module pages; ``corrupt``
    breaks one thing (CORRUPTIONS) and leaves the rest consistent, so only that check fails."""
    if corrupt is not None and corrupt not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corrupt!r}: one of {', '.join(CORRUPTIONS)}")
    if nr_module_pages < 1:
        raise ValueError("an image has at least one module page")
    if corrupt == "module-pages":
        nr_module_pages = SEAMLDR_MAX_NR_MODULE_PAGES + 1
    pages = module_pages(module, nr_module_pages)
    digest = module_digest(pages)
    seal = seal_of(signer, digest, module)
    if corrupt == "seal":
        seal = bytes(b ^ 0xFF for b in seal)
    if corrupt == "digest":
        digest = bytes(b ^ 0xFF for b in digest)
        seal = seal_of(signer, digest, module)  # a well-signed sigstruct of other module pages
    sig_pages = Sigstruct(signer, seal, digest, module).pack()
    if corrupt == "sigstruct-pages":
        sig_pages += bytes(PAGE_SIZE)
    header = IMAGE_HEADER.pack(
        0x100 if corrupt == "header-version" else TDX_IMAGE_VERSION_2,
        0,  # checksum: Linux does not check it, and its algorithm is not in a public source
        b"TDX-BLOX" if corrupt == "signature" else TDX_IMAGE_SIGNATURE,
        len(sig_pages) // PAGE_SIZE, nr_module_pages,
        b"\x01".ljust(4076, b"\0") if corrupt == "reserved" else bytes(4076))
    image = header + sig_pages + pages
    return image + b"\0" if corrupt == "size" else image
