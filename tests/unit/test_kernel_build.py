"""Kernel build plumbing that needs no compiler: config checks, patch series, build keys, and
the image check on synthetic images."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import paths
from harness.kernel.build import BuildRequest, config_mismatches, keys, parse_config, patch_series, prepare_tree
from harness.kernel.inspect import KernelImageError, check_kernel
from harness.kernel.source import KernelSource, SourceError, user_tree


def test_parse_config_reads_values_and_not_set():
    assert parse_config("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n# comment\n") == {
        "CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x"'}


def test_dropped_options_are_named(tmp_path):
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\n")
    assert config_mismatches([frag], "CONFIG_A=y\nCONFIG_C=y\n") == [
        "CONFIG_B=m (got n, from f.config)", "CONFIG_C=n (got y, from f.config)"]


def test_repository_series_and_fragments_exist():
    series = patch_series(paths.PATCHES)
    assert series and all(p.exists() for p in series)
    wanted = {}
    for frag in paths.CONFIG_FRAGMENTS.glob("*.config"):
        wanted.update(parse_config(frag.read_text()))
    for option in ("CONFIG_INTEL_TDX_HOST", "CONFIG_INTEL_TDX_HOST_SW_MODULE", "CONFIG_KVM_INTEL",
                   "CONFIG_HIBERNATION", "CONFIG_KEXEC_FILE", "CONFIG_X86_MCE_INJECT", "CONFIG_IKCONFIG"):
        assert option in wanted


def test_build_key_changes_with_inputs(tmp_path):
    patches, frags = tmp_path / "patches", tmp_path / "config"
    patches.mkdir()
    frags.mkdir()
    (patches / "series").write_text("a.patch\n")
    (patches / "a.patch").write_text("one")
    (frags / "x.config").write_text("CONFIG_A=y\n")
    source = KernelSource(tmp_path, "debian:linux-source-7.3=1", mutable=False)
    request = BuildRequest(source=source, cache=tmp_path, patches=patches, fragments=frags)
    first = keys(request)
    (frags / "x.config").write_text("CONFIG_A=m\n")
    second = keys(request)
    # A config change: same patched tree, another build directory and build.
    assert (first.source, first.patches) == (second.source, second.patches)
    assert first.config != second.config and first.build != second.build
    (patches / "a.patch").write_text("two")
    third = keys(request)
    # A patch change: the same directories, rebuilt incrementally, but another build.
    assert (third.source, third.config) == (second.source, second.config)
    assert third.patches != second.patches and third.build != second.build


def test_missing_kernel_and_non_kernel_are_refused(tmp_path):
    with pytest.raises(KernelImageError, match="does not exist"):
        check_kernel(tmp_path / "nope")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(KernelImageError, match="neither a vmlinux"):
        check_kernel(junk)


def fake_vmlinux(config: str) -> bytes:
    """A minimal x86-64 ELF header followed by an embedded config, as IKCONFIG lays it out."""
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1  # 64-bit, little endian, version
    header[16:18] = (2).to_bytes(2, "little")  # ET_EXEC
    header[18:20] = (62).to_bytes(2, "little")  # EM_X86_64
    header[20:24] = (1).to_bytes(4, "little")
    header[52:54] = (64).to_bytes(2, "little")  # e_ehsize
    return bytes(header) + b"IKCFG_ST" + gzip.compress(config.encode()) + b"IKCFG_ED"


def test_kernel_without_the_shim_is_refused_naming_it(tmp_path: Path):
    image = tmp_path / "vmlinux"
    image.write_bytes(fake_vmlinux("CONFIG_INTEL_TDX_HOST=y\nCONFIG_KVM_INTEL=m\nCONFIG_BLK_DEV_INITRD=y\n"
                                   "CONFIG_SERIAL_8250_CONSOLE=y\n"))
    with pytest.raises(KernelImageError, match=r"CONFIG_INTEL_TDX_HOST_SW_MODULE=y .*shim is not applied"):
        check_kernel(image)


def test_kernel_with_everything_is_accepted(tmp_path: Path):
    image = tmp_path / "vmlinux"
    image.write_bytes(fake_vmlinux("CONFIG_INTEL_TDX_HOST=y\nCONFIG_INTEL_TDX_HOST_SW_MODULE=y\nCONFIG_KVM_INTEL=m\n"
                                   "CONFIG_BLK_DEV_INITRD=y\nCONFIG_SERIAL_8250_CONSOLE=y\n"))
    assert check_kernel(image).config["CONFIG_INTEL_TDX_HOST_SW_MODULE"] == "y"


def test_user_tree_is_copied_without_build_outputs_and_patched_each_time(tmp_path):
    tree = tmp_path / "linux"
    (tree / "arch/x86/virt").mkdir(parents=True)
    (tree / "Makefile").write_text("VERSION = 7\n")
    (tree / "arch/x86/Kconfig").write_text("config X86\n\tbool\n")
    (tree / ".config").write_text("CONFIG_X86=y\n")  # an in-tree build: must not be copied
    (tree / "init.o").write_bytes(b"\x7fELF")
    (tree / "vmlinux").write_bytes(b"\x7fELF")  # a top-level build output
    (tree / "arch/x86/kernel").mkdir(parents=True)
    (tree / "arch/x86/kernel/vmlinux.lds.S").write_text("/* a source file */\n")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "series").write_text("0001-shim.patch\n")
    (patches / "0001-shim.patch").write_text(
        "--- a/arch/x86/Kconfig\n+++ b/arch/x86/Kconfig\n@@ -1,2 +1,4 @@\n config X86\n \tbool\n"
        "+config INTEL_TDX_HOST_SW_MODULE\n+\tbool\n")
    frags = tmp_path / "config"
    frags.mkdir()
    (frags / "a.config").write_text("CONFIG_X86=y\n")
    request = BuildRequest(source=user_tree(tree), cache=tmp_path / "cache", patches=patches, fragments=frags)
    for _ in range(2):  # the second run re-syncs (undoing the patch) and patches again
        copy = prepare_tree(request, keys(request))
        assert "INTEL_TDX_HOST_SW_MODULE" in (copy / "arch/x86/Kconfig").read_text()
        assert not (copy / ".config").exists() and not (copy / "init.o").exists()
        assert not (copy / "vmlinux").exists() and (copy / "arch/x86/kernel/vmlinux.lds.S").exists()
    assert "INTEL_TDX_HOST_SW_MODULE" not in (tree / "arch/x86/Kconfig").read_text()


def test_user_tree_that_carries_the_shim_is_not_patched(tmp_path):
    tree = tmp_path / "linux"
    (tree / "arch/x86/virt").mkdir(parents=True)
    (tree / "Makefile").write_text("VERSION = 7\n")
    (tree / "arch/x86/Kconfig").write_text("config INTEL_TDX_HOST_SW_MODULE\n\tbool\n")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "series").write_text("0001-broken.patch\n")
    (patches / "0001-broken.patch").write_text("this would not apply\n")
    frags = tmp_path / "config"
    frags.mkdir()
    (frags / "a.config").write_text("CONFIG_X86=y\n")
    request = BuildRequest(source=user_tree(tree), cache=tmp_path / "cache", patches=patches, fragments=frags)
    copy = prepare_tree(request, keys(request))
    assert (copy / "arch/x86/Kconfig").read_text() == (tree / "arch/x86/Kconfig").read_text()


def test_not_a_kernel_tree_is_refused(tmp_path):
    with pytest.raises(SourceError, match=r"is not a Linux 7\.x kernel tree"):
        user_tree(tmp_path)


GOOD_CONFIG = ("CONFIG_INTEL_TDX_HOST=y\nCONFIG_INTEL_TDX_HOST_SW_MODULE=y\nCONFIG_KVM_INTEL=m\n"
               "CONFIG_BLK_DEV_INITRD=y\nCONFIG_SERIAL_8250_CONSOLE=y\n")


def compiled_vmlinux(tmp_path: Path, config: str, symbol: str) -> Path:
    """An x86-64 ELF object with a symbol table: the embedded config in .rodata, one function."""
    blob = b"IKCFG_ST" + gzip.compress(config.encode()) + b"IKCFG_ED"
    source = tmp_path / "k.c"
    source.write_text(f"const unsigned char kernel_config_data[] = {{{', '.join(map(str, blob))}}};\n"
                      f"void {symbol}(void) {{}}\n")
    out = tmp_path / "vmlinux"
    subprocess.run(["gcc", "-c", "-o", str(out), str(source)], check=True, timeout=60)
    return out


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to make an ELF with a symbol table")
def test_vmlinux_without_the_shim_symbol_is_refused(tmp_path: Path):
    """A config can claim the shim while the image was built from another tree: the symbol
    table settles it."""
    with pytest.raises(KernelImageError, match="has no symbol tdx_sw_seamcall"):
        check_kernel(compiled_vmlinux(tmp_path, GOOD_CONFIG, "something_else"))
    image = compiled_vmlinux(tmp_path, GOOD_CONFIG, "tdx_sw_seamcall")
    assert check_kernel(image).symbols_from == image
