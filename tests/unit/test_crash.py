"""The crash classifier on stored and on kernel-formatted log lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.observe.crash import Crash, classify, unexpected
from harness.observe.dmesg import Record, parse_console

DATA = Path(__file__).parent.parent / "data"

# One line per kind, in the formats the kernel prints them (panic.c, traps.c, bug.c, kasan,
# lockdep, hung_task.c, mce/core.c, msr.c, the TDX host code).
LINES = {
    "Kernel panic - not syncing: Fatal machine check": Crash.PANIC,
    "BUG: KASAN: slab-out-of-bounds in tdx_enable+0x1c/0x100": Crash.KASAN,
    "WARNING: possible recursive locking detected": Crash.LOCKDEP,
    "Oops: general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP": Crash.OOPS,
    "BUG: unable to handle page fault for address: ffff888000000000": Crash.OOPS,
    "kernel BUG at arch/x86/virt/hw.c:327!": Crash.BUG,
    "WARNING: CPU: 1 PID: 1 at arch/x86/virt/vmx/tdx/tdx.c:620 tdmr_get_pamt+0x5/0x50": Crash.WARN,
    "INFO: task kworker/0:1:12 blocked for more than 120 seconds.": Crash.HUNG_TASK,
    "mce: [Hardware Error]: Machine check: TDX private memory error. Possible kernel bug.": Crash.MCE,
    "unchecked MSR access error: RDMSR from 0x480 at rIP: 0xffffffff81000000": Crash.UNCHECKED_MSR,
    "virt/tdx: SEAMCALL (0x000000000000002d) failed: 0xc000050c00000000": Crash.SEAMCALL_FAILED,
    "virt/tdx: TDX-Module initialization failed (-5)": Crash.TDX_INIT_FAILED,
    "seamldr: SEAMCALL (0x8000000000000001) failed: 0x8000000000020000": Crash.SEAMCALL_FAILED,
    # The shim's own messages (images/kernel/patches/0001, sw_module.c).
    "tdx-sw-module: exchange failed: no answer to CALL (error -110, last frame type 0x00); SEAMCALL returns "
    "VMFAILINVALID": Crash.MODULE_UNREACHABLE,
    "tdx-sw-module: the software TDX module stopped answering: every later SEAMCALL fails at once with "
    "VMFAILINVALID": Crash.MODULE_UNREACHABLE,
    "tdx-sw-module: SEAMCALL 0x21 on CPU 0 outside VMX operation: #UD": Crash.SEAMCALL_UD,
    "tdx-sw-module: CPU 0 took COM2 from CPU 1, stopped in the middle of an exchange": Crash.WIRE_TAKEOVER,
}


@pytest.mark.parametrize("text,kind", LINES.items())
def test_each_kind(text, kind):
    assert [f.kind for f in classify([Record(0, 1.0, text, 0)])] == [kind]


def test_ordinary_lines_are_not_findings():
    quiet = ["virt/tdx: TDX-Module initialized", "smp: Brought up 1 node, 2 CPUs", "BUG_ON in a file name is fine",
             "Run /init as init process"]
    assert classify(Record(i, 1.0, text, 0) for i, text in enumerate(quiet)) == []


def test_stored_failure_log_and_allowed_kinds():
    records = parse_console((DATA / "sysconfig-lps-missing.console.log").read_text().splitlines())
    findings = [f for f in classify(records) if f.record.boot == 0]
    assert [f.kind for f in findings] == [Crash.SEAMCALL_FAILED, Crash.TDX_INIT_FAILED]
    assert unexpected(findings, {Crash.SEAMCALL_FAILED, Crash.TDX_INIT_FAILED}) == []
    assert [f.kind for f in unexpected(findings, {Crash.SEAMCALL_FAILED})] == [Crash.TDX_INIT_FAILED]
