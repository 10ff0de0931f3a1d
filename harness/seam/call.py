"""A SEAMCALL as the software module receives it: the request (leaf, registers, calling CPU and
entry variant), the registers that variant really loads, and the call in flight that a leaf
handler reads its operands from and writes its outputs to."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from harness.seam.memory import PhysicalMemory
from harness.seam.sites import RawSite
from harness.seam.trace import REGISTERS

NR_REGS = len(REGISTERS)


class Variant(enum.IntEnum):
    """Which kernel entry issued the SEAMCALL (decides which outputs the kernel copies back)."""

    SEAMCALL = 0
    SEAMCALL_RET = 1
    SEAMCALL_SAVED_RET = 2


@dataclass(frozen=True)
class SeamcallRequest:
    cpu: int  # APIC id of the calling logical processor
    fn: int  # RAX: leaf number and version
    regs: tuple[int, ...] = (0,) * NR_REGS  # struct tdx_module_args order
    variant: Variant = Variant.SEAMCALL_RET
    sites: tuple[RawSite, ...] = ()  # where the kernel issued it (the shim's CALL sites)

    def __post_init__(self) -> None:
        if len(self.regs) != NR_REGS:
            raise ValueError(f"expected {NR_REGS} registers, got {len(self.regs)}")

    def reg(self, name: str) -> int:
        return self.regs[REGISTERS.index(name)]


# __seamcall and __seamcall_ret (arch/x86/virt/vmx/tdx/tdxcall.S) load RCX, RDX and R8-R11 from
# struct tdx_module_args; R12-R15, RBX, RDI and RSI then hold whatever the compiler left there.
# The module sees this value in them instead of the struct's, so a leaf that needs them fails
# unless the kernel used __seamcall_saved_ret.
UNLOADED_REGISTER = 0xDEAD_5EA3_CA11_0000
LOADED_BY_EVERY_VARIANT = 6  # rcx, rdx, r8, r9, r10, r11: the first six of REGISTERS


def loaded_registers(request: SeamcallRequest) -> int:
    """How many of REGISTERS (in order) the calling variant loads from the struct."""
    return NR_REGS if request.variant is Variant.SEAMCALL_SAVED_RET else LOADED_BY_EVERY_VARIANT


def as_loaded(request: SeamcallRequest) -> SeamcallRequest:
    """The request as the module receives it from the calling variant."""
    loaded = loaded_registers(request)
    unloaded = tuple(UNLOADED_REGISTER | i for i in range(loaded, NR_REGS))
    return dataclasses.replace(request, regs=request.regs[:loaded] + unloaded) if unloaded else request


@dataclass(frozen=True)
class SeamcallResult:
    status: int
    regs: tuple[int, ...]
    withheld: bool = False  # a fault rule keeps the RETURN from the guest


@dataclass
class Call:
    """One call in flight: request, memory, and the outputs being built."""

    request: SeamcallRequest
    memory: PhysicalMemory
    package: int | None
    outputs: dict[str, int] = field(default_factory=dict)
    note: str | None = None

    def reg(self, name: str) -> int:
        return self.request.reg(name)
