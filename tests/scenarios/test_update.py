"""The runtime update of the TDX module, as a user drives it and as Linux 7.3 runs it
(arch/x86/virt/vmx/tdx/seamldr.c, tdx.c tdx_module_shutdown()/tdx_module_run_update(),
drivers/virt/coco/tdx-host/tdx-host.c): the tdx_host sysfs attributes, an image written to
/sys/class/firmware/tdx_module, and the stop_machine states SHUTDOWN (lead CPU), INSTALL (every
CPU), CPU_INIT (every CPU: SYS.INIT once, LP.INIT), RUN_UPDATE (lead CPU). A failed state stops
the update; seamldr_install_module() returns -EIO/-ENODEV and tdx_fw_write() reports
FW_UPLOAD_ERR_FW_INVALID whatever the errno, which the fw_upload `error` attribute shows as
"transferring:firmware-invalid".

What Linux leaves behind decides what a user sees next: tdx_module_shutdown() clears
tdx_module_state once SHUTDOWN succeeded, so from then on tdx_get_sysinfo() is NULL and `version`
fails with ENXIO, until a RUN_UPDATE succeeds. Images come from harness/seam/image.py, the same
writer as `tdxh module-image`.
"""

from __future__ import annotations

import errno
import os

import pytest
from checks import (
    KVM_TIMEOUT,
    assert_no_td_left,
    kernel_log,
    kvm_machine,
    load_tdx_host,
    resume_agent,
    start_paused_agent,
)

from harness.machine.qemu import QemuConfig
from harness.observe import patterns, tdx_host
from harness.observe.crash import Crash, classify
from harness.observe.kvm import TO_MEMORY, run_agent
from harness.seam import image
from harness.seam.abi import Leaf, SeamldrLeaf, SeamldrStatus, Status
from harness.seam.faults import FaultRule
from harness.seam.image import ModuleImage

pytestmark = pytest.mark.vm

IMAGE = "/tmp/tdx-module.bin"
UPDATE_TIMEOUT = 120.0
FAILED = "transferring:firmware-invalid"  # tdx_fw_write()'s FW_UPLOAD_ERR_FW_INVALID
UPDATE_LEAVES = {"TDH.SYS.SHUTDOWN", "SEAMLDR.INSTALL", "TDH.SYS.INIT", "TDH.SYS.LP.INIT", "TDH.SYS.UPDATE"}


def newer(machine, update: int = 5) -> ModuleImage:
    """A module image of the running release with a higher update version."""
    running = machine.module.platform.module_image
    return running.replace(update_version=running.update_version + update, build_num=7)


def with_tdx_host(machine):
    load_tdx_host(machine)
    return machine


def update_with(machine, data: bytes) -> tdx_host.Upload:
    machine.put_file(IMAGE, data, 60)
    return tdx_host.upload(machine, IMAGE, UPDATE_TIMEOUT)


def update_calls(machine, since: int) -> list[tuple[str, int, str]]:
    return [(r.leaf, r.cpu, r.status_name) for r in machine.module.trace.records[since:] if r.leaf in UPDATE_LEAVES]


def test_update_sysfs_reports_the_module_and_the_loader(boot, platform_config):
    platform = platform_config(seamldr_version=(2, 1, 3), seamldr_updates=6)
    machine = with_tdx_host(boot(platform=platform))
    assert tdx_host.read_attribute(machine, tdx_host.VERSION).text == platform.module_image.version_text
    assert tdx_host.read_attribute(machine, tdx_host.SEAMLDR_VERSION).text == "2.1.03"
    assert tdx_host.read_attribute(machine, tdx_host.NUM_REMAINING_UPDATES).text == "6"
    assert machine.run(f"[ -d {tdx_host.FW_UPLOAD} ]", 30).status == 0
    infos = [r for r in machine.module.trace.records if r.fn == SeamldrLeaf.SEAMLDR_INFO]
    assert len(infos) == 2 and all(r.status == 0 for r in infos)


class ModulePinned(AssertionError):
    """rmmod tdx_host failed with EAGAIN: something holds a reference on the module."""


def assert_unloads(machine) -> None:
    """rmmod tdx_host removes the device and, through its devm action, the fw_upload device."""
    unloaded = machine.run("rmmod tdx_host", 60)
    if unloaded.status != 0 and os.strerror(errno.EAGAIN) in unloaded.output:
        refs = machine.run("cat /sys/module/tdx_host/refcnt", 30).output.strip()
        raise ModulePinned(f"rmmod tdx_host: {unloaded.output.strip()} (refcnt {refs})")
    assert unloaded.status == 0, f"rmmod tdx_host: {unloaded.output.strip()}"
    for path in (tdx_host.TDX_HOST, tdx_host.FW_UPLOAD):
        assert machine.run(f"[ -e {path} ]", 30).status != 0, f"{path} outlived rmmod tdx_host"


@pytest.mark.xfail(strict=True, raises=ModulePinned,
                   reason="Linux 7.3: firmware_upload_register(THIS_MODULE) in tdx-host's probe pins the module, and "
                   "only its module_exit unregisters (docs/upstream/tdx-host-unload-pinned.md)")
def test_update_tdx_host_unloads_with_the_update_abi(boot):
    assert_unloads(with_tdx_host(boot(reuse=True)))


def test_update_tdx_host_unloads_without_the_update_abi(boot, platform_config):
    assert_unloads(with_tdx_host(boot(platform=platform_config(seamret_invd_vmcs_erratum=True))))


def test_update_abi_hidden_on_a_cpu_with_the_seamret_erratum(boot, platform_config):
    """tdx-host.c supports_runtime_update(): with X86_BUG_SEAMRET_INVD_VMCS (IA32_VMX_BASIC bit
    60 clear) the loader's attributes and the fw_upload device are not there; `version` is."""
    machine = with_tdx_host(boot(platform=platform_config(seamret_invd_vmcs_erratum=True)))
    assert tdx_host.read_attribute(machine, tdx_host.VERSION).ok
    for path in (tdx_host.SEAMLDR_VERSION, tdx_host.NUM_REMAINING_UPDATES, tdx_host.FW_UPLOAD):
        assert machine.run(f"[ -e {path} ]", 30).status != 0, f"{path} exists on an erratum CPU"
    assert not [r for r in machine.module.trace.records if r.fn & (1 << 63)]


def test_update_attributes_without_a_p_seamldr_fail_to_read(boot, platform_config):
    """The kernel decides visibility from TDX_FEATURES0.TD_PRESERVING and the erratum only, so
    without a P-SEAMLDR the attributes are there and a read fails: SEAMLDR.INFO gets
    VMFAILINVALID, seamcall_prerr() makes it -ENODEV without a message."""
    machine = with_tdx_host(boot(platform=platform_config(seamldr_present=False)))
    for path in (tdx_host.SEAMLDR_VERSION, tdx_host.NUM_REMAINING_UPDATES):
        read = tdx_host.read_attribute(machine, path)
        assert read.fails_with(errno.ENODEV), read
    kernel_log(machine).expect_absent(patterns.SEAMCALL_FAILED)


def test_update_installs_a_new_module(boot):
    machine = with_tdx_host(boot())
    cpus = [cpu.apic_id for cpu in machine.module.platform.cpus]
    target = newer(machine)
    before = len(machine.module.trace)
    done = update_with(machine, image.build_image(target))
    assert done.ok, done
    assert tdx_host.read_attribute(machine, tdx_host.VERSION).text == target.version_text
    left = machine.module.platform.seamldr_updates - 1
    assert tdx_host.read_attribute(machine, tdx_host.NUM_REMAINING_UPDATES).text == str(left)
    calls = update_calls(machine, before)
    assert [(leaf, cpu) for leaf, cpu, _ in calls if leaf in ("TDH.SYS.SHUTDOWN", "TDH.SYS.UPDATE")] == [
        ("TDH.SYS.SHUTDOWN", 0), ("TDH.SYS.UPDATE", 0)]
    assert sorted(cpu for leaf, cpu, _ in calls if leaf == "SEAMLDR.INSTALL") == cpus
    assert sorted(cpu for leaf, cpu, _ in calls if leaf == "TDH.SYS.LP.INIT") == cpus
    assert [leaf for leaf, _, _ in calls] == ["TDH.SYS.SHUTDOWN", *["SEAMLDR.INSTALL"] * len(cpus), "TDH.SYS.INIT",
                                              *["TDH.SYS.LP.INIT"] * len(cpus), "TDH.SYS.UPDATE"]
    assert all(status in {"TDX_SUCCESS", "PSEAMLDR_SUCCESS"} for _, _, status in calls), calls
    assert machine.module.seam.loader.running == target
    kernel_log(machine)  # no WARN, no SEAMCALL failure


@pytest.mark.parametrize("corrupt", ["header-version", "signature", "reserved", "size", "sigstruct-pages",
                                     "module-pages"])
def test_update_broken_image_refused_before_any_seamcall(boot, corrupt):
    """seamldr.c init_seamldr_params(): EINVAL before stop_machine; TDX goes on as before."""
    machine = with_tdx_host(boot(reuse=True))
    before = len(machine.module.trace)
    done = update_with(machine, image.build_image(newer(machine), corrupt=corrupt))
    assert (done.status, done.error) == (tdx_host.IDLE, FAILED), done
    assert machine.module.trace.records[before:] == []
    assert tdx_host.read_attribute(machine, tdx_host.VERSION).text == machine.module.platform.module_image.version_text


def loader_refused(machine, status: SeamldrStatus) -> None:
    """The last INSTALL failed with ``status`` (recoverable: the old module is back, shut down):
    seamldr.c's message, and `version` gone (tdx_module_state was cleared by the shutdown)."""
    log = kernel_log(machine, allow=(Crash.SEAMCALL_FAILED,))
    failed = log.expect(patterns.SEAMCALL_FAILED)
    assert (failed["prefix"], int(failed["fn"], 16), int(failed["status"], 16)) == (
        "seamldr", SeamldrLeaf.SEAMLDR_INSTALL, status)
    read = tdx_host.read_attribute(machine, tdx_host.VERSION)
    assert read.fails_with(errno.ENXIO), read
    assert machine.module.seam.loader.seam_ready and machine.module.state.handoff is not None


def unsigned(target: ModuleImage) -> bytes:
    return image.build_image(target, signer="")


def bad_seal(target: ModuleImage) -> bytes:
    return image.build_image(target, corrupt="seal")


def other_major(target: ModuleImage) -> bytes:
    return image.build_image(target.replace(major_version=target.major_version + 1))


def handoff_too_old(target: ModuleImage) -> bytes:
    """The running module hands over at MODULE_HV 0; this one takes over from 1 on."""
    return image.build_image(target.replace(min_update_hv=1, module_hv=1))


@pytest.mark.parametrize("make, status", [
    (unsigned, SeamldrStatus.PSEAMLDR_EBADSIG),
    (bad_seal, SeamldrStatus.PSEAMLDR_EBADSIG),
    (other_major, SeamldrStatus.PSEAMLDR_EUNSUPPORTED),
    (handoff_too_old, SeamldrStatus.PSEAMLDR_EBADHANDOFF),
], ids=["unsigned", "bad-seal", "other-major", "handoff-too-old"])
def test_update_refused_by_the_loader(boot, make, status):
    machine = with_tdx_host(boot())
    done = update_with(machine, make(newer(machine)))
    assert done.error == FAILED, done
    loader_refused(machine, status)


def test_update_downgrade_and_no_updates_left_refused(boot, platform_config):
    """verify_manifest(): a lower SVN is EBADSIG; init_seam_range_on_update(): no SEAMDB entry
    left is EBADCALL."""
    machine = with_tdx_host(boot(platform=platform_config(update_version=9)))
    done = update_with(machine, image.build_image(newer(machine, update=-1)))
    assert done.error == FAILED, done
    loader_refused(machine, SeamldrStatus.PSEAMLDR_EBADSIG)
    machine = with_tdx_host(boot(platform=platform_config(seamldr_updates=0)))
    assert tdx_host.read_attribute(machine, tdx_host.NUM_REMAINING_UPDATES).text == "0"
    done = update_with(machine, image.build_image(newer(machine)))
    assert done.error == FAILED, done
    loader_refused(machine, SeamldrStatus.PSEAMLDR_EBADCALL)


def test_update_refused_shutdown_leaves_tdx_as_it_was(boot):
    """TDH.SYS.SHUTDOWN answering TDX_SYS_BUSY (another LP in SEAM): tdx_module_shutdown()
    returns before it clears tdx_module_state, so the old module and `version` stay."""
    machine = with_tdx_host(boot())
    machine.module.faults.add(FaultRule(Leaf.TDH_SYS_SHUTDOWN, Status.TDX_SYS_BUSY))
    done = update_with(machine, image.build_image(newer(machine)))
    assert done.error == FAILED, done
    log = kernel_log(machine, allow=(Crash.SEAMCALL_FAILED,))
    failed = log.expect(patterns.SEAMCALL_FAILED)
    assert (failed["prefix"], int(failed["fn"], 16)) == ("virt/tdx", Leaf.TDH_SYS_SHUTDOWN)
    running = machine.module.platform.module_image.version_text
    assert tdx_host.read_attribute(machine, tdx_host.VERSION).text == running


@pytest.mark.parametrize("cpu", [0, 1, 2], ids=["first-cpu", "middle-cpu", "last-cpu"])
def test_update_install_failing_on_one_cpu(boot, cpu):
    """An INSTALL that fails on one of three CPUs (a fault: EUNSPECERR). The other CPUs run
    theirs only if they reach the INSTALL state before the failure is acked (a CPU spinning in
    do_seamldr_install_module() leaves on num_failed): any INSTALL that reached the loader opens
    a session it counts over every LP, so SEAM_READY stays clear and the module is unreachable
    (VMFAILINVALID) until the platform resets; with none, the old module stays, shut down.
    Either way tdx_module_state was cleared, so `version` fails with ENXIO."""
    machine = with_tdx_host(boot(QemuConfig(cpus=3)))
    machine.module.faults.add(FaultRule(SeamldrLeaf.SEAMLDR_INSTALL, SeamldrStatus.PSEAMLDR_EUNSPECERR, cpu=cpu))
    before = len(machine.module.trace)
    done = update_with(machine, image.build_image(newer(machine)))
    assert done.error == FAILED, done
    kernel_log(machine, allow=(Crash.SEAMCALL_FAILED,)).expect(patterns.SEAMCALL_FAILED)
    reached = [c for leaf, c, _ in update_calls(machine, before) if leaf == "SEAMLDR.INSTALL" and c != cpu]
    assert machine.module.seam.loader.seam_ready == (not reached), reached
    read = tdx_host.read_attribute(machine, tdx_host.VERSION)
    assert read.fails_with(errno.ENXIO), read


@pytest.mark.parametrize("rule", [
    FaultRule(Leaf.TDH_SYS_INIT, Status.TDX_SYS_BUSY),
    FaultRule(Leaf.TDH_SYS_LP_INIT, Status.TDX_SYS_BUSY, cpu=1),
    FaultRule(Leaf.TDH_SYS_UPDATE, Status.TDX_SYS_INVALID_HANDOFF),
], ids=["sys-init", "lp-init-cpu1", "sys-update"])
def test_update_new_module_failing_to_start(boot, rule):
    """The new module refuses SYS.INIT, LP.INIT on one CPU, or UPDATE: Linux prints the failed
    SEAMCALL, the update fails, and no tdx_sysinfo comes back (`version`: ENXIO)."""
    machine = with_tdx_host(boot())
    machine.module.faults.add(rule)
    done = update_with(machine, image.build_image(newer(machine)))
    assert done.error == FAILED, done
    failed = kernel_log(machine, allow=(Crash.SEAMCALL_FAILED,)).expect(patterns.SEAMCALL_FAILED)
    assert (int(failed["fn"], 16), int(failed["status"], 16)) == (rule.leaf, rule.status)
    read = tdx_host.read_attribute(machine, tdx_host.VERSION)
    assert read.fails_with(errno.ENXIO), read


def test_update_with_a_cpu_offline(boot):
    """stop_machine() runs on the online CPUs only, but the loader's session counts every LP:
    with CPU 1 offline the one INSTALL is not the last, returns success, and SEAM_READY stays
    clear; CPU_INIT's SYS.INIT then gets VMFAILINVALID (-ENODEV, "module not loaded") and the update
    fails with the module unreachable. Linux 7.3 does not refuse the update beforehand."""
    machine = with_tdx_host(boot(QemuConfig(cpus=2)))
    offline = machine.run("echo 0 > /sys/devices/system/cpu/cpu1/online", 60)
    assert offline.status == 0, offline.output
    before = len(machine.module.trace)
    done = update_with(machine, image.build_image(newer(machine)))
    assert done.error == FAILED, done
    calls = update_calls(machine, before)
    assert calls == [("TDH.SYS.SHUTDOWN", 0, "TDX_SUCCESS"), ("SEAMLDR.INSTALL", 0, "PSEAMLDR_SUCCESS"),
                     ("TDH.SYS.INIT", 0, "TDX_SEAMCALL_VMFAILINVALID")], calls
    log = kernel_log(machine)
    log.expect(patterns.NOT_LOADED)  # try_init_module_global()'s message for VMFAILINVALID
    log.expect_absent(patterns.SEAMCALL_FAILED)


@pytest.mark.vmx
@pytest.mark.slow
def test_update_keeps_a_td_built_before_it(vmx_boot):
    """A TD-preserving update with a finalized TD alive (the agent pauses holding it): the TD's
    pages and KeyID survive TDH.SYS.SHUTDOWN/UPDATE, and KVM tears the TD down through the new
    module without a failed SEAMCALL."""
    machine = with_tdx_host(kvm_machine(vmx_boot))
    steps = [*TO_MEMORY, "init_mem_region:pages=2:seed=3", "finalize", "pause", "destroy"]
    start_paused_agent(machine, steps)
    state = machine.module.state
    tds, pages, kot = set(state.tds), dict(state.pages), dict(state.kot)
    assert tds, "no TD in the module while the agent holds one"
    before = len(machine.module.trace)
    target = newer(machine)
    done = update_with(machine, image.build_image(target))
    assert done.ok, done
    state = machine.module.state
    assert (set(state.tds), state.pages, state.kot) == (tds, pages, kot)
    assert machine.module.seam.loader.running == target
    run = resume_agent(machine, steps)
    assert not run.failed(), run.failed()
    failed = [(r.leaf, r.status_name) for r in machine.module.trace.records[before:]
              if r.status and not r.fn & (1 << 63)]
    assert not failed, f"SEAMCALLs failed after the update: {failed}"
    assert_no_td_left(machine)
    kernel_log(machine).expect_absent(patterns.SEAMCALL_FAILED)


@pytest.mark.vmx
@pytest.mark.slow
def test_update_failed_then_kvm_cannot_create_a_td(vmx_boot):
    """After an update the loader refused (the old module stays shut down), KVM_TDX_INIT_VM's
    TDH.MNG.CREATE gets TDX_SYS_SHUTDOWN: __tdx_td_init() reports it through TDX_BUG_ON(), a
    WARN_ON_ONCE plus "SEAMCALL TDH_MNG_CREATE failed", marks the VM bugged and fails with EIO.
    A user who creates a TD after a failed update thus hits a kernel WARN."""
    machine = with_tdx_host(kvm_machine(vmx_boot))
    done = update_with(machine, image.build_image(newer(machine), signer=""))
    assert done.error == FAILED, done
    run = run_agent(machine, ["create_vm", "x2apic_api", "split_irqchip", "capabilities", "init_vm"], KVM_TIMEOUT)
    assert run["init_vm"].errno == errno.EIO, run["init_vm"]
    log = kernel_log(machine, allow=(Crash.SEAMCALL_FAILED, Crash.WARN))
    failed = log.expect(patterns.KVM_SEAMCALL_FAILED)
    assert (failed["leaf"], int(failed["status"], 16)) == ("TDH_MNG_CREATE", Status.TDX_SYS_SHUTDOWN)
    assert [f.kind for f in classify(log.records)].count(Crash.WARN) == 1
