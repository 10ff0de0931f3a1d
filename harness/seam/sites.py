"""Call sites as the shim sends them with each CALL (docs/transport.md): where in the kernel a
SEAMCALL was issued, before the harness resolves it against the kernel's symbols."""

from __future__ import annotations

import enum
from dataclasses import dataclass

NR_SITES = 2  # the caller of __seamcall*(), and that function's caller


class SiteKind(enum.IntEnum):
    """What a site's address is relative to."""

    UNKNOWN = 0
    KERNEL = 1  # a vmlinux link address (the shim takes the KASLR offset off)
    MODULE_TEXT = 2  # an offset in the module's core text (MOD_TEXT)
    MODULE_INIT_TEXT = 3  # an offset in the module's init text (MOD_INIT_TEXT)


@dataclass(frozen=True)
class RawSite:
    kind: SiteKind
    addr: int  # a return address: the call instruction ends there
    module: str = ""

    def __str__(self) -> str:
        if self.kind is SiteKind.KERNEL:
            return f"{self.addr:#x}"
        where = "init+" if self.kind is SiteKind.MODULE_INIT_TEXT else ""
        return f"{where}{self.addr:#x} [{self.module}]"


NO_SITE = RawSite(SiteKind.UNKNOWN, 0)


def raw_site(site: RawSite) -> str | None:
    """A site without the kernel's symbols: its raw address (None for an unknown site)."""
    return None if site.kind is SiteKind.UNKNOWN else str(site)
