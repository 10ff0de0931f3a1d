"""What a sweep runs: the call sites of a flow, read from one clean run's trace, and one run per
(site, occurrence, status).

A site is where the kernel issued the SEAMCALL: the caller of ``__seamcall*()`` and that
function's caller, as the trace names them (``read_sys_metadata_field+0x4b <
get_tdx_sys_info_version+0x1d``), so one wrapper called from many places is many sites. A run
fails one call: the ``nth`` call of its leaf since the module powered on, the counter
FaultRule.nth matches on; the run then checks that the call it failed came from its site (a
flow that took another path is reported, not classified).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from harness.seam import abi
from harness.seam.faults import FaultRule
from harness.seam.trace import TraceRecord
from harness.sweep.statuses import Injection, injections_for


class SiteChoice(enum.Enum):
    ALL = "all"  # every occurrence of every site
    FIRST = "first"  # the first occurrence of each site
    FIRST_AND_LOOP = "first-and-loop"  # and, where a site repeats, its second and its last


@dataclass(frozen=True)
class Target:
    """One call of the enumeration run that a sweep run fails."""

    site: str
    occurrence: int  # 1-based, among the calls from this site
    of: int  # how many calls the enumeration run made from this site
    leaf: int  # abi.leaf_key(): P-SEAMLDR leaves keep bit 63
    nth: int  # FaultRule.nth: the count of calls to this leaf, this one included
    seq: int  # the enumeration trace record

    @property
    def leaf_name(self) -> str:
        return abi.leaf_name(self.leaf)

    @property
    def function(self) -> str:
        """The C function of the site, without offset: what declared outcomes name."""
        return function_of(self.site)


@dataclass(frozen=True)
class Run:
    index: int
    target: Target
    injection: Injection

    @property
    def name(self) -> str:
        return f"{self.index:04d}"

    def rule(self) -> FaultRule:
        return FaultRule(leaf=self.target.leaf, status=self.injection.status, nth=self.target.nth, times=1)


def site_of(record: TraceRecord) -> str:
    """A record's site key; a call without a resolvable site is named by its leaf."""
    if not record.site:
        return f"{record.leaf} (no site)"
    return f"{record.site} < {record.caller}" if record.caller else record.site


def function_of(site: str) -> str:
    return site.split("+", 1)[0].split(" ", 1)[0]


def all_targets(records: Iterable[TraceRecord]) -> list[Target]:
    """Every call of the enumeration trace as a target, in call order."""
    per_leaf: dict[int, int] = {}
    per_site: dict[str, int] = {}
    found: list[tuple[TraceRecord, str, int, int]] = []
    for record in records:
        leaf = abi.leaf_key(record.fn)
        per_leaf[leaf] = per_leaf.get(leaf, 0) + 1
        site = site_of(record)
        per_site[site] = per_site.get(site, 0) + 1
        found.append((record, site, per_site[site], per_leaf[leaf]))
    return [Target(site, occurrence, per_site[site], abi.leaf_key(record.fn), nth, record.seq)
            for record, site, occurrence, nth in found]


def choose(targets: Sequence[Target], choice: SiteChoice) -> list[Target]:
    if choice is SiteChoice.ALL:
        return list(targets)
    keep = {1} if choice is SiteChoice.FIRST else None
    chosen = []
    for target in targets:
        wanted = keep if keep is not None else {1, 2, target.of}
        if target.occurrence in wanted:
            chosen.append(target)
    return chosen


def plan_runs(targets: Sequence[Target], classes: frozenset[str] | None = None) -> tuple[list[Run], list[str]]:
    """One run per target and status (``classes``: only those status classes); and, for the
    report, the leaves no run covers because no status table names them."""
    runs: list[Run] = []
    unswept: list[str] = []
    for target in targets:
        injections = injections_for(target.leaf)
        if not injections:
            if target.leaf_name not in unswept:
                unswept.append(target.leaf_name)
            continue
        for injection in injections:
            if classes is None or injection.klass.value in classes:
                runs.append(Run(len(runs), target, injection))
    return runs, unswept
