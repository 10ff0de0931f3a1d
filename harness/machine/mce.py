"""Machine checks: one description of an MCA bank error, rendered for both ways of raising it in
the guest.

- QEMU's HMP ``mce`` command loads the bank registers of a virtual CPU and delivers a real #MC
  (``-b``: every other CPU gets one too, as a broadcast machine check on Intel hardware).
- Linux's mce-inject debugfs files (``/sys/kernel/debug/mce-inject``): ``sw`` only logs the
  record (``mce_log()``: decoding, no #MC handler, so never ``mce_panic()``); ``hw`` writes the
  bank MSRs on the chosen CPU and raises ``int $18`` there, so ``do_machine_check()`` runs.
  mce-inject builds MCG_STATUS itself (MCIP|EIPV, plus RIPV unless PCC) and adds VAL, and MISCV
  when MISC is non-zero: the description's ``mcg_status`` only reaches the guest through HMP.

Bit names follow the Intel SDM, Vol. 3B, chapter 16 ("IA32_MCi_STATUS", "IA32_MCG_STATUS",
"IA32_MCi_MISC"). The decoding rules Linux applies (mce_is_memory_error(), the Intel
mce_usable_address()) are here too, so that tests compute what the kernel should conclude.
"""

from __future__ import annotations

import enum
import shlex
from dataclasses import dataclass

from harness.images.initramfs import modprobe_command

PAGE_SHIFT = 12
PAGE_MASK = ~((1 << PAGE_SHIFT) - 1)
U64 = (1 << 64) - 1


class MciStatus(enum.IntFlag):
    """IA32_MCi_STATUS flag bits (SDM Vol. 3B 16.3.2.2)."""

    VAL = 1 << 63  # the register holds a valid error
    OVER = 1 << 62  # an earlier error was lost
    UC = 1 << 61  # uncorrected error
    EN = 1 << 60  # error reporting enabled (MCi_CTL) for this error
    MISCV = 1 << 59  # MCi_MISC holds valid information
    ADDRV = 1 << 58  # MCi_ADDR holds the error address
    PCC = 1 << 57  # processor context corrupt: the CPU cannot restart reliably
    S = 1 << 56  # signaled through #MC (software error recovery, MCG_SER_P)
    AR = 1 << 55  # recovery action required before the CPU continues


MCACOD_MASK = 0xFFFF  # bits 15:0, the architectural MCA error code
MSCOD_SHIFT = 16  # bits 31:16, the model-specific error code


class McgStatus(enum.IntFlag):
    """IA32_MCG_STATUS bits (SDM Vol. 3B 16.3.1.2)."""

    RIPV = 1 << 0  # restart IP valid: execution can resume at the pushed IP
    EIPV = 1 << 1  # error IP valid: the pushed IP is where the error happened
    MCIP = 1 << 2  # machine check in progress
    LMCE_S = 1 << 3  # the #MC went to this logical processor only (local machine check)


class MiscAddrMode(enum.IntEnum):
    """IA32_MCi_MISC bits 8:6, how to read MCi_ADDR (SDM Vol. 3B, "Address Mode in
    IA32_MCi_MISC[8:6]")."""

    SEGMENT_OFFSET = 0
    LINEAR = 1
    PHYSICAL = 2
    MEMORY = 3
    GENERIC = 7


MISC_ADDR_LSB_MASK = 0x3F  # bits 5:0, "Recoverable Address LSB"
MISC_ADDR_MODE_SHIFT = 6

# Compound MCA error code "memory controller error" (0000 0000 1MMM CCCC) with MMM = 001
# (memory read) and CCCC = 1111 (channel not specified).
MCACOD_MEMORY_READ = 0x9F


def mci_misc(lsb: int, mode: MiscAddrMode) -> int:
    """MCi_MISC with the address granularity (lowest valid address bit) and address mode."""
    if not 0 <= lsb <= MISC_ADDR_LSB_MASK:
        raise ValueError(f"address LSB {lsb} does not fit MCi_MISC[5:0]")
    return (int(mode) << MISC_ADDR_MODE_SHIFT) | lsb


class InjectFlags(enum.Enum):
    """mce-inject's ``flags`` file: how the record reaches the kernel."""

    SW = "sw"  # mce_log() only: decoded and logged, no #MC handler
    HW = "hw"  # bank MSRs written on the target CPU, then int $18 there: do_machine_check()


DEBUGFS_INJECT = "/sys/kernel/debug/mce-inject"
DEBUGFS_FAKE_PANIC = "/sys/kernel/debug/mce/fake_panic"
# One global value behind every CPU's file (mca_cfg.monarch_timeout, microseconds).
SYSFS_MONARCH_TIMEOUT = "/sys/devices/system/machinecheck/machinecheck0/monarch_timeout"


@dataclass(frozen=True)
class Mce:
    """One error in one MCA bank of one CPU, as the registers hold it."""

    status: int  # IA32_MCi_STATUS
    mcg_status: int  # IA32_MCG_STATUS while the #MC is delivered
    addr: int  # IA32_MCi_ADDR
    misc: int  # IA32_MCi_MISC
    bank: int = 1
    cpu: int = 0  # Linux CPU number (mce-inject) and QEMU CPU index (HMP): equal on QEMU guests
    broadcast: bool = True  # HMP: the other CPUs get a machine check too, as Intel broadcasts #MC

    def __post_init__(self) -> None:
        for name in ("status", "mcg_status", "addr", "misc"):
            value = getattr(self, name)
            if not 0 <= value <= U64:
                raise ValueError(f"{name} {value:#x} is not a 64-bit register value")
        if self.bank < 0 or self.cpu < 0:
            raise ValueError(f"bank {self.bank} and cpu {self.cpu} must be >= 0")
        if not self.status & MciStatus.VAL:
            raise ValueError("status without VAL is no error: QEMU refuses it and Linux skips the bank")

    @property
    def mcacod(self) -> int:
        return self.status & MCACOD_MASK

    @property
    def page(self) -> int:
        """The physical page Linux hands to TDH.PHYMEM.PAGE.RDMD (``addr & PAGE_MASK``)."""
        return self.addr & PAGE_MASK

    # --- how Linux decodes it (arch/x86/kernel/cpu/mce) --------------------------------------

    def is_memory_error(self) -> bool:
        """mce_is_memory_error() for Intel: memory controller, cache hierarchy or generic
        memory-hierarchy compound error codes (bit 12, the filter bit, ignored; bit 11 set means
        a bus error)."""
        return ((self.status & 0xEF80) == 1 << 7 or (self.status & 0xEF00) == 1 << 8
                or (self.status & 0xEFFC) == 0xC)

    def has_usable_address(self) -> bool:
        """mce_usable_address() for Intel: ADDRV and MISCV, a granularity of at most a page,
        and a physical address."""
        if not self.status & MciStatus.ADDRV or not self.status & MciStatus.MISCV:
            return False
        lsb = self.misc & MISC_ADDR_LSB_MASK
        mode = (self.misc >> MISC_ADDR_MODE_SHIFT) & 7
        return lsb <= PAGE_SHIFT and mode == MiscAddrMode.PHYSICAL

    def is_fatal(self) -> bool:
        """Linux's Intel severity table grades an enabled uncorrected error with PCC as
        MCE_PANIC_SEVERITY ("Processor context corrupt"), whatever else is set."""
        needed = MciStatus.VAL | MciStatus.UC | MciStatus.EN | MciStatus.PCC
        return self.status & needed == needed

    # --- rendering ------------------------------------------------------------------------

    def hmp_command(self) -> str:
        """QEMU's ``mce [-b] cpu bank status mcgstatus addr misc``."""
        flag = "-b " if self.broadcast else ""
        return (f"mce {flag}{self.cpu} {self.bank} {self.status:#x} {self.mcg_status:#x} "
                f"{self.addr:#x} {self.misc:#x}")

    def debugfs_writes(self, flags: InjectFlags) -> list[tuple[str, str]]:
        """(file, value) pairs for mce-inject, in order: writing ``bank`` injects, so it comes
        last. The files parse numbers with base 0, so hex keeps its 0x prefix."""
        return [("flags", flags.value), ("cpu", str(self.cpu)), ("status", f"{self.status:#x}"),
                ("misc", f"{self.misc:#x}"), ("addr", f"{self.addr:#x}"), ("bank", str(self.bank))]

    def debugfs_command(self, flags: InjectFlags) -> str:
        """One shell command line that injects through mce-inject (module loaded beforehand)."""
        return " && ".join(f"echo {shlex.quote(value)} > {DEBUGFS_INJECT}/{name}"
                           for name, value in self.debugfs_writes(flags))


def uncorrected_memory_error(addr: int, cpu: int = 0, bank: int = 1) -> Mce:
    """A fatal memory read error at a physical address Linux can use: the kind the partial-write
    erratum produces when the kernel reads a poisoned TDX private line. PCC makes Linux panic
    (mce_panic() is the only place that prints the TDX message); MISC says "physical address,
    page granularity or finer" so that mce_usable_address() accepts it."""
    status = (MciStatus.VAL | MciStatus.UC | MciStatus.EN | MciStatus.MISCV | MciStatus.ADDRV
              | MciStatus.PCC | MCACOD_MEMORY_READ)
    return Mce(status=int(status), mcg_status=int(McgStatus.MCIP | McgStatus.EIPV), addr=addr,
               misc=mci_misc(PAGE_SHIFT, MiscAddrMode.PHYSICAL), bank=bank, cpu=cpu)


def debugfs_setup_command(fake_panic: bool, rendezvous: bool) -> str:
    """Load mce-inject and prepare the MCE core for a debugfs injection.

    ``fake_panic``: mce_panic() prints everything, then says "Fake kernel panic" and returns,
    so the machine survives (writing the file also resets the MCE core's panic state).
    ``rendezvous`` False sets monarch_timeout to 0: mce-inject raises #MC on one CPU only, and
    without LMCE_S Linux would wait a second for the others, time out and call mce_panic()
    without the record (so without the TDX check); with no timeout each CPU handles its own
    banks and reaches mce_panic() with the record."""
    steps = [modprobe_command("mce-inject"), f"echo {int(fake_panic)} > {DEBUGFS_FAKE_PANIC}"]
    if not rendezvous:
        steps.append(f"echo 0 > {SYSFS_MONARCH_TIMEOUT}")
    return " && ".join(steps)
