"""The sweep's outcome classifier: which class a run's evidence gives, most severe first, and the
runs that are the harness's (missed, error) rather than the kernel's."""

from __future__ import annotations

import pytest

from harness.observe import patterns
from harness.observe.dmesg import Record
from harness.seam import abi
from harness.seam.abi import Leaf, Status
from harness.seam.trace import TraceRecord
from harness.sweep.outcome import FINDINGS, Evidence, Outcome, classify

SITE, CALLER = "tdx_cpu_enable+0x58", "tdx_online_cpu+0x18"
TARGET = f"{SITE} < {CALLER}"
REPORTED_BY = (patterns.SEAMCALL_FAILED, patterns.INIT_FAILED, patterns.NOT_LOADED)


def call(seq: int, status: int, injected: bool = False, site: str = SITE) -> TraceRecord:
    return TraceRecord(seq=seq, time=0.0, boot=1, cpu=0, fn=Leaf.TDH_SYS_LP_INIT, leaf="TDH.SYS.LP.INIT", variant=0,
                       inputs={}, outputs={}, status=status, status_name=abi.status_name(status),
                       injected="rule" if injected else None, site=site, caller=CALLER)


def log(*texts: str) -> list[Record]:
    return [Record(i, float(i), text, 0) for i, text in enumerate(("Linux version 7.3.4", *texts))]


def evidence(*texts: str, usable: bool = True, status: int = Status.TDX_SYS_BUSY, **more) -> Evidence:
    return Evidence(target_site=TARGET, records=log(*texts), usable=usable, injected=call(5, status, True),
                    reported_by=REPORTED_BY, **more)


SEAMCALL_FAILED = "virt/tdx: SEAMCALL (0x0000000000000023) failed: 0x8000020200000000"
WARNING = "WARNING: arch/x86/virt/vmx/tdx/tdx.c:661 at tdx_enable+0x3d/0x4f0, CPU#0: swapper/0/1"
OOPS = "BUG: unable to handle page fault for address: ffffffffff600000"
PANIC = "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009"


@pytest.mark.parametrize(("texts", "usable", "more", "outcome"), [
    ((SEAMCALL_FAILED,), True, {}, Outcome.CLEAN),
    ((WARNING, SEAMCALL_FAILED), True, {}, Outcome.WARN),
    ((OOPS,), True, {}, Outcome.OOPS),
    ((WARNING, OOPS, PANIC), False, {}, Outcome.PANIC),  # the most severe wins
    ((OOPS,), False, {}, Outcome.OOPS),  # the oops is why the guest stopped answering
    ((WARNING,), False, {}, Outcome.HANG),  # a WARN does not stop a kernel: the hang is the news
    ((), False, {"hang_report": "hang.txt"}, Outcome.HANG),
    ((SEAMCALL_FAILED,), True, {"leaks": ("2053 pages still held",)}, Outcome.LEAK),
    ((WARNING,), True, {"leaks": ("1 TD(s) still in the module",)}, Outcome.LEAK),  # what a WARN left behind
    ((SEAMCALL_FAILED,), True, {"inconsistencies": ("module not ready",)}, Outcome.INCONSISTENT),
    ((), True, {}, Outcome.SILENT),  # failed, and the kernel said nothing
])
def test_classes_most_severe_first(texts, usable, more, outcome):
    verdict = classify(evidence(*texts, usable=usable, **more))
    assert verdict.outcome is outcome, verdict
    assert verdict.finding == (outcome in FINDINGS)
    assert verdict.reasons


def test_a_retry_that_succeeds_is_clean_even_unreported():
    """sc_retry() absorbs TDX_RND_NO_ENTROPY: the same site calls again and succeeds."""
    verdict = classify(evidence(status=Status.TDX_RND_NO_ENTROPY, after=(call(6, Status.TDX_SUCCESS),)))
    assert verdict.outcome is Outcome.CLEAN and "retried" in verdict.reasons[0]


def test_a_later_success_from_another_site_is_not_a_retry():
    verdict = classify(evidence(after=(call(6, Status.TDX_SUCCESS, site="tdx_other+0x10"),)))
    assert verdict.outcome is Outcome.SILENT


def test_a_non_error_status_the_kernel_ignores_is_still_silent():
    """TDX_TDMR_ALREADY_INITIALIZED has bit 63 clear; a kernel that takes it as success says nothing."""
    verdict = classify(evidence(status=Status.TDX_TDMR_ALREADY_INITIALIZED))
    assert verdict.outcome is Outcome.SILENT


def test_a_rule_that_never_fired_or_fired_elsewhere_is_missed():
    never = Evidence(target_site=TARGET, records=log(), usable=True, injected=None)
    assert classify(never).outcome is Outcome.MISSED
    elsewhere = Evidence(target_site=TARGET, records=log(PANIC), usable=False,
                         injected=call(5, Status.TDX_SYS_BUSY, True, site="try_init_module_global+0x62"))
    verdict = classify(elsewhere)
    assert verdict.outcome is Outcome.MISSED and "try_init_module_global+0x62" in verdict.reasons[0]


def test_a_harness_error_is_not_a_kernel_outcome():
    verdict = classify(evidence(PANIC, usable=False, error="QEMU did not start"))
    assert verdict.outcome is Outcome.ERROR and not verdict.finding


def test_the_verdict_keeps_the_lines_around_the_first_crash():
    verdict = classify(evidence("line a", "line b", WARNING, " tdx_enable+0x3d/0x4f0", SEAMCALL_FAILED))
    assert verdict.lines[:3] == ("line a", "line b", WARNING)


def test_an_errno_user_space_got_is_a_report():
    """KVM reports most failures as the ioctl's errno: that is not silent."""
    verdict = classify(evidence(told=("init_vm: KVM_TDX_INIT_VM returned -1, errno 5, hw_error 0x8000020200000000",)))
    assert verdict.outcome is Outcome.CLEAN and verdict.reasons[0].startswith("user space: init_vm")
