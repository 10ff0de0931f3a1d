"""MCE descriptions and their two renderings; the kernel's TDX machine-check rules; cpuinfo; the
MCE message patterns on lines in the kernel's formats."""

from __future__ import annotations

import pytest

from harness.machine.mce import (
    MCACOD_MEMORY_READ,
    InjectFlags,
    Mce,
    McgStatus,
    MciStatus,
    MiscAddrMode,
    debugfs_setup_command,
    mci_misc,
    uncorrected_memory_error,
)
from harness.observe import patterns
from harness.observe.cpuinfo import CpuinfoError, parse_cpuinfo
from harness.observe.crash import Crash, classify
from harness.observe.dmesg import Record
from harness.observe.mce import (
    MceConditions,
    RdmdAnswer,
    has_pw_mce_erratum,
    ordinary_pages,
    paddr_is_tdx_private,
    pamt_page,
    pamt_ranges,
    rdmd_expected,
    rdmd_reaches_module,
    sets_pw_mce_bug,
    tdx_message_expected,
)
from harness.seam.abi import PageType, Status
from harness.seam.tdmr import ReservedArea, TdmrInfo

PA = 0x7F2A5123


def test_status_bits_are_the_sdm_positions():
    assert MciStatus.VAL == 1 << 63 and MciStatus.UC == 1 << 61 and MciStatus.PCC == 1 << 57
    assert MciStatus.MISCV == 1 << 59 and MciStatus.ADDRV == 1 << 58 and MciStatus.AR == 1 << 55
    assert McgStatus.MCIP | McgStatus.EIPV == 0x6 and McgStatus.LMCE_S == 8


def test_the_standard_memory_error():
    mce = uncorrected_memory_error(PA, cpu=1, bank=3)
    # VAL|UC|EN|MISCV|ADDRV|PCC with MCACOD 0x9f: the value the Linux facts give as an example.
    assert mce.status == 0xBE0000000000009F
    assert mce.misc == 0x8C == mci_misc(12, MiscAddrMode.PHYSICAL)
    assert (mce.cpu, mce.bank, mce.page) == (1, 3, 0x7F2A5000)
    assert mce.is_memory_error() and mce.has_usable_address() and mce.is_fatal()


def test_hmp_rendering():
    mce = uncorrected_memory_error(PA)
    assert mce.hmp_command() == "mce -b 0 1 0xbe0000000000009f 0x6 0x7f2a5123 0x8c"
    local = Mce(status=mce.status, mcg_status=int(McgStatus.MCIP | McgStatus.LMCE_S), addr=0x1000, misc=0,
                cpu=1, bank=2, broadcast=False)
    assert local.hmp_command() == "mce 1 2 0xbe0000000000009f 0xc 0x1000 0x0"


def test_debugfs_rendering_writes_bank_last():
    mce = uncorrected_memory_error(PA, cpu=1)
    writes = mce.debugfs_writes(InjectFlags.HW)
    assert writes == [("flags", "hw"), ("cpu", "1"), ("status", "0xbe0000000000009f"), ("misc", "0x8c"),
                      ("addr", "0x7f2a5123"), ("bank", "1")]
    command = mce.debugfs_command(InjectFlags.SW)
    assert command.startswith("echo sw > /sys/kernel/debug/mce-inject/flags && ")
    assert command.endswith("echo 1 > /sys/kernel/debug/mce-inject/bank")
    assert "\n" not in command


def test_debugfs_setup():
    assert debugfs_setup_command(fake_panic=True, rendezvous=True).endswith(
        " && modprobe mce-inject && echo 1 > /sys/kernel/debug/mce/fake_panic")
    assert debugfs_setup_command(fake_panic=False, rendezvous=False).endswith(
        "echo 0 > /sys/devices/system/machinecheck/machinecheck0/monarch_timeout")


def test_invalid_descriptions():
    with pytest.raises(ValueError, match="VAL"):
        Mce(status=int(MciStatus.UC), mcg_status=0, addr=0, misc=0)
    with pytest.raises(ValueError, match="64-bit"):
        Mce(status=int(MciStatus.VAL), mcg_status=0, addr=1 << 64, misc=0)
    with pytest.raises(ValueError):
        mci_misc(64, MiscAddrMode.PHYSICAL)


@pytest.mark.parametrize("mcacod,memory", [
    (MCACOD_MEMORY_READ, True),  # memory controller read error
    (0x0134, True),  # cache hierarchy: data read, L4 (the QEMU facts' example)
    (0x000C, True),  # generic memory hierarchy error
    (0x109F, True),  # the filter bit (12) does not matter
    (0x0800, False),  # bus/interconnect error
    (0x0E0B, False),  # bus error: bit 11 set, the low bits only add detail
    (0x0005, False),  # internal parity error
])
def test_memory_error_codes(mcacod, memory):
    status = MciStatus.VAL | MciStatus.UC | mcacod
    assert Mce(status=int(status), mcg_status=0, addr=0, misc=0).is_memory_error() is memory


@pytest.mark.parametrize("drop,misc,usable", [
    (MciStatus(0), 0x8C, True),
    (MciStatus.ADDRV, 0x8C, False),
    (MciStatus.MISCV, 0x8C, False),
    (MciStatus(0), mci_misc(13, MiscAddrMode.PHYSICAL), False),  # coarser than a page
    (MciStatus(0), mci_misc(6, MiscAddrMode.PHYSICAL), True),  # a cache line
    (MciStatus(0), mci_misc(12, MiscAddrMode.LINEAR), False),
])
def test_usable_address(drop, misc, usable):
    base = uncorrected_memory_error(PA)
    mce = Mce(status=base.status & ~drop, mcg_status=base.mcg_status, addr=PA, misc=misc)
    assert mce.has_usable_address() is usable


def test_erratum_cpus():
    assert has_pw_mce_erratum("GenuineIntel", 6, 0x8F)  # Sapphire Rapids
    assert has_pw_mce_erratum("GenuineIntel", 6, 0xCF)  # Emerald Rapids
    assert not has_pw_mce_erratum("GenuineIntel", 15, 107)  # QEMU's max with the Intel vendor
    assert not has_pw_mce_erratum("GenuineIntel", 6, 0xAD)  # Granite Rapids: fixed
    assert not has_pw_mce_erratum("AuthenticAMD", 6, 0x8F)
    # The flag comes last in tdx_init(): no TDX host platform, no flag, erratum or not.
    assert sets_pw_mce_bug("GenuineIntel", 6, 0x8F, host_platform=True)
    assert not sets_pw_mce_bug("GenuineIntel", 6, 0x8F, host_platform=False)


def tdmr(base: int, size: int, pamt_base: int) -> TdmrInfo:
    # PAMT sizes for 16-byte entries, laid out as Linux allocates them: 4K, then 2M, then 1G.
    sizes = [-(-(size >> shift) * 16 // 4096) * 4096 for shift in (12, 21, 30)]
    pamt_total = sum(sizes)
    reserved = (ReservedArea(pamt_base - base, pamt_total),) if base <= pamt_base < base + size else ()
    return TdmrInfo(base=base, size=size, pamt_1g_base=pamt_base + sizes[0] + sizes[1], pamt_1g_size=sizes[2],
                    pamt_2m_base=pamt_base + sizes[0], pamt_2m_size=sizes[1], pamt_4k_base=pamt_base,
                    pamt_4k_size=sizes[0], reserved=reserved + (ReservedArea(0, 0),) * 3)


TDMRS = [tdmr(0, 1 << 30, 0x3F000000), tdmr(1 << 30, 1 << 30, 0x3F800000)]


def test_pamt_ranges_and_page():
    ranges = pamt_ranges(TDMRS)
    # 4K: 262144 entries; 2M: 512 entries (2 pages); 1G: 1 entry (one page).
    assert ranges[0] == (0x3F000000, 0x3F000000 + (1 << 30 >> 12) * 16 + 2 * 4096 + 4096)
    page = pamt_page(TDMRS)
    assert ranges[0][0] < page < ranges[0][1] and page % 4096 == 0
    with pytest.raises(ValueError, match="never configured"):
        pamt_page([])


def test_ordinary_pages_avoid_the_first_mib_and_pamts():
    pages = ordinary_pages([(0, 2 << 30)], TDMRS, 3)
    assert pages == [0x100000, 0x101000, 0x102000]
    assert not any(start <= page < end for page in pages for start, end in pamt_ranges(TDMRS))
    # No TDMRs (the module never got configured): RAM above 1 MiB.
    assert ordinary_pages([(0, 0x80000000)], [], 1) == [0x100000]
    with pytest.raises(ValueError, match="only 0 of 1"):
        ordinary_pages([(0, 0x100000)], [], 1)


def test_ordinary_pages_skip_a_pamt_in_the_way():
    low_pamt = [tdmr(0, 1 << 30, 0x100000)]
    first = ordinary_pages([(0, 1 << 30)], low_pamt, 1)[0]
    assert first == pamt_ranges(low_pamt)[0][1]


PAMT = pamt_ranges(TDMRS)


@pytest.mark.parametrize("answer,pa,private", [
    (RdmdAnswer(0, PageType.PT_NDA), 0x200000, False),
    (RdmdAnswer(0, PageType.PT_RSVD), PAMT[0][0] + 0x5000, True),  # a PAMT page
    (RdmdAnswer(0, PageType.PT_RSVD), 0x7FFE0000, False),  # reserved, not PAMT
    (RdmdAnswer(0, PageType.PT_REG), 0x200000, True),
    (RdmdAnswer(0, PageType.PT_TDR), 0x200000, True),
    (RdmdAnswer(Status.TDX_SYS_NOT_READY, PageType.PT_REG), 0x200000, False),  # no ready module
])
def test_paddr_is_tdx_private(answer, pa, private):
    assert paddr_is_tdx_private(pa, answer, PAMT) is private


ERRATUM = MceConditions(erratum=True, host_platform=True, reaches_panic=True)


def test_rdmd_only_on_the_full_chain():
    mce = uncorrected_memory_error(0x200000)
    assert rdmd_expected(mce, ERRATUM)
    for cond in (MceConditions(False, True, True), MceConditions(True, False, True), MceConditions(True, True, False)):
        assert not rdmd_expected(mce, cond)
    unusable = Mce(status=mce.status & ~MciStatus.MISCV, mcg_status=mce.mcg_status, addr=mce.addr, misc=0)
    assert not rdmd_expected(unusable, ERRATUM)


def test_rdmd_outside_vmx_operation_is_ud_and_not_private():
    """The kernel still asks after init_tdx_module() failed (the CPUs left VMX operation), the
    SEAMCALL is #UD and TDX_SEAMCALL_UD, an error status, means "not private"."""
    mce = uncorrected_memory_error(0x200000)
    off = MceConditions(erratum=True, host_platform=True, reaches_panic=True, vmx_operation=False)
    assert rdmd_expected(mce, off) and not rdmd_reaches_module(mce, off)
    assert rdmd_reaches_module(mce, ERRATUM)
    assert not tdx_message_expected(mce, off, RdmdAnswer(Status.TDX_SEAMCALL_UD), PAMT)


def test_message_follows_the_module_answer():
    mce = uncorrected_memory_error(0x200000)
    assert tdx_message_expected(mce, ERRATUM, RdmdAnswer(0, PageType.PT_REG), PAMT)
    assert not tdx_message_expected(mce, ERRATUM, RdmdAnswer(0, PageType.PT_NDA), PAMT)
    assert not tdx_message_expected(mce, MceConditions(False, True, True), None, PAMT)
    with pytest.raises(ValueError, match="RDMD"):
        tdx_message_expected(mce, ERRATUM, None, PAMT)


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum
flags\t\t: fpu vme mce mca tdx_host_platform
bugs\t\t: spectre_v1 tdx_pw_mce

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
flags\t\t: fpu
bugs\t\t:
"""


def test_cpuinfo():
    info = parse_cpuinfo(CPUINFO)
    assert (info.vendor, info.family, info.model) == ("GenuineIntel", 6, 143)
    assert "tdx_host_platform" in info.flags and "tdx_pw_mce" in info.bugs
    assert has_pw_mce_erratum(info.vendor, info.family, info.model)
    with pytest.raises(CpuinfoError, match="cpu family"):
        parse_cpuinfo("processor\t: 0\nvendor_id\t: GenuineIntel\n")


# Lines as mce/core.c prints them (pr_fmt "mce: ", HW_ERR "[Hardware Error]: ").
RECORD = "mce: [Hardware Error]: CPU 0: Machine Check Exception: 6 Bank 1: be0000000000009f"
TSC = "mce: [Hardware Error]: TSC 3a1b2c ADDR 7f2a5000 MISC 8c "
TDX = "mce: [Hardware Error]: Machine check: TDX private memory error. Possible kernel bug."
FAKE = "mce: [Hardware Error]: Fake kernel panic: Fatal machine check on current CPU"
PANIC = "Kernel panic - not syncing: Fatal machine check"


def test_mce_patterns():
    record = patterns.MCE_RECORD.search(RECORD)
    assert record and (record["cpu"], record["bank"], int(record["status"], 16)) == \
        ("0", "1", uncorrected_memory_error(PA).status)
    assert int(patterns.MCE_RECORD_ADDR.search(TSC)["addr"], 16) == uncorrected_memory_error(PA).page
    assert patterns.MCE_TDX_PRIVATE_LINE.search(TDX) and patterns.MCE_TDX_PRIVATE.search(TDX)
    assert patterns.MCE_EXPLANATION.search(TDX)["text"].startswith("TDX private")
    assert patterns.MCE_FAKE_PANIC.search(FAKE)["reason"] == "Fatal machine check on current CPU"
    assert patterns.MCE_KERNEL_PANIC.search(PANIC)
    assert not patterns.MCE_KERNEL_PANIC.search("Kernel panic - not syncing: Attempted to kill init!")


def test_mce_lines_classify_as_mce_and_panic():
    kinds = [f.kind for f in classify(Record(i, 1.0, text, 0) for i, text in enumerate([RECORD, TDX, FAKE, PANIC]))]
    assert kinds == [Crash.MCE, Crash.MCE, Crash.MCE, Crash.PANIC]
