"""The API key format: `evk_<key id>_<secret><checksum>`.

- key id: 12 lowercase base32 characters, stored in clear, used to find the key's row;
- secret: 32 base62 characters (~190 bits), of which only a SHA-256 is stored. A salted slow hash is
  for low-entropy passwords; a random 190-bit secret cannot be brute-forced, and a fast hash keeps
  authentication cheap on every RPC;
- checksum: 6 base36 characters of CRC-32 over the rest, so a mistyped or truncated key is rejected
  before any database lookup (and secret scanners can recognise real keys).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import string
import zlib
from dataclasses import dataclass

PREFIX = "evk"
_BASE62 = string.ascii_letters + string.digits
_SHAPE = re.compile(r"^evk_([a-z2-7]{12})_([A-Za-z0-9]{32})([0-9a-z]{6})$")


@dataclass(frozen=True)
class ParsedKey:
    """A well-formed key split into its parts."""

    key_id: str
    secret: str


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode())
    digits = []
    for _ in range(6):
        value, digit = divmod(value, 36)
        digits.append("0123456789abcdefghijklmnopqrstuvwxyz"[digit])
    return "".join(reversed(digits))


def new_key() -> tuple[str, ParsedKey]:
    """A fresh key: (the full key to show once, its parts)."""
    key_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()[:12]
    secret = "".join(secrets.choice(_BASE62) for _ in range(32))
    body = f"{PREFIX}_{key_id}_{secret}"
    return body + _checksum(body), ParsedKey(key_id, secret)


def parse(key: str) -> ParsedKey | None:
    """The parts of a well-formed key with a valid checksum; None otherwise."""
    match = _SHAPE.match(key)
    if match is None:
        return None
    key_id, secret, checksum = match.groups()
    if not hmac.compare_digest(_checksum(f"{PREFIX}_{key_id}_{secret}"), checksum):
        return None
    return ParsedKey(key_id, secret)


def hash_secret(secret: str) -> str:
    """What is stored instead of the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented secret with a stored hash."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)
