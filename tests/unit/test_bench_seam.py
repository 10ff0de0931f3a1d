"""Benchmarks of the software module (``pytest -m bench``): medians, printed, never asserted
against a time limit (these machines are noisy)."""

from __future__ import annotations

import statistics
import time

import pytest
from fake_shim import FakeShim
from linux_replay import call, replay_init

from harness.seam.abi import Field, Leaf
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram
from harness.transport.server import SeamServer

pytestmark = pytest.mark.bench
G, M = 1 << 30, 1 << 20


def median_us(fn, rounds: int) -> tuple[float, float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def test_bench_seam(tmp_path, capsys):
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    memory = SparseMemory([(0, 2 * G)])
    call(module, memory, 0, Leaf.TDH_SYS_INIT)
    call(module, memory, 0, Leaf.TDH_SYS_LP_INIT)
    dispatch = median_us(lambda: call(module, memory, 0, Leaf.TDH_SYS_RD, rdx=Field.MAX_TDMRS), 2000)

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
        print(f"\nseam dispatch (TDH.SYS.RD, in process): median {dispatch[0]:.1f} us, p99 {dispatch[1]:.1f} us")
        print(f"full host-init sequence (2 TDMRs, 2 CPUs): median {init[0]:.0f} us, p99 {init[1]:.0f} us")
        print(f"CALL/RETURN round trip over a Unix socket: median {socket_rt[0]:.1f} us, p99 {socket_rt[1]:.1f} us")
