"""Check a kernel image before booting it: is it an x86-64 kernel, does it carry the shim and
the options the scenarios need? Reads the embedded config (CONFIG_IKCONFIG) from a vmlinux, or
from the payload a bzImage decompresses to, with pyelftools checking the ELF it finds."""

from __future__ import annotations

import gzip
import io
import lzma
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from harness.kernel.build import parse_config

IKCFG_START, IKCFG_END = b"IKCFG_ST", b"IKCFG_ED"
REQUIRED = {
    "CONFIG_INTEL_TDX_HOST": "y",
    "CONFIG_INTEL_TDX_HOST_SW_MODULE": "y",
    "CONFIG_KVM_INTEL": "m",
    "CONFIG_BLK_DEV_INITRD": "y",
    "CONFIG_SERIAL_8250_CONSOLE": "y",
}
# The shim's entry point: its symbol proves the SEAMCALL redirection is linked in.
SHIM_SYMBOL = "tdx_sw_seamcall"
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
    symbols_from: Path | None  # the vmlinux whose symbol table was checked, if one was found


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


def symbol_names(vmlinux: Path) -> set[str] | None:
    """Names in the ELF symbol table, or None when the file has none (stripped)."""
    table = _symbols(vmlinux)
    return None if table is None else set(table)


def symbol_addresses(vmlinux: Path, names: Iterable[str]) -> dict[str, int]:
    """The addresses of those of ``names`` the ELF symbol table has (none when stripped)."""
    table = _symbols(vmlinux) or {}
    return {name: table[name] for name in names if name in table}


def _symbols(vmlinux: Path) -> dict[str, int] | None:
    with open(vmlinux, "rb") as stream:
        try:
            elf = ELFFile(stream)
        except ELFError as err:
            raise KernelImageError(f"{vmlinux} is not an ELF file: {err}") from err
        table = elf.get_section_by_name(".symtab")
        if not isinstance(table, SymbolTableSection):
            return None
        return {symbol.name: symbol["st_value"] for symbol in table.iter_symbols()}


def vmlinux_for(path: Path) -> Path | None:
    """The vmlinux that goes with ``path``: itself, or the one at the top of its build tree
    (a bzImage lives in arch/x86/boot/) or beside it."""
    if path.read_bytes()[:4] == b"\x7fELF":
        return path
    candidates = [path.parent / "vmlinux"]
    if path.parent.match("arch/x86/boot"):
        candidates.append(path.parents[3] / "vmlinux")
    return next((c for c in candidates if c.is_file()), None)


def check_kernel(path: Path) -> KernelImage:
    """Refuse a kernel that cannot run the scenarios, naming every missing option or symbol.
    The embedded config is always checked; the shim's symbol when a vmlinux is at hand."""
    if not path.is_file():
        raise KernelImageError(f"kernel image {path} does not exist")
    config = embedded_config(_vmlinux_bytes(path), str(path))
    missing = [f"{option}={want}" for option, want in REQUIRED.items() if config.get(option, "n") != want]
    if missing:
        hint = " (the tdx-harness shim is not applied: see images/kernel/patches)" \
            if "CONFIG_INTEL_TDX_HOST_SW_MODULE=y" in missing else ""
        raise KernelImageError(f"{path} lacks {', '.join(missing)}{hint}")
    vmlinux = vmlinux_for(path)
    names = symbol_names(vmlinux) if vmlinux is not None else None
    if names is not None and SHIM_SYMBOL not in names:
        raise KernelImageError(f"{vmlinux} has no symbol {SHIM_SYMBOL}: it was not built from the patched tree")
    return KernelImage(path, config, vmlinux if names is not None else None)
