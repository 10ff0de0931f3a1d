"""A bootable ISOLINUX CD image holding a kernel, an initramfs and the kernel command line: the
boot medium for emulators without a direct kernel loader (Bochs boots from its BIOS only).

Images are cached by a content hash of everything that goes into them (kernel, initramfs,
command line, the ISOLINUX binaries), so a second boot with the same inputs reuses the file.
Host packages: genisoimage, isolinux, syslinux-common (Debian bookworm).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.run import CommandError, run

log = logging.getLogger("harness.images")

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")  # Debian isolinux
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")  # Debian syslinux-common
GENISOIMAGE = "genisoimage"
HOST_PACKAGES = ("genisoimage", "isolinux", "syslinux-common")
# ISOLINUX's own config line limit is far above this; the kernel's COMMAND_LINE_SIZE is 2048.
MAX_CMDLINE = 2047
KEEP_IMAGES = 8  # older cached images are removed: each holds a kernel and an initramfs
GENISO_TIMEOUT = 300.0


class IsoError(Exception):
    """The boot image cannot be built; the message says what to install or change."""


@dataclass(frozen=True)
class IsoRequest:
    kernel: Path
    initrd: Path
    cmdline: str
    output_dir: Path


def isolinux_cfg(cmdline: str) -> str:
    """The boot loader config: boot at once, loader messages on COM1 too (so a console log shows
    whether the loader ran), kernel and initramfs from the image's root."""
    if "\n" in cmdline or len(cmdline) > MAX_CMDLINE:
        raise IsoError(f"kernel command line must be one line of at most {MAX_CMDLINE} characters")
    return ("SERIAL 0 115200\n"
            "DEFAULT linux\n"
            "PROMPT 0\n"
            "TIMEOUT 0\n"
            "LABEL linux\n"
            "  KERNEL /bzImage\n"
            f"  APPEND initrd=/initrd.img {cmdline}\n")


def _digest(request: IsoRequest) -> str:
    h = hashlib.sha256()
    for path in (request.kernel, request.initrd, ISOLINUX_BIN, LDLINUX_C32):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(isolinux_cfg(request.cmdline).encode())
    return h.hexdigest()


def check_host() -> None:
    """Raises IsoError naming the host packages to install when the image tools are missing."""
    missing = [str(p) for p in (ISOLINUX_BIN, LDLINUX_C32) if not p.is_file()]
    if shutil.which(GENISOIMAGE) is None:
        missing.append(GENISOIMAGE)
    if missing:
        raise IsoError(f"missing {', '.join(missing)}: apt-get install {' '.join(HOST_PACKAGES)}")


def build_iso(request: IsoRequest) -> Path:
    """The cached image for ``request``, built if needed. Raises IsoError."""
    check_host()
    for path, what in ((request.kernel, "kernel"), (request.initrd, "initramfs")):
        if not path.is_file():
            raise IsoError(f"{what} {path} does not exist")
    output = request.output_dir / f"boot-{_digest(request)[:16]}.iso"
    if output.exists():
        log.info("boot image: cached %s", output)
        output.touch()  # most recently used: kept by the pruning below
        return output
    request.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="iso-", dir=request.output_dir) as tmp:
        tree = Path(tmp) / "tree"
        (tree / "isolinux").mkdir(parents=True)
        # isolinux.bin is patched in place by -boot-info-table: copy it, never link it.
        shutil.copy(ISOLINUX_BIN, tree / "isolinux" / "isolinux.bin")
        shutil.copy(LDLINUX_C32, tree / "isolinux" / "ldlinux.c32")
        (tree / "isolinux" / "isolinux.cfg").write_text(isolinux_cfg(request.cmdline))
        shutil.copy(request.kernel, tree / "bzImage")
        shutil.copy(request.initrd, tree / "initrd.img")
        partial = Path(tmp) / "boot.iso"
        try:
            run([GENISOIMAGE, "-quiet", "-o", str(partial), "-b", "isolinux/isolinux.bin",
                 "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
                 "-R", "-V", "TDXH", str(tree)], timeout=GENISO_TIMEOUT)
        except CommandError as err:
            raise IsoError(f"genisoimage failed: {err}") from err
        partial.rename(output)  # atomic: a concurrent builder sees a whole image or none
    log.info("boot image: built %s", output)
    _prune(request.output_dir)
    return output


def _prune(directory: Path) -> None:
    images = sorted(directory.glob("boot-*.iso"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[KEEP_IMAGES:]:
        old.unlink(missing_ok=True)
