"""The shim's wire code (sw_module.c in images/kernel/patches/0001) in user space, against a
simulated module: tests/unit/shim/wire_driver.c includes the C file extracted from the patch with
its #include lines dropped (tests/unit/shim/shim_stubs.h stands in for the kernel), simulates
COM2, the TSC, the wire lock and RAM (with pages missing from the direct map or read-only), and
prints what happened as JSON. Time is simulated: every port access costs IO_NS."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import paths
from harness.kernel.build import patch_series
from harness.observe import patterns
from harness.seam.sites import NO_SITE, RawSite, SiteKind
from harness.transport.frames import (
    PROTO_VERSION,
    CallPayload,
    Decoder,
    ErrorCode,
    Frame,
    FrameType,
    HelloAckPayload,
    MemRequest,
    ReturnPayload,
)

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the shim in user space")

SHIM = Path(__file__).parent / "shim"
SW_MODULE = "arch/x86/virt/vmx/tdx/sw_module.c"
VMFAILINVALID = 0x8000FF00FFFF0000
P_SEAMLDR_INFO = 1 << 63
TDH_SYS_CONFIG = 45
RAM_BASE = 0x100000
PAGE = 4096
RAM_PAGES = 8
MAX_MEM_REQUESTS = 1024  # sw_module.c
HELLO_SEQ = 1
CALL_SEQ = 2
TIMEOUT_MS = 200
MS = 1_000_000  # simulated ns
SLACK_NS = MS  # a deadline is seen within a few port accesses of passing


def shim_source(patch: Path) -> str:
    """The new file sw_module.c as patch ``patch`` creates it, without its #include lines."""
    lines = patch.read_text().splitlines()
    start = lines.index(f"+++ b/{SW_MODULE}") + 2  # after the @@ line
    body = []
    for line in lines[start:]:
        if not line.startswith("+"):
            break
        body.append(line[1:])
    return "\n".join(line for line in body if not line.startswith("#include")) + "\n"


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shim")
    patch = next(p for p in patch_series(paths.PATCHES) if p.name.startswith("0001-"))
    (out / "sw_module.c").write_text(shim_source(patch))
    binary = out / "wire_driver"
    # tdx_sw_reserve_com2() is only called through the (stubbed) arch_initcall().
    subprocess.run(["gcc", "-std=gnu11", "-O1", "-g", "-Wall", "-Werror", "-Wno-unused-function",
                    "-fsanitize=undefined", "-fno-sanitize-recover", "-DCONFIG_HARDLOCKUP_DETECTOR",
                    f"-I{out}", f"-I{SHIM}", "-o", str(binary), str(SHIM / "wire_driver.c")], check=True, timeout=120)
    return binary


@dataclass
class Run:
    ops: list[dict]
    runaway: bool
    now_ns: int
    tx: list[Frame]
    log: str
    ram: bytes
    kernel_text: int  # the driver's simulated texts (wire_driver.c sim_sites_init)
    module_text: int

    def sent(self, ftype: FrameType) -> list[Frame]:
        return [f for f in self.tx if f.type is ftype]


def run(driver: Path, tmp_path: Path, ops: list[str], rx: bytes = b"", repeat: bytes = b"",
        timeout_ms: int = TIMEOUT_MS, *options: str) -> Run:
    args = [str(driver), "--timeout-ms", str(timeout_ms), *options]
    for name, data in (("rx", rx), ("repeat", repeat)):
        if data:
            (tmp_path / name).write_bytes(data)
            args += [f"--{name}", str(tmp_path / name)]
    done = subprocess.run([*args, *ops], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"the shim died ({done.returncode}): {done.stderr[-2000:]}"
    out = json.loads(done.stdout)
    frames = [item for item in Decoder(max_buffer=1 << 30).feed(bytes.fromhex(out["tx"])) if isinstance(item, Frame)]
    return Run(out["ops"], out["runaway"], out["now_ns"], frames, out["log"], bytes.fromhex(out["ram"]),
               out["kernel_text"], out["module_text"])


def ack(seq: int = HELLO_SEQ, mktme: int = 15, tdx: int = 48, version: int | None = None) -> bytes:
    frame = HelloAckPayload(True, mktme, tdx).frame(seq)
    if version is not None:
        frame = Frame(frame.type, seq, struct.pack("<I", version) + frame.payload[4:])
    return frame.encode()


def ret(seq: int = CALL_SEQ, status: int = 0, rcx: int = 0) -> bytes:
    return ReturnPayload(status, (rcx,) + (0,) * 12).frame(seq).encode()


def ram_at(pa: int, size: int) -> bytes:
    """The pattern wire_driver.c fills RAM with."""
    return bytes((i * 131 + 7) & 0xFF for i in range(pa - RAM_BASE, pa - RAM_BASE + size))


def call(fn: int = TDH_SYS_CONFIG, rcx: int = 0, variant: int = 1) -> str:
    return f"call:{fn}:{rcx}:{variant}"


def test_a_call_is_answered_with_the_module_s_return(driver, tmp_path):
    result = run(driver, tmp_path, ["hello", call(rcx=5)], ack() + ret(status=0x1234, rcx=7))
    assert result.ops[0]["ret"] == 0 and (result.ops[0]["keyid_start"], result.ops[0]["nr_keyids"]) == (16, 48)
    assert result.ops[1]["ret"] == 0x1234 and result.ops[1]["rcx"] == 7
    (sent,) = result.sent(FrameType.CALL)
    assert sent.seq == CALL_SEQ and CallPayload.parse(sent).regs[0] == 5


# wire_driver.c's simulated call: a kernel function at SIM_FUNC, its __seamcall*() call returning
# to SIM_SITE, called from a module function whose call ends at SIM_CALL + 5.
SIM_SITE, SIM_CALL_END, SIM_KASLR_OFFSET = 16 + 7, 8 + 5, 0x1000000


def test_a_call_names_its_site_and_the_caller_of_its_function(driver, tmp_path):
    result = run(driver, tmp_path, ["hello", call()], ack() + ret())
    (sent,) = result.sent(FrameType.CALL)
    site, caller = CallPayload.parse(sent).sites
    assert site == RawSite(SiteKind.KERNEL, result.kernel_text + SIM_SITE - SIM_KASLR_OFFSET)
    assert caller == RawSite(SiteKind.MODULE_TEXT, SIM_CALL_END, "kvm_intel"), \
        "the stack word after a call to the site's function, not the text address before it"


def test_no_stack_scan_in_nmi_context(driver, tmp_path):
    result = run(driver, tmp_path, ["hello", call()], ack() + ret(), b"", TIMEOUT_MS, "--nmi")
    (sent,) = result.sent(FrameType.CALL)
    site, caller = CallPayload.parse(sent).sites
    assert site.kind is SiteKind.KERNEL and caller == NO_SITE


# --- item 5: deadlines a flood cannot defeat ----------------------------------------------------

FLOODS = {
    "bytes_without_a_magic": b"\x00",
    "frames_for_another_seq": ret(seq=CALL_SEQ + 7),
    "bad_headers": b"TX\x82\x00\x02\x00\xff\xff",  # lengths above MAX_PAYLOAD: dropped, not waited for
}


@pytest.mark.parametrize("flood", FLOODS.values(), ids=FLOODS.keys())
def test_a_flood_does_not_keep_the_shim_past_its_deadline(driver, tmp_path, flood):
    result = run(driver, tmp_path, ["hello", call()], ack(), flood)
    assert not result.runaway, "the shim kept reading the flood long past its deadline"
    assert result.ops[1]["ret"] == VMFAILINVALID
    assert result.ops[1]["ns"] <= TIMEOUT_MS * MS + SLACK_NS


def test_a_flood_during_hello_does_not_keep_the_shim_past_its_deadline(driver, tmp_path):
    result = run(driver, tmp_path, ["hello"], b"", b"\x00")
    assert not result.runaway
    assert result.ops[0]["ret"] < 0 and "no software TDX module answered" in result.log


def test_endless_memory_requests_are_bounded_per_call(driver, tmp_path):
    request = MemRequest(RAM_BASE, 16).frame(CALL_SEQ).encode()
    result = run(driver, tmp_path, ["hello", call()], ack(), request, 60_000)
    assert not result.runaway
    assert result.ops[1]["ret"] == VMFAILINVALID
    assert len(result.sent(FrameType.MEM_DATA)) == MAX_MEM_REQUESTS
    (error,) = result.sent(FrameType.ERROR)
    assert error.seq == CALL_SEQ and error.payload[:4] == struct.pack("<I", ErrorCode.PROTOCOL)
    assert "too many MEM requests" in result.log


def test_a_wire_that_never_takes_bytes_times_out(driver, tmp_path):
    result = run(driver, tmp_path, ["hello"], ack(), b"", TIMEOUT_MS, "--thr-busy")
    assert result.ops[0]["ret"] < 0 and result.ops[0]["ns"] <= TIMEOUT_MS * MS + SLACK_NS


# --- item 6: MEM_WRITE only into the buffer the kernel passed ----------------------------------

def mem_write(pa: int, data: bytes, seq: int = CALL_SEQ) -> bytes:
    return MemRequest(pa, len(data), data).frame(seq).encode()


def mem_status(frame: Frame) -> int:
    return struct.unpack_from("<QII", frame.payload)[2]


def test_mem_write_is_refused_outside_seamldr_info_s_buffer(driver, tmp_path):
    data = b"\xee" * 64
    result = run(driver, tmp_path, ["hello", call()], ack() + mem_write(RAM_BASE, data) + ret())
    (acked,) = result.sent(FrameType.MEM_ACK)
    assert mem_status(acked) == 3
    assert result.ram[:64] == ram_at(RAM_BASE, 64), "the module wrote kernel memory it was never given"
    assert result.ops[1]["ret"] == 0


@pytest.mark.parametrize(("offset", "size", "status"), [(0, 256, 0), (0xF0, 16, 0), (0x10, 256, 3), (-16, 32, 3)])
def test_seamldr_info_s_buffer_is_writable_and_nothing_around_it(driver, tmp_path, offset, size, status):
    buffer = RAM_BASE + PAGE + 0x100
    data = bytes(range(size % 256)) + bytes(size - size % 256)
    result = run(driver, tmp_path, ["hello", call(P_SEAMLDR_INFO, buffer, 0)],
                 ack() + mem_write(buffer + offset, data) + ret())
    (acked,) = result.sent(FrameType.MEM_ACK)
    assert mem_status(acked) == status
    at = buffer + offset - RAM_BASE
    assert result.ram[at:at + size] == (data if status == 0 else ram_at(buffer + offset, size))


# --- item 7: RAM missing from the direct map or read-only ---------------------------------------

def test_mem_read_of_a_page_missing_from_the_direct_map_is_refused_not_faulted(driver, tmp_path):
    request = MemRequest(RAM_BASE + 2 * PAGE, 64).frame(CALL_SEQ).encode()
    result = run(driver, tmp_path, ["hello", call()], ack() + request + ret(), b"", TIMEOUT_MS, "--unmapped", "2")
    (data,) = result.sent(FrameType.MEM_DATA)
    assert mem_status(data) == 2 and len(data.payload) == 16
    assert result.ops[1]["ret"] == 0


def test_mem_write_to_a_read_only_page_is_refused_not_faulted(driver, tmp_path):
    buffer = RAM_BASE + 3 * PAGE
    result = run(driver, tmp_path, ["hello", call(P_SEAMLDR_INFO, buffer, 0)],
                 ack() + mem_write(buffer, b"\x01" * 256) + ret(), b"", TIMEOUT_MS, "--readonly", "3")
    (acked,) = result.sent(FrameType.MEM_ACK)
    assert mem_status(acked) == 2
    assert result.ram[3 * PAGE:3 * PAGE + 256] == ram_at(buffer, 256)


def test_mem_read_of_mapped_ram_returns_its_bytes(driver, tmp_path):
    request = MemRequest(RAM_BASE + 5 * PAGE + 8, 100).frame(CALL_SEQ).encode()
    result = run(driver, tmp_path, ["hello", call()], ack() + request + ret(), b"", TIMEOUT_MS, "--unmapped", "2")
    (data,) = result.sent(FrameType.MEM_DATA)
    assert mem_status(data) == 0 and data.payload[16:] == ram_at(RAM_BASE + 5 * PAGE + 8, 100)


# --- item 8 --------------------------------------------------------------------------------------

def test_the_sequence_number_skips_0_when_it_wraps(driver, tmp_path):
    result = run(driver, tmp_path, ["hello", call()], ack(seq=0xFFFF) + ret(seq=1), b"", TIMEOUT_MS,
                 "--seq", "0xfffe")
    assert [f.seq for f in result.tx] == [0xFFFF, 1]
    assert result.ops[1]["ret"] == 0


BAD_ACKS = {
    "other_protocol": ack(version=PROTO_VERSION + 1),
    "mktme_count_makes_keyid_0_a_tdx_keyid": ack(mktme=0xFFFFFFFF, tdx=48),
    "start_plus_count_wraps": ack(mktme=0x10, tdx=0xFFFFFFF8),
    "more_keyids_than_15_bits": ack(mktme=0x4000, tdx=0x4000),
    "short": Frame(FrameType.HELLO_ACK, HELLO_SEQ, ack()[8:20]).encode(),
}


@pytest.mark.parametrize("bad", BAD_ACKS.values(), ids=BAD_ACKS.keys())
def test_a_bad_hello_ack_is_refused_and_no_seamcall_goes_out(driver, tmp_path, bad):
    result = run(driver, tmp_path, ["hello", call()], bad + ret())
    assert result.ops[0]["ret"] < 0 and not result.ops[0]["module_present"]
    assert patterns.SHIM_HELLO_REFUSED.search(result.log) and "no TDX platform" in result.log
    assert result.ops[1]["ret"] == VMFAILINVALID and not result.sent(FrameType.CALL)


def test_the_largest_keyid_partition_the_bits_hold_is_taken(driver, tmp_path):
    result = run(driver, tmp_path, ["hello"], ack(mktme=0x3FFF, tdx=0x4000))
    assert result.ops[0]["ret"] == 0 and (result.ops[0]["keyid_start"], result.ops[0]["nr_keyids"]) == (0x4000, 0x4000)


def test_lock_wait_and_exchange_share_one_budget(driver, tmp_path):
    # Another CPU holds the wire for 40% of the budget; the module then never answers.
    held = TIMEOUT_MS * MS * 4 // 10
    result = run(driver, tmp_path, ["hello", call()], ack(), b"", TIMEOUT_MS, "--lock-held-ns", str(held))
    assert result.sent(FrameType.CALL), "the CALL went out once the lock was free"
    assert result.ops[1]["ns"] <= TIMEOUT_MS * MS + SLACK_NS


def test_a_wire_held_for_good_fails_within_half_the_budget(driver, tmp_path):
    result = run(driver, tmp_path, ["hello", call()], ack(), b"", TIMEOUT_MS, "--lock-held-ns", str(1 << 62))
    assert result.ops[1]["ret"] == VMFAILINVALID and "COM2 stayed busy" in result.log
    assert result.ops[1]["ns"] <= TIMEOUT_MS * MS // 2 + SLACK_NS


def test_the_budget_stays_below_the_hard_lockup_threshold(driver, tmp_path):
    # timeout_ms of a minute, watchdog_thresh 1 s: IRQs are off for at most half a second.
    result = run(driver, tmp_path, ["hello", call()], ack(), b"", 60_000, "--watchdog-thresh", "1")
    assert result.ops[1]["ret"] == VMFAILINVALID
    assert result.ops[1]["ns"] <= 500 * MS + SLACK_NS


CORRUPT_RETURNS = {
    "wrong_size": (Frame(FrameType.RETURN, CALL_SEQ, bytes(104)).encode(), ErrorCode.PROTOCOL),
    "bad_crc": (ret()[:-1] + bytes([ret()[-1] ^ 1]), ErrorCode.FRAMING),
}


@pytest.mark.parametrize(("bad", "code"), CORRUPT_RETURNS.values(), ids=CORRUPT_RETURNS.keys())
def test_a_corrupt_return_is_reported_to_the_module(driver, tmp_path, bad, code):
    result = run(driver, tmp_path, ["hello", call()], ack() + bad)
    assert result.ops[1]["ret"] == VMFAILINVALID
    (error,) = result.sent(FrameType.ERROR)
    assert error.seq == CALL_SEQ and struct.unpack_from("<I", error.payload)[0] == code
    assert "exchange failed" in result.log and "stopped answering" not in result.log
