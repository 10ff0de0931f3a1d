"""The boot CPU as the guest kernel sees it, from /proc/cpuinfo: vendor, family and model (what
Linux's model checks and quirks key on), feature flags (synthetic ones included, such as
"tdx_host_platform") and bugs (such as "tdx_pw_mce")."""

from __future__ import annotations

from dataclasses import dataclass


class CpuinfoError(ValueError):
    """/proc/cpuinfo lacks a field the harness needs."""


@dataclass(frozen=True)
class CpuInfo:
    vendor: str
    family: int
    model: int
    flags: frozenset[str]
    bugs: frozenset[str]


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's entry (the boot CPU; Linux keeps these fields uniform)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # end of the first processor's block
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    try:
        return CpuInfo(vendor=fields["vendor_id"], family=int(fields["cpu family"]), model=int(fields["model"]),
                       flags=frozenset(fields.get("flags", "").split()),
                       bugs=frozenset(fields.get("bugs", "").split()))
    except KeyError as err:
        raise CpuinfoError(f"/proc/cpuinfo has no {err.args[0]!r} field; first lines: "
                           f"{text.splitlines()[:5]}") from None
    except ValueError as err:
        raise CpuinfoError(f"/proc/cpuinfo: {err}") from None
