"""Build the guest initramfs: a gzip-compressed newc cpio holding images/initramfs/init, a static
busybox, kexec with its shared libraries, and optionally kernel modules, extra files and extra
programs. Archives are cached by a content hash of everything that goes into them.

The archive is written in Python rather than with cpio(1): every entry is owned by root:root
whatever user builds it, /dev/console exists without mknod privileges, and the same inputs give
byte-identical output (mtime 0).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import re
import shlex
import stat
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from harness.paths import INITRAMFS_INIT

log = logging.getLogger("harness.images")

DEFAULT_BUSYBOX = Path("/bin/busybox")  # Debian busybox-static
DEFAULT_KEXEC = Path("/sbin/kexec")  # Debian kexec-tools; dynamically linked (Xen libraries)
# Applets the init script runs; a busybox without them boots to no readiness marker.
REQUIRED_APPLETS = ("sh", "mount", "mkdir", "cat", "uname", "stty", "setsid", "poweroff")
# Directories the init script and `busybox --install -s` expect (it does not create them).
BASE_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root")
# An SSH server in the guest, so the --target ssh:// scenarios have a server to be tested
# against here: dropbear (started by init when the kernel command line carries a key) and the
# SFTP server it runs for file copies, at the path dropbear has compiled in.
SSH_SERVER = Path("/usr/sbin/dropbear")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")
SFTP_SERVER_GUEST = "/usr/lib/sftp-server"
SSH_PACKAGES = ("dropbear-bin", "openssh-sftp-server")
GUEST_KERNEL = "/boot/bzImage"  # the kernel the initramfs carries for kexec from inside the guest
CONSOLE_DEVICE = (5, 1)  # /dev/console: the kernel opens it for init before devtmpfs is mounted
# Part of the cache key: bump it when the same inputs should give a different archive.
LAYOUT_VERSION = 1
SUBPROCESS_SECONDS = 60.0

_PT_INTERP = 3
_NEWC_MAGIC = b"070701"
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


class InitramfsError(Exception):
    """The initramfs cannot be built; the message says what to install or change."""


@dataclass(frozen=True)
class InitramfsRequest:
    """What goes into an initramfs.

    extra_files maps a guest path to a host file or directory (copied recursively, symlinks kept).
    extra_binaries are host programs placed at the same path in the guest with the shared
    libraries `ldd` finds for them and their ELF interpreter. modules_dir is the INSTALL_MOD_PATH
    given to `make modules_install`; its lib/modules goes to /lib/modules.
    """

    output_dir: Path
    busybox: Path = DEFAULT_BUSYBOX
    kexec: Path = DEFAULT_KEXEC
    init_script: Path = INITRAMFS_INIT
    extra_files: Mapping[str, Path] = field(default_factory=dict)
    extra_binaries: tuple[Path, ...] = ()
    modules_dir: Path | None = None


@dataclass(frozen=True)
class _Entry:
    """One archive member. `source` is the host file holding a regular file's content."""

    mode: int  # st_mode: type and permission bits
    source: Path | None = None
    link_target: str = ""
    rdev: tuple[int, int] = (0, 0)


class _Layout:
    """The archive's members by path (relative, no leading "/"), parents created on demand."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}

    def add(self, path: str, entry: _Entry) -> None:
        parent = PurePosixPath(path).parent.as_posix()
        if parent != ".":
            self.add_dir(parent)
        old = self.entries.setdefault(path, entry)
        if old != entry and not (stat.S_ISDIR(old.mode) and stat.S_ISDIR(entry.mode)):
            raise InitramfsError(f"/{path} would come from two places ({_describe(old)} and "
                                 f"{_describe(entry)}): remove one of them from the request")

    def add_dir(self, path: str) -> None:
        """A directory (mode 0755 unless it exists already: directories merge)."""
        self.add(path, _DIR)

    def add_file(self, path: str, host: Path, mode: int | None = None) -> None:
        try:
            perms = stat.S_IMODE(host.stat().st_mode) if mode is None else mode
        except OSError as exc:
            raise InitramfsError(f"cannot read {host} (for /{path}): {exc.strerror}") from exc
        self.add(path, _Entry(stat.S_IFREG | perms, source=host))

    def add_tree(self, path: str, host_dir: Path) -> None:
        """Copy a host directory: regular files and directories with their modes, symlinks as
        symlinks."""
        self.add_dir(path)
        for root, dirs, files in os.walk(host_dir):
            rel = Path(root).relative_to(host_dir)
            for name in sorted(dirs + files):
                host = Path(root, name)
                guest = (PurePosixPath(path) / rel.as_posix() / name).as_posix()
                info = host.lstat()
                if stat.S_ISLNK(info.st_mode):
                    self.add(guest, _Entry(stat.S_IFLNK | 0o777, link_target=os.readlink(host)))
                elif stat.S_ISDIR(info.st_mode):
                    self.add(guest, _Entry(stat.S_IFDIR | stat.S_IMODE(info.st_mode)))
                elif stat.S_ISREG(info.st_mode):
                    self.add(guest, _Entry(info.st_mode, source=host))
                else:
                    log.warning("initramfs: skipping %s: not a file, directory or symlink", host)

    def add_program(self, host: Path) -> None:
        """A program at its host path; if dynamically linked, with its libraries and interpreter."""
        if not host.is_file():
            raise InitramfsError(f"program {host} not found: install the package providing it "
                                 "or drop it from the request")
        self.add_file(_guest_path(str(host)), host)
        interpreter = elf_interpreter(host)
        if interpreter is None:  # static: nothing else to copy
            return
        for library in [interpreter, *_shared_libraries(host)]:
            self.add_file(_guest_path(library), Path(library))


_DIR = _Entry(stat.S_IFDIR | 0o755)


def build_initramfs(request: InitramfsRequest) -> Path:
    """Build the initramfs for `request` in request.output_dir, or return the cached archive
    built from the same inputs. Raises InitramfsError."""
    layout = _collect(request)
    digest = _content_hash(layout)
    output = request.output_dir / f"initramfs-{digest[:16]}.cpio.gz"
    if output.exists():
        log.info("initramfs: cached %s", output)
        return output
    log.info("initramfs: building %s (%d members)", output, len(layout.entries))
    request.output_dir.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as raw, \
                gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=6) as archive:
            _write_newc(layout, archive)
        os.replace(partial, output)  # atomic: a concurrent build never sees half an archive
    finally:
        partial.unlink(missing_ok=True)
    log.info("initramfs: wrote %s (%d bytes)", output, output.stat().st_size)
    return output


def _collect(request: InitramfsRequest) -> _Layout:
    _check_busybox(request.busybox)
    if not request.init_script.is_file():
        raise InitramfsError(f"init script {request.init_script} not found: run from a tdx-harness "
                             "checkout or pass InitramfsRequest(init_script=...)")
    if not request.kexec.is_file():
        raise InitramfsError(f"kexec not found at {request.kexec}: install kexec-tools "
                             "(apt-get install kexec-tools)")
    layout = _Layout()
    for path in BASE_DIRS:
        layout.add_dir(path)
    layout.add("dev/console", _Entry(stat.S_IFCHR | 0o600, rdev=CONSOLE_DEVICE))
    layout.add_file("init", request.init_script, mode=0o755)
    layout.add_file("bin/busybox", request.busybox, mode=0o755)
    for program in (request.kexec, *request.extra_binaries):
        layout.add_program(program)
    if request.modules_dir is not None:
        layout.add_tree("lib/modules", _modules_tree(request.modules_dir))
    for guest, host in request.extra_files.items():
        if host.is_dir():
            layout.add_tree(_guest_path(guest), host)
        elif host.is_file():
            layout.add_file(_guest_path(guest), host)
        else:
            raise InitramfsError(f"extra file {host} (for {guest}) does not exist")
    return layout


def _check_busybox(busybox: Path) -> None:
    if not busybox.is_file():
        raise InitramfsError(f"busybox not found at {busybox}: install busybox-static "
                             "(apt-get install busybox-static)")
    if elf_interpreter(busybox) is not None:
        raise InitramfsError(f"{busybox} is dynamically linked and the initramfs has no libc for "
                             "it: install busybox-static (apt-get install busybox-static)")
    applets = set(_run([str(busybox), "--list"]).split())
    missing = [applet for applet in REQUIRED_APPLETS if applet not in applets]
    if missing:
        raise InitramfsError(f"{busybox} lacks the applets {', '.join(missing)} that the init "
                             "script needs: install Debian's busybox-static")


def _modules_tree(install_mod_path: Path) -> Path:
    for candidate in (install_mod_path / "lib" / "modules", install_mod_path / "usr" / "lib" / "modules"):
        if candidate.is_dir():
            return candidate
    raise InitramfsError(f"{install_mod_path} has no lib/modules: pass the INSTALL_MOD_PATH given "
                         "to `make modules_install`")


def _guest_path(path: str) -> str:
    """A guest path as an archive member name: absolute, without "..", leading "/" dropped."""
    pure = PurePosixPath(path)
    if not pure.is_absolute() or ".." in pure.parts or pure == PurePosixPath("/"):
        raise InitramfsError(f"guest path {path!r} must be an absolute path to a file, "
                             "without '..'")
    return pure.relative_to("/").as_posix()


def _describe(entry: _Entry) -> str:
    if entry.source is not None:
        return str(entry.source)
    if entry.link_target:
        return f"a symlink to {entry.link_target}"
    return "a directory" if stat.S_ISDIR(entry.mode) else "a device node"


def elf_interpreter(path: Path) -> str | None:
    """The ELF interpreter (PT_INTERP) of an executable, None for a static one."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF":
            raise InitramfsError(f"{path} is not an ELF executable")
        order = "<" if ident[5] == 1 else ">"
        # ELF64 or ELF32: word size, e_phoff, e_phentsize (e_phnum follows), p_offset, p_filesz
        word, phoff_at, phentsize_at, offset_at, size_at = (
            ("Q", 0x20, 0x36, 8, 32) if ident[4] == 2 else ("I", 0x1C, 0x2A, 4, 16))
        (phoff,) = struct.unpack_from(order + word, ident, phoff_at)
        phentsize, phnum = struct.unpack_from(order + "HH", ident, phentsize_at)
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            header = f.read(phentsize)
            if struct.unpack_from(order + "I", header, 0)[0] != _PT_INTERP:
                continue
            (offset,) = struct.unpack_from(order + word, header, offset_at)
            (size,) = struct.unpack_from(order + word, header, size_at)
            f.seek(offset)
            return f.read(size).rstrip(b"\0").decode()
    return None


def _shared_libraries(program: Path) -> list[str]:
    """The shared libraries of `program` as ldd resolves them on this host (paths as printed)."""
    output = _run(["ldd", str(program)])
    missing = [line.split()[0] for line in output.splitlines() if "not found" in line]
    if missing:
        raise InitramfsError(f"{program} needs {', '.join(missing)}, not found on this host: "
                             "install the packages providing them")
    return [match.group(1) for match in map(_LDD_PATH.search, output.splitlines()) if match]


def _run(argv: list[str]) -> str:
    log.debug("initramfs: running %s", shlex.join(argv))
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, timeout=SUBPROCESS_SECONDS)
    except OSError as exc:
        raise InitramfsError(f"cannot run {argv[0]} ({exc.strerror}): install it") from exc
    except subprocess.TimeoutExpired as exc:
        raise InitramfsError(f"{shlex.join(argv)} did not finish in {SUBPROCESS_SECONDS:g} s") from exc
    if done.returncode != 0:
        raise InitramfsError(f"{shlex.join(argv)} failed with status {done.returncode}:\n"
                             f"{done.stdout}{done.stderr}")
    return done.stdout


def _content_hash(layout: _Layout) -> str:
    digest = hashlib.sha256(f"tdxh-initramfs {LAYOUT_VERSION}\n".encode())
    for path, entry in sorted(layout.entries.items()):
        digest.update(f"{path}\0{entry.mode:o}\0{entry.rdev}\0{entry.link_target}\0".encode())
        if entry.source is not None:
            with open(entry.source, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _write_newc(layout: _Layout, out: io.BufferedIOBase) -> None:
    """The newc ("070701") cpio format of Linux's Documentation/driver-api/early-userspace:
    sorted, so a directory precedes its contents."""
    for ino, (path, entry) in enumerate(sorted(layout.entries.items()), start=1):
        data = entry.source.read_bytes() if entry.source is not None else entry.link_target.encode()
        _write_member(out, ino, path, entry.mode, 2 if stat.S_ISDIR(entry.mode) else 1, data,
                      entry.rdev)
    _write_member(out, 0, "TRAILER!!!", 0, 1, b"", (0, 0))


def _write_member(out: io.BufferedIOBase, ino: int, path: str, mode: int, nlink: int, data: bytes,
                  rdev: tuple[int, int]) -> None:
    name = path.encode() + b"\0"
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
    header = _NEWC_MAGIC + b"".join(b"%08x" % value for value in fields) + name
    out.write(header + _padding(len(header)) + data + _padding(len(data)))


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)


def modprobe_command(module: str) -> str:
    """The guest command that loads ``module`` and what it depends on. busybox modprobe needs
    modules.dep, which `make modules_install` skips on a host without depmod (kmod): busybox's
    own depmod writes it first in the guest's writable root."""
    return f'{{ [ -e "/lib/modules/$(uname -r)/modules.dep" ] || depmod; }} && modprobe {module}'
