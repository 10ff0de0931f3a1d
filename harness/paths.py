"""Where the harness keeps what it downloads and builds, and where the repository's images are."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"
PATCHES = IMAGES / "kernel" / "patches"
CONFIG_FRAGMENTS = IMAGES / "kernel" / "config"
# The coverage variant: a patch series (GCOV_PROFILE of the TDX host objects) and config fragments.
COVERAGE_VARIANT = IMAGES / "kernel" / "coverage"
INITRAMFS_INIT = IMAGES / "initramfs" / "init"


def cache_dir() -> Path:
    """``$TDXH_CACHE`` or ``~/.cache/tdx-harness``."""
    return Path(os.environ.get("TDXH_CACHE", Path.home() / ".cache" / "tdx-harness"))


def artifact_name(nodeid: str) -> str:
    """A scenario's directory name under the artifacts root, from its pytest node id."""
    return re.sub(r"[^\w.-]+", "_", nodeid)
