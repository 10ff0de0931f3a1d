"""Kernel log records from the console, and a timeline to assert on: ordered expectations and
marks, with failures that show what was expected, what came instead, and the lines around it.
Parsing never raises on odd input: unparsable lines are simply not kernel records."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

PRINTK = re.compile(r"^\[\s*(?P<time>\d+\.\d+)\](?:\[\s*[TC]\d+\])? ?(?P<text>.*)$")
CONTEXT_LINES = 6


@dataclass(frozen=True)
class Record:
    index: int  # position in the timeline
    time: float  # seconds since boot (printk time)
    text: str
    boot: int  # 0 for the first kernel; +1 each time the printk clock restarts (reboot, kexec)
    seq: int | None = None  # /dev/kmsg only: the kernel's record sequence number
    level: int | None = None  # /dev/kmsg only: loglevel 0 (emerg) .. 7 (debug)


def parse_console(lines: Iterable[str]) -> list[Record]:
    """Kernel records from console lines (printk prefix required)."""
    records: list[Record] = []
    boot, last_time = 0, -1.0
    for line in lines:
        match = PRINTK.match(line.strip("\r\n"))
        if match is None:
            continue
        stamp = float(match["time"])
        if stamp < last_time - 1.0:  # the clock went back: a new kernel is printing
            boot += 1
        last_time = stamp
        records.append(Record(len(records), stamp, match["text"], boot))
    return records


# /dev/kmsg: "<facility*8+level>,<seq>,<usec>,<flags>[,more];<text>"; continuation lines (key=value
# dictionary entries) start with a space; non-printable bytes in the text arrive as \xHH.
KMSG = re.compile(r"^(?P<prio>\d+),(?P<seq>\d+),(?P<usec>\d+),[^;]*;(?P<text>.*)$")
_KMSG_ESCAPE = re.compile(r"\\x([0-9a-f]{2})")


@dataclass
class KmsgDump:
    """A /dev/kmsg dump read from the console: its records, and what shows that it lost bytes on
    the way (kept as a guard; a console that dropped bytes is in docs/NOTES.md, console section)."""
    records: list[Record]
    damage: list[str]  # lines that are neither records nor continuations; sequence gaps


def read_kmsg(lines: Iterable[str]) -> KmsgDump:
    """Kernel records as /dev/kmsg gives them (tdxh-kmsg in the guest prints them)."""
    records: list[Record] = []
    damage: list[str] = []
    boot, last_seq = 0, -1
    for raw in lines:
        line = raw.rstrip("\r\n")
        match = KMSG.match(line)
        if match is None:
            if line and not line.startswith(" "):  # continuation lines start with a space
                damage.append(f"not a record: {line[:80]!r}")
            continue
        seq = int(match["seq"])
        if seq <= last_seq:  # numbering restarted: a new kernel
            boot += 1
        elif records and seq != last_seq + 1:
            damage.append(f"records {last_seq + 1}..{seq - 1} missing")
        last_seq = seq
        text = _KMSG_ESCAPE.sub(lambda m: chr(int(m[1], 16)), match["text"])
        records.append(Record(len(records), int(match["usec"]) / 1e6, text, boot, seq=seq,
                              level=int(match["prio"]) & 7))
    return KmsgDump(records, damage)


class TimelineError(AssertionError):
    """An expectation on the kernel log failed; the message is meant to be read in a test report."""


@dataclass
class Timeline:
    records: list[Record]
    source: Path | None = None  # the console log, named in failures

    @classmethod
    def from_console(cls, lines: Iterable[str], source: Path | None = None) -> Timeline:
        return cls(parse_console(lines), source)

    @classmethod
    def from_kmsg(cls, lines: Iterable[str], source: Path | None = None) -> Timeline:
        return cls(read_kmsg(lines).records, source)

    def find(self, pattern: re.Pattern[str], start: int = 0) -> Record | None:
        return next((r for r in self.records[start:] if pattern.search(r.text)), None)

    def all(self, pattern: re.Pattern[str]) -> list[Record]:
        return [r for r in self.records if pattern.search(r.text)]

    def matches(self, pattern: re.Pattern[str]) -> list[re.Match[str]]:
        """Every record's match of ``pattern``, in order."""
        return [m for m in map(pattern.search, (r.text for r in self.records)) if m]

    def since(self, mark: int) -> Timeline:
        return Timeline(self.records[mark:], self.source)

    def mark(self) -> int:
        return len(self.records)

    def expect(self, pattern: re.Pattern[str]) -> re.Match[str]:
        for record in self.records:
            match = pattern.search(record.text)
            if match:
                return match
        raise TimelineError(self._explain(f"expected a kernel message matching {pattern.pattern!r}; none came",
                                          len(self.records)))

    def expect_absent(self, pattern: re.Pattern[str]) -> None:
        record = self.find(pattern)
        if record is not None:
            raise TimelineError(self._explain(f"unexpected kernel message matching {pattern.pattern!r}",
                                              record.index - self.records[0].index))

    def expect_in_order(self, patterns: Sequence[re.Pattern[str]]) -> list[Record]:
        """Each pattern must match a record after the previous one's match."""
        found: list[Record] = []
        position = 0
        for step, pattern in enumerate(patterns, 1):
            record = self.find(pattern, position)
            if record is None:
                earlier = self.find(pattern)
                why = (f"it came earlier, at {earlier.time:.6f}s, before step {step - 1}" if earlier
                       else "it never came")
                raise TimelineError(self._explain(
                    f"step {step} of {len(patterns)}: expected {pattern.pattern!r} after "
                    f"{found[-1].text!r}; {why}" if found else
                    f"step 1 of {len(patterns)}: expected {pattern.pattern!r}; {why}", position))
            found.append(record)
            position = self.records.index(record) + 1
        return found

    def _explain(self, headline: str, around: int) -> str:
        lo, hi = max(0, around - CONTEXT_LINES), min(len(self.records), around + CONTEXT_LINES)
        context = "\n".join(f"  [{r.time:12.6f}] {r.text}" for r in self.records[lo:hi]) or "  (no kernel records)"
        where = f"\nconsole log: {self.source}" if self.source else ""
        return f"{headline}\nkernel log around it:\n{context}{where}"
