"""Serves the software module to a guest: one emulator COM2 connection on a Unix (QEMU) or TCP
(Bochs) socket, frames in, module calls, frames out. The guest is a client of this server, so
the server is listening before the emulator starts."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from harness.deadline import Deadline
from harness.seam.memory import MemoryAccessError
from harness.seam.module import SeamcallRequest, TdxModule, Variant
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


class Channel:
    """Frames over a connected stream socket; every receive has a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
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

    def recv(self, deadline: Deadline, awaiting: str) -> Frame:
        while not self.pending:
            if deadline.expired():
                raise TransportTimeout(f"no {awaiting} from the guest within {deadline.seconds:.1f}s")
            # Wake at least every second so a stopped server notices (idle waits have no end).
            if not self.selector.select(timeout=min(deadline.remaining(), 1.0)):
                continue
            try:
                data = self.sock.recv(65536)
            except OSError as err:
                raise ChannelClosed(f"waiting for {awaiting}: {err}") from err
            if not data:
                raise ChannelClosed(f"guest closed the channel while the server waited for {awaiting}")
            for item in self.decoder.feed(data):
                if isinstance(item, FramingError):
                    log.error("%s", item)
                    self.framing_errors.append(item)
                    self.send(ErrorPayload(ErrorCode.FRAMING, item.reason).frame(item.seq))
                else:
                    self.pending.append(item)
        return self.pending.popleft()

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
        frame = self.channel.recv(Deadline.after(self.timeout), reply_type.name)
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

    def __init__(self, module: TdxModule, address: str | Path | tuple[str, int], mem_timeout: float = 30.0) -> None:
        self.module = module
        self.mem_timeout = mem_timeout
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
            self._channel = Channel(sock)
            try:
                self._serve(self._channel)
            except ChannelClosed as err:
                if not self._stop.is_set():
                    log.info("module channel closed: %s", err)
            finally:
                self._channel.close()
                self._channel = None

    def _serve(self, channel: Channel) -> None:
        idle = Deadline.after(float("inf"))  # between exchanges the guest may be silent for ever
        while not self._stop.is_set():
            frame = channel.recv(idle, "HELLO or CALL")
            try:
                self._handle(channel, frame)
            except (ProtocolError, TransportTimeout) as err:
                log.error("exchange %d failed: %s", frame.seq, err)
                self.errors.append(err)
                self.module.anomaly(f"exchange {frame.seq} ({frame.type.name}) failed: {err}")
                channel.send(ErrorPayload(ErrorCode.PROTOCOL, str(err)).frame(frame.seq))

    def _handle(self, channel: Channel, frame: Frame) -> None:
        if frame.type is FrameType.HELLO:
            hello = Hello.parse(frame)
            if hello.proto_version != PROTO_VERSION:
                raise ProtocolError(f"shim speaks protocol {hello.proto_version}, server {PROTO_VERSION}",
                                    received=hello)
            with self.lock:
                ack = self.module.hello(hello.nr_cpus, hello.boot_apic_id)
            channel.send(HelloAckPayload(ack.module_present, ack.nr_mktme_keyids, ack.nr_tdx_keyids).frame(frame.seq))
        elif frame.type is FrameType.CALL:
            call = CallPayload.parse(frame)
            request = SeamcallRequest(call.apic_id, call.fn, call.regs, Variant(call.variant))
            memory = WireMemory(channel, frame.seq, self.mem_timeout)
            with self.lock:
                result = self.module.call(request, memory)
                self.calls += 1
            channel.send(ReturnPayload(result.status, result.regs).frame(frame.seq))
        elif frame.type is FrameType.ERROR:
            error = ErrorPayload.parse(frame)
            log.error("guest reported %s error: %s", error.code.name, error.text)
            self.errors.append(ProtocolError(f"guest reported {error.code.name}: {error.text}"))
        else:
            raise ProtocolError(f"unexpected {frame.type.name} outside an exchange", received=frame)
