"""What a guest that died without a word left in its memory.

QEMU is told to pause at the guest's reset instead of exiting (`hold_at_reset`: QMP set-action
shutdown=pause; -no-reboot already turns a reset into a shutdown). The paused machine's memory
still holds the kernel's own variables: did it panic and on which CPU, who owned the nbcon
console, and its log buffer, with the records it wrote but never printed. Addresses come from the
kernel's vmlinux symbol table (pyelftools); without a vmlinux only the registers are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from harness.kernel.inspect import symbol_addresses, vmlinux_for
from harness.machine.qmp import Qmp

# struct console (include/linux/console.h, Linux 7.2/7.3, x86-64): name[16], seven callbacks,
# flags/index/cflag/ispeed/ospeed, seq, dropped, data, node, four nbcon callbacks, nbcon_state.
CONSOLE_NBCON_STATE = 160
SERIAL_CONSOLE = "univ8250_console"
PANIC_CPU_INVALID = 0xFFFFFFFF  # atomic_t panic_cpu = PANIC_CPU_INVALID (-1)
# The log buffer's text ring holds each record's text after an 8-byte id: printable runs of
# at least this many characters are the records' texts (and their dictionaries).
MIN_TEXT = 6
_TEXT = re.compile(rb"[\x20-\x7e]{%d,}" % MIN_TEXT)


@dataclass(frozen=True)
class NbconState:
    """struct nbcon_state: prio:2, req_prio:2, unsafe:1, unsafe_takeover:1, cpu:24."""
    prio: int  # 0 none, 1 normal, 2 emergency, 3 panic
    req_prio: int
    unsafe: bool
    unsafe_takeover: bool
    cpu: int

    @classmethod
    def decode(cls, atom: int) -> NbconState:
        return cls(atom & 3, (atom >> 2) & 3, bool(atom >> 4 & 1), bool(atom >> 5 & 1), atom >> 6 & 0xFFFFFF)

    def __str__(self) -> str:
        if not self.prio:
            return f"free (last owner CPU {self.cpu})"
        return (f"owned by CPU {self.cpu} at priority {self.prio}" + (", in an unsafe section" if self.unsafe else "")
                + (f", priority {self.req_prio} asks for it" if self.req_prio else ""))


@dataclass
class PostMortem:
    run_state: str
    registers: str
    panic_cpu: int | None  # None: not read (no vmlinux); -1: no panic
    console: NbconState | None
    log_text: list[str]

    def render(self) -> str:
        panic = "not read" if self.panic_cpu is None else \
            ("none" if self.panic_cpu < 0 else f"CPU {self.panic_cpu}")
        return "\n".join([f"QEMU run state: {self.run_state}", f"panic_cpu: {panic}",
                          f"serial console (nbcon): {self.console or 'not read'}",
                          f"== the kernel's log buffer, printed or not ({len(self.log_text)} texts, ring order)",
                          *self.log_text, "== info registers -a", self.registers])


def hold_at_reset(qmp: Qmp) -> None:
    """From now on the guest's reset pauses QEMU (run state "shutdown") instead of ending it."""
    qmp.command("set-action", shutdown="pause")


def kernel_symbols(kernel: Path) -> dict[str, int]:
    """The addresses examine() reads, from the vmlinux that goes with ``kernel`` (none without)."""
    vmlinux = vmlinux_for(kernel)
    return symbol_addresses(vmlinux, ("panic_cpu", "log_buf", "log_buf_len", SERIAL_CONSOLE)) if vmlinux else {}


def examine(qmp: Qmp, symbols: dict[str, int], scratch: Path) -> PostMortem:
    """Read a paused guest's state at ``symbols`` (kernel_symbols); ``scratch``: a file QEMU may
    write memory to."""
    registers = qmp.hmp("info registers -a")

    def read(address: int, size: int) -> bytes:
        val = address - (1 << 64) if address >= 1 << 63 else address  # QMP's "val" is an int64
        qmp.command("memsave", val=val, size=size, filename=str(scratch), **{"cpu-index": 0})
        return scratch.read_bytes()

    def word(name: str, offset: int = 0, size: int = 4) -> int | None:
        return int.from_bytes(read(symbols[name] + offset, size), "little") if name in symbols else None

    panic_cpu = word("panic_cpu")
    state = word(SERIAL_CONSOLE, CONSOLE_NBCON_STATE)
    buffer, length = word("log_buf", size=8), word("log_buf_len")
    texts = [run.decode() for run in _TEXT.findall(read(buffer, length))] if buffer and length else []
    scratch.unlink(missing_ok=True)
    return PostMortem(qmp.status(), registers,
                      None if panic_cpu is None else (-1 if panic_cpu == PANIC_CPU_INVALID else panic_cpu),
                      None if state is None else NbconState.decode(state), texts)
