"""The PAMT model against cases derived by hand from Linux's rules (arithmetic in the test)."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.observe import pamt

G, M, K = 1 << 30, 1 << 20, 1 << 10
ENTRY = 16


def pamt_for(tdmr_size: int) -> int:
    """One TDMR's PAMT: per page size, entries x 16 bytes rounded up to 4 KiB."""
    def round4k(n: int) -> int:
        return (n + 4095) // 4096 * 4096
    return sum(round4k(tdmr_size // page * ENTRY) for page in (4 * K, 2 * M, G))


def test_2g_q35():
    # usable [0, 0x9fc00) and [1M, 0x7ffdf000): the first range lies below 1M and is dropped;
    # the second becomes one TDMR [0, 2G).
    result = pamt.model([(0, 0x9FC00), (M, 0x7FFDF000)])
    assert [(t.base, t.size) for t in result.tdmrs] == [(0, 2 * G)]
    # 2G/4K*16 = 8 MiB; 2G/2M*16 = 16 KiB; 2G/1G*16 = 32 B -> 4 KiB.
    assert result.pamt_kb == (8 * M + 16 * K + 4 * K) // K == pamt_for(2 * G) // K


def test_4g_q35_two_tdmrs():
    # Below-4G RAM ends at 2G, the rest is at [4G, 6G): two TDMRs, the second starting at 4G.
    result = pamt.model([(M, 0x7FFDF000), (4 * G, 6 * G)])
    assert [(t.base, t.size) for t in result.tdmrs] == [(0, 2 * G), (4 * G, 2 * G)]
    assert result.pamt_kb == 2 * pamt_for(2 * G) // K


def test_region_ending_inside_previous_tdmr_is_skipped():
    # Two regions in the same GiB: the second is already covered by the first TDMR.
    result = pamt.model([(M, 256 * M), (512 * M, 768 * M)])
    assert [(t.base, t.size) for t in result.tdmrs] == [(0, G)]


def test_region_crossing_the_previous_tdmr_end_continues_from_it():
    # [1M, 1.5G) makes TDMR [0, 2G); [1.75G, 3.5G) is then covered from 2G: TDMR [2G, 4G).
    result = pamt.model([(M, G + 512 * M), (G + 768 * M, 3 * G + 512 * M)])
    assert [(t.base, t.size) for t in result.tdmrs] == [(0, 2 * G), (2 * G, 2 * G)]


def test_numa_boundary_splits_regions_not_tdmrs_when_inside_one_gib():
    # A node boundary at 1.5G splits [1M, 2G) into two memblocks; fill_out_tdmrs() then skips
    # the second one because TDMR [0, 2G) already covers it.
    result = pamt.model([(M, 2 * G)], numa_boundaries=[G + 512 * M])
    assert [(r.start, r.end, r.nid) for r in result.regions] == [(M, G + 512 * M, 0), (G + 512 * M, 2 * G, 1)]
    assert [(t.base, t.size) for t in result.tdmrs] == [(0, 2 * G)]


def test_unaligned_e820_ranges_are_trimmed_to_pages():
    result = pamt.model([(M + 100, 64 * M + 5)])
    assert [(r.start, r.end) for r in result.regions] == [(M + 4096, 64 * M)]


def test_entry_sizes_scale_the_pamt():
    result = pamt.model([(M, 2 * G)], entry_sizes=(32, 16, 16))
    assert result.pamt_kb == (16 * M + 16 * K + 4 * K) // K


# As Linux 7.3 prints the map: "System RAM", gap lines; older kernels said "usable".
E820_TEXT = """\
[    0.000000] BIOS-provided physical RAM map:
[    0.000000] BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff]  System RAM
[    0.000000] BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff]  device reserved
[    0.000000] BIOS-e820: [gap 0x00000000000a0000-0x00000000000effff]
[    0.000000] BIOS-e820: [mem 0x0000000000100000-0x000000007ffdefff]  System RAM
[    0.000000] BIOS-e820: [mem 0x0000000100000000-0x000000017fffffff] usable
[    0.000000] e820: update [mem 0x00000000-0x00000fff] usable ==> reserved
"""


def test_parse_e820_keeps_usable_with_exclusive_ends():
    assert pamt.parse_e820(E820_TEXT) == [(0, 0x9FC00), (M, 0x7FFDF000), (4 * G, 6 * G)]


def test_user_map_replaces_bios_map():
    text = E820_TEXT + "[    0.000000] user: [mem 0x0000000000100000-0x000000003fffffff] usable\n"
    assert pamt.parse_e820(text) == [(M, G)]


def test_cli_prints_model_json(tmp_path, capsys):
    path = tmp_path / "e820.txt"
    path.write_text(E820_TEXT)
    assert main(["pamt-model", "--e820", str(path), "--numa-boundary", str(4 * G)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"tdmrs": [[0, 2 * G], [4 * G, 2 * G]], "pamt_kb": 2 * pamt_for(2 * G) // K}


@pytest.mark.parametrize("text,needle", [
    ("nothing here\n", "no RAM in the e820 map"),
    ("BIOS-e820: [mem 0x100000-] usable\n", "line 1: cannot parse"),
    ("BIOS-e820: [mem 0x0000000000000000-0x00000000000fffff] usable\n", "no memory above 1 MiB"),
])
def test_cli_bad_input_exits_2_naming_the_problem(tmp_path, capsys, text, needle):
    path = tmp_path / "e820.txt"
    path.write_text(text)
    assert main(["pamt-model", "--e820", str(path)]) == 2
    assert needle in capsys.readouterr().err


def test_cli_rejects_bad_address():
    with pytest.raises(SystemExit) as exc:
        main(["pamt-model", "--e820", "x", "--numa-boundary", "zz"])
    assert exc.value.code == 2


def test_numa_boundaries_from_srat_lines():
    # As Linux 7.3 printed them for QEMU with nodes of 1G and 3G.
    text = """\
[    0.051077] ACPI: SRAT: Node 0 PXM 0 [mem 0x00000000-0x0009ffff]
[    0.051202] ACPI: SRAT: Node 0 PXM 0 [mem 0x00100000-0x3fffffff]
[    0.051224] ACPI: SRAT: Node 1 PXM 1 [mem 0x40000000-0x7fffffff]
[    0.051241] ACPI: SRAT: Node 1 PXM 1 [mem 0x100000000-0x17fffffff]
"""
    assert pamt.parse_numa_boundaries(text) == [G]
    assert pamt.parse_numa_boundaries("no numa here") == []
