"""Resolves the shim's call sites (harness/seam/sites.py) with the kernel's own symbols:
``func+0xoff [module] file:line``. vmlinux addresses are link addresses; a module site is an
offset in the module's core or init text, laid out from its .ko as the kernel's
layout_sections() does. file:line comes from DWARF line info where the build has it (vmlinux
only: in a relocatable .ko every text section's lines start at 0)."""

from __future__ import annotations

import bisect
import functools
import logging
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.dwarf.dwarfinfo import DWARFInfo
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from harness.kernel.inspect import vmlinux_for
from harness.seam.module import TdxModule
from harness.seam.sites import RawSite, SiteKind

log = logging.getLogger(__name__)

TEXT_FLAGS = SH_FLAGS.SHF_ALLOC | SH_FLAGS.SHF_EXECINSTR
INIT_PREFIX = ".init"  # module_init_section(): these go to MOD_INIT_TEXT
SYM64 = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
STT_MASK = 0xF
CODE_SYMBOL_TYPES = (0, 2)  # STT_NOTYPE (asm entry points), STT_FUNC
ELF64 = 64


@dataclass
class Symbols:
    """Code symbols of one address space, sorted by address."""

    starts: list[int] = field(default_factory=list)
    entries: list[tuple[int, int, str]] = field(default_factory=list)  # start, size, name

    def add(self, start: int, size: int, name: str) -> None:
        self.entries.append((start, size, name))

    def sort(self) -> None:
        # At one address a sized symbol (a function) wins over a label.
        self.entries.sort(key=lambda e: (e[0], e[1] > 0))
        self.starts = [e[0] for e in self.entries]

    def lookup(self, addr: int) -> str | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0:
            return None
        start, size, name = self.entries[i]
        if size and addr > start + size:  # a return address may end its function
            return None
        return f"{name}+{addr - start:#x}"


class ElfSymbols:
    """One ELF (vmlinux or a .ko): its code symbols per site kind, and its line table."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spaces: dict[SiteKind, Symbols] = {}
        self._lines: list[tuple[int, str, int]] | None = None
        with open(path, "rb") as stream:
            elf = ELFFile(stream)
            relocatable = elf["e_type"] == "ET_REL"
            bases = _module_layout(elf) if relocatable else {}
            table = elf.get_section_by_name(".symtab")
            if isinstance(table, SymbolTableSection):
                self._add_symbols(elf, table, relocatable, bases)
            for space in self.spaces.values():
                space.sort()
            self.has_lines = not relocatable and elf.has_dwarf_info() and \
                elf.get_section_by_name(".debug_line") is not None

    def _add_symbols(self, elf: ELFFile, table: SymbolTableSection, relocatable: bool,
                     bases: dict[int, tuple[SiteKind, int]]) -> None:
        """Read as raw Elf64_Sym records: pyelftools' per-symbol objects take seconds on a
        vmlinux, and the first SEAMCALL's record waits for this."""
        if elf.elfclass != ELF64 or not elf.little_endian:
            raise ELFError(f"{self.path}: not a little-endian ELF64 file")
        names = elf.get_section(table["sh_link"]).data()
        text = {i for i, section in enumerate(elf.iter_sections())
                if section["sh_flags"] & SH_FLAGS.SHF_EXECINSTR}
        for name_at, info, _, index, value, size in SYM64.iter_unpack(table.data()):
            if info & STT_MASK not in CODE_SYMBOL_TYPES or index not in text or not name_at:
                continue
            if relocatable:
                if index not in bases:
                    continue
                kind, base = bases[index]
                start = base + value
            else:
                kind, start = SiteKind.KERNEL, value
            name = names[name_at:names.index(b"\0", name_at)].decode(errors="replace")
            self.spaces.setdefault(kind, Symbols()).add(start, size, name)

    def function(self, kind: SiteKind, addr: int) -> str | None:
        space = self.spaces.get(kind)
        return space.lookup(addr) if space else None

    def line(self, addr: int) -> str | None:
        """file:line of the instruction at ``addr``, from the DWARF line programs."""
        if not self.has_lines:
            return None
        if self._lines is None:
            with open(self.path, "rb") as stream:
                self._lines = _line_rows(ELFFile(stream).get_dwarf_info())
        i = bisect.bisect_right(self._lines, (addr, "\uffff", 0)) - 1
        if i < 0 or not self._lines[i][1]:  # before the first row, or past a sequence's end
            return None
        _, name, line = self._lines[i]
        return f"{name}:{line}"


def _module_layout(elf: ELFFile) -> dict[int, tuple[SiteKind, int]]:
    """Section index -> (text kind, offset in that text), as kernel/module/main.c lays out the
    code sections of a module (header order, each aligned; .init* to the init text)."""
    sizes = {SiteKind.MODULE_TEXT: 0, SiteKind.MODULE_INIT_TEXT: 0}
    bases = {}
    for index, section in enumerate(elf.iter_sections()):
        if section["sh_flags"] & TEXT_FLAGS != TEXT_FLAGS:
            continue
        kind = SiteKind.MODULE_INIT_TEXT if section.name.startswith(INIT_PREFIX) else SiteKind.MODULE_TEXT
        align = section["sh_addralign"] or 1
        offset = -(-sizes[kind] // align) * align
        bases[index] = (kind, offset)
        sizes[kind] = offset + section["sh_size"]
    return bases


def _line_rows(dwarf: DWARFInfo) -> list[tuple[int, str, int]]:
    """Every line-table row as (address, file, line), sorted; a sequence's end as (address, "", 0)."""
    rows = []
    for cu in dwarf.iter_CUs():
        program = dwarf.line_program_for_CU(cu)
        if program is None:
            continue
        files = program["file_entry"]
        dirs = program["include_directory"]
        first_file = 0 if program.header["version"] >= 5 else 1
        for entry in program.get_entries():
            state = entry.state
            if state is None:
                continue
            if state.end_sequence:
                rows.append((state.address, "", 0))
                continue
            name = ""
            if 0 <= state.file - first_file < len(files):
                file = files[state.file - first_file]
                name = file.name.decode(errors="replace")
                directory = file.dir_index - (0 if first_file == 0 else 1)
                if not name.startswith("/") and file.dir_index > 0 and 0 <= directory < len(dirs):
                    name = f"{dirs[directory].decode(errors='replace')}/{name}"
            rows.append((state.address, name or "?", state.line))
    rows.sort()
    return rows


class SiteResolver:
    """Call sites of one kernel build: its vmlinux and the .ko files of its build tree. Loading
    the symbols takes a while: ``start_loading()`` does it in the background, so the first
    SEAMCALL is not held up; resolve() waits for it."""

    def __init__(self, vmlinux: Path, modules_under: Path | None = None) -> None:
        self.vmlinux = vmlinux
        self.modules_under = modules_under
        self._lock = threading.Lock()
        self._kernel: ElfSymbols | None = None
        self._modules: dict[str, Path] | None = None
        self._module_symbols: dict[str, ElfSymbols | None] = {}
        self._cache: dict[RawSite, str] = {}

    @classmethod
    def for_kernel(cls, kernel: Path) -> SiteResolver | None:
        """The resolver for ``kernel`` (a bzImage or a vmlinux), None without its vmlinux."""
        vmlinux = vmlinux_for(kernel) if kernel.is_file() else None
        return cls(vmlinux, vmlinux.parent) if vmlinux else None

    def start_loading(self) -> None:
        threading.Thread(target=self._preload, name="site-symbols", daemon=True).start()

    def _preload(self) -> None:
        with self._lock:
            self._elf_for(SiteKind.KERNEL, "")

    def resolve(self, site: RawSite) -> str | None:
        """``func+0xoff [module] file:line``, the raw site where the symbols do not know it,
        None for an unknown site."""
        if site.kind is SiteKind.UNKNOWN:
            return None
        with self._lock:
            if site not in self._cache:
                self._cache[site] = self._resolve(site)
            return self._cache[site]

    def _resolve(self, site: RawSite) -> str:
        elf = self._elf_for(site.kind, site.module)
        func = elf.function(site.kind, site.addr) if elf else None
        if func is None:
            return str(site)
        text = func if site.kind is SiteKind.KERNEL else f"{func} [{site.module}]"
        # A return address: the call instruction is the byte before it.
        line = elf.line(site.addr - 1) if elf else None
        return f"{text} {line}" if line else text

    def _elf_for(self, kind: SiteKind, module: str) -> ElfSymbols | None:
        if kind is SiteKind.KERNEL:
            if self._kernel is None:
                self._kernel = _load(self.vmlinux)
            return self._kernel
        if module not in self._module_symbols:
            path = self._module_paths().get(module)
            self._module_symbols[module] = _load(path) if path else None
        return self._module_symbols[module]

    def _module_paths(self) -> dict[str, Path]:
        if self._modules is None:
            found = self.modules_under.rglob("*.ko") if self.modules_under else ()
            # The kernel names a module after its file, with '-' as '_'.
            self._modules = {path.stem.replace("-", "_"): path for path in found}
        return self._modules


@functools.lru_cache(maxsize=8)
def _load(path: Path) -> ElfSymbols | None:
    """Symbols of ``path``, shared by the machines that boot the same build."""
    try:
        return ElfSymbols(path)
    except (OSError, ELFError) as err:
        log.warning("call sites: cannot read symbols from %s: %s", path, err)
        return None


def name_sites(module: TdxModule, kernel: Path) -> None:
    """Let ``module``'s trace name its call sites with ``kernel``'s symbols, when its vmlinux
    is at hand (raw addresses otherwise)."""
    resolver = SiteResolver.for_kernel(kernel)
    if resolver is not None:
        resolver.start_loading()
        module.resolve_site = resolver.resolve
