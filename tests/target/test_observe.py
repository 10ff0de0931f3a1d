"""Observation-only scenarios for a real TDX host reached over SSH (``--target``): what the
host's kernel printed and exposes, checked against the kernel's rules and the PAMT model, and
KVM's TDX ioctls through the agent copied over SFTP. Nothing here injects a fault or needs the
software module; tests/scenarios/test_ssh_target.py runs these against a guest of the harness."""

from __future__ import annotations

import uuid

import pytest

from harness import paths
from harness.images.agent import build_guest_programs
from harness.machine.ssh import SshMachine
from harness.observe import pamt, patterns
from harness.observe.dmesg import Timeline
from harness.observe.kvm import AGENT, TO_MEMORY, run_agent

TIMEOUT = 120.0
KVM_TIMEOUT = 600.0


def host_log(target: SshMachine) -> Timeline:
    result = target.run("dmesg", TIMEOUT)
    assert result.status == 0, (f"dmesg failed on {target.target} (kernel.dmesg_restrict? log in as root): "
                                f"{result.output[-300:]}")
    return Timeline.from_console(result.output.splitlines())


def test_target_tdx_init_messages_in_order(target: SshMachine):
    log = host_log(target)
    found = log.expect_in_order([patterns.BIOS_ENABLED, patterns.S3_DISABLED, patterns.MODULE_VERSION,
                                 patterns.PAMT_ALLOCATED, patterns.INITIALIZED])
    keyids = patterns.BIOS_ENABLED.search(found[0].text)
    assert int(keyids["end"]) > int(keyids["start"]), f"empty private KeyID range: {found[0].text}"
    log.expect_absent(patterns.INIT_FAILED)
    log.expect_absent(patterns.SEAMCALL_FAILED)


def test_target_pamt_matches_the_model_of_its_e820(target: SshMachine):
    """The PAMT size the host printed == Linux's rules on the host's own e820 map and NUMA nodes
    (entry sizes: 16 bytes at each page size, as TDX 1.5 modules report; Linux does not print them)."""
    log = host_log(target)
    printed_kb = int(log.expect(patterns.PAMT_ALLOCATED)["kb"])
    text = "\n".join(record.text for record in log.records)
    model = pamt.model(pamt.parse_e820(text), pamt.parse_numa_boundaries(text))
    assert printed_kb == model.pamt_kb, f"{target.target}: printed {printed_kb} KB, model {model.pamt_kb} KB"


def test_target_hibernation_and_s3_are_off(target: SshMachine):
    states = target.run("cat /sys/power/state", TIMEOUT).output.split()
    assert "disk" not in states, f"hibernation offered with TDX on: /sys/power/state = {states}"
    disk = target.run("cat /sys/power/disk 2>/dev/null || true", TIMEOUT).output.strip()
    assert disk in ("", "[disabled]"), f"/sys/power/disk = {disk!r}"
    host_log(target).expect(patterns.S3_DISABLED)  # entering S3 then fails (ENOSYS): not tried on a host


def kvm_tdx(target: SshMachine) -> None:
    """Skip unless kvm_intel runs with TDX on the target."""
    loaded = target.run("cat /sys/module/kvm_intel/parameters/tdx", TIMEOUT)
    if loaded.status != 0:
        pytest.skip(f"kvm_intel is not loaded on {target.target}")
    assert loaded.output.strip() == "Y", f"kvm_intel runs without TDX: tdx={loaded.output.strip()}"


def test_target_kvm_intel_tdx_parameter(target: SshMachine):
    kvm_tdx(target)
    assert target.run("test -c /dev/kvm", TIMEOUT).status == 0, "/dev/kvm missing with kvm_intel loaded"


def test_target_kvm_flow_with_the_agent(target: SshMachine):
    """The agent, copied over SFTP, walks KVM's TDX ioctls to FINALIZE on the host's real module."""
    kvm_tdx(target)
    [agent] = [p for p in build_guest_programs(paths.cache_dir()) if p.name == AGENT]
    remote = f"/tmp/{AGENT}-{uuid.uuid4().hex[:8]}"
    target.put(agent.binary, remote)
    try:
        run = run_agent(target, [*TO_MEMORY, "init_mem_region:pages=4", "finalize"], KVM_TIMEOUT, agent=remote)
    finally:
        target.remove(remote)
    assert not run.failed(), run.failed()
    assert run["init_mem_region"].outputs["pages_added"] == 4

