"""A sweep's outputs: each run's run.json (what --replay re-runs), the progress lines, and at the
end sweep.json and sweep.html (sites x statuses, a colour per outcome, each cell a link to the
run's logs; each finding with its kernel lines and its reproducer bundle)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.sweep.outcome import Outcome
from harness.sweep.plan import Run, Target
from harness.sweep.statuses import Injection, StatusClass

if TYPE_CHECKING:
    from harness.sweep.runner import RunResult, SweepResult

RESULT = "sweep.json"
HTML = "sweep.html"
COLOURS = {Outcome.PANIC: "#b00020", Outcome.HANG: "#6a1b9a", Outcome.OOPS: "#d84315", Outcome.WARN: "#f9a825",
           Outcome.LEAK: "#00838f", Outcome.INCONSISTENT: "#ad1457", Outcome.SILENT: "#5d4037",
           Outcome.CLEAN: "#2e7d32", Outcome.MISSED: "#9e9e9e", Outcome.ERROR: "#424242"}


class SpecError(ValueError):
    """A run.json this harness cannot replay; the message names the file."""


def run_spec(flow: str, run: Run) -> dict[str, Any]:
    t, i = run.target, run.injection
    return {"flow": flow, "run": run.index, "site": t.site, "occurrence": t.occurrence, "of": t.of, "leaf": t.leaf,
            "nth": t.nth, "seq": t.seq, "class": i.klass.value, "status": i.status, "source": i.source}


def load_run_spec(path: Path, flow: str) -> Run:
    try:
        data = json.loads(path.read_text())
        if data["flow"] != flow:
            raise SpecError(f"{path}: a run of flow {data['flow']!r}, not {flow!r}")
        target = Target(data["site"], data["occurrence"], data["of"], data["leaf"], data["nth"], data["seq"])
        injection = Injection(StatusClass(data["class"]), data["status"], data["source"])
        return Run(data["run"], target, injection)
    except OSError as err:
        raise SpecError(f"{path}: cannot read: {err.strerror}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise SpecError(f"{path}: not a sweep run spec: {err!r}") from err


def describe(run: Run) -> str:
    t = run.target
    return f"{t.leaf_name} #{t.occurrence}/{t.of} at {t.site} -> {run.injection.name}"


def progress_line(done: int, total: int, result: RunResult) -> str:
    verdict = result.verdict
    mark = " (declared)" if result.declared is not None and result.declared.outcome is verdict.outcome else ""
    mark = " FINDING" if result.undeclared_finding else mark
    reason = f": {verdict.reasons[0]}" if verdict.reasons and verdict.outcome is not Outcome.CLEAN else ""
    return f"[{done}/{total}] {describe(result.run)}: {verdict.outcome.value}{mark}{reason} ({result.seconds:.0f}s)"


def to_json(result: SweepResult, out: Path) -> dict[str, Any]:
    return {
        "flow": result.flow, "sites": result.choice.value, "call_sites": result.sites, "targets": result.targets,
        "planned": result.planned, "complete": result.complete, "not_swept": result.unswept,
        "seconds": round(result.seconds, 1), "enumerate_seconds": round(result.enumerate_seconds, 1),
        "counts": dict(sorted(result.counts().items())), "undeclared_findings": len(result.undeclared),
        "runs": [_run_json(r, out) for r in result.runs],
    }


def _run_json(r: RunResult, out: Path) -> dict[str, Any]:
    t, i = r.run.target, r.run.injection
    return {"run": r.run.name, "site": t.site, "occurrence": t.occurrence, "of": t.of, "leaf": t.leaf_name,
            "nth": t.nth, "class": i.klass.value, "status": i.name, "status_code": f"{i.status:#018x}",
            "source": i.source, "outcome": r.verdict.outcome.value, "finding": r.verdict.finding,
            "declared": r.declared is not None and r.declared.outcome is r.verdict.outcome,
            "declared_reason": r.declared.reason if r.declared else None, "reasons": list(r.verdict.reasons),
            "kernel_lines": list(r.verdict.lines), "seconds": round(r.seconds, 1),
            "logs": str(r.directory.relative_to(out)),
            "bundle": str(r.bundle.relative_to(out)) if r.bundle else None}


def write(result: SweepResult, out: Path) -> None:
    data = to_json(result, out)
    (out / RESULT).write_text(json.dumps(data, indent=2) + "\n")
    (out / HTML).write_text(render_html(data))


def render_html(data: dict[str, Any]) -> str:
    runs = data["runs"]
    sites = list(dict.fromkeys((r["leaf"], r["site"], r["occurrence"], r["of"]) for r in runs))
    statuses = list(dict.fromkeys((r["class"], r["status"]) for r in runs))
    cells = {((r["leaf"], r["site"], r["occurrence"], r["of"]), (r["class"], r["status"])): r for r in runs}
    esc = html.escape
    head = "".join(f"<th title='{esc(s)}'>{esc(c)}<br><small>{esc(s)}</small></th>" for c, s in statuses)
    rows = []
    for site in sites:
        leaf, where, occurrence, of = site
        tds = []
        for status in statuses:
            r = cells.get((site, status))
            if r is None:
                tds.append("<td></td>")
                continue
            colour = COLOURS[Outcome(r["outcome"])]
            mark = "" if not r["finding"] else (" *" if not r["declared"] else " (d)")
            title = esc("; ".join(r["reasons"]))
            tds.append(f"<td style='background:{colour}'><a href='{esc(r['logs'])}/' title='{title}'>"
                       f"{esc(r['outcome'])}{mark}</a></td>")
        rows.append(f"<tr><th>{esc(leaf)}</th><td><code>{esc(where)}</code> #{occurrence}/{of}</td>{''.join(tds)}</tr>")
    findings = [r for r in runs if r["finding"]]
    items = []
    for r in findings:
        bundle = (f" <a href='{esc(r['bundle'])}'>bundle</a> (<code>tdxh repro {esc(r['bundle'])}</code>)"
                  if r["bundle"] else "")
        declared = f"<br>declared: {esc(r['declared_reason'])}" if r["declared"] else "<br><b>not declared</b>"
        lines = esc("\n".join(r["kernel_lines"]))
        items.append(f"<li><b>{esc(r['outcome'])}</b>: {esc(r['leaf'])} #{r['occurrence']} at "
                     f"<code>{esc(r['site'])}</code> -> {esc(r['status'])} "
                     f"(<a href='{esc(r['logs'])}/'>logs</a>){bundle}<br>"
                     f"{esc('; '.join(r['reasons']))}{declared}<pre>{lines}</pre></li>")
    legend = " ".join(f"<span style='background:{c};color:white;padding:2px 6px'>{o.value}</span>"
                      for o, c in COLOURS.items())
    counts = ", ".join(f"{k}: {v}" for k, v in data["counts"].items())
    incomplete = "" if data["complete"] else (f"<p><b>Incomplete: {len(runs)} of {data['planned']} planned runs "
                                              f"ran.</b></p>")
    unswept = f"<p>Not swept (no status table): {esc(', '.join(data['not_swept']))}</p>" if data["not_swept"] else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>tdxh sweep {esc(data['flow'])}</title>
<style>body{{font-family:sans-serif}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 6px;
font-size:12px}} td a{{color:white;text-decoration:none}} pre{{background:#f4f4f4;padding:6px;font-size:11px}}</style>
</head><body><h1>tdxh sweep {esc(data['flow'])}</h1>
<p>{data['call_sites']} call sites, {data['targets']} calls chosen ({esc(data['sites'])}), {len(runs)} runs in
{data['seconds']:.0f} s (enumeration {data['enumerate_seconds']:.0f} s). {esc(counts)}.
Undeclared findings: {data['undeclared_findings']}.</p>{incomplete}{unswept}<p>{legend} &nbsp; * finding not declared,
(d) declared</p>
<table><tr><th>leaf</th><th>site</th>{head}</tr>{''.join(rows)}</table>
<h2>Findings ({len(findings)})</h2><ul>{''.join(items) or '<li>none</li>'}</ul></body></html>
"""
