"""The first vertical slice: a patched kernel boots in QEMU with its SEAMCALLs served by the
software module, and initializes TDX the way Linux's tdx_enable() does."""

from __future__ import annotations

from checks import assert_init_sequence, kernel_log, model_from_log

from harness.machine.qemu import QemuConfig
from harness.observe import patterns
from harness.seam.abi import Field, Leaf


def test_first_boot_initializes_tdx(boot):
    machine = boot(QemuConfig(), reuse=True)  # whether booted here or resumed, the boot's log and trace
    platform = machine.module.platform
    log = kernel_log(machine)
    found = log.expect_in_order([patterns.BIOS_ENABLED, patterns.S3_DISABLED, patterns.MODULE_VERSION,
                                 patterns.PAMT_ALLOCATED, patterns.INITIALIZED])
    keyids = patterns.BIOS_ENABLED.search(found[0].text)
    assert (int(keyids["start"]), int(keyids["end"])) == (platform.tdx_keyid_start,
                                                          platform.tdx_keyid_start + platform.nr_tdx_keyids)
    version = patterns.MODULE_VERSION.search(found[2].text)
    assert (int(version["major"]), int(version["minor"]), int(version["update"])) == (
        platform.major_version, platform.minor_version, platform.update_version)

    # PAMT: what the kernel printed == the model on the guest's own e820 == what the module got.
    printed_kb = int(patterns.PAMT_ALLOCATED.search(found[3].text)["kb"])
    model = model_from_log(log)
    received = machine.module.state.tdmrs
    received_kb = sum(t.info.pamt_4k_size + t.info.pamt_2m_size + t.info.pamt_1g_size for t in received) // 1024
    assert printed_kb == model.pamt_kb == received_kb
    assert [(t.info.base, t.info.size) for t in received] == [(t.base, t.size) for t in model.tdmrs]

    records = machine.module.trace.records
    assert_init_sequence(records, [c.apic_id for c in platform.cpus], {c.apic_id: c.package for c in platform.cpus})
    read = {r.inputs["rdx"] for r in records if r.number == Leaf.TDH_SYS_RD}
    assert {int(Field.MAJOR_VERSION), int(Field.MAX_TDMRS), int(Field.TDX_FEATURES0)} <= read
    # The TDMR.INIT loop ran each TDMR to its end, one chunk per call.
    for tdmr in received:
        calls = [r for r in records if r.number == Leaf.TDH_SYS_TDMR_INIT and r.inputs["rcx"] == tdmr.info.base]
        assert calls[-1].outputs["rdx"] >= tdmr.info.end
        assert len(calls) == -(-tdmr.info.size // platform.tdmr_init_chunk)
    log.expect_absent(patterns.SEAMCALL_FAILED)
    # The QMP monitor answers for the same machine.
    assert machine.qmp().status() == "running"


def test_first_boot_two_packages_key_config_each(boot):
    machine = boot(QemuConfig(cpus=4, sockets=2))
    kernel_log(machine).expect(patterns.INITIALIZED)
    platform = machine.module.platform
    assert_init_sequence(machine.module.trace.records, [c.apic_id for c in platform.cpus],
                         {c.apic_id: c.package for c in platform.cpus})
    key_cpus = [r.cpu for r in machine.module.trace.of_leaf(Leaf.TDH_SYS_KEY_CONFIG)]
    assert sorted(platform.package_of(cpu) for cpu in key_cpus) == [0, 1]


def test_first_boot_module_not_loaded(boot, platform_config):
    machine = boot(QemuConfig(), platform=platform_config(module_present=False))
    log = kernel_log(machine)
    log.expect_in_order([patterns.BIOS_ENABLED, patterns.NOT_LOADED])
    log.expect_absent(patterns.INITIALIZED)
    assert machine.run("echo alive", 30).output.strip() == "alive"
    # The shim knew no module was loaded: nothing reached the wire.
    assert len(machine.module.trace) == 0


def test_first_boot_no_module_listening(boot):
    machine = boot(QemuConfig(), serve_module=False, append="tdx_sw_module.timeout_ms=2000")
    log = kernel_log(machine)
    log.expect_in_order([patterns.SHIM_NO_ANSWER, patterns.NOT_SUPPORTED])
    log.expect_absent(patterns.BIOS_ENABLED)
    assert machine.run("echo alive", 30).output.strip() == "alive"
