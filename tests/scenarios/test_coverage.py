"""The coverage counters are the guest kernel's own: a boot whose TDH.SYS.CONFIG fails reaches
init_tdx_module()'s unwinding and never TDMR.INIT's loop; a boot that succeeds does the
opposite, and its count of init_tdmr()'s loop equals the TDMR.INIT calls the module received.

Builds the coverage variant (images/kernel/coverage) beside the default kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import paths
from harness.coverage import report
from harness.coverage.collect import ScenarioCoverage
from harness.coverage.objects import CoverageBuildError
from harness.launch import Images, prepare_images, start_machine
from harness.machine.qemu import QemuConfig, QemuMachine
from harness.seam import abi
from harness.seam.abi import Leaf, Status
from harness.seam.faults import FaultPlan, FaultRule

BOOT_TIMEOUT = 300.0
TDX_C = "arch/x86/virt/vmx/tdx/tdx.c"


@pytest.fixture(scope="module")
def coverage_images(request: pytest.FixtureRequest) -> Images:
    opt = request.config.getoption
    try:
        return prepare_images(paths.cache_dir(), kernel=opt("--kernel"), kernel_tree=opt("--kernel-tree"),
                              coverage=True)
    except CoverageBuildError as err:
        pytest.skip(f"needs a coverage kernel: {err}")


def counted_boot(images: Images, run_dir: Path, root: Path, faults: FaultPlan) -> QemuMachine:
    """Boot to the shell and copy the counters out into ``root`` (a DIR of its own)."""
    assert images.coverage is not None
    images.coverage.claim(root)
    coverage = ScenarioCoverage(root, "boot", images.coverage)
    machine = start_machine(images, QemuConfig(), run_dir, faults=faults)
    try:
        coverage.attach(machine, "machine0")
        machine.wait_ready(BOOT_TIMEOUT)
        coverage.finish(machine)
    finally:
        machine.stop()
    report.write_report(root)
    return machine


def tdx_c(root: Path) -> tuple[dict[int, int], dict[str, int]]:
    """tdx.c's line counts and function entry counts in DIR's merged report."""
    files = {entry["file"]: entry for entry in report.read_tracefile(root / report.MERGED)}
    entry = files[TDX_C]
    return ({line["line_number"]: line["count"] for line in entry["lines"]},
            {function["name"]: function["execution_count"] for function in entry["functions"]})


def line_of(source: list[str], text: str, after: str = "") -> int:
    """The 1-based number of the first line holding ``text`` after the first holding ``after``."""
    start = next(i for i, line in enumerate(source) if after in line) if after else 0
    for number, line in enumerate(source[start:], start + 1):
        if text in line:
            return number
    raise AssertionError(f"{TDX_C} has no line with {text!r} after {after!r}: not the init_tdx_module() of 7.2/7.3?")


@pytest.mark.slow
@pytest.mark.vm
def test_the_counters_are_the_guests_own(coverage_images, artifacts):
    assert coverage_images.coverage is not None
    source = (coverage_images.coverage.source_tree / TDX_C).read_text().splitlines()
    unwind = line_of(source, "goto err_free_pamts;", after="ret = config_tdx_module(")
    reset = line_of(source, "wbinvd_on_all_cpus();", after="err_reset_pamts:")
    # init_tdmr()'s do-while loop: one iteration per TDH.SYS.TDMR.INIT. The compiler puts the
    # loop's counters on lines of its own choosing: take the busiest line of the body.
    loop_start = line_of(source, "do {", after="static __init int init_tdmr(")
    loop_end = line_of(source, "} while (next < tdmr->base + tdmr->size);", after="static __init int init_tdmr(")

    def loop_runs(lines: dict[int, int]) -> int:
        body = [count for number, count in lines.items() if loop_start < number < loop_end]
        assert body, f"no counted line between {TDX_C}:{loop_start} and :{loop_end}"
        return max(body)

    refused = FaultPlan([FaultRule(Leaf.TDH_SYS_CONFIG, abi.with_info(Status.TDX_INVALID_TDMR, 0))])
    failed = counted_boot(coverage_images, artifacts / "sys-config-fails", artifacts / "cov-fails", refused)
    lines, functions = tdx_c(artifacts / "cov-fails")
    assert lines[unwind] == 1, f"SYS.CONFIG failed once: line {unwind} ({source[unwind - 1].strip()}) ran once"
    assert lines[reset] == 0, "the PAMT reset is for failures after SYS.CONFIG"
    assert functions["init_tdmrs"] == 0 and loop_runs(lines) == 0, "no TDMR.INIT after a failed SYS.CONFIG"
    assert not failed.module.trace.of_leaf(Leaf.TDH_SYS_TDMR_INIT)

    ok = counted_boot(coverage_images, artifacts / "init-succeeds", artifacts / "cov-ok", FaultPlan())
    lines, functions = tdx_c(artifacts / "cov-ok")
    calls = len(ok.module.trace.of_leaf(Leaf.TDH_SYS_TDMR_INIT))
    assert calls > 0
    assert loop_runs(lines) == calls, (f"init_tdmr()'s loop ran {loop_runs(lines)} times in the guest, the module "
                                       f"received {calls} TDMR.INIT calls")
    assert functions["init_tdmrs"] == 1 and lines[unwind] == 0 and lines[reset] == 0
