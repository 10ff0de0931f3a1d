"""The initramfs builder: archive contents read back with an independent newc reader and with
cpio(1), kexec runnable from the copied libraries, caching, and the errors that say what to fix."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.images.initramfs import DEFAULT_BUSYBOX, DEFAULT_KEXEC, InitramfsError, InitramfsRequest, build_initramfs
from harness.paths import INITRAMFS_INIT

pytestmark = pytest.mark.skipif(
    not (DEFAULT_BUSYBOX.is_file() and DEFAULT_KEXEC.is_file() and shutil.which("ldd")),
    reason="needs Debian busybox-static (/bin/busybox), kexec-tools (/sbin/kexec) and ldd")


@dataclass(frozen=True)
class Member:
    mode: int
    uid: int
    gid: int
    rdev: tuple[int, int]
    data: bytes


def read_newc(archive: Path) -> dict[str, Member]:
    """Members of a gzip-compressed newc cpio, read without the code under test."""
    blob = gzip.decompress(archive.read_bytes())
    members: dict[str, Member] = {}
    offset = 0
    while True:
        assert blob[offset:offset + 6] == b"070701", f"bad magic at {offset}"
        fields = [int(blob[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, size, namesize = fields[1], fields[2], fields[3], fields[6], fields[11]
        name_end = offset + 110 + namesize
        name = blob[offset + 110:name_end - 1].decode()
        data_start = (name_end + 3) & ~3
        offset = (data_start + size + 3) & ~3
        if name == "TRAILER!!!":
            return members
        members[name] = Member(mode, uid, gid, (fields[9], fields[10]),
                               blob[data_start:data_start + size])


def kexec_libraries() -> list[str]:
    """The absolute library paths ldd prints for kexec, interpreter included."""
    out = subprocess.run(["ldd", str(DEFAULT_KEXEC)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [word for line in out.splitlines() for word in line.split() if word.startswith("/")]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Member]]:
    archive = build_initramfs(InitramfsRequest(tmp_path_factory.mktemp("out")))
    return archive, read_newc(archive)


def test_archive_holds_init_busybox_kexec_and_console(built: tuple[Path, dict[str, Member]]) -> None:
    archive, members = built
    assert archive.name.startswith("initramfs-") and archive.name.endswith(".cpio.gz")
    init = members["init"]
    assert init.mode == stat.S_IFREG | 0o755 and init.data == INITRAMFS_INIT.read_bytes()
    assert members["bin/busybox"].data == DEFAULT_BUSYBOX.read_bytes()
    assert members["bin/busybox"].mode & 0o111
    assert members["sbin/kexec"].data == DEFAULT_KEXEC.read_bytes()
    for library in kexec_libraries():
        assert members[library.lstrip("/")].data == Path(library).read_bytes(), library
    assert members["dev/console"].mode == stat.S_IFCHR | 0o600
    assert members["dev/console"].rdev == (5, 1)
    for path in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "tmp", "run", "etc"):
        assert stat.S_ISDIR(members[path].mode), path
    assert {(m.uid, m.gid) for m in members.values()} == {(0, 0)}


def test_cpio_lists_the_same_members(built: tuple[Path, dict[str, Member]]) -> None:
    if not shutil.which("cpio"):
        pytest.skip("cpio(1) not installed")
    archive, members = built
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=gzip.decompress(archive.read_bytes()),
                             capture_output=True, check=True, timeout=60).stdout.decode()
    assert listing.split() == sorted(members)


def test_kexec_runs_from_the_archive_libraries(built: tuple[Path, dict[str, Member]],
                                               tmp_path: Path) -> None:
    _, members = built
    for name, member in members.items():
        target = tmp_path / name
        if stat.S_ISDIR(member.mode):
            target.mkdir(parents=True, exist_ok=True)
        elif stat.S_ISREG(member.mode):
            target.write_bytes(member.data)
            target.chmod(stat.S_IMODE(member.mode))
    # The archive's own loader and library directory only: a missing library fails here.
    loader = tmp_path / "lib64" / "ld-linux-x86-64.so.2"
    done = subprocess.run([str(loader), "--inhibit-cache", "--library-path",
                           str(tmp_path / "lib" / "x86_64-linux-gnu"), str(tmp_path / "sbin" / "kexec"),
                           "--version"], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("kexec-tools")


def test_second_build_returns_the_cached_archive(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    request = InitramfsRequest(tmp_path)
    first = build_initramfs(request)
    written = first.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="harness.images"):
        assert build_initramfs(request) == first
    assert first.stat().st_mtime_ns == written
    assert "cached" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial file left


def test_same_inputs_give_the_same_bytes(tmp_path: Path) -> None:
    first = build_initramfs(InitramfsRequest(tmp_path / "a"))
    second = build_initramfs(InitramfsRequest(tmp_path / "b"))
    assert first.name == second.name and first.read_bytes() == second.read_bytes()


def test_inputs_change_the_name(tmp_path: Path) -> None:
    extra = tmp_path / "agent.json"
    extra.write_text("{}")
    base = build_initramfs(InitramfsRequest(tmp_path / "out"))
    with_file = build_initramfs(InitramfsRequest(tmp_path / "out", extra_files={"/etc/agent.json": extra}))
    extra.write_text('{"changed": 1}')
    changed = build_initramfs(InitramfsRequest(tmp_path / "out", extra_files={"/etc/agent.json": extra}))
    assert len({base, with_file, changed}) == 3
    assert read_newc(changed)["etc/agent.json"].data == b'{"changed": 1}'


def test_modules_and_extra_files(tmp_path: Path) -> None:
    install = tmp_path / "install"
    release = install / "lib" / "modules" / "6.1.0-test"
    (release / "kernel" / "drivers").mkdir(parents=True)
    (release / "kernel" / "drivers" / "foo.ko").write_bytes(b"\x7fELF module")
    (release / "modules.dep").write_text("kernel/drivers/foo.ko:\n")
    os.symlink("/usr/src/linux-test", release / "build")
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (data / "sub" / "run.sh").chmod(0o750)
    members = read_newc(build_initramfs(InitramfsRequest(
        tmp_path / "out", modules_dir=install, extra_files={"/opt/data": data},
        extra_binaries=(DEFAULT_BUSYBOX,))))
    assert members["lib/modules/6.1.0-test/kernel/drivers/foo.ko"].data == b"\x7fELF module"
    assert members["lib/modules/6.1.0-test/modules.dep"].data == b"kernel/drivers/foo.ko:\n"
    link = members["lib/modules/6.1.0-test/build"]
    assert stat.S_ISLNK(link.mode) and link.data == b"/usr/src/linux-test"
    assert members["opt/data/sub/run.sh"].mode == stat.S_IFREG | 0o750
    assert members[str(DEFAULT_BUSYBOX).lstrip("/")].data == DEFAULT_BUSYBOX.read_bytes()


@pytest.mark.parametrize("change,message", [
    ({"busybox": Path("/nonexistent/busybox")}, "install busybox-static"),
    ({"busybox": Path("/sbin/kexec")}, "dynamically linked.*install busybox-static"),
    ({"kexec": Path("/nonexistent/kexec")}, "install kexec-tools"),
    ({"init_script": Path("/nonexistent/init")}, "init script"),
    ({"modules_dir": Path("/nonexistent")}, "INSTALL_MOD_PATH"),
    ({"extra_files": {"relative/path": DEFAULT_BUSYBOX}}, "must be an absolute path"),
    ({"extra_files": {"/../x": DEFAULT_BUSYBOX}}, "without '..'"),
    ({"extra_files": {"/init": DEFAULT_BUSYBOX}}, "/init would come from two places"),
    ({"extra_files": {"/bin": DEFAULT_BUSYBOX}}, "/bin would come from two places"),
    ({"extra_files": {"/etc/x": Path("/nonexistent")}}, "does not exist"),
    ({"extra_binaries": (Path("/nonexistent/tool"),)}, "program /nonexistent/tool not found"),
])
def test_errors_say_what_to_fix(tmp_path: Path, change: dict[str, object], message: str) -> None:
    request = InitramfsRequest(tmp_path / "out", **change)  # type: ignore[arg-type]
    with pytest.raises(InitramfsError, match=message):
        build_initramfs(request)
    assert not (tmp_path / "out").exists()
