"""Frame codec for docs/transport.md: encoding, a resynchronizing stream decoder, and the
payload layouts of each frame type."""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

from harness.seam.sites import NO_SITE, NR_SITES, RawSite, SiteKind
from harness.seam.trace import REGISTERS
from harness.transport.errors import FramingError, ProtocolError

MAGIC = b"TX"
HEADER = struct.Struct("<2sBBHH")  # magic, type, flags, seq, length
CRC = struct.Struct("<I")
MAX_PAYLOAD = 4160
MAX_MEM_CHUNK = 4096
PROTO_VERSION = 2  # 2: CALL carries its call sites
NR_REGS = len(REGISTERS)  # struct tdx_module_args, in the order the trace names them


class FrameType(enum.IntEnum):
    HELLO = 0x01
    CALL = 0x02
    MEM_DATA = 0x03
    MEM_ACK = 0x04
    ERROR = 0x7F
    HELLO_ACK = 0x81
    RETURN = 0x82
    MEM_READ = 0x83
    MEM_WRITE = 0x84


# MEM_DATA / MEM_ACK status: why the guest did not serve a request (0: it did).
MEM_STATUS = {
    1: "not RAM",
    2: "missing or read-only in the guest's direct map",
    3: "MEM_WRITE outside the buffer the kernel passed for the call",
}


class ErrorCode(enum.IntEnum):
    FRAMING = 1
    PROTOCOL = 2
    INTERNAL = 3


@dataclass(frozen=True)
class Frame:
    type: FrameType
    seq: int
    payload: bytes = b""

    def encode(self) -> bytes:
        if len(self.payload) > MAX_PAYLOAD:
            raise ValueError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")
        head = HEADER.pack(MAGIC, self.type, 0, self.seq & 0xFFFF, len(self.payload))
        return head + self.payload + CRC.pack(zlib.crc32(head + self.payload))


class Decoder:
    """Turns a byte stream into frames. Garbage before a magic, bad types, oversized lengths and
    bad CRCs are reported as FramingError items and skipped, so one bad frame never wedges the
    stream; ``expire()`` gives up on a partial frame when the peer has gone quiet. Between
    feeds the buffer holds at most one partial frame (or a lone first magic byte): garbage is
    dropped as it is found, and ``max_buffer`` is a second bound on top."""

    def __init__(self, max_buffer: int = 4 * (HEADER.size + MAX_PAYLOAD + CRC.size)) -> None:
        self.buffer = bytearray()
        self.max_buffer = max_buffer

    def feed(self, data: bytes) -> list[Frame | FramingError]:
        self.buffer += data
        out: list[Frame | FramingError] = []
        while True:
            item = self._next()
            if item is None:
                break
            out.append(item)
        if len(self.buffer) > self.max_buffer:
            dropped = bytes(self.buffer)
            self.buffer.clear()
            out.append(FramingError(f"read buffer limit of {self.max_buffer} bytes exceeded", dropped))
        return out

    def _next(self) -> Frame | FramingError | None:
        buf = self.buffer
        start = buf.find(MAGIC)
        if start < 0:
            # Keep a trailing first magic byte: the rest may arrive in the next chunk.
            keep = 1 if buf.endswith(MAGIC[:1]) else 0
            if len(buf) > keep:
                garbage = bytes(buf[:len(buf) - keep])
                del buf[:len(buf) - keep]
                return FramingError("no magic", garbage)
            return None
        if start:
            garbage = bytes(buf[:start])
            del buf[:start]
            return FramingError("bytes before magic", garbage)
        if len(buf) < HEADER.size:
            return None
        _, ftype, flags, seq, length = HEADER.unpack_from(buf)
        if length > MAX_PAYLOAD:
            raw = bytes(buf[:HEADER.size])
            # Only the magic goes: the bytes after a bogus header may hold the next frame.
            del buf[:len(MAGIC)]
            return FramingError(f"length {length} exceeds {MAX_PAYLOAD}", raw, seq, size=len(MAGIC))
        total = HEADER.size + length + CRC.size
        if len(buf) < total:
            return None
        raw = bytes(buf[:total])
        (crc,) = CRC.unpack_from(raw, HEADER.size + length)
        if crc != zlib.crc32(raw[:HEADER.size + length]):
            end = _resync_point(buf, total)
            del buf[:end]
            return FramingError(f"CRC mismatch (frame says {crc:#010x})", raw[:end], seq)
        if ftype not in FrameType.__members__.values() or flags:
            del buf[:total]
            return FramingError(f"unknown type {ftype:#04x} or flags {flags:#04x}", raw, seq)
        del buf[:total]
        return Frame(FrameType(ftype), seq, raw[HEADER.size:HEADER.size + length])

    def expire(self) -> list[Frame | FramingError]:
        """The peer went quiet with a partial frame (or a lone first magic byte) buffered: it
        will never complete, so report it as truncated and resynchronize at the next magic
        after its own (a frame that followed the lost bytes is still found)."""
        buf = self.buffer
        if not buf:
            return []
        seq: int | None = None
        reason = f"truncated frame: {len(buf)} bytes and then silence"
        if buf.startswith(MAGIC) and len(buf) >= HEADER.size:
            _, _, _, seq, length = HEADER.unpack_from(buf)
            reason = (f"truncated frame: {len(buf)} of the {HEADER.size + length + CRC.size} bytes "
                      f"its header announces, and then silence")
        cut = buf.find(MAGIC, 1)
        cut = cut if cut > 0 else len(buf)
        raw = bytes(buf[:cut])
        del buf[:cut]
        return [FramingError(reason, raw, seq), *self.feed(b"")]


def _resync_point(buf: bytearray, total: int) -> int:
    """Where to resume after a frame of ``total`` bytes failed its CRC: at the next magic inside
    it. If the frame lost bytes, its length swallowed the start of the next frame, which must
    still be found (what is left of a frame that was merely corrupted is reported as garbage).
    A frame one byte short ends on the next magic's first byte: its second may not have
    arrived yet, so that byte is kept too (the next search drops it if no magic follows)."""
    cut = buf.find(MAGIC, len(MAGIC), total)
    if cut > 0:
        return cut
    return total - 1 if buf[total - 1:total] == MAGIC[:1] else total


# --- payloads ---------------------------------------------------------------------------------


def _unpack(fmt: struct.Struct, frame: Frame, name: str, exact: bool = False) -> tuple[int, ...]:
    """The fixed part of a payload. ``exact``: the payload is only that part (a longer one means
    the peer has another idea of the layout, e.g. a shim built with another register count)."""
    if len(frame.payload) < fmt.size or (exact and len(frame.payload) != fmt.size):
        raise ProtocolError(f"{name} payload is {len(frame.payload)} bytes, expected {fmt.size}",
                            received=frame)
    return fmt.unpack_from(frame.payload)


@dataclass(frozen=True)
class Hello:
    FMT = struct.Struct("<4I")
    proto_version: int
    nr_cpus: int
    boot_apic_id: int

    def frame(self, seq: int) -> Frame:
        return Frame(FrameType.HELLO, seq, self.FMT.pack(self.proto_version, self.nr_cpus, self.boot_apic_id, 0))

    @classmethod
    def parse(cls, frame: Frame) -> Hello:
        version, cpus, apic, _ = _unpack(cls.FMT, frame, "HELLO", exact=True)
        return cls(version, cpus, apic)


# HELLO_ACK flags
HELLO_MODULE_PRESENT = 1 << 0
HELLO_NO_SEAMRET_INVD_VMCS = 1 << 1  # IA32_VMX_BASIC bit 60 of the platform's CPUs


@dataclass(frozen=True)
class HelloAckPayload:
    FMT = struct.Struct("<4I")
    module_present: bool
    nr_mktme_keyids: int
    nr_tdx_keyids: int
    no_seamret_invd_vmcs: bool = False

    def frame(self, seq: int) -> Frame:
        flags = (HELLO_MODULE_PRESENT if self.module_present else 0) | \
            (HELLO_NO_SEAMRET_INVD_VMCS if self.no_seamret_invd_vmcs else 0)
        return Frame(FrameType.HELLO_ACK, seq, self.FMT.pack(PROTO_VERSION, flags, self.nr_mktme_keyids,
                                                             self.nr_tdx_keyids))

    @classmethod
    def parse(cls, frame: Frame) -> HelloAckPayload:
        _, flags, mktme, tdx = _unpack(cls.FMT, frame, "HELLO_ACK", exact=True)
        return cls(bool(flags & HELLO_MODULE_PRESENT), mktme, tdx, bool(flags & HELLO_NO_SEAMRET_INVD_VMCS))


@dataclass(frozen=True)
class CallPayload:
    """The fixed part, then NR_SITES sites: ``u64 addr, u8 kind, u8 name_len, name``."""

    FMT = struct.Struct(f"<IB3xQ{NR_REGS}Q")
    SITE = struct.Struct("<QBB")
    apic_id: int
    variant: int
    fn: int
    regs: tuple[int, ...]
    sites: tuple[RawSite, ...] = (NO_SITE,) * NR_SITES

    def frame(self, seq: int) -> Frame:
        data = self.FMT.pack(self.apic_id, self.variant, self.fn, *self.regs)
        for site in self.sites:
            name = site.module.encode()
            data += self.SITE.pack(site.addr, site.kind, len(name)) + name
        return Frame(FrameType.CALL, seq, data)

    @classmethod
    def parse(cls, frame: Frame) -> CallPayload:
        apic, variant, fn, *regs = _unpack(cls.FMT, frame, "CALL")
        if variant > 2:
            raise ProtocolError(f"CALL variant {variant} is not 0, 1 or 2", received=frame)
        payload, offset = frame.payload, cls.FMT.size
        sites: list[RawSite] = []
        for _ in range(NR_SITES):
            if len(payload) < offset + cls.SITE.size:
                raise ProtocolError(f"CALL payload of {len(payload)} bytes ends inside its sites", received=frame)
            addr, kind, name_len = cls.SITE.unpack_from(payload, offset)
            offset += cls.SITE.size
            name = payload[offset:offset + name_len]
            offset += name_len
            if len(name) != name_len or kind not in SiteKind.__members__.values():
                raise ProtocolError(f"CALL site {len(sites)} of kind {kind} with a {name_len}-byte name "
                                    f"does not fit the payload", received=frame)
            sites.append(RawSite(SiteKind(kind), addr, name.decode(errors="replace")))
        if offset != len(payload):
            raise ProtocolError(f"CALL payload is {len(payload)} bytes, its sites end at {offset}", received=frame)
        return cls(apic, variant, fn, tuple(regs), tuple(sites))


@dataclass(frozen=True)
class ReturnPayload:
    FMT = struct.Struct(f"<Q{NR_REGS}Q")
    status: int
    regs: tuple[int, ...]

    def frame(self, seq: int) -> Frame:
        return Frame(FrameType.RETURN, seq, self.FMT.pack(self.status, *self.regs))

    @classmethod
    def parse(cls, frame: Frame) -> ReturnPayload:
        status, *regs = _unpack(cls.FMT, frame, "RETURN", exact=True)
        return cls(status, tuple(regs))


@dataclass(frozen=True)
class MemRequest:
    """MEM_READ (no data) or MEM_WRITE (with data) from the host."""

    FMT = struct.Struct("<QII")
    pa: int
    length: int
    data: bytes = b""

    def frame(self, seq: int) -> Frame:
        ftype = FrameType.MEM_WRITE if self.data else FrameType.MEM_READ
        return Frame(ftype, seq, self.FMT.pack(self.pa, self.length, 0) + self.data)

    @classmethod
    def parse(cls, frame: Frame) -> MemRequest:
        pa, length, _ = _unpack(cls.FMT, frame, frame.type.name)
        data = frame.payload[cls.FMT.size:]
        if not 0 < length <= MAX_MEM_CHUNK or (frame.type is FrameType.MEM_WRITE and len(data) != length):
            raise ProtocolError(f"{frame.type.name} of {length} bytes with {len(data)} data bytes", received=frame)
        return cls(pa, length, data)


@dataclass(frozen=True)
class MemReply:
    """MEM_DATA (with data when status is 0) or MEM_ACK from the guest."""

    FMT = struct.Struct("<QII")
    pa: int
    length: int
    status: int
    data: bytes = b""

    def frame(self, seq: int, ftype: FrameType) -> Frame:
        return Frame(ftype, seq, self.FMT.pack(self.pa, self.length, self.status) + self.data)

    @classmethod
    def parse(cls, frame: Frame) -> MemReply:
        pa, length, status = _unpack(cls.FMT, frame, frame.type.name)
        return cls(pa, length, status, frame.payload[cls.FMT.size:])


@dataclass(frozen=True)
class ErrorPayload:
    code: ErrorCode
    text: str

    def frame(self, seq: int) -> Frame:
        data = self.text.encode()[:MAX_PAYLOAD - 4]
        return Frame(FrameType.ERROR, seq, struct.pack("<I", self.code) + data)

    @classmethod
    def parse(cls, frame: Frame) -> ErrorPayload:
        (code,) = struct.unpack_from("<I", frame.payload) if len(frame.payload) >= 4 else (ErrorCode.PROTOCOL,)
        try:
            kind = ErrorCode(code)
        except ValueError:
            kind = ErrorCode.PROTOCOL
        return cls(kind, frame.payload[4:].decode(errors="replace"))
