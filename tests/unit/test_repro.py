"""Reproducer bundles without a VM: writing and reading them, the errors for files that are not
bundles (or were damaged), and how a re-run's outcome is judged from its JUnit XML."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from harness import repro
from harness.repro import BundleError, ReproResult, failure_line, junit_failure, open_bundle, write_bundle

REPORT = """    def test_x(boot):
>       assert found, "no 'TDX-Module initialized'"
E       AssertionError: no 'TDX-Module initialized'
E       assert None

tests/scenarios/test_x.py:12: AssertionError"""


def made_bundle(tmp_path: Path) -> Path:
    kernel, initrd, run_dir = tmp_path / "bzImage", tmp_path / "initrd", tmp_path / "run"
    kernel.write_bytes(b"kernel" * 100)
    initrd.write_bytes(b"initramfs" * 100)
    (run_dir / "machine0").mkdir(parents=True)
    (run_dir / "machine0" / "console.log").write_text("[    0.000000] Linux version 7.3.4\n")
    return write_bundle(run_dir / "repro.tar.gz", "tests/scenarios/test_x.py::test_x", REPORT, kernel, initrd,
                        "debian 7.3.4 build abc", run_dir)


def test_failure_line_is_the_first_e_line_else_the_last_line():
    assert failure_line(REPORT) == "AssertionError: no 'TDX-Module initialized'"
    assert failure_line("setup failed\nLaunchError: QEMU exited\n") == "LaunchError: QEMU exited"
    assert failure_line("") == ""


def test_bundle_round_trip_keeps_images_logs_and_the_failure(tmp_path):
    bundle = open_bundle(made_bundle(tmp_path), tmp_path / "out")
    assert bundle.info.nodeid == "tests/scenarios/test_x.py::test_x"
    assert bundle.info.failure_line == "AssertionError: no 'TDX-Module initialized'"
    assert bundle.kernel.read_bytes() == b"kernel" * 100 and bundle.initrd.read_bytes() == b"initramfs" * 100
    assert (bundle.logs / "machine0" / "console.log").read_text().startswith("[    0.000000] Linux")
    assert not (bundle.logs / "repro.tar.gz").exists(), "the bundle must not contain itself"


def rewrite(bundle: Path, out: Path, change: dict[str, bytes | None]) -> Path:
    """A copy of ``bundle`` with members replaced (bytes) or left out (None)."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            if member.name in change:
                if change[member.name] is None:
                    continue
                data = change[member.name]  # type: ignore[assignment]
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out


def test_files_that_are_not_usable_bundles_say_why(tmp_path):
    good = made_bundle(tmp_path)
    with pytest.raises(BundleError, match="no such file"):
        open_bundle(tmp_path / "absent.tar.gz", tmp_path / "o1")
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not a tar at all")
    with pytest.raises(BundleError, match=r"not a readable \.tar\.gz bundle"):
        open_bundle(garbage, tmp_path / "o2")
    with pytest.raises(BundleError, match=r"missing bundle\.json"):
        open_bundle(rewrite(good, tmp_path / "noinfo.tar.gz", {repro.INFO: None}), tmp_path / "o3")
    with pytest.raises(BundleError, match="bzImage does not match its recorded sha256"):
        open_bundle(rewrite(good, tmp_path / "damaged.tar.gz", {repro.KERNEL: b"other"}), tmp_path / "o4")
    info = json.loads(tarfile.open(good).extractfile(repro.INFO).read())  # type: ignore[union-attr]
    future = json.dumps({**info, "format": repro.FORMAT + 1}).encode()
    with pytest.raises(BundleError, match=f"bundle format {repro.FORMAT + 1}"):
        open_bundle(rewrite(good, tmp_path / "future.tar.gz", {repro.INFO: future}), tmp_path / "o5")
    with pytest.raises(BundleError, match=r"bad bundle\.json"):
        open_bundle(rewrite(good, tmp_path / "badjson.tar.gz", {repro.INFO: b"{"}), tmp_path / "o6")


def test_junit_failure_finds_the_test_by_name(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text("""<testsuites><testsuite>
<testcase classname="tests.x" name="test_other"><failure message="other">E   AssertionError: other</failure></testcase>
<testcase classname="tests.x" name="test_x"><error message="setup">E   LaunchError: QEMU exited</error></testcase>
<testcase classname="tests.x" name="test_ok"/>
</testsuite></testsuites>""")
    assert junit_failure(junit, "tests/x.py::test_x") == "LaunchError: QEMU exited"
    assert junit_failure(junit, "tests/x.py::test_ok") == ""


def test_summary_says_whether_and_how_it_reproduced(tmp_path):
    def result(reproduced: bool, same: bool, line: str, status: int = 1) -> str:
        return ReproResult(reproduced, same, line, status, [], tmp_path).summary("AssertionError: was")
    assert result(False, False, "", status=0) == "did not reproduce: the scenario passed"
    assert result(False, False, "", status=4).startswith("could not tell: pytest exited 4")
    assert result(True, True, "AssertionError: was") == "reproduced: the same failure: AssertionError: was"
    assert "was: AssertionError: was\n  now: KeyError: x" in result(True, False, "KeyError: x")
