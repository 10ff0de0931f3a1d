"""Failure injection at every step of Linux's TDX init, and platforms the kernel must refuse.

Expected kernel behaviour, from arch/x86/virt/vmx/tdx (7.2/7.3): a module error status is
printed as "SEAMCALL (<leaf>) failed: <status>" and becomes -EIO (sc_retry_prerr()); the
SEAMCALL-level errors (VMFAILINVALID) are not printed; TDX_RND_NO_ENTROPY is retried up to
RDRAND_RETRY_LOOPS (10) calls; a failure inside init_tdx_module() ends in "TDX-Module
initialization failed (<errno>)"; a failure in the per-CPU cpuhp callback (SYS.INIT, LP.INIT)
makes tdx_enable() return without that line. The machine keeps running in every case.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field

import pytest
from checks import kernel_log

from harness.machine.qemu import QemuConfig
from harness.observe import patterns
from harness.observe.crash import Crash
from harness.seam import abi
from harness.seam.abi import Field, Leaf, Status
from harness.seam.faults import FaultPlan, FaultRule, no_entropy, not_loaded
from harness.seam.lp_checks import LpDeviation

RDRAND_RETRY_LOOPS = 10  # arch/x86/include/asm/archrandom.h
FAILURES = (Crash.SEAMCALL_FAILED, Crash.TDX_INIT_FAILED)  # what these scenarios provoke


@dataclass(frozen=True)
class Case:
    faults: tuple[FaultRule, ...] = ()
    platform: dict[str, object] = field(default_factory=dict)
    config: QemuConfig = field(default_factory=QemuConfig)
    failed_leaf: Leaf | None = None  # the "SEAMCALL (...) failed" line expected, if any
    status: int = 0
    errno: int | None = None  # "TDX-Module initialization failed (-errno)", if expected
    messages: tuple[re.Pattern[str], ...] = ()  # further lines, in order


CASES = {
    "sys_init_not_loaded": Case(faults=(not_loaded(),), messages=(patterns.NOT_LOADED,)),
    "sys_init_busy": Case(faults=(FaultRule(Leaf.TDH_SYS_INIT, Status.TDX_SYS_BUSY),),
                          failed_leaf=Leaf.TDH_SYS_INIT, status=Status.TDX_SYS_BUSY),
    "lp_init_on_second_cpu": Case(faults=(FaultRule(Leaf.TDH_SYS_LP_INIT, Status.TDX_SYS_BUSY, cpu=1),),
                                  failed_leaf=Leaf.TDH_SYS_LP_INIT, status=Status.TDX_SYS_BUSY),
    "sys_rd_of_one_field": Case(
        faults=(FaultRule(Leaf.TDH_SYS_RD, Status.TDX_METADATA_FIELD_NOT_READABLE, rdx=Field.MAX_TDMRS),),
        failed_leaf=Leaf.TDH_SYS_RD, status=Status.TDX_METADATA_FIELD_NOT_READABLE, errno=errno.EIO),
    "sys_config": Case(faults=(FaultRule(Leaf.TDH_SYS_CONFIG, abi.with_info(Status.TDX_INVALID_TDMR, 0)),),
                       failed_leaf=Leaf.TDH_SYS_CONFIG, status=abi.with_info(Status.TDX_INVALID_TDMR, 0),
                       errno=errno.EIO),
    "key_config_on_second_package": Case(
        faults=(FaultRule(Leaf.TDH_SYS_KEY_CONFIG, Status.TDX_KEY_GENERATION_FAILED, package=1),),
        config=QemuConfig(cpus=4, sockets=2), failed_leaf=Leaf.TDH_SYS_KEY_CONFIG,
        status=Status.TDX_KEY_GENERATION_FAILED, errno=errno.EIO),
    "tdmr_init_mid_loop": Case(faults=(FaultRule(Leaf.TDH_SYS_TDMR_INIT, Status.TDX_SYS_BUSY, nth=2),),
                               failed_leaf=Leaf.TDH_SYS_TDMR_INIT, status=Status.TDX_SYS_BUSY, errno=errno.EIO),
    "entropy_one_more_than_retried": Case(
        faults=(no_entropy(Leaf.TDH_SYS_KEY_CONFIG, calls=RDRAND_RETRY_LOOPS),),
        failed_leaf=Leaf.TDH_SYS_KEY_CONFIG, status=Status.TDX_RND_NO_ENTROPY, errno=errno.EIO),
    "max_tdmrs_too_small": Case(platform={"max_tdmrs": 1}, config=QemuConfig(memory="4G"), errno=errno.ENOSPC,
                                messages=(patterns.TDMRS_EXHAUSTED,)),
    "max_reserved_too_small": Case(platform={"max_reserved_per_tdmr": 2}, errno=errno.ENOSPC,
                                   messages=(patterns.RESERVED_EXHAUSTED,)),
    "no_rbp_mod_missing": Case(platform={"tdx_features0": abi.TDX_FEATURES0_TOPOLOGY_ENUM}, errno=errno.EINVAL,
                               messages=(patterns.RBP_CLOBBER,)),
    # A platform whose LPs differ (harness/seam/lp_checks.py): found by LP.INIT, or by SYS.INIT on its own LP.
    "lp_with_other_tsc_adjust": Case(platform={"lp_deviations": (LpDeviation(1, msrs=frozenset({0x3B})),)},
                                     failed_leaf=Leaf.TDH_SYS_LP_INIT, status=Status.TDX_INCONSISTENT_MSR + 0x3B),
    "lp_with_other_topology": Case(platform={"lp_deviations": (LpDeviation(1, cpuid=frozenset({(0x1F, 1)})),)},
                                   failed_leaf=Leaf.TDH_SYS_LP_INIT, status=Status.TDX_INCONSISTENT_CPUID_FIELD),
    "boot_cpu_limits_cpuid_maxval": Case(platform={"lp_deviations": (LpDeviation(0, boot_nt4=True),)},
                                         failed_leaf=Leaf.TDH_SYS_INIT, status=Status.TDX_LIMIT_CPUID_MAXVAL_SET),
    "too_few_keyids": Case(platform={"nr_tdx_keyids": 1}, messages=(patterns.TOO_FEW_KEYIDS, patterns.NOT_SUPPORTED)),
    "no_tdx_keyids_at_all": Case(platform={"nr_tdx_keyids": 0}, messages=(patterns.NOT_SUPPORTED,)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_init_failure(boot, platform_config, name):
    case = CASES[name]
    machine = boot(case.config, platform=platform_config(**case.platform),
                   faults=FaultPlan(list(case.faults)))
    log = kernel_log(machine, allow=FAILURES)
    expected = list(case.messages)
    if case.failed_leaf is not None:
        match = log.expect(patterns.SEAMCALL_FAILED)
        assert (int(match["fn"], 16), int(match["status"], 16)) == (case.failed_leaf, case.status), match.string
    if case.errno is not None:
        expected.append(patterns.INIT_FAILED)
    found = log.expect_in_order(expected) if expected else []
    if case.errno is not None:
        assert int(patterns.INIT_FAILED.search(found[-1].text)["errno"]) == -case.errno
    log.expect_absent(patterns.INITIALIZED)
    if case.failed_leaf is None:
        log.expect_absent(patterns.SEAMCALL_FAILED)
    # No panic, no hang: the guest still answers.
    assert machine.run("echo alive", 30).output.strip() == "alive"


def test_entropy_failures_within_the_retry_limit_are_invisible(boot):
    """sc_retry() retries TDX_RND_NO_ENTROPY: one failure fewer than the limit still succeeds."""
    machine = boot(QemuConfig(), faults=FaultPlan([no_entropy(Leaf.TDH_SYS_KEY_CONFIG, calls=RDRAND_RETRY_LOOPS - 1)]))
    log = kernel_log(machine)
    log.expect(patterns.INITIALIZED)
    log.expect_absent(patterns.SEAMCALL_FAILED)
    statuses = [r.status for r in machine.module.trace.of_leaf(Leaf.TDH_SYS_KEY_CONFIG)]
    assert statuses == [Status.TDX_RND_NO_ENTROPY] * (RDRAND_RETRY_LOOPS - 1) + [0]


def test_unwinding_after_key_config_failure(boot):
    """After KEY.CONFIG fails on package 1, the kernel configures no more packages and never
    reaches TDMR.INIT."""
    rule = FaultRule(Leaf.TDH_SYS_KEY_CONFIG, Status.TDX_KEY_GENERATION_FAILED, package=1)
    machine = boot(QemuConfig(cpus=4, sockets=2), faults=FaultPlan([rule]))
    kernel_log(machine, allow=FAILURES).expect(patterns.INIT_FAILED)
    trace = machine.module.trace
    packages = [machine.module.platform.package_of(r.cpu) for r in trace.of_leaf(Leaf.TDH_SYS_KEY_CONFIG)]
    assert packages == [0, 1]
    assert trace.of_leaf(Leaf.TDH_SYS_TDMR_INIT) == []
