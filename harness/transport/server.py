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

from harness.deadline import Deadline
from harness.seam.call import SeamcallRequest, Variant
from harness.seam.memory import MemoryAccessError
from harness.seam.module import TdxModule
from harness.transport.errors import ChannelClosed, FramingError, ProtocolError, TransportError, TransportTimeout
from harness.transport.frames import (
    MAX_MEM_CHUNK,
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
# Silence after which a partial frame counts as truncated. The shim writes a frame in one go
# with interrupts off, so only a vCPU descheduled for this long stalls a frame; the shim's own
# exchange deadline (10 s by default) is longer, so the host reports first.
FRAME_GAP = 5.0


class Channel:
    """Frames over a connected stream socket; every receive has a deadline. Bad bytes are
    answered with an ERROR frame each (seq of the header they claimed, else 0) and recorded."""

    def __init__(self, sock: socket.socket, frame_gap: float = FRAME_GAP) -> None:
        self.sock = sock
        self.frame_gap = frame_gap
        self.last_data = time.monotonic()
        self.decoder = Decoder()
        self.pending: deque[Frame] = deque()
        self.framing_errors: list[FramingError] = []
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)

    def send(self, frame: Frame) -> None:
        try:
            self.sock.sendall(frame.encode())
        except OSError as err:
            raise ChannelClosed(f"sending {frame.type.name}: {err}") from err

    def recv(self, deadline: Deadline, awaiting: str, exchange: int | None = None) -> Frame:
        """The next frame. ``exchange``: the seq of the exchange in progress; a corrupted frame
        that claims it ends the exchange at once (the guest was told with an ERROR frame and
        gives up on it), instead of after the deadline."""
        while not self.pending:
            if deadline.expired():
                raise TransportTimeout(f"no {awaiting} from the guest within {deadline.seconds:.1f}s")
            # Wake at least every second so a stopped server notices (idle waits have no end),
            # and when a partial frame's gap runs out.
            wait = min(deadline.remaining(), 1.0)
            if self.decoder.buffer:
                wait = min(wait, max(0.0, self.last_data + self.frame_gap - time.monotonic()))
            if not self.selector.select(timeout=wait):
                if self.decoder.buffer and time.monotonic() - self.last_data >= self.frame_gap:
                    self._take(self.decoder.expire(), exchange)
                continue
            try:
                data = self.sock.recv(65536)
            except OSError as err:
                raise ChannelClosed(f"waiting for {awaiting}: {err}") from err
            if not data:
                raise ChannelClosed(f"guest closed the channel while the server waited for {awaiting}")
            self.last_data = time.monotonic()
            self._take(self.decoder.feed(data), exchange)
        return self.pending.popleft()

    def _take(self, items: list[Frame | FramingError], exchange: int | None) -> None:
        hit: FramingError | None = None
        for item in items:
            if isinstance(item, FramingError):
                log.error("%s", item)
                self.framing_errors.append(item)
                self.send(ErrorPayload(ErrorCode.FRAMING, item.reason).frame(item.seq or 0))
                if exchange is not None and item.seq == exchange:
                    hit = hit or item
            else:
                self.pending.append(item)
        if hit is not None:
            raise ProtocolError(f"a frame of exchange {exchange} was corrupted ({hit.reason})")

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
            raise MemoryAccessError(request.pa, request.length, f"guest refused (status {reply.status})")
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
    free one: read ``address`` after construction). ``mem_timeout`` bounds each MEM_* answer.
    """

    def __init__(self, module: TdxModule, address: str | Path | tuple[str, int], mem_timeout: float = 30.0,
                 frame_gap: float = FRAME_GAP) -> None:
        self.module = module
        self.mem_timeout = mem_timeout
        self.frame_gap = frame_gap
        self.lock = threading.Lock()  # held while the module runs a call; tests take it to change plans
        self.errors: list[TransportError] = []
        self.calls = 0
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
        if self._channel is not None:
            with contextlib.suppress(OSError):  # the guest may have gone already
                self._channel.sock.shutdown(socket.SHUT_RDWR)
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
            self._channel = Channel(sock, self.frame_gap)
            try:
                self._serve(self._channel)
            except ChannelClosed as err:
                if not self._stop.is_set():
                    log.info("module channel closed: %s", err)
            except Exception as err:  # a server bug: report it, drop this connection, keep listening
                log.exception("module channel failed")
                self.errors.append(TransportError(f"server failed: {err!r}"))
                self.module.anomaly(f"module server dropped the guest connection: {err!r}")
            finally:
                for bad in self._channel.framing_errors:  # answered with ERROR frames; the module keeps the record
                    self.module.anomaly(f"bad frame from the guest: {bad}")
                self._channel.close()
                self._channel = None

    def _serve(self, channel: Channel) -> None:
        idle = Deadline.after(float("inf"))  # between exchanges the guest may be silent for ever
        while not self._stop.is_set():
            frame = channel.recv(idle, "HELLO or CALL")
            try:
                self._handle(channel, frame)
            except ChannelClosed:
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
        log.error("exchange %d failed: %s", frame.seq, text)
        self.errors.append(err if isinstance(err, TransportError) else TransportError(text))
        self.module.anomaly(f"exchange {frame.seq} ({frame.type.name}) failed: {text}")
        channel.send(ErrorPayload(code, text).frame(frame.seq))

    def _handle(self, channel: Channel, frame: Frame) -> None:
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
            request = SeamcallRequest(call.apic_id, call.fn, call.regs, Variant(call.variant))
            memory = WireMemory(channel, frame.seq, self.mem_timeout)
            with self.lock:
                result = self.module.call(request, memory)
                self.calls += 1
            if result.withheld:
                log.info("exchange %d: RETURN withheld by the fault plan", frame.seq)
                return
            channel.send(ReturnPayload(result.status, result.regs).frame(frame.seq))
        elif frame.type is FrameType.ERROR:
            error = ErrorPayload.parse(frame)
            log.error("guest reported %s error: %s", error.code.name, error.text)
            self.errors.append(ProtocolError(f"guest reported {error.code.name}: {error.text}"))
            self.module.anomaly(f"guest reported a {error.code.name} error: {error.text}")
        else:
            raise ProtocolError(f"unexpected {frame.type.name} outside an exchange", received=frame)
