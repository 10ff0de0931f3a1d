"""Reproducer bundles end to end: a scenario that fails on purpose (tests/data/repro/) writes its
bundle, and `tdxh repro` on that bundle runs it again and reports that it reproduced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.launch import Images
from harness.paths import REPO
from harness.repro import open_bundle
from harness.seam.abi import Leaf
from harness.seam.trace import read_trace

pytestmark = pytest.mark.vm

FAILING = "tests/data/repro/failing_scenario.py::test_tdx_initializes_although_key_config_fails"
FAILURE = "AssertionError: no 'TDX-Module initialized' after an injected KEY.CONFIG failure"
TIMEOUT = 900.0


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_a_failing_scenario_writes_a_bundle_that_tdxh_repro_reproduces(images: Images, tmp_path: Path):
    first = run([sys.executable, "-m", "pytest", "-q", "-n0", FAILING, "--kernel", str(images.kernel),
                 "--initramfs", str(images.initrd), "--artifacts", str(tmp_path / "first")])
    assert first.returncode == 1, f"the scenario should fail on purpose:\n{first.stdout[-3000:]}"
    [bundle_path] = (tmp_path / "first").glob("*/repro.tar.gz")
    assert f"tdxh repro {bundle_path}" in first.stdout, "pytest's output does not point at the bundle"

    bundle = open_bundle(bundle_path, tmp_path / "unpacked")
    assert (bundle.info.nodeid, bundle.info.failure_line) == (FAILING, FAILURE)
    assert bundle.kernel.read_bytes() == images.kernel.read_bytes()
    trace = read_trace(bundle.logs / "machine0" / "seamcalls.jsonl")
    assert [r.injected is not None for r in trace if r.number == Leaf.TDH_SYS_KEY_CONFIG] == [True]
    assert (bundle.logs / "machine0" / "faults.json").is_file() and (bundle.logs / "machine0" / "console.log").is_file()

    repro = run([sys.executable, "-m", "harness", "repro", str(bundle_path), "--work", str(tmp_path / "repro")])
    assert repro.returncode == 0, f"tdxh repro did not reproduce:\n{repro.stdout[-2000:]}\n{repro.stderr[-2000:]}"
    assert f"reproduced: the same failure: {FAILURE}" in repro.stdout
    assert "--kernel" in repro.stderr and str(tmp_path / "repro") in repro.stderr, "the re-run command is not shown"
