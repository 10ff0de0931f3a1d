"""Merging the counters of DIR/raw with gcov and gcovr, and reading the result.

gcovr (running the gcov of the GCC that built the kernel) makes one JSON tracefile per scenario
from all its kernels' counters (each beside a link to its object's .gcno), then merges the
scenarios into the summary, the lcov tracefile and the HTML. Per-scenario attribution comes from
the scenarios' tracefiles: a line is reached by a scenario when its count there is non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.coverage.collect import EVENTS_FILE
from harness.coverage.objects import PROFILED, CoverageBuild, noinstr_functions

log = logging.getLogger("harness.coverage")

SUMMARY = "coverage-summary.json"
MERGED = "coverage.json"
LCOV = "coverage.lcov"
HTML = "html/index.html"
BY_SCENARIO_DIR = "by-scenario"
LINES_BY_SCENARIO = "lines-by-scenario.json"
BLIND_SPOTS = "blind-spots.json"
GCOVR_TIMEOUT = 600.0
TOTAL = "TOTAL"  # the summary's own figures, as the last row of a table
KERNEL_SOURCES = tuple(source for sources in PROFILED.values() for source in sources)


class ReportError(Exception):
    """gcovr failed or DIR holds nothing to report; the message says what and where."""


def _gcovr(args: Sequence[str], cwd: Path, log_path: Path) -> None:
    command = [_gcovr_binary(), *args]
    log.info("$ cd %s && %s", cwd, shlex.join(command))
    with open(log_path, "a") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        try:
            result = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=GCOVR_TIMEOUT,
                                    check=False)
        except subprocess.TimeoutExpired:
            raise ReportError(f"gcovr took over {GCOVR_TIMEOUT:.0f} s (log: {log_path})") from None
    if result.returncode:
        raise ReportError(f"gcovr exited with {result.returncode}: {shlex.join(command)} (log: {log_path})")


def _gcovr_binary() -> str:
    """gcovr of this interpreter's environment (a dependency of the harness), else PATH's."""
    here = Path(sys.executable).parent / "gcovr"
    found = str(here) if here.exists() else shutil.which("gcovr")
    if not found:
        raise ReportError("gcovr is not installed: pip install gcovr (the harness declares it)")
    return found


def _filters(root: Path, sources: Sequence[str]) -> list[str]:
    return [arg for source in sources for arg in ("--filter", str(root / source))]


def scenarios(directory: Path) -> list[Path]:
    """The scenario directories under DIR/raw that hold counters."""
    raw = directory / "raw"
    return sorted(p for p in raw.iterdir() if p.is_dir() and any(p.rglob("*.gcda"))) if raw.is_dir() else []


def scenario_tracefile(raw: Path, build: CoverageBuild, out: Path, sources: Sequence[str]) -> Path:
    """gcovr JSON of one scenario: every kernel snapshot's .gcda beside a link to its .gcno, in a
    scratch tree gcovr searches (it merges several .gcda of one object by itself). Reused while
    newer than the scenario's counters."""
    newest = max(p.stat().st_mtime for p in raw.rglob("*") if p.is_file())
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tdxh-gcov-") as scratch:
        counted = set()
        for gcda in raw.rglob("*.gcda"):
            snapshot = gcda.relative_to(raw)
            kernel_dir = Path(*snapshot.parts[:2])  # <machine>/k<N>
            obj = Path(*snapshot.parts[2:])
            note = build.build_dir / obj.with_suffix(".gcno")
            if not note.is_file():
                raise ReportError(f"{gcda}: its notes {note} are gone (rebuilt or removed build?)")
            target = Path(scratch) / kernel_dir / obj
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(gcda, target)
            target.with_suffix(".gcno").symlink_to(note)
            counted.add(str(obj.with_suffix(".o")))
        # A profiled object none of the scenario's kernels ran (kvm-intel.ko never loaded): its
        # notes alone, so that its files are in the report at 0%, not missing.
        for name, note in build.notes().items():
            if name not in counted:
                link = Path(scratch) / "no-counters" / Path(name).with_suffix(".gcno")
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(note)
        # gcov runs where the compiler ran (the build directory): the notes name the sources
        # relative to it.
        _gcovr(["--root", str(build.source_tree), *_filters(build.source_tree, sources), "--json", str(out),
                "--object-directory", str(build.build_dir), "-j", str(os.cpu_count() or 1), scratch],
               build.build_dir, out.with_suffix(".log"))
    return out


def write_report(directory: Path, sources: Sequence[str] = KERNEL_SOURCES) -> Path:
    """Merge DIR/raw into the report files of DIR (see harness/coverage/__init__.py); the summary's
    path."""
    build = CoverageBuild.load(directory)
    found = scenarios(directory)
    if not found:
        raise ReportError(f"{directory / 'raw'} holds no counters: did the scenarios run with --coverage?")
    by_scenario = directory / BY_SCENARIO_DIR
    log.info("coverage: gcov + gcovr over %d scenario(s) in %s", len(found), directory)
    # One gcovr at a time: gcc 12's gcov writes its .gcov files into the build directory, where
    # two runs would take each other's.
    tracefiles = [scenario_tracefile(raw, build, by_scenario / f"{raw.name}.json", sources) for raw in found]
    (directory / "html").mkdir(exist_ok=True)
    add = [arg for tracefile in tracefiles for arg in ("--add-tracefile", str(tracefile))]
    _gcovr(["--root", str(build.source_tree), *add, "--json-summary", str(directory / SUMMARY), "--json-summary-pretty",
            "--json", str(directory / MERGED), "--lcov", str(directory / LCOV),
            "--html-details", str(directory / HTML), "--html-title", "TDX host code coverage"],
           build.build_dir, directory / "gcovr.log")
    labels = {raw.name: scenario_label(raw) for raw in found}
    _write_json(directory / LINES_BY_SCENARIO, lines_by_scenario({labels[t.stem]: t for t in tracefiles}))
    _write_json(directory / BLIND_SPOTS, blind_spots(directory, build, sources))
    return directory / SUMMARY


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def scenario_label(raw: Path) -> str:
    """A scenario's name in the report (its pytest node id), from its events.json."""
    try:
        return str(json.loads((raw / EVENTS_FILE).read_text())["scenario"])
    except (OSError, ValueError, KeyError):
        return raw.name


def lines_by_scenario(tracefiles: dict[str, Path]) -> dict[str, dict[str, list[str]]]:
    """{file: {line: [scenarios whose count there is non-zero]}} from the scenarios' gcovr JSON
    ({scenario: its tracefile})."""
    reached: dict[str, dict[str, list[str]]] = {}
    for scenario, tracefile in sorted(tracefiles.items()):
        for entry in read_tracefile(tracefile):
            lines = reached.setdefault(entry["file"], {})
            for line in entry["lines"]:
                if line["count"]:
                    lines.setdefault(str(line["line_number"]), []).append(scenario)
    return reached


def blind_spots(directory: Path, build: CoverageBuild, sources: Sequence[str]) -> dict[str, Any]:
    """What the counters cannot show: functions compiled without counters (noinstr), profiled
    objects this kernel did not build, and code that ran after a kernel's last snapshot (its
    shutdown, kexec or crash path) or in a kernel whose counters were lost."""
    noinstr = {}
    for source in sources:
        path = build.source_tree / source
        if path.is_file():
            found = noinstr_functions(path.read_text(errors="replace"))
            if found:
                noinstr[source] = found
    kernels = []
    for events in sorted((directory / "raw").glob(f"*/{EVENTS_FILE}")):
        data = json.loads(events.read_text())
        for machine in data["machines"]:
            for kernel in machine["kernels"]:
                for what in kernel["blind"]:
                    kernels.append({"scenario": data["scenario"], "machine": machine["name"],
                                    "kernel": kernel["kernel"], "ended_by": kernel["ended_by"], "lost": what})
    notes = build.notes()
    not_built = [obj for obj, profiled in PROFILED.items() if set(profiled) & set(sources)
                 and obj not in notes]
    return {"noinstr": noinstr, "not_built": not_built, "kernels": kernels}


# Reading the results: the table `tdxh coverage` prints, the comparison with an older summary.

@dataclass(frozen=True)
class FileFigures:
    file: str
    lines: tuple[int, int]  # covered, total
    branches: tuple[int, int]
    functions: tuple[int, int]

    @staticmethod
    def percent(pair: tuple[int, int]) -> float:
        return 100.0 * pair[0] / pair[1] if pair[1] else 0.0


def read_summary(path: Path) -> list[FileFigures]:
    """The per-file figures of a gcovr --json-summary file, plus a TOTAL row last."""
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ReportError(f"cannot read {path}: {err.strerror}") from err
    except ValueError as err:
        raise ReportError(f"{path} is not gcovr JSON: {err}") from err
    rows = [*data["files"], {**data, "filename": TOTAL}]
    return [FileFigures(row["filename"], (row["line_covered"], row["line_total"]),
                        (row["branch_covered"], row["branch_total"]),
                        (row["function_covered"], row["function_total"])) for row in rows]


def format_table(rows: Sequence[FileFigures]) -> str:
    width = max(len(row.file) for row in rows)

    def cell(pair: tuple[int, int]) -> str:
        return f"{pair[0]:>5}/{pair[1]:<5} {FileFigures.percent(pair):5.1f}%"

    header = f"{'file':<{width}}  {'lines':>18}  {'branches':>18}  {'functions':>18}"
    body = [f"{row.file:<{width}}  {cell(row.lines)}  {cell(row.branches)}  {cell(row.functions)}" for row in rows]
    return "\n".join([header, *body])


@dataclass(frozen=True)
class Delta:
    file: str
    lines: float  # percentage points, new - old
    branches: float
    status: str  # "changed", "new" (not in the old summary), "gone" (only in the old one)


def compare(new: Sequence[FileFigures], old: Sequence[FileFigures]) -> list[Delta]:
    """Per-file deltas in percentage points, the largest drop first (new and gone files among
    them: new ones count as a rise, gone ones as a drop to 0); the TOTAL row last."""
    before = {row.file: row for row in old}
    after = {row.file: row for row in new}
    deltas = []
    for name, row in after.items():
        was = before.get(name)
        if was is None:
            deltas.append(Delta(name, FileFigures.percent(row.lines), FileFigures.percent(row.branches), "new"))
        else:
            deltas.append(Delta(name, FileFigures.percent(row.lines) - FileFigures.percent(was.lines),
                                FileFigures.percent(row.branches) - FileFigures.percent(was.branches), "changed"))
    deltas += [Delta(name, -FileFigures.percent(row.lines), -FileFigures.percent(row.branches), "gone")
               for name, row in before.items() if name not in after]
    total = [d for d in deltas if d.file == TOTAL]
    return sorted((d for d in deltas if d.file != TOTAL), key=lambda d: (min(d.lines, d.branches), d.file)) + total


def format_deltas(deltas: Sequence[Delta]) -> str:
    width = max((len(d.file) for d in deltas), default=4)
    lines = [f"{'file':<{width}}  {'lines':>8}  {'branches':>8}"]
    lines += [f"{d.file:<{width}}  {d.lines:+7.1f}%  {d.branches:+7.1f}%" + (f"  ({d.status})" if d.status != "changed"
                                                                              else "") for d in deltas]
    return "\n".join(lines)


def comparison_text(rows: Sequence[FileFigures], old_summary: Path) -> str:
    """The per-file changes against an older summary, as the commands and the nightly print them."""
    deltas = compare(rows, read_summary(old_summary))
    return f"change against {old_summary} (percentage points, drops first):\n{format_deltas(deltas)}"


def summary_text(directory: Path, compare_with: Path | None = None) -> str:
    """DIR's per-file table, then its changes against an older summary when one is given."""
    rows = read_summary(directory / SUMMARY)
    text = format_table(rows)
    if compare_with is not None:
        text += "\n\n" + comparison_text(rows, compare_with)
    return text


def unreached_functions(merged: Path, top: int) -> dict[str, list[tuple[str, int]]]:
    """Per file, the ``top`` largest functions no scenario entered: (name, lines with code)."""
    result = {}
    for entry in read_tracefile(merged):
        sizes: dict[str, int] = {}
        for line in entry["lines"]:
            if line.get("function_name"):
                sizes[line["function_name"]] = sizes.get(line["function_name"], 0) + 1
        cold = [(f["name"], sizes.get(f["name"], 0)) for f in entry["functions"] if not f["execution_count"]]
        result[entry["file"]] = sorted(cold, key=lambda item: (-item[1], item[0]))[:top]
    return result


def format_blind_spots(spots: dict[str, Any]) -> str:
    """blind-spots.json as text: every entry, grouped by what was lost."""
    lines = ["blind spots (code the counters cannot show):"]
    for source, functions in sorted(spots.get("noinstr", {}).items()):
        lines.append(f"  {source}: noinstr, compiled without counters: {', '.join(functions)}")
    for obj in spots.get("not_built", []):
        lines.append(f"  {obj}: not built by this kernel's config: no counters at all")
    groups: dict[str, list[str]] = {}
    for entry in spots.get("kernels", []):
        groups.setdefault(entry["lost"], []).append(f"{entry['scenario']} ({entry['machine']} k{entry['kernel']})")
    for lost, where in sorted(groups.items(), key=lambda item: -len(item[1])):
        lines.append(f"  {lost}: {len(where)} kernel(s): {', '.join(where)}")
    return "\n".join(lines)


def read_tracefile(path: Path) -> list[dict[str, Any]]:
    """The file entries of a gcovr JSON tracefile (coverage.json, by-scenario/*.json)."""
    try:
        return list(json.loads(path.read_text())["files"])
    except OSError as err:
        raise ReportError(f"cannot read {path}: {err.strerror}") from err
    except (ValueError, KeyError) as err:
        raise ReportError(f"{path} is not a gcovr JSON tracefile: {err}") from err
