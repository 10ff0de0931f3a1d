"""Records of what a peer got wrong, kept within bounds: a hostile or broken guest can send bad
input without end, so the harness keeps a count of everything and only the first reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar, overload

MAX_REPORTS = 100  # reports kept per record; later ones are only counted

T = TypeVar("T")


class FirstReports(Sequence[T], Generic[T]):
    """The first ``limit`` reports (how the trouble started), the number of all of them, and the
    latest (whether it went on). Reads like a list of the kept reports."""

    def __init__(self, limit: int = MAX_REPORTS) -> None:
        self.limit = limit
        self.kept: list[T] = []
        self.total = 0
        self.last: T | None = None

    def append(self, report: T) -> bool:
        """Count ``report`` and keep it while there is room; returns whether it was kept."""
        self.total += 1
        self.last = report
        if len(self.kept) >= self.limit:
            return False
        self.kept.append(report)
        return True

    @property
    def dropped(self) -> int:
        return self.total - len(self.kept)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[T]: ...

    def __getitem__(self, index: int | slice) -> T | Sequence[T]:
        return self.kept[index]

    def __len__(self) -> int:
        return len(self.kept)

    def __repr__(self) -> str:
        return f"FirstReports({self.kept!r}, total={self.total})"
