"""The dmesg timeline: parsing and the failure messages of ordered expectations."""

from __future__ import annotations

import pytest

from harness.observe import patterns
from harness.observe.dmesg import Timeline, TimelineError, parse_console

LOG = """\
[    0.000000] Linux version 7.3.4
[    0.101000] virt/tdx: BIOS enabled: private KeyID range [16, 64)
some command output without a prefix
[    0.102000] virt/tdx: Disable ACPI S3. Turn off TDX in the BIOS to use ACPI S3.
[    1.500000] virt/tdx: Module version: 1.5.16
[    1.600000] virt/tdx: 8212 KB allocated for PAMT
[    1.700000] virt/tdx: TDX-Module initialized
[    0.000000] Linux version 7.3.4 (after kexec)
[    0.200000] virt/tdx: BIOS enabled: private KeyID range [16, 64)
"""


def test_records_and_boots():
    records = parse_console(LOG.splitlines())
    assert len(records) == 8
    assert [r.boot for r in records] == [0] * 6 + [1] * 2
    assert records[1].time == pytest.approx(0.101)


def test_in_order_passes_and_returns_matches():
    found = Timeline.from_console(LOG.splitlines()).expect_in_order(
        [patterns.BIOS_ENABLED, patterns.MODULE_VERSION, patterns.PAMT_ALLOCATED, patterns.INITIALIZED])
    assert patterns.PAMT_ALLOCATED.search(found[2].text)["kb"] == "8212"


def test_out_of_order_names_the_step_and_shows_context():
    timeline = Timeline.from_console(LOG.splitlines()[:7])
    with pytest.raises(TimelineError) as err:
        timeline.expect_in_order([patterns.INITIALIZED, patterns.MODULE_VERSION])
    text = str(err.value)
    assert "step 2 of 2" in text and "it came earlier" in text and "kernel log around it" in text


def test_marks_and_since():
    timeline = Timeline.from_console(LOG.splitlines()[:7])
    mark = timeline.mark()
    timeline.records += parse_console(LOG.splitlines()[7:])
    after = timeline.since(mark)
    assert [r.boot for r in after.records] == [0, 0]  # parsed alone: the second kernel's log
    assert len(timeline.all(patterns.BIOS_ENABLED)) == 2 and len(after.all(patterns.BIOS_ENABLED)) == 1
    after.expect_absent(patterns.INITIALIZED)


def test_absent_message_is_reported():
    with pytest.raises(TimelineError, match="none came"):
        Timeline.from_console(LOG.splitlines()).expect(patterns.NOT_LOADED)
    with pytest.raises(TimelineError, match="unexpected kernel message"):
        Timeline.from_console(LOG.splitlines()).expect_absent(patterns.INITIALIZED)
