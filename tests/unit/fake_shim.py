"""The guest side of docs/transport.md in Python: what the kernel shim does, used to test the
server without a VM (and by the benchmark)."""

from __future__ import annotations

import socket

from harness.deadline import Deadline
from harness.seam.memory import MemoryAccessError, SparseMemory
from harness.transport.errors import ChannelClosed, ProtocolError
from harness.transport.frames import (
    PROTO_VERSION,
    CallPayload,
    Decoder,
    ErrorPayload,
    Frame,
    FrameType,
    Hello,
    HelloAckPayload,
    MemReply,
    MemRequest,
    ReturnPayload,
)


class FakeShim:
    def __init__(self, address: str, memory: SparseMemory, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address)
        self.memory = memory
        self.timeout = timeout
        self.decoder = Decoder()
        self.pending: list[Frame] = []
        self.seq = 0

    def _recv(self) -> Frame:
        deadline = Deadline.after(self.timeout)
        while not self.pending:
            self.sock.settimeout(max(deadline.remaining(), 0.001))
            data = self.sock.recv(65536)
            if not data:
                raise ChannelClosed("server closed")
            for item in self.decoder.feed(data):
                if isinstance(item, Frame):
                    self.pending.append(item)
        return self.pending.pop(0)

    def hello(self, nr_cpus: int = 2) -> HelloAckPayload:
        self.seq += 1
        self.sock.sendall(Hello(PROTO_VERSION, nr_cpus, 0).frame(self.seq).encode())
        frame = self._recv()
        if frame.type is not FrameType.HELLO_ACK:
            raise ProtocolError("expected HELLO_ACK", received=frame)
        return HelloAckPayload.parse(frame)

    def seamcall(self, cpu: int, fn: int, regs: tuple[int, ...] = (0,) * 13, variant: int = 1) -> ReturnPayload:
        self.seq += 1
        self.sock.sendall(CallPayload(cpu, variant, fn, regs).frame(self.seq).encode())
        while True:
            frame = self._recv()
            if frame.type is FrameType.RETURN:
                return ReturnPayload.parse(frame)
            if frame.type is FrameType.ERROR:
                raise ProtocolError(ErrorPayload.parse(frame).text, received=frame)
            request = MemRequest.parse(frame)
            try:
                if frame.type is FrameType.MEM_READ:
                    reply = MemReply(request.pa, request.length, 0, self.memory.read(request.pa, request.length))
                else:
                    self.memory.write(request.pa, request.data)
                    reply = MemReply(request.pa, request.length, 0)
            except MemoryAccessError:
                reply = MemReply(request.pa, request.length, 1)
            reply_type = FrameType.MEM_DATA if frame.type is FrameType.MEM_READ else FrameType.MEM_ACK
            self.sock.sendall(reply.frame(frame.seq, reply_type).encode())

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> Frame:
        return self._recv()

    def close(self) -> None:
        self.sock.close()
