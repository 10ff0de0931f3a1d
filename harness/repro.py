"""Reproducer bundles: one archive per failing scenario with what it takes to run it again.

A bundle holds the kernel and initramfs the scenario booted (so a rebuilt or changed tree does
not matter), the scenario's id and the harness commit that ran it (the scenario's code is its
steps: machine configs, platform, fault plans), the failure as pytest reported it, and the run
directory (console logs, SEAMCALL traces, fault plans, emulator command lines).

``tdxh repro BUNDLE`` unpacks it and runs that scenario again with pytest on the bundled images;
it reproduced when the scenario fails again, and the report says whether with the same message.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shlex
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.coverage.objects import COVERAGE_ENV
from harness.paths import REPO

log = logging.getLogger("harness.repro")

FORMAT = 1
BUNDLE_NAME = "repro.tar.gz"  # in a failing scenario's artifact directory
INFO = "bundle.json"
KERNEL = "images/bzImage"
INITRAMFS = "images/initramfs.cpio.gz"
LOGS = "logs"
# A fault sweep run's bundle (tdxh sweep): nodeid "sweep:FLOW:RUN", its run.json in the logs; it
# is re-run with `tdxh sweep FLOW --replay`, which writes its verdict to replay.json.
SWEEP_PREFIX = "sweep:"
SWEEP_RUN_SPEC = "run.json"
SWEEP_REPLAY_RESULT = "replay.json"


class BundleError(Exception):
    """The file is not a reproducer bundle this harness can read; the message says why."""


@dataclass(frozen=True)
class BundleInfo:
    nodeid: str  # the scenario, as pytest names it from the repository root
    failure: str  # pytest's report of the failure (its last lines are the assertion)
    harness_commit: str  # `git describe`-like: commit, "+dirty" when the tree had changes
    kernel_identity: str
    kernel_sha256: str
    initramfs_sha256: str
    created: str
    format: int = FORMAT

    @property
    def failure_line(self) -> str:
        return failure_line(self.failure)


def failure_line(report: str) -> str:
    """The line that says what failed: pytest's "E   ..." line, else the report's last line."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return errors[0] if errors else (lines[-1] if lines else "")


def harness_commit(repo: Path = REPO) -> str:
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bundle(out: Path, nodeid: str, failure: str, kernel: Path, initrd: Path, kernel_identity: str,
                 run_dir: Path, symbols: Sequence[Path] = ()) -> Path:
    """The bundle ``out`` (a .tar.gz); ``run_dir``'s files go under logs/ (the bundle itself
    excluded, when it is written inside run_dir); ``symbols`` (the vmlinux, .ko files) beside
    the kernel under images/, where the call-site resolver looks for them."""
    info = BundleInfo(nodeid=nodeid, failure=failure, harness_commit=harness_commit(),
                      kernel_identity=kernel_identity, kernel_sha256=sha256_of(kernel),
                      initramfs_sha256=sha256_of(initrd), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        data = json.dumps(asdict(info), indent=2).encode()
        entry = tarfile.TarInfo(INFO)
        entry.size, entry.mtime = len(data), int(time.time())
        tar.addfile(entry, io.BytesIO(data))
        tar.add(kernel, KERNEL)
        tar.add(initrd, INITRAMFS)
        for path in symbols:
            tar.add(path, f"{Path(KERNEL).parent}/{path.name}")
        for path in sorted(run_dir.rglob("*")):
            if path.is_file() and path not in (out, partial) and not path.is_socket():
                tar.add(path, f"{LOGS}/{path.relative_to(run_dir)}")
    partial.rename(out)
    return out


@dataclass(frozen=True)
class Bundle:
    """An unpacked bundle."""

    root: Path
    info: BundleInfo

    @property
    def kernel(self) -> Path:
        return self.root / KERNEL

    @property
    def initrd(self) -> Path:
        return self.root / INITRAMFS

    @property
    def logs(self) -> Path:
        return self.root / LOGS


def open_bundle(path: Path, into: Path) -> Bundle:
    """Unpack ``path`` into ``into`` and check it: its info, and the images against their hashes."""
    if not path.is_file():
        raise BundleError(f"{path}: no such file")
    try:
        with tarfile.open(path, "r:*") as tar:
            names = set(tar.getnames())
            missing = {INFO, KERNEL, INITRAMFS} - names
            if missing:
                raise BundleError(f"{path}: not a reproducer bundle (missing {', '.join(sorted(missing))})")
            into.mkdir(parents=True, exist_ok=True)
            tar.extractall(into, filter="data")  # no absolute paths, links out or devices
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BundleError(f"{path}: not a readable .tar.gz bundle: {err}") from err
    try:
        raw = json.loads((into / INFO).read_text())
        info = BundleInfo(**raw)
    except (ValueError, TypeError) as err:
        raise BundleError(f"{path}: bad {INFO}: {err}") from err
    if info.format != FORMAT:
        raise BundleError(f"{path}: bundle format {info.format}, this harness reads format {FORMAT}")
    bundle = Bundle(into, info)
    for image, want in ((bundle.kernel, info.kernel_sha256), (bundle.initrd, info.initramfs_sha256)):
        if sha256_of(image) != want:
            raise BundleError(f"{path}: {image.name} does not match its recorded sha256 (damaged bundle)")
    return bundle


@dataclass(frozen=True)
class ReproResult:
    reproduced: bool  # the scenario failed again
    same_failure: bool  # ... with the same failure line
    failure_line: str  # what the re-run reported ("" when it passed)
    pytest_status: int
    command: list[str]
    artifacts: Path

    def summary(self, original: str) -> str:
        if not self.reproduced and self.pytest_status:
            return (f"could not tell: pytest exited {self.pytest_status} without a failure of the scenario "
                    f"(not found, or pytest itself failed: see its output above)")
        if not self.reproduced:
            return "did not reproduce: the scenario passed"
        if self.same_failure:
            return f"reproduced: the same failure: {self.failure_line}"
        return f"reproduced, but it failed differently:\n  was: {original}\n  now: {self.failure_line}"


def pytest_command(nodeid: str, kernel: Path, initrd: Path, artifacts: Path, junit: Path,
                   extra: Sequence[str] = ()) -> list[str]:
    """pytest on one test, from the repository root, booting exactly these images (no build),
    its logs under ``artifacts`` and its outcome in ``junit`` (tdxh repro, tdxh nightly). ``-n0``:
    one test needs no xdist workers (also when the caller's options say ``-n auto``)."""
    return [sys.executable, "-m", "pytest", "-q", "-n0", nodeid, "--kernel", str(kernel), "--initramfs", str(initrd),
            "--artifacts", str(artifacts), "--junitxml", str(junit), *extra]


def sweep_command(nodeid: str, logs: Path, kernel: Path, initrd: Path, artifacts: Path) -> list[str]:
    """`tdxh sweep FLOW --replay` of a sweep run's bundle, on exactly these images."""
    flow = nodeid.removeprefix(SWEEP_PREFIX).split(":", 1)[0]
    return [sys.executable, "-m", "harness", "sweep", flow, "--replay", str(logs / SWEEP_RUN_SPEC),
            "--kernel", str(kernel), "--initramfs", str(initrd), "--out", str(artifacts)]


def _reproduce_sweep_run(bundle: Bundle, work: Path, timeout: float) -> ReproResult:
    artifacts = work / "artifacts"
    command = sweep_command(bundle.info.nodeid, bundle.logs, bundle.kernel, bundle.initrd, artifacts)
    log.info("$ cd %s && %s", REPO, shlex.join(command))
    env = {k: v for k, v in os.environ.items() if k != COVERAGE_ENV}
    status = subprocess.run(command, check=False, cwd=REPO, timeout=timeout, env=env).returncode
    result = artifacts / SWEEP_REPLAY_RESULT
    try:
        verdict = json.loads(result.read_text())
        line, finding = str(verdict["failure_line"]), bool(verdict["finding"])
    except (OSError, ValueError, KeyError):
        line, finding = "", False
    return ReproResult(finding, finding and line == bundle.info.failure_line, line if finding else "", status,
                       command, artifacts)


def reproduce(bundle: Bundle, work: Path, timeout: float, extra: Sequence[str] = ()) -> ReproResult:
    """Run the bundle's scenario again (from the repository root, as it was run)."""
    if bundle.info.nodeid.startswith(SWEEP_PREFIX):
        return _reproduce_sweep_run(bundle, work, timeout)
    artifacts, junit = work / "artifacts", work / "junit.xml"
    command = pytest_command(bundle.info.nodeid, bundle.kernel, bundle.initrd, artifacts, junit, extra)
    log.info("$ cd %s && %s", REPO, shlex.join(command))
    # The re-run boots the bundle's kernel as it is: never a coverage run the caller's
    # environment may ask for (TDXH_COVERAGE).
    env = {k: v for k, v in os.environ.items() if k != COVERAGE_ENV}
    status = subprocess.run(command, check=False, cwd=REPO, timeout=timeout, env=env).returncode
    line = junit_failure(junit, bundle.info.nodeid) if junit.exists() else ""
    failed = status != 0 and bool(line)
    return ReproResult(failed, failed and line == bundle.info.failure_line, line, status, command, artifacts)


def junit_failure(junit: Path, nodeid: str) -> str:
    """The failure line of the test in a JUnit XML file ("" if it passed or is absent)."""
    name = nodeid.rsplit("::", 1)[-1]
    for case in ET.parse(junit).iter("testcase"):
        if case.get("name") != name:
            continue
        for tag in ("failure", "error"):
            found = case.find(tag)
            if found is not None:
                return failure_line(found.text or found.get("message") or "")
    return ""
