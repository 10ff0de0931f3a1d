"""Reboot, kexec and kdump against the TDX host code (arch/x86/virt/vmx/tdx, kernel/kexec_core.c,
arch/x86/kernel/crash.c in 7.2/7.3):

- after a successful init, tdx_enable() registers syscore ops whose .shutdown (reboot, halt,
  power-off, kexec) calls tdx_sys_disable(): TDH.SYS.DISABLE, retried while the module answers
  TDX_INTERRUPTED_RESUMABLE or TDX_SYS_BUSY, other errors printed as "TDH.SYS.DISABLE failed";
- the crash path (native_machine_crash_shutdown) calls tdx_sys_disable() unconditionally, with
  the other CPUs already stopped;
- the next kernel (after kexec, or the capture kernel) initializes the module from TDH.SYS.INIT,
  which the module accepts only before its first init or after SYS.DISABLE; a reboot resets
  the platform, and the firmware loads a fresh module.
"""

from __future__ import annotations

import errno

import pytest
from checks import CRASHKERNEL, assert_initialized, boot_records, console_log, crash_records, kernel_log

from harness.machine.qemu import QemuConfig, QemuMachine
from harness.machine.transitions import CrashDump, Kexec, Reboot, SetCpu, run_steps
from harness.observe import patterns
from harness.observe.crash import Crash
from harness.seam.abi import Leaf, Status
from harness.seam.faults import FaultPlan, FaultRule

FAILURES = (Crash.SEAMCALL_FAILED, Crash.TDX_INIT_FAILED)


def assert_ends_with_sys_disable(machine: QemuMachine, boot: int) -> None:
    last = boot_records(machine, boot)[-1]
    assert (last.leaf, last.status) == ("TDH.SYS.DISABLE", 0), \
        f"boot {boot} ended with {last.leaf} -> {last.status_name}, expected TDH.SYS.DISABLE -> success"


def test_reboot_disables_module_and_next_boot_initializes_it(boot):
    machine = boot(QemuConfig(), reuse=True)
    kernel_log(machine).expect(patterns.INITIALIZED)
    first = machine.module.boots
    [step] = run_steps(machine, [Reboot()])
    assert step.boots_after == first + 1
    assert_ends_with_sys_disable(machine, first)
    assert_initialized(machine, first + 1)
    kernel_log(machine).expect(patterns.INITIALIZED)


def test_reboot_sys_disable_busy_is_retried(boot):
    retries = 3
    plan = FaultPlan([FaultRule(Leaf.TDH_SYS_DISABLE, Status.TDX_SYS_BUSY, times=retries)])
    machine = boot(QemuConfig(), faults=plan)
    run_steps(machine, [Reboot()])
    calls = [r for r in boot_records(machine, 1) if r.number == Leaf.TDH_SYS_DISABLE]
    assert [r.status for r in calls] == [Status.TDX_SYS_BUSY] * retries + [0]
    console_log(machine).expect_absent(patterns.SYS_DISABLE_FAILED)
    kernel_log(machine).expect(patterns.INITIALIZED)


def test_reboot_sys_disable_interrupted_is_resumed(boot, platform_config):
    """A module whose SYS.DISABLE takes three calls (host_init.sys_disable()): the kernel calls
    again on TDX_INTERRUPTED_RESUMABLE until it succeeds, and prints nothing."""
    calls = 3
    machine = boot(QemuConfig(), platform=platform_config(sys_disable_calls=calls))
    run_steps(machine, [Reboot()])
    disables = [r for r in boot_records(machine, 1) if r.number == Leaf.TDH_SYS_DISABLE]
    assert [r.status for r in disables] == [Status.TDX_INTERRUPTED_RESUMABLE] * (calls - 1) + [0]
    console_log(machine).expect_absent(patterns.SYS_DISABLE_FAILED)
    kernel_log(machine).expect(patterns.INITIALIZED)


def test_reboot_sys_disable_failure_is_printed_and_reboot_completes(boot):
    failure = Status.TDX_SYS_SHUTDOWN  # any status other than the two the kernel retries
    machine = boot(QemuConfig(), faults=FaultPlan([FaultRule(Leaf.TDH_SYS_DISABLE, failure, times=1)]))
    run_steps(machine, [Reboot()])
    assert int(console_log(machine).expect(patterns.SYS_DISABLE_FAILED)["status"], 16) == failure
    # The platform reset reloaded the module: the next kernel initializes it as on first boot.
    assert_initialized(machine, 2)
    kernel_log(machine).expect(patterns.INITIALIZED)


def test_kexec_disables_module_and_new_kernel_initializes_it(boot):
    machine = boot(QemuConfig(), reuse=True)
    kernel_log(machine).expect(patterns.INITIALIZED)
    [step] = run_steps(machine, [Kexec()])
    assert step.boots_after == step.boots_before + 1
    assert_ends_with_sys_disable(machine, step.boots_before)
    # No reset in between: the new kernel found the module shut down, not freshly loaded.
    first_new = boot_records(machine, step.boots_after)[0]
    assert first_new.leaf == "TDH.SYS.INIT" and first_new.status == 0
    assert_initialized(machine, step.boots_after)
    kernel_log(machine).expect(patterns.INITIALIZED)
    # "Starting new kernel" came after the old kernel's last SEAMCALL, which was SYS.DISABLE.
    console_log(machine).expect(patterns.KEXEC_STARTING)


def test_kexec_three_times_in_a_row(boot):
    machine = boot(QemuConfig(), reuse=True)
    steps = run_steps(machine, [Kexec(), Kexec(file_load=True), Kexec()])
    for step in steps:
        assert step.boots_after == step.boots_before + 1, f"{step.step} did not boot a new kernel"
        assert_ends_with_sys_disable(machine, step.boots_before)
        assert_initialized(machine, step.boots_after)
    assert machine.module.boots == 4
    kernel_log(machine).expect(patterns.INITIALIZED)


@pytest.mark.parametrize(("fault", "second_kernel"), [
    # The failed call changed nothing in the module: the next kernel starts it from scratch.
    pytest.param(FaultRule(Leaf.TDH_SYS_INIT, Status.TDX_SYS_BUSY, times=1), Status.TDX_SUCCESS, id="at_sys_init"),
    # The first kernel configured the module, failed later and registered no shutdown hook, so
    # nothing disabled the module: the next kernel's TDH.SYS.INIT is refused.
    pytest.param(FaultRule(Leaf.TDH_SYS_KEY_CONFIG, Status.TDX_KEY_GENERATION_FAILED, times=1),
                 Status.TDX_SYS_INIT_NOT_PENDING, id="at_key_config"),
])
def test_kexec_after_init_failure(boot, fault, second_kernel):
    machine = boot(QemuConfig(), faults=FaultPlan([fault]))
    kernel_log(machine, allow=FAILURES).expect_absent(patterns.INITIALIZED)
    [step] = run_steps(machine, [Kexec()])
    old = boot_records(machine, step.boots_before)
    assert Leaf.TDH_SYS_DISABLE not in [r.number for r in old], "SYS.DISABLE without a successful init"
    sys_init = boot_records(machine, step.boots_after)[0]
    assert (sys_init.number, sys_init.status) == (Leaf.TDH_SYS_INIT, second_kernel)
    log = kernel_log(machine, allow=FAILURES)
    if second_kernel == Status.TDX_SUCCESS:
        assert_initialized(machine, step.boots_after)
        log.expect(patterns.INITIALIZED)
    else:
        assert int(log.expect(patterns.SEAMCALL_FAILED)["status"], 16) == second_kernel
        log.expect_absent(patterns.INITIALIZED)
        assert machine.run("echo alive", 30).output.strip() == "alive"


def test_kexec_with_a_cpu_offline(boot):
    """A CPU taken offline before kexec is brought up again by the new kernel, which runs
    LP.INIT on it: every LP of the platform must be initialized before TDH.SYS.CONFIG."""
    machine = boot(QemuConfig(cpus=2))
    offline, kexec = run_steps(machine, [SetCpu(1, online=False), Kexec()])
    assert offline.result is not None and offline.result.status == 0, offline.result
    # Offlining ran no SEAMCALL (no TD holds a KeyID, so tdx_offline_cpu() only flushes caches).
    assert offline.trace_end == offline.trace_start
    assert_ends_with_sys_disable(machine, kexec.boots_before)
    assert_initialized(machine, kexec.boots_after)
    assert machine.run("cat /sys/devices/system/cpu/online", 30).output.strip() == "0-1"


def test_kdump_disables_module_and_capture_kernel_initializes_it(boot):
    machine = boot(QemuConfig(memory="2G"), append=CRASHKERNEL)
    kernel_log(machine).expect(patterns.INITIALIZED)
    [step] = run_steps(machine, [CrashDump()])
    crashing, _ = crash_records(step, machine)
    # The crash path issued SYS.DISABLE after stopping the other CPUs: from the panicking CPU,
    # as the only call of the dying kernel.
    assert [(r.leaf, r.status) for r in crashing] == [("TDH.SYS.DISABLE", 0)]
    assert step.boots_after == step.boots_before + 1
    assert_initialized(machine, step.boots_after)
    log = kernel_log(machine)
    log.expect(patterns.INITIALIZED)
    # The capture kernel sees the old kernel's memory: /proc/vmcore is an ELF core file.
    magic = machine.run("head -c 4 /proc/vmcore | od -An -c", 120)
    assert magic.status == 0 and magic.output.split() == ["177", "E", "L", "F"], magic.output


# The capture kernel boots with nr_cpus=1: its HELLO reports one possible CPU of the platform's two.
@pytest.mark.module_anomalies(r"kernel reports 1 possible CPUs, platform has 2")
def test_kdump_capture_kernel_with_one_cpu_cannot_configure_the_module(boot):
    """The usual kdump command line brings up one CPU (nr_cpus=1): the others never run
    TDH.SYS.LP.INIT, so the module refuses TDH.SYS.CONFIG, as a real module would."""
    machine = boot(QemuConfig(cpus=2), append=CRASHKERNEL)
    [step] = run_steps(machine, [CrashDump(append="reset_devices nr_cpus=1")])
    _, capture = crash_records(step, machine)
    config = [r for r in capture if r.number == Leaf.TDH_SYS_CONFIG]
    assert [r.status for r in config] == [Status.TDX_SYS_CONFIG_NOT_PENDING]
    log = kernel_log(machine, allow=FAILURES)
    assert int(log.expect(patterns.INIT_FAILED)["errno"]) == -errno.EIO
    assert machine.run("head -c 4 /proc/vmcore | od -An -c", 120).output.split() == ["177", "E", "L", "F"]


# The capture kernel boots with nr_cpus=1: its HELLO reports one possible CPU of the platform's two.
@pytest.mark.module_anomalies(r"kernel reports 1 possible CPUs, platform has 2")
def test_kdump_from_an_ap_leaves_the_bsp_out_and_the_module_unconfigured(boot):
    """A panic on CPU 1: the capture kernel boots on that CPU, finds it is not the BSP and never
    starts the BSP (an INIT to it would reset the machine), so TDH.SYS.LP.INIT misses one LP and
    TDH.SYS.CONFIG is refused, as with nr_cpus=1. Which CPU panics decides whether a capture
    kernel can use TDX."""
    machine = boot(QemuConfig(cpus=2, memory="2G"), append=CRASHKERNEL)
    kernel_log(machine).expect(patterns.INITIALIZED)
    [step] = run_steps(machine, [CrashDump(cpu=1)])
    crashing, capture = crash_records(step, machine)
    assert [(r.cpu, r.leaf) for r in crashing] == [(1, "TDH.SYS.DISABLE")]
    assert {r.cpu for r in capture if r.number == Leaf.TDH_SYS_LP_INIT} == {1}
    assert [r.status for r in capture if r.number == Leaf.TDH_SYS_CONFIG] == [Status.TDX_SYS_CONFIG_NOT_PENDING]
    log = kernel_log(machine, allow=FAILURES)
    log.expect(patterns.REAL_BSP_DISABLED)
    assert int(log.expect(patterns.INIT_FAILED)["errno"]) == -errno.EIO
    assert machine.run("cat /sys/devices/system/cpu/online", 30).output.strip() == "0"
