"""KVM_TDX_GET_CPUID and the life of kvm_intel around TDs (arch/x86/kvm/vmx/tdx.c and main.c,
Linux 7.3), on a machine with VMX (``vmx_boot``).

GET_CPUID reads the TD's CPUID back from the module (TDH.MNG.RD of CPUID_VALUES): the entries and
reads expected are KVM's rules (observe/kvm.py td_cpuid_readback()) applied to the CPUID the
software module stored at TDH.MNG.INIT, read from its state while the agent holds the TD.

Unloading kvm_intel runs vt_exit(): kvm_exit() (kvm_uninit_virtualization(): per CPU
tdx_disable_virtualization_cpu(), which flushes only vCPUs still associated with the CPU, then
vmx_disable_virtualization_cpu(), whose x86_virt_put_ref() leaves VMX on since the TDX core holds
a reference of its own) and vmx_exit() (tdx_hardware_unsetup(): the misc cgroup's tdx capacity to
0). None of it issues a SEAMCALL: TDH.SYS.* teardown is the core's, at reboot. Loading again
(tdx_hardware_setup()) takes the core's cached tdx_get_sysinfo(): no SEAMCALL either. kvm itself
is built in (LOAD_KVM_INTEL): only kvm_intel comes and goes.

A TD alive across kexec or a crash is left to the next kernel's TDH.SYS.INIT; what the dying
kernel issues first is read from the shutdown and crash paths named in each scenario.
"""

from __future__ import annotations

import errno
import os

import pytest
from checks import (
    CRASHKERNEL,
    KVM_TIMEOUT,
    assert_initialized,
    assert_no_td_left,
    console_log,
    crash_records,
    kernel_log,
    kvm_machine,
    records_since,
    resume_agent,
    start_paused_agent,
    tdx_misc_capacity,
)

from harness.machine.base import Machine
from harness.machine.transitions import CrashDump, Kexec, run_steps
from harness.observe import patterns
from harness.observe.crash import classify, unexpected
from harness.observe.kvm import (
    FINALIZED,
    LOAD_KVM_INTEL,
    TD_MD_FIELD_ID_CPUID_VALUES,
    TO_MEMORY,
    UNLOAD_KVM_INTEL,
    cpuid_entries,
    run_agent,
    td_cpuid_readback,
)
from harness.seam.abi import Leaf

pytestmark = [pytest.mark.vm, pytest.mark.vmx]

TO_VCPU = list(TO_MEMORY[:TO_MEMORY.index("set_cpuid")])  # up to a created, uninitialized vCPU
CPUID_FIELD_CODE = 0xFFFFFF  # the leaf/subleaf/element bits tdx_read_cpuid() ORs into the field id


def cpuid_reads(machine: Machine, start: int) -> list[tuple[int, bool]]:
    """The TDH.MNG.RDs of CPUID_VALUES since ``start``: field id and whether the module answered."""
    return [(r.inputs["rdx"], r.status == 0) for r in records_since(machine, start)
            if r.number == Leaf.TDH_MNG_RD and r.inputs["rdx"] & ~CPUID_FIELD_CODE == TD_MD_FIELD_ID_CPUID_VALUES]


def test_kvm_get_cpuid_reads_back_the_cpuid_the_module_keeps(vmx_boot):
    """A buffer of one entry gets -E2BIG and the count needed; a full one the TD's CPUID, before
    and after INIT_VCPU (only TD-scope metadata is read); input hw_error and a finalized TD get
    -EINVAL before any read (tdx_get_cmd(), tdx_vcpu_ioctl())."""
    machine = kvm_machine(vmx_boot)
    offered = 256
    steps = [*TO_VCPU, "get_cpuid:nent=1", f"get_cpuid:nent={offered}", "set_cpuid", "init_vcpu",
             f"get_cpuid:nent={offered}", "get_cpuid:hw_error=1", "pause", "memory", "init_mem_region",
             "finalize", "get_cpuid", "destroy"]
    start = len(machine.module.trace)
    start_paused_agent(machine, steps)
    [td] = machine.module.state.tds.values()
    assert td.params is not None, "the TD the agent holds has no TD_PARAMS"
    expected = td_cpuid_readback(td.cpuid, 52 if td.params.gpaw else 48)
    run = resume_agent(machine, steps)
    assert not [s for s in run.failed() if s.step != "get_cpuid"], run.failed()

    small, before_init, after_init, hw_error, finalized = run.all("get_cpuid")
    seen = [(s.ret if s.ok else -s.errno, s.outputs["nent"]) for s in (small, before_init, after_init)]
    assert seen == [expected.answer(1), expected.answer(offered), expected.answer(offered)], \
        f"(ret, nent) seen {seen}, KVM's rules on the module's CPUID give {len(expected.entries)} entries"
    for step in (before_init, after_init):
        assert cpuid_entries(step) == expected.entries, \
            f"GET_CPUID gave {cpuid_entries(step)}, the module keeps {expected.entries}"
    assert cpuid_entries(small) == [], "on -E2BIG KVM copies no entry"
    refused = [(s.ok, s.errno) for s in (hw_error, finalized)]
    assert refused == [(False, errno.EINVAL)] * 2, f"hw_error set, then finalized: {refused}, expected EINVAL"
    # Three calls read; each read the same fields, failing where the module has no such leaf.
    reads = cpuid_reads(machine, start)
    assert reads == expected.reads * 3, \
        f"TDH.MNG.RD of CPUID_VALUES (field, answered): seen {reads}, expected three times {expected.reads}"
    assert_no_td_left(machine)
    kernel_log(machine)  # the failed reads print nothing: KVM takes them as "no such leaf"


def unload_kvm_intel(machine: Machine) -> None:
    """rmmod kvm_intel succeeds with no SEAMCALL, and the tdx misc capacity goes to 0."""
    start = len(machine.module.trace)
    unloaded = machine.run(UNLOAD_KVM_INTEL, KVM_TIMEOUT)
    assert unloaded.status == 0, f"{UNLOAD_KVM_INTEL}: {unloaded.output.strip()}"
    assert machine.run("test -e /sys/module/kvm_intel", KVM_TIMEOUT).status != 0, "kvm_intel outlived rmmod"
    calls = [r.leaf for r in records_since(machine, start)]
    assert calls == [], f"the unload issued SEAMCALLs {calls}; vt_exit() issues none"
    capacity = tdx_misc_capacity(machine)
    assert capacity == 0, f"tdx misc capacity {capacity} after the unload; tdx_hardware_unsetup() sets 0"


def load_kvm_intel(machine: Machine) -> None:
    """insmod kvm_intel tdx=1 succeeds with no SEAMCALL; the capacity is the guest KeyIDs again."""
    start = len(machine.module.trace)
    loaded = machine.run(LOAD_KVM_INTEL, KVM_TIMEOUT)
    assert loaded.status == 0, f"kvm_intel tdx=1 did not load again: {loaded.output.strip()}"
    calls = [r.leaf for r in records_since(machine, start)]
    assert calls == [], f"the load issued SEAMCALLs {calls}; tdx_hardware_setup() issues none"
    keyids = machine.module.platform.nr_tdx_keyids - 1  # the TDX range less the global KeyID
    capacity = tdx_misc_capacity(machine)
    assert capacity == keyids, f"tdx misc capacity {capacity} after the load, expected {keyids}"


def test_kvm_intel_unloads_and_reloads_before_and_after_tds(vmx_boot):
    """Unload with no TD ever created, load again and run a TD's whole life, unload after it,
    load again and run a second one: every step clean, the module left with no TD, page or
    guest KeyID, and the kernel log without trouble."""
    machine = kvm_machine(vmx_boot)
    start = len(machine.module.trace)
    unload_kvm_intel(machine)
    for life in (1, 2):
        load_kvm_intel(machine)
        run = run_agent(machine, [*FINALIZED, "destroy"], KVM_TIMEOUT)
        assert not run.failed(), f"TD life {life} after a reload: {run.failed()}"
        assert_no_td_left(machine)
        unload_kvm_intel(machine)
    failed = [(r.leaf, r.status_name) for r in records_since(machine, start) if r.status]
    assert not failed, f"SEAMCALLs failed: {failed}"
    kernel_log(machine)


# The files that pin kvm_intel while the agent holds a TD: kvm_init() makes it the owner of
# /dev/kvm's, the VM's, the vCPU's and guest_memfd's file operations (kvm_main.c, guest_memfd.c).
PINNING_FILES = ("/dev/kvm", "VM", "vCPU", "guest_memfd")


def test_kvm_intel_unload_refused_while_a_td_lives(vmx_boot):
    """rmmod kvm_intel with a finalized TD alive fails in try_stop_module() (-EWOULDBLOCK: the
    agent's KVM files hold references) before vt_exit() runs: no SEAMCALL, the TD intact in the
    module. Once the agent has torn it down, the unload goes through."""
    machine = kvm_machine(vmx_boot)
    steps = [*FINALIZED, "pause", "destroy"]
    start_paused_agent(machine, steps)
    state = machine.module.state
    held = (set(state.tds), dict(state.pages), dict(state.kot))
    assert held[0], "no TD in the module while the agent holds one"
    start = len(machine.module.trace)
    refused = machine.run(UNLOAD_KVM_INTEL, KVM_TIMEOUT)
    assert refused.status != 0 and os.strerror(errno.EWOULDBLOCK) in refused.output, \
        f"{UNLOAD_KVM_INTEL} with a TD alive: status {refused.status}, {refused.output.strip()!r}; expected EWOULDBLOCK"
    refcnt = machine.run("cat /sys/module/kvm_intel/refcnt", KVM_TIMEOUT).output.strip()
    assert refcnt == str(len(PINNING_FILES)), f"kvm_intel refcnt {refcnt}, expected one per {PINNING_FILES}"
    calls = [r.leaf for r in records_since(machine, start)]
    assert calls == [], f"the refused unload issued SEAMCALLs {calls}"
    state = machine.module.state
    assert (set(state.tds), state.pages, state.kot) == held, "the TD changed in the module across the refused unload"
    run = resume_agent(machine, steps)
    assert not run.failed(), run.failed()
    assert_no_td_left(machine)
    unload_kvm_intel(machine)
    kernel_log(machine)


def test_kexec_with_a_td_alive_flushes_its_vcpu_then_disables_the_module(vmx_boot):
    """kexec -e while the paused agent holds a finalized TD. syscore_shutdown() runs the
    .shutdown ops in reverse registration order: KVM's (registered when kvm_intel loaded) before
    the TDX core's (at boot). kvm_shutdown() sets virt_rebooting and disables virtualization on
    each CPU, where tdx_disable_virtualization_cpu() flushes the vCPU associated with it
    (TDH.VP.FLUSH); then tdx_shutdown() issues TDH.SYS.DISABLE. Nothing tears the TD down. The
    next kernel initializes the module from TDH.SYS.INIT, which starts it afresh without the old
    TD, and runs a TD's whole life once kvm_intel is loaded again."""
    machine = kvm_machine(vmx_boot, append="retain_initrd")  # the initramfs Kexec() boots again
    steps = [*FINALIZED, "pause", "destroy"]
    start_paused_agent(machine, steps)
    [td] = machine.module.state.tds.values()
    [kexec] = run_steps(machine, [Kexec()])
    dying = [(r.leaf, r.inputs["rcx"] if r.number == Leaf.TDH_VP_FLUSH else None, r.status)
             for r in records_since(machine, kexec.trace_start) if r.boot == kexec.boots_before]
    expected = [("TDH.VP.FLUSH", td.vcpus[0], 0), ("TDH.SYS.DISABLE", None, 0)]
    assert dying == expected, f"the old kernel's last SEAMCALLs: {dying}, expected {expected}"
    assert kexec.boots_after == kexec.boots_before + 1, "kexec did not boot a new kernel"
    assert_initialized(machine, kexec.boots_after)
    assert_no_td_left(machine)
    # The old kernel: KVM left virtualization before the new kernel started, without trouble.
    console = console_log(machine)
    exiting, starting = console.find(patterns.KVM_EXITING_VIRTUALIZATION), console.find(patterns.KEXEC_STARTING)
    assert exiting is not None and starting is not None, "no KVM shutdown or no kexec start on the console"
    assert console.records.index(exiting) < console.records.index(starting), \
        "KVM's shutdown message came after the new kernel started"
    surprises = unexpected(classify(console.records))
    assert not surprises, f"kernel trouble on the console across the kexec: {surprises}"
    load_kvm_intel(machine)
    run = run_agent(machine, [*FINALIZED, "destroy"], KVM_TIMEOUT)
    assert not run.failed(), f"TD life after the kexec: {run.failed()}"
    assert_no_td_left(machine)
    kernel_log(machine)


def test_kdump_with_a_td_alive_disables_the_module_and_the_capture_kernel_runs_a_td(vmx_boot):
    """A panic while the paused agent holds a finalized TD: native_machine_crash_shutdown()
    issues TDH.SYS.DISABLE, then x86_virt_emergency_disable_virtualization_cpu() runs KVM's
    emergency callback (vmx_emergency_disable_virtualization_cpu(): VMCLEAR only) and VMXOFF, so
    the dying kernel's only SEAMCALL is SYS.DISABLE: no TDH.VP.FLUSH, no teardown. The capture
    kernel initializes the module afresh and runs a TD's whole life once kvm_intel is loaded."""
    # The capture kernel boots the retained initramfs, in the crashkernel reservation.
    machine = kvm_machine(vmx_boot, memory="2G", append=f"{CRASHKERNEL} retain_initrd")
    steps = [*FINALIZED, "pause", "destroy"]
    start_paused_agent(machine, steps)
    [crash] = run_steps(machine, [CrashDump()])
    crashing, _ = crash_records(crash, machine)
    calls = [(r.leaf, r.status) for r in crashing]
    assert calls == [("TDH.SYS.DISABLE", 0)], f"the crashing kernel's SEAMCALLs: {calls}, expected SYS.DISABLE only"
    assert crash.boots_after == crash.boots_before + 1, "no capture kernel booted"
    assert_initialized(machine, crash.boots_after)
    assert_no_td_left(machine)
    load_kvm_intel(machine)
    run = run_agent(machine, [*FINALIZED, "destroy"], KVM_TIMEOUT)
    assert not run.failed(), f"TD life in the capture kernel: {run.failed()}"
    assert_no_td_left(machine)
    kernel_log(machine)
