"""The SSRF rule (docs/security.md): a destination is called only when every address it names is
globally routable, after unwrapping the IPv4 address an IPv6 transition form delivers to, unless
`--outbound-allow` names it. Unit tests: IP literals only, so no resolver and no network."""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

import httpx
import pytest

from evalsvc.config import Settings, allow_entries
from evalsvc.http import outbound
from evalsvc.http.outbound import (
    AllowList,
    Outbound,
    OutboundError,
    check_destination,
    checked_transport,
    destination_violations,
    embedded_ipv4,
    is_global_destination,
)
from tests.fake_llm import FakeEndpoint

NOT_GLOBAL = [
    "169.254.169.254",  # link-local: AWS/GCP/Azure metadata
    "100.100.100.200",  # shared address space (100.64.0.0/10): Alibaba Cloud metadata
    "100.64.0.1",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "127.0.0.1",
    "0.0.0.0",
    "192.0.0.1",  # IETF protocol assignments (192.0.0.0/24)
    "192.0.0.9",  # in that block although Python 3.11 calls it global
    "192.0.2.1",  # documentation
    "198.18.0.1",  # benchmarking (198.18.0.0/15)
    "198.19.255.254",
    "224.0.0.1",  # multicast
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "ff02::1",  # multicast, "global" to Python 3.11
    "2001:db8::1",
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b:1::808:808",  # local-use NAT64
    "::ffff:0:a9fe:a9fe",  # IPv4-translated (SIIT) 169.254.169.254: Python calls it global
    "::ffff:0:7f00:1",  # IPv4-translated 127.0.0.1
    "::ffff:0:a00:1",  # IPv4-translated 10.0.0.1
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "::8.8.8.8",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo whose client is 192.0.2.45
]

GLOBAL = [
    "8.8.8.8",
    "1.1.1.1",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "2002:808:808::1",
    "64:ff9b::808:808",
    "::ffff:0:808:808",
]


@pytest.mark.parametrize("address", NOT_GLOBAL)
def test_addresses_that_are_not_globally_routable_are_refused(address: str) -> None:
    assert not is_global_destination(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", GLOBAL)
def test_globally_routable_addresses_and_their_wrapped_forms_are_allowed(address: str) -> None:
    assert is_global_destination(ipaddress.ip_address(address))


def test_transition_forms_unwrap_to_the_ipv4_address_they_deliver_to() -> None:
    metadata = ipaddress.IPv4Address("169.254.169.254")
    for wrapped in ("::ffff:169.254.169.254", "2002:a9fe:a9fe::", "64:ff9b::a9fe:a9fe"):
        assert embedded_ipv4(ipaddress.ip_address(wrapped)) == [metadata]
    teredo = embedded_ipv4(ipaddress.ip_address("2001:0:4136:e378:8000:63bf:3fff:fdd2"))
    assert teredo == [ipaddress.IPv4Address("65.54.227.120"), ipaddress.IPv4Address("192.0.2.45")]
    assert embedded_ipv4(ipaddress.ip_address("2001:4860:4860::8888")) == []


async def test_check_destination_refuses_unless_the_allow_list_names_host_or_network() -> None:
    for url in ("http://100.100.100.200/latest", "http://[64:ff9b::a9fe:a9fe]/", "https://198.18.0.1:8443/v1"):
        with pytest.raises(
            OutboundError, match=r"is not allowed \(not globally routable; allow it with --outbound-allow\)"
        ):
            await check_destination(url, AllowList(""))
    await check_destination("http://8.8.8.8/v1", AllowList(""))
    await check_destination("http://127.0.0.1:9/v1", AllowList("127.0.0.1"))
    await check_destination("http://10.1.2.3/v1", AllowList("10.0.0.0/8"))
    # A network entry covers the IPv4 address a wrapped form delivers to.
    await check_destination("http://[::ffff:10.1.2.3]/v1", AllowList("10.0.0.0/8"))
    with pytest.raises(OutboundError):
        await check_destination("http://10.1.2.3/v1", AllowList("127.0.0.1,192.168.0.0/16"))


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("127.0.0.1:0", "a port is from 1 to 65535, not 0"),
        ("127.0.0.1:65536", "a port is from 1 to 65535, not 65536"),
        ("[::1]:99999", "a port is from 1 to 65535, not 99999"),
        ("llm.internal:0", "a port is from 1 to 65535, not 0"),
        ("::1:11434", r"in brackets: '\[::1\]:11434'"),  # unbracketed, ::1:8080 is an address: no guessing
        ("fe80::/10:443", r"in brackets: '\[fe80::/10\]:443'"),
        ("127.0.0.1:", "neither an IP address"),
        ("127.0.0.1:http", "neither an IP address"),
        ("[127.0.0.1]:80", "neither an IP address"),  # brackets are IPv6's
        ("[llm.internal]:80", "neither an IP address"),
        ("[::1]80", "neither an IP address"),
        ("llm.internal:80:80", "neither an IP address"),
        ("999.1.1.1/40", "neither an IP address"),
        ("10.0.0.0/33", "neither an IP address"),
        ("999.1.1.1", "neither an IP address"),
        ("*.internal", "neither an IP address"),
        ("http://llm.internal", "neither an IP address"),
        ("fe80::1%eth0", "neither an IP address"),  # a zone, which matching would ignore
        ("[fe80::1%eth0]:80", "neither an IP address"),
    ],
)
def test_an_allow_list_entry_that_could_never_match_is_refused(entry: str, complaint: str) -> None:
    """Each was kept as a host name that no URL's host can be: the destination meant stayed refused."""
    with pytest.raises(ValueError, match=complaint):
        AllowList(f"127.0.0.1,{entry}")


async def test_allow_list_entries_of_every_kind_match() -> None:
    allow = AllowList(" 10.0.0.0/8 , ::1,fe80::/10, LLM.Internal,model_server ,")
    for host, address in (
        ("10.1.2.3", "10.1.2.3"),
        ("x", "::1"),
        ("llm.internal", "192.168.1.1"),
        ("MODEL_SERVER", "172.16.0.1"),
    ):
        for port in (1, 80, 5432, 65535):  # an entry without a port allows every port, as it always did
            assert allow.allows(host, ipaddress.ip_address(address), port)
    assert not allow.allows("other.internal", ipaddress.ip_address("192.168.1.1"), 80)


@pytest.mark.parametrize(
    ("entry", "destination", "port"),
    [
        ("127.0.0.1:11434", "127.0.0.1/32", 11434),
        ("127.0.0.1/32:11434", "127.0.0.1/32", 11434),
        ("[::1]:11434", "::1/128", 11434),
        ("[::1]", "::1/128", None),
        ("[FD00::]:8080", "fd00::/128", 8080),
        ("LLM.Internal:8080", "llm.internal", 8080),
        ("model_server:00443", "model_server", 443),
        ("10.0.0.0/8:443", "10.0.0.0/8", 443),
        ("[fd00::/8]:443", "fd00::/8", 443),
        ("10.0.0.0/8", "10.0.0.0/8", None),
        ("fe80::1:443", "fe80::1:443/128", None),  # unbracketed: an IPv6 address, every port
    ],
)
def test_an_allow_list_entry_may_name_one_port(entry: str, destination: str, port: int | None) -> None:
    """`127.0.0.1:17765` was refused at start ("has a port"): an entry allowed every port of its host, so
    allowing a local model server allowed the server's own gateway, metrics and database beside it."""
    (parsed,) = allow_entries(entry)
    name = destination if "/" not in destination else ipaddress.ip_network(destination)
    assert (parsed.destination, parsed.port) == (name, port)


@pytest.mark.parametrize(
    ("spec", "host", "address", "allowed", "refused"),
    [
        ("127.0.0.1:11434", "127.0.0.1", "127.0.0.1", [11434], [80, 5432, 8080, 11435]),
        ("[::1]:11434", "::1", "::1", [11434], [80, 8080]),
        ("llm.internal:8080", "LLM.internal", "10.1.2.3", [8080], [80, 443]),
        ("10.0.0.0/8:443", "10.9.9.9", "10.9.9.9", [443], [80, 8443]),
        ("10.0.0.0/8:443", "x", "::ffff:10.9.9.9", [443], [80]),  # the IPv4 address a wrapped form carries
        ("127.0.0.1:11434,127.0.0.1:8000", "127.0.0.1", "127.0.0.1", [11434, 8000], [8080]),
        ("127.0.0.1:11434,127.0.0.0/8", "127.0.0.1", "127.0.0.1", [11434, 8080, 5432], []),  # entries add up
    ],
)
def test_an_entry_with_a_port_allows_that_port_only(
    spec: str, host: str, address: str, allowed: list[int], refused: list[int]
) -> None:
    allow = AllowList(spec)
    ip = ipaddress.ip_address(address)
    assert [port for port in allowed + refused if allow.allows(host, ip, port)] == allowed


async def test_check_destination_matches_the_port_of_the_url_or_of_its_scheme() -> None:
    allow = AllowList("127.0.0.1:11434,10.0.0.0/8:443,[::1]:80")
    await check_destination("http://127.0.0.1:11434/v1", allow)
    await check_destination("https://10.1.2.3/v1", allow)  # https: 443
    await check_destination("http://[::1]/v1", allow)  # http: 80
    for url, said in (
        (
            "http://127.0.0.1:5432/v1",
            "127.0.0.1:5432 is not allowed (not globally routable; allow it with --outbound-allow)",
        ),
        ("http://127.0.0.1/v1", "127.0.0.1:80 is not allowed"),
        ("http://10.1.2.3/v1", "10.1.2.3:80 is not allowed (not globally"),
        ("https://[::1]/v1", "[::1]:443 is not allowed (not globally"),
    ):
        with pytest.raises(OutboundError, match=re.escape(said)):
            await check_destination(url, allow)
    # One message whether or not an entry names the address for another port: it never tells a tenant what
    # the list holds.
    with pytest.raises(OutboundError, match=re.escape("192.168.1.1:11434 is not allowed (not globally routable;")):
        await check_destination("http://192.168.1.1:11434/v1", allow)


async def test_the_connection_itself_is_refused_on_a_port_no_entry_allows() -> None:
    """The check made as the connection is (`_CheckedBackend`, which a re-pointed name cannot pass):
    with an entry for one loopback port, a listener on another port of loopback is never connected to."""
    with FakeEndpoint() as allowed, FakeEndpoint() as other:
        port = urlsplit(allowed.url).port
        async with httpx.AsyncClient(
            transport=checked_transport(AllowList(f"127.0.0.1:{port}"), httpx.Limits())
        ) as client:
            assert (await client.post(allowed.url + "/v1", json={})).status_code == 200
            with pytest.raises(httpx.ConnectError, match=f"127.0.0.1:{urlsplit(other.url).port} is not allowed"):
                await client.post(other.url + "/v1", json={})
        assert len(allowed.seen) == 1 and not other.seen


async def test_destination_violations_name_each_refused_field() -> None:
    found = await destination_violations(
        [("a.base_url", "http://8.8.8.8/v1"), ("b.base_url", "http://[2002:7f00:1::]/v1")], AllowList(""), "acme"
    )
    assert [v.field for v in found] == ["b.base_url"]
    assert "2002:7f00:1::" in found[0].description and "--outbound-allow" in found[0].description


async def test_destination_violations_match_each_endpoints_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """What CreateRun, CreateTarget, CreateGrader, UpdateGrader and the webhook calls check: the port of
    each URL, or its scheme's, against the entries for the address its host resolves to."""

    async def resolver(host: str, timeout_s: float) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(outbound, "_resolve", resolver)
    endpoints = [
        ("a.base_url", "http://127.0.0.1:11434/v1"),
        ("b.base_url", "http://127.0.0.1:8080/v1"),
        ("c.base_url", "http://model.internal:11434/v1"),
        ("d.base_url", "https://model.internal/v1"),
    ]
    found = await destination_violations(endpoints, AllowList("127.0.0.1:11434"), "acme")
    has = "(not globally routable; allow it with --outbound-allow)"
    assert {v.field: v.description for v in found} == {
        "b.base_url": f"refused to call '127.0.0.1': 127.0.0.1:8080 is not allowed {has}",
        "d.base_url": f"refused to call 'model.internal': 127.0.0.1:443 is not allowed {has}",
    }


async def test_a_name_rebound_after_the_check_is_refused_at_connect_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name resolves to a public address for the check, then to loopback for the
    connection; the connection is checked on its own resolution, so nothing reaches loopback. The
    name is localhost, so that without that second check the connection would land on the listener."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    answers = iter([[ipaddress.ip_address("8.8.8.8")], [ipaddress.ip_address("127.0.0.1")]])

    async def rebinding_resolver(host: str, timeout_s: float) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        assert host == "localhost"
        return next(answers)

    monkeypatch.setattr(outbound, "_resolve", rebinding_resolver)
    client = Outbound(Settings(outbound_allow="", http_retries=0))
    try:
        with pytest.raises(OutboundError, match="ConnectError"):
            await client.post_json(f"http://localhost:{port}/v1", {}, {})
    finally:
        await client.close()
    with pytest.raises(BlockingIOError), listener:
        listener.accept()  # nobody connected


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://alice:hunter2pw@127.0.0.1:8080/hook", "127.0.0.1:8080"),
        ("https://u:pa#ss@example.com/", "u"),  # '#' in a password ends the host part: still no password
        ("http://[::1]:9000/p?a@b", "[::1]:9000"),
        ("https://example.com/a@b", "example.com"),
    ],
)
def test_a_url_is_named_by_its_host_without_credentials(url: str, shown: str) -> None:
    """Logs, `last_error` and `disabled_reason` name an endpoint this way: a URL's `user:password@` was
    written to all three in clear."""
    from evalsvc.http.outbound import shown_host

    assert shown_host(url) == shown and "pw" not in shown and "ss" not in shown
