"""Fetching Bochs 3.0 from Debian trixie into the harness cache and running it without installing
it (reference/bochs-vmx-backend.md).

Why trixie's 3.0: bookworm's 2.7 is untested for VMX, sid's 3.1 miscompiles idiv (the kernel dies
in register_refined_jiffies). Trixie's binaries need glibc 2.38, so they run through trixie's own
dynamic loader with trixie's libc first on the library path and the host's libraries after it;
nothing is installed and the host's apt setup is never touched (a private apt configuration under
the cache, `harness.kernel.source.PrivateApt`).

The unpacked tree is reused without network access once it is complete (a marker file holds the
package versions it was made from).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.kernel.source import ARCHIVE_KEYRING, PrivateApt, SourceError
from harness.lock import file_lock
from harness.run import CommandError, run

log = logging.getLogger("harness.machine.bochs")

SUITE = "trixie"
# bochs-term: the headless display (a curses terminal); bochsbios/vgabios: the ROMs; libc6 and
# libltdl7: trixie's loader, libc and the plugin loader bochs-bin needs (>= glibc 2.38, ltdl 2.5.4).
PACKAGES = ("bochs", "bochs-term", "bochsbios", "vgabios", "libc6", "libltdl7")
BOCHS_VERSION_PREFIX = "3.0"  # 3.1 (sid) breaks the kernel: see the module docstring
LIB_DIR = "usr/lib/x86_64-linux-gnu"
HOST_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu")
# Shared libraries bochs-bin and its term display plugin take from the host (bookworm), and the
# bookworm packages that provide them: what `tdxh setup` must install for Bochs.
HOST_LIBRARY_PACKAGES = {
    "libgtk-3.so.0": "libgtk-3-0", "libgdk-3.so.0": "libgtk-3-0", "libpango-1.0.so.0": "libpango-1.0-0",
    "libglib-2.0.so.0": "libglib2.0-0", "libgobject-2.0.so.0": "libglib2.0-0",
    "libsamplerate.so.0": "libsamplerate0", "libreadline.so.8": "libreadline8",
    "libncurses.so.6": "libncurses6", "libtinfo.so.6": "libtinfo6",
    "libstdc++.so.6": "libstdc++6", "libgcc_s.so.1": "libgcc-s1",
}
MARKER = ".tdxh-unpacked"
FETCH_LOCK_TIMEOUT = 1800.0
CHECK_TIMEOUT = 60.0


class BochsUnavailable(Exception):
    """Bochs cannot be fetched or cannot run on this host; the message says why and what to do."""


@dataclass(frozen=True)
class BochsInstall:
    """An unpacked Bochs tree (``root`` holds usr/...) and how to start it."""

    root: Path
    version: str

    @property
    def lib_dir(self) -> Path:
        return self.root / LIB_DIR

    @property
    def loader(self) -> Path:
        return self.lib_dir / "ld-linux-x86-64.so.2"

    @property
    def binary(self) -> Path:
        return self.root / "usr/bin/bochs-bin"

    @property
    def plugins(self) -> Path:
        return self.lib_dir / "bochs/plugins"

    @property
    def share(self) -> Path:
        return self.root / "usr/share/bochs"

    @property
    def bios(self) -> Path:
        return self.share / "BIOS-bochs-latest"

    @property
    def vgabios(self) -> Path:
        return self.root / "usr/share/vgabios/vgabios.bin"

    def library_path(self) -> str:
        # Trixie's libc/libm/libltdl first; everything else (GTK, ncurses, libstdc++) from the host.
        return ":".join([str(self.lib_dir), *HOST_LIB_DIRS])

    def command(self, *args: str) -> list[str]:
        """bochs-bin through trixie's loader, with ``args``."""
        return [str(self.loader), "--library-path", self.library_path(), str(self.binary), *args]

    def env(self) -> dict[str, str]:
        """What Bochs needs in its environment: where its plugins and ROMs are."""
        return {"LTDL_LIBRARY_PATH": str(self.plugins), "BXSHARE": str(self.share)}

    def shell_prefix(self) -> str:
        """The environment and command as one shell line prefix, for logs a user can rerun."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env().items())
        return f"{env} {shlex.join(self.command())}"


def fetch_bochs(cache: Path) -> BochsInstall:
    """Bochs 3.0 from trixie under ``cache/bochs`` (downloaded and unpacked once), checked to
    load. Raises BochsUnavailable with the reason."""
    with file_lock(cache / "bochs.lock", "fetching Bochs", FETCH_LOCK_TIMEOUT):
        install = _cached(cache) or _download(cache)
    check_runnable(install)
    return install


def _cached(cache: Path) -> BochsInstall | None:
    for marker in sorted((cache / "bochs").glob(f"*/{MARKER}")):
        version = marker.read_text().split()[0].partition("=")[2]
        if version.startswith(BOCHS_VERSION_PREFIX):
            return BochsInstall(marker.parent / "root", version)
    return None


def _download(cache: Path) -> BochsInstall:
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise BochsUnavailable(f"missing host tools to fetch Bochs: {', '.join(missing)}")
    if not ARCHIVE_KEYRING.exists():
        raise BochsUnavailable(f"{ARCHIVE_KEYRING} is missing: apt-get install debian-archive-keyring")
    apt = PrivateApt(cache / "apt-trixie", suites=(SUITE,))
    try:
        apt.update()
        versions = {package: apt.candidate(package) for package in PACKAGES}
    except (CommandError, SourceError) as err:
        raise BochsUnavailable(f"cannot read Debian {SUITE}'s package lists: {err}") from err
    absent = [package for package, version in versions.items() if version is None]
    if absent:
        raise BochsUnavailable(f"{', '.join(absent)} not in Debian {SUITE}")
    bochs = versions["bochs"] or ""
    if not bochs.startswith(BOCHS_VERSION_PREFIX):
        raise BochsUnavailable(f"Debian {SUITE} has bochs {bochs}; the harness needs {BOCHS_VERSION_PREFIX}.x "
                               "(3.1 miscompiles idiv and the kernel dies early)")
    target = cache / "bochs" / bochs
    shutil.rmtree(target, ignore_errors=True)
    debs = target / "debs"
    try:
        for package, version in versions.items():
            deb = apt.download(package, version or "", debs)
            run(["dpkg-deb", "-x", str(deb), str(target / "root")], timeout=300)
    except (CommandError, SourceError) as err:
        raise BochsUnavailable(f"fetching Bochs from Debian {SUITE} failed: {err}") from err
    shutil.rmtree(debs, ignore_errors=True)  # the unpacked tree is what is kept
    (target / MARKER).write_text("".join(f"{p}={v}\n" for p, v in versions.items()))
    log.info("Bochs %s unpacked in %s", bochs, target)
    return BochsInstall(target / "root", bochs)


def check_runnable(install: BochsInstall) -> None:
    """bochs-bin and the plugins the harness uses load with this host's libraries; otherwise
    BochsUnavailable names the missing libraries and the packages to install."""
    for path in (install.loader, install.binary, install.bios, install.vgabios):
        if not path.exists():
            raise BochsUnavailable(f"{path} is missing from the unpacked Bochs: remove {install.root.parent} "
                                   "and fetch again")
    missing: set[str] = set()
    for obj in (install.binary, install.plugins / "libbx_term_gui.so", install.plugins / "libbx_serial.so"):
        try:
            out = run([str(install.loader), "--library-path", install.library_path(), "--list", str(obj)],
                      timeout=CHECK_TIMEOUT)
        except CommandError as err:
            out = err.tail
        missing |= set(re.findall(r"^\s*(\S+) => not found", out, re.MULTILINE))
    if missing:
        packages = sorted({HOST_LIBRARY_PACKAGES.get(lib, f"(the package with {lib})") for lib in missing})
        raise BochsUnavailable(f"Bochs needs host libraries {', '.join(sorted(missing))}: "
                               f"apt-get install {' '.join(packages)}")


def bochs_env(install: BochsInstall) -> dict[str, str]:
    """The full environment to start Bochs with (ours plus the caller's)."""
    return {**os.environ, **install.env()}
