"""Call sites: the CALL frame carries them, the resolver names them with the kernel's symbols
(harness/kernel/symbols.py, on small ELF files built here with gcc), the trace keeps them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.kernel.symbols import SiteResolver
from harness.seam.call import SeamcallRequest, Variant
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.sites import NO_SITE, RawSite, SiteKind
from harness.seam.trace import TraceRecord, format_record
from harness.transport.errors import ProtocolError
from harness.transport.frames import CallPayload, Frame, FrameType

SOURCE = """\
int helper(int x)
{
	return x * 3 + 1;
}

__attribute__((section(".text.unlikely"), aligned(64), noinline)) int rarely(int x)
{
	return helper(x) - 2;
}

__attribute__((section(".init.text"), noinline)) int setup(int x)
{
	return rarely(x) + helper(x);
}

int _start(void)
{
	return setup(4);
}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: no ELF to resolve against")
    out = tmp_path_factory.mktemp("sites")
    (out / "code.c").write_text(SOURCE)
    common = ["gcc", "-g", "-O1", "-fno-pie", "-fno-asynchronous-unwind-tables", str(out / "code.c")]
    subprocess.run([*common, "-c", "-o", str(out / "code-mod.ko")], check=True, timeout=120)
    subprocess.run([*common, "-no-pie", "-nostdlib", "-static", "-o", str(out / "vmlinux")], check=True,
                   timeout=120)
    return out


def symbols(path: Path) -> dict[str, int]:
    """name -> address, from nm (the independent reading the resolver is checked against)."""
    out = subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout
    rows = (line.split() for line in out.splitlines())
    return {row[2]: int(row[0], 16) for row in rows if len(row) == 3}


def test_kernel_sites_resolve_to_function_offset_and_line(built):
    resolver = SiteResolver(built / "vmlinux", built)
    setup = symbols(built / "vmlinux")["setup"]
    site = resolver.resolve(RawSite(SiteKind.KERNEL, setup + 5))
    func, where = site.split(" ")
    assert func == "setup+0x5"
    assert where.rsplit(":", 1)[0].endswith("code.c")
    assert int(where.rsplit(":", 1)[1]) in range(11, 15), "the line of setup()'s body"
    assert resolver.resolve(NO_SITE) is None


def test_an_address_outside_every_function_stays_raw(built):
    resolver = SiteResolver(built / "vmlinux", built)
    assert resolver.resolve(RawSite(SiteKind.KERNEL, 0x10)) == "0x10"
    assert resolver.resolve(RawSite(SiteKind.MODULE_TEXT, 0x10, "absent")) == "0x10 [absent]"


def test_module_sites_follow_the_kernel_s_section_layout(built):
    """.text, then .text.unlikely (aligned) make the core text; .init.text the init text."""
    resolver = SiteResolver(built / "vmlinux", built)
    readelf = subprocess.run(["readelf", "-SW", str(built / "code-mod.ko")], capture_output=True, text=True,
                             check=True).stdout
    sections = {}  # name -> (size, alignment)
    for line in readelf.splitlines():
        fields = line.replace("[ ", "[").split()
        if len(fields) > 6 and fields[1] in (".text", ".text.unlikely"):
            sections[fields[1]] = (int(fields[5], 16), int(fields[-1]))
    text_size, _ = sections[".text"]
    _, align = sections[".text.unlikely"]
    assert align == 64 and text_size % align, "the test needs .text.unlikely to be aligned past .text's end"
    unlikely_at = -(-text_size // align) * align
    assert resolver.resolve(RawSite(SiteKind.MODULE_TEXT, 2, "code_mod")) == "helper+0x2 [code_mod]"
    rarely = resolver.resolve(RawSite(SiteKind.MODULE_TEXT, unlikely_at + 1, "code_mod"))
    assert rarely == "rarely+0x1 [code_mod]"
    assert resolver.resolve(RawSite(SiteKind.MODULE_INIT_TEXT, 3, "code_mod")) == "setup+0x3 [code_mod]"


def test_call_sites_round_trip_through_the_frame():
    sites = (RawSite(SiteKind.KERNEL, 0xFFFFFFFF81234567), RawSite(SiteKind.MODULE_TEXT, 0x1A2B, "kvm_intel"))
    call = CallPayload(3, 1, 0x21, tuple(range(13)), sites)
    assert CallPayload.parse(call.frame(7)) == call
    assert CallPayload.parse(CallPayload(0, 0, 1, (0,) * 13).frame(1)).sites == (NO_SITE, NO_SITE)


@pytest.mark.parametrize("cut", [1, 10, 11])
def test_a_call_whose_sites_do_not_fit_is_refused(cut):
    payload = CallPayload(0, 1, 1, (0,) * 13, (NO_SITE, RawSite(SiteKind.MODULE_TEXT, 1, "kvm_intel"))).frame(1).payload
    with pytest.raises(ProtocolError):
        CallPayload.parse(Frame(FrameType.CALL, 1, payload[:-cut]))
    with pytest.raises(ProtocolError):
        CallPayload.parse(Frame(FrameType.CALL, 1, payload + b"\0"))


def test_the_trace_records_resolved_sites_and_old_traces_still_load():
    module = TdxModule()
    module.resolve_site = lambda site: None if site.kind is SiteKind.UNKNOWN else f"named {site.addr:#x}"
    module.call(SeamcallRequest(0, 0x21, variant=Variant.SEAMCALL, sites=(RawSite(SiteKind.KERNEL, 0x10), NO_SITE)),
                SparseMemory([]))
    (record,) = module.trace.records
    assert (record.site, record.caller) == ("named 0x10", None)
    assert "at named 0x10" in format_record(record)
    assert TraceRecord.from_json(record.to_json()) == record
    old = json.loads(record.to_json())
    del old["site"], old["caller"]
    loaded = TraceRecord.from_json(json.dumps(old))
    assert loaded.site is None and " at " not in format_record(loaded)
