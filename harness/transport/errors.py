"""Transport errors, split as QMP splits them: bad bytes, a bad exchange, a closed channel.

Their messages quote what the peer sent only as excerpts (EXCERPT bytes, TEXT_EXCERPT
characters): a hostile peer's input must not grow the records and logs that hold them."""

from __future__ import annotations

import dataclasses

EXCERPT = 64  # bytes of a peer's frame an error keeps and shows
TEXT_EXCERPT = 256  # characters of a peer's error text a message shows


def hex_excerpt(data: bytes) -> str:
    return data[:EXCERPT].hex(" ") + (" ..." if len(data) > EXCERPT else "")


def text_excerpt(text: str) -> str:
    return text[:TEXT_EXCERPT] + (f" ... ({len(text)} characters)" if len(text) > TEXT_EXCERPT else "")


def describe(value: object) -> str:
    """``repr``, with bytes (a payload, memory data) cut to an excerpt, also inside dataclasses."""
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes: {hex_excerpt(bytes(value))}>"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{f.name}={describe(getattr(value, f.name))}"
                           for f in dataclasses.fields(value) if f.repr)
        return f"{type(value).__name__}({fields})"
    return repr(value)


class TransportError(Exception):
    """Root of the transport layer's errors."""


class FramingError(TransportError):
    """Bytes that are not a valid frame: ``raw`` holds the first EXCERPT of them; ``size`` is how
    many bytes of the stream were dropped (all of ``raw`` unless told); ``seq`` is the sequence
    number the header claimed, None when there was no header."""

    def __init__(self, reason: str, raw: bytes, seq: int | None = None, size: int | None = None) -> None:
        size = len(raw) if size is None else size
        super().__init__(f"bad frame: {reason} ({size} bytes dropped); raw bytes: {hex_excerpt(raw)}")
        self.reason, self.raw, self.size, self.seq = reason, raw[:EXCERPT], size, seq


class ProtocolError(TransportError):
    """A valid frame that does not fit the exchange (wrong type, seq or payload)."""

    def __init__(self, reason: str, sent: object = None, received: object = None) -> None:
        super().__init__(f"{reason} (sent: {describe(sent)}, received: {describe(received)})")
        self.sent, self.received = sent, received


class ChannelClosed(TransportError):
    """The peer closed the channel (the emulator exited) in the middle of an exchange."""


class ChannelDropped(TransportError):
    """The server closed the channel: the peer broke a bound the server holds it to (it did not
    read its answers)."""


class TransportTimeout(TransportError):
    """No answer before the deadline."""
