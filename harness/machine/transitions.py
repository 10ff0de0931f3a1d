"""Power transitions as composable steps: a scenario states a chain (kexec, kexec, reboot,
suspend, crash dump...) in a few lines, and gets back per-step records that say which boot and
which part of the module trace each step produced. A failing step is reported by position and
name, with the machine's logs.

The steps act through the guest shell and the machine's primitives (``send``, ``reboot``,
``wait_ready``), so a backend that has those runs them. Firmware state carries across as on
hardware: kexec keeps the module's state (the new kernel finds it after TDH.SYS.DISABLE), a
reboot power-cycles it.
"""

from __future__ import annotations

import abc
import logging
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass

from harness.deadline import Deadline
from harness.images.initramfs import GUEST_KERNEL
from harness.machine.base import MachineError
from harness.machine.channel import COMMAND_TTY, ChannelError, ChannelTimeout
from harness.machine.qemu import QemuMachine
from harness.machine.shell import CommandResult
from harness.observe import patterns

log = logging.getLogger("harness.machine.transitions")

# What the guest kexecs: the kernel the initramfs carries, and the initramfs itself as the kernel
# kept it (retain_initrd). QEMU's fw_cfg would serve both, but reads byte by byte through an I/O
# port: 6 MB took over two minutes under TCG.
KEXEC_KERNEL = GUEST_KERNEL
KEXEC_INITRD = "/sys/firmware/initrd"
COMMAND_TIMEOUT = 120.0
COMMAND_TTY_WAKEUP = f"/sys/class/tty/{COMMAND_TTY}/power/wakeup"
RESUMED_MARK = "TDXH-RESUMED"
KEYSTROKE_INTERVAL = 1.0
BOOT_TIMEOUT = 300.0  # TCG on a loaded 2-core host; a healthy boot takes seconds


class TransitionError(MachineError):
    """A step of a sequence failed: which one, why, and where the logs are."""


@dataclass
class StepRecord:
    """What one step did: the module's boot count and trace position before and after it."""

    index: int
    step: Step
    boots_before: int
    boots_after: int = 0
    trace_start: int = 0
    trace_end: int = 0
    seconds: float = 0.0
    result: CommandResult | None = None  # for steps whose command returns (suspend, offline)


class Step(abc.ABC):
    """One transition; ``apply`` returns the result of the command it ran, if it returns."""

    @abc.abstractmethod
    def apply(self, machine: QemuMachine) -> CommandResult | None: ...

    def __str__(self) -> str:
        return type(self).__name__


def _checked(machine: QemuMachine, cmd: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
    result = machine.run(cmd, timeout)
    if result.status:
        raise TransitionError(f"`{cmd}` exited with {result.status}: {result.output.strip()[-500:]}")
    return result


def current_cmdline(machine: QemuMachine) -> str:
    return _checked(machine, "cat /proc/cmdline").output.strip()


def _without_param(cmdline: str, name: str) -> str:
    return " ".join(p for p in cmdline.split() if p.split("=", 1)[0] != name)


@dataclass(frozen=True)
class Reboot(Step):
    """``reboot -f`` in the guest: the kernel's shutdown path, then a platform reset."""

    def apply(self, machine: QemuMachine) -> None:
        machine.reboot(BOOT_TIMEOUT)


@dataclass(frozen=True)
class Kexec(Step):
    """``kexec -l`` the harness's kernel and initramfs, then ``kexec -e``; the new kernel gets
    the current command line plus ``append``. ``file_load`` uses kexec_file_load (-s)."""

    append: str = ""
    file_load: bool = False

    def apply(self, machine: QemuMachine) -> None:
        cmdline = " ".join(p for p in (current_cmdline(machine), self.append) if p)
        mode = "-s -l" if self.file_load else "-l"
        _checked(machine, f"kexec {mode} {KEXEC_KERNEL} --initrd={KEXEC_INITRD} --append={shlex.quote(cmdline)}")
        machine.kernel_ending("kexec")
        machine.send("kexec -e")
        machine.wait_ready(BOOT_TIMEOUT)

    def __str__(self) -> str:
        return f"Kexec({self.append!r})" if self.append else "Kexec"


@dataclass(frozen=True)
class CrashDump(Step):
    """Load a capture kernel (``kexec -p``; the running kernel must have booted with
    ``crashkernel=``), panic through sysrq, and wait for the capture kernel's shell. The capture
    kernel gets the current command line without ``crashkernel=``, plus ``append``. The panic
    runs on CPU ``cpu``: the capture kernel boots on the CPU that panicked, and when that is not
    the BSP, Linux leaves the BSP out ("Crash kernel detected. Disabling real BSP")."""

    append: str = "reset_devices"
    cpu: int = 0

    def apply(self, machine: QemuMachine) -> None:
        cmdline = _without_param(current_cmdline(machine), "crashkernel")
        cmdline = " ".join(p for p in (cmdline, self.append) if p)
        # kexec_file_load (-s): the kexec_load path of kexec-tools needs /proc/kcore for a crash
        # kernel, which the trimmed config leaves out.
        _checked(machine, f"kexec -s -p {KEXEC_KERNEL} --initrd={KEXEC_INITRD} --append={shlex.quote(cmdline)}")
        machine.kernel_ending("crash dump")
        machine.send(f"taskset -c {self.cpu} sh -c 'echo c > /proc/sysrq-trigger'")
        machine.wait_ready(BOOT_TIMEOUT)


@dataclass(frozen=True)
class Suspend(Step):
    """Write ``state`` (mem, freeze, disk) to /sys/power/state after selecting ``mem_sleep``
    (deep or s2idle) when given; the command's result is the step's result (the kernel may
    refuse: TDX makes ACPI S3 fail with ENOSYS). With ``wake_by_console`` the command channel's
    UART is made a wakeup source and a keystroke on it wakes the guest once its consoles are
    suspended (an RTC alarm does not wake s2idle under QEMU TCG: see docs/NOTES.md)."""

    state: str = "mem"
    mem_sleep: str | None = "deep"
    wake_by_console: bool = False

    def apply(self, machine: QemuMachine) -> CommandResult:
        if self.mem_sleep:
            _checked(machine, f"echo {self.mem_sleep} > /sys/power/mem_sleep")
        command = f"echo {self.state} > /sys/power/state"
        if not self.wake_by_console:
            return machine.run(command, COMMAND_TIMEOUT)
        _checked(machine, f"echo enabled > {COMMAND_TTY_WAKEUP}")
        machine.send(f'{command}; echo "{RESUMED_MARK}:$?"')
        machine.expect(patterns.CONSOLES_SUSPENDED, COMMAND_TIMEOUT)
        return CommandResult(_wake_by_keystrokes(machine, Deadline.after(COMMAND_TIMEOUT)), "")

    def __str__(self) -> str:
        how = f"{self.state}/{self.mem_sleep}" if self.mem_sleep else self.state
        return f"Suspend({how}{', console wake' if self.wake_by_console else ''})"


def _wake_by_keystrokes(machine: QemuMachine, deadline: Deadline) -> int:
    """Press a key every second until the suspend command reports back; returns its status.
    Nothing on the console says when the guest is asleep (consoles are suspended by then), and
    a key pressed too early is just an empty line for the shell, or aborts the suspend (the
    status then says so)."""
    resumed = re.compile(rf"{RESUMED_MARK}:(\d+)")
    while True:
        time.sleep(KEYSTROKE_INTERVAL)
        machine.send("")  # an interrupt from a wakeup-enabled UART
        try:
            return int(machine.expect_output(resumed, KEYSTROKE_INTERVAL).group(1))
        except ChannelTimeout:
            if deadline.expired():
                raise


@dataclass(frozen=True)
class SetCpu(Step):
    """Take a CPU offline or bring it back through sysfs; the result says whether the kernel
    allowed it."""

    cpu: int
    online: bool

    def apply(self, machine: QemuMachine) -> CommandResult:
        return machine.run(f"echo {int(self.online)} > /sys/devices/system/cpu/cpu{self.cpu}/online",
                           COMMAND_TIMEOUT)

    def __str__(self) -> str:
        return f"SetCpu({self.cpu}, {'online' if self.online else 'offline'})"


def run_steps(machine: QemuMachine, steps: Sequence[Step]) -> list[StepRecord]:
    """Apply ``steps`` to ``machine`` in order. Raises TransitionError naming the step that
    failed, the ones before it, and the logs."""
    module, records = machine.module, list[StepRecord]()
    for index, step in enumerate(steps):
        record = StepRecord(index, step, module.boots, trace_start=len(module.trace))
        log.info("step %d: %s", index, step)
        start = time.monotonic()
        try:
            record.result = step.apply(machine)
        except (MachineError, ChannelError, OSError) as err:
            raise TransitionError(
                f"step {index} ({step}) failed after {[str(r.step) for r in records]}: {err}\n"
                f"  console log: {machine.console_log}\n"
                f"  module trace: {machine.run_dir / 'seamcalls.jsonl'}") from err
        record.seconds = time.monotonic() - start
        record.boots_after, record.trace_end = module.boots, len(module.trace)
        records.append(record)
    return records
