"""``tdxh sweep FLOW``: the command line of the fault sweep."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from harness import paths
from harness.commands import SETUP_ERRORS, add_kernel_opts
from harness.launch import Images, prepare_images
from harness.repro import SWEEP_REPLAY_RESULT
from harness.sweep import declared as declared_outcomes
from harness.sweep import report
from harness.sweep.flows import FLOWS
from harness.sweep.plan import SiteChoice
from harness.sweep.runner import SweepError, outcome_of_replay, sweep
from harness.sweep.statuses import status_classes

log = logging.getLogger("harness.sweep")

def _classes(text: str) -> frozenset[str]:
    classes = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = classes - set(status_classes())
    if unknown or not classes:
        raise argparse.ArgumentTypeError(f"status classes are {', '.join(status_classes())}; got {text!r}")
    return classes


def add_subcommand(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sweep", help="fail every SEAMCALL site of a flow in turn and classify each outcome")
    add_kernel_opts(p)
    p.add_argument("flow", choices=sorted(FLOWS), help="; ".join(f"{f.name}: {f.description}" for f in FLOWS.values()))
    p.add_argument("--initramfs", type=Path, help="with --kernel: boot this initramfs as it is")
    p.add_argument("--status", type=_classes, default=None, metavar="CLASS,...",
                   help=f"only these status classes ({', '.join(status_classes())}; default all)")
    p.add_argument("--sites", choices=[c.value for c in SiteChoice], default=SiteChoice.FIRST.value,
                   help="which calls of each site: the first (default), first-and-loop (also the 2nd and the "
                        "last of a repeated site), all")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; each is a machine)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a run's boot may take before it counts as a hang (default 120)")
    p.add_argument("--declared", type=Path, default=declared_outcomes.DECLARED,
                   help="declared outcomes (TOML; default the harness's own)")
    p.add_argument("--replay", type=Path, metavar="RUN.json", help="re-run one run of an earlier sweep")
    p.add_argument("--out", type=Path, help="result directory (default under the cache)")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    flow = FLOWS[args.flow]
    out = (args.out or Path(paths.cache_dir()) / "sweeps" / time.strftime(f"{flow.name}-%Y%m%d-%H%M%S")).resolve()
    if args.jobs < 1:
        print("tdxh sweep: --jobs must be at least 1", file=sys.stderr)
        return 2
    try:
        declarations = declared_outcomes.load(args.declared)
        images = prepare_images(args.cache or paths.cache_dir(), kernel=args.kernel, kernel_tree=args.kernel_tree,
                                initramfs=args.initramfs)
    except (*SETUP_ERRORS, declared_outcomes.DeclaredError) as err:
        print(f"tdxh sweep: {err}", file=sys.stderr)
        return 2
    if args.replay is not None:
        return _replay(args, flow.name, images, out)
    log.info("sweep of flow %r: results under %s", flow.name, out)
    try:
        result = sweep(flow, images, out, SiteChoice(args.sites), args.status, args.jobs, args.timeout, declarations)
    except SweepError as err:
        print(f"tdxh sweep: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.counts().items()))
    print(f"\n{len(result.runs)} runs of {result.planned} ({result.sites} call sites, {result.targets} calls chosen) "
          f"in {result.seconds:.0f}s: {counts}")
    for finding in result.undeclared:
        print(f"  undeclared {finding.verdict.outcome.value}: {report.describe(finding.run)}: "
              f"{finding.verdict.reasons[0]} (bundle: {finding.bundle})")
    print(f"report: {out / report.HTML}\nresults: {out / report.RESULT}", file=sys.stderr)
    return 1 if result.undeclared or not result.complete else 0


def _replay(args: argparse.Namespace, flow: str, images: Images, out: Path) -> int:
    try:
        done = outcome_of_replay(FLOWS[flow], args.replay, images, out, args.timeout)
    except report.SpecError as err:
        print(f"tdxh sweep: {err}", file=sys.stderr)
        return 2
    verdict = done.verdict
    line = f"{verdict.outcome.value}: {verdict.reasons[0] if verdict.reasons else ''}"
    (out / SWEEP_REPLAY_RESULT).write_text(json.dumps({"outcome": verdict.outcome.value, "failure_line": line,
                                                 "finding": done.undeclared_finding}, indent=2) + "\n")
    print(f"{report.describe(done.run)}: {line}\n" + "\n".join(f"  {text}" for text in verdict.lines))
    print(f"logs: {done.directory}", file=sys.stderr)
    return 1 if done.undeclared_finding else 0
