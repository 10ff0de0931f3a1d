"""Build the kernel the scenarios boot: shim patches applied, config merged from the fragments
in images/kernel/config on top of tinyconfig, compiled with ccache.

Caching: the build is identified by a key of source + patches + config. When the finished
build's key matches, nothing runs. Otherwise make runs incrementally: the patched tree lives in
a directory per source and the build output in a directory per source + config, so changing a
patch recompiles only what it touches. ccache runs with CCACHE_BASEDIR at the cache root, so a
fresh cache directory on the same machine (CI) still hits."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from harness import paths
from harness.kernel.source import KernelSource
from harness.run import CommandError, run

log = logging.getLogger("harness.kernel")

SHIM_OPTION = "CONFIG_INTEL_TDX_HOST_SW_MODULE"
BUILT_MARKER = ".tdxh-built"  # in a build directory: the key of the build it holds, once finished
# Build outputs a developer's in-tree build leaves behind: `make O=` refuses a source tree
# that has them, and they are not source anyway.
# Top-level outputs are anchored ("/vmlinux"): a bare "vmlinux*" would also drop sources such as
# arch/x86/kernel/vmlinux.lds.S and scripts/link-vmlinux.sh.
RSYNC_EXCLUDES = ("/.git", "/.config", "/.config.old", "/include/config/", "/include/generated/",
                  "/arch/*/include/generated/", "*.o", "*.ko", "*.cmd", "*.mod", "*.mod.c", ".tmp_*",
                  "/vmlinux", "/vmlinux.a", "/vmlinux.o", "/vmlinux.unstripped", "/modules.order",
                  "/Module.symvers", "/System.map", "/arch/x86/boot/bzImage")


class BuildError(Exception):
    """A build step failed; the message names the step and where its log is."""


@dataclass(frozen=True)
class BuildRequest:
    source: KernelSource
    cache: Path
    patches: Path = paths.PATCHES
    fragments: Path = paths.CONFIG_FRAGMENTS
    jobs: int = os.cpu_count() or 2
    ccache: bool = True
    timeout: float = 3 * 3600


@dataclass(frozen=True)
class BuildResult:
    bzimage: Path
    vmlinux: Path
    modules: Path  # INSTALL_MOD_PATH: holds lib/modules/<release>
    config: Path
    key: str
    built: bool  # False when the cached build was reused as is
    seconds: float
    tree: Path  # the patched source the build compiled (make O= from there)

    @property
    def out(self) -> Path:
        """The build directory (objects, and the .gcno notes of a coverage build)."""
        return self.config.parent


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:16]


def patch_series(patches: Path) -> list[Path]:
    series = patches / "series"
    if not series.exists():
        raise BuildError(f"{series} is missing")
    names = [line.strip() for line in series.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [patches / name for name in names]


def fragments(directory: Path) -> list[Path]:
    found = sorted(directory.glob("*.config"))
    if not found:
        raise BuildError(f"no *.config fragments in {directory}")
    return found


@dataclass(frozen=True)
class Keys:
    source: str  # names the patched tree directory
    config: str  # source + config fragments: names the build directory
    patches: str  # source + patches: what the patched tree holds
    build: str  # source + patches + config: what a finished build holds


def keys(request: BuildRequest) -> Keys:
    source = _digest(request.source.identity.encode())
    patches = _digest(source.encode(), *(p.read_bytes() for p in patch_series(request.patches)))
    frags = [f.read_bytes() for f in fragments(request.fragments)]
    return Keys(source, _digest(source.encode(), *frags), patches, _digest(patches.encode(), *frags))


def has_shim(tree: Path) -> bool:
    return SHIM_OPTION.removeprefix("CONFIG_") in (tree / "arch" / "x86" / "Kconfig").read_text()


def prepare_tree(request: BuildRequest, key: Keys) -> Path:
    """A patched copy of the source: hard links for an immutable source (patch replaces the
    files it changes, so the original stays intact), rsync for a developer's tree (only changed
    files are copied). Unchanged files keep their times, so make rebuilds only what changed."""
    tree = request.cache / "trees" / key.source
    marker = tree / ".tdxh-patched"
    if not request.source.mutable and marker.exists() and marker.read_text() == key.patches:
        return tree
    tree.parent.mkdir(parents=True, exist_ok=True)
    if request.source.mutable:
        excludes = [f"--exclude={pattern}" for pattern in RSYNC_EXCLUDES]
        run(["rsync", "-a", "--delete", *excludes, f"{request.source.path}/", f"{tree}/"], timeout=1800)
    else:
        if tree.exists():
            shutil.rmtree(tree)
        run(["cp", "-al", str(request.source.path), str(tree)], timeout=1800)
    if has_shim(tree):
        log.info("%s already carries %s: not patching", request.source.path, SHIM_OPTION)
    else:
        for patch in patch_series(request.patches):
            try:
                run(["patch", "-p1", "--fuzz=0", "--forward", "-i", str(patch)], cwd=tree, timeout=120)
            except CommandError as err:
                raise BuildError(f"{patch.name} does not apply to {request.source.identity}:\n{err}") from err
    marker.write_text(key.patches)
    return tree


def configure(tree: Path, out: Path, request: BuildRequest) -> Path:
    """tinyconfig + fragments + olddefconfig, then check every requested option survived
    (Kconfig silently drops options whose dependencies are unmet). The build directory is per
    config; a .config counts only once a marker says it was completed and checked (a run
    stopped half-way leaves a bare tinyconfig behind), and it is checked again on reuse."""
    config, marker = out / ".config", out / ".tdxh-configured"
    frags = fragments(request.fragments)
    if not (config.exists() and marker.exists()):
        marker.unlink(missing_ok=True)
        config.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        log_path = out / "config.log"
        run(["make", f"O={out}", "tinyconfig"], cwd=tree, timeout=600, log_path=log_path)
        run(["scripts/kconfig/merge_config.sh", "-m", "-O", str(out), str(config), *map(str, frags)],
            cwd=tree, timeout=600, log_path=log_path)
        run(["make", f"O={out}", "olddefconfig"], cwd=tree, timeout=600, log_path=log_path)
    missing = config_mismatches(frags, config.read_text())
    if missing:
        marker.unlink(missing_ok=True)
        config.rename(out / ".config.rejected")
        raise BuildError("the kernel config lacks options the scenarios need, probably due to unmet "
                         "dependencies: " + ", ".join(missing))
    marker.touch()
    return config


_OPTION = re.compile(r"^(CONFIG_\w+)=(.*)$|^# (CONFIG_\w+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """Kconfig text -> {option: value}, with "n" for `is not set`."""
    values = {}
    for line in text.splitlines():
        match = _OPTION.match(line.strip())
        if match:
            if match[1]:
                values[match[1]] = match[2]
            else:
                values[match[3]] = "n"
    return values


def config_mismatches(frags: list[Path], config_text: str) -> list[str]:
    have = parse_config(config_text)
    wrong = []
    for frag in frags:
        for option, want in parse_config(frag.read_text()).items():
            got = have.get(option, "n")
            if got != want:
                wrong.append(f"{option}={want} (got {got}, from {frag.name})")
    return wrong


# CC/AS/LD lines of a cold build of the default config (7.3.4, measured): the scale for progress.
COLD_BUILD_OBJECTS = 1_600


class _Progress:
    """Logs a line every ``every`` seconds with how many objects have been compiled."""

    def __init__(self, every: float = 20.0) -> None:
        self.every, self.count, self.start = every, 0, time.monotonic()
        self.last = self.start

    def __call__(self, line: str) -> None:
        if line.startswith(("  CC ", "  AS ", "  LD ")):
            self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info("building: %d objects so far (%.0f s; a cold build is about %s objects)",
                     self.count, now - self.start, f"{COLD_BUILD_OBJECTS:,}")


def build(request: BuildRequest) -> BuildResult:
    start = time.monotonic()
    key = keys(request)
    out = request.cache / "build" / key.config
    done = out / BUILT_MARKER
    result = BuildResult(out / "arch/x86/boot/bzImage", out / "vmlinux", out / "modinst", out / ".config",
                         key.build, built=False, seconds=0.0, tree=request.cache / "trees" / key.source)
    if not request.source.mutable and done.exists() and done.read_text() == key.build:
        log.info("kernel %s is built (%s): nothing to do", key.build, out)
        return result
    done.unlink(missing_ok=True)
    tree = prepare_tree(request, key)
    configure(tree, out, request)
    make = ["make", f"O={out}", f"-j{request.jobs}"]
    env = {}
    if request.ccache and shutil.which("ccache"):
        make.append("CC=ccache gcc")
        env["CCACHE_BASEDIR"] = str(request.cache.resolve())
    log_path = out / "build.log"
    log.info("building the kernel in %s (log: %s)", out, log_path)
    try:
        run([*make, "bzImage", "modules"], cwd=tree, timeout=request.timeout, log_path=log_path, env=env,
            on_line=_Progress())
        if result.modules.exists():
            shutil.rmtree(result.modules)
        run([*make, f"INSTALL_MOD_PATH={result.modules}", "INSTALL_MOD_STRIP=1", "modules_install"], cwd=tree,
            timeout=600, log_path=log_path, env=env)
    except CommandError as err:
        raise BuildError(f"kernel build failed:\n{err}") from err
    done.write_text(key.build)
    seconds = time.monotonic() - start
    log.info("kernel built in %.0f s: %s", seconds, result.bzimage)
    return dataclasses.replace(result, built=True, seconds=seconds, tree=tree)
