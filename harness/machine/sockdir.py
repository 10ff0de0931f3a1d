"""Per-machine socket directories (module channel, QMP) in the temp directory. Each
names its owner's pid, so a later run removes the ones whose harness died without cleaning up
(SIGKILL, SIGTERM: no Python code runs then; QEMU itself dies through its parent-death signal).
Unix socket paths must stay short (sun_path is ~108 bytes): hence /tmp, not the run directory."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("harness.machine.sockdir")

PREFIX = "tdxh-"
OWNER = "owner.pid"


def socket_dir(kind: str = "") -> Path:
    """A new directory ``/tmp/tdxh-<kind>XXXX`` owned by this process (stale ones swept first)."""
    sweep_stale()
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}"))
    (path / OWNER).write_text(f"{os.getpid()}\n")
    return path


def sweep_stale(root: Path | None = None) -> list[Path]:
    """Remove the socket directories whose owner process is gone; return them. Directories
    without an owner file (another tool's, or one being created) are left alone."""
    swept = []
    for path in (root or Path(tempfile.gettempdir())).glob(f"{PREFIX}*"):
        owner = _owner(path)
        if owner is None or _alive(owner):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s: its harness (pid %d) is gone", path, owner)
        swept.append(path)
    return swept


def _owner(path: Path) -> int | None:
    try:
        return int((path / OWNER).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
