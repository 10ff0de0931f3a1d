"""Transport errors, split as QMP splits them: bad bytes, a bad exchange, a closed channel."""

from __future__ import annotations


class TransportError(Exception):
    """Root of the transport layer's errors."""


class FramingError(TransportError):
    """Bytes that are not a valid frame; ``raw`` holds them (the message shows 64 bytes);
    ``seq`` is the sequence number the header claimed, None when there was no header."""

    def __init__(self, reason: str, raw: bytes, seq: int | None = None) -> None:
        super().__init__(f"bad frame: {reason}; raw bytes: {raw[:64].hex(' ')}{' ...' if len(raw) > 64 else ''}")
        self.reason, self.raw, self.seq = reason, raw, seq


class ProtocolError(TransportError):
    """A valid frame that does not fit the exchange (wrong type, seq or payload)."""

    def __init__(self, reason: str, sent: object = None, received: object = None) -> None:
        super().__init__(f"{reason} (sent: {sent!r}, received: {received!r})")
        self.sent, self.received = sent, received


class ChannelClosed(TransportError):
    """The peer closed the channel (the emulator exited) in the middle of an exchange."""


class TransportTimeout(TransportError):
    """No answer before the deadline."""
