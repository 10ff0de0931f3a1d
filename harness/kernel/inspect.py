"""Check a kernel image before booting it: is it an x86-64 kernel, does it carry the shim and
the options the scenarios need? Reads the embedded config (CONFIG_IKCONFIG) from a vmlinux, or
from the payload a bzImage decompresses to, with pyelftools checking the ELF it finds."""

from __future__ import annotations

import gzip
import io
import lzma
import zlib
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from harness.kernel.build import parse_config

IKCFG_START, IKCFG_END = b"IKCFG_ST", b"IKCFG_ED"
REQUIRED = {
    "CONFIG_INTEL_TDX_HOST": "y",
    "CONFIG_INTEL_TDX_HOST_SW_MODULE": "y",
    "CONFIG_KVM_INTEL": "m",
    "CONFIG_BLK_DEV_INITRD": "y",
    "CONFIG_SERIAL_8250_CONSOLE": "y",
}
# (magic, decompressor) of the payload formats a bzImage may carry; tried at every offset.
_PAYLOADS = (
    (b"\x1f\x8b\x08", lambda data: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)),
    (b"\xfd7zXZ\x00", lambda data: lzma.LZMADecompressor().decompress(data)),
)


class KernelImageError(Exception):
    """The image cannot be used; the message names what is missing."""


@dataclass(frozen=True)
class KernelImage:
    path: Path
    config: dict[str, str]

    @property
    def release_hint(self) -> str:
        return self.config.get("CONFIG_LOCALVERSION", "")


def _elf_kernel(data: bytes, where: str) -> None:
    try:
        elf = ELFFile(io.BytesIO(data))
    except ELFError as err:
        raise KernelImageError(f"{where} is not an ELF kernel: {err}") from err
    if elf["e_machine"] != "EM_X86_64":
        raise KernelImageError(f"{where} is a {elf['e_machine']} ELF, not x86-64")


def _vmlinux_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:4] == b"\x7fELF":
        _elf_kernel(data, str(path))
        return data
    if data[0x202:0x206] != b"HdrS":
        raise KernelImageError(f"{path} is neither a vmlinux (ELF) nor a bzImage (no HdrS header)")
    for magic, decompress in _PAYLOADS:
        start = data.find(magic)
        while start >= 0:
            try:
                payload = decompress(data[start:])
            except (zlib.error, lzma.LZMAError, EOFError):
                payload = b""
            if payload[:4] == b"\x7fELF":
                _elf_kernel(payload, f"the payload of {path}")
                return payload
            start = data.find(magic, start + 1)
    raise KernelImageError(f"cannot decompress the kernel inside {path} (only gzip and xz payloads are read)")


def embedded_config(vmlinux: bytes, where: str) -> dict[str, str]:
    start = vmlinux.find(IKCFG_START)
    end = vmlinux.find(IKCFG_END, start)
    if start < 0 or end < 0:
        raise KernelImageError(f"{where} has no embedded config: build it with CONFIG_IKCONFIG=y")
    return parse_config(gzip.decompress(vmlinux[start + len(IKCFG_START):end]).decode(errors="replace"))


def check_kernel(path: Path) -> KernelImage:
    """Refuse a kernel that cannot run the scenarios, naming every missing option."""
    if not path.is_file():
        raise KernelImageError(f"kernel image {path} does not exist")
    config = embedded_config(_vmlinux_bytes(path), str(path))
    missing = [f"{option}={want}" for option, want in REQUIRED.items() if config.get(option, "n") != want]
    if missing:
        hint = " (the tdx-harness shim is not applied: see images/kernel/patches)" \
            if "CONFIG_INTEL_TDX_HOST_SW_MODULE=y" in missing else ""
        raise KernelImageError(f"{path} lacks {', '.join(missing)}{hint}")
    return KernelImage(path, config)
