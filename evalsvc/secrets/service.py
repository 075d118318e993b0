"""Which secrets a tenant may use, and the tenants' own secrets (SecretService).

The grant rule: a tenant may use its own secrets and the operator's secrets granted to it
(evalsvc.secrets.operator); its own shadow an operator secret of the same name. Anything else -
another tenant's secret, an operator secret granted to others, a name nobody configured - is refused
with one and the same INVALID_ARGUMENT (`unavailable`), so a caller cannot learn which names exist.

Values are sealed at rest (evalsvc.secrets.sealing), opened only to build the headers of a call, and
never returned, logged or put in an error.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence

import grpc
from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.errors import FieldViolation, Reason, ServiceError, invalid_argument, not_found
from evalsvc.ids import PageTokens, page_size
from evalsvc.limits import StoredCap
from evalsvc.secrets.operator import OperatorSecrets
from evalsvc.secrets.sealing import KEY_VARIABLE, Sealer, SecretsKeyError
from evalsvc.store import secrets as store
from evalsvc.store.db import Database
from evalsvc.store.records import TenantSecretRecord

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
MAX_VALUE_CHARS = 8192
# HTTP header values: printable ASCII, so a value can never split a header or fail to encode at call time.
_HEADER_SAFE = re.compile(r"[\x20-\x7e]+")


def unavailable(field: str, name: str) -> FieldViolation:
    """The refusal of a secret the caller may not use, whether it exists or not (the same bytes for both)."""
    return FieldViolation(
        field, f"no secret named {name!r} is available to this tenant (SecretService, or an operator grant)"
    )


def key_not_configured() -> ServiceError:
    """CreateSecret on a server without a secrets key."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.SECRETS_KEY_NOT_CONFIGURED,
        f"this server cannot store secrets: its operator has not set {KEY_VARIABLE}",
    )


class SecretService:
    """The secrets of every tenant of one database, and the operator's."""

    def __init__(
        self, db: Database, operator: OperatorSecrets, page_tokens: PageTokens, cap: StoredCap, key: str = ""
    ) -> None:
        """`cap` bounds each tenant's secrets (--max-secrets-per-tenant). `key` is EVALSVC_SECRETS_KEY;
        empty means tenants cannot store secrets. SecretsKeyError when it is malformed."""
        self._db = db
        self._cap = cap
        self._page_tokens = page_tokens
        self._operator = operator
        self._sealer = Sealer(key) if key else None

    async def check_key(self) -> None:
        """Refuse (SecretsKeyError) a key that cannot open the stored tenant secrets - missing or another
        key - so a server never starts unable to call its tenants' endpoints."""
        async with self._db.read() as conn:
            sample = await store.any_sealed(conn)
        if sample is None:
            return
        if self._sealer is None:
            raise SecretsKeyError(f"tenant secrets are stored but {KEY_VARIABLE} is not set")
        self._sealer.open(sample.tenant, sample.name, sample.sealed)

    async def refused(self, tenant: str, named: Sequence[tuple[str, str]]) -> list[FieldViolation]:
        """A violation for each (field, name) naming a secret `tenant` may not use. Reads the database
        only when something is named (and then names, not values)."""
        if not named:
            return []
        own = await self._own(tenant, [name for _, name in named], open_values=False)
        return [
            unavailable(field, name)
            for field, name in named
            if name.upper() not in own and self._operator.granted(tenant, name) is None
        ]

    async def values(self, tenant: str, names: Iterable[str]) -> dict[str, str]:
        """The values of the named secrets `tenant` may use, by upper-case name (its own first). Names it
        may not use are left out: the call that needs one fails saying so."""
        wanted = sorted({name.upper() for name in names})
        if not wanted:
            return {}
        found = {name: value for name in wanted if (value := self._operator.granted(tenant, name)) is not None}
        found.update(await self._own(tenant, wanted, open_values=True))
        return found

    async def _own(self, tenant: str, names: Sequence[str], *, open_values: bool) -> dict[str, str]:
        canonical = sorted({name.upper() for name in names if NAME.fullmatch(name)})
        if not canonical:
            return {}
        async with self._db.read() as conn:
            sealed = await store.sealed(conn, tenant, canonical)
        if not open_values:
            return dict.fromkeys(sealed, "")
        opened = {}
        for name, blob in sealed.items():
            if self._sealer is None:
                log.warning("tenant %r's secret %s cannot be opened: %s is not set", tenant, name, KEY_VARIABLE)
                continue
            try:
                opened[name] = self._sealer.open(tenant, name, blob)
            except SecretsKeyError as exc:
                log.warning("tenant %r's secret %s cannot be opened: %s", tenant, name, exc)
        return opened

    async def create(self, tenant: str, name: str, value: str) -> tuple[str, float]:
        """Set the tenant's secret (replacing its value if it exists); (its upper-case name, create time)."""
        violations = _name_violations(name)
        if len(value) > MAX_VALUE_CHARS or not _HEADER_SAFE.fullmatch(value):
            violations.append(FieldViolation("value", f"must be 1-{MAX_VALUE_CHARS} printable ASCII characters"))
        if violations:
            raise invalid_argument(violations)
        if self._sealer is None:
            raise key_not_configured()
        canonical = name.upper()
        now = time.time()
        secret = TenantSecretRecord(
            tenant=tenant, name=canonical, sealed=self._sealer.seal(tenant, canonical, value), create_time=now
        )

        async def put(conn: AsyncConnection) -> None:
            held = await store.count(conn, tenant)  # first: it takes the lock that makes the check hold
            if not await store.exists(conn, tenant, canonical):  # replacing a value takes no more room
                self._cap.check(held)
            await store.put(conn, secret)

        await self._db.transact(put)
        return canonical, now

    async def list(self, tenant: str, requested_size: int, token: str) -> tuple[list[tuple[str, float]], str]:
        """A page of the tenant's secrets by name: (name, create time) and the next page's token."""
        limit = page_size(requested_size, 50)
        after = self._page_tokens.decode(tenant, "secrets", {}, token)
        async with self._db.read() as conn:
            found = await store.page(conn, tenant, after, limit + 1)
        shown = [(secret.name, secret.create_time) for secret in found[:limit]]
        next_token = self._page_tokens.encode(tenant, "secrets", {}, shown[-1][0]) if len(found) > limit else ""
        return shown, next_token

    async def delete(self, tenant: str, name: str) -> None:
        """Delete the tenant's secret; NOT_FOUND when it has none of that name, INVALID_ARGUMENT when no
        secret could have it (empty, or not the syntax CreateSecret takes: it was NOT_FOUND "secret ''
        not found", as if a secret could be named so)."""
        if violations := _name_violations(name):
            raise invalid_argument(violations)
        if not await self._db.transact(lambda conn: store.remove(conn, tenant, name.upper())):
            raise not_found("secret", name)


def _name_violations(name: str) -> list[FieldViolation]:
    """What is wrong with a secret's name (the request's `name`), if anything."""
    if not name:
        return [FieldViolation("name", "is required")]
    if not NAME.fullmatch(name):
        return [FieldViolation("name", "must be 1-64 characters of [A-Za-z0-9_], starting with a letter")]
    return []
