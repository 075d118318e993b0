"""Transport security: TLS and mutual TLS for the gRPC port and the REST gateway, and a warning when
there is none.

API keys travel in request metadata and headers, so without TLS anyone on the network path can read
them and every run's data. Loopback-only servers (the default `127.0.0.1`) are safe without TLS;
anything else should have `--tls-cert/--tls-key`, and `--tls-client-ca` when clients are machines that
can hold certificates (mTLS: a stolen API key alone is then not enough). The gateway serves HTTPS with
the same certificate and key, and asks for client certificates whenever gRPC does: one setting, one
policy for both doors.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from evalsvc.config import Settings, named

log = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """The TLS settings are incomplete or name unusable files; the server must not start."""


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`, or None when TLS is off (neither cert nor key given).

    With `--tls-client-ca` the server requires a client certificate signed by that CA and refuses
    the handshake otherwise. Half a configuration is an error rather than a silent plaintext server.
    """
    pems = _read_files(settings)
    if pems is None:
        return None
    return grpc.ssl_server_credentials(
        [(pems.key, pems.chain)], root_certificates=pems.client_ca, require_client_auth=pems.client_ca is not None
    )


def http_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The REST gateway's TLS: the certificate and key of `--tls-cert/--tls-key`, and with
    `--tls-client-ca` a client certificate signed by that CA required, as gRPC requires one; None when
    TLS is off. Made before the gateway listens, so that a bad file is a TlsConfigError naming its flag
    (uvicorn would load the files inside its server task, where a failure is a traceback), a key that is
    not the certificate's included (gRPC finds that only at the first handshake)."""
    pems = _read_files(settings)
    if pems is None:
        return None
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key, password=lambda: _encrypted(key))  # checked by `_read_files`
    if client_ca:
        _load_certificates(context, client_ca, named("tls_client_ca"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass(frozen=True)
class _Pems:
    """The TLS files' contents."""

    chain: bytes
    key: bytes
    client_ca: bytes | None


def _read_files(settings: Settings) -> _Pems | None:
    """The files of `--tls-cert`, `--tls-key` and `--tls-client-ca`, read and checked; None when TLS is
    off. Half a configuration is a TlsConfigError: it must not become a silent plaintext server."""
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if not cert and not key:
        if client_ca:
            raise TlsConfigError(
                f"{named('tls_client_ca')} needs {named('tls_cert')} and {named('tls_key')} too: "
                "mTLS is TLS plus client checks"
            )
        return None
    if not cert or not key:
        given, missing = (named("tls_cert"), named("tls_key")) if cert else (named("tls_key"), named("tls_cert"))
        raise TlsConfigError(f"{given} was given without {missing}: TLS needs both the certificate and its key")
    pems = _Pems(
        read_pem(cert, named("tls_cert"), "CERTIFICATE"),
        read_pem(key, named("tls_key"), "PRIVATE KEY"),
        read_pem(client_ca, named("tls_client_ca"), "CERTIFICATE") if client_ca else None,
    )
    _check_loadable(cert, key, client_ca)
    return pems


def read_pem(path: str, flag: str, kind: str) -> bytes:
    """The file's bytes, checked to hold a PEM block of `kind`: gRPC's own error for a bad file
    comes only at the first handshake and names neither the flag nor the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{flag} {path!r} cannot be read: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise TlsConfigError(f"{flag} {path!r} holds no PEM {kind}")
    return data


def _check_loadable(cert: str, key: str, client_ca: str) -> None:
    """Load the files as the TLS library will, so that a PEM block that does not parse, or a key that
    is not the certificate's, is refused naming the flag. gRPC finds out only when the port is bound,
    after the database was migrated: three lines of its core's log and "Failed to bind" (exit 1)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_certificates(context, cert, named("tls_cert"))
    try:
        context.load_cert_chain(cert, key, password=lambda: _encrypted(key))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(
                f"{named('tls_key')} {key!r} does not match {named('tls_cert')} {cert!r}: it is the private key of "
                "another certificate"
            ) from exc
        raise TlsConfigError(f"{named('tls_key')} {key!r} holds no PEM PRIVATE KEY that can be read") from exc
    if client_ca:
        _load_certificates(context, client_ca, named("tls_client_ca"))


def _load_certificates(context: ssl.SSLContext, path: str, flag: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"{flag} {path!r} holds no PEM CERTIFICATE that can be read") from exc


def _encrypted(key: str) -> bytes:
    """Called instead of OpenSSL's password prompt (which would wait on the terminal) for an
    encrypted key: gRPC cannot use one."""
    raise TlsConfigError(f"{named('tls_key')} {key!r} is encrypted; evalsvc needs the key unencrypted")


def is_loopback(addr: str) -> bool:
    """Whether a listen address (gRPC's or the gateway's) only accepts connections from this machine.

    `127.0.0.0/8`, `::1`, `localhost` and Unix sockets are; a wildcard (`0.0.0.0`, `[::]`, empty
    host), any other address and any other host name are not (a name may resolve to anything).
    """
    if addr.startswith(("unix:", "unix-abstract:")):
        return True
    host = addr.rsplit(":", 1)[0] if ":" in addr else addr
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(what: str, addr: str, encrypted: bool) -> None:
    """Log a WARNING when `what` (gRPC, the REST gateway) serves a non-loopback address in plaintext."""
    if not encrypted and not is_loopback(addr):
        log.warning(
            "serving %s WITHOUT TLS on non-loopback address %s: API keys and run data cross the network "
            "in clear text; set --tls-cert and --tls-key (and --tls-client-ca for mTLS)",
            what,
            addr,
        )
