"""The shim series, and the coverage variant's patch on top of it, apply without fuzz to the
Debian kernel sources they target (7.2 and 7.3).
Fetches the source packages through the private apt configuration (once; cached)."""

from __future__ import annotations

import subprocess

import pytest

from harness import paths
from harness.kernel.build import patch_series
from harness.kernel.source import debian_package, extract_members

TOUCHED = ["arch/x86/Kconfig", "arch/x86/virt", "arch/x86/kvm/Makefile", "drivers/virt/coco/tdx-host/Makefile"]


@pytest.mark.slow
@pytest.mark.parametrize("package", ["linux-source-7.3", "linux-source-7.2"])
def test_series_applies_cleanly(package, tmp_path):
    deb, version = debian_package(paths.cache_dir(), package)
    tree = extract_members(deb, package, TOUCHED, tmp_path)
    # The shim, then the coverage variant's GCOV_PROFILE patch on top of it.
    for patch in [*patch_series(paths.PATCHES), *patch_series(paths.COVERAGE_VARIANT)]:
        result = subprocess.run(["patch", "-p1", "--fuzz=0", "--forward", "-i", str(patch)], cwd=tree,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"{patch.name} on {package} {version}:\n{result.stdout}{result.stderr}"
        assert "fuzz" not in result.stdout.lower()
    assert (tree / "arch/x86/virt/vmx/tdx/sw_module.c").exists()
