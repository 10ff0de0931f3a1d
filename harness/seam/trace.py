"""The SEAMCALL trace: one record per call, written as JSON lines, and a readable printer."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO

from harness.seam import abi

REGISTERS = ("rcx", "rdx", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rbx", "rdi", "rsi")


@dataclass(frozen=True)
class TraceRecord:
    seq: int
    time: float  # seconds since the module was created (host monotonic clock)
    boot: int  # how many HELLOs the module has seen: 0 before the first kernel spoke
    cpu: int  # APIC id
    fn: int
    leaf: str
    variant: int
    inputs: dict[str, int]
    outputs: dict[str, int]
    status: int
    status_name: str
    injected: str | None = None  # the fault rule that produced the status, if any
    note: str | None = None
    # Where the kernel issued the call (docs/transport.md, CALL sites): the caller of
    # __seamcall*() and that function's caller, "func+0xoff [module] file:line" or the raw site.
    site: str | None = None
    caller: str | None = None

    @property
    def number(self) -> int:
        return self.fn & abi.LEAF_NUMBER_MASK

    def to_json(self) -> str:
        data = asdict(self)
        data["status_hex"] = f"{self.status:#018x}"
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> TraceRecord:
        data = json.loads(line)
        data.pop("status_hex", None)
        return cls(**data)


@dataclass
class Trace:
    """In-memory trace, optionally mirrored line by line to a file as calls happen."""

    records: list[TraceRecord] = field(default_factory=list)
    sink: IO[str] | None = None
    start: float = field(default_factory=time.monotonic)
    last_line_at: int | None = field(default=None, repr=False)  # offset of the last record in sink

    def now(self) -> float:
        return time.monotonic() - self.start

    def append(self, record: TraceRecord) -> None:
        self.records.append(record)
        if self.sink is not None:
            self.last_line_at = self.sink.tell()
            self.sink.write(record.to_json() + "\n")
            self.sink.flush()

    def amend_last(self, note: str) -> TraceRecord:
        """Add ``note`` to the last record, and rewrite its line in the sink."""
        record = self.records[-1]
        amended = replace(record, note=f"{record.note}; {note}" if record.note else note)
        self.records[-1] = amended
        if self.sink is not None and self.last_line_at is not None:
            self.sink.seek(self.last_line_at)
            self.sink.truncate()
            self.sink.write(amended.to_json() + "\n")
            self.sink.flush()
        return amended

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    def of_leaf(self, leaf: abi.Leaf) -> list[TraceRecord]:
        return [r for r in self.records if r.number == leaf and not r.fn & abi.P_SEAMLDR_LEAF_BIT]

    def __iter__(self) -> Iterator[TraceRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def read_trace(path: Path) -> list[TraceRecord]:
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(TraceRecord.from_json(line))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}:{line_no}: not a trace record: {err}") from err
    return records


def format_record(record: TraceRecord) -> str:
    """One line per call: time, boot, CPU, leaf, the non-zero inputs, status, outputs."""
    args = " ".join(f"{k}={v:#x}" for k, v in record.inputs.items() if v)
    outs = " ".join(f"{k}={v:#x}" for k, v in record.outputs.items() if v)
    text = (f"{record.seq:5d} {record.time:9.3f}s boot{record.boot} cpu{record.cpu:<3d} "
            f"{record.leaf:<24s} {args or '-'} -> {record.status_name}")
    if outs:
        text += f" [{outs}]"
    if record.site:
        text += f"  at {record.site}" + (f" < {record.caller}" if record.caller else "")
    if record.injected:
        text += f"  (injected: {record.injected})"
    if record.note:
        text += f"  ({record.note})"
    return text
