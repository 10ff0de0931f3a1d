"""The ``tdxh`` command line (also ``python -m harness``): one subcommand per user task.

Subcommands that need a kernel or an emulator live beside this file's helpers; the offline ones
(``pamt-model``, ``trace``, ``coverage``, ``module-image``) work anywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.coverage import report as coverage_report
from harness.coverage.objects import CoverageBuildError
from harness.observe import pamt
from harness.seam import image
from harness.seam.trace import format_record, read_trace


def _address(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address (hex 0x... or decimal): {text!r}") from None


def _entry_sizes(text: str) -> tuple[int, int, int]:
    try:
        a, b, c = (int(part, 0) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three sizes A,B,C (4K,2M,1G), got {text!r}") from None
    return a, b, c


def cmd_pamt_model(args: argparse.Namespace) -> int:
    try:
        text = Path(args.e820).read_text() if args.e820 != "-" else sys.stdin.read()
        result = pamt.model(pamt.parse_e820(text), args.numa_boundary, args.entry_sizes)
    except OSError as err:
        print(f"pamt-model: cannot read {args.e820}: {err.strerror}", file=sys.stderr)
        return 2
    except pamt.E820Error as err:
        print(f"pamt-model: {args.e820}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json()))
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    try:
        records = read_trace(Path(args.file))
    except OSError as err:
        print(f"trace: cannot read {args.file}: {err.strerror}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"trace: {err}", file=sys.stderr)
        return 2
    for record in records:
        print(format_record(record))
    return 0


def cmd_coverage(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    try:
        summary = directory / coverage_report.SUMMARY
        if args.merge or not summary.exists() or _newer_counters(directory, summary):
            coverage_report.write_report(directory)
        print(coverage_report.summary_text(directory, args.compare))
        if args.unreached:
            print(f"\nlargest functions no scenario entered (up to {args.unreached} a file; lines with code):")
            for name, functions in coverage_report.unreached_functions(directory / coverage_report.MERGED,
                                                                       args.unreached).items():
                print(f"  {name}: " + (", ".join(f"{f} ({n})" for f, n in functions) or "none"))
        spots = json.loads((directory / coverage_report.BLIND_SPOTS).read_text())
        print("\n" + coverage_report.format_blind_spots(spots))
    except (coverage_report.ReportError, CoverageBuildError) as err:
        print(f"coverage: {err}", file=sys.stderr)
        return 2
    print(f"\nreport: {directory / coverage_report.HTML}", file=sys.stderr)
    return 0


def _newer_counters(directory: Path, summary: Path) -> bool:
    events = list((directory / "raw").glob("*/events.json"))
    return any(e.stat().st_mtime > summary.stat().st_mtime for e in events)


def cmd_module_image(args: argparse.Namespace) -> int:
    try:
        major, minor, update = image.parse_version(args.version)
        module = image.ModuleImage(major, minor, update, build_num=args.build, module_hv=args.module_hv,
                                   min_update_hv=args.min_update_hv, no_downgrade=args.no_downgrade)
        data = image.build_image(module, signer="" if args.unsigned else args.signer,
                                 nr_module_pages=args.pages, corrupt=args.corrupt)
        args.out.write_bytes(data)
    except (ValueError, OSError) as err:
        print(f"module-image: {err}", file=sys.stderr)
        return 2
    signed = "unsigned" if args.unsigned else f"signed by {args.signer!r}"
    broken = f", corrupted: {args.corrupt}" if args.corrupt else ""
    print(f"{args.out}: TDX module {module.version_text} (MODULE_HV {module.module_hv}, MIN_UPDATE_HV "
          f"{module.min_update_hv}{', NO_DOWNGRADE' if module.no_downgrade else ''}), {signed}, "
          f"{len(data)} bytes{broken}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdxh", description="Test harness for the Linux TDX host code.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="subcommand", required=True)

    p = sub.add_parser("pamt-model", help="TDMRs and PAMT size Linux computes for an e820 map")
    p.add_argument("--e820", required=True, help="file with the kernel's BIOS-e820 lines ('-' for stdin)")
    p.add_argument("--numa-boundary", type=_address, action="append", default=[], metavar="ADDR",
                   help="physical address where a NUMA node starts (repeatable)")
    p.add_argument("--entry-sizes", type=_entry_sizes, default=(16, 16, 16), metavar="A,B,C",
                   help="PAMT entry sizes for 4K,2M,1G pages (default 16,16,16)")
    p.set_defaults(func=cmd_pamt_model)

    p = sub.add_parser("trace", help="print a SEAMCALL trace (JSON lines) readably")
    p.add_argument("file")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("coverage", help="the coverage of the TDX host code a --coverage run measured: a table per file")
    p.add_argument("dir", type=Path, help="the --coverage DIR of a pytest run, or OUT/coverage of a nightly")
    p.add_argument("--compare", type=Path, metavar="OLD/coverage-summary.json",
                   help="per-file changes against an earlier summary (drops first)")
    p.add_argument("--unreached", type=int, default=0, metavar="N", help="the N largest unreached functions a file")
    p.add_argument("--merge", action="store_true", help="merge the counters again even if the report looks current")
    p.set_defaults(func=cmd_coverage)

    p = sub.add_parser("module-image", help="write a TDX module update image for the software P-SEAMLDR "
                       "(the format seamldr.c parses)")
    p.add_argument("--version", required=True, help="the module version it installs, MAJOR.MINOR.UPDATE")
    p.add_argument("--build", type=int, default=0, help="build number (default 0)")
    p.add_argument("--module-hv", type=int, default=0, help="MODULE_HV: the handoff version it writes (default 0)")
    p.add_argument("--min-update-hv", "--minor-handoff", type=int, default=0, dest="min_update_hv",
                   help="MIN_UPDATE_HV: the oldest handoff version it takes over from (default 0)")
    p.add_argument("--no-downgrade", action="store_true", help="set NO_DOWNGRADE in its SIGSTRUCT")
    p.add_argument("--signer", default=image.DEFAULT_SIGNER,
                   help=f"who seals the SIGSTRUCT (the platform trusts {image.DEFAULT_SIGNER!r} by default)")
    p.add_argument("--unsigned", action="store_true", help="no trusted signer: the loader answers EBADSIG")
    p.add_argument("--pages", type=int, default=1, help="module pages (default 1; Linux takes up to "
                   f"{image.SEAMLDR_MAX_NR_MODULE_PAGES})")
    p.add_argument("--corrupt", choices=image.CORRUPTIONS, help="break one part of the image")
    p.add_argument("out", type=Path)
    p.set_defaults(func=cmd_module_image)

    from harness import commands  # the subcommands that build and boot
    from harness.sweep import command as sweep_command
    commands.add_subcommands(sub)
    sweep_command.add_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`tdxh trace FILE | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
