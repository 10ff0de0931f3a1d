"""The sweep's observers on stored output of real runs (tests/data/sweep, see tests/data/README.md):
the page owner stacks of a booted kernel, and the classifier on two runs of `tdxh sweep boot`."""

from __future__ import annotations

from pathlib import Path

from harness.observe import page_owner, pamt, patterns
from harness.observe.dmesg import read_kmsg
from harness.seam.abi import Leaf, Status
from harness.seam.trace import read_trace
from harness.sweep.flows import PAMT_ALLOCATOR, PAMT_CALLERS, BootFlow
from harness.sweep.outcome import Evidence, Outcome, classify
from harness.sweep.plan import site_of

DATA = Path(__file__).parent.parent / "data" / "sweep"
PAGE = 4096


def stored_evidence(name: str) -> tuple[Evidence, list]:
    dump = read_kmsg((DATA / f"{name}.kmsg.txt").read_text().splitlines())
    assert not dump.damage
    trace = read_trace(DATA / f"{name}.seamcalls.jsonl")
    injected = next(r for r in trace if r.injected)
    after = [r for r in trace if r.seq > injected.seq]
    return Evidence(target_site=site_of(injected), records=dump.records, usable=True, injected=injected, after=after,
                    reported_by=BootFlow.reported_by), dump.records


def test_page_owner_finds_the_pamt_the_kernel_holds():
    """A 2 GiB q35 guest after TDX init: the pages tdx_enable() holds through alloc_contig_pages()
    are its PAMT, as the PAMT model computes it from that guest's e820 map (one TDMR, 16-byte
    entries); the TDMR list (alloc_pages_exact()) is not a PAMT."""
    stacks = page_owner.parse_stacks((DATA / "page-owner-stacks.txt").read_text().splitlines())
    assert len(stacks) == 14 and all(s.functions for s in stacks)
    held = page_owner.pages_held(stacks, PAMT_ALLOCATOR, PAMT_CALLERS)
    dump = read_kmsg((DATA / "tdmr-init-busy.kmsg.txt").read_text().splitlines())
    model = pamt.model(pamt.parse_e820("\n".join(r.text for r in dump.records)))
    assert held * PAGE == model.pamt_bytes
    assert page_owner.pages_held(stacks, ("alloc_pages_exact",), PAMT_CALLERS) > 0  # it is there, not counted


def test_lp_init_vmfailinvalid_is_silent():
    """sc_retry_prerr() returns -ENODEV for VMFAILINVALID without printing, tdx_online_cpu() hands
    it to cpuhp_setup_state(), and tdx_enable() returns that error unprinted: TDX stays off and
    nothing in the log says so (arch/x86/virt/vmx/tdx/tdx.c, seamcall_internal.h)."""
    evidence, records = stored_evidence("lp-init-vmfailinvalid")
    assert evidence.injected.number == Leaf.TDH_SYS_LP_INIT
    assert evidence.injected.status == Status.TDX_SEAMCALL_VMFAILINVALID
    assert not any(patterns.INITIALIZED.search(r.text) for r in records)
    assert classify(evidence).outcome is Outcome.SILENT


def test_tdmr_init_busy_is_reported_and_clean():
    """seamcall_err_ret() prints the leaf and the status, init_tdx_module() fails with -EIO."""
    evidence, records = stored_evidence("tdmr-init-busy")
    verdict = classify(evidence)
    assert verdict.outcome is Outcome.CLEAN
    failed = next(patterns.SEAMCALL_FAILED.search(r.text) for r in records if patterns.SEAMCALL_FAILED.search(r.text))
    assert (int(failed["fn"], 16), int(failed["status"], 16)) == (Leaf.TDH_SYS_TDMR_INIT, evidence.injected.status)
    assert any(patterns.INIT_FAILED.search(line) for line in verdict.lines)
