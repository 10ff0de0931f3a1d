"""``tdxh nightly``: every scenario as a test of one avocado-framework job, pytest as the test
language. Each scenario runs as its own ``pytest NODEID`` (an avocado exec-test) on images built
once, so one scenario's crash or hang cannot take the others with it; its logs, trace, platform
and fault plan (and a reproducer bundle when it fails) stay in a directory of its own. The unit
tests run as one more test of the job. Afterwards: avocado's results (JUnit XML, its HTML, JSON)
and the harness's report (harness/report.py), failures first.

Layout of the output directory:
    scenarios/<scenario>/   the pytest artifacts of each scenario (kept whether it passed or not)
    junit/<n>.xml           pytest's JUnit XML of each test
    job/                    avocado's job directory (results.xml, results.html, per-test stdout)
    report.html             the harness's report
    coverage/               with --coverage: every scenario's kernel counters and their report
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.launch import Images
from harness.paths import REPO
from harness.repro import pytest_command

log = logging.getLogger("harness.nightly")

COVERAGE_DIR = "coverage"  # under the output directory, with --coverage
SCENARIOS = "tests/scenarios"
UNIT = "tests/unit"
COLLECT_TIMEOUT = 300.0


class NightlyError(Exception):
    """The job could not be set up (nothing collected, avocado missing); the message says why."""


@dataclass(frozen=True)
class NightlyTest:
    """One test of the job: a scenario, or the unit tests as a whole."""

    nodeid: str
    index: int

    @property
    def junit(self) -> str:
        return f"junit/{self.index}.xml"


def collect(selection: Sequence[str]) -> list[str]:
    """The scenarios' node ids, as ``pytest --collect-only`` lists them (``selection``: more
    pytest arguments, e.g. ``-k kexec``)."""
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", SCENARIOS, *selection]
    log.info("$ %s", shlex.join(command))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=COLLECT_TIMEOUT, check=False)
    nodeids = [line for line in result.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if result.returncode not in (0, 5):
        raise NightlyError(f"collecting the scenarios failed (pytest exit {result.returncode}):\n"
                           f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return nodeids


def test_command(test: NightlyTest, images: Images, out: Path, coverage: Path | None = None) -> list[str]:
    """The command line of one test: the session's images, its own artifacts and JUnit file;
    with ``coverage``, its counters go there (merged once, after the job)."""
    extra = ["--keep-artifacts"]
    if coverage is not None:
        extra += ["--coverage", str(coverage), "--coverage-no-report"]
    return pytest_command(test.nodeid, images.kernel, images.initrd, out / "scenarios", out / test.junit, extra)


def job_config(out: Path) -> dict[str, Any]:
    return {
        "run.results_dir": str(out / "job"),
        "run.max_parallel_tasks": 1,  # the scenarios use both cores themselves
        "job.run.result.xunit.output": str(out / "results.xml"),
        "runner.exectest.exitcodes.skip": [5],  # pytest: nothing collected (a skipped scenario is 0)
        "sysinfo.collect.enabled": "off",
    }


def keep_avocado_inside(out: Path) -> None:
    """Avocado looks up its data directories in its global settings, not in a job's config, and
    falls back to creating ~/avocado: point them into the output directory."""
    from avocado.core.settings import settings

    data = out / "job" / "data"
    data.mkdir(parents=True, exist_ok=True)
    for key in ("base_dir", "data_dir", "logs_dir", "test_dir"):
        settings.update_option(f"datadir.paths.{key}", str(data))


def run_job(tests: Sequence[NightlyTest], images: Images, out: Path, coverage: Path | None = None) -> tuple[int, Path]:
    """Run the avocado job (progress on stdout as avocado prints it); returns its exit code and
    its job directory."""
    try:
        from avocado.core.job import Job
        from avocado.core.nrunner.runnable import Runnable
        from avocado.core.suite import TestSuite
    except ImportError as err:
        raise NightlyError(f"avocado-framework is not installed ({err}): pip install avocado-framework") from err
    (out / "junit").mkdir(parents=True, exist_ok=True)
    runnables = []
    for test in tests:
        command = test_command(test, images, out, coverage)
        log.info("$ cd %s && %s", REPO, shlex.join(command))
        runnables.append(Runnable("exec-test", *command, identifier=test.nodeid))
    keep_avocado_inside(out)
    config = job_config(out)
    # Avocado prints its progress through its own handlers; its loggers reaching the harness's
    # root handler too would print every line twice and its internal chatter besides.
    logging.getLogger("avocado").propagate = False
    suite = TestSuite(name="tdx", tests=runnables, config=config)
    # Avocado's exec-tests run in the job's working directory: the repository root (pytest's rootdir).
    with contextlib.chdir(REPO), Job(config, [suite]) as job:
        status = int(job.run())
        return status, Path(job.logdir)


def plan(selection: Sequence[str], unit: bool) -> list[NightlyTest]:
    nodeids = collect(selection)
    if unit:
        nodeids = [UNIT, *nodeids]
    if not nodeids:
        raise NightlyError(f"no scenario matches {shlex.join(selection)!r}")
    return [NightlyTest(nodeid, index) for index, nodeid in enumerate(nodeids)]
