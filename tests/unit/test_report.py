"""The nightly report on stored material: the SEAMCALL timeline of a real boot's trace
(tests/data/sysconfig-lps-missing.seamcalls.jsonl: SYS.CONFIG fails), and the page built from an
avocado results.json and pytest JUnit files (failures first, links to logs and bundles)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from harness import report
from harness.paths import artifact_name
from harness.seam.trace import read_trace

DATA = Path(__file__).parent.parent / "data"
TRACE = DATA / "sysconfig-lps-missing.seamcalls.jsonl"


def test_timeline_has_a_lane_per_leaf_in_call_order_and_failed_calls_in_red():
    records = read_trace(TRACE)
    svg = report.timeline_svg(records, "boot")
    first_seen = list(dict.fromkeys(r.leaf for r in records))
    lanes = re.findall(r'<text x="4" y="\d+">([^<]+)</text>', svg)
    assert lanes == first_seen and lanes[0] == "TDH.SYS.INIT"
    failed = [r for r in records if r.status >> 63]
    assert svg.count('fill="#c00"') == len(failed) == 1
    assert svg.count("<rect ") == len(records)
    assert report.timeline_svg([], "nothing") == ""


def job(tmp_path: Path, tests: list[tuple[str, str]]) -> tuple[Path, Path, dict[str, Path]]:
    """An avocado job directory and nightly output tree with these (nodeid, status) tests."""
    out, job_dir = tmp_path / "out", tmp_path / "out" / "job" / "job-1"
    job_dir.mkdir(parents=True)
    junits = {}
    entries = []
    for index, (nodeid, status) in enumerate(tests):
        logdir = job_dir / "test-results" / str(index)
        logdir.mkdir(parents=True)
        (logdir / "stdout").write_text("pytest output")
        entries.append({"name": nodeid, "status": status, "time_elapsed": 1.5, "logdir": str(logdir),
                        "fail_reason": "<unknown>"})
        junit = out / "junit" / f"{index}.xml"
        junit.parent.mkdir(exist_ok=True)
        name = nodeid.rsplit("::", 1)[-1]
        failure = f'<failure message="x">E   AssertionError: {name} broke</failure>' if status == "FAIL" else ""
        junit.write_text(f'<testsuites><testsuite><testcase name="{name}">{failure}</testcase>'
                         '</testsuite></testsuites>')
        junits[nodeid] = junit
        machine = out / "scenarios" / artifact_name(nodeid) / "machine0"
        machine.mkdir(parents=True)
        shutil.copy(TRACE, machine / "seamcalls.jsonl")
        (machine / "console.log").write_text("[    0.0] Linux\n")
    (job_dir / "results.json").write_text(json.dumps({"tests": entries}))
    return out, job_dir, junits


def test_report_lists_failures_first_with_their_line_links_and_timeline(tmp_path):
    out, job_dir, junits = job(tmp_path, [("tests/scenarios/test_a.py::test_ok", "PASS"),
                                          ("tests/scenarios/test_b.py::test_broken", "FAIL"),
                                          ("tests/scenarios/test_c.py::test_skipped", "SKIP")])
    failing = out / "scenarios" / artifact_name("tests/scenarios/test_b.py::test_broken")
    (failing / "repro.tar.gz").write_bytes(b"bundle")
    results = report.load_results(job_dir, out, junits)
    assert [r.status for r in results] == ["FAIL", "SKIP", "PASS"]
    assert results[0].failure == "AssertionError: test_broken broke" and results[2].failure == ""
    page = report.write_report(results, out, "nightly").read_text()
    rows = re.findall(r'<tr class="(\w+)"><td>\w+</td><td>([^<]+)</td>', page)
    assert rows == [("fail", "tests/scenarios/test_b.py::test_broken"),
                    ("skip", "tests/scenarios/test_c.py::test_skipped"), ("pass", "tests/scenarios/test_a.py::test_ok")]
    assert "3 tests: FAIL 1 | SKIP 1 | PASS 1" in page
    bundle_link = f'href="scenarios/{failing.name}/repro.tar.gz"'
    assert bundle_link in page and 'href="job/job-1/test-results/1/stdout"' in page
    assert page.count("<svg") == 1, "only the failure's timeline is drawn inline"
    assert all((out / "scenarios" / artifact_name(n) / "machine0" / "timeline.svg").exists() for n in junits)


def test_report_has_the_coverage_table_and_its_changes_drops_first(tmp_path):
    out, job_dir, junits = job(tmp_path, [("tests/scenarios/test_a.py::test_ok", "PASS")])
    coverage = out / "coverage"
    coverage.mkdir()
    figures = {"line_covered": 9, "line_total": 15, "branch_covered": 6, "branch_total": 8,
               "function_covered": 2, "function_total": 3}
    summary = {"files": [{"filename": "arch/x86/virt/vmx/tdx/tdx.c", **figures}], **figures}
    (coverage / "coverage-summary.json").write_text(json.dumps(summary))
    spots = {"noinstr": {"arch/x86/virt/vmx/tdx/tdx.c": ["tdh_vp_enter"]}}
    (coverage / "blind-spots.json").write_text(json.dumps(spots))
    old = tmp_path / "old-summary.json"
    before = {**figures, "line_covered": 12}  # 80% of the lines then, 60% now
    old.write_text(json.dumps({"files": [{"filename": "arch/x86/virt/vmx/tdx/tdx.c", **before},
                                         {"filename": "arch/x86/kvm/vmx/tdx.c", **before}], **before}))
    page = report.write_report(report.load_results(job_dir, out, junits), out, "nightly", coverage, old).read_text()
    assert 'href="coverage/html/index.html"' in page
    assert re.search(r"arch/x86/virt/vmx/tdx/tdx\.c +9/15 +60\.0%", page)
    changes = page[page.index("change against"):]
    assert changes.index("arch/x86/kvm/vmx/tdx.c") < changes.index("arch/x86/virt/vmx/tdx/tdx.c")  # gone: -80
    assert re.search(r"arch/x86/virt/vmx/tdx/tdx\.c +-20\.0%", changes)
    assert "noinstr, compiled without counters: tdh_vp_enter" in page


def test_history_gives_each_test_its_pass_rate_and_lists_the_flaky(tmp_path):
    a, b, c = ("tests/scenarios/test_a.py::test_steady", "tests/scenarios/test_b.py::test_wobbly",
               "tests/scenarios/test_c.py::test_new")
    earlier = []
    for night, statuses in enumerate([{a: "PASS", b: "PASS"}, {a: "PASS", b: "FAIL"}, {a: "PASS", b: "SKIP"}]):
        out_n, _, _ = job(tmp_path / f"night{night}", list(statuses.items()))
        earlier.append(out_n)
    history = report.load_history(earlier)
    assert history.runs == 3 and history.statuses[b] == ["PASS", "FAIL", "SKIP"]
    out, job_dir, junits = job(tmp_path / "tonight", [(a, "PASS"), (b, "PASS"), (c, "FAIL")])
    results = report.load_results(job_dir, out, junits)
    # b: passed twice in the three runs it ran (the skip is not a run); c ran once, tonight.
    assert {r.nodeid: history.rate(r) for r in results} == {a: (4, 4), b: (2, 3), c: (0, 1)}
    page = report.write_report(results, out, "nightly", history=history).read_text()
    section = page.split("Flaky over the last 4 runs", 1)[1]
    assert re.findall(r"<tr><td>(\d+/\d+)</td><td>([^<]+)</td></tr>", section) == [("2/3", b)]
    assert '<td class="flaky">2/3</td>' in page and '<td class="">4/4</td>' in page


def test_history_refuses_a_directory_that_is_not_a_nightly(tmp_path):
    with pytest.raises(report.HistoryError, match="not the output directory of a tdxh nightly"):
        report.load_history([tmp_path])
