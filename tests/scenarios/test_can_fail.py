"""The scenarios can fail: a kernel with a deliberate bug, applied only here, makes the
first-boot checks fail for the right reason (and the module, or the shim as the CPU, reject what
hardware would)."""

from __future__ import annotations

from pathlib import Path

import pytest
from checks import kernel_log

from harness import paths
from harness.launch import prepare_images, start_machine
from harness.machine.qemu import QemuConfig, QemuMachine
from harness.observe import patterns
from harness.observe.crash import Crash
from harness.observe.dmesg import TimelineError
from harness.seam import abi
from harness.seam.abi import Leaf, PageSize, Status

BROKEN = Path(__file__).parent.parent / "data" / "broken"


def start_broken(request, artifacts, patch: str) -> QemuMachine:
    if request.config.getoption("--kernel"):
        pytest.skip("needs to build a kernel: not with --kernel")
    images = prepare_images(paths.cache_dir(), kernel_tree=request.config.getoption("--kernel-tree"),
                            extra_patches=[BROKEN / patch])
    return start_machine(images, QemuConfig(), artifacts / Path(patch).stem)


@pytest.mark.slow
def test_pamt_one_page_short_is_caught(request, artifacts):
    machine = start_broken(request, artifacts, "pamt-4k-one-page-short.patch")
    try:
        machine.wait_ready(300)
        log = kernel_log(machine, allow=(Crash.SEAMCALL_FAILED, Crash.TDX_INIT_FAILED))
        # What the first-boot scenario expects does not happen ...
        with pytest.raises(TimelineError, match=r"step 3 of 4: .*KB allocated for PAMT.*it never came"):
            log.expect_in_order([patterns.BIOS_ENABLED, patterns.MODULE_VERSION, patterns.PAMT_ALLOCATED,
                                 patterns.INITIALIZED])
        # ... because the module refused TDMR 0's 4K PAMT, as the TDX module does.
        refused = abi.with_info(Status.TDX_INVALID_PAMT, 0, PageSize.PT_4KB)
        failed = log.expect(patterns.SEAMCALL_FAILED)
        assert (int(failed["fn"], 16), int(failed["status"], 16)) == (Leaf.TDH_SYS_CONFIG, refused)
        config = machine.module.trace.of_leaf(Leaf.TDH_SYS_CONFIG)
        assert [r.status for r in config] == [refused]
    finally:
        machine.stop()


@pytest.mark.slow
def test_seamcall_outside_vmx_operation_is_caught(request, artifacts):
    """tdx_online_cpu() without x86_virt_get_ref(): on hardware the CPU's first SEAMCALL,
    TDH.SYS.INIT from try_init_module_global(), is #UD. sc_retry_prerr() turns TDX_SEAMCALL_UD
    into -EACCES without a message, so the kernel's only words are the error path's
    x86_virt_put_ref() WARN (no reference taken) and the shim's note; TDX stays off, and the
    module never saw a call (the #UD comes before SEAM)."""
    machine = start_broken(request, artifacts, "online-cpu-without-vmx.patch")
    try:
        machine.wait_ready(300)
        log = kernel_log(machine, allow=(Crash.SEAMCALL_UD, Crash.WARN))
        ud = log.expect(patterns.SHIM_SEAMCALL_UD)
        assert (int(ud["fn"], 16), int(ud["cpu"])) == (Leaf.TDH_SYS_INIT, 0), ud.string
        warnings = log.matches(patterns.WARNING)
        assert [m["func"] for m in warnings] == ["x86_virt_put_ref"], [m.string for m in warnings]
        log.expect_absent(patterns.INITIALIZED)
        log.expect_absent(patterns.SEAMCALL_FAILED)
        assert len(machine.module.trace) == 0, list(machine.module.trace)
    finally:
        machine.stop()
