"""TLS and mTLS on the gRPC port and the REST gateway, with a CA and certificates this test generates."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import ipaddress
import logging
import re
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalsvc import testing
from evalsvc.server import EvalServer
from evalsvc.tls import TlsConfigError, http_ssl_context, is_loopback, server_credentials
from evalsvc.v1 import eval_run_service_pb2_grpc
from tests import dbs
from tests.conftest import make_settings
from tests.helpers import create_request
from tests.procs import assert_failed_cleanly, failed_start


@dataclass(frozen=True)
class Pem:
    """A certificate and its private key, PEM-encoded."""

    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(name: str) -> tuple[Pem, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA allowed to sign certificates."""
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)), key, cert


def make_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, name: str, *, server: bool) -> Pem:
    """A certificate signed by the CA: for 127.0.0.1 and localhost when `server`, else a client's."""
    key = _key()
    builder = _builder(name, ca_cert.subject, key.public_key()).add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
        critical=False,
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


@dataclass(frozen=True)
class Pki:
    """Files and PEMs of one test PKI: a CA, a server certificate, a client certificate."""

    ca: Pem
    server: Pem
    client: Pem
    ca_file: Path
    cert_file: Path
    key_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, ca_key, ca_cert = make_ca("evalsvc test CA")
    server = make_leaf(ca_key, ca_cert, "evalsvc test server", server=True)
    client = make_leaf(ca_key, ca_cert, "evalsvc test client", server=False)
    folder = tmp_path_factory.mktemp("pki")
    files = {"ca.pem": ca.cert, "server.pem": server.cert, "server.key": server.key}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return Pki(ca, server, client, folder / "ca.pem", folder / "server.pem", folder / "server.key")


@pytest.fixture
async def tls_server(tmp_path: Path, pki: Pki) -> AsyncIterator[EvalServer]:
    srv = EvalServer(make_settings(tmp_path, tls_cert=str(pki.cert_file), tls_key=str(pki.key_file)))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=1.0)


@pytest.fixture
async def mtls_server(tmp_path: Path, pki: Pki) -> AsyncIterator[EvalServer]:
    settings = make_settings(
        tmp_path, tls_cert=str(pki.cert_file), tls_key=str(pki.key_file), tls_client_ca=str(pki.ca_file)
    )
    srv = EvalServer(settings)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=1.0)


def secure_channel(port: int, credentials: grpc.ChannelCredentials, key: str | None = None) -> grpc.aio.Channel:
    """A TLS channel; with `key`, every call carries `authorization: Bearer <key>` as call credentials."""
    if key is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(key))
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def _round_trip(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    created = await eval_run_service_pb2_grpc.EvalRunServiceStub(channel).CreateRun(create_request(3), timeout=10)
    assert created.run.id and created.job_count == 3


async def test_tls_round_trip(tls_server: EvalServer, pki: Pki) -> None:
    assert tls_server.bootstrap_key
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    async with secure_channel(tls_server.port, credentials, tls_server.bootstrap_key) as channel:
        await _round_trip(channel)


async def test_tls_server_refuses_plaintext_clients(tls_server: EvalServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tls_server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_round_trip(mtls_server: EvalServer, pki: Pki) -> None:
    assert mtls_server.bootstrap_key
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert, private_key=pki.client.key, certificate_chain=pki.client.cert
    )
    async with secure_channel(mtls_server.port, credentials, mtls_server.bootstrap_key) as channel:
        await _round_trip(channel)


async def test_mtls_refuses_a_client_without_a_certificate(mtls_server: EvalServer, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    async with secure_channel(mtls_server.port, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("tls", [[], ["--ca-cert"]], ids=["plaintext", "tls-without-client-cert"])
async def test_evalctl_says_tls_does_not_match_not_that_nothing_answers(
    mtls_server: EvalServer, pki: Pki, tls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Plaintext to a TLS port, or no client certificate under mTLS: evalctl said "Nothing answers at ...: is
    the server running?" of a server that was running."""
    from evalsvc_client import cli

    argv = ["--target", f"127.0.0.1:{mtls_server.port}", "--api-key", "evk_x", *tls, *([str(pki.ca_file)] * len(tls))]
    assert await asyncio.to_thread(cli.main, [*argv, "list"]) == cli.EXIT_ERROR
    said = capsys.readouterr().err
    assert f"Something answers at 127.0.0.1:{mtls_server.port}" in said and "--client-cert" in said, said
    assert "Nothing answers" not in said and "is the server running" not in said


@pytest.mark.parametrize(
    ("target", "told"),
    [
        ("127.0.0.1:1", "Nothing answers at 127.0.0.1:1"),
        ("evalsvc-tls.invalid:50051", "The name in evalsvc-tls.invalid:50051 does not resolve"),
    ],
)
def test_evalctl_says_nothing_answers_where_nothing_listens(
    target: str, told: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing listening, or a name that does not resolve (whose transport message names the address: one
    with "tls" in it was told TLS does not match)."""
    from evalsvc_client import cli

    assert cli.main(["--target", target, "--api-key", "evk_x", "list"]) == cli.EXIT_ERROR
    said = capsys.readouterr().err
    assert told in said and "Something answers" not in said, said


async def test_mtls_refuses_a_certificate_from_another_ca(mtls_server: EvalServer, pki: Pki) -> None:
    _, other_key, other_cert = make_ca("some other CA")
    stranger = make_leaf(other_key, other_cert, "stranger", server=False)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert, private_key=stranger.key, certificate_chain=stranger.cert
    )
    async with secure_channel(mtls_server.port, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"tls_cert": "cert.pem"}, "--tls-cert (EVALSVC_TLS_CERT) was given without --tls-key (EVALSVC_TLS_KEY)"),
        ({"tls_key": "key.pem"}, "--tls-key (EVALSVC_TLS_KEY) was given without --tls-cert (EVALSVC_TLS_CERT)"),
        (
            {"tls_client_ca": "ca.pem"},
            "--tls-client-ca (EVALSVC_TLS_CLIENT_CA) needs --tls-cert (EVALSVC_TLS_CERT) and "
            "--tls-key (EVALSVC_TLS_KEY)",
        ),
        (
            {"tls_cert": "missing.pem", "tls_key": "missing.key"},
            "--tls-cert (EVALSVC_TLS_CERT) 'missing.pem' cannot be read",
        ),
    ],
)
def test_incomplete_tls_settings_are_refused(tmp_path: Path, overrides: dict[str, str], complaint: str) -> None:
    with pytest.raises(TlsConfigError, match=re.escape(complaint)):
        server_credentials(make_settings(tmp_path, **overrides))


def test_a_key_file_without_a_key_is_refused(tmp_path: Path, pki: Pki) -> None:
    settings = make_settings(tmp_path, tls_cert=str(pki.cert_file), tls_key=str(pki.cert_file))
    with pytest.raises(TlsConfigError, match="holds no PEM PRIVATE KEY"):
        server_credentials(settings)


@pytest.mark.parametrize(
    ("files", "complaint"),
    [
        (
            {"tls_key": "other_key"},
            "--tls-key (EVALSVC_TLS_KEY) '{other_key}' does not match --tls-cert (EVALSVC_TLS_CERT) '{server_cert}'",
        ),
        (
            {"tls_key": "garbled_key"},
            "--tls-key (EVALSVC_TLS_KEY) '{garbled_key}' holds no PEM PRIVATE KEY that can be read",
        ),
        ({"tls_key": "encrypted_key"}, "--tls-key (EVALSVC_TLS_KEY) '{encrypted_key}' is encrypted"),
        (
            {"tls_cert": "garbled_cert"},
            "--tls-cert (EVALSVC_TLS_CERT) '{garbled_cert}' holds no PEM CERTIFICATE that can be read",
        ),
        (
            {"tls_client_ca": "garbled_cert"},
            "--tls-client-ca (EVALSVC_TLS_CLIENT_CA) '{garbled_cert}' holds no PEM CERTIFICATE that can be read",
        ),
    ],
)
def test_tls_files_that_cannot_be_loaded_are_refused(
    tmp_path: Path, pki: Pki, files: dict[str, str], complaint: str
) -> None:
    """grpc found these out only when the port was bound: three lines of its core's log, then "Failed to
    bind" naming no flag (exit 1), after the database was migrated."""
    made = {
        "other_key": _pem_key(_key()),
        "garbled_key": b"-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
        "encrypted_key": _key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
        "garbled_cert": b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    }
    paths = {"server_cert": str(pki.cert_file)}
    for name, data in made.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = str(tmp_path / name)
    overrides = {"tls_cert": str(pki.cert_file), "tls_key": str(pki.key_file)}
    overrides |= {setting: paths[name] for setting, name in files.items()}
    with pytest.raises(TlsConfigError) as refused:
        server_credentials(make_settings(tmp_path, **overrides))
    assert str(refused.value).startswith(complaint.format_map(paths)), refused.value


def test_a_key_of_another_certificate_exits_2_in_one_line_before_the_database_is_made(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "other.key").write_bytes(_pem_key(_key()))
    db = tmp_path / "new.db"
    failed = failed_start(
        dbs.db_url(tmp_path, "new.db", migrated=False),
        *("--tls-cert", str(pki.cert_file), "--tls-key", str(tmp_path / "other.key")),
    )
    assert_failed_cleanly(failed, 2, "--tls-key (EVALSVC_TLS_KEY)", "does not match --tls-cert (EVALSVC_TLS_CERT)")
    assert not db.exists()


async def test_a_bad_tls_setting_stops_start_before_minting_a_key(tmp_path: Path) -> None:
    srv = EvalServer(make_settings(tmp_path, tls_cert="only-a-cert.pem"))
    with pytest.raises(TlsConfigError):
        await srv.start()
    assert srv.bootstrap_key is None
    await srv.db.close()


@pytest.mark.parametrize(
    ("addr", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:0", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/tmp/evalsvc.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.0.0.5:50051", False),
        ("evalsvc.internal:50051", False),
    ],
)
def test_loopback_addresses(addr: str, loopback: bool) -> None:
    assert is_loopback(addr) is loopback


@pytest.mark.parametrize(
    ("address", "said"), [("grpc_addr", "serving gRPC WITHOUT TLS"), ("http_addr", "REST gateway WITHOUT TLS")]
)
async def test_plaintext_on_a_non_loopback_address_logs_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, address: str, said: str
) -> None:
    caplog.set_level(logging.WARNING, logger="evalsvc.tls")
    srv = EvalServer(make_settings(tmp_path, **{address: "0.0.0.0:0"}))
    await srv.start()
    await srv.stop(grace=0.5)
    warnings = [r.getMessage() for r in caplog.records if r.name == "evalsvc.tls"]
    assert len(warnings) == 1, warnings
    assert said in warnings[0] and "0.0.0.0:0" in warnings[0]


@pytest.mark.parametrize("address", ["grpc_addr", "http_addr"])
async def test_tls_on_a_non_loopback_address_logs_no_warning(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, address: str
) -> None:
    """gRPC and the REST gateway alike (the gateway serves HTTPS with the same files)."""
    caplog.set_level(logging.WARNING, logger="evalsvc.tls")
    tls = {"tls_cert": str(pki.cert_file), "tls_key": str(pki.key_file)}
    srv = EvalServer(make_settings(tmp_path, **{address: "0.0.0.0:0"}, **tls))
    await srv.start()
    await srv.stop(grace=0.5)
    assert not [r for r in caplog.records if r.name == "evalsvc.tls"]


# --- The REST gateway: HTTPS with the gRPC port's certificate, and the same client-certificate demand.


@pytest.fixture
def client_cert_files(tmp_path: Path, pki: Pki) -> tuple[Path, Path]:
    """The client certificate and its key as files (what ssl loads a client's chain from)."""
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(pki.client.cert)
    key.write_bytes(pki.client.key)
    return cert, key


def trusting(pki: Pki, client: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A client context that trusts the test CA, presenting `client` (certificate, key) when given."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if client is not None:
        context.load_cert_chain(*client)
    return context


async def test_the_gateway_serves_https_with_the_grpc_certificate_and_no_plain_http(tmp_path: Path, pki: Pki) -> None:
    """It served plain HTTP whatever --tls-cert said, and API keys crossed the network in clear text."""
    settings = make_settings(tmp_path, http_addr="127.0.0.1:0", tls_cert=str(pki.cert_file), tls_key=str(pki.key_file))
    async with testing.EvalServiceTestServer(settings=settings) as started:
        url = started.http_url
        assert url is not None and url.startswith("https://127.0.0.1:")
        headers = {"authorization": f"Bearer {started.api_key}"}
        async with httpx.AsyncClient(verify=trusting(pki), headers=headers, timeout=30) as https:
            listed = await https.get(f"{url}/v1/runs")
            assert listed.status_code == 200, listed.text
            page = await https.get(f"{url}/ui/runs")  # the run pages too
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        async with httpx.AsyncClient(headers=headers, timeout=30) as plain:
            with pytest.raises(httpx.TransportError):
                await plain.get(f"{url.replace('https:', 'http:')}/v1/runs")


async def test_with_a_client_ca_the_gateway_requires_a_client_certificate_as_grpc_does(
    tmp_path: Path, pki: Pki, client_cert_files: tuple[Path, Path]
) -> None:
    settings = make_settings(
        tmp_path,
        http_addr="127.0.0.1:0",
        tls_cert=str(pki.cert_file),
        tls_key=str(pki.key_file),
        tls_client_ca=str(pki.ca_file),
    )
    async with testing.EvalServiceTestServer(settings=settings) as started:
        url = f"{started.http_url}/v1/runs"
        headers = {"authorization": f"Bearer {started.api_key}"}
        async with httpx.AsyncClient(verify=trusting(pki, client_cert_files), headers=headers, timeout=30) as mtls:
            assert (await mtls.get(url)).status_code == 200
        async with httpx.AsyncClient(verify=trusting(pki), headers=headers, timeout=30) as anonymous:
            with pytest.raises(httpx.TransportError):  # refused in the handshake: no certificate
                await anonymous.get(url)


async def test_the_standalone_gateway_serves_https_in_front_of_a_tls_server(
    tls_server: EvalServer, pki: Pki, tmp_path: Path
) -> None:
    """`evalsvc gateway` takes --tls-cert/--tls-key for its own listener, --grpc-ca for the server's."""
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log_file:
        gateway = subprocess.Popen(
            [
                *(sys.executable, "-m", "evalsvc", "gateway", "--http-addr", "127.0.0.1:0"),
                *("--grpc-target", f"localhost:{tls_server.port}", "--grpc-ca", str(pki.ca_file)),
                *("--tls-cert", str(pki.cert_file), "--tls-key", str(pki.key_file)),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        url = await _gateway_url(gateway, log_path)
        assert url.startswith("https://")
        headers = {"authorization": f"Bearer {tls_server.bootstrap_key}"}
        async with httpx.AsyncClient(verify=trusting(pki), headers=headers, timeout=30) as https:
            listed = await https.get(f"{url}/v1/runs")
            assert listed.status_code == 200, listed.text
    finally:
        gateway.terminate()
        gateway.wait(30)


async def _gateway_url(gateway: subprocess.Popen[bytes], log_path: Path, timeout: float = 30.0) -> str:
    """The URL a standalone gateway logs that it listens on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"REST gateway listening on (\S+)", log_path.read_text(errors="replace"))
        if found:
            return found[1]
        assert gateway.poll() is None, log_path.read_text()
        await asyncio.sleep(0.05)  # polling a log file: there is no event to await across processes
    raise TimeoutError(log_path.read_text())


def test_a_key_that_is_not_the_certificates_is_refused_before_the_gateway_starts(tmp_path: Path, pki: Pki) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(pki.client.key)
    settings = make_settings(tmp_path, tls_cert=str(pki.cert_file), tls_key=str(other))
    with pytest.raises(TlsConfigError, match=r"--tls-key .* does not match --tls-cert"):
        http_ssl_context(settings)


def test_an_encrypted_key_is_refused_not_asked_for_on_the_terminal(tmp_path: Path, pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.server.key, password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    settings = make_settings(tmp_path, tls_cert=str(pki.cert_file), tls_key=str(encrypted))
    with pytest.raises(TlsConfigError, match="is encrypted"):
        http_ssl_context(settings)


async def test_a_keyless_body_over_tls_gets_its_401_not_a_reset(tmp_path: Path, pki: Pki) -> None:
    """The key is checked before the body is read, and the answer is given with the body unread. Over TLS,
    which cannot half-close, the connection was closed at once: a client sending its whole body before
    reading (http.client, requests) got SSLEOFError instead of its 401. The rest is read and dropped."""
    settings = make_settings(tmp_path, http_addr="127.0.0.1:0", tls_cert=str(pki.cert_file), tls_key=str(pki.key_file))
    srv = EvalServer(settings)
    await srv.start()
    try:
        assert srv.gateway is not None
        context = ssl.create_default_context(cadata=pki.ca.cert.decode())

        def keyless_post() -> int:
            connection = http.client.HTTPSConnection("localhost", srv.gateway.port, timeout=30, context=context)
            try:
                connection.request("POST", "/v1/runs", body=b"{" + b" " * (4 << 20), headers={"x-api-key": ""})
                return connection.getresponse().status
            finally:
                connection.close()

        assert await asyncio.to_thread(keyless_post) == 401
    finally:
        await srv.stop(grace=1.0)
