"""Boot benchmarks (``pytest -m bench tests/scenarios``): printed medians, never time limits."""

from __future__ import annotations

import itertools
import statistics
import time

import pytest

from harness.machine.qemu import QemuConfig
from harness.observe import patterns
from harness.seam.abi import Leaf

pytestmark = pytest.mark.bench
BOOTS = 5


def test_bench_boot(boot, capsys):
    to_init, to_ready, round_trips = [], [], []
    for _ in range(BOOTS):
        start = time.monotonic()
        machine = boot(QemuConfig(), ready=False)
        machine.expect(patterns.INITIALIZED, 300)
        to_init.append(time.monotonic() - start)
        machine.wait_ready(300)
        to_ready.append(time.monotonic() - start)
        reads = [r.time for r in machine.module.trace.records if r.number == Leaf.TDH_SYS_RD]
        # The kernel issues its SYS.RD calls back to back: their spacing is one round trip.
        round_trips += [(b - a) * 1e6 for a, b in itertools.pairwise(reads)]
        machine.stop()
    round_trips.sort()
    with capsys.disabled():
        print(f"\nQEMU start -> 'TDX-Module initialized': median {statistics.median(to_init):.2f} s "
              f"(min {min(to_init):.2f}, max {max(to_init):.2f}, {BOOTS} boots)")
        print(f"QEMU start -> readiness marker: median {statistics.median(to_ready):.2f} s "
              f"(min {min(to_ready):.2f}, max {max(to_ready):.2f})")
        print(f"SEAMCALL round trip over COM2 (TDH.SYS.RD spacing, {len(round_trips)} calls): median "
              f"{statistics.median(round_trips):.0f} us, p99 {round_trips[int(len(round_trips) * 0.99) - 1]:.0f} us")
