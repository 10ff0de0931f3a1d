"""Who holds the guest's pages, from the kernel's page owner tracking (CONFIG_PAGE_OWNER, booted
with ``page_owner=on``): debugfs ``page_owner_stacks/show_stacks`` lists every allocation stack
with the base pages it still holds (mm/page_owner.c stack_print(): the frames, one per line, then
``nr_base_pages: N``). A pure parser; the command that reads it lives here too."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

APPEND = "page_owner=on"
SHOW_STACKS = "/sys/kernel/debug/page_owner_stacks/show_stacks"
_PAGES = re.compile(r"^nr_base_pages: (?P<n>\d+)$")
_FRAME = re.compile(r"^\s*(?P<func>[\w.]+)\+0x[0-9a-f]+/0x[0-9a-f]+")


@dataclass(frozen=True)
class Stack:
    functions: tuple[str, ...]  # innermost first, as printed
    pages: int

    def through(self, prefixes: Iterable[str]) -> bool:
        """A frame whose function starts with one of ``prefixes`` (alloc_contig matches
        alloc_contig_pages_noprof; a static function GCC specialised, tdx_enable.cold...)."""
        return any(f.startswith(tuple(prefixes)) for f in self.functions)


def parse_stacks(lines: Iterable[str]) -> list[Stack]:
    stacks: list[Stack] = []
    frames: list[str] = []
    for line in lines:
        if (count := _PAGES.match(line.strip())) is not None:
            stacks.append(Stack(tuple(frames), int(count["n"])))
            frames = []
        elif (frame := _FRAME.match(line)) is not None:
            frames.append(frame["func"])
    return stacks


def pages_held(stacks: Sequence[Stack], allocator: Iterable[str], callers: Iterable[str]) -> int:
    """Base pages still held by allocations made through ``allocator`` from ``callers`` (function
    name prefixes: alloc_contig_pages() called from tdx_enable())."""
    allocator, callers = tuple(allocator), tuple(callers)
    return sum(s.pages for s in stacks if s.through(allocator) and s.through(callers))
