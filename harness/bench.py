"""Benchmarks of the harness: the figures ``scripts/bench`` prints as one JSON object, and the
measurement helpers the bench tests share with it. Figures are reported, never judged: these
machines are noisy, so nothing here is a time limit.

Figures (name -> {value, unit, n, median, p99 where relevant}; ``value`` is the median):
- ``noop_build``: ``prepare_images`` on a built cache (key checks, no compile);
- ``boot_to_tdx_initialized`` / ``boot_to_ready``: QEMU start to 'TDX-Module initialized' / to
  the initramfs readiness marker, per boot;
- ``seamcall_round_trip``: spacing of the kernel's back-to-back TDH.SYS.RD calls in the module
  trace (host clock: the guest's printk clock stops while the shim polls with IRQs off);
- ``module_dispatch``: one TDH.SYS.RD through ``TdxModule.call`` in process;
- ``kvm_flow_2m`` (``--kvm-flow``): on Bochs, the guest agent's KVM flow from KVM_CREATE_VM to
  KVM_TDX_FINALIZE_VM with 2 MiB of measured memory (512 pages, 8,704 SEAMCALLs for the pages),
  teardown included; ``kvm_flow_seamcalls`` counts the SEAMCALLs it took;
- ``default_suite`` (``--suite``) and ``cold_build`` (``--cold-build``, 11+ minutes) on request.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import paths
from harness.launch import Images
from harness.machine.qemu import QemuMachine
from harness.seam.abi import Field, Leaf
from harness.seam.call import SeamcallRequest
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram
from harness.seam.trace import REGISTERS, TraceRecord

log = logging.getLogger("harness.bench")
G = 1 << 30
BOOT_TIMEOUT = 300.0
BOCHS_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    n: int
    median: float | None = None
    p99: float | None = None

    def to_json(self) -> dict[str, float | int | str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarize(samples: Sequence[float], unit: str, tail: bool = True) -> Figure:
    """Median as the value; p99 only where there are enough samples for it to mean something."""
    if not samples:
        raise ValueError("no samples")
    median = statistics.median(samples)
    p99 = percentile(samples, 0.99) if tail and len(samples) >= 20 else None
    return Figure(round(median, 3), unit, len(samples), round(median, 3), None if p99 is None else round(p99, 3))


def timed(fn: Callable[[], object], rounds: int, scale: float = 1.0) -> list[float]:
    """Wall time of each of ``rounds`` calls, times ``scale`` (1e6 for microseconds)."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * scale)
    return samples


# --- the software module in process ---------------------------------------------------------


def module_dispatch_us(rounds: int) -> list[float]:
    """TDH.SYS.RD of MAX_TDMRS on an initialized LP: the module's per-call cost, no transport."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    memory = SparseMemory([(0, 2 * G)])
    zeros = (0,) * len(REGISTERS)
    module.call(SeamcallRequest(0, Leaf.TDH_SYS_INIT, zeros), memory)
    module.call(SeamcallRequest(0, Leaf.TDH_SYS_LP_INIT, zeros), memory)
    read = SeamcallRequest(0, Leaf.TDH_SYS_RD, (0, int(Field.MAX_TDMRS)) + zeros[2:])
    return timed(lambda: module.call(read, memory), rounds, 1e6)


# --- boots -----------------------------------------------------------------------------------


def sys_rd_spacing_us(records: Iterable[TraceRecord]) -> list[float]:
    """The kernel issues its TDH.SYS.RD calls back to back: their spacing is one round trip."""
    times = [r.time for r in records if r.number == Leaf.TDH_SYS_RD]
    return [(b - a) * 1e6 for a, b in itertools.pairwise(times)]


@dataclass
class BootSample:
    to_initialized: float  # seconds from QEMU start
    to_ready: float
    round_trips_us: list[float]


def measure_boot(start: Callable[[], QemuMachine]) -> BootSample:
    """One boot: ``start()`` returns a started QemuMachine (not waited for); it is stopped here."""
    from harness.observe import patterns

    began = time.monotonic()
    machine = start()
    try:
        machine.expect(patterns.INITIALIZED, BOOT_TIMEOUT)
        initialized = time.monotonic() - began
        machine.wait_ready(BOOT_TIMEOUT)
        ready = time.monotonic() - began
        return BootSample(initialized, ready, sys_rd_spacing_us(machine.module.trace.records))
    finally:
        machine.stop()


def boot_figures(samples: Sequence[BootSample]) -> dict[str, Figure]:
    trips = [t for s in samples for t in s.round_trips_us]
    figures = {"boot_to_tdx_initialized": summarize([s.to_initialized for s in samples], "s", tail=False),
               "boot_to_ready": summarize([s.to_ready for s in samples], "s", tail=False)}
    if trips:
        figures["seamcall_round_trip"] = summarize(trips, "us")
    return figures


# --- the command -----------------------------------------------------------------------------


def bench_noop_build(runs: int) -> Figure:
    from harness.launch import prepare_images

    prepare_images(paths.cache_dir())  # warm: the first call may still build
    return summarize(timed(lambda: prepare_images(paths.cache_dir()), runs), "s", tail=False)


def bench_boots(boots: int, run_root: Path) -> dict[str, Figure]:
    from harness.launch import prepare_images, start_machine
    from harness.machine.qemu import QemuConfig

    images = prepare_images(paths.cache_dir())
    samples = []
    for i in range(boots):
        sample = measure_boot(functools.partial(start_machine, images, QemuConfig(), run_root / f"boot{i}"))
        log.info("boot %d: initialized after %.2f s, ready after %.2f s", i + 1, sample.to_initialized,
                 sample.to_ready)
        samples.append(sample)
    return {**boot_figures(samples), **bench_resumes(boots, images, run_root)}


def bench_resumes(resumes: int, images: Images, run_root: Path) -> dict[str, Figure]:
    """Boot reuse: one boot saved to a file, then ``resumes`` starts from it, each until its shell
    answers (what a scenario waits for before its first step, as boot_to_ready)."""
    from harness.launch import save_machine, start_machine
    from harness.machine.qemu import QemuConfig

    machine = start_machine(images, QemuConfig(), run_root / "saved")
    try:
        machine.wait_ready(BOOT_TIMEOUT)
        began = time.monotonic()
        saved = save_machine(machine, run_root / "saved.vmstate")
        save_seconds = time.monotonic() - began
    finally:
        machine.stop()
    times = []
    for i in range(resumes):
        began = time.monotonic()
        resumed = start_machine(images, QemuConfig(), run_root / f"resume{i}", saved=saved)
        try:
            resumed.resume_saved(BOOT_TIMEOUT)
            times.append(time.monotonic() - began)
        finally:
            resumed.stop()
        log.info("resume %d: shell answered after %.2f s", i + 1, times[-1])
    return {"save_machine": Figure(round(save_seconds, 3), "s", 1),
            "resume_to_ready": summarize(times, "s", tail=False)}


KVM_FLOW_PAGES = 512  # 2 MiB


def bench_kvm_flow(run_root: Path) -> dict[str, Figure]:
    """One Bochs machine: load kvm_intel tdx=1, then time the agent's whole flow."""
    from harness.launch import prepare_images
    from harness.machine.bochs import TD_MIN_IPS, BochsConfig, start_bochs_machine
    from harness.machine.bochs_install import fetch_bochs
    from harness.observe.kvm import LOAD_KVM_INTEL, TO_MEMORY, run_agent

    images = prepare_images(paths.cache_dir())
    machine = start_bochs_machine(images, BochsConfig(ips=TD_MIN_IPS), run_root / "kvm-flow",
                                  install=fetch_bochs(paths.cache_dir()))
    try:
        machine.wait_ready(BOCHS_TIMEOUT)
        loaded = machine.run(LOAD_KVM_INTEL, BOCHS_TIMEOUT)
        if loaded.status:
            raise RuntimeError(f"kvm_intel tdx=1 did not load: {loaded.output}")
        before = len(machine.module.trace)
        start = time.monotonic()
        run = run_agent(machine, [*TO_MEMORY, f"init_mem_region:pages={KVM_FLOW_PAGES}", "finalize"],
                        BOCHS_TIMEOUT)
        seconds = time.monotonic() - start
        calls = len(machine.module.trace) - before
    finally:
        machine.stop()
    if run.failed():
        raise RuntimeError(f"the KVM flow failed: {run.failed()}")
    log.info("KVM flow with %d measured pages: %.1f s, %d SEAMCALLs", KVM_FLOW_PAGES, seconds, calls)
    return {"kvm_flow_2m": Figure(round(seconds, 3), "s", 1), "kvm_flow_seamcalls": Figure(calls, "calls", 1)}


def bench_cold_build() -> Figure:
    """A compile from scratch: a fresh build directory and ccache off (the source is reused)."""
    from harness.kernel.build import BuildRequest, build
    from harness.kernel.source import debian_source

    source = debian_source(paths.cache_dir())
    with tempfile.TemporaryDirectory(prefix="tdxh-cold-", dir=paths.cache_dir()) as root:
        start = time.monotonic()
        build(BuildRequest(source=source, cache=Path(root), ccache=False))
        return Figure(round(time.monotonic() - start, 3), "s", 1)


def bench_suite(pytest_args: Sequence[str]) -> Figure:
    """Wall time of the default suite (``pytest`` as configured in pyproject), pass or fail."""
    with tempfile.TemporaryDirectory(prefix="tdxh-bench-") as artifacts:
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--artifacts", artifacts, *pytest_args],
                                cwd=paths.REPO, stdout=subprocess.DEVNULL, check=False)
        seconds = time.monotonic() - start
    if result.returncode not in (0, 1):
        log.warning("the suite ended with pytest status %d", result.returncode)
    return Figure(round(seconds, 3), "s", 1)


def suite_from_flake(flake_json: Path) -> Figure:
    """The default suite's wall time over the runs of ``scripts/flake --json`` (median, p99 from
    20 runs on): the runs a flake check already made, instead of one more."""
    runs = json.loads(flake_json.read_text()).get("runs") or []
    seconds = [float(run["seconds"]) for run in runs]
    if not seconds:
        raise ValueError(f"{flake_json}: no runs (not written by scripts/flake --json?)")
    return summarize(seconds, "s")


def ratios(current: dict[str, dict[str, float]], previous: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """current / previous for each figure and statistic both runs have (> 1: slower or larger)."""
    out: dict[str, dict[str, float]] = {}
    for name, figure in current.items():
        before = previous.get(name, {})
        common = {k: figure[k] / before[k] for k in ("value", "median", "p99")
                  if isinstance(figure.get(k), int | float) and isinstance(before.get(k), int | float) and before[k]}
        if common:
            out[name] = {k: round(v, 3) for k, v in common.items()}
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=5, help="boots to measure (0: none) [5]")
    parser.add_argument("--builds", type=int, default=3, help="no-op builds to measure (0: none) [3]")
    parser.add_argument("--dispatch-rounds", type=int, default=5000, help="module dispatch calls [5000]")
    parser.add_argument("--suite", action="store_true", help="also time the default test suite")
    parser.add_argument("--suite-args", default="", help="extra pytest arguments for --suite, one string")
    parser.add_argument("--suite-from", type=Path, metavar="FLAKE.json",
                        help="the suite's wall time from the runs of `scripts/flake --json FLAKE.json` instead")
    parser.add_argument("--cold-build", action="store_true", help="also time a cold kernel build (11+ minutes)")
    parser.add_argument("--kvm-flow", action="store_true",
                        help="also time the KVM TDX flow with 2 MiB of measured memory on Bochs (minutes)")
    parser.add_argument("--run-dir", type=Path, help="keep the boots' logs and traces here")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument("--compare", type=Path, metavar="PREVIOUS.json",
                        help="print current/previous ratios per figure (on stderr)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    previous = json.loads(args.compare.read_text()) if args.compare else None
    figures: dict[str, Figure] = {}
    if args.dispatch_rounds:
        figures["module_dispatch"] = summarize(module_dispatch_us(args.dispatch_rounds), "us")
    if args.builds:
        figures["noop_build"] = bench_noop_build(args.builds)
    if args.boots:
        with tempfile.TemporaryDirectory(prefix="tdxh-bench-") as tmp:
            run_root = args.run_dir or Path(tmp)
            figures.update(bench_boots(args.boots, run_root))
    if args.suite_from:
        figures["default_suite"] = suite_from_flake(args.suite_from)
    elif args.suite:
        figures["default_suite"] = bench_suite(args.suite_args.split())
    if args.kvm_flow:
        with tempfile.TemporaryDirectory(prefix="tdxh-bench-") as tmp:
            figures.update(bench_kvm_flow(args.run_dir or Path(tmp)))
    if args.cold_build:
        figures["cold_build"] = bench_cold_build()
    result = {name: figure.to_json() for name, figure in figures.items()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    if previous is not None:
        for name, values in ratios(result, previous).items():  # type: ignore[arg-type]
            shown = ", ".join(f"{k} x{v:.2f}" for k, v in values.items())
            print(f"{name}: {shown}", file=sys.stderr)
        missing = sorted(set(previous) ^ set(result))
        if missing:
            print(f"only in one of the runs: {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
