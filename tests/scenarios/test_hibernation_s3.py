"""Hibernation and ACPI S3 against the TDX host code (tdx_init() in arch/x86/virt/vmx/tdx/tdx.c,
kernel/power, drivers/acpi/sleep.c in 7.2/7.3):

- tdx_init() refuses TDX while hibernation is available; `nohibernate`, `hibernate=no` and
  `lockdown=integrity` make it unavailable: then /sys/power/state has no "disk",
  /sys/power/disk reads "[disabled]" and writing "disk" to /sys/power/state fails with EPERM;
- once past that check tdx_init() clears acpi_suspend_lowlevel ("Disable ACPI S3..."): deep
  suspend goes through device suspend, CPU offline and syscore suspend, then
  acpi_suspend_enter() fails with ENOSYS and everything resumes; TDX stays initialized
  (no SEAMCALL at all: CPUs coming back keep their LP.INIT).
"""

from __future__ import annotations

import errno
import os

import pytest
from checks import kernel_log

from harness.machine.qemu import BASE_APPEND, QemuConfig
from harness.machine.transitions import SetCpu, Suspend, run_steps
from harness.observe import patterns
from harness.seam.abi import Leaf
from harness.seam.state import SysState

WITHOUT_NOHIBERNATE = " ".join(p for p in BASE_APPEND.split() if p != "nohibernate")


def power_states(machine) -> list[str]:
    return machine.run("cat /sys/power/state", 30).output.split()


def test_hibernation_available_refuses_tdx(boot):
    machine = boot(QemuConfig(base_append=WITHOUT_NOHIBERNATE))
    log = kernel_log(machine)
    log.expect_in_order([patterns.BIOS_ENABLED, patterns.HIBERNATION_ENABLED])
    for absent in (patterns.S3_DISABLED, patterns.INITIALIZED, patterns.INIT_FAILED):
        log.expect_absent(absent)
    assert "disk" in power_states(machine)
    assert "tdx_host_platform" not in machine.run("grep -m1 ^flags /proc/cpuinfo", 30).output
    assert len(machine.module.trace) == 0, "TDX was refused before any SEAMCALL"


@pytest.mark.parametrize("knob", ["nohibernate", "hibernate=no", "lockdown=integrity"])
def test_hibernation_unavailable_lets_tdx_initialize(boot, knob):
    machine = boot(QemuConfig(base_append=f"{WITHOUT_NOHIBERNATE} {knob}"))
    log = kernel_log(machine)
    log.expect_in_order([patterns.BIOS_ENABLED, patterns.S3_DISABLED, patterns.INITIALIZED])
    log.expect_absent(patterns.HIBERNATION_ENABLED)
    assert "disk" not in power_states(machine)
    assert machine.run("cat /sys/power/disk", 30).output.strip() == "[disabled]"
    refused = machine.run("echo disk > /sys/power/state", 60)
    assert refused.status != 0 and os.strerror(errno.EPERM) in refused.output, refused.output
    assert machine.module.state.sys is SysState.SYS_READY


def test_s3_deep_suspend_fails_with_enosys_and_tdx_stays_initialized(boot):
    machine = boot(QemuConfig(cpus=2))
    kernel_log(machine).expect(patterns.S3_DISABLED)
    assert "mem" in power_states(machine)
    assert "deep" in machine.run("cat /sys/power/mem_sleep", 30).output
    [suspend] = run_steps(machine, [Suspend("mem", "deep")])
    assert suspend.result is not None
    assert suspend.result.status != 0 and os.strerror(errno.ENOSYS) in suspend.result.output, suspend.result
    assert suspend.trace_end == suspend.trace_start, "suspend and resume issued SEAMCALLs"
    assert suspend.boots_after == suspend.boots_before
    log = kernel_log(machine)
    log.expect_in_order([patterns.INITIALIZED, patterns.SUSPEND_ENTRY, patterns.SUSPEND_EXIT])
    assert machine.run("cat /sys/devices/system/cpu/online", 30).output.strip() == "0-1"
    assert machine.module.state.sys is SysState.SYS_READY


def test_s3_with_a_cpu_offline_keeps_it_offline_and_its_lp_init(boot):
    machine = boot(QemuConfig(cpus=2))
    offline, suspend, online = run_steps(machine, [SetCpu(1, online=False), Suspend("mem", "deep"),
                                                   SetCpu(1, online=True)])
    assert offline.result is not None and offline.result.status == 0
    assert suspend.result is not None and os.strerror(errno.ENOSYS) in suspend.result.output
    assert online.result is not None and online.result.status == 0
    new = machine.module.trace.records[offline.trace_start:]
    assert [r for r in new if r.number == Leaf.TDH_SYS_LP_INIT] == [], "LP.INIT ran again"
    assert machine.run("cat /sys/devices/system/cpu/online", 30).output.strip() == "0-1"
    kernel_log(machine).expect(patterns.SUSPEND_EXIT)


def test_s2idle_suspend_and_resume_keeps_tdx_initialized(boot):
    """s2idle does not go through syscore suspend or ACPI S3: the kernel suspends and resumes
    (woken by a keystroke on the console UART) and TDX stays initialized without a SEAMCALL."""
    machine = boot(QemuConfig(cpus=2))
    [suspend] = run_steps(machine, [Suspend("mem", "s2idle", wake_by_console=True)])
    assert suspend.result is not None and suspend.result.status == 0, suspend.result
    assert suspend.trace_end == suspend.trace_start, "s2idle issued SEAMCALLs"
    log = kernel_log(machine)
    entry, _ = log.expect_in_order([patterns.SUSPEND_ENTRY, patterns.SUSPEND_EXIT])
    assert patterns.SUSPEND_ENTRY.search(entry.text)["mode"] == "s2idle"
    assert machine.module.state.sys is SysState.SYS_READY
    assert machine.run("cat /sys/devices/system/cpu/online", 30).output.strip() == "0-1"
