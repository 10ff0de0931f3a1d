"""Crash classification of a kernel log: every record that shows the kernel in trouble, by kind.
A scenario states which kinds it provokes; anything else fails it. A pure function over records:
never raises on odd input."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from harness.observe import patterns
from harness.observe.dmesg import Record


class Crash(enum.Enum):
    PANIC = "panic"
    KASAN = "KASAN"
    LOCKDEP = "lockdep"
    OOPS = "oops"
    BUG = "BUG"
    WARN = "WARN"
    HUNG_TASK = "hung task"
    MCE = "machine check"
    UNCHECKED_MSR = "unchecked MSR access"
    SEAMCALL_FAILED = "SEAMCALL failed"
    TDX_INIT_FAILED = "TDX init failed"
    MODULE_UNREACHABLE = "software module unreachable"  # the shim's exchange failed: harness trouble
    SEAMCALL_UD = "SEAMCALL outside VMX operation"  # #UD on hardware: a kernel bug
    WIRE_TAKEOVER = "COM2 taken from a stopped CPU"  # the shim broke a stopped CPU's exchange


# First match wins, so the specific kinds come before the generic ones ("BUG: KASAN:" is KASAN).
RULES: tuple[tuple[Crash, re.Pattern[str]], ...] = (
    (Crash.PANIC, re.compile(r"Kernel panic - not syncing")),
    (Crash.KASAN, re.compile(r"BUG: KASAN: ")),
    (Crash.LOCKDEP, re.compile(r"possible recursive locking detected|possible circular locking dependency"
                               r"|inconsistent lock state|suspicious RCU usage|BUG: sleeping function called")),
    (Crash.OOPS, re.compile(r"^Oops: |general protection fault|BUG: unable to handle page fault")),
    (Crash.BUG, re.compile(r"kernel BUG at |^BUG: ")),
    (Crash.WARN, re.compile(r"^WARNING: CPU: \d+ PID: \d+ at |^WARNING: .* at ")),
    (Crash.HUNG_TASK, re.compile(r"INFO: task .+ blocked for more than \d+ seconds")),
    (Crash.MCE, re.compile(r"mce: \[Hardware Error\]|Machine check events logged")),
    (Crash.UNCHECKED_MSR, re.compile(r"unchecked MSR access error")),
    (Crash.SEAMCALL_FAILED, patterns.SEAMCALL_FAILED),
    (Crash.SEAMCALL_FAILED, patterns.SYS_DISABLE_FAILED),
    (Crash.TDX_INIT_FAILED, patterns.INIT_FAILED),
    (Crash.MODULE_UNREACHABLE, patterns.SHIM_EXCHANGE_FAILED),
    (Crash.MODULE_UNREACHABLE, patterns.SHIM_PEER_DEAD),
    (Crash.MODULE_UNREACHABLE, patterns.SHIM_HELLO_REFUSED),
    (Crash.SEAMCALL_UD, patterns.SHIM_SEAMCALL_UD),
    (Crash.WIRE_TAKEOVER, patterns.SHIM_WIRE_TAKEOVER),
)


@dataclass(frozen=True)
class Finding:
    kind: Crash
    record: Record

    def __str__(self) -> str:
        return f"{self.kind.value}: [{self.record.time:12.6f}] {self.record.text}"


def classify(records: Iterable[Record]) -> list[Finding]:
    findings = []
    for record in records:
        for kind, rule in RULES:
            if rule.search(record.text):
                findings.append(Finding(kind, record))
                break
    return findings


def unexpected(findings: Iterable[Finding], allowed: Iterable[Crash] = ()) -> list[Finding]:
    allow = set(allowed)
    return [finding for finding in findings if finding.kind not in allow]
