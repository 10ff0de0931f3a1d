"""The agent's output parser on stored runs (tests/data/tdx-agent-flow.jsonl: the agent's lines
from a Bochs run of the whole flow; tdx-agent-run.jsonl: the flow then KVM_RUN through scripted
exits), and KVM's capability rules on constructed module configs."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from harness.machine.shell import CommandResult
from harness.observe.kvm import (
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_SUPPORTED_TD_ATTRS,
    KVM_SYSTEM_EVENT_TDX_FATAL,
    KVM_TDX_CPUID_NO_SUBLEAF,
    TD_MD_FIELD_ID_CPUID_VALUES,
    VCPU_REGS_R12,
    AgentError,
    CpuidEntry,
    MapGpaExit,
    map_gpa_exits,
    map_gpa_refusal,
    offered_cpuid,
    run_agent,
    shared_bit,
    supported_attrs,
    supported_xfam,
    td_cpuid_readback,
    tdx_hardware_setup_refusal,
)
from harness.seam import abi
from harness.seam.platform import CpuidConfig, CpuidValue, PlatformConfig

FLOW = Path(__file__).parent.parent / "data" / "tdx-agent-flow.jsonl"
RUN = FLOW.with_name("tdx-agent-run.jsonl")


class FakeGuest:
    def __init__(self, status: int, output: str) -> None:
        self.result = CommandResult(status, output)
        self.commands: list[str] = []

    def run(self, cmd: str, timeout: float) -> CommandResult:
        self.commands.append(cmd)
        return self.result


def stored_run(steps: list[str], path: Path = FLOW):
    return run_agent(FakeGuest(0, path.read_text()), steps, 5)


def test_stored_flow_parses_step_by_step() -> None:
    lines = FLOW.read_text().splitlines()
    run = stored_run([f"s{i}" for i in range(len(lines))])
    assert [s.step for s in run.steps][:3] == ["vm_types", "create_vm", "x2apic_api"]
    assert not run.failed()
    caps = run["capabilities"]
    assert caps.ioctl == "KVM_TDX_CAPABILITIES" and caps.outputs["supported_attrs"] == KVM_SUPPORTED_TD_ATTRS
    assert run["init_mem_region"].outputs["pages_added"] == 2
    with pytest.raises(KeyError, match="no step 'run'"):
        run["run"]


def test_stored_kvm_run_exits_parse_by_kind() -> None:
    """Port I/O out and in, the TD's fatal error as a system event, then a halted vCPU interrupted."""
    run = stored_run([f"s{i}" for i in range(len(RUN.read_text().splitlines()))], RUN)
    exits = run.all("run")
    assert [e.outputs["exit_reason"] for e in exits] == [KVM_EXIT_IO, KVM_EXIT_IO, KVM_EXIT_SYSTEM_EVENT,
                                                         KVM_EXIT_INTR]
    assert [e.outputs["direction"] for e in exits[:2]] == [KVM_EXIT_IO_OUT, KVM_EXIT_IO_IN]
    assert exits[2].outputs["type"] == KVM_SYSTEM_EVENT_TDX_FATAL and len(exits[2].outputs["data"]) == 16
    assert exits[2].outputs["data"][VCPU_REGS_R12] == 0xDEAD
    assert not exits[3].ok and exits[3].errno == errno.EINTR and run.failed() == [exits[3]]


def test_errno_and_failures() -> None:
    line = '{"step": "finalize", "ioctl": "KVM_TDX_FINALIZE_VM", "ret": -1, "errno": 22, "hw_error": 0}\n'
    run = run_agent(FakeGuest(0, "noise\n" + line), ["finalize"], 5)
    assert run["finalize"].errno == 22 and not run["finalize"].ok and run.failed() == [run["finalize"]]


def test_agent_that_stops_early_is_an_error_with_its_output() -> None:
    guest = FakeGuest(2, "tdx-agent: unknown step: bogus\n")
    with pytest.raises(AgentError, match="exited 2 after 0 of 1 steps:\ntdx-agent: unknown step"):
        run_agent(guest, ["bogus"], 5)
    assert guest.commands == ["tdx-agent bogus"]


def test_supported_attrs_and_xfam_follow_the_module_bounds() -> None:
    platform = PlatformConfig()
    assert supported_attrs(platform) == KVM_SUPPORTED_TD_ATTRS & platform.attributes_fixed0
    # A module that forces an attribute KVM does not offer: KVM offers none.
    assert supported_attrs(platform.replace(attributes_fixed1=1)) == 0
    assert supported_xfam(platform, 0x2E7) == 0x2E7 & platform.xfam_fixed0
    # KVM's XCR0 lacks a bit the module forces (SSE): no XFAM is possible.
    assert supported_xfam(platform, 0x1) == 0


def test_offered_cpuid_shows_gpaw_configurable_and_hides_tsx_and_waitpkg() -> None:
    gpaw = offered_cpuid(CpuidConfig(leaf=0x80000008, eax=0x3030))
    assert gpaw == CpuidEntry(0x80000008, 0, 0xFF3030, 0, 0, 0)
    leaf7 = offered_cpuid(CpuidConfig(leaf=7, subleaf=0, ebx=0xFFFFFFFF, ecx=0xFFFFFFFF))
    assert leaf7.ebx == 0xFFFFFFFF & ~((1 << 4) | (1 << 11)) and leaf7.ecx == 0xFFFFFFFF & ~(1 << 5)
    assert offered_cpuid(CpuidConfig(leaf=7, subleaf=1, ebx=0xFFFFFFFF)).ebx == 0xFFFFFFFF
    assert offered_cpuid(CpuidConfig(leaf=1)).index == 0  # "no subleaf" reads as index 0


# --- TDVMCALL<MapGPA> (tdx.c tdx_map_gpa(), __tdx_map_gpa()) --------------------------------------

SHARED_48 = 1 << 47


@pytest.mark.parametrize("gpa, size, exit_enabled, status", [
    (0x400000, 0x1000, False, abi.TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED),  # before the range checks
    (0x400000, 0, True, abi.TDVMCALL_STATUS_INVALID_OPERAND),  # gpa + size <= gpa
    (1 << 48, 0x1000, True, abi.TDVMCALL_STATUS_INVALID_OPERAND),  # beyond MAXPHYADDR
    (SHARED_48 - 0x1000, 0x2000, True, abi.TDVMCALL_STATUS_INVALID_OPERAND),  # private into shared
    (0x400800, 0x1000, True, abi.TDVMCALL_STATUS_ALIGN_ERROR),
    (0x400000, 0x800, True, abi.TDVMCALL_STATUS_ALIGN_ERROR),
    (SHARED_48 | 0x400000, 0x3000, True, None),
    (0x400000, 0x3000, True, None),
])
def test_map_gpa_refusal_follows_tdx_map_gpa(gpa, size, exit_enabled, status):
    assert map_gpa_refusal(gpa, size, gpaw=48, maxphyaddr=48, exit_enabled=exit_enabled) == status


def test_map_gpa_goes_to_userspace_in_2m_pieces_without_the_shared_bit():
    assert map_gpa_exits(SHARED_48 | 0x400000, 0x300000, gpaw=48) == [
        MapGpaExit(0x400000, 512, KVM_MAP_GPA_RANGE_DECRYPTED), MapGpaExit(0x600000, 256, KVM_MAP_GPA_RANGE_DECRYPTED)]
    assert map_gpa_exits(0x400000, 0x1000, gpaw=48) == [MapGpaExit(0x400000, 1, KVM_MAP_GPA_RANGE_ENCRYPTED)]
    assert shared_bit(52) == 1 << 51


# --- KVM_TDX_GET_CPUID (tdx.c tdx_vcpu_get_cpuid(), tdx_read_cpuid()) -----------------------------

NA = KVM_TDX_CPUID_NO_SUBLEAF


def field(leaf: int, subleaf: int, element: int = 0) -> int:
    return TD_MD_FIELD_ID_CPUID_VALUES | abi.cpuid_field_code(leaf, subleaf, element)


def test_get_cpuid_reads_each_leaf_without_a_subleaf_then_subleaf_by_subleaf():
    """Leaves 0..7 and 0x80000000..0x80000008: a leaf the TD lacks costs two failed reads (no
    subleaf, then subleaf 0), leaf 7 one failed read then its subleaves until 7.2 fails; the
    subleaves carry SIGNIFCANT_INDEX, and 0x80000008.EAX[23:16] is the GPAW."""
    td = {(0, NA): CpuidValue(eax=7), (1, NA): CpuidValue(1, 2, 3, 4), (7, 0): CpuidValue(eax=1, ebx=5),
          (7, 1): CpuidValue(eax=6), (0x80000000, NA): CpuidValue(eax=0x80000008),
          (0x80000008, NA): CpuidValue(eax=0x00FF302E, ebx=0x200)}
    readback = td_cpuid_readback(td, gpaw=48)
    significant = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    assert readback.entries == [CpuidEntry(0, 0, 7, 0, 0, 0), CpuidEntry(1, 0, 1, 2, 3, 4),
                                CpuidEntry(7, 0, 1, 5, 0, 0, significant), CpuidEntry(7, 1, 6, 0, 0, 0, significant),
                                CpuidEntry(0x80000000, 0, 0x80000008, 0, 0, 0),
                                CpuidEntry(0x80000008, 0, 0x0030302E, 0x200, 0, 0)]
    assert readback.reads[:4] == [(field(0, NA), True), (field(0, NA, 1), True), (field(1, NA), True),
                                  (field(1, NA, 1), True)]
    assert readback.reads[4:6] == [(field(2, NA), False), (field(2, 0), False)]
    assert [r for r in readback.reads if r[0] & ~1 in (field(7, NA), field(7, 0), field(7, 1), field(7, 2))] == [
        (field(7, NA), False), (field(7, 0), True), (field(7, 0, 1), True), (field(7, 1), True),
        (field(7, 1, 1), True), (field(7, 2), False)]
    # leaves 0 and 1, 2-6 missing, leaf 7's six, 0x80000000, 0x80000001-7 missing, 0x80000008
    assert len(readback.reads) == 2 + 2 + 5 * 2 + 6 + 2 + 7 * 2 + 2
    assert readback.answer(1) == (-errno.E2BIG, 6)
    assert readback.answer(6) == (0, 6)


def test_get_cpuid_leaves_the_field_cannot_name_unread_and_fails_without_leaf_0():
    """tdx_read_cpuid(): leaves 0x80 and up are -EINVAL before any TDH.MNG.RD; without leaf 0
    (or 0x80000000) the ioctl is -EIO and nent stays as offered."""
    td = {(0, NA): CpuidValue(eax=0x81), (0x80000000, NA): CpuidValue(eax=0x80000000)}
    readback = td_cpuid_readback(td, gpaw=48)
    assert [e.function for e in readback.entries] == [0, 0x80000000]
    assert len(readback.reads) == 2 + 0x7F * 2 + 2
    assert readback.answer(256) == (0, 2)
    missing = td_cpuid_readback({}, gpaw=48)
    assert missing.answer(256) == (-errno.EIO, 256)
    assert missing.reads == [(field(0, NA), False), (field(0, 0), False)]


def test_tdx_hardware_setup_refusal_in_its_order():
    """__tdx_hardware_setup() (arch/x86/kvm/vmx/tdx.c): attributes and XFAM, TOPOLOGY_ENUM, then
    MAX_VCPU_PER_TD against the logical CPUs."""
    default = PlatformConfig()
    xcr0 = 0x2E7
    assert tdx_hardware_setup_refusal(default, xcr0, 1) is None
    assert "attributes" in tdx_hardware_setup_refusal(PlatformConfig(attributes_fixed1=1), xcr0, 1)
    amx = PlatformConfig(xfam_fixed0=default.xfam_fixed0 | 0x3 << 17, xfam_fixed1=0x3 | 0x3 << 17)
    assert "XFAM" in tdx_hardware_setup_refusal(amx, xcr0, 1)
    assert tdx_hardware_setup_refusal(amx, xcr0 | 0x3 << 17, 1) is None
    assert "TOPOLOGY_ENUM" in tdx_hardware_setup_refusal(PlatformConfig.for_profile("1.5.01"), xcr0, 1)
    assert "MAX_VCPU_PER_TD" in tdx_hardware_setup_refusal(PlatformConfig(max_vcpus_per_td=1), xcr0, 2)
