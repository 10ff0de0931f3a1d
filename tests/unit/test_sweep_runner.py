"""The sweep runner on a flow without a machine: enumeration, one run per planned (site,
status), the verdicts, declared outcomes, sweep.json/sweep.html, bundles and run.json replay."""

from __future__ import annotations

import json
from pathlib import Path

from harness.launch import Images
from harness.observe import patterns
from harness.observe.dmesg import Record
from harness.seam import abi
from harness.seam.abi import Leaf, Status
from harness.seam.trace import TraceRecord
from harness.sweep import declared, report
from harness.sweep.flows import FlowContext, FlowResult
from harness.sweep.plan import SiteChoice
from harness.sweep.runner import outcome_of_replay, sweep

CALLS = ((Leaf.TDH_SYS_INIT, "try_init_module_global+0x62"), (Leaf.TDH_SYS_LP_INIT, "tdx_cpu_enable+0x58"),
         (Leaf.TDH_SYS_CONFIG, "config_tdx_module+0x100"))


class ScriptedFlow:
    """The calls of CALLS, each through the run's fault plan as the module would apply it; the
    kernel prints seamcall_err() for a failure, except for LP.INIT (as Linux for VMFAILINVALID)."""

    name = "scripted"
    description = "three init calls"
    reported_by = (patterns.SEAMCALL_FAILED,)

    def run(self, context: FlowContext) -> FlowResult:
        context.run_dir.mkdir(parents=True, exist_ok=True)
        trace, lines, counts = [], ["Linux version 7.3.4"], {}
        for seq, (leaf, site) in enumerate(CALLS):
            counts[leaf] = counts.get(leaf, 0) + 1
            rule = context.faults.match(leaf, counts[leaf], 0, 0, 0)
            status = 0 if rule is None else rule.status
            trace.append(TraceRecord(seq, 0.0, 1, 0, leaf, abi.leaf_name(leaf), 0, {}, {}, status,
                                     abi.status_name(status), rule.describe() if rule else None, site=site))
            if status:
                if leaf != Leaf.TDH_SYS_LP_INIT:
                    lines.append(f"virt/tdx: SEAMCALL ({leaf:#018x}) failed: {status:#018x}")
                break
        return FlowResult(trace, [Record(i, 0.0, t, 0) for i, t in enumerate(lines)], usable=True)


def images(tmp_path: Path) -> Images:
    for name in ("bzImage", "initrd"):
        (tmp_path / name).write_bytes(b"image")
    return Images(tmp_path / "bzImage", tmp_path / "initrd", None, "test")


def test_a_sweep_classifies_every_run_and_bundles_the_undeclared_findings(tmp_path):
    out = tmp_path / "out"
    lines: list[str] = []
    result = sweep(ScriptedFlow(), images(tmp_path), out, SiteChoice.FIRST, frozenset({"busy", "vmfailinvalid"}),
                   jobs=2, declarations=[], progress=lines.append)
    # SYS.INIT and SYS.CONFIG: busy and VMFAILINVALID; LP.INIT: busy and VMFAILINVALID.
    assert result.planned == len(result.runs) == 6 and result.complete
    silent = [r for r in result.runs if r.verdict.outcome.value == "silent"]
    assert [(r.run.target.leaf, r.run.injection.status) for r in silent] == [
        (Leaf.TDH_SYS_LP_INIT, Status.TDX_SYS_BUSY), (Leaf.TDH_SYS_LP_INIT, Status.TDX_SEAMCALL_VMFAILINVALID)]
    assert result.undeclared == silent and all(r.bundle and r.bundle.exists() for r in silent)
    assert len(lines) == 1 + 6 and sum("FINDING" in line for line in lines) == 2
    data = json.loads((out / report.RESULT).read_text())
    assert data["counts"] == {"clean": 4, "silent": 2} and data["undeclared_findings"] == 2
    assert [r["run"] for r in data["runs"]] == [f"{i:04d}" for i in range(6)]
    page = (out / report.HTML).read_text()
    assert "Findings (2)" in page and "tdx_cpu_enable+0x58" in page


def test_a_declared_outcome_is_not_a_finding(tmp_path):
    toml = tmp_path / "declared.toml"
    toml.write_text('[[outcome]]\nflow = "scripted"\nleaf = "TDH.SYS.LP.INIT"\nfunction = "tdx_cpu_enable"\n'
                    'class = "vmfailinvalid"\noutcome = "silent"\nreason = "sc_retry_prerr() prints nothing"\n')
    result = sweep(ScriptedFlow(), images(tmp_path), tmp_path / "out", SiteChoice.FIRST,
                   frozenset({"busy", "vmfailinvalid"}), declarations=declared.load(toml), progress=lambda _: None)
    assert [r.run.injection.klass.value for r in result.undeclared] == ["busy"]  # busy is not declared


def test_a_bad_declared_file_names_the_entry(tmp_path):
    toml = tmp_path / "declared.toml"
    toml.write_text('[[outcome]]\nflow = "boot"\nleaf = "TDH.SYS.INIT"\noutcome = "crashed"\nreason = "x"\n')
    try:
        declared.load(toml)
    except declared.DeclaredError as err:
        assert "[[outcome]] 1" in str(err) and "crashed" in str(err)
    else:
        raise AssertionError("an unknown outcome was accepted")


def test_a_run_replays_from_its_run_json(tmp_path):
    out = tmp_path / "out"
    result = sweep(ScriptedFlow(), images(tmp_path), out, SiteChoice.FIRST, frozenset({"vmfailinvalid"}),
                   declarations=[], progress=lambda _: None)
    original = next(r for r in result.runs if r.verdict.finding)
    again = outcome_of_replay(ScriptedFlow(), original.directory / "run.json", images(tmp_path), tmp_path / "again",
                              timeout=10)
    assert again.run == original.run and again.verdict.outcome is original.verdict.outcome
