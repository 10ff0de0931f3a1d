"""The agent's output parser on a stored run (tests/data/tdx-agent-flow.jsonl: the agent's lines
from a Bochs run of the whole flow), and KVM's capability rules on constructed module configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.machine.console import CommandResult
from harness.observe.kvm import (
    KVM_SUPPORTED_TD_ATTRS,
    AgentError,
    CpuidEntry,
    offered_cpuid,
    run_agent,
    supported_attrs,
    supported_xfam,
)
from harness.seam.platform import CpuidConfig, PlatformConfig

FLOW = Path(__file__).parent.parent / "data" / "tdx-agent-flow.jsonl"


class FakeGuest:
    def __init__(self, status: int, output: str) -> None:
        self.result = CommandResult(status, output)
        self.commands: list[str] = []

    def run(self, cmd: str, timeout: float) -> CommandResult:
        self.commands.append(cmd)
        return self.result


def stored_run(steps: list[str]):
    return run_agent(FakeGuest(0, FLOW.read_text()), steps, 5)


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
