"""CPU hotplug against the TDX host code (arch/x86/virt/vmx/tdx/tdx.c):

- tdx_online_cpu() -> tdx_cpu_enable() returns early when the CPU's tdx_lp_initialized is set,
  so a CPU taken offline and back online issues no second TDH.SYS.LP.INIT;
- with CPUs left offline at boot (maxcpus=), the module refuses TDH.SYS.CONFIG (every LP must
  be initialized first), init fails with -EIO, tdx_enable() removes its cpuhp state, and a CPU
  onlined later issues no SEAMCALL at all.
"""

from __future__ import annotations

import errno

from checks import kernel_log

from harness.machine.qemu import QemuConfig
from harness.observe import patterns
from harness.observe.crash import Crash
from harness.seam.abi import Leaf, Status

ONLINE = "/sys/devices/system/cpu/cpu1/online"


def test_cpu_offline_online_keeps_its_lp_init(boot):
    machine = boot(QemuConfig(cpus=2))
    kernel_log(machine).expect(patterns.INITIALIZED)
    before = len(machine.module.trace)
    for value in ("0", "1"):
        result = machine.run(f"echo {value} > {ONLINE} && cat {ONLINE}", 60)
        assert (result.status, result.output.strip()) == (0, value), result.output
    new = machine.module.trace.records[before:]
    assert [r.leaf for r in new if r.number == Leaf.TDH_SYS_LP_INIT] == []
    assert machine.run("grep -c ^processor /proc/cpuinfo", 30).output.strip() == "2"


def test_cpu_left_offline_at_boot_fails_sys_config(boot):
    machine = boot(QemuConfig(cpus=2), append="maxcpus=1")
    log = kernel_log(machine, allow=(Crash.SEAMCALL_FAILED, Crash.TDX_INIT_FAILED))
    failed = log.expect(patterns.SEAMCALL_FAILED)
    assert (int(failed["fn"], 16), int(failed["status"], 16)) == (Leaf.TDH_SYS_CONFIG,
                                                                   Status.TDX_SYS_CONFIG_NOT_PENDING)
    assert int(log.expect(patterns.INIT_FAILED)["errno"]) == -errno.EIO
    assert [r.cpu for r in machine.module.trace.of_leaf(Leaf.TDH_SYS_LP_INIT)] == [0]
    before = len(machine.module.trace)
    result = machine.run(f"echo 1 > {ONLINE} && cat {ONLINE}", 60)
    assert (result.status, result.output.strip()) == (0, "1"), result.output
    assert machine.module.trace.records[before:] == []
