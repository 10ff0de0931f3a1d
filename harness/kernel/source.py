"""Kernel sources: Debian's linux-source-7.x fetched through a private apt configuration (the
host's apt sources are never touched and nothing is installed), or a developer's own tree."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.run import run

log = logging.getLogger("harness.kernel")

# Newest first: trixie-backports carries 7.3, sid 7.2 (and later versions as they appear).
DEBIAN_SUITES = ("trixie-backports", "sid")
PACKAGES = ("linux-source-7.3", "linux-source-7.2")
ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
MIRROR = "http://deb.debian.org/debian"


class SourceError(Exception):
    """The kernel source could not be obtained; the message says what to do."""


@dataclass(frozen=True)
class KernelSource:
    path: Path
    identity: str  # what the build key uses: Debian package version, or tree path + git state
    mutable: bool  # a developer's tree changes under us; a Debian package never does


class PrivateApt:
    """apt-get with its own sources, lists and cache under ``root``. ``suites`` are the Debian
    suites it sees (main only); other users (the Bochs fetcher: trixie) keep their own root so
    that each one's candidates come from the suites it means."""

    def __init__(self, root: Path, suites: Sequence[str] = DEBIAN_SUITES) -> None:
        self.root = root
        self.suites = tuple(suites)
        (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (root / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        sources = root / "sources.list"
        sources.write_text("".join(f"deb [signed-by={ARCHIVE_KEYRING}] {MIRROR} {suite} main\n"
                                   for suite in self.suites))
        self.options = [
            "-o", f"Dir::Etc::SourceList={sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={root / 'lists'}", "-o", f"Dir::Cache={root}",
            "-o", "Dir::State::status=/dev/null", "-o", "APT::Architecture=amd64",
            "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root",
        ]

    def update(self) -> None:
        run(["apt-get", *self.options, "-q", "update"], timeout=600, log_path=self.root / "apt.log")

    def candidate(self, package: str) -> str | None:
        out = run(["apt-cache", *self.options, "policy", package], timeout=120)
        match = re.search(r"Candidate:\s*(\S+)", out)
        return match[1] if match and match[1] != "(none)" else None

    def download(self, package: str, version: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        run(["apt-get", *self.options, "-q", "download", f"{package}={version}"], cwd=into, timeout=1800,
            log_path=self.root / "apt.log")
        debs = sorted(into.glob(f"{package}_*.deb"))
        if not debs:
            raise SourceError(f"apt-get download {package}={version} produced no .deb in {into}")
        return debs[-1]


def _require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SourceError(f"missing host tools: {', '.join(missing)} (run `tdxh setup` or "
                          f"`apt-get install apt dpkg tar xz-utils`)")


def debian_source(cache: Path) -> KernelSource:
    """The newest of Debian's linux-source-7.3 / 7.2, unpacked once under ``cache/src``."""
    _require_tools("apt-get", "apt-cache", "dpkg-deb", "tar", "xz")
    if not ARCHIVE_KEYRING.exists():
        raise SourceError(f"{ARCHIVE_KEYRING} is missing: apt-get install debian-archive-keyring")
    apt = PrivateApt(cache / "apt")
    apt.update()
    for package in PACKAGES:
        version = apt.candidate(package)
        if version is None:
            continue
        target = cache / "src" / f"{package}_{version}"
        done = target / ".tdxh-unpacked"
        if not done.exists():
            deb = apt.download(package, version, cache / "debs")
            _unpack(deb, package, target)
            done.touch()
        tree = target / package
        log.info("kernel source: %s %s in %s", package, version, tree)
        return KernelSource(tree, f"debian:{package}={version}", mutable=False)
    raise SourceError(f"none of {', '.join(PACKAGES)} is in {', '.join(DEBIAN_SUITES)}; "
                      f"pass --kernel-tree PATH to build your own tree")


def debian_package(cache: Path, package: str) -> tuple[Path, str]:
    """The .deb of a Debian kernel source package (downloaded once) and its version."""
    apt = PrivateApt(cache / "apt")
    apt.update()
    version = apt.candidate(package)
    if version is None:
        raise SourceError(f"{package} is not in {', '.join(DEBIAN_SUITES)}")
    debs = sorted((cache / "debs").glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
    return (debs[-1] if debs else apt.download(package, version, cache / "debs")), version


def extract_members(deb: Path, package: str, members: list[str], into: Path) -> Path:
    """Only ``members`` (paths inside the kernel tree) of the source in ``deb``, under ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    tarball = f"./usr/src/{package}.tar.xz"
    names = " ".join(f'"{package}/{m}"' for m in members)
    run(["sh", "-c", f"dpkg-deb --fsys-tarfile \"$0\" | tar -xO {tarball} | tar -xJ -C \"$1\" {names}",
         str(deb), str(into)], timeout=1200)
    return into / package


def _unpack(deb: Path, package: str, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    tarball = f"./usr/src/{package}.tar.xz"
    log.info("unpacking %s (about a minute)", deb.name)
    run(["sh", "-c", f"dpkg-deb --fsys-tarfile \"$0\" | tar -xO {tarball} | tar -xJ -C \"$1\"",
         str(deb), str(target)], timeout=1200)
    if not (target / package / "Makefile").exists():
        raise SourceError(f"{deb} did not contain {tarball} with a kernel tree")


def user_tree(path: Path) -> KernelSource:
    """A developer's kernel tree. Its identity includes the git commit and a digest of local
    changes when it is a git checkout; the build is incremental either way."""
    path = path.resolve()
    if not (path / "Makefile").exists() or not (path / "arch" / "x86" / "virt").is_dir():
        raise SourceError(f"{path} is not a Linux 7.x kernel tree (no Makefile or arch/x86/virt)")
    return KernelSource(path, f"tree:{path}", mutable=True)
