"""Subcommands that fetch, build and boot: setup, build, boot."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import nightly, paths, report
from harness.coverage import report as coverage_report
from harness.coverage.collect import ScenarioCoverage
from harness.coverage.objects import COVERAGE_ENV, CoverageBuildError
from harness.images.initramfs import SSH_PACKAGES
from harness.images.iso import HOST_PACKAGES as ISO_PACKAGES
from harness.kernel.build import BuildError
from harness.kernel.inspect import KernelImageError
from harness.kernel.source import SourceError
from harness.launch import Images, prepare_images, start_machine
from harness.machine.base import MachineError
from harness.machine.bochs_install import HOST_LIBRARY_PACKAGES, BochsUnavailable, fetch_bochs
from harness.machine.channel import ChannelError
from harness.machine.qemu import QemuConfig, parse_size
from harness.repro import BundleError, harness_commit, open_bundle, reproduce
from harness.run import CommandError, run
from harness.seam.faults import FaultPlan
from harness.seam.platform import PlatformConfig
from harness.seam.profiles import DEFAULT_PROFILE, PROFILE_ENV, PROFILES, default_profile

log = logging.getLogger("harness")

# Host packages (Debian 12): emulator, initramfs contents, kernel build tools (kmod: depmod, or
# modules.dep is missing and modprobe fails in the guest), the Bochs boot ISO, and the bookworm
# libraries trixie's bochs-bin links from the host.
HOST_PACKAGES = ("qemu-system-x86", "busybox-static", "kexec-tools", "cpio", "ccache", "build-essential", "flex",
                 "bison", "bc", "libelf-dev", "libssl-dev", "rsync", "xz-utils", "debian-archive-keyring", "kmod",
                 *ISO_PACKAGES, *SSH_PACKAGES, *sorted(set(HOST_LIBRARY_PACKAGES.values())))
SETUP_ERRORS = (BuildError, CommandError, KernelImageError, SourceError, ValueError, OSError)


def add_kernel_opts(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--kernel", type=Path, help="boot this prebuilt bzImage (checked for the shim first)")
    group.add_argument("--kernel-tree", type=Path, help="build this kernel tree instead of Debian's linux-source")
    parser.add_argument("--cache", type=Path, default=None, help=f"cache directory (default {paths.cache_dir()})")


def add_machine_opts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", default="2G", help="guest RAM (default 2G)")
    parser.add_argument("--smp", type=int, default=2, help="logical CPUs (default 2)")
    parser.add_argument("--sockets", type=int, default=1, help="packages the CPUs are split over (default 1)")
    parser.add_argument("--numa", default="", metavar="SIZE,SIZE,...", help="NUMA node sizes, e.g. 1G,3G")
    parser.add_argument("--cpu", default="max", help="QEMU CPU model (default max, Intel vendor)")
    parser.add_argument("--append", default="", help="extra kernel command line")
    parser.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")


def machine_config(args: argparse.Namespace) -> QemuConfig:
    numa = tuple(s for s in args.numa.split(",") if s)
    for size in (args.memory, *numa):
        parse_size(size)
    return QemuConfig(memory=args.memory, cpus=args.smp, sockets=args.sockets, numa=numa, cpu_model=args.cpu,
                      qemu=args.qemu)


def images_from(args: argparse.Namespace, coverage: bool = False) -> Images:
    return prepare_images(args.cache or paths.cache_dir(), kernel=args.kernel, kernel_tree=args.kernel_tree,
                          coverage=coverage)


def cmd_setup(args: argparse.Namespace) -> int:
    missing = [pkg for pkg in HOST_PACKAGES if not _installed(pkg)]
    if missing:
        log.info("installing host packages: %s", " ".join(missing))
        run(["apt-get", "update", "-q"], timeout=900)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], timeout=1800,
            env={"DEBIAN_FRONTEND": "noninteractive"})
    try:
        fetch_bochs(paths.cache_dir())  # the VMX backend of the KVM scenarios
    except BochsUnavailable as err:
        log.warning("Bochs not available, KVM scenarios will be skipped: %s", err)
    return cmd_build(args)


def _installed(package: str) -> bool:
    try:
        out = run(["dpkg-query", "-W", "-f=${Status}", package], timeout=60)
    except CommandError:
        return False
    return "install ok installed" in out


def cmd_build(args: argparse.Namespace) -> int:
    try:
        images = images_from(args, coverage=getattr(args, "coverage", False))
    except (*SETUP_ERRORS, CoverageBuildError) as err:
        print(f"tdxh {args.subcommand}: {err}", file=sys.stderr)
        return 1
    print(f"kernel:    {images.kernel}\ninitramfs: {images.initrd}\nidentity:  {images.identity}")
    if images.coverage is not None:
        print(f"gcov notes: {images.coverage.build_dir} (sources: {images.coverage.source_tree})")
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    try:  # the cheap checks first: a bad profile or fault plan must not wait for a kernel build
        platform = PlatformConfig.for_profile(args.module_profile, module_present=not args.no_module)
        faults = FaultPlan.load(args.faults) if args.faults else FaultPlan()
        images = images_from(args, coverage=args.coverage is not None)
        config = machine_config(args)
        if images.coverage is not None:
            images.coverage.claim(args.coverage)
    except (*SETUP_ERRORS, CoverageBuildError) as err:
        print(f"tdxh boot: {err}", file=sys.stderr)
        return 1
    name = time.strftime("boot-%Y%m%d-%H%M%S")
    run_dir = args.run_dir or Path(paths.cache_dir()) / "runs" / name
    log.info("run directory: %s", run_dir)
    machine = None
    coverage = ScenarioCoverage(args.coverage, name, images.coverage) if images.coverage is not None else None
    try:
        machine = start_machine(images, config, run_dir, platform=platform, faults=faults, append=args.append)
        if coverage is not None:
            coverage.attach(machine, "machine0")
        log.info("booting (console log: %s)", machine.console_log)
        release = machine.wait_ready(args.timeout)
        log.info("guest %s is up", release)
        if args.command is None:
            print(f"guest shell on the command channel, kernel messages shown as they come (end with "
                  f"Ctrl-D; `poweroff -f` powers off); console log: {machine.console_log}", file=sys.stderr)
            machine.interact(sys.stdin, sys.stdout)
            status = 0
        else:
            # The command's output exactly as written: its own channel, no kernel message in it.
            result = machine.run(args.command, args.timeout)
            sys.stdout.write(result.output)
            status = result.status
        machine.power_off(60)
    except (MachineError, ChannelError) as err:
        print(f"tdxh boot: {err}", file=sys.stderr)
        status = 1
    finally:
        if machine is not None:
            if coverage is not None:  # after a power-off its counters are in already
                coverage.finish(machine)
            machine.stop()
    trace = run_dir / "seamcalls.jsonl"
    if args.trace and args.trace.resolve() != trace.resolve():
        shutil.copy(trace, args.trace)
    log.info("SEAMCALL trace: %s (print it with `tdxh trace FILE`)", args.trace or trace)
    if coverage is not None:
        print_coverage(args.coverage)
    return status


def print_coverage(directory: Path, compare_with: Path | None = None) -> bool:
    """Merge DIR's counters and print the per-file table (and deltas); False if that failed."""
    try:
        coverage_report.write_report(directory)
        print(coverage_report.summary_text(directory, compare_with))
    except (coverage_report.ReportError, CoverageBuildError) as err:
        print(f"coverage: no report: {err}", file=sys.stderr)
        return False
    print(f"coverage report: {directory / coverage_report.HTML}", file=sys.stderr)
    return True


def cmd_repro(args: argparse.Namespace) -> int:
    work = args.work or Path(paths.cache_dir()) / "repro" / time.strftime("%Y%m%d-%H%M%S")
    try:
        bundle = open_bundle(args.bundle, work / "bundle")
    except BundleError as err:
        print(f"tdxh repro: {err}", file=sys.stderr)
        return 2
    info = bundle.info
    print(f"scenario {info.nodeid}\n  failed with: {info.failure_line}\n  kernel: {info.kernel_identity}\n"
          f"  made by harness {info.harness_commit} on {info.created}", file=sys.stderr)
    current = harness_commit()
    if current != info.harness_commit:
        print(f"  note: this harness is {current}: the scenario's steps may differ from the run that failed",
              file=sys.stderr)
    print(f"re-running it on the bundled kernel and initramfs (logs under {work})", file=sys.stderr)
    try:
        result = reproduce(bundle, work, args.timeout, args.pytest_args)
    except subprocess.TimeoutExpired:
        print(f"tdxh repro: the re-run did not end within {args.timeout:.0f}s (stopped); logs under {work}",
              file=sys.stderr)
        return 1
    print(result.summary(info.failure_line))
    print(f"  artifacts: {result.artifacts}; original logs: {bundle.logs}", file=sys.stderr)
    return 0 if result.reproduced else 1


def cmd_nightly(args: argparse.Namespace) -> int:
    out = (args.out or Path(paths.cache_dir()) / "nightly" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if out.exists() and any(out.iterdir()):
        print(f"tdxh nightly: {out} is not empty: give a new --out (nothing was overwritten)", file=sys.stderr)
        return 2
    if args.coverage_compare is not None and not args.coverage_compare.is_file():
        print(f"tdxh nightly: --coverage-compare {args.coverage_compare}: no such file", file=sys.stderr)
        return 2
    try:  # before the run: a wrong history directory must not cost a whole nightly
        history = report.load_history(args.history) if args.history else None
    except (report.HistoryError, OSError, ValueError, KeyError) as err:
        print(f"tdxh nightly: --history: {err}", file=sys.stderr)
        return 2
    if args.cache:
        os.environ["TDXH_CACHE"] = str(args.cache)  # the scenarios' own pytest runs use it too
    # Each scenario's pytest gets --coverage explicitly (or not): never from the environment.
    os.environ.pop(COVERAGE_ENV, None)
    coverage = out / nightly.COVERAGE_DIR if args.coverage else None
    try:
        log.info("building (or finding) the kernel and initramfs once for every scenario")
        images = images_from(args, coverage=coverage is not None)
        tests = nightly.plan(args.pytest_args, unit=not args.no_unit)
        out.mkdir(parents=True, exist_ok=True)
        if images.coverage is not None and coverage is not None:
            images.coverage.claim(coverage)
        print(f"tdxh nightly: {len(tests)} tests ({'unit tests + ' if not args.no_unit else ''}"
              f"{len(tests) - (0 if args.no_unit else 1)} scenarios) on {images.identity}; results in {out}",
              file=sys.stderr)
        status, job_dir = nightly.run_job(tests, images, out, coverage)
    except (*SETUP_ERRORS, nightly.NightlyError, CoverageBuildError) as err:
        print(f"tdxh nightly: {err}", file=sys.stderr)
        return 2
    if coverage is not None and not print_coverage(coverage, args.coverage_compare):
        status = status or 1
    results = report.load_results(job_dir, out, {t.nodeid: out / t.junit for t in tests})
    page = report.write_report(results, out, f"tdx-harness nightly {time.strftime('%Y-%m-%d %H:%M')}: "
                                             f"{images.identity}", coverage, args.coverage_compare, history)
    failed = [r for r in results if r.status not in ("PASS", "SKIP")]
    for result in failed:
        print(f"{result.status} {result.nodeid}: {result.failure}")
    print(f"report: {page}\nJUnit XML: {out / 'results.xml'}\navocado job: {job_dir}", file=sys.stderr)
    return 1 if failed or status else 0


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("setup", help="install host packages, fetch and build the kernel and initramfs")
    add_kernel_opts(p)
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("build", help="build the kernel (with the shim) and the initramfs")
    add_kernel_opts(p)
    p.add_argument("--coverage", action="store_true", help="the coverage variant (gcov in the TDX host objects)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("boot", help="boot with the software module attached and run a command")
    add_kernel_opts(p)
    add_machine_opts(p)
    p.add_argument("--command", help="command to run in the guest; its status is tdxh's")
    p.add_argument("--trace", type=Path, help="write the SEAMCALL trace (JSON lines) here")
    p.add_argument("--faults", type=Path, help="fault plan (JSON) to load into the module")
    p.add_argument("--no-module", action="store_true", help="platform with TDX KeyIDs but no module loaded")
    p.add_argument("--module-profile", choices=sorted(PROFILES), default=default_profile(),
                   help=f"the TDX module release the software module follows (default {DEFAULT_PROFILE}) "
                        f"[{PROFILE_ENV}]")
    p.add_argument("--run-dir", type=Path, help="where logs go (default under the cache)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for boot and for the command")
    p.add_argument("--coverage", type=Path, metavar="DIR",
                   help="boot the coverage kernel; its counters go to DIR at power-off, then the report")
    p.set_defaults(func=cmd_boot)

    p = sub.add_parser("nightly", help="every scenario as an avocado job: per-scenario results, JUnit, HTML report")
    add_kernel_opts(p)
    p.add_argument("--out", type=Path, help="result directory, new or empty (default under the cache)")
    p.add_argument("--no-unit", action="store_true", help="scenarios only (the unit tests are one more test)")
    p.add_argument("--coverage", action="store_true",
                   help="boot the coverage kernel; every scenario's counters merged into OUT/coverage, linked from "
                        "report.html")
    p.add_argument("--coverage-compare", type=Path, metavar="OLD/coverage-summary.json",
                   help="with --coverage: per-file changes against an earlier run's summary (drops first)")
    p.add_argument("--history", type=Path, nargs="+", metavar="OLD_OUT",
                   help="earlier nightly output directories (oldest first): report.html shows each test's pass "
                        "rate over them and this run, and lists the flaky ones")
    p.add_argument("pytest_args", nargs="*", help="pytest selection for the scenarios (after --), e.g. -- -k kexec")
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser("repro", help="re-run the scenario of a reproducer bundle (exit 0: it failed again)")
    p.add_argument("bundle", type=Path, help="a repro.tar.gz that a failing scenario wrote")
    p.add_argument("--work", type=Path, help="where to unpack and re-run (default under the cache)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole re-run")
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --), e.g. -- -x -s")
    p.set_defaults(func=cmd_repro)
