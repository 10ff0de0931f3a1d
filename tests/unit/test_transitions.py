"""Power-transition steps against a fake machine: the commands they send, and how a sequence
reports which step failed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.machine.channel import ChannelTimeout
from harness.machine.shell import CommandResult
from harness.machine.transitions import (
    KEXEC_INITRD,
    KEXEC_KERNEL,
    RESUMED_MARK,
    CrashDump,
    Kexec,
    SetCpu,
    Suspend,
    TransitionError,
    run_steps,
)
from harness.seam.module import TdxModule


@dataclass
class FakeMachine:
    """Records commands; sending a kexec or a crash counts as a new boot for the module."""

    cmdline: str = "console=ttyS0 crashkernel=256M nohibernate"
    module: TdxModule = field(default_factory=TdxModule)
    run_dir: Path = Path("/runs/x")
    console_log: Path = Path("/runs/x/console.log")
    commands: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    fail_ready: bool = False

    def run(self, cmd: str, timeout: float) -> CommandResult:
        self.commands.append(cmd)
        return CommandResult(0, self.cmdline + "\n" if cmd == "cat /proc/cmdline" else "")

    def kernel_ending(self, why: str) -> None:
        self.sent.append(f"<kernel ending: {why}>")  # in order with what is sent

    def send(self, cmd: str) -> None:
        self.sent.append(cmd)
        if cmd in ("kexec -e", "echo c > /proc/sysrq-trigger"):  # a new kernel says HELLO
            self.module.hello(len(self.module.platform.cpus), 0)

    def expect(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        self.expected.append(pattern.pattern)
        match = pattern.search("[ 1.0] printk: Suspending console(s)")
        assert match is not None, "only kernel messages are awaited on the console"
        return match

    def expect_output(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        self.expected.append(pattern.pattern)
        match = pattern.search(f"{RESUMED_MARK}:0")
        assert match is not None, "only the resume mark is awaited from the shell"
        return match

    def wait_ready(self, timeout: float) -> str:
        if self.fail_ready:
            raise ChannelTimeout("timed out", "the readiness marker", [], self.console_log)
        return "7.3.0"


def test_kexec_loads_the_staged_images_with_the_running_command_line() -> None:
    machine = FakeMachine()
    [record] = run_steps(machine, [Kexec(append="maxcpus=1")])  # type: ignore[arg-type]
    load = machine.commands[-1]
    assert load.startswith(f"kexec -l {KEXEC_KERNEL} --initrd={KEXEC_INITRD} ")
    assert load.endswith(f"'{machine.cmdline} maxcpus=1'")
    assert machine.sent == ["<kernel ending: kexec>", "kexec -e"]  # counters are read before the kexec
    assert (record.boots_before, record.boots_after) == (0, 1)


def test_crash_dump_drops_crashkernel_for_the_capture_kernel() -> None:
    machine = FakeMachine()
    run_steps(machine, [CrashDump()])  # type: ignore[arg-type]
    assert machine.commands[-1].startswith(f"kexec -s -p {KEXEC_KERNEL}")
    assert "crashkernel" not in machine.commands[-1] and "reset_devices" in machine.commands[-1]
    assert machine.sent == ["<kernel ending: crash dump>", "taskset -c 0 sh -c 'echo c > /proc/sysrq-trigger'"]
    run_steps(machine, [CrashDump(cpu=1)])  # type: ignore[arg-type]
    assert machine.sent[-1].startswith("taskset -c 1 ")


def test_suspend_and_cpu_steps_return_the_command_result() -> None:
    machine = FakeMachine()
    suspend, cpu = run_steps(machine, [Suspend("mem", "deep"), SetCpu(1, online=False)])  # type: ignore[arg-type]
    assert machine.commands == ["echo deep > /sys/power/mem_sleep", "echo mem > /sys/power/state",
                                "echo 0 > /sys/devices/system/cpu/cpu1/online"]
    assert suspend.result is not None and cpu.result is not None
    assert suspend.boots_after == suspend.boots_before


def test_a_failed_step_is_named_with_the_steps_before_it_and_the_logs() -> None:
    machine = FakeMachine(fail_ready=True)
    with pytest.raises(TransitionError) as failure:
        run_steps(machine, [SetCpu(1, online=False), Kexec()])  # type: ignore[arg-type]
    text = str(failure.value)
    assert "step 1 (Kexec) failed after ['SetCpu(1, offline)']" in text
    assert "console log: /runs/x/console.log" in text and "seamcalls.jsonl" in text


def test_console_wake_sends_a_keystroke_on_the_command_channel_once_consoles_are_suspended() -> None:
    machine = FakeMachine()
    [record] = run_steps(machine, [Suspend("mem", "s2idle", wake_by_console=True)])  # type: ignore[arg-type]
    assert machine.commands == ["echo s2idle > /sys/power/mem_sleep",
                                "echo enabled > /sys/class/tty/ttyS3/power/wakeup"]  # the command channel's UART
    assert machine.sent == [f'echo mem > /sys/power/state; echo "{RESUMED_MARK}:$?"', ""]
    assert "Suspending console" in machine.expected[0] and RESUMED_MARK in machine.expected[1]
    assert record.result is not None and record.result.status == 0
