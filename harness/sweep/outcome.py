"""A sweep run's outcome: one class from what the run left behind, a pure function of its
evidence (the kernel log, the trace around the failed call, the module's and the guest's
accounting, whether the machine still answered).

The classes, most severe first (a run that panicked after a WARN is a panic):
panic, hang, oops (oops, BUG, KASAN), WARN, leak, inconsistent (the kernel believes a state the
module does not have), silent (the failure swallowed with no message where the kernel promises
one), clean (an errno or a message, the system usable, nothing leaked); and, outside the
kernel's outcomes, missed (the failed call was not the targeted one: the flow took another path)
and error (the harness could not finish the run).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from harness.observe.crash import Crash
from harness.observe.crash import classify as classify_crashes
from harness.observe.dmesg import Record
from harness.seam import abi
from harness.seam.trace import TraceRecord
from harness.sweep.plan import site_of


class Outcome(enum.Enum):
    PANIC = "panic"
    HANG = "hang"
    OOPS = "oops"
    WARN = "WARN"
    LEAK = "leak"
    INCONSISTENT = "inconsistent"
    SILENT = "silent"
    CLEAN = "clean"
    MISSED = "missed"
    ERROR = "error"


# What a sweep reports as findings unless declared; missed and error runs are the harness's.
FINDINGS = frozenset({Outcome.PANIC, Outcome.HANG, Outcome.OOPS, Outcome.WARN, Outcome.LEAK,
                      Outcome.INCONSISTENT, Outcome.SILENT})
_CRASH_OUTCOMES = ((Outcome.PANIC, frozenset({Crash.PANIC})),
                   (Outcome.OOPS, frozenset({Crash.OOPS, Crash.BUG, Crash.KASAN})),
                   (Outcome.WARN, frozenset({Crash.WARN})))
LOG_LINES = 12  # kernel lines a verdict keeps to show what it is based on


@dataclass(frozen=True)
class Evidence:
    target_site: str
    records: Sequence[Record]  # the kernel log since the flow began: /dev/kmsg, or the console if the shell died
    usable: bool  # the shell answered a command after the flow
    injected: TraceRecord | None  # the call the fault rule failed (None: it never fired)
    after: Sequence[TraceRecord] = ()  # the calls that came after it
    hang_report: str | None = None  # the emulator's view of the CPUs, when the guest stopped answering
    leaks: Sequence[str] = ()  # what the flow found still held: module ownership, guest pages
    inconsistencies: Sequence[str] = ()  # kernel belief vs module state, as the flow compared them
    # The lines by which the kernel says this failure happened (flow-specific: for TDX init,
    # "SEAMCALL (...) failed", "TDX-Module initialization failed", "module not loaded").
    reported_by: Sequence[re.Pattern[str]] = ()
    error: str | None = None  # the harness could not finish the run
    told: Sequence[str] = ()  # what user space was told (an ioctl's errno): a failure reported that way is not silent


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reasons: tuple[str, ...] = ()
    lines: tuple[str, ...] = field(default=())  # the kernel lines that show it

    @property
    def finding(self) -> bool:
        return self.outcome in FINDINGS


def retried(evidence: Evidence) -> bool:
    """The kernel called the same leaf from the same place again, and that call succeeded: the
    failure was absorbed (sc_retry() for TDX_RND_NO_ENTROPY, KVM's busy loops)."""
    injected = evidence.injected
    if injected is None:
        return False
    return any(r.fn == injected.fn and r.site == injected.site and r.caller == injected.caller
               and r.status == abi.Status.TDX_SUCCESS for r in evidence.after)


def classify(evidence: Evidence) -> Verdict:
    if evidence.error is not None:
        return Verdict(Outcome.ERROR, (evidence.error,))
    injected = evidence.injected
    if injected is None:
        return Verdict(Outcome.MISSED, ("the fault rule never fired: the flow made fewer calls of this leaf",))
    seen = site_of(injected)
    if seen != evidence.target_site:
        return Verdict(Outcome.MISSED, (f"the failed call came from {seen}, not {evidence.target_site}",))
    records = evidence.records
    crashes = classify_crashes(records)
    for outcome, kinds in _CRASH_OUTCOMES:
        if outcome is Outcome.WARN and not evidence.usable:
            break  # a hang outranks a WARN; a panic or an oops is the hang's cause
        if (hit := [f for f in crashes if f.kind in kinds]):
            if outcome is Outcome.WARN and evidence.leaks:
                # KVM WARNs on purpose (TDX_BUG_ON()) for statuses it deems impossible; what it
                # leaves behind then is the news.
                return _verdict(Outcome.LEAK, evidence.leaks[0], records, hit[0].record,
                                (*evidence.leaks[1:], f"after {hit[0].record.text}"))
            extra = () if evidence.usable else ("and the guest stopped answering",)
            return _verdict(outcome, hit[0].record.text, records, hit[0].record, extra)
    if not evidence.usable:
        reasons = ["the guest stopped answering on the command channel"]
        if evidence.hang_report:
            reasons.append(f"guest state: {evidence.hang_report}")
        return Verdict(Outcome.HANG, tuple(reasons), _tail(records))
    if evidence.leaks:
        return Verdict(Outcome.LEAK, tuple(evidence.leaks), _tail(records))
    if evidence.inconsistencies:
        return Verdict(Outcome.INCONSISTENT, tuple(evidence.inconsistencies), _tail(records))
    if retried(evidence):
        return Verdict(Outcome.CLEAN, ("retried: a later call from the same site succeeded",))
    said = [r for r in records if any(p.search(r.text) for p in evidence.reported_by)]
    if evidence.told and not said:
        return Verdict(Outcome.CLEAN, tuple(f"user space: {t}" for t in evidence.told[:3]), _tail(records))
    if not said and injected.status != abi.Status.TDX_SUCCESS:
        return Verdict(Outcome.SILENT, (f"{injected.status_name} at {seen}: no errno reached user space and the "
                                        f"kernel printed none of the flow's failure messages",), _tdx_lines(records))
    return Verdict(Outcome.CLEAN, tuple(f"kernel: {r.text}" for r in said[:3]), tuple(r.text for r in said[:LOG_LINES]))


def _verdict(outcome: Outcome, headline: str, records: Sequence[Record], first: Record,
             extra: tuple[str, ...] = ()) -> Verdict:
    at = next((i for i, r in enumerate(records) if r is first), 0)
    return Verdict(outcome, (headline, *extra), tuple(r.text for r in records[max(0, at - 2):at + LOG_LINES - 2]))


def _tdx_lines(records: Sequence[Record]) -> tuple[str, ...]:
    """The TDX host code's last lines (what it did say), else the log's tail."""
    said = [r for r in records if "tdx" in r.text.lower()]
    return _tail(said or records)


def _tail(records: Sequence[Record]) -> tuple[str, ...]:
    return tuple(r.text for r in records[-LOG_LINES:])
