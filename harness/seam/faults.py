"""Fault plans: declarative rules that make chosen SEAMCALLs fail with a chosen status.

A rule matches on the leaf and optionally the nth call of that leaf, the calling CPU, its
package or the RDX input (a metadata field id for TDH.SYS.RD); when it matches, the call is not
executed and the rule's status is returned, as when the real module rejects a call before doing
any work. ``times`` bounds how often a rule fires ("busy for N calls", "entropy failure N times").
A ``withhold`` rule instead lets the call run and never sends its answer (``withheld()``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.seam import abi


@dataclass(frozen=True)
class FaultRule:
    leaf: int | None  # None: any leaf
    status: int
    nth: int | None = None  # 1-based count of calls to this leaf (since the module powered on)
    cpu: int | None = None  # APIC id
    package: int | None = None
    rdx: int | None = None
    times: int | None = None  # None: every matching call
    withhold: bool = False  # run the leaf, send no RETURN (status unused)

    def __post_init__(self) -> None:
        if self.nth is not None and self.nth < 1:
            raise ValueError(f"nth is 1-based, got {self.nth}")
        if self.times is not None and self.times < 1:
            raise ValueError(f"times must be >= 1, got {self.times}")

    def describe(self) -> str:
        where = [f"{k}={v}" for k, v in (("nth", self.nth), ("cpu", self.cpu), ("package", self.package),
                                          ("rdx", None if self.rdx is None else hex(self.rdx)),
                                          ("times", self.times)) if v is not None]
        leaf = "any leaf" if self.leaf is None else abi.leaf_name(self.leaf)
        outcome = "answer withheld" if self.withhold else abi.status_name(self.status, self.leaf or 0)
        return f"{leaf} -> {outcome} [{', '.join(where) or 'every call'}]"


def busy(leaf: int, calls: int, operand: abi.OperandId | None = None, **match: Any) -> FaultRule:
    """The leaf reports TDX_OPERAND_BUSY for ``calls`` matching calls, then works. ``operand``
    names the contended resource as the module does (e.g. ``OperandId.SEPT`` for the S-EPT
    tree, ``TD_EPOCH`` for TDH.MEM.TRACK, ``KOT`` for the KeyID table, ``RCX`` for an operand)."""
    status = abi.Status.TDX_OPERAND_BUSY if operand is None else abi.with_operand(abi.Status.TDX_OPERAND_BUSY, operand)
    return FaultRule(leaf=leaf, status=status, times=calls, **match)


def no_entropy(leaf: int, calls: int, **match: Any) -> FaultRule:
    """RDRAND/RDSEED inside the module fail ``calls`` times (TDX_RND_NO_ENTROPY)."""
    return FaultRule(leaf=leaf, status=abi.Status.TDX_RND_NO_ENTROPY, times=calls, **match)


def withheld(leaf: int, calls: int = 1, **match: Any) -> FaultRule:
    """The leaf runs but its RETURN is never sent, so the calling CPU stays inside its SEAMCALL,
    holding the shim's wire, until its deadline (tdx_sw_module.timeout_ms). It makes a window the
    shim really has deterministic: its exchange takes milliseconds, so a crash NMI or a broadcast
    #MC can stop a CPU in the middle of one, where on hardware the SEAMCALL would have completed."""
    return FaultRule(leaf=leaf, status=abi.Status.TDX_SUCCESS, times=calls, withhold=True, **match)


def not_loaded() -> FaultRule:
    """As if no module were loaded in the SEAM range: every SEAMCALL fails VMfailInvalid."""
    return FaultRule(leaf=None, status=abi.Status.TDX_SEAMCALL_VMFAILINVALID)


@dataclass
class FaultPlan:
    """Ordered rules; the first that matches a call fires. Rules can be added between steps."""

    rules: list[FaultRule] = field(default_factory=list)
    fired: dict[int, int] = field(default_factory=dict)  # rule index -> times fired

    def add(self, rule: FaultRule) -> None:
        self.rules.append(rule)

    def clear(self) -> None:
        self.rules.clear()
        self.fired.clear()

    def match(self, leaf: int, nth: int, cpu: int, package: int | None, rdx: int) -> FaultRule | None:
        for index, rule in enumerate(self.rules):
            if rule.leaf is not None and rule.leaf != leaf:
                continue
            if rule.nth is not None and rule.nth != nth:
                continue
            if rule.cpu is not None and rule.cpu != cpu:
                continue
            if rule.package is not None and rule.package != package:
                continue
            if rule.rdx is not None and rule.rdx != rdx:
                continue
            if rule.times is not None and self.fired.get(index, 0) >= rule.times:
                continue
            self.fired[index] = self.fired.get(index, 0) + 1
            return rule
        return None

    def to_json(self) -> str:
        return json.dumps([asdict(rule) for rule in self.rules], indent=2)

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        try:
            items = json.loads(text)
            return cls(rules=[FaultRule(**item) for item in items])
        except (ValueError, TypeError) as err:
            raise ValueError(f"bad fault plan: {err}") from err

    @classmethod
    def load(cls, path: Path) -> FaultPlan:
        return cls.from_json(path.read_text())
