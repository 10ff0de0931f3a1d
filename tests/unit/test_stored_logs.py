"""Observers on logs stored from real runs (tests/data): no VM needed."""

from __future__ import annotations

import errno
from pathlib import Path

from harness.observe import pamt, patterns
from harness.observe.dmesg import Timeline, read_kmsg
from harness.seam.abi import Leaf, Status, leaf_name
from harness.seam.trace import read_trace

DATA = Path(__file__).parent.parent / "data"


def test_sysconfig_refused_when_lps_are_missing():
    log = Timeline.from_console((DATA / "sysconfig-lps-missing.console.log").read_text().splitlines())
    first_boot = Timeline([r for r in log.records if r.boot == 0])
    found = first_boot.expect_in_order([patterns.BIOS_ENABLED, patterns.MODULE_VERSION, patterns.SEAMCALL_FAILED,
                                        patterns.INIT_FAILED])
    failed = patterns.SEAMCALL_FAILED.search(found[2].text)
    assert int(failed["fn"], 16) == Leaf.TDH_SYS_CONFIG
    assert int(failed["status"], 16) == Status.TDX_SYS_CONFIG_NOT_PENDING
    # sc_retry_prerr() maps a module error to -EIO.
    assert int(patterns.INIT_FAILED.search(found[3].text)["errno"]) == -errno.EIO
    first_boot.expect_absent(patterns.PAMT_ALLOCATED)

    trace = read_trace(DATA / "sysconfig-lps-missing.seamcalls.jsonl")
    config = [r for r in trace if r.number == Leaf.TDH_SYS_CONFIG]
    assert len(config) == 1 and config[0].status == Status.TDX_SYS_CONFIG_NOT_PENDING
    assert config[0].note == "2 of 4 LPs initialized"
    assert [r.leaf for r in trace if r.number == Leaf.TDH_SYS_LP_INIT] == [leaf_name(Leaf.TDH_SYS_LP_INIT)] * 2


def test_model_from_a_real_e820_map():
    text = (DATA / "sysconfig-lps-missing.console.log").read_text()
    usable = pamt.parse_e820(text)
    # QEMU q35, 2 GiB: RAM below 640K and from 1 MiB to just under 2 GiB.
    assert usable == [(0, 0x9FC00), (0x100000, 0x7FFE0000)]
    result = pamt.model(usable)
    assert [(t.base, t.size) for t in result.tdmrs] == [(0, 2 << 30)]


def test_kmsg_records_of_a_real_boot():
    lines = (DATA / "kmsg-first-boot.txt").read_text().splitlines()
    log = Timeline.from_kmsg(lines)
    # One record per line that is not a dictionary continuation (" KEY=value").
    assert len(log.records) == sum(1 for line in lines if line and not line.startswith(" "))
    assert [r.seq for r in log.records] == list(range(len(log.records)))  # nothing lost since boot
    assert {r.boot for r in log.records} == {0}
    # Timestamps are the printk clock, which steps back once early in this boot (record 110):
    # records are ordered by sequence number, never by time.
    found = log.expect_in_order([patterns.BIOS_ENABLED, patterns.S3_DISABLED, patterns.MODULE_VERSION,
                                 patterns.PAMT_ALLOCATED, patterns.INITIALIZED])
    assert {r.level for r in found} == {6}  # pr_info: KERN_INFO
    assert all(r.level is not None and 0 <= r.level <= 7 for r in log.records)


def test_kmsg_parsing_unescapes_and_counts_boots():
    records = Timeline.from_kmsg(["4,7,1000,-;tab\\x09here", " SUBSYSTEM=x", "garbage", "6,0,5,-;new kernel"]).records
    assert [(r.seq, r.level, r.text, r.boot) for r in records] == [(7, 4, "tab\there", 0), (0, 6, "new kernel", 1)]
    assert records[0].time == 0.001


def test_an_intact_kmsg_dump_shows_no_damage():
    assert read_kmsg((DATA / "kmsg-first-boot.txt").read_text().splitlines()).damage == []


def test_bytes_lost_around_a_console_record_show_as_damage():
    """As a CI run saw it: 13 bytes of a record gone where a console record was taken out."""
    lines = (DATA / "kmsg-first-boot.txt").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if ";virt/tdx: Module version" in line)
    damaged = [*lines[:at], lines[at][:-13], "0000000000", *lines[at + 1:]]
    assert read_kmsg(damaged).damage == ["not a record: '0000000000'"]
    merged = [*lines[:at], lines[at][:20] + lines[at + 1][12:], *lines[at + 2:]]  # a line end lost too
    seq = int(lines[at + 1].split(",")[1])
    assert read_kmsg(merged).damage == [f"records {seq}..{seq} missing"]
