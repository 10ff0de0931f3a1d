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
"""

from __future__ import annotations

import errno
import os

import pytest
from checks import (
    FINALIZED,
    KVM_TIMEOUT,
    assert_no_td_left,
    kernel_log,
    kvm_machine,
    records_since,
    resume_agent,
    start_paused_agent,
    tdx_misc_capacity,
)

from harness.machine.base import Machine
from harness.observe.kvm import (
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
