"""Serves the software module to a guest: one emulator COM2 connection on a Unix (QEMU) or TCP
(Bochs) socket, frames in, module calls, frames out. The guest is a client of this server, so
the server is listening before the emulator starts."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from harness.bounded import FirstReports
from harness.deadline import Deadline
from harness.seam.call import SeamcallRequest, Variant
from harness.seam.memory import MemoryAccessError
from harness.seam.module import TdxModule
from harness.transport.errors import (
    ChannelClosed,
    ChannelDropped,
    FramingError,
    ProtocolError,
    TransportError,
    TransportTimeout,
    text_excerpt,
)
from harness.transport.frames import (
    CRC,
    HEADER,
    MAX_MEM_CHUNK,
    MAX_PAYLOAD,
    MEM_STATUS,
    PROTO_VERSION,
    CallPayload,
    Decoder,
    ErrorCode,
    ErrorPayload,
    Frame,
    FrameType,
    Hello,
    HelloAckPayload,
    MemReply,
    MemRequest,
    ReturnPayload,
)

log = logging.getLogger("harness.transport")

ACCEPT_POLL = 0.2  # how often the accept loop checks for stop()
WAKE = 1.0  # longest wait for the guest: a stopped server notices within this
RECV_CHUNK = 65536
# Silence after which a partial frame counts as truncated. The shim writes a frame in one go
# with interrupts off, so only a vCPU descheduled for this long stalls a frame; the shim's own
# exchange deadline (10 s by default) is longer, so the host reports first.
FRAME_GAP = 5.0
# How long an answer may wait for the guest to read it. The shim reads the wire throughout its
# exchange and gives up after its own deadline (tdx_sw_module.timeout_ms, 10 s by default): an
# answer still unread by then has no reader.
SEND_TIMEOUT = 10.0
# Bytes queued for a guest that reads slowly. The shim has one exchange on the wire at a time,
# so a guest that reads never leaves more than an answer and a report waiting.
OUTBOX_LIMIT = 4 * (HEADER.size + MAX_PAYLOAD + CRC.size)


@dataclass
class FramingRun:
    """The framing errors since the last valid frame. The first is reported at once (a guest
    whose frame was corrupted hears it, with its seq, without waiting for its deadline); the rest
    are counted and summed up in one report when a valid frame ends the run, so a flood of bad
    bytes gets two reports however long it is."""

    errors: int = 0
    dropped: int = 0  # bytes

    def summary(self) -> str:
        return f"{self.errors} framing errors, {self.dropped} bytes dropped before this frame"


class Channel:
    """Frames over a connected stream socket, with deadlines both ways.

    Receiving: every receive has a deadline; bad bytes are reported to the guest per FramingRun
    and recorded (the first MAX_REPORTS, and a count). Sending never blocks: frames go to an
    outbox that the receive loop flushes whenever the socket takes bytes, so a guest that does
    not read cannot stop the server reading. Answers always queue; a framing report is dropped
    unless the outbox is empty. A guest that leaves an answer unread for ``send_timeout``, or
    lets OUTBOX_LIMIT bytes pile up, is dropped (ChannelDropped)."""

    def __init__(self, sock: socket.socket, frame_gap: float = FRAME_GAP, send_timeout: float = SEND_TIMEOUT) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.frame_gap = frame_gap
        self.send_timeout = send_timeout
        self.last_data = time.monotonic()
        self.decoder = Decoder()
        self.pending: deque[Frame] = deque()
        self.framing_errors: FirstReports[FramingError] = FirstReports()
        self.run = FramingRun()
        self.reports_dropped = 0
        self.outbox = bytearray()
        self.answer_due: Deadline | None = None  # the oldest queued answer must be sent by then
        self.selector = selectors.DefaultSelector()
        self.events = selectors.EVENT_READ
        self.selector.register(sock, self.events)

    def send(self, frame: Frame) -> None:
        """Queue an answer and send what the socket takes now."""
        self.outbox += frame.encode()
        if len(self.outbox) > OUTBOX_LIMIT:
            raise ChannelDropped(f"the guest did not read its answers: {len(self.outbox)} bytes queued, "
                                 f"limit {OUTBOX_LIMIT}")
        if self.answer_due is None:
            self.answer_due = Deadline.after(self.send_timeout)
        self._flush()

    def _report(self, frame: Frame) -> None:
        """A framing report goes out only when nothing waits before it: it never holds up an
        answer, and reports never pile up for a guest that does not read."""
        if self.outbox:
            self.reports_dropped += 1
            return
        self.outbox += frame.encode()
        self._flush()

    def _flush(self) -> None:
        while self.outbox:
            try:
                sent = self.sock.send(self.outbox)
            except BlockingIOError:
                break
            except OSError as err:
                raise ChannelClosed(f"sending to the guest: {err}") from err
            del self.outbox[:sent]
        if not self.outbox:
            self.answer_due = None
        elif self.answer_due is not None and self.answer_due.expired():
            raise ChannelDropped(f"the guest did not read its answers: {len(self.outbox)} bytes unsent after "
                                 f"{self.send_timeout:.1f}s")

    def recv(self, deadline: Deadline, awaiting: str, exchange: int | None = None) -> Frame:
        """The next frame. ``exchange``: the seq of the exchange in progress; a corrupted frame
        that claims it ends the exchange at once (the guest was told with an ERROR frame and
        gives up on it), instead of after the deadline."""
        while not self.pending:
            if deadline.expired():
                raise TransportTimeout(f"no {awaiting} from the guest within {deadline.seconds:.1f}s")
            self._flush()
            if self._wait(deadline) & selectors.EVENT_READ:
                self._read(awaiting, exchange)
            elif self.decoder.buffer and time.monotonic() - self.last_data >= self.frame_gap:
                self._take(self.decoder.expire(), exchange)
        return self.pending.popleft()

    def _wait(self, deadline: Deadline) -> int:
        """Wait until the socket is readable (or writable, with bytes queued) or a deadline comes:
        the caller's, the partial frame's gap, the queued answer's, or WAKE."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0)
        if events != self.events:
            self.selector.modify(self.sock, events)
            self.events = events
        wait = min(deadline.remaining(), WAKE)
        if self.decoder.buffer:
            wait = min(wait, max(0.0, self.last_data + self.frame_gap - time.monotonic()))
        if self.answer_due is not None:
            wait = min(wait, self.answer_due.remaining())
        ready = 0
        for _, mask in self.selector.select(timeout=wait):
            ready |= mask
        return ready

    def _read(self, awaiting: str, exchange: int | None) -> None:
        try:
            data = self.sock.recv(RECV_CHUNK)
        except BlockingIOError:
            return
        except OSError as err:
            raise ChannelClosed(f"waiting for {awaiting}: {err}") from err
        if not data:
            raise ChannelClosed(f"guest closed the channel while the server waited for {awaiting}")
        self.last_data = time.monotonic()
        self._take(self.decoder.feed(data), exchange)

    def _take(self, items: list[Frame | FramingError], exchange: int | None) -> None:
        hit: FramingError | None = None
        for item in items:
            if isinstance(item, FramingError):
                self._framing_error(item)
                if exchange is not None and item.seq == exchange:
                    hit = hit or item
            else:
                self._end_run()
                self.pending.append(item)
        if hit is not None:
            raise ProtocolError(f"a frame of exchange {exchange} was corrupted ({hit.reason})")

    def _framing_error(self, error: FramingError) -> None:
        self.framing_errors.append(error)
        if not self.run.errors:
            log.error("%s", error)
            self._report(ErrorPayload(ErrorCode.FRAMING, error.reason).frame(error.seq or 0))
        self.run.errors += 1
        self.run.dropped += error.size

    def _end_run(self) -> None:
        if self.run.errors > 1:
            summary = self.run.summary()
            log.error("%s", summary)
            self._report(ErrorPayload(ErrorCode.FRAMING, summary).frame(0))
        self.run = FramingRun()

    def close(self) -> None:
        self.selector.close()
        self.sock.close()


@dataclass
class WireMemory:
    """Guest physical memory reached by MEM_READ/MEM_WRITE inside one CALL exchange."""

    channel: Channel
    seq: int
    timeout: float

    def _exchange(self, request: MemRequest, reply_type: FrameType) -> MemReply:
        self.channel.send(request.frame(self.seq))
        frame = self.channel.recv(Deadline.after(self.timeout), reply_type.name, exchange=self.seq)
        if frame.type in (FrameType.CALL, FrameType.HELLO):
            # A new request: the guest gave up on this exchange (its deadline passed, or it
            # rebooted) or two CPUs talk at once. Fail this one, but serve the new one next
            # rather than drop it, so its CPU gets an answer instead of its own timeout.
            self.channel.pending.appendleft(frame)
            raise ProtocolError(f"{frame.type.name} seq {frame.seq} arrived while exchange {self.seq} waited for "
                                f"{reply_type.name}: one exchange at a time", sent=request, received=frame)
        if frame.type is not reply_type or frame.seq != self.seq:
            raise ProtocolError(f"expected {reply_type.name} seq {self.seq}", sent=request, received=frame)
        reply = MemReply.parse(frame)
        if (reply.pa, reply.length) != (request.pa, request.length):
            raise ProtocolError("memory reply for another range", sent=request, received=reply)
        if reply.status:
            why = MEM_STATUS.get(reply.status, "unknown status")
            raise MemoryAccessError(request.pa, request.length, f"guest refused (status {reply.status}: {why})")
        return reply

    def read(self, pa: int, size: int) -> bytes:
        out = bytearray()
        while size:
            chunk = min(size, MAX_MEM_CHUNK - pa % MAX_MEM_CHUNK)
            reply = self._exchange(MemRequest(pa, chunk), FrameType.MEM_DATA)
            if len(reply.data) != chunk:
                raise ProtocolError(f"MEM_DATA carries {len(reply.data)} bytes, expected {chunk}", received=reply)
            out += reply.data
            pa, size = pa + chunk, size - chunk
        return bytes(out)

    def write(self, pa: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            chunk = min(len(view), MAX_MEM_CHUNK - pa % MAX_MEM_CHUNK)
            self._exchange(MemRequest(pa, chunk, bytes(view[:chunk])), FrameType.MEM_ACK)
            pa, view = pa + chunk, view[chunk:]


class SeamServer:
    """Listens for the emulator's COM2 connection and serves the module on a thread.

    ``address`` is a filesystem path (Unix socket) or ("127.0.0.1", port) (TCP, port 0 picks a
    free one: read ``address`` after construction). ``mem_timeout`` bounds each MEM_* answer,
    ``send_timeout`` how long an answer may wait for the guest to read it.

    No deadline applies between exchanges: the shim only talks when its kernel issues a
    SEAMCALL, which may not happen for minutes (a booted guest with no TD activity), and the
    emulator connects COM2 once, so a quiet guest that was dropped would lose its module for
    the rest of its life. One guest at a time: each machine has its own server.
    """

    def __init__(self, module: TdxModule, address: str | Path | tuple[str, int], mem_timeout: float = 30.0,
                 frame_gap: float = FRAME_GAP, send_timeout: float = SEND_TIMEOUT) -> None:
        self.module = module
        self.mem_timeout = mem_timeout
        self.frame_gap = frame_gap
        self.send_timeout = send_timeout
        self.lock = threading.Lock()  # held while the module runs a call; tests take it to change plans
        self.errors: FirstReports[TransportError] = FirstReports()  # across connections
        self.calls = 0
        # The seq of the last RETURN sent and the trace's length then: the guest may refuse it.
        self._answered: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._channel: Channel | None = None
        if isinstance(address, tuple):
            self.listener = socket.create_server(address)
            self.address: str | tuple[str, int] = self.listener.getsockname()[:2]
        else:
            path = str(address)
            if os.path.exists(path):
                os.unlink(path)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.listener.listen(1)
            self.address = path
        self.listener.settimeout(ACCEPT_POLL)
        self.thread = threading.Thread(target=self._run, name="seam-server", daemon=True)

    def start(self) -> SeamServer:
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        channel = self._channel  # once: the serving thread clears it when the guest goes
        if channel is not None:
            with contextlib.suppress(OSError):  # the guest may have gone already
                channel.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout)
        self.listener.close()
        if isinstance(self.address, str) and os.path.exists(self.address):
            os.unlink(self.address)

    def __enter__(self) -> SeamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            log.info("guest connected to the module on %s", self.address)
            channel = Channel(sock, self.frame_gap, self.send_timeout)
            self._channel = channel
            try:
                self._serve(channel)
            except ChannelClosed as err:
                if not self._stop.is_set():
                    log.info("module channel closed: %s", err)
            except ChannelDropped as err:
                log.error("dropped the guest connection: %s", err)
                self._record(err, f"module server dropped the guest connection: {err}")
            except Exception as err:  # a server bug: report it, drop this connection, keep listening
                log.exception("module channel failed")
                self._record(TransportError(f"server failed: {err!r}"),
                             f"module server dropped the guest connection: {err!r}")
            finally:
                self._channel = None
                channel.close()
                self._record_framing(channel)

    def _record(self, err: TransportError, anomaly: str) -> bool:
        """Keep ``err`` and tell the module; whether it was kept (past MAX_REPORTS a flood of
        bad frames is only counted, and not logged either)."""
        self.module.anomaly(anomaly)
        return self.errors.append(err)

    def _record_framing(self, channel: Channel) -> None:
        """The guest was answered with ERROR frames; the module keeps the record."""
        for bad in channel.framing_errors:
            self.module.anomaly(f"bad frame from the guest: {bad}")
        if channel.framing_errors.dropped:
            self.module.anomaly(f"{channel.framing_errors.dropped} more bad frames from the guest (counted, not kept)")

    def _serve(self, channel: Channel) -> None:
        idle = Deadline.after(float("inf"))  # between exchanges the guest may be silent for ever (see class)
        while not self._stop.is_set():
            frame = channel.recv(idle, "HELLO or CALL")
            try:
                self._handle(channel, frame)
            except (ChannelClosed, ChannelDropped):
                raise
            except (ProtocolError, TransportTimeout) as err:
                self._fail(channel, frame, ErrorCode.PROTOCOL, err)
            except Exception as err:
                # A module (or server) bug on input nobody expected: the guest still gets an
                # answer (its SEAMCALL fails), the run records it, and the channel lives on.
                log.exception("exchange %d (%s): internal error", frame.seq, frame.type.name)
                self._fail(channel, frame, ErrorCode.INTERNAL, err)

    def _fail(self, channel: Channel, frame: Frame, code: ErrorCode, err: Exception) -> None:
        text = str(err) if code is ErrorCode.PROTOCOL else f"internal error: {err!r}"
        if self._record(err if isinstance(err, TransportError) else TransportError(text),
                        f"exchange {frame.seq} ({frame.type.name}) failed: {text}"):
            log.error("exchange %d failed: %s", frame.seq, text)
        channel.send(ErrorPayload(code, text).frame(frame.seq))

    def _handle(self, channel: Channel, frame: Frame) -> None:
        answered, self._answered = self._answered, None
        if frame.type is FrameType.HELLO:
            hello = Hello.parse(frame)
            if hello.proto_version != PROTO_VERSION:
                raise ProtocolError(f"shim speaks protocol {hello.proto_version}, server {PROTO_VERSION}",
                                    received=hello)
            with self.lock:
                ack = self.module.hello(hello.nr_cpus, hello.boot_apic_id)
            channel.send(HelloAckPayload(**dataclasses.asdict(ack)).frame(frame.seq))
        elif frame.type is FrameType.CALL:
            call = CallPayload.parse(frame)
            request = SeamcallRequest(call.apic_id, call.fn, call.regs, Variant(call.variant), call.sites)
            memory = WireMemory(channel, frame.seq, self.mem_timeout)
            with self.lock:
                result = self.module.call(request, memory)
                self.calls += 1
            if result.withheld:
                log.info("exchange %d: RETURN withheld by the fault plan", frame.seq)
                return
            channel.send(ReturnPayload(result.status, result.regs).frame(frame.seq))
            self._answered = (frame.seq, len(self.module.trace))
        elif frame.type is FrameType.ERROR:
            error = ErrorPayload.parse(frame)
            text = text_excerpt(error.text)
            if answered == (frame.seq, len(self.module.trace)):
                # About the RETURN just sent (corrupted on the way, or refused): the kernel got
                # VMFAILINVALID, so the call's record must not stand as it is.
                with self.lock:
                    anomaly = self.module.return_refused(f"{error.code.name}: {text}")
                if self.errors.append(ProtocolError(anomaly)):
                    log.error("%s", anomaly)
                return
            if self._record(ProtocolError(f"guest reported {error.code.name}: {text}"),
                            f"guest reported a {error.code.name} error: {text}"):
                log.error("guest reported %s error: %s", error.code.name, text)
        else:
            raise ProtocolError(f"unexpected {frame.type.name} outside an exchange", received=frame)
