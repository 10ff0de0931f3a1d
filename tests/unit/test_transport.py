"""Frame codec (with property tests) and the module server over a real Unix socket."""

from __future__ import annotations

import struct
import time
import zlib

import pytest
from fake_shim import FakeShim
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.seam import abi
from harness.seam.abi import Leaf, Status
from harness.seam.faults import withheld
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram
from harness.seam.state import SysState
from harness.transport.errors import ProtocolError
from harness.transport.frames import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    CallPayload,
    Decoder,
    ErrorCode,
    ErrorPayload,
    Frame,
    FrameType,
    ReturnPayload,
)
from harness.transport.server import SeamServer

G, M = 1 << 30, 1 << 20

frames = st.builds(Frame, st.sampled_from(list(FrameType)), st.integers(0, 0xFFFF),
                   st.binary(max_size=300))


@given(st.lists(frames, max_size=5), st.integers(1, 64))
def test_codec_round_trips_in_any_chunking(items, chunk):
    stream = b"".join(f.encode() for f in items)
    decoder = Decoder()
    out = []
    for i in range(0, len(stream), chunk):
        out += decoder.feed(stream[i:i + chunk])
    assert out == items


@settings(max_examples=60)
@given(frames)
def test_every_single_byte_corruption_is_rejected(frame):
    data = frame.encode()
    for index in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            corrupted = bytearray(data)
            corrupted[index] ^= flip
            decoded = [item for item in Decoder().feed(bytes(corrupted)) if isinstance(item, Frame)]
            assert decoded == [], f"byte {index} ^ {flip:#x} accepted"


def test_decoder_resyncs_after_garbage_and_reports_it():
    good = Frame(FrameType.CALL, 7, b"x" * 10).encode()
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 1
    items = Decoder().feed(b"junk" + bytes(bad_crc) + good)
    errors = [str(i) for i in items if not isinstance(i, Frame)]
    assert [i for i in items if isinstance(i, Frame)] == [Frame(FrameType.CALL, 7, b"x" * 10)]
    assert any("bytes before magic" in e for e in errors) and any("CRC mismatch" in e for e in errors)


def test_oversized_length_and_unknown_type_are_named():
    head = HEADER.pack(MAGIC, FrameType.CALL, 0, 1, MAX_PAYLOAD + 1)
    items = Decoder().feed(head)
    assert "exceeds" in str(items[0])
    head = HEADER.pack(MAGIC, 0x55, 0, 1, 0)
    body = head + struct.pack("<I", zlib.crc32(head))
    assert "unknown type 0x55" in str(Decoder().feed(body)[0])


def test_read_buffer_is_bounded():
    decoder = Decoder(max_buffer=1000)
    items = decoder.feed(MAGIC + b"\x02\x00\x01\x00" + (4000).to_bytes(2, "little") + b"z" * 3000)
    assert any("read buffer limit" in str(i) for i in items)
    assert len(decoder.buffer) == 0


@pytest.fixture
def served(tmp_path):
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    server = SeamServer(module, tmp_path / "seam.sock", mem_timeout=2.0).start()
    shim = FakeShim(str(tmp_path / "seam.sock"), SparseMemory([(0, 2 * G)]))
    yield module, server, shim
    shim.close()
    server.stop()


def test_hello_answers_the_keyid_partition(served):
    module, _, shim = served
    ack = shim.hello(nr_cpus=2)
    assert (ack.module_present, ack.nr_mktme_keyids, ack.nr_tdx_keyids) == (True, 15, 48)
    assert module.boots == 1


def test_calls_and_memory_reads_over_the_socket(served):
    module, server, shim = served
    shim.hello()
    assert shim.seamcall(0, Leaf.TDH_SYS_INIT).status == 0
    assert shim.seamcall(0, Leaf.TDH_SYS_LP_INIT).status == 0
    assert shim.seamcall(1, Leaf.TDH_SYS_LP_INIT).status == 0
    # SYS.CONFIG pointing at a zeroed PA array: the module reads it through MEM_READ and finds
    # TDMR_INFO at PA 0 (a zeroed entry: base 0, size 0 -> invalid TDMR 0).
    result = shim.seamcall(0, Leaf.TDH_SYS_CONFIG, (0x1000, 1, 16) + (0,) * 10)
    assert result.status == abi.with_info(Status.TDX_INVALID_TDMR, 0)
    assert [r.leaf for r in module.trace][-1] == "TDH.SYS.CONFIG"
    assert server.calls == 4


def test_withheld_answer_runs_the_leaf_and_the_next_call_is_answered(served):
    """faults.withheld(): the module runs the leaf but sends no RETURN (a CPU stays inside its
    SEAMCALL); a later CALL, as from a CPU that took the wire, gets its own answer."""
    module, server, shim = served
    module.faults.add(withheld(Leaf.TDH_SYS_INIT))
    shim.hello()
    shim.timeout = 0.5
    with pytest.raises(TimeoutError):
        shim.seamcall(0, Leaf.TDH_SYS_INIT)
    assert module.state.sys is SysState.SYSINIT_DONE
    assert [(r.leaf, r.status, r.injected) for r in module.trace] == \
        [("TDH.SYS.INIT", 0, "TDH.SYS.INIT -> answer withheld [times=1]")]
    assert shim.seamcall(0, Leaf.TDH_SYS_LP_INIT).status == 0
    assert server.calls == 2 and not module.anomalies


def test_memory_the_guest_refuses_fails_the_call_cleanly(served):
    module, _, shim = served
    shim.hello()
    shim.seamcall(0, Leaf.TDH_SYS_INIT)
    shim.seamcall(0, Leaf.TDH_SYS_LP_INIT)
    shim.seamcall(1, Leaf.TDH_SYS_LP_INIT)
    # PA array in a hole the guest refuses (beyond RAM).
    result = shim.seamcall(0, Leaf.TDH_SYS_CONFIG, (3 * G, 1, 16) + (0,) * 10)
    assert result.status == abi.with_operand(Status.TDX_OPERAND_INVALID, abi.OperandId.RCX)
    assert "guest refused" in (module.trace.records[-1].note or "")


def test_bad_frame_gets_an_error_frame_and_the_connection_survives(served):
    _, _, shim = served
    frame = bytearray(CallPayload(0, 1, Leaf.TDH_SYS_INIT, (0,) * 13).frame(1).encode())
    frame[12] ^= 0xFF
    shim.send_raw(bytes(frame))
    reply = shim.recv_frame()
    assert reply.type is FrameType.ERROR and b"CRC mismatch" in reply.payload
    assert shim.seamcall(0, Leaf.TDH_SYS_INIT).status == 0


def test_bad_frames_and_guest_errors_become_module_anomalies(served):
    """What the scenarios' end-of-test check reads: the module's anomaly list holds the frames
    the server could not decode (once the connection ends) and the errors the guest reported."""
    module, _, shim = served
    frame = bytearray(CallPayload(0, 1, Leaf.TDH_SYS_INIT, (0,) * 13).frame(1).encode())
    frame[12] ^= 0xFF
    shim.send_raw(bytes(frame))
    assert shim.recv_frame().type is FrameType.ERROR
    shim.send_raw(ErrorPayload(ErrorCode.PROTOCOL, "confused").frame(2).encode())
    assert shim.seamcall(0, Leaf.TDH_SYS_INIT).status == 0  # the channel still serves
    shim.close()
    deadline = time.monotonic() + 10
    while len(module.anomalies) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any("guest reported a PROTOCOL error: confused" in a for a in module.anomalies), module.anomalies
    assert any(a.startswith("bad frame from the guest") and "CRC mismatch" in a for a in module.anomalies), \
        module.anomalies


def test_unexpected_frame_type_is_a_protocol_error(served):
    _, server, shim = served
    shim.send_raw(ReturnPayload(0, (0,) * 13).frame(5).encode())
    reply = shim.recv_frame()
    assert reply.type is FrameType.ERROR and b"unexpected RETURN" in reply.payload
    assert isinstance(server.errors[0], ProtocolError)


def test_server_stop_with_connected_guest_is_prompt(tmp_path):
    module = TdxModule()
    server = SeamServer(module, tmp_path / "s.sock").start()
    shim = FakeShim(str(tmp_path / "s.sock"), SparseMemory([(0, G)]))
    shim.hello()
    server.stop(timeout=5)
    assert not server.thread.is_alive()
    assert not (tmp_path / "s.sock").exists()
    shim.close()
