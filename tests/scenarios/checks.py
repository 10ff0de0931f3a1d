"""Checks shared by scenarios: the kernel log of a machine, and the init sequence in the trace."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest

from harness.deadline import Deadline
from harness.machine.base import Machine
from harness.machine.qemu import QemuMachine
from harness.machine.shell import CommandResult
from harness.machine.transitions import StepRecord
from harness.observe import pamt, patterns
from harness.observe.crash import Crash, classify, unexpected
from harness.observe.dmesg import Timeline, read_kmsg
from harness.observe.kvm import AGENT, KVM_TIMEOUT, LOAD_KVM_INTEL, AgentRun, AgentStep, tdx_hardware_setup_refusal
from harness.observe.tdx_host import LOAD_TDX_HOST, SEAMLDR_VERSION
from harness.seam import abi
from harness.seam.abi import Leaf, SeamldrLeaf
from harness.seam.faults import FaultPlan, withheld
from harness.seam.platform import PlatformConfig
from harness.seam.state import SysState
from harness.seam.trace import TraceRecord

DMESG_TIMEOUT = 60.0
# A dump that lost bytes on the console (docs/NOTES.md, console section) is read again, up to this often.



def kernel_log(machine: QemuMachine, allow: Iterable[Crash] = ()) -> Timeline:
    """The running kernel's whole log from /dev/kmsg (sequence numbers, levels; complete even if
    the console dropped lines). Fails on any sign of trouble (crash.Crash) that the scenario did
    not ``allow``."""
    result = machine.run("tdxh-kmsg", DMESG_TIMEOUT)
    assert result.status == 0, f"tdxh-kmsg failed with {result.status}: {result.output[-500:]}"
    dump = read_kmsg(result.output.splitlines())
    # The command channel carries the dump exactly: a gap in the sequence numbers or a line that
    # is not a record is a defect of the channel (or of tdxh-kmsg), never retried into a pass.
    assert not dump.damage, (f"the kernel log from /dev/kmsg is damaged: {'; '.join(dump.damage[:5])}\n"
                             f"command channel log: {machine.run_dir / 'commands.log'}")
    log = Timeline(dump.records, machine.console_log)
    assert log.records, f"no kernel records in /dev/kmsg: {result.output[-500:]!r}"
    seqs = [r.seq for r in log.records]
    assert seqs == sorted(seqs), "kernel records out of sequence"
    surprises = unexpected(classify(log.records), allow)
    assert not surprises, ("unexpected kernel trouble:\n" + "\n".join(f"  {f}" for f in surprises)
                           + f"\nconsole log: {machine.console_log}")
    return log


def model_from_log(log: Timeline) -> pamt.PamtModel:
    """The PAMT model computed from the e820 map the guest kernel printed."""
    return pamt.model(pamt.parse_e820("\n".join(r.text for r in log.records)))


def init_leaves(records: list[TraceRecord]) -> list[int]:
    return [r.number for r in records if r.number in (Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_LP_INIT, Leaf.TDH_SYS_RD,
                                                      Leaf.TDH_SYS_CONFIG, Leaf.TDH_SYS_KEY_CONFIG,
                                                      Leaf.TDH_SYS_TDMR_INIT)]


def assert_init_sequence(records: list[TraceRecord], apic_ids: list[int], packages: dict[int, int]) -> None:
    """The order Linux's tdx_enable() follows: SYS.INIT, LP.INIT on every CPU, SYS.RD reads,
    SYS.CONFIG, KEY.CONFIG once per package, then TDMR.INIT calls; all successful."""
    seq = [r for r in records if r.number in init_leaves(records)]
    failed = [r for r in seq if r.status]
    assert not failed, f"init SEAMCALLs failed: {[(r.leaf, r.status_name) for r in failed]}"
    names = [r.number for r in seq]
    assert names[0] == Leaf.TDH_SYS_INIT, f"first call was {seq[0].leaf}"
    lp = [r.cpu for r in seq if r.number == Leaf.TDH_SYS_LP_INIT]
    assert sorted(lp) == sorted(apic_ids), f"LP.INIT on {lp}, expected once on each of {apic_ids}"
    first_rd = names.index(Leaf.TDH_SYS_RD)
    config = names.index(Leaf.TDH_SYS_CONFIG)
    assert names.count(Leaf.TDH_SYS_CONFIG) == 1
    key_configs = [i for i, n in enumerate(names) if n == Leaf.TDH_SYS_KEY_CONFIG]
    tdmr_inits = [i for i, n in enumerate(names) if n == Leaf.TDH_SYS_TDMR_INIT]
    last_lp = max(i for i, n in enumerate(names) if n == Leaf.TDH_SYS_LP_INIT)
    assert last_lp < first_rd < config < min(key_configs) and max(key_configs) < min(tdmr_inits), \
        f"out of order: {[abi.leaf_name(n) for n in names]}"
    key_packages = sorted(packages[seq[i].cpu] for i in key_configs)
    assert key_packages == sorted(set(packages.values())), f"KEY.CONFIG on packages {key_packages}"


def boot_records(machine: Machine, boot: int) -> list[TraceRecord]:
    """The module trace of one kernel (numbered by the HELLOs the module saw)."""
    return [r for r in machine.module.trace.records if r.boot == boot]


def assert_initialized(machine: Machine, boot: int) -> None:
    """Kernel ``boot`` initialized the module in tdx_enable()'s order, and it is ready."""
    platform = machine.module.platform
    assert_init_sequence(boot_records(machine, boot), [c.apic_id for c in platform.cpus],
                         {c.apic_id: c.package for c in platform.cpus})
    assert machine.module.state.sys is SysState.SYS_READY, f"module {machine.module.state.sys} after boot {boot}"


def console_log(machine: QemuMachine) -> Timeline:
    """Every kernel's messages as the console saw them (dmesg only holds the running kernel's),
    up to now: a running kernel's console is first given time to print what it logged."""
    if machine.alive() and machine.shell_ready:
        machine.sync_console(DMESG_TIMEOUT)
    return Timeline.from_console(machine.console_lines(), machine.console_log)


CRASHKERNEL = "crashkernel=256M"


def crash_records(step: StepRecord, machine: Machine) -> tuple[list[TraceRecord], list[TraceRecord]]:
    """A CrashDump step's trace: the crashing kernel's part, then the capture kernel's."""
    records = machine.module.trace.records[step.trace_start:step.trace_end]
    return ([r for r in records if r.boot == step.boots_before], [r for r in records if r.boot == step.boots_after])


def kvm_takes_tdx(platform: PlatformConfig) -> bool:
    """Whether kvm_intel tdx=1 loads on this module (kvm.tdx_hardware_setup_refusal(); the
    "1.5.01" release lacks TOPOLOGY_ENUM), for a platform whose XFAM bits KVM all supports."""
    return tdx_hardware_setup_refusal(platform, platform.xfam_fixed0, len(platform.cpus)) is None


def assert_kvm_refused_tdx(machine: Machine, load: CommandResult, why: str = "") -> None:
    """The load of kvm_intel tdx=1 failed as the kernel fails it on a module KVM cannot use
    (``why``): the insmod fails, kvm_intel is not there afterwards, and no SEAMCALL failed."""
    assert load.status != 0, f"kvm_intel tdx=1 loaded on a module it must refuse ({why}): {load.output}"
    assert machine.run("test -e /sys/module/kvm_intel", DMESG_TIMEOUT).status != 0, "kvm_intel stayed loaded"
    kernel_log(machine).expect_absent(patterns.SEAMCALL_FAILED)




def kvm_machine(vmx_boot, faults: FaultPlan | None = None, **options: str) -> Machine:
    """A VMX machine (``options``: vmx_boot's memory, append) with kvm_intel loaded with tdx=1;
    skips (after checking the refusal) on a module release KVM does not take."""
    machine = vmx_boot(faults=faults, **options)
    loaded = machine.run(LOAD_KVM_INTEL, KVM_TIMEOUT)
    if not kvm_takes_tdx(machine.module.platform):
        assert_kvm_refused_tdx(machine, loaded)
        pytest.skip(f"module profile {machine.module.platform.module_profile}: KVM refuses TDX on it (checked); "
                    "no TD to run")
    assert loaded.status == 0, f"kvm_intel tdx=1 did not load: {loaded.output}"
    return machine


def records_since(machine: Machine, start: int) -> list[TraceRecord]:
    return machine.module.trace.records[start:]


def vp_entries(records: list[TraceRecord]) -> list[TraceRecord]:
    return [r for r in records if r.number == Leaf.TDH_VP_ENTER]


PAUSED, RESUME = "/tmp/tdx-agent.paused", "/tmp/tdx-agent.resume"  # tdx-agent.c's pause step
AGENT_OUT = "/tmp/tdx-agent.out"


def start_paused_agent(machine: Machine, steps: list[str]) -> None:
    """Start the agent in the background on ``steps``, one of them "pause", and return once it
    waits there (holding whatever the steps before built); resume_agent() lets it go on."""
    started = machine.run(f"rm -f {PAUSED} {RESUME}; {AGENT} {' '.join(steps)} > {AGENT_OUT} 2>&1 & "
                          f"agent=$!; i=0; while [ ! -e {PAUSED} ] && [ $i -lt 3000 ]; do sleep 0.2; "
                          f"i=$((i+1)); done; [ -e {PAUSED} ]", KVM_TIMEOUT)
    assert started.status == 0, f"the agent never paused: {machine.run(f'cat {AGENT_OUT}', 30).output}"


def resume_agent(machine: Machine, steps: list[str]) -> AgentRun:
    """Let the paused agent of start_paused_agent() finish; its run, every step reported."""
    ended = machine.run(f"touch {RESUME}; wait $agent; cat {AGENT_OUT}", KVM_TIMEOUT)
    results = [AgentStep.parse(line) for line in ended.output.splitlines() if line.startswith("{")]
    assert [r.step for r in results] == [step.split(":")[0] for step in steps], ended.output
    return AgentRun(" ".join([AGENT, *steps]), results)


def tdx_misc_capacity(machine: Machine) -> int:
    """The misc cgroup's "tdx" capacity (0 when the root's misc.capacity has no tdx line). The
    root's misc files appear once the controller is enabled for a child."""
    mounted = machine.run("grep -q '^none /sys/fs/cgroup cgroup2' /proc/mounts || "
                          "{ mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup && "
                          "echo +misc > /sys/fs/cgroup/cgroup.subtree_control; }", KVM_TIMEOUT)
    assert mounted.status == 0, mounted.output
    capacity = machine.run("cat /sys/fs/cgroup/misc.capacity", KVM_TIMEOUT).output.split()
    return int(capacity[capacity.index("tdx") + 1]) if "tdx" in capacity else 0


def assert_no_td_left(machine: Machine) -> None:
    """After teardown the module holds no TD, no page it assigned to one, and every guest
    KeyID is free again (only the module's global KeyID is taken)."""
    state = machine.module.state
    assert not state.tds, f"TDs left in the module: {[hex(tdr) for tdr in state.tds]}"
    assert not state.pages, f"pages still assigned: {[(hex(pa << 12), o) for pa, o in state.pages.items()][:8]}"
    assert set(state.kot) == {state.global_keyid}, f"KeyIDs not freed: {state.kot}"


# Long enough that a CPU left inside a SEAMCALL stays there for the whole scenario (the default
# 10 s could end its exchange before the crash or #MC it is meant to be caught by).
HOLD_APPEND = "tdx_sw_module.timeout_ms=60000"
HOLD_TIMEOUT = 60.0  # from the background read to the module having the call
HOLD_POLL = 0.2


def load_tdx_host(machine: Machine) -> None:
    loaded = machine.run(LOAD_TDX_HOST, 60)
    assert loaded.status == 0, f"tdx_host did not load: {loaded.output[-300:]}"


def hold_inside_seamcall(machine: Machine, cpu: int) -> TraceRecord:
    """Leave CPU ``cpu`` inside a SEAMCALL, holding the shim's wire: a P-SEAMLDR.INFO (a read of
    tdx_host's seamldr_version pinned to that CPU) whose answer the module withholds. The machine
    must have booted with HOLD_APPEND and loaded tdx_host (load_tdx_host()). Returns the held call
    once the module has it."""
    trace = machine.module.trace
    mark = len(trace)
    machine.module.faults.add(withheld(SeamldrLeaf.SEAMLDR_INFO, cpu=cpu))
    started = machine.run(f"(taskset -c {cpu} cat {SEAMLDR_VERSION} > /dev/null 2>&1 &)", 30)
    assert started.status == 0, f"the background read did not start: {started.output[-300:]}"
    deadline = Deadline.after(HOLD_TIMEOUT)
    while not (held := [r for r in trace.records[mark:]
                        if r.fn == SeamldrLeaf.SEAMLDR_INFO and r.injected and r.cpu == cpu]):
        assert not deadline.expired(), (f"no SEAMLDR.INFO from CPU {cpu} reached the module within "
                                        f"{HOLD_TIMEOUT:.0f} s; trace: {trace.records[mark:]}")
        time.sleep(HOLD_POLL)
    return held[0]
