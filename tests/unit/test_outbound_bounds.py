"""What one endpoint's reply, or one tenant's endpoint name, may cost the server (evalsvc/http/replies.py,
evalsvc/http/resolver.py): bad data fails its own call with a reason, and the work it causes is bounded.

Replies come from real HTTP/1.1 servers on 127.0.0.1 writing raw bytes (framing no well-behaved server
library would send); a slow DNS is `socket.getaddrinfo` replaced in this process. The bounds are checked
by counting work (bytes inflated, lookups started, threads busy), not by timing."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ipaddress
import json
import socket
import threading
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from evalsvc.config import Settings
from evalsvc.http import outbound, resolver
from evalsvc.http.outbound import Outbound, OutboundError, call_tenant, check_destination, endpoint_wait
from evalsvc.http.replies import without_secrets
from tests.fake_llm import FakeEndpoint, Reply

Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]
REPLY = {"choices": [{"message": {"content": "fine"}}]}
BUDGET = 64 * 1024  # --max-reply-bytes in these tests


@contextlib.asynccontextmanager
async def endpoint(answer: Writer) -> AsyncIterator[str]:
    """An endpoint on 127.0.0.1 that reads a request's head and body, then lets `answer` write raw bytes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            await reader.readexactly(length)
            await answer(writer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    finally:
        server.close()


def reply_with(body: bytes, *headers: str) -> Writer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        head = ["HTTP/1.1 200 OK", "content-type: application/json", f"content-length: {len(body)}", *headers]
        writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)

    return answer


@pytest.fixture
async def client() -> AsyncIterator[Outbound]:
    client = Outbound(Settings(outbound_allow="127.0.0.1", http_retries=0, max_reply_bytes=BUDGET))
    yield client
    await client.close()


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes produced by every zlib decompressor made from now on (httpx's decoders and ours)."""
    produced = [0]
    real = zlib.decompressobj

    class Counting:
        def __init__(self, *args: Any) -> None:
            self._inner = real(*args)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            out = self._inner.decompress(data, max_length)
            produced[0] += len(out)
            return out

        def flush(self, *args: Any) -> bytes:
            out = self._inner.flush(*args)
            produced[0] += len(out)
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    monkeypatch.setattr(zlib, "decompressobj", Counting)
    return produced


async def test_a_gzip_bomb_inflates_no_more_than_the_reply_budget(client: Outbound, inflated: list[int]) -> None:
    """64 KiB on the wire that inflate to 64 MiB: httpx inflated each 64 KiB network read whole (and a
    stacked `gzip, gzip` of 1.8 KB to a GiB, 2 GB of RSS) before the reply's size was checked. The
    decoder now stops one byte past the budget."""
    bomb = gzip.compress(b" " * (64 << 20), compresslevel=9)
    async with endpoint(reply_with(bomb, "content-encoding: gzip")) as url:
        with pytest.raises(OutboundError, match=f"answered with more than {BUDGET} bytes"):
            await client.post_json(url, {}, {})
    assert inflated[0] <= BUDGET + 1, inflated[0]


async def test_stacked_or_unknown_content_encodings_are_refused_unread(client: Outbound, inflated: list[int]) -> None:
    """`gzip, gzip` multiplies: 1.8 KB became a GiB. One layer of gzip or deflate is read, nothing else."""
    double = gzip.compress(gzip.compress(b" " * (16 << 20)))
    async with endpoint(reply_with(double, "content-encoding: gzip, gzip")) as url:
        with pytest.raises(OutboundError, match="Content-Encoding 'gzip, gzip'"):
            await client.post_json(url, {}, {})
    async with endpoint(reply_with(b"\x1b\x00", "content-encoding: br")) as url:
        with pytest.raises(OutboundError, match="Content-Encoding 'br'"):
            await client.post_json(url, {}, {})
    assert inflated[0] == 0


async def test_a_gzip_or_deflate_reply_is_read_and_identity_is_asked_for(client: Outbound) -> None:
    """Real providers may compress whatever they are asked: one layer is decoded as before."""
    seen: list[bytes] = []
    data = json.dumps(REPLY).encode()

    def recording(body: bytes, coding: str) -> Writer:
        async def answer(writer: asyncio.StreamWriter) -> None:
            await reply_with(body, f"content-encoding: {coding}")(writer)
            seen.append(coding.encode())

        return answer

    for body, coding in ((gzip.compress(data), "gzip"), (zlib.compress(data), "deflate"), (data, "identity")):
        async with endpoint(recording(body, coding)) as url:
            assert (await client.post_json(url, {}, {"Accept-Encoding": "br"})).body == REPLY
    assert len(seen) == 3
    async with endpoint(reply_with(gzip.compress(data)[:-12], "content-encoding: gzip")) as url:
        with pytest.raises(OutboundError, match="gzip body that ends early"):
            await client.post_json(url, {}, {})


async def test_the_request_asks_for_an_unencoded_reply(client: Outbound) -> None:
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.readexactly(2)  # {}
        await reply_with(json.dumps(REPLY).encode())(writer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        await client.post_json(url, {}, {"accept-encoding": "gzip, br"})  # a tenant's header does not change it
    finally:
        server.close()
    [head] = heads
    assert [line for line in head.lower().split(b"\r\n") if line.startswith(b"accept-encoding")] == [
        b"accept-encoding: identity"
    ]


def chunked(pieces: Iterator[bytes]) -> Writer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        for i, piece in enumerate(pieces):
            writer.write(piece)
            if i % 1024 == 0:
                await writer.drain()
        writer.write(b"0\r\n\r\n")

    return answer


async def test_a_reply_in_one_byte_chunks_fails_after_a_bounded_number_of_pieces(client: Outbound) -> None:
    """A valid 40 KB reply in 1-byte chunks cost an h11 event, a decoder call and a loop turn per byte
    (8 such 4 MiB replies: 100 s of CPU, every tenant's GetRun taking 8 s). Past 16,384 pieces the call
    fails: real replies come in pieces of kilobytes."""
    body = json.dumps({"choices": [{"message": {"content": "x" * 40_000}}]}).encode()
    async with endpoint(chunked(b"1\r\n%c\r\n" % byte for byte in body)) as url:
        with pytest.raises(OutboundError, match="answered in more than 16384 pieces"):
            await client.post_json(url, {}, {})


async def test_framing_beyond_the_reply_is_bounded_on_the_connection(client: Outbound) -> None:
    """Chunk extensions are framing h11 reads and drops: 200 bytes of them per body byte were read
    without limit. What an attempt reads after the headers is bounded by the reply's budget plus
    32 bytes a piece."""
    body = json.dumps({"choices": [{"message": {"content": "x" * 10_000}}]}).encode()
    extension = b";x=" + b"y" * 200
    async with endpoint(chunked(b"1%s\r\n%c\r\n" % (extension, byte) for byte in body)) as url:
        with pytest.raises(OutboundError, match=r"sent more than \d+ bytes for a reply of at most 65536"):
            await client.post_json(url, {}, {})


async def test_an_endless_stream_of_interim_replies_is_cut_off(client: Outbound) -> None:
    """httpcore skips `100 Continue` replies before the reply proper, so an endpoint sending them for
    ever was stopped by nothing but the attempt's timeout (60 s here): 128 KiB before the headers are in."""

    async def flood(writer: asyncio.StreamWriter) -> None:
        while not writer.is_closing():
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" * 1000)
            await writer.drain()

    async with endpoint(flood) as url:
        with pytest.raises(OutboundError, match="sent more than 131072 bytes before its reply's headers"):
            await client.post_json(url, {}, {}, timeout_s=60)


# --- DNS -------------------------------------------------------------------------------------------------


class SlowDns:
    """`socket.getaddrinfo` for this process in which names under .slow.test answer 127.0.0.1 only when
    released; the others answer at once. Counts lookups started, and the most in progress at once."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.started: list[str] = []
        self.in_progress = self.most = 0
        self._lock = threading.Lock()

    def __call__(self, host: Any, *args: Any, **kwargs: Any) -> Any:
        if not str(host).endswith(".slow.test"):
            host = "127.0.0.1"
        else:
            with self._lock:
                self.started.append(host)
                self.in_progress += 1
                self.most = max(self.most, self.in_progress)
            try:
                self.released.wait(60)
            finally:
                with self._lock:
                    self.in_progress -= 1
            host = "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (host, 0))]


@pytest.fixture
def slow_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowDns]:
    dns = SlowDns()
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    yield dns
    dns.released.set()  # the threads still looking up end


async def as_tenant(tenant: str, call: Awaitable[Any]) -> Any:
    call_tenant.set(tenant)  # in this task's own context
    return await call


async def test_one_tenants_slow_names_hold_neither_the_shared_threads_nor_the_other_tenants(
    slow_dns: SlowDns,
) -> None:
    """Tenant A's 64 lookups of names its own DNS answers late filled the event loop's default executor
    (6 threads, no timeout), so tenant B's lookups and everything using `asyncio.to_thread` (CompareRuns)
    waited behind them for minutes. A tenant's lookups now hold at most 2 threads of a pool of their own,
    end at their timeout (5 s), and B's name resolves meanwhile."""
    allow = outbound.AllowList("127.0.0.1")
    a = [
        asyncio.ensure_future(as_tenant("a", check_destination(f"http://n{i}.slow.test/v1", allow))) for i in range(64)
    ]
    try:
        await asyncio.sleep(0.2)  # A's lookups are started or queued
        b = as_tenant("b", check_destination("http://b.example/v1", allow))
        await asyncio.wait_for(b, 20)  # returned, not raised: B's name was resolved
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "ran"), 20) == "ran"
        outcomes = await asyncio.wait_for(asyncio.gather(*a, return_exceptions=True), 30)
    finally:
        slow_dns.released.set()
        for each in a:
            each.cancel()
    within = f"within {outbound.RESOLVE_TIMEOUT_S:g} s"  # the default timeout of a call's lookup
    assert all(isinstance(o, OutboundError) and within in o.reason for o in outcomes), outcomes[:3]
    assert slow_dns.most <= resolver.LOOKUPS_PER_TENANT, slow_dns.most
    assert len(slow_dns.started) <= resolver.LOOKUPS_PER_TENANT, slow_dns.started  # the rest timed out queued


async def test_concurrent_lookups_of_one_name_are_one_lookup(slow_dns: SlowDns) -> None:
    allow = outbound.AllowList("127.0.0.1")
    calls = [
        asyncio.ensure_future(as_tenant("a", check_destination("http://one.slow.test/v1", allow))) for _ in range(50)
    ]
    try:
        await asyncio.sleep(0.2)
        slow_dns.released.set()
        await asyncio.wait_for(asyncio.gather(*calls), 20)
    finally:
        for each in calls:
            each.cancel()
    assert slow_dns.started == ["one.slow.test"]


async def test_a_lookup_gives_the_jobs_worker_slot_back_while_it_waits(slow_dns: SlowDns) -> None:
    """Every lookup held its job's worker slot: 64 jobs waiting for DNS took every worker of the server."""
    waits: list[str] = []

    @contextlib.asynccontextmanager
    async def held_up() -> AsyncIterator[None]:
        waits.append("gave the worker back")
        yield
        waits.append("took it again")

    async def job() -> None:
        endpoint_wait.set(held_up)
        await check_destination("http://w.slow.test/v1", outbound.AllowList("127.0.0.1"))

    call = asyncio.ensure_future(job())
    try:
        await asyncio.sleep(0.2)
        assert waits == ["gave the worker back"]
        slow_dns.released.set()
        await asyncio.wait_for(call, 20)
    finally:
        call.cancel()
    assert waits == ["gave the worker back", "took it again"]


async def test_another_tenants_lookup_of_the_same_name_does_not_wait_in_the_first_tenants_turn() -> None:
    """Lookups of one name were shared across tenants: B's lookup of a provider's name joined A's, which
    waited behind A's own slow names (A's two threads taken), and B's call timed out with threads free."""
    released = threading.Event()

    def lookup(host: str) -> list[resolver.IPAddress]:
        if host.startswith("slow"):
            released.wait(60)
        return [ipaddress.ip_address("127.0.0.1")]

    names = resolver.Resolver(lookup=lookup)
    a = [asyncio.ensure_future(names.resolve(f"slow{i}.a.test", "a", 60)) for i in range(4)]
    a.append(asyncio.ensure_future(names.resolve("api.provider.test", "a", 60)))  # queued behind A's slow names
    try:
        await asyncio.sleep(0)  # A's lookups have started or queued
        assert await names.resolve("api.provider.test", "b", 10) == [ipaddress.ip_address("127.0.0.1")]
        assert not any(each.done() for each in a)  # A's share of the name is still waiting its turn
    finally:
        released.set()
        await asyncio.gather(*a, return_exceptions=True)


async def test_four_tenants_with_slow_names_leave_resolver_threads_for_another_tenant() -> None:
    """Four tenants whose names resolve slowly held 2 threads each, all 8, and another tenant's lookup
    of a name that answers at once waited for one of them (deliveries 2 to 14 s late, some attempts
    failed). A tenant's second lookup now only takes a thread while RESERVED_THREADS stay free."""
    released = threading.Event()
    started: list[str] = []

    def lookup(host: str) -> list[resolver.IPAddress]:
        if host.endswith(".slow.test"):
            started.append(host)
            released.wait(60)
        return [ipaddress.ip_address("127.0.0.1")]

    names = resolver.Resolver(lookup=lookup)
    slow = [
        asyncio.ensure_future(names.resolve(f"n{i}.{tenant}.slow.test", tenant, 60))
        for tenant in ("a", "b", "c", "d")
        for i in range(resolver.LOOKUPS_PER_TENANT + 1)
    ]
    try:
        await settle()
        assert len(started) <= resolver.RESOLVER_THREADS - 2, started
        for tenant in ("e", "f"):  # each tenant with none running finds a thread at once
            assert await names.resolve("receiver.good.test", tenant, 2) == [ipaddress.ip_address("127.0.0.1")]
        assert not any(each.done() for each in slow)
    finally:
        released.set()
        await asyncio.gather(*slow, return_exceptions=True)
    assert all(not isinstance(each.result(), BaseException) for each in slow)


async def settle() -> None:
    """Let every ready task run until it waits again (no I/O here: a few loop turns)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_tenants_calls_stay_within_its_share_when_its_room_is_forgotten_meanwhile() -> None:
    """Review: a call looked its tenant's room up before queueing for an endpoint; the room, idle while
    the call queued, was forgotten, later calls got a fresh one, and the queued call then took room in
    the forgotten one: 8 calls in progress against a share of 2 (A's judge calls queued at a shared judge
    while A's own calls came and went)."""
    share = 2
    calls = outbound.TenantCalls(share)
    shared_judge = outbound.AdaptiveLimit()  # 8 slots, taken by other tenants' calls at first
    in_progress: Counter[str] = Counter()
    most = 0

    async def call(limit: outbound.AdaptiveLimit, tenant: str, ends: asyncio.Event) -> None:
        nonlocal most
        call_tenant.set(tenant)
        async with outbound._endpoint_slot(lambda: limit, calls):
            in_progress[tenant] += 1
            most = max(most, in_progress["a"])
            await ends.wait()
            in_progress[tenant] -= 1

    others_end, never = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.ensure_future(call(shared_judge, t, others_end)) for t in "bcde" for _ in range(share)]
    await settle()
    for round_ in range(4):
        own_ends = asyncio.Event()
        tasks.append(asyncio.ensure_future(call(outbound.AdaptiveLimit(), "a", own_ends)))
        await settle()
        tasks += [asyncio.ensure_future(call(shared_judge, "a", never)) for _ in range(share)]
        await settle()
        if round_ < 3:
            own_ends.set()  # A's own call ends: A has no call in progress, only calls queued at the judge
            await settle()
    others_end.set()  # the judge's slots free up: A's queued calls get them, within A's share
    await settle()
    try:
        assert most <= share, f"{most} calls of A in progress against a share of {share}"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_lookup_joining_one_its_last_waiter_left_is_not_cancelled() -> None:
    """Review: the last waiter leaving cancelled the lookup's task, which stayed joinable until it had
    finished cancelling; a lookup of the same name in that moment got a cancellation nobody sent."""
    released = threading.Event()

    def lookup(host: str) -> list[resolver.IPAddress]:
        released.wait(60)
        return [ipaddress.ip_address("127.0.0.1")]

    names = resolver.Resolver(lookup=lookup)
    first = asyncio.ensure_future(names.resolve("slow.a.test", "a", 60))
    await settle()
    first.cancel()  # its job's run was cancelled, say
    await asyncio.sleep(0)  # it leaves: the lookup's task is told to cancel, and has not finished yet
    second = asyncio.ensure_future(names.resolve("slow.a.test", "a", 60))
    await settle()
    released.set()
    assert await asyncio.wait_for(second, 20) == [ipaddress.ip_address("127.0.0.1")]
    with contextlib.suppress(asyncio.CancelledError):
        await first


SECRET = "sk-Live/0123+abcd"


@pytest.mark.parametrize(
    "echoed",
    [
        SECRET,  # as sent
        SECRET.lower(),  # a server that lowercases headers it quotes
        json.dumps(SECRET)[1:-1].replace("/", "\\/"),  # JSON with escaped slashes (PHP's default)
        "sk-Live%2F0123%2Babcd",  # percent-encoded
    ],
)
def test_an_error_excerpt_shows_no_form_of_a_secret_and_keeps_the_rest(echoed: str) -> None:
    """Error bodies that quote the request's headers: the secrets are blanked out in every form seen
    echoed, and only they (a first version blanked every header value, "application/json" too)."""
    body = f'{{"error": "send application/json", "authorization": "Bearer {echoed}"}}'.encode()
    shown = without_secrets(body, [SECRET]).decode()
    assert "0123" not in shown.lower() and "[redacted]" in shown, shown
    assert "send application/json" in shown and "Bearer" in shown


def test_an_excerpt_cut_inside_a_secret_shows_none_of_it() -> None:
    assert without_secrets(b"key: " + SECRET[:9].encode(), [SECRET]) == b"key: [redacted]"
    assert without_secrets(b"key: sk-", [SECRET]) == b"key: sk-"  # shorter than MIN_REDACTED_BYTES: ordinary text
    assert without_secrets(b"nothing secret", []) == b"nothing secret"


class _GatedForA(list[Reply]):
    """A FakeEndpoint script: calls to /a/... wait for `gate` (slow calls held in flight), others answer at once."""

    def __init__(self, fake: FakeEndpoint, gate: threading.Event) -> None:
        super().__init__()
        self.fake, self.gate = fake, gate

    def __len__(self) -> int:
        return 2  # never runs out

    def pop(self, index: int = -1) -> Reply:
        slow = self.fake.seen[-1].path.startswith("/a/")  # popped as the request is recorded
        return Reply({"ok": True}, gate=self.gate if slow else None)


async def test_one_tenant_holds_at_most_half_of_a_shared_endpoints_slots(client: Outbound) -> None:
    """Probe: tenant A's slow calls to the shared generator held all 8 of its slots; B's generation of 20
    items, one call at a time, waited for A's calls to end (28 s instead of 0.08 s). Turns bound how long
    B waits behind A's backlog, not how many slots A holds.

    B has called the endpoint; then A floods it with 24 calls that do not end (until the test says).
    A holds at most half the slots, and B's 10 calls, one after the other, are all answered meanwhile.
    Alone on the endpoint A may use every slot; afterwards nothing is leaked."""
    gate = threading.Event()

    async def post(tenant: str, path: str) -> None:
        call_tenant.set(tenant)
        await client.post_json(fake.url + path, {}, {}, timeout_s=60)

    with FakeEndpoint() as fake:
        fake.script = _GatedForA(fake, gate)
        limit = client.limit_of(fake.url + "/")
        try:
            await asyncio.wait_for(post("b", "/b/0"), 10)  # B uses the endpoint
            flood = [asyncio.ensure_future(post("a", f"/a/{i}")) for i in range(24)]
            await asyncio.to_thread(fake.wait_seen, 1 + 4, 10)
            await settle()
            assert limit.slots.held_by("a") == 4, "A holds more than half of the 8 slots"
            for i in range(1, 11):  # before: each waited for one of A's calls to end (never, here)
                # (a bound only so a failure ends; one loaded CI worker once took over 5 s for one call)
                await asyncio.wait_for(post("b", f"/b/{i}"), 20)
            assert limit.slots.held_by("a") == 4 and not any(each.done() for each in flood)
        finally:
            gate.set()
        await asyncio.wait_for(asyncio.gather(*flood), 30)
        assert limit.in_flight == 0 and limit.slots.waiting == 0

        # Alone (no other tenant within the window), a tenant uses every slot.
        alone = client.limit_of(fake.url.replace("127.0.0.1", "127.0.0.1.") + "/")
        assert alone is limit
        limit.slots._took.clear()  # B's calls are long ago
        gate.clear()
        flood = [asyncio.ensure_future(post("a", f"/a/{i}")) for i in range(12)]
        try:
            await asyncio.to_thread(fake.wait_seen, 11 + 24 + int(limit.limit), 10)
            await settle()
            assert limit.in_flight == int(limit.limit) == limit.slots.held_by("a")
        finally:
            gate.set()
        await asyncio.wait_for(asyncio.gather(*flood), 30)
