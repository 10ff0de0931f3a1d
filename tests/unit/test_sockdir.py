"""Socket directories name their owner; a later run sweeps those whose owner died."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from harness.machine.sockdir import OWNER, PREFIX, socket_dir, sweep_stale


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def owned_dir(root: Path, name: str, pid: int | None) -> Path:
    path = root / name
    path.mkdir()
    if pid is not None:
        (path / OWNER).write_text(f"{pid}\n")
    return path


def test_only_directories_of_dead_owners_are_swept(tmp_path):
    dead = owned_dir(tmp_path, f"{PREFIX}dead", dead_pid())
    alive = owned_dir(tmp_path, f"{PREFIX}alive", os.getpid())
    unowned = owned_dir(tmp_path, f"{PREFIX}flake-work", None)  # e.g. scripts/flake's work directory
    other = owned_dir(tmp_path, "someone-else", dead_pid())
    assert sweep_stale(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and unowned.exists() and other.exists()


def test_a_new_directory_is_owned_by_this_process():
    path = socket_dir("test-")
    try:
        assert path.name.startswith(f"{PREFIX}test-")
        assert int((path / OWNER).read_text()) == os.getpid()
        assert path not in sweep_stale(path.parent)
    finally:
        (path / OWNER).unlink()
        path.rmdir()
