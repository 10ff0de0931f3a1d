"""`tdxh nightly` end to end on two scenarios, one passing and one failing on purpose
(tests/data/repro/): an avocado job with one test each, per-scenario result directories, JUnit
XML, and a report that shows the failure first with its bundle (which `tdxh repro` reproduces)
and its SEAMCALL timeline."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.paths import REPO, artifact_name

pytestmark = pytest.mark.vm

PASSING = "tests/scenarios/test_first_boot.py::test_first_boot_initializes_tdx"
FAILING = "tests/data/repro/failing_scenario.py::test_tdx_initializes_although_key_config_fails"
TIMEOUT = 1200.0


def test_nightly_runs_each_scenario_in_an_avocado_job_and_reports_failures_first(images, tmp_path: Path):
    out = tmp_path / "nightly"
    command = [sys.executable, "-m", "harness", "nightly", "--no-unit", "--out", str(out), "--",
               "tests/data/repro/failing_scenario.py", "-k", "first_boot_initializes_tdx or although_key_config"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"a failing scenario must make nightly fail:\n{output[-3000:]}"
    assert "2 tests (2 scenarios)" in output, output[-3000:]
    assert re.search(r"\(tdx-\d/2\) .*: STARTED", output), "no progress from the avocado job"
    assert f"FAIL {FAILING}: AssertionError: no 'TDX-Module initialized'" in result.stdout

    cases = {case.get("name"): case for case in ET.parse(out / "results.xml").iter("testcase")}
    assert len(cases) == 2, cases
    for nodeid in (PASSING, FAILING):
        machine = out / "scenarios" / artifact_name(nodeid) / "machine0"
        for name in ("console.log", "seamcalls.jsonl", "platform.json", "faults.json", "qemu.cmdline",
                     "timeline.svg"):
            assert (machine / name).is_file(), f"{nodeid}: no {name} in {machine}"
    bundle = out / "scenarios" / artifact_name(FAILING) / "repro.tar.gz"
    assert bundle.is_file()
    repro = subprocess.run([sys.executable, "-m", "harness", "repro", str(bundle), "--work", str(tmp_path / "repro")],
                           cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert repro.returncode == 0 and "reproduced: the same failure" in repro.stdout, repro.stdout + repro.stderr

    page = (out / "report.html").read_text()
    rows = re.findall(r'<tr class="(\w+)"><td>\w+</td><td>([^<]+)</td>', page)
    assert rows == [("fail", FAILING), ("pass", PASSING)]
    assert f'href="scenarios/{artifact_name(FAILING)}/repro.tar.gz"' in page
    assert page.count("<svg") == 1 and "TDH.SYS.KEY.CONFIG" in page
