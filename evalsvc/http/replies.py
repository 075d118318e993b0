"""Reading an endpoint's reply with the work it may cost bounded, whatever the endpoint sends.

A reply was bounded only in decoded bytes, counted after httpx had produced them, so an endpoint could
make one call cost every tenant memory and event-loop time out of all proportion to what it sent:
- a 1.8 KB body of `Content-Encoding: gzip, gzip` was inflated whole (a GiB, 2 GB of RSS, the loop held
  for 9 s) before --max-reply-bytes was checked;
- a body in 1-byte HTTP chunks (6 bytes on the wire for each) cost an h11 event, a decoder call and a
  loop turn per byte: 100 s of CPU for 8 replies, every tenant's RPCs taking seconds meanwhile;
- an endless stream of `100 Continue` interim replies, which httpcore skips before the reply proper,
  was bounded by nothing but the attempt's timeout.

So each attempt is bounded three ways:
- **decoded bytes**: the body is read raw (`Accept-Encoding: identity` is asked for); at most one layer of
  gzip or deflate is decoded, incrementally, never producing more than the budget left plus one byte,
  so a bomb costs what its budget allows and no more; any other or stacked encoding is refused;
- **pieces**: at most `max_pieces(budget)` body pieces (network reads or HTTP chunks; a real reply of
  4 MiB arrives in a few hundred), so the CPU a reply costs is bounded by its size, not its framing;
- **bytes on the connection** (`AttemptReads`): the network stream counts what the attempt reads, at
  most HEADER_ALLOWANCE before the reply's headers are in (interim replies and huge headers included),
  then the reply's budget plus FRAMING_PER_PIECE bytes a piece (chunk sizes, trailers).
Past any of them the call fails for good (`OutboundError`, not retried: the endpoint would do it again),
so bad data fails only its own evaluation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import zlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any
from urllib.parse import quote

import httpcore
import httpx

from evalsvc.http.errors import OutboundError

# Bytes an attempt may read before its reply's headers are in: h11 refuses headers over 16 KiB, and a
# network read is at most 64 KiB, so a real reply's headers (and the body bytes read with them) fit;
# an endpoint's flood of `100 Continue` ends here, after a few thousand of them.
HEADER_ALLOWANCE = 128 * 1024
# Body pieces a reply may arrive in: one per 256 bytes of the reply budget, at least 16,384 (the same at
# the default 4 MiB). A network read or an HTTP chunk is a piece; real replies are sent in pieces of
# kilobytes, and each piece costs a fixed amount of parsing whatever its size.
MIN_REPLY_PIECES = 16_384
BYTES_PER_PIECE = 256
# Wire bytes allowed per piece besides the body's own: a chunk's size line and CRLFs (a few bytes),
# with room for short chunk extensions, and trailers.
FRAMING_PER_PIECE = 32
# Pieces read between two turns given to the event loop: a network read of 64 KiB in tiny chunks is
# thousands of pieces parsed without a pause otherwise (about 10 ms of work between turns).
PIECES_PER_TURN = 1024
# Content codings decoded (one layer at most), as zlib's window-bits: gzip, and deflate's zlib format.
DECODABLE = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def max_pieces(max_bytes: int) -> int:
    """The pieces a reply of at most `max_bytes` may arrive in."""
    return max(MIN_REPLY_PIECES, max_bytes // BYTES_PER_PIECE)


class AttemptReads:
    """The bytes one attempt may read from its connection, and has read. The network stream counts into
    the attempt whose task reads (`_attempt_reads`): connections are pooled, so the count is the
    attempt's, not the connection's."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.read = 0
        self.limit = HEADER_ALLOWANCE
        self._over = f"{host} sent more than {HEADER_ALLOWANCE} bytes before its reply's headers"

    def count(self, size: int) -> None:
        """Count bytes read; OutboundError past the limit (raised through httpcore, which closes the
        connection)."""
        self.read += size
        if self.read > self.limit:
            raise OutboundError(self._over)

    def allow_body(self, max_bytes: int) -> None:
        """The headers are in: the body may take the reply's budget and its framing on top."""
        self.limit = HEADER_ALLOWANCE + max_bytes + FRAMING_PER_PIECE * max_pieces(max_bytes)
        self._over = f"{self.host} sent more than {self.limit} bytes for a reply of at most {max_bytes}"


_attempt_reads: ContextVar[AttemptReads | None] = ContextVar("evalsvc_attempt_reads", default=None)


@contextlib.contextmanager
def attempt_reads(host: str) -> Iterator[AttemptReads]:
    """Count (and bound) what the calling task reads from outbound connections until the block ends."""
    reads = AttemptReads(host)
    token = _attempt_reads.set(reads)
    try:
        yield reads
    finally:
        _attempt_reads.reset(token)


class CountedStream(httpcore.AsyncNetworkStream):
    """A connection whose reads count against the reading attempt's `AttemptReads` (none outside one)."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await self._inner.read(max_bytes, timeout)
        reads = _attempt_reads.get()
        if reads is not None:
            reads.count(len(data))
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        return CountedStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Inflater:
    """One layer of gzip or deflate, decoded a piece at a time, never producing more than asked."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._zlib = zlib.decompressobj(DECODABLE[coding])

    @property
    def ended(self) -> bool:
        """Whether the compressed stream ended (what follows it is ignored)."""
        return self._zlib.eof

    def decode(self, data: bytes, room: int) -> bytes:
        """What `data` decodes to, at most `room` bytes (room >= 1; the caller refuses a reply that fills it)."""
        out = self._zlib.decompress(data, room)
        while self._zlib.unconsumed_tail and len(out) < room:
            out += self._zlib.decompress(self._zlib.unconsumed_tail, room - len(out))
        return out


def _inflater(headers: httpx.Headers, host: str) -> _Inflater | None:
    """The decoder a reply's Content-Encoding needs (None: identity); OutboundError for any other coding
    or more than one."""
    codings = [c.strip().lower() for v in headers.get_list("content-encoding") for c in v.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in DECODABLE:
        shown = ", ".join(codings)[:100]
        raise OutboundError(f"{host} answered with Content-Encoding {shown!r} (one layer of gzip or deflate is read)")
    return _Inflater(codings[0])


# What an error reply's body may show in an evaluation's error_reason: its first bytes, as text.
ERROR_EXCERPT_BYTES = 512
ERROR_EXCERPT_CHARS = 300
ERROR_EXCERPT_PIECES = 64
# How long an error's excerpt is waited for: its status is what the call acts on (a 429 throttles the
# endpoint, Retry-After sets the wait), and an endpoint that sent a status and then dripped, or stopped,
# cost each attempt its whole timeout (and the 429 with it).
ERROR_EXCERPT_WAIT_S = 0.5


async def error_excerpt(response: httpx.Response, reads: AttemptReads) -> bytes:
    """The start of an error reply's body (b"" for an encoded one), to be shown by `one_line`: a
    provider's 400 says why ("model not found", "unsupported parameter"), and an error_reason of only
    "HTTP 400 from host" left the tenant nothing to go on. Read no further than ERROR_EXCERPT_BYTES (the
    rest is never read), in at most ERROR_EXCERPT_PIECES pieces, within ERROR_EXCERPT_WAIT_S: what
    arrived by then is the excerpt."""
    if response.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        return b""
    reads.allow_body(ERROR_EXCERPT_BYTES)
    start = bytearray()
    pieces = 0
    with contextlib.suppress(TimeoutError, httpx.TransportError):  # the status stands; the excerpt is a bonus
        async with asyncio.timeout(ERROR_EXCERPT_WAIT_S):
            async for raw in response.aiter_raw():
                start += raw
                pieces += 1
                if len(start) >= ERROR_EXCERPT_BYTES or pieces >= ERROR_EXCERPT_PIECES:
                    break
    return bytes(start[:ERROR_EXCERPT_BYTES])


REDACTED = b"[redacted]"
MIN_REDACTED_BYTES = 4  # a shorter piece of a secret, cut off by the excerpt's end, is not looked for


def without_secrets(excerpt: bytes, secrets: Sequence[str]) -> bytes:
    """`excerpt` with each secret the call sent (its API keys: the endpoint's named secrets, the server's
    judge or generator key) blanked out: as sent, in any letter case, JSON-escaped (slashes escaped or
    not), percent-encoded, and one cut off by the excerpt's end. An endpoint that echoes the request's
    headers in its error body (a debugging endpoint, a proxy's error page) put the tenant's secrets, and
    the server's own judge key, into error_reason, which every reader of the run's results sees and the
    database keeps in clear. Only secrets: a first version blanked every header value, the content type
    too ("send [redacted]"), and an error lost the words that explained it."""
    forms: set[bytes] = set()
    for secret in secrets:
        escaped = json.dumps(secret)[1:-1]
        for written in (secret, escaped, escaped.replace("/", "\\/"), quote(secret, safe="")):
            if len(written) >= MIN_REDACTED_BYTES:
                forms.add(written.encode())
    if not forms:
        return excerpt
    longest_first = sorted(forms, key=len, reverse=True)
    excerpt = re.sub(b"|".join(re.escape(form) for form in longest_first), REDACTED, excerpt, flags=re.IGNORECASE)
    lowered = excerpt.lower()
    for form in longest_first:  # the excerpt ends inside a secret: its start is as much a leak
        for length in range(len(form) - 1, MIN_REDACTED_BYTES - 1, -1):
            if lowered.endswith(form[:length].lower()):
                return excerpt[:-length] + REDACTED
    return excerpt


def one_line(excerpt: bytes) -> str:
    """An error body's excerpt as one line of printable text, at most ERROR_EXCERPT_CHARS characters."""
    text = " ".join("".join(c if c.isprintable() else " " for c in excerpt.decode(errors="replace")).split())
    return text if len(text) <= ERROR_EXCERPT_CHARS else text[:ERROR_EXCERPT_CHARS] + "..."


async def read_body(response: httpx.Response, host: str, max_bytes: int, reads: AttemptReads) -> bytes:
    """A reply's body, decoded, within the bounds above; OutboundError past any of them."""
    reads.allow_body(max_bytes)
    inflater = _inflater(response.headers, host)
    limit = max_pieces(max_bytes)
    chunks: list[bytes] = []
    size = pieces = 0
    async for raw in response.aiter_raw():
        pieces += 1
        if pieces > limit:
            raise OutboundError(f"{host} answered in more than {limit} pieces (HTTP chunks or network reads)")
        if not pieces % PIECES_PER_TURN:
            await asyncio.sleep(0)
        if inflater is not None:
            try:
                raw = inflater.decode(raw, max_bytes - size + 1)
            except zlib.error:
                raise OutboundError(f"{host} answered with a body that is not valid {inflater.coding}") from None
        size += len(raw)
        if size > max_bytes:
            raise OutboundError(f"{host} answered with more than {max_bytes} bytes")
        chunks.append(raw)
    if inflater is not None and not inflater.ended:
        raise OutboundError(f"{host} answered with a {inflater.coding} body that ends early")
    return b"".join(chunks)
