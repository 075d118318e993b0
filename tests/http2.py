"""A raw HTTP/2 client's frames, for tests of clients that misbehave in ways grpc's own client
cannot be made to: connect and never call, stop reading, grant no flow-control window. Only what is
sent is built here; headers are HPACK literals without indexing (no table, no Huffman)."""

from __future__ import annotations

import struct

from google.protobuf.message import Message

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS = 0x0, 0x1, 0x4
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream_id) + payload


def opening(initial_window: int | None = None) -> bytes:
    """The preface and the client's SETTINGS (an initial stream window, if given), and an ACK of the
    server's SETTINGS, which a client sends as soon as it reads them (the server's never change)."""
    settings = b"" if initial_window is None else struct.pack(">HI", INITIAL_WINDOW_SIZE, initial_window)
    return PREFACE + frame(SETTINGS, 0, 0, settings) + frame(SETTINGS, ACK, 0)


def grpc_call(stream_id: int, path: str, request: Message, metadata: dict[str, str]) -> bytes:
    """HEADERS and one DATA frame (the length-prefixed request, END_STREAM) of a unary-request call."""
    headers = {
        ":method": "POST",
        ":scheme": "http",
        ":path": path,
        ":authority": "localhost",
        "content-type": "application/grpc",
        "te": "trailers",
        **metadata,
    }
    block = b"".join(b"\x00" + _string(name) + _string(value) for name, value in headers.items())
    body = request.SerializeToString()
    message = b"\x00" + struct.pack(">I", len(body)) + body
    return frame(HEADERS, END_HEADERS, stream_id, block) + frame(DATA, END_STREAM, stream_id, message)


def _string(text: str) -> bytes:
    """An HPACK string literal, not Huffman-coded: its length as a 7-bit-prefix integer, then its bytes."""
    raw = text.encode()
    if len(raw) < 0x7F:
        return bytes([len(raw)]) + raw
    length, prefix = len(raw) - 0x7F, b"\x7f"
    while length >= 0x80:
        prefix += bytes([(length & 0x7F) | 0x80])
        length >>= 7
    return prefix + bytes([length]) + raw
