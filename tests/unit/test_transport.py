"""Frame codec (with property tests) and the module server over a real Unix socket."""

from __future__ import annotations

import socket
import struct
import time
import zlib

import pytest
from fake_shim import FakeShim
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.bounded import MAX_REPORTS, FirstReports
from harness.deadline import Deadline
from harness.seam import abi
from harness.seam.abi import Leaf, Status
from harness.seam.faults import withheld
from harness.seam.memory import SparseMemory
from harness.seam.module import TdxModule
from harness.seam.platform import PlatformConfig, cmrs_for_ram
from harness.seam.state import SysState
from harness.seam.trace import Trace, read_trace
from harness.transport.errors import EXCERPT, ChannelDropped, FramingError, ProtocolError
from harness.transport.frames import (
    CRC,
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    PROTO_VERSION,
    CallPayload,
    Decoder,
    ErrorCode,
    ErrorPayload,
    Frame,
    FrameType,
    Hello,
    ReturnPayload,
)
from harness.transport.server import Channel, SeamServer

G, M = 1 << 30, 1 << 20
PROBE_LEAF = 0x7777  # an unknown leaf: no memory, no state

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


def wait_for_anomaly(module: TdxModule, text: str, timeout: float = 10.0) -> str:
    deadline = Deadline.after(timeout)
    while not deadline.expired():
        found = [a for a in module.anomalies if text in a]
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"no anomaly with {text!r}: {list(module.anomalies)}")


def test_a_return_the_guest_refuses_is_marked_in_the_trace_and_the_anomalies(tmp_path):
    """The shim answers a corrupted RETURN with an ERROR of its seq and gives the kernel
    VMFAILINVALID: the call's record (in memory and in the trace file) and the anomalies say so."""
    trace_path = tmp_path / "seamcalls.jsonl"
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])), trace=Trace(sink=trace_path.open("w")))
    with SeamServer(module, tmp_path / "seam.sock") as server:
        shim = FakeShim(str(tmp_path / "seam.sock"), SparseMemory([(0, 2 * G)]))
        shim.hello()
        assert shim.seamcall(0, Leaf.TDH_SYS_INIT).status == 0
        shim.send_raw(ErrorPayload(ErrorCode.PROTOCOL, "RETURN of the wrong size").frame(shim.seq).encode())
        anomaly = wait_for_anomaly(module, "refused its RETURN")
        assert "SYS.INIT" in anomaly and "TDX_SUCCESS in the trace" in anomaly and "VMFAILINVALID" in anomaly
        assert "RETURN refused by the guest" in (module.trace.records[-1].note or "")
        assert isinstance(server.errors[0], ProtocolError)
        # An ERROR about an older exchange is only reported.
        shim.send_raw(ErrorPayload(ErrorCode.PROTOCOL, "late").frame(shim.seq - 1).encode())
        wait_for_anomaly(module, "guest reported a PROTOCOL error: late")
        shim.close()
    (line,) = [r for r in read_trace(trace_path) if r.leaf == "TDH.SYS.INIT"]
    assert "RETURN refused by the guest" in (line.note or "")
    assert len(read_trace(trace_path)) == len(module.trace)


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


# --- hostile input: resync, deadlines, bounds -------------------------------------------------


def crc_field(span: bytes) -> int:
    """The CRC a receiver reads from the last four bytes of a frame's span."""
    return struct.unpack("<I", span[-CRC.size:])[0]


@pytest.mark.parametrize("lost", [1, 2, 3])
def test_a_frame_short_of_its_last_bytes_does_not_swallow_the_next(lost):
    """A HELLO that lost its last bytes, then a complete HELLO: the first one's span (its length
    field) reaches into the second, whose magic must still be found, in any chunking."""
    # Protocol 1, as issue 25's reproducer spoke it: the decoder does not read the version.
    short = Hello(1, 2, 0).frame(1).encode()[:-lost]
    follower = Hello(1, 2, 0).frame(2).encode()
    if lost == 1:  # the byte stream of issue 25's reproducer
        assert short.hex() == "5458010001001000010000000200000000000000000000003d01ce"
    span = (short + follower)[:len(short) + lost]
    for chunk in range(1, len(short) + len(follower) + 1):
        decoder, out = Decoder(), []
        stream = short + follower
        for at in range(0, len(stream), chunk):
            out += decoder.feed(stream[at:at + chunk])
        error, frame = out
        assert isinstance(error, FramingError), out
        assert (error.seq, error.reason, error.size) == (1, f"CRC mismatch (frame says {crc_field(span):#010x})",
                                                         len(short)), chunk
        assert frame == Frame(FrameType.HELLO, 2, follower[HEADER.size:-CRC.size]), chunk
        assert not decoder.buffer


def test_the_frame_after_a_one_byte_short_frame_is_answered(served):
    _, _, shim = served
    short = Hello(PROTO_VERSION, 2, 0).frame(1).encode()[:-1]
    shim.send_raw(short + Hello(PROTO_VERSION, 2, 0).frame(2).encode())
    error, ack = shim.recv_frame(), shim.recv_frame()
    assert (error.type, error.seq, ErrorPayload.parse(error).code) == (FrameType.ERROR, 1, ErrorCode.FRAMING)
    assert (ack.type, ack.seq) == (FrameType.HELLO_ACK, 2)


def read_frames_until(sock: socket.socket, seq: int, ftype: FrameType, timeout: float = 10.0) -> list[Frame]:
    """Every frame the server sent, up to the first of ``ftype`` with ``seq``."""
    decoder, frames = Decoder(), []
    deadline = Deadline.after(timeout)
    while not frames or (frames[-1].seq, frames[-1].type) != (seq, ftype):
        sock.settimeout(max(deadline.remaining(), 0.001))
        data = sock.recv(65536)
        assert data, f"server closed the channel after {frames}"
        for item in decoder.feed(data):
            assert isinstance(item, Frame), item
            frames.append(item)
    return frames


def probe_call(seq: int) -> bytes:
    return CallPayload(0, 1, PROBE_LEAF, (0,) * 13).frame(seq).encode()


def test_a_flood_from_a_peer_that_does_not_read_is_read_and_reported_once(tmp_path):
    """1 MiB of frames with a wrong CRC from a guest that reads nothing until it is done: the
    server keeps reading (the guest's send completes), reports the run's first error at once and
    the rest in one summary when a valid frame ends the run, then answers that frame."""
    bad = bytearray(raw_call_frame(seq=0x0101))
    bad[-1] ^= 0x01  # bytes without 0x54/0x58 anywhere but the magic: each frame is one error
    assert bad.find(MAGIC, 1) < 0 and MAGIC[:1] not in bad[1:]
    count = (1 << 20) // len(bad)
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    with SeamServer(module, tmp_path / "s.sock"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(tmp_path / "s.sock"))
        sock.settimeout(20.0)  # the old server stopped reading after ~200 KiB: this send never ended
        sock.sendall(bytes(bad) * count + probe_call(7))
        first, summary, answer = read_frames_until(sock, 7, FrameType.RETURN)
        sock.close()
    assert (first.type, first.seq) == (FrameType.ERROR, 0x0101)
    assert ErrorPayload.parse(first) == ErrorPayload(ErrorCode.FRAMING,
                                                     f"CRC mismatch (frame says {crc_field(bytes(bad)):#010x})")
    assert (summary.type, summary.seq) == (FrameType.ERROR, 0)
    assert ErrorPayload.parse(summary) == ErrorPayload(
        ErrorCode.FRAMING, f"{count} framing errors, {count * len(bad)} bytes dropped before this frame")
    assert (answer.type, answer.seq) == (FrameType.RETURN, 7)


def raw_call_frame(seq: int) -> bytes:
    return CallPayload(1, 1, 0x1111, (0x1111,) * 13).frame(seq).encode()


def test_a_peer_that_does_not_read_its_answers_is_dropped_and_the_server_listens_on(tmp_path):
    """Valid CALLs from a guest that never reads the RETURNs: the server neither blocks in a send
    nor queues without bound; it drops the connection, says why, and serves the next guest."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    with SeamServer(module, tmp_path / "s.sock", send_timeout=0.2) as server:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(tmp_path / "s.sock"))
        sock.settimeout(10.0)  # the old server blocked in sendall: so did this guest, then timed out
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for seq in range(1, 1 << 20):
                sock.sendall(probe_call(seq))
        sock.close()
        dropped = "module server dropped the guest connection: the guest did not read its answers"
        deadline = Deadline.after(5.0)
        while not any(a.startswith(dropped) for a in module.anomalies) and not deadline.expired():
            time.sleep(0.01)
        assert any(a.startswith(dropped) for a in module.anomalies), list(module.anomalies)
        assert isinstance(server.errors.last, ChannelDropped)
        shim = FakeShim(str(tmp_path / "s.sock"), SparseMemory([(0, 2 * G)]))
        assert shim.hello().module_present
        shim.close()


def test_framing_error_keeps_an_excerpt_of_its_bytes():
    error = FramingError("no magic", bytes(range(256)) * 20)
    assert (error.raw, error.size) == (bytes(range(EXCERPT)), 5120)
    assert str(error) == f"bad frame: no magic (5120 bytes dropped); raw bytes: {bytes(range(EXCERPT)).hex(' ')} ..."


def test_first_reports_keeps_the_first_n_a_count_and_the_last():
    reports: FirstReports[int] = FirstReports(limit=3)
    for n in range(10):
        reports.append(n)
    assert (list(reports), reports.total, reports.last, reports[-1], len(reports)) == ([0, 1, 2], 10, 9, 2, 3)


def test_hostile_frames_are_kept_as_counts_and_excerpts_across_reconnects(tmp_path):
    """Frames with 4 KiB payloads the server refuses (host-to-guest types, wrong CRCs, guest
    ERRORs with long texts), more than MAX_REPORTS of each, over two connections: the server and
    the module keep counts, the first MAX_REPORTS reports and 64-byte excerpts of the bytes."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    big = bytes(range(256)) * 16
    each = MAX_REPORTS + 5
    with SeamServer(module, tmp_path / "s.sock") as server:
        for _ in range(2):
            shim = FakeShim(str(tmp_path / "s.sock"), SparseMemory([(0, 2 * G)]))
            channel = None
            for seq in range(1, each + 1):
                shim.send_raw(Frame(FrameType.MEM_WRITE, seq, big).encode())
                assert shim.recv_frame().type is FrameType.ERROR
                bad = bytearray(Frame(FrameType.CALL, seq, big).encode())
                bad[-1] = 0 if bad[-1] else 1  # a wrong CRC whose last byte cannot start a magic
                shim.send_raw(bytes(bad))
                assert shim.recv_frame().type is FrameType.ERROR
                shim.send_raw(ErrorPayload(ErrorCode.PROTOCOL, "x" * 4000).frame(seq).encode())
                # a valid frame: ends the framing run (no summary: one error each)
                assert shim.seamcall(0, PROBE_LEAF).status
                channel = server._channel
            assert channel is not None and channel.framing_errors.total == each
            assert all(len(e.raw) == EXCERPT and e.size == len(bad) for e in channel.framing_errors)
            shim.close()
            deadline = Deadline.after(5.0)
            while server._channel is not None and not deadline.expired():  # the record moves to the module
                time.sleep(0.01)
    # Per connection: a protocol error for each MEM_WRITE and each guest ERROR.
    assert server.errors.total == 2 * 2 * each and len(server.errors) == MAX_REPORTS
    # The same in the module's record, and the framing errors once each connection ended: the
    # first MAX_REPORTS, then one line for the rest.
    assert module.anomalies.total == 2 * 2 * each + 2 * (MAX_REPORTS + 1)
    assert len(module.anomalies) == MAX_REPORTS
    longest = max(len(str(e)) for e in server.errors)
    assert longest < 1024 and max(len(a) for a in module.anomalies) < 1024, longest


class ChannelGoneOnSecondRead(SeamServer):
    """``_channel`` as stop() sees it when the serving thread closes the connection between
    two of its reads: the channel first, then None."""

    reads: list[Channel | None]

    @property  # type: ignore[override]
    def _channel(self) -> Channel | None:
        return self.reads.pop(0) if self.reads else None

    @_channel.setter
    def _channel(self, value: Channel | None) -> None:
        pass  # no guest connects in this test: the serving thread never sets it


def test_stop_reads_the_channel_once(tmp_path):
    server = ChannelGoneOnSecondRead(TdxModule(), tmp_path / "s.sock").start()
    ours, theirs = socket.socketpair()
    server.reads = [Channel(ours)]
    server.stop()
    theirs.settimeout(5.0)
    assert theirs.recv(1) == b""  # the connection stop() found was shut down
    theirs.close()


def test_a_silent_guest_keeps_its_connection(tmp_path):
    """No idle deadline between exchanges: a kernel may issue no SEAMCALL for minutes and its
    emulator connects COM2 once. Silence far past every deadline of the server, then a CALL."""
    module = TdxModule(PlatformConfig(cmrs=cmrs_for_ram([(0, 2 * G)])))
    with SeamServer(module, tmp_path / "s.sock", mem_timeout=0.05, frame_gap=0.05, send_timeout=0.05):
        shim = FakeShim(str(tmp_path / "s.sock"), SparseMemory([(0, 2 * G)]))
        shim.hello()
        time.sleep(0.5)
        assert shim.seamcall(0, Leaf.TDH_SYS_INIT).status == 0
        shim.close()
