"""The agent's output parser on stored runs (tests/data/tdx-agent-flow.jsonl: the agent's lines
from a Bochs run of the whole flow; tdx-agent-run.jsonl: the flow then KVM_RUN through scripted
exits), and KVM's capability rules on constructed module configs."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from harness.machine.console import CommandResult
from harness.observe.kvm import (
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_SUPPORTED_TD_ATTRS,
    KVM_SYSTEM_EVENT_TDX_FATAL,
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
)
from harness.seam import abi
from harness.seam.platform import CpuidConfig, PlatformConfig

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
