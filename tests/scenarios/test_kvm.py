"""KVM's TDX ioctls (arch/x86/kvm/vmx/tdx.c, Linux 7.3) driven by the guest agent on a machine
with VMX: QEMU with KVM where the host nests VMX, else Bochs's emulated VMX (``vmx_boot``).

The real kvm_intel runs in the guest; every SEAMCALL it issues reaches the software module. The
expected figures come from the kernel's rules (harness/observe/kvm.py) and from the TDX module
ABI (the MRTD below is computed here, from the spec, not by the module's code), never from the
output under test.
"""

from __future__ import annotations

import errno
import hashlib

import pytest
from checks import (
    KVM_TIMEOUT,
    assert_kvm_refused_tdx,
    assert_no_td_left,
    kernel_log,
    kvm_machine,
    records_since,
    tdx_misc_capacity,
    vp_entries,
)

from harness.observe import patterns
from harness.observe.kvm import (
    FINALIZED,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_INTEL_KO,
    KVM_SYSTEM_EVENT_TDX_FATAL,
    LOAD_KVM_INTEL,
    TO_MEMORY,
    USER_TDVMCALLINFO_1_R11,
    VCPU_REGS_R11,
    VCPU_REGS_R12,
    AgentRun,
    cpuid_entries,
    offered_cpuid,
    run_agent,
    supported_attrs,
    supported_xfam,
    tdx_hardware_setup_refusal,
)
from harness.seam import abi, exits
from harness.seam.abi import Leaf, OperandId, Status
from harness.seam.faults import FaultPlan, busy
from harness.seam.platform import PlatformConfig
from harness.seam.trace import TraceRecord

pytestmark = [pytest.mark.vm, pytest.mark.vmx]

TIMEOUT = KVM_TIMEOUT
KVM_X86_TDX_VM = 5
PAGE = 4096
MR_EXTEND_CHUNK = 256


# --- the spec's MRTD, computed independently of harness/seam/measure.py --------------------------


def agent_pages(seed: int, pages: int) -> bytes:
    """The bytes tdx-agent's fill_pages() writes: xorshift32 (13, 17, 5) words, little-endian."""
    x, out = seed or 1, bytearray()
    for _ in range(pages * PAGE // 4):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out += x.to_bytes(4, "little")
    return bytes(out)


def mrtd(regions: list[tuple[int, int, int, bool]]) -> bytes:
    """SHA-384 over the TDX module ABI's 128-byte extension records: per page TDH.MEM.PAGE.ADD
    ("MEM.PAGE.ADD", GPA); per 256-byte chunk of a measured page TDH.MR.EXTEND ("MR.EXTEND",
    GPA) followed by the chunk. ``regions``: (gpa, pages, seed, measured)."""
    sha = hashlib.sha384()

    def record(name: bytes, gpa: int) -> bytes:
        return name + bytes(16 - len(name)) + gpa.to_bytes(8, "little") + bytes(104)

    for gpa, pages, seed, measured in regions:
        data = agent_pages(seed, pages)
        for page in range(pages):
            page_gpa = gpa + page * PAGE
            sha.update(record(b"MEM.PAGE.ADD", page_gpa))
            for offset in range(0, PAGE if measured else 0, MR_EXTEND_CHUNK):
                sha.update(record(b"MR.EXTEND", page_gpa + offset))
                sha.update(data[page * PAGE + offset:page * PAGE + offset + MR_EXTEND_CHUNK])
    return sha.digest()


def finalized_mrtd(records: list[TraceRecord]) -> bytes:
    [final] = [r for r in records if r.number == Leaf.TDH_MR_FINALIZE and r.status == 0]
    assert final.note and final.note.startswith("MRTD "), final
    return bytes.fromhex(final.note.split()[1])


# --- scenarios ------------------------------------------------------------------------------


def test_kvm_capabilities_match_the_module_and_cgroup_capacity(vmx_boot):
    machine = kvm_machine(vmx_boot)
    assert machine.run("cat /sys/module/kvm_intel/parameters/tdx", TIMEOUT).output.strip() == "Y"
    start = len(machine.module.trace)
    run = run_agent(machine, ["vm_types", "supported_cpuid", "create_vm", "capabilities", "destroy"], TIMEOUT)
    assert not run.failed(), run.failed()
    assert run["vm_types"].ret & 1 << KVM_X86_TDX_VM, "KVM_CAP_VM_TYPES lacks KVM_X86_TDX_VM"
    platform, caps = machine.module.platform, run["capabilities"]
    assert caps.outputs["supported_attrs"] == supported_attrs(platform)
    assert caps.outputs["supported_xfam"] == supported_xfam(platform, run["supported_cpuid"].outputs["xcr0"])
    assert caps.outputs["user_tdvmcallinfo_1_r11"] == USER_TDVMCALLINFO_1_R11
    assert cpuid_entries(caps) == [offered_cpuid(c) for c in platform.cpuid_config]
    # CAPABILITIES answers from what the core read at boot: no SEAMCALL.
    assert [r.leaf for r in records_since(machine, start)] == []
    # The misc cgroup's tdx capacity is the guest KeyIDs: the TDX range less the global KeyID.
    assert tdx_misc_capacity(machine) == platform.nr_tdx_keyids - 1


# Module configurations kvm_intel tdx=1 refuses to load on (__tdx_hardware_setup(): no TD
# attributes or XFAM that both support): a forced attribute outside KVM_SUPPORTED_TDX_TD_ATTRS,
# and forced AMX XFAM bits (17, 18) that Bochs's CPU, hence KVM's XCR0, lacks (QEMU on an AMX
# host supports them: there the model expects the load to succeed).
AMX_XFAM = 0x3 << 17  # XTILECFG, XTILEDATA
UNOFFERED = {
    "forced_debug_attribute": {"attributes_fixed1": abi.TD_ATTR_DEBUG},
    "forced_amx_xfam": {"xfam_fixed0": PlatformConfig.xfam_fixed0 | AMX_XFAM,
                        "xfam_fixed1": PlatformConfig.xfam_fixed1 | AMX_XFAM},
    "max_vcpus_below_cpus": {"max_vcpus_per_td": 0},  # the one refusal KVM prints
}


@pytest.mark.parametrize("name", list(UNOFFERED))
def test_kvm_intel_refuses_a_module_it_cannot_offer_tds_on(vmx_boot, platform_config, name):
    machine = vmx_boot(platform=platform_config(**UNOFFERED[name]))
    # KVM's XCR0, from kvm_intel loaded without TDX.
    assert machine.run(f"insmod {KVM_INTEL_KO}", TIMEOUT).status == 0
    xcr0 = run_agent(machine, ["supported_cpuid"], TIMEOUT)["supported_cpuid"].outputs["xcr0"]
    assert machine.run("rmmod kvm_intel", TIMEOUT).status == 0
    platform = machine.module.platform
    why = tdx_hardware_setup_refusal(platform, xcr0, len(platform.cpus))
    loaded = machine.run(LOAD_KVM_INTEL, TIMEOUT)
    if why is None:
        assert loaded.status == 0, f"kvm_intel tdx=1 refused a module KVM's rules accept: {loaded.output}"
    else:
        assert_kvm_refused_tdx(machine, loaded, why)
    log = kernel_log(machine)
    said = [m.string for m in log.matches(patterns.KVM_MAX_VCPUS_REFUSED)]
    assert bool(said) == (why is not None and "MAX_VCPU_PER_TD" in why), \
        f"KVM prints its refusal only for MAX_VCPU_PER_TD; refusal {why!r}, printed {said}"


def test_kvm_full_flow_to_finalize_measures_and_tears_down(vmx_boot):
    machine = kvm_machine(vmx_boot)
    start = len(machine.module.trace)
    regions = [(0, 4, 7, True), (0x10000, 2, 9, False)]
    run = run_agent(machine, [*TO_MEMORY,
                              *(f"init_mem_region:gpa={gpa}:pages={n}:seed={seed}:measure={int(m)}"
                                for gpa, n, seed, m in regions), "finalize"], TIMEOUT)
    assert not run.failed(), run.failed()
    assert [s.outputs["pages_added"] for s in run.steps if s.step == "init_mem_region"] == [4, 2]
    records = records_since(machine, start)
    failed = [(r.leaf, r.status_name) for r in records if r.status]
    assert not failed, f"SEAMCALLs failed: {failed}"
    count = {leaf: sum(r.number == leaf for r in records) for leaf in Leaf}
    packages = len(machine.module.platform.packages)
    assert count[Leaf.TDH_MNG_CREATE] == 1 and count[Leaf.TDH_MNG_KEY_CONFIG] == packages
    assert count[Leaf.TDH_MEM_PAGE_ADD] == 6
    assert count[Leaf.TDH_MR_EXTEND] == 4 * PAGE // MR_EXTEND_CHUNK
    assert finalized_mrtd(records) == mrtd(regions)
    # The agent exited: KVM destroyed the TD, reclaimed every page and freed the HKID.
    for leaf in (Leaf.TDH_MNG_VPFLUSHDONE, Leaf.TDH_MNG_KEY_FREEID, Leaf.TDH_PHYMEM_PAGE_RECLAIM):
        assert count[leaf], f"teardown issued no {leaf.name}"
    assert_no_td_left(machine)
    kernel_log(machine).expect_absent(patterns.SEAMCALL_FAILED)


def errno_of(run: AgentRun, step: str) -> int:
    found = run[step]
    return -found.errno if not found.ok else found.ret


# Each case: the agent's steps, the step whose result is checked, and the kernel's answer
# (tdx.c in 7.3: tdx_get_capabilities, tdx_td_init/setup_tdparams, tdx_vcpu_create, tdx_vcpu_init,
# tdx_vcpu_init_mem_region, tdx_td_finalize, tdx_get_cmd).
ERROR_MATRIX = {
    "capabilities_too_few_entries": (["create_vm", "capabilities:nent=1"], "capabilities", -errno.E2BIG),
    "capabilities_flags": (["create_vm", "capabilities:flags=1"], "capabilities", -errno.EINVAL),
    "hw_error_set_on_input": (["create_vm", "capabilities:hw_error=1"], "capabilities", -errno.EINVAL),
    "init_vm_unsupported_attribute": (["create_vm", "split_irqchip", "init_vm:attributes=1"], "init_vm",
                                      -errno.EINVAL),  # DEBUG is not in KVM's supported attrs
    "init_vm_unsupported_xfam": (["create_vm", "init_vm:xfam=0x40003"], "init_vm", -errno.EINVAL),
    "init_vm_gpaw_40": (["create_vm", "init_vm:gpaw=40"], "init_vm", -errno.EINVAL),
    "init_vm_leaf_without_slot": (["create_vm", "init_vm:extra_leaf=0x40000000"], "init_vm", -errno.EINVAL),
    "init_vm_twice": (["create_vm", "split_irqchip", "init_vm", "init_vm"], "init_vm", -errno.EINVAL),
    "vcpu_before_init_vm": (["create_vm", "split_irqchip", "create_vcpu"], "create_vcpu", -errno.EIO),
    "vcpu_without_split_irqchip": (["create_vm", "init_vm", "create_vcpu"], "create_vcpu", -errno.EINVAL),
    "init_vcpu_without_x2apic_cpuid": (["create_vm", "x2apic_api", "split_irqchip", "init_vm", "create_vcpu",
                                        "init_vcpu"], "init_vcpu", -errno.EINVAL),
    "init_vcpu_twice": ([*TO_MEMORY[:8], "init_vcpu"], "init_vcpu", -errno.EINVAL),
    "mem_region_before_init_vcpu": ([*TO_MEMORY[:7], "memory", "init_mem_region"], "init_mem_region",
                                    -errno.EINVAL),
    "mem_region_not_private": ([*TO_MEMORY[:8], "memory:private=0", "init_mem_region"], "init_mem_region",
                               -errno.EINVAL),
    "mem_region_no_source": ([*TO_MEMORY, "init_mem_region:source=0"], "init_mem_region", -errno.EINVAL),
    "finalize_before_init_vm": (["create_vm", "finalize"], "finalize", -errno.EINVAL),
    "finalize_twice": ([*TO_MEMORY, "init_mem_region", "finalize", "finalize"], "finalize", -errno.EINVAL),
    "mem_region_after_finalize": ([*TO_MEMORY, "init_mem_region", "finalize", "init_mem_region:gpa=0x1000"],
                                  "init_mem_region", -errno.EINVAL),
}


def test_kvm_order_and_argument_errors_return_the_kernels_errno(vmx_boot):
    """Every case on one machine, each in a VM of its own; afterwards no SEAMCALL failed, the
    kernel logged no trouble, and no TD is left in the module."""
    machine = kvm_machine(vmx_boot)
    start = len(machine.module.trace)
    seen = {name: errno_of(run_agent(machine, steps, TIMEOUT), step)
            for name, (steps, step, _) in ERROR_MATRIX.items()}
    expected = {name: want for name, (_, _, want) in ERROR_MATRIX.items()}
    assert seen == expected
    failed = [(r.leaf, r.status_name) for r in records_since(machine, start) if r.status]
    assert not failed, f"SEAMCALLs failed: {failed}"
    assert_no_td_left(machine)
    kernel_log(machine)  # fails on any WARN, BUG or SEAMCALL error message


@pytest.mark.parametrize("leaf", [Leaf.TDH_MEM_SEPT_ADD, Leaf.TDH_MEM_PAGE_ADD])
def test_kvm_sept_contention_is_retried(vmx_boot, leaf):
    """TDX_OPERAND_BUSY on the S-EPT tree: KVM's mirror-EPT map returns -EBUSY and the fault is
    retried (kvm_tdp_mmu_map_private_pfn loops on RET_PF_RETRY), so INIT_MEM_REGION succeeds
    without a WARN, the measurement is unchanged and teardown leaks nothing."""
    calls = 3
    machine = kvm_machine(vmx_boot, FaultPlan([busy(leaf, calls, operand=OperandId.SEPT)]))
    start = len(machine.module.trace)
    run = run_agent(machine, [*TO_MEMORY, "init_mem_region:pages=2:seed=5", "finalize"], TIMEOUT)
    assert not run.failed(), run.failed()
    records = records_since(machine, start)
    busy_status = abi.with_operand(Status.TDX_OPERAND_BUSY, OperandId.SEPT)
    of_leaf = [r for r in records if r.number == leaf]
    assert [r.status for r in of_leaf[:calls]] == [busy_status] * calls
    assert all(r.status == 0 for r in of_leaf[calls:]) and of_leaf[calls:]
    assert finalized_mrtd(records) == mrtd([(0, 2, 5, True)])
    assert_no_td_left(machine)
    kernel_log(machine).expect_absent(patterns.SEAMCALL_FAILED)


# --- KVM_RUN: TDH.VP.ENTER answered with scripted exits ---------------------------------------------

def vendor_registers(vendor: str) -> tuple[int, int, int]:
    """CPUID leaf 0's EBX, ECX, EDX for a vendor string ("GenuineIntel": "Genu", "ntel", "ineI")."""
    raw = vendor.encode()
    return (int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[8:12], "little"),
            int.from_bytes(raw[4:8], "little"))


def test_kvm_run_handles_scripted_td_exits(vmx_boot):
    """KVM_RUN on a finalized TD, the guest scripted exit by exit: port I/O goes to userspace
    (out: the value; in: the agent's answer reaches the guest in R11), CPUID is answered by KVM
    from the vCPU's CPUID, an EPT violation on an unmapped private GPA is fixed by
    TDH.MEM.PAGE.AUG, a HLT with an interrupt pending re-enters at once, a fatal error reaches
    userspace as a SYSTEM_EVENT with the TD's registers, and a HLT with interrupts blocked keeps
    the vCPU in KVM_RUN until a signal."""
    machine = kvm_machine(vmx_boot)
    vendor = machine.run("grep -m1 vendor_id /proc/cpuinfo", TIMEOUT).output.split(":", 1)[1].strip()
    unmapped, in_value, fatal = 0x100000, 0x5A, 0xDEAD
    machine.module.exits.add(exits.io(0x3F8, 1, write=True, value=0x41), exits.io(0x3FD, 1, write=False),
                             exits.cpuid(0), exits.ept_violation(unmapped), exits.hlt(intr_pending=True),
                             exits.fatal_error(fatal), exits.hlt(irq_blocked=True))
    start = len(machine.module.trace)
    run = run_agent(machine, [*FINALIZED, "run", f"run:in={in_value}", "run", "run:timeout_ms=1000", "destroy"],
                    TIMEOUT)
    assert not [s for s in run.failed() if s.step != "run"], run.failed()
    out, port_in, fatal_exit, halted = run.all("run")
    assert (out.outputs["exit_reason"], out.outputs["direction"], out.outputs["port"], out.outputs["size"],
            out.outputs["data"]) == (KVM_EXIT_IO, KVM_EXIT_IO_OUT, 0x3F8, 1, 0x41)
    assert (port_in.outputs["exit_reason"], port_in.outputs["direction"], port_in.outputs["port"]) == \
        (KVM_EXIT_IO, KVM_EXIT_IO_IN, 0x3FD)
    assert (fatal_exit.outputs["exit_reason"], fatal_exit.outputs["type"]) == \
        (KVM_EXIT_SYSTEM_EVENT, KVM_SYSTEM_EVENT_TDX_FATAL)
    data = fatal_exit.outputs["data"]
    assert (data[VCPU_REGS_R11], data[VCPU_REGS_R12]) == (abi.Tdvmcall.REPORT_FATAL_ERROR, fatal)
    assert (halted.ret, halted.errno, halted.outputs["exit_reason"]) == (-1, errno.EINTR, KVM_EXIT_INTR)

    records = records_since(machine, start)
    entries = vp_entries(records)
    reasons = [r.status for r in entries]
    assert reasons == [abi.ExitReason.TDCALL] * 3 + [abi.ExitReason.EPT_VIOLATION] + [abi.ExitReason.TDCALL] * 3
    # What KVM handed back on each re-entry (the inputs of the next TDH.VP.ENTER).
    after_in, after_cpuid = entries[2].inputs, entries[3].inputs
    assert (after_in["r10"], after_in["r11"]) == (abi.TDVMCALL_STATUS_SUCCESS, in_value)
    assert (after_cpuid["r13"], after_cpuid["r14"], after_cpuid["r15"]) == vendor_registers(vendor)
    augs = [r for r in records if r.number == Leaf.TDH_MEM_PAGE_AUG]
    # RCX = GPA | level: 0, a 4K page; Linux 7.3 maps TD private memory 4K only
    # (tdx_gmem_max_mapping_level(), and tdx_sept_map_leaf_spte() refuses other levels).
    assert [r.inputs["rcx"] for r in augs] == [unmapped] and augs[0].status == 0
    assert entries[3].seq < augs[0].seq < entries[4].seq, "the AUG must come between the fault and re-entry"
    assert not [r for r in records if r.status and r.number != Leaf.TDH_VP_ENTER]
    assert_no_td_left(machine)
    kernel_log(machine).expect_absent(patterns.SEAMCALL_FAILED)


def test_kvm_run_busy_entry_retried_and_unaccepted_access_kills_the_td(vmx_boot):
    """Zero-step mitigation: TDH.VP.ENTER busy on the S-EPT tree is re-entered from KVM's fast
    path with no exit to userspace and no WARN; then an EPT violation on a private page the guest
    has not accepted is fatal for the VM (-EIO) with KVM's message, and teardown leaks nothing."""
    calls = 2
    machine = kvm_machine(vmx_boot, FaultPlan([busy(Leaf.TDH_VP_ENTER, calls, operand=OperandId.SEPT)]))
    machine.module.exits.add(exits.ept_violation(0x1000, pending=True))
    start = len(machine.module.trace)
    run = run_agent(machine, [*FINALIZED, "run", "destroy"], TIMEOUT)
    assert (run["run"].ret, run["run"].errno) == (-1, errno.EIO)
    entries = vp_entries(records_since(machine, start))
    busy_status = abi.with_operand(Status.TDX_OPERAND_BUSY, OperandId.SEPT)
    assert [r.status for r in entries] == [busy_status] * calls + [abi.ExitReason.EPT_VIOLATION]
    match = kernel_log(machine).expect(patterns.KVM_ACCESS_BEFORE_ACCEPT)
    assert (int(match["gpa"], 16), int(match["vcpu"])) == (0x1000, 0)
    assert_no_td_left(machine)
