"""Copying the gcov counters out of a guest before each of its kernels ends.

The guest's debugfs shows one ``.gcda`` per profiled object (``/sys/kernel/debug/gcov/<build
dir>/<object>.gcda``), generated from the live counters at each read. The dump copies each file
to tmpfs first (one read: the copy and its checksum agree even while the counters run on), then
prints its length and MD5 and the gzip'd copy in base64 over the command channel. The harness
decodes and checks both; a damaged copy is never written: it becomes a blind spot, and the
error names it (the channel carries exactly what the guest printed, so damage is a defect).

One kernel's counters only grow, so each kernel (``k<N>``, counted per machine: a reboot, kexec
or crash dump starts the next) keeps its last snapshot. What runs after the last snapshot of a
kernel (its shutdown, kexec or crash path) dies with it: a named blind spot, as is a kernel
that ended without any snapshot (a panic nobody saw coming).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.coverage.objects import GUEST_GCOV_ROOT, PROFILED, CoverageBuild
from harness.machine.base import Machine, MachineError
from harness.machine.channel import ChannelError

log = logging.getLogger("harness.coverage")

EVENTS_FILE = "events.json"
MARK = "TDXH-GCDA"
END = "TDXH-GCDA-END"
# A few hundred KB of base64 over the command channel; Bochs moves it far slower than QEMU.
DUMP_TIMEOUT = 600.0
SCRATCH = "/tmp/tdxh.gcda"
LOCKDOWN = "/sys/kernel/security/lockdown"


class CoverageError(Exception):
    """The guest's counters could not be read; the message says what was seen."""


@dataclass(frozen=True)
class GcdaCopy:
    """One counter file as the guest printed it: its debugfs path, what its length and MD5 were
    in the guest, and the bytes the command channel delivered."""

    path: str
    length: int
    md5: str
    data: bytes | None  # None: the base64 or gzip stream itself was damaged

    @property
    def intact(self) -> bool:
        data = self.data
        return data is not None and len(data) == self.length and hashlib.md5(data).hexdigest() == self.md5


def dump_command(root: str = GUEST_GCOV_ROOT) -> str:
    """The guest command printing every counter file under ``root``."""
    return (f"for f in $(find {root} -name '*.gcda'); do cat $f > {SCRATCH} || continue; "
            f'echo "{MARK} $f $(wc -c < {SCRATCH}) $(md5sum < {SCRATCH})"; gzip -c {SCRATCH} | base64; done; '
            f"rm -f {SCRATCH}; echo {END}")


_HEADER = re.compile(rf"^{MARK} (\S+) +(\d+) +([0-9a-f]{{32}})\b")


def parse_dump(output: str) -> list[GcdaCopy]:
    """The files of a dump's output. Raises CoverageError when the dump did not finish."""
    lines = output.splitlines()
    if END not in (line.strip() for line in lines):
        raise CoverageError(f"the counter dump did not finish ({END} missing); its output ends: {output[-300:]!r}")
    copies: list[GcdaCopy] = []
    current: re.Match[str] | None = None
    body: list[str] = []

    def close() -> None:
        if current is not None:
            copies.append(GcdaCopy(current[1], int(current[2]), current[3], _decode("".join(body))))

    for line in lines:
        header = _HEADER.match(line.strip())
        if header or line.strip() == END:
            close()
            current, body = header, []
        elif current is not None:
            body.append(line.strip())
    return copies


def _decode(text: str) -> bytes | None:
    try:
        return gzip.decompress(base64.b64decode(text, validate=True))
    except (binascii.Error, OSError, EOFError, ValueError):
        return None


def object_of(guest_path: str) -> str | None:
    """The profiled object a debugfs counter file belongs to, or None (not one of ours)."""
    for obj in PROFILED:
        if guest_path.endswith("/" + str(Path(obj).with_suffix(".gcda"))):
            return obj
    return None


def read_counters(machine: Machine, build: CoverageBuild) -> dict[str, bytes]:
    """{object: its .gcda bytes} from the running kernel, every copy checked. Raises
    CoverageError when the kernel has none of this build's counters or a copy stays damaged."""
    copies = parse_dump(machine.run(dump_command(), DUMP_TIMEOUT).output)
    ours = {c.path: c for c in copies if object_of(c.path)}
    if not ours:
        # Lockdown (integrity and up) closes debugfs: a kernel booted with lockdown= keeps its
        # counters to itself.
        lockdown = machine.run(f"cat {LOCKDOWN} 2>/dev/null", DUMP_TIMEOUT).output.strip() or "no lockdown LSM"
        raise CoverageError(f"the guest has no gcov counters of the TDX host objects under {GUEST_GCOV_ROOT} "
                            f"(files seen: {[c.path for c in copies][:10]}; lockdown: {lockdown}): not a coverage "
                            "kernel, or debugfs closed by lockdown")
    foreign = [path for path in ours if not path.startswith(build.guest_prefix() + "/")]
    if foreign:
        raise CoverageError(f"the guest's counters belong to a kernel built elsewhere ({foreign[0]}), not to "
                            f"{build.build_dir}: the booted kernel is not this coverage build")
    damaged = [path for path, copy in ours.items() if not copy.intact]
    if damaged:
        raise CoverageError(f"counter copies damaged (length or MD5 differ from the guest's): {damaged}; "
                            f"the dump is in {machine.run_dir / 'commands.log'}")
    return {object_of(path) or path: copy.data or b"" for path, copy in ours.items()}


@dataclass
class KernelRecord:
    """What became of one kernel of a machine: its snapshots, how it ended, its blind spots."""

    kernel: int
    snapshots: list[str] = field(default_factory=list)  # why each snapshot was taken
    ended_by: str | None = None
    blind: list[str] = field(default_factory=list)


@dataclass
class MachineRecord:
    name: str
    kernels: list[KernelRecord] = field(default_factory=list)

    def current(self) -> KernelRecord:
        if not self.kernels or self.kernels[-1].ended_by is not None:
            self.kernels.append(KernelRecord(len(self.kernels)))
        return self.kernels[-1]


class ScenarioCoverage:
    """The counters of one scenario's machines under ``raw/<scenario>/`` (a directory name; the
    report names the scenario by ``label``): attach() each machine when it starts, finish() it at
    the scenario's end (before it is stopped)."""

    def __init__(self, root: Path, scenario: str, build: CoverageBuild, label: str = "") -> None:
        self.dir = root / "raw" / scenario
        self.scenario, self.build = scenario, build
        self.label = label or scenario  # what the report calls it: the pytest node id
        self.machines: dict[int, MachineRecord] = {}
        self.seconds = 0.0  # spent dumping: what coverage costs the scenario

    def attach(self, machine: Machine, name: str) -> None:
        self.machines[id(machine)] = MachineRecord(name)
        machine.on_kernel_end(self._kernel_ends)

    def _kernel_ends(self, machine: Machine, why: str) -> None:
        record = self.machines[id(machine)]
        kernel = record.current()
        if machine.shell_ready:
            self._snapshot(machine, record, kernel, why)
        else:
            kernel.blind.append(f"the whole kernel: its shell never answered before the {why}")
        kernel.ended_by = why
        kernel.blind.append(f"the {why} path, after the last snapshot: its counters die with the kernel")
        self._write_events()

    def finish(self, machine: Machine) -> None:
        """The scenario is over: snapshot the kernel still running, or name what was lost."""
        record = self.machines[id(machine)]
        if machine.alive() and machine.shell_ready:
            kernel = record.current()
            self._snapshot(machine, record, kernel, "end of scenario")
            kernel.ended_by = "end of scenario"
        elif not record.kernels or record.kernels[-1].ended_by is None:
            kernel = record.current()
            kernel.ended_by = f"no snapshot (machine {machine.state.value}, shell ready: {machine.shell_ready})"
            kernel.blind.append("the whole kernel: it ended (panic, power-off, hang) or never reached its shell "
                                "before its counters were read")
        self._write_events()

    def _snapshot(self, machine: Machine, record: MachineRecord, kernel: KernelRecord, why: str) -> None:
        start = time.monotonic()
        try:
            counters = read_counters(machine, self.build)
        except (CoverageError, ChannelError, MachineError) as err:
            log.warning("%s: no counters of kernel %d (%s): %s", self.scenario, kernel.kernel, why, err)
            kernel.blind.append(f"the counters at '{why}' could not be read: {err}")
            return
        finally:
            self.seconds += time.monotonic() - start
        target = self.dir / record.name / f"k{kernel.kernel}"
        for obj, data in counters.items():
            path = target / Path(obj).with_suffix(".gcda")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        kernel.snapshots.append(why)
        log.info("%s: counters of %s kernel %d at '%s' (%d files, %.1f s)", self.scenario, record.name,
                 kernel.kernel, why, len(counters), time.monotonic() - start)

    def _write_events(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"scenario": self.label, "dump_seconds": round(self.seconds, 3),
                "machines": [asdict(m) for m in self.machines.values()]}
        (self.dir / EVENTS_FILE).write_text(json.dumps(data, indent=1) + "\n")
