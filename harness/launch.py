"""Assembling a boot: the images (kernel, initramfs), the platform the module presents (derived
from the machine config so CPUs and CMRs match what the emulator builds), the module, and a
started machine. Used by the CLI and by the pytest fixtures alike."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import paths
from harness.coverage.objects import CoverageBuild
from harness.images.agent import build_guest_programs
from harness.images.initramfs import (
    GUEST_KERNEL,
    SFTP_SERVER,
    SFTP_SERVER_GUEST,
    SSH_SERVER,
    InitramfsRequest,
    build_initramfs,
)
from harness.kernel.build import BuildRequest, build, fragments, patch_series
from harness.kernel.inspect import check_kernel
from harness.kernel.source import debian_source, user_tree
from harness.kernel.symbols import name_sites
from harness.lock import file_lock
from harness.machine.base import Boot
from harness.machine.qemu import QemuConfig, QemuMachine
from harness.seam.faults import FaultPlan
from harness.seam.module import ModuleSnapshot, TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram, qemu_topology
from harness.seam.trace import Trace

log = logging.getLogger("harness.launch")

BUILD_LOCK_TIMEOUT = 3 * 3600.0  # a cold kernel build on a loaded 2-core machine


@dataclass(frozen=True)
class Images:
    kernel: Path
    initrd: Path
    modules: Path | None
    identity: str  # kernel build key or the image path, for reports
    coverage: CoverageBuild | None = None  # a coverage kernel: where its .gcno notes are


def prepare_images(cache: Path, kernel: Path | None = None, kernel_tree: Path | None = None,
                   extra_patches: Sequence[Path] = (), initramfs: Path | None = None,
                   coverage: bool = False) -> Images:
    """A prebuilt ``kernel`` (checked first; with ``initramfs``, that one is booted as it is),
    a developer's ``kernel_tree``, or Debian's source.
    ``extra_patches`` go on top of the shim series; such a variant builds in its own directory
    under the cache (same layout, so ccache still hits) and leaves the plain build alone.
    ``coverage``: the coverage variant (images/kernel/coverage: gcov counters in the TDX host
    objects), built beside the default one; a prebuilt ``kernel`` must be such a build."""
    problem = image_options_problem(kernel, kernel_tree, initramfs)
    if problem:
        raise ValueError(problem)
    with file_lock(cache / "images.lock", "building the kernel and initramfs", BUILD_LOCK_TIMEOUT):
        return _prepare_images(cache, kernel, kernel_tree, extra_patches, initramfs, coverage)


def image_options_problem(kernel: Path | None, kernel_tree: Path | None, initramfs: Path | None) -> str | None:
    """What is wrong with this choice of images (checked before anything is built), or None."""
    if kernel is not None and kernel_tree is not None:
        return "give --kernel or --kernel-tree, not both"
    if initramfs is not None and kernel is None:
        return "--initramfs goes with --kernel (the initramfs carries that kernel's modules)"
    if initramfs is not None and not initramfs.is_file():
        return f"--initramfs {initramfs}: no such file"
    return None


def _prepare_images(cache: Path, kernel: Path | None, kernel_tree: Path | None,
                    extra_patches: Sequence[Path], initramfs: Path | None, coverage: bool) -> Images:
    if kernel is not None:
        check_kernel(kernel)
        notes = CoverageBuild.for_kernel(kernel) if coverage else None
        return Images(kernel, initramfs or _initramfs(cache, kernel, None), None, str(kernel), notes)
    source = user_tree(kernel_tree) if kernel_tree is not None else debian_source(cache)
    request = BuildRequest(source=source, cache=cache)
    patches = [*extra_patches, *(patch_series(paths.COVERAGE_VARIANT) if coverage else [])]
    if patches:
        request = _variant(request, patches, fragments(paths.COVERAGE_VARIANT) if coverage else [])
    result = build(request)
    check_kernel(result.bzimage)
    identity = f"{source.identity} build {result.key}{' (coverage)' if coverage else ''}"
    notes = CoverageBuild.from_build_dir(result.out, result.key) if coverage else None
    return Images(result.bzimage, _initramfs(cache, result.bzimage, result.modules), result.modules, identity, notes)


def _initramfs(cache: Path, kernel: Path, modules: Path | None) -> Path:
    """The initramfs: busybox, kexec, the harness's guest programs, the kernel's modules, and the
    kernel itself (for kexec)."""
    files = {program.guest_path: program.binary for program in build_guest_programs(cache)}
    files[GUEST_KERNEL] = kernel
    files[SFTP_SERVER_GUEST] = SFTP_SERVER
    return build_initramfs(InitramfsRequest(output_dir=cache / "initramfs", modules_dir=modules, extra_files=files,
                                            extra_binaries=(SSH_SERVER,)))


def _variant(request: BuildRequest, extra_patches: Sequence[Path], extra_fragments: Sequence[Path]) -> BuildRequest:
    """A build of the shim series plus ``extra_patches`` and of the config fragments plus
    ``extra_fragments``, under ``variants/<digest of both>`` of the cache."""
    series = [*patch_series(request.patches), *extra_patches]
    frags = [*fragments(request.fragments), *extra_fragments]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in series)).hexdigest()[:12]
    if extra_fragments:  # a patches-only variant keeps the directory it always had
        digest = hashlib.sha256(digest.encode() + b"".join(f.read_bytes() for f in frags)).hexdigest()[:12]
    root = request.cache / "variants" / digest
    patches, config = root / "patches", root / "config"
    patches.mkdir(parents=True, exist_ok=True)
    config.mkdir(parents=True, exist_ok=True)
    for patch in series:
        shutil.copy(patch, patches / patch.name)
    (patches / "series").write_text("".join(f"{p.name}\n" for p in series))
    for old in config.glob("*.config"):
        old.unlink()
    for frag in frags:
        shutil.copy(frag, config / frag.name)
    return dataclasses.replace(request, cache=root, patches=patches, fragments=config)


def platform_for(config: QemuConfig, base: PlatformConfig | None = None) -> PlatformConfig:
    """The module's platform for this machine: its CPUs (APIC ids as QEMU numbers them) and its
    RAM as convertible memory."""
    base = base or PlatformConfig()
    return base.replace(cpus=qemu_topology(config.sockets, config.cores_per_socket),
                        cmrs=cmrs_for_ram(config.ram_ranges()))


@dataclass(frozen=True)
class SavedMachine:
    """A booted machine saved to a file with its module's snapshot (boot reuse): a later start of
    the same configuration resumes it instead of booting (start_machine(saved=...))."""

    vmstate: Path
    module: ModuleSnapshot
    console_log: Path  # the boot's console, copied beside each resumed machine's logs


def save_machine(machine: QemuMachine, path: Path) -> SavedMachine:
    """Save a ready machine (idle at its shell) and let it run on."""
    module = machine.module.snapshot()
    machine.save(path)
    console = path.with_suffix(".console.log")
    shutil.copy(machine.console_log, console)
    return SavedMachine(path, module, console)


def start_machine(images: Images, config: QemuConfig, run_dir: Path, platform: PlatformConfig | None = None,
                  faults: FaultPlan | None = None, append: str = "", serve_module: bool = True,
                  saved: SavedMachine | None = None) -> QemuMachine:
    """A started machine whose COM2 is served by a fresh module (unless ``serve_module`` is
    False: then nothing answers the shim); the trace goes to run_dir. With ``saved`` (made with
    the same images, config, platform and append) QEMU resumes that machine and the module its
    snapshot: call resume_saved() where wait_ready() would be called."""
    run_dir.mkdir(parents=True, exist_ok=True)
    trace_file = open(run_dir / "seamcalls.jsonl", "w")
    module = TdxModule(platform_for(config, platform), faults or FaultPlan(), Trace(sink=trace_file))
    module.save_config(run_dir)
    name_sites(module, images.kernel)
    if saved is not None:
        module.restore(saved.module)
        shutil.copy(saved.console_log, run_dir / "console.boot.log")
    machine = QemuMachine(config, Boot(images.kernel, images.initrd, append), module, run_dir,
                          serve_module=serve_module, incoming=saved.vmstate if saved else None)
    machine.start()
    return machine

