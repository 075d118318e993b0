"""Encryption at rest of tenants' secrets: AES-256-GCM under the operator's key, `EVALSVC_SECRETS_KEY`.

The key is 32 random bytes, written as URL-safe base64 (44 characters; `evalsvc secrets generate-key`
prints one). Each value is sealed with a fresh 96-bit nonce; the tenant and the secret's name are the
associated data, so a sealed value copied to another row (another tenant, another name) does not open.
Stored: nonce || ciphertext+tag.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
KEY_VARIABLE = "EVALSVC_SECRETS_KEY"


class SecretsKeyError(ValueError):
    """The secrets key is malformed, or is not the key the stored secrets were sealed with."""


def generate_key() -> str:
    """A new key, in the form EVALSVC_SECRETS_KEY takes."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()


def _associated(tenant: str, name: str) -> bytes:
    return f"evalsvc-secret\x00{tenant}\x00{name}".encode()


class Sealer:
    """Seals and opens secret values with one key."""

    def __init__(self, key: str) -> None:
        try:
            raw = base64.urlsafe_b64decode(key.strip().encode())
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != KEY_BYTES:
            raise SecretsKeyError(
                f"{KEY_VARIABLE} must be {KEY_BYTES} bytes in URL-safe base64 (evalsvc secrets generate-key)"
            )
        self._aead = AESGCM(raw)

    def seal(self, tenant: str, name: str, value: str) -> bytes:
        """The stored form of a value."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, value.encode(), _associated(tenant, name))

    def open(self, tenant: str, name: str, sealed: bytes) -> str:
        """The value of a stored form; SecretsKeyError when this key did not seal it (for this row)."""
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _associated(tenant, name)).decode()
        except InvalidTag:
            raise SecretsKeyError(f"{KEY_VARIABLE} is not the key the stored tenant secrets were sealed with") from None
