"""Benchmarks of the software module (``pytest -m bench``): medians, printed, never asserted
against a time limit (these machines are noisy)."""

from __future__ import annotations

import pytest
from fake_shim import FakeShim
from linux_replay import replay_init

from harness.bench import Figure, module_dispatch_us, summarize, timed
from harness.seam.abi import Field, Leaf
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram
from harness.transport.server import SeamServer

pytestmark = pytest.mark.bench
G, M = 1 << 30, 1 << 20


def median_us(fn, rounds: int) -> Figure:
    return summarize(timed(fn, rounds, 1e6), "us")


def test_bench_seam(tmp_path, capsys):
    memory = SparseMemory([(0, 2 * G)])
    dispatch = summarize(module_dispatch_us(2000), "us")  # the figure scripts/bench reports

    def full_init() -> None:
        assert replay_init(TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G), (4 * G, 2 * G)]))),
                           [(M, 2 * G), (4 * G, 6 * G)]).ok
    init = median_us(full_init, 50)

    server = SeamServer(TdxModule(), tmp_path / "b.sock").start()
    shim = FakeShim(str(tmp_path / "b.sock"), memory)
    try:
        shim.hello()
        shim.seamcall(0, Leaf.TDH_SYS_INIT)
        shim.seamcall(0, Leaf.TDH_SYS_LP_INIT)
        regs = (0, int(Field.MAX_TDMRS)) + (0,) * 11
        socket_rt = median_us(lambda: shim.seamcall(0, Leaf.TDH_SYS_RD, regs), 2000)
    finally:
        shim.close()
        server.stop()
    with capsys.disabled():
        print(f"\nseam dispatch (TDH.SYS.RD, in process): median {dispatch.median:.1f} us, p99 {dispatch.p99:.1f} us")
        print(f"full host-init sequence (2 TDMRs, 2 CPUs): median {init.median:.0f} us, p99 {init.p99:.0f} us")
        print(f"CALL/RETURN over a Unix socket: median {socket_rt.median:.1f} us, p99 {socket_rt.p99:.1f} us")
