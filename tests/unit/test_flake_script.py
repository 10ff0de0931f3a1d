"""scripts/flake's --load: the loop runs beside the block and nothing of it outlives the block."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "flake"


def flake_module():
    loader = importlib.machinery.SourceFileLoader("tdxh_flake", str(SCRIPT))
    spec = importlib.util.spec_from_loader("tdxh_flake", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_load_runs_in_a_loop_and_its_group_dies_with_the_block(tmp_path):
    flake = flake_module()
    pids = tmp_path / "pids"
    with flake.background_load(f"echo $$ >> {pids}; sleep 0.05", tmp_path / "load.log"):
        deadline = time.monotonic() + 10
        while len(pids.read_text().split() if pids.exists() else []) < 3:
            assert time.monotonic() < deadline, "the load command did not run again and again"
            time.sleep(0.05)
    loop_shell = int(pids.read_text().split()[0])  # $$ in bash -c is the loop's shell
    deadline = time.monotonic() + 10
    while alive(loop_shell):
        assert time.monotonic() < deadline, "the load loop outlived the block"
        time.sleep(0.05)


def test_no_load_is_no_process(tmp_path):
    flake = flake_module()
    with flake.background_load(None, tmp_path / "load.log"):
        pass
    assert not (tmp_path / "load.log").exists()


def test_the_loop_is_killed_when_the_block_raises(tmp_path):
    flake = flake_module()
    pids = tmp_path / "pids"
    with pytest.raises(KeyboardInterrupt), flake.background_load(f"echo $$ >> {pids}; sleep 5", tmp_path / "load.log"):
        deadline = time.monotonic() + 10
        while not pids.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        raise KeyboardInterrupt
    pid = int(pids.read_text().split()[0])
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, "the load loop outlived an interrupted block"
        time.sleep(0.05)
