"""`tdxh sweep boot` on the real kernel: every TDX init call site failed with VMfailInvalid.

The kernel's rule (arch/x86/virt/vmx/tdx/seamcall_internal.h sc_retry_prerr()): VMFAILINVALID
is -ENODEV, never printed by seamcall_err(); try_init_module_global() prints "module not loaded"
for it; a failure inside init_tdx_module() ends in "TDX-Module initialization failed (-19)"; a
failure of TDH.SYS.LP.INIT in the hotplug callback is returned by tdx_enable() unprinted (declared
silent, docs/findings/lp-init-vmfailinvalid-silent.md). No run may leak a PAMT page (page owner)
or leave the kernel believing in a module that is not ready.
"""

from __future__ import annotations

import errno

from harness.observe import patterns
from harness.seam import abi
from harness.seam.abi import Leaf
from harness.seam.trace import read_trace
from harness.sweep import report
from harness.sweep.flows import BootFlow
from harness.sweep.outcome import Outcome
from harness.sweep.plan import SiteChoice, site_of
from harness.sweep.runner import sweep
from harness.sweep.statuses import STATUSES


def test_boot_sweep_of_vmfailinvalid(images, artifacts):
    out = artifacts / "sweep"
    result = sweep(BootFlow(), images, out, SiteChoice.FIRST, frozenset({"vmfailinvalid"}), jobs=1,
                   progress=lambda _: None)
    # One run a site: the sites of the enumeration's calls to a leaf with a status table.
    sites = {site_of(r) for r in read_trace(out / "enumerate" / "seamcalls.jsonl") if abi.leaf_key(r.fn) in STATUSES}
    assert result.complete and len(result.runs) == len(sites), (len(result.runs), sorted(sites))
    by_leaf = {}
    for run in result.runs:
        by_leaf.setdefault(run.run.target.leaf, []).append(run)
        assert run.verdict.outcome not in (Outcome.MISSED, Outcome.ERROR), (report.describe(run.run), run.verdict)
    [lp_init] = by_leaf[Leaf.TDH_SYS_LP_INIT]
    assert lp_init.verdict.outcome is Outcome.SILENT and lp_init.declared is not None
    [sys_init] = by_leaf[Leaf.TDH_SYS_INIT]
    assert any(patterns.NOT_LOADED.search(line) for line in sys_init.verdict.lines), sys_init.verdict
    for leaf, runs in by_leaf.items():
        if leaf in (Leaf.TDH_SYS_INIT, Leaf.TDH_SYS_LP_INIT):
            continue
        for run in runs:
            assert run.verdict.outcome is Outcome.CLEAN, (report.describe(run.run), run.verdict)
            failed = [patterns.INIT_FAILED.search(line) for line in run.verdict.lines]
            assert any(m and int(m["errno"]) == -errno.ENODEV for m in failed), (report.describe(run.run), run.verdict)
            assert not any(patterns.SEAMCALL_FAILED.search(line) for line in run.verdict.lines)
    assert result.undeclared == []
