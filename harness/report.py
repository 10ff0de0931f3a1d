"""The nightly report a person reads first: one HTML page with the counts, every test in a table
(failures first, each with its failure line and links to its logs, trace and reproducer bundle),
and a timeline picture of each failing scenario's SEAMCALLs. Built from avocado's results.json,
pytest's JUnit XML per test and the scenarios' artifact directories (harness/nightly.py)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.coverage import report as coverage_report
from harness.paths import artifact_name
from harness.repro import BUNDLE_NAME, junit_failure
from harness.seam.trace import TraceRecord, read_trace

# Avocado statuses, worst first: the table's order.
STATUS_ORDER = ("ERROR", "FAIL", "INTERRUPT", "CANCEL", "WARN", "SKIP", "PASS")
LOG_FILES = ("console.log", "commands.log", "seamcalls.jsonl", "qemu.cmdline", "bochs.cmdline", "platform.json",
             "faults.json")
TIMELINE = "timeline.svg"  # beside each machine's seamcalls.jsonl
TIMELINE_WIDTH, LANE_HEIGHT, LABEL_WIDTH = 900, 16, 190


@dataclass(frozen=True)
class TestResult:
    nodeid: str
    status: str
    seconds: float
    failure: str  # pytest's failure line ("" when it passed)
    logdir: Path  # avocado's directory of the test (stdout, stderr, debug.log)
    artifacts: Path  # the scenario's artifact directory (may not exist: unit tests)

    @property
    def rank(self) -> int:
        return STATUS_ORDER.index(self.status) if self.status in STATUS_ORDER else 0

    def traces(self) -> list[Path]:
        return sorted(self.artifacts.glob("*/seamcalls.jsonl")) if self.artifacts.is_dir() else []


class HistoryError(Exception):
    """A directory given as history is not the output of a nightly run."""


@dataclass(frozen=True)
class History:
    """Each test's statuses in earlier nightly runs, oldest first (a test missing from a run has
    no entry for it)."""

    runs: int
    statuses: dict[str, list[str]]

    def rate(self, result: TestResult) -> tuple[int, int]:
        """(passed, ran) over the earlier runs and this one; skips do not count as runs."""
        seen = [*self.statuses.get(result.nodeid, []), result.status]
        ran = [status for status in seen if status != "SKIP"]
        return sum(status == "PASS" for status in ran), len(ran)


def load_history(directories: Sequence[Path]) -> History:
    """The statuses of earlier nightly output directories (``tdxh nightly --out``), given oldest
    first: avocado's results.json of the job each holds."""
    statuses: dict[str, list[str]] = {}
    for directory in directories:
        jobs = sorted((directory / "job").glob("job-*/results.json"))
        if not jobs:
            raise HistoryError(f"{directory}: no job/job-*/results.json: not the output directory of a tdxh nightly")
        for test in json.loads(jobs[-1].read_text())["tests"]:
            statuses.setdefault(test["name"], []).append(test["status"])
    return History(len(directories), statuses)


def load_results(job_dir: Path, out: Path, junit_of: dict[str, Path]) -> list[TestResult]:
    data = json.loads((job_dir / "results.json").read_text())
    results = []
    for test in data["tests"]:
        nodeid = test["name"]
        junit = junit_of.get(nodeid)
        failure = junit_failure(junit, nodeid) if junit is not None and junit.exists() else ""
        if not failure and test["status"] != "PASS":
            failure = str(test.get("fail_reason") or "")
        results.append(TestResult(nodeid, test["status"], float(test.get("time_elapsed") or 0.0), failure,
                                  Path(test["logdir"]), out / "scenarios" / artifact_name(nodeid)))
    return sorted(results, key=lambda r: (r.rank, r.nodeid))


def timeline_svg(records: Sequence[TraceRecord], title: str) -> str:
    """SEAMCALLs against time: one lane per leaf in the order the kernel first called it (for
    boot, the init steps: SYS.INIT, LP.INIT, SYS.RD, CONFIG, KEY.CONFIG, TDMR.INIT...), a tick per
    call, failed calls red; a dashed line where a new kernel (reboot, kexec) said HELLO."""
    if not records:
        return ""
    lanes: list[str] = []
    for record in records:
        if record.leaf not in lanes:
            lanes.append(record.leaf)
    start, end = records[0].time, records[-1].time
    span = max(end - start, 1e-3)
    plot = TIMELINE_WIDTH - LABEL_WIDTH - 10
    height = LANE_HEIGHT * len(lanes) + 40

    def x(time: float) -> float:
        return LABEL_WIDTH + (time - start) / span * plot

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{TIMELINE_WIDTH}" height="{height}" '
             f'font-family="monospace" font-size="11"><title>{html.escape(title)}</title>']
    for lane, leaf in enumerate(lanes):
        y = 20 + lane * LANE_HEIGHT
        parts.append(f'<text x="4" y="{y + 11}">{html.escape(leaf)}</text>'
                     f'<line x1="{LABEL_WIDTH}" y1="{y + 8}" x2="{TIMELINE_WIDTH - 10}" y2="{y + 8}" stroke="#eee"/>')
    boot = records[0].boot
    for record in records:
        if record.boot != boot:
            boot = record.boot
            parts.append(f'<line x1="{x(record.time):.1f}" y1="12" x2="{x(record.time):.1f}" y2="{height - 20}" '
                         f'stroke="#888" stroke-dasharray="3,3"/><text x="{x(record.time) + 2:.1f}" y="10">'
                         f'boot {boot}</text>')
        y = 20 + lanes.index(record.leaf) * LANE_HEIGHT
        color = "#c00" if record.status and record.status >> 63 else "#36c"
        parts.append(f'<rect x="{x(record.time):.1f}" y="{y + 2}" width="2" height="12" fill="{color}">'
                     f'<title>#{record.seq} {html.escape(record.leaf)} cpu {record.cpu} t={record.time - start:.3f}s '
                     f'{html.escape(record.status_name)}</title></rect>')
    parts.append(f'<text x="{LABEL_WIDTH}" y="{height - 6}">0 s</text>'
                 f'<text x="{TIMELINE_WIDTH - 10}" y="{height - 6}" text-anchor="end">{span:.2f} s '
                 f'(harness clock, from the first SEAMCALL)</text></svg>')
    return "".join(parts)


def write_timelines(result: TestResult) -> list[Path]:
    """timeline.svg beside each machine's trace of the scenario."""
    written = []
    for trace in result.traces():
        svg = timeline_svg(read_trace(trace), f"{result.nodeid}: {trace.parent.name}")
        if svg:
            path = trace.with_name(TIMELINE)
            path.write_text(svg)
            written.append(path)
    return written


def _timeline_of(trace: Path) -> str:
    """The picture write_timelines() drew for ``trace`` ("" for an empty trace)."""
    picture = trace.with_name(TIMELINE)
    return picture.read_text() if picture.exists() else ""


def _link(path: Path, base: Path, text: str) -> str:
    try:
        target = path.relative_to(base)
    except ValueError:
        target = path
    return f'<a href="{html.escape(str(target))}">{html.escape(text)}</a>'


def _links(result: TestResult, base: Path) -> str:
    links = [_link(result.logdir / "stdout", base, "output")]
    if result.artifacts.is_dir():
        links.append(_link(result.artifacts, base, "artifacts"))
        bundle = result.artifacts / BUNDLE_NAME
        if bundle.exists():
            links.append(_link(bundle, base, "repro bundle"))
        for machine in sorted(p for p in result.artifacts.iterdir() if p.is_dir()):
            links += [_link(machine / name, base, f"{machine.name}/{name}") for name in (*LOG_FILES, TIMELINE)
                      if (machine / name).exists()]
    return " ".join(links)


def coverage_section(directory: Path | None, out: Path, compare_with: Path | None) -> str:
    """The coverage table (and the changes against an older summary, drops first), linking to
    gcovr's HTML; "" without --coverage."""
    if directory is None:
        return ""
    summary = directory / coverage_report.SUMMARY
    if not summary.exists():
        return f"<h2>Coverage</h2><p>no report: nothing was merged (see {html.escape(str(directory))})</p>"
    links = " ".join(_link(directory / name, out, name) for name in (coverage_report.HTML, coverage_report.SUMMARY,
                                                                      coverage_report.LCOV,
                                                                      coverage_report.LINES_BY_SCENARIO,
                                                                      coverage_report.BLIND_SPOTS))
    text = coverage_report.summary_text(directory, compare_with if compare_with is not None and compare_with.exists()
                                        else None)
    spots = directory / coverage_report.BLIND_SPOTS
    if spots.exists():
        text += "\n\n" + coverage_report.format_blind_spots(json.loads(spots.read_text()))
    return f"<h2>Coverage of the TDX host code</h2><p>{links}</p><pre>{html.escape(text)}</pre>"


def _history_cell(result: TestResult, history: History) -> str:
    passed, ran = history.rate(result)
    flaky = 0 < passed < ran
    return f'<td class="{"flaky" if flaky else ""}">{passed}/{ran}</td>'


def history_section(results: Sequence[TestResult], history: History) -> str:
    """The tests that passed in some of the runs and not in others, least reliable first."""
    rates = [(r, *history.rate(r)) for r in results]
    flaky = sorted(((r, p, n) for r, p, n in rates if 0 < p < n), key=lambda item: (item[1] / item[2], item[0].nodeid))
    rows = "".join(f"<tr><td>{p}/{n}</td><td>{html.escape(r.nodeid)}</td></tr>" for r, p, n in flaky)
    table = f"<table><tr><th>passed</th><th>test</th></tr>{rows}</table>" if rows else "<p>none</p>"
    return (f"<h2>Flaky over the last {history.runs + 1} runs</h2>"
            f"<p>Pass rates over this run and {history.runs} earlier ones.</p>{table}")


def render(results: Sequence[TestResult], out: Path, title: str, coverage: str = "",
           history: History | None = None) -> str:
    counts = {status: sum(r.status == status for r in results) for status in STATUS_ORDER}
    failed = [r for r in results if r.status not in ("PASS", "SKIP")]
    rows = "".join(
        f'<tr class="{r.status.lower()}"><td>{r.status}</td><td>{html.escape(r.nodeid)}</td>'
        f'<td>{r.seconds:.1f}</td>{_history_cell(r, history) if history else ""}<td>{html.escape(r.failure)}</td>'
        f'<td>{_links(r, out)}</td></tr>'
        for r in results)
    sections = "".join(
        f'<h3>{html.escape(r.nodeid)}</h3><p>{html.escape(r.failure)}</p>'
        + "".join(f"<p>{html.escape(t.parent.name)}</p>{_timeline_of(t)}" for t in r.traces())
        for r in failed)
    summary = " | ".join(f"{status} {n}" for status, n in counts.items() if n)
    passed_header = "<th>passed</th>" if history else ""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body {{ font-family: sans-serif; margin: 1em 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; font-size: 13px; vertical-align: top; }}
tr.fail td:first-child, tr.error td:first-child, tr.interrupt td:first-child {{ background: #f99; }}
tr.pass td:first-child {{ background: #9d9; }} tr.skip td:first-child {{ background: #ddd; }}
td.flaky {{ background: #fd8; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p><b>{len(results)} tests: {summary}</b></p>
<table><tr><th>status</th><th>test</th><th>s</th>{passed_header}<th>failure</th><th>logs</th></tr>
{rows}</table>
{history_section(results, history) if history else ""}
{coverage}
<h2>Failures: SEAMCALL timelines</h2>{sections or "<p>none</p>"}
</body></html>
"""


def write_report(results: Sequence[TestResult], out: Path, title: str, coverage: Path | None = None,
                 coverage_compare: Path | None = None, history: History | None = None) -> Path:
    for result in results:  # first: the page embeds the failures' pictures from these files
        write_timelines(result)
    path = out / "report.html"
    path.write_text(render(results, out, title, coverage_section(coverage, out, coverage_compare), history))
    return path
