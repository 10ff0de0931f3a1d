"""A sweep: the flow once to enumerate its call sites, then once per planned run with that one
call failed; each run classified, checked against the declared outcomes, its logs kept, and a
reproducer bundle written for each finding; sweep.json and sweep.html at the end."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.kernel.inspect import vmlinux_for
from harness.launch import Images
from harness.repro import SWEEP_PREFIX, SWEEP_RUN_SPEC, write_bundle
from harness.seam.faults import FaultPlan
from harness.seam.trace import TraceRecord
from harness.sweep import declared as declared_outcomes
from harness.sweep import report
from harness.sweep.flows import Flow, FlowContext, FlowResult
from harness.sweep.outcome import Evidence, Verdict, classify
from harness.sweep.plan import Run, SiteChoice, all_targets, choose, plan_runs

log = logging.getLogger("harness.sweep")


class SweepError(Exception):
    """The sweep could not start or its enumeration run was not clean; the message says why."""


@dataclass(frozen=True)
class RunResult:
    run: Run
    verdict: Verdict
    declared: declared_outcomes.Declaration | None
    seconds: float
    directory: Path
    bundle: Path | None = None

    @property
    def undeclared_finding(self) -> bool:
        return self.verdict.finding and (self.declared is None or self.declared.outcome is not self.verdict.outcome)


@dataclass
class SweepResult:
    flow: str
    choice: SiteChoice
    sites: int
    targets: int
    unswept: list[str]
    runs: list[RunResult] = field(default_factory=list)
    enumerate_seconds: float = 0.0
    seconds: float = 0.0
    complete: bool = True  # False when interrupted: the report says how many runs are missing
    planned: int = 0

    def counts(self) -> Counter[str]:
        return Counter(r.verdict.outcome.value for r in self.runs)

    @property
    def undeclared(self) -> list[RunResult]:
        return [r for r in self.runs if r.undeclared_finding]


def evidence_of(run: Run, result: FlowResult, reported_by: Sequence[re.Pattern[str]]) -> Evidence:
    injected = [r for r in result.trace if r.injected]
    first: TraceRecord | None = injected[0] if injected else None
    after = [r for r in result.trace if first is not None and r.seq > first.seq]
    return Evidence(target_site=run.target.site, records=result.records, usable=result.usable, injected=first,
                    after=after, hang_report=result.hang_report, leaks=result.leaks,
                    inconsistencies=result.inconsistencies, reported_by=reported_by, error=result.error,
                    told=result.told)


def enumerate_flow(flow: Flow, images: Images, out: Path, timeout: float) -> FlowResult:
    """The flow without faults; it must come out clean, or no failure can be told from it."""
    context = FlowContext(images, out / "enumerate", FaultPlan(), timeout)
    log.info("enumerating the call sites of flow %r (logs: %s)", flow.name, context.run_dir)
    result = flow.run(context)
    problems = [*([result.error] if result.error else []), *([] if result.usable else ["the guest stopped answering"]),
                *result.leaks, *result.inconsistencies]
    if problems:
        raise SweepError(f"the flow {flow.name!r} is not clean without faults, so no run can be classified: "
                         f"{'; '.join(problems)} (logs: {context.run_dir})")
    if not result.trace:
        raise SweepError(f"the flow {flow.name!r} made no SEAMCALL (logs: {context.run_dir})")
    return result


def run_one(flow: Flow, run: Run, images: Images, out: Path, timeout: float,
            declarations: list[declared_outcomes.Declaration]) -> RunResult:
    directory = out / "runs" / run.name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SWEEP_RUN_SPEC).write_text(json.dumps(report.run_spec(flow.name, run), indent=2) + "\n")
    started = time.monotonic()
    try:
        result = flow.run(FlowContext(images, directory, FaultPlan([run.rule()]), timeout))
    except Exception as err:  # a harness failure in one run must not end the sweep
        log.exception("run %s failed in the harness", run.name)
        result = FlowResult((), (), usable=False, error=f"{type(err).__name__}: {err}")
    verdict = classify(evidence_of(run, result, flow.reported_by))
    declaration = declared_outcomes.declared_for(declarations, flow.name, run)
    outcome = RunResult(run, verdict, declaration, time.monotonic() - started, directory)
    if outcome.undeclared_finding:
        bundle = write_bundle(directory / "repro.tar.gz", f"{SWEEP_PREFIX}{flow.name}:{run.name}",
                              "\n".join((f"E   {verdict.outcome.value}: {verdict.reasons[0]}", *verdict.lines)),
                              images.kernel, images.initrd, images.identity, directory, symbol_files(images))
        outcome = replace(outcome, bundle=bundle)
    return outcome


def symbol_files(images: Images) -> list[Path]:
    """What a replay needs to name call sites as this run did: the vmlinux and kvm-intel.ko."""
    vmlinux = vmlinux_for(images.kernel)
    if vmlinux is None or vmlinux == images.kernel:
        return []
    modules = {*vmlinux.parent.glob("arch/x86/kvm/*.ko"), *vmlinux.parent.glob("*.ko")}  # a build tree, a bundle
    return [vmlinux, *sorted(modules)]


def sweep(flow: Flow, images: Images, out: Path, choice: SiteChoice = SiteChoice.FIRST,
          classes: frozenset[str] | None = None, jobs: int = 1, timeout: float = 120.0,
          declarations: list[declared_outcomes.Declaration] | None = None,
          progress: Callable[[str], None] = print) -> SweepResult:
    started = time.monotonic()
    if out.exists():
        shutil.rmtree(out / "runs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    declarations = declared_outcomes.load() if declarations is None else declarations
    reference = enumerate_flow(flow, images, out, timeout)
    enumerated = time.monotonic() - started
    targets = [t for t in all_targets(reference.trace) if t.seq >= reference.window]
    chosen = choose(targets, choice)
    runs, unswept = plan_runs(chosen, classes)
    result = SweepResult(flow.name, choice, len({t.site for t in targets}), len(chosen), unswept,
                         enumerate_seconds=enumerated, planned=len(runs))
    progress(f"sweep {flow.name}: {len(reference.trace)} calls from {result.sites} sites; {len(chosen)} chosen "
             f"({choice.value}), {len(runs)} runs with {jobs} at a time"
             + (f"; not swept (no status table): {', '.join(unswept)}" if unswept else ""))
    lock = threading.Lock()
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="sweep") as pool:
            futures = [pool.submit(run_one, flow, run, images, out, timeout, declarations)
                       for run in runs]
            try:
                for future in as_completed(futures):
                    done = future.result()
                    with lock:
                        result.runs.append(done)
                        progress(report.progress_line(len(result.runs), len(runs), done))
            except KeyboardInterrupt:
                for future in futures:
                    future.cancel()
                result.complete = False
                raise
    finally:
        result.runs.sort(key=lambda r: r.run.index)
        result.complete = result.complete and len(result.runs) == len(runs)
        result.seconds = time.monotonic() - started
        report.write(result, out)
    return result


def outcome_of_replay(flow: Flow, spec: Path, images: Images, out: Path, timeout: float) -> RunResult:
    """One run again from its run.json (tdxh repro of a sweep bundle, tdxh sweep --replay)."""
    run = report.load_run_spec(spec, flow.name)
    return run_one(flow, run, images, out, timeout, declared_outcomes.load())
