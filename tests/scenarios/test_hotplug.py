"""CPU and memory hotplug against the TDX host code (arch/x86/virt/vmx/tdx/tdx.c):

- tdx_online_cpu() -> tdx_cpu_enable() returns early when the CPU's tdx_lp_initialized is set,
  so a CPU taken offline and back online issues no second TDH.SYS.LP.INIT;
- with CPUs left offline at boot (maxcpus=), the module refuses TDH.SYS.CONFIG (every LP must
  be initialized first), init fails with -EIO, tdx_enable() removes its cpuhp state, and a CPU
  onlined later issues no SEAMCALL at all;
- memory: once TDX is initialized, tdx_memory_notifier() refuses MEM_GOING_ONLINE for any range
  outside the memory TDX covered at boot (a DIMM plugged later never is), so onlining fails with
  EPERM; the kernel's only message for it is a pr_debug in mm/memory_hotplug.c, which this
  config does not print. Without TDX (empty tdx_memlist) the same DIMM goes online.
"""

from __future__ import annotations

import errno
import os

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


DIMM_SIZE = 512 << 20
HOTPLUG = QemuConfig(memory="2G", dimm_slots=1, maxmem="4G")
MEMORY = "/sys/devices/system/memory"


def plug_dimm(machine) -> list[str]:
    """Hot-plug one DIMM through QMP; returns the sysfs memory blocks that cover it, once the
    guest's ACPI hotplug driver has added them."""
    base = machine.qmp().add_dimm("dimm0", DIMM_SIZE)
    block = int(machine.run(f"cat {MEMORY}/block_size_bytes", 30).output.strip(), 16)
    blocks = [f"{MEMORY}/memory{n}" for n in range(base // block, (base + DIMM_SIZE) // block)]
    appeared = machine.run(f"for i in $(seq 100); do [ -e {blocks[-1]} ] && break; sleep 0.1; done; "
                           f"cat {blocks[0]}/state {blocks[-1]}/state", 60)
    assert appeared.output.split() == ["offline", "offline"], \
        f"DIMM at {base:#x}: expected offline blocks {blocks[0]}..{blocks[-1]}, got {appeared.output!r}"
    return blocks


def test_memory_hotplug_dimm_refused_online_with_tdx(boot):
    machine = boot(HOTPLUG)
    kernel_log(machine).expect(patterns.INITIALIZED)
    before = len(machine.module.trace)
    blocks = plug_dimm(machine)
    refused = machine.run(f"echo online > {blocks[0]}/state", 60)
    assert refused.status != 0 and os.strerror(errno.EPERM) in refused.output, refused.output
    assert machine.run(f"cat {blocks[0]}/state", 30).output.strip() == "offline"
    assert machine.module.trace.records[before:] == [], "onlining memory issued SEAMCALLs"
    kernel_log(machine)  # and nothing went wrong in the kernel


def test_memory_hotplug_dimm_onlines_without_tdx(boot, platform_config):
    machine = boot(HOTPLUG, platform=platform_config(module_present=False))
    kernel_log(machine).expect(patterns.NOT_LOADED)
    blocks = plug_dimm(machine)
    onlined = machine.run(f"echo online > {blocks[0]}/state && cat {blocks[0]}/state", 60)
    assert (onlined.status, onlined.output.strip()) == (0, "online"), onlined.output
