"""Declared outcomes: what the kernel is known to do when a call fails, with its reason, so a
sweep tells known behaviour from findings. The file (declared.toml beside this module, or one
given with --declared) holds entries

    [[outcome]]
    flow = "boot"
    leaf = "TDH.SYS.LP.INIT"
    function = "tdx_cpu_enable"        # optional: the site's C function
    status = "TDX_SEAMCALL_VMFAILINVALID"  # optional: a status name, or
    class = "vmfailinvalid"             # optional: a status class (harness/sweep/statuses.py)
    outcome = "silent"
    reason = "..."                      # why the kernel does this (the source it comes from)

The first entry that matches a run declares its outcome.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from harness.sweep.outcome import Outcome
from harness.sweep.plan import Run

DECLARED = Path(__file__).with_name("declared.toml")
_KEYS = {"flow", "leaf", "function", "status", "class", "outcome", "reason"}


class DeclaredError(ValueError):
    """The declared-outcomes file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Declaration:
    flow: str
    leaf: str
    outcome: Outcome
    reason: str
    function: str | None = None
    status: str | None = None
    klass: str | None = None

    def matches(self, flow: str, run: Run) -> bool:
        return (self.flow == flow and self.leaf == run.target.leaf_name
                and self.function in (None, run.target.function)
                and self.status in (None, run.injection.name)
                and self.klass in (None, run.injection.klass.value))


def load(path: Path = DECLARED) -> list[Declaration]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise DeclaredError(f"{path}: cannot read: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise DeclaredError(f"{path}: not TOML: {err}") from err
    declarations = []
    for number, entry in enumerate(data.get("outcome", []), 1):
        where = f"{path}: [[outcome]] {number}"
        unknown = set(entry) - _KEYS
        missing = {"flow", "leaf", "outcome", "reason"} - set(entry)
        if unknown or missing:
            raise DeclaredError(f"{where}: " + "; ".join(
                part for part in (f"unknown keys {sorted(unknown)}" if unknown else "",
                                  f"missing {sorted(missing)}" if missing else "") if part))
        try:
            outcome = Outcome(entry["outcome"])
        except ValueError:
            raise DeclaredError(f"{where}: outcome {entry['outcome']!r} is not one of "
                                f"{', '.join(o.value for o in Outcome)}") from None
        declarations.append(Declaration(entry["flow"], entry["leaf"], outcome, entry["reason"],
                                        entry.get("function"), entry.get("status"), entry.get("class")))
    return declarations


def declared_for(declarations: list[Declaration], flow: str, run: Run) -> Declaration | None:
    return next((d for d in declarations if d.matches(flow, run)), None)
