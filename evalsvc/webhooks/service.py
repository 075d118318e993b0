"""The webhook service: register, read, change, delete webhooks, rotate their secrets, list deliveries.

Webhooks belong to a tenant and are notified only of that tenant's runs (the outbox is written per
tenant: evalsvc.store.webhooks.enqueue). A webhook's URL follows the rule of target URLs: checked
when it is set as endpoints are (`destination_violations`: a name that does not resolve then is
accepted), and again before and while each attempt connects (evalsvc.webhooks.sender).
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncConnection

from evalsvc.errors import FieldViolation, invalid_argument, not_found
from evalsvc.http.outbound import AllowList, check_url_shape, destination_violations
from evalsvc.idempotency import create_once, fingerprint
from evalsvc.ids import PageTokens, new_id, page_size
from evalsvc.limits import StoredCap
from evalsvc.messages import webhook_events as events
from evalsvc.messages.convert import timestamp
from evalsvc.messages.validation import MAX_DESCRIPTION, MAX_REQUEST_ID, check_length, mask_paths
from evalsvc.store import webhooks as store
from evalsvc.store.db import Database
from evalsvc.store.records import WebhookDeliveryRecord, WebhookRecord
from evalsvc.v1 import webhook_service_pb2 as wpb
from evalsvc.webhooks import signing

MAX_URL = 2048
# How long a rotated-out secret still signs deliveries, so receivers can switch without losing any.
PREVIOUS_SECRET_GRACE_S = 24 * 3600
UPDATABLE = ("url", "event_types", "description", "enabled")


def webhook_from(webhook: WebhookRecord, *, signing_secret: str = "") -> wpb.Webhook:
    """The Webhook message of a webhook; the secret only where the caller passes it (create, rotate)."""
    return wpb.Webhook(
        id=webhook.id,
        url=webhook.url,
        event_types=events.types_of(webhook.event_mask),
        description=webhook.description,
        enabled=webhook.enabled,
        disabled_reason=webhook.disabled_reason,
        signing_secret=signing_secret,
        create_time=timestamp(webhook.create_time),
        update_time=timestamp(webhook.update_time),
        dropped_event_count=webhook.dropped_events,
        circuit_open_until=timestamp(webhook.circuit_open_until),
        consecutive_failures=webhook.consecutive_failures,
    )


def delivery_from(delivery: WebhookDeliveryRecord) -> wpb.WebhookDelivery:
    """The WebhookDelivery message of an outbox delivery."""
    return wpb.WebhookDelivery(
        id=delivery.id,
        webhook_id=delivery.webhook_id,
        event_type=delivery.event_type,
        run_id=delivery.run_id,
        seq=delivery.seq,
        status=cast("wpb.WebhookDeliveryStatus", delivery.status),
        attempts=delivery.attempts,
        last_response_code=delivery.last_response_code,
        last_error=delivery.last_error,
        create_time=timestamp(delivery.create_time),
        last_attempt_time=timestamp(delivery.last_attempt_time),
        next_attempt_time=timestamp(delivery.next_attempt_time if delivery.status == store.PENDING else None),
    )


def _check_event_types(event_types: Sequence[str], at: str, out: list[FieldViolation]) -> bool:
    """Each event type is a known one, named once: no more of them than there are (counted before any
    is looked at: 1,300,000 held the event loop a second), and a repeated one is refused, not silently
    collapsed. True when nothing was appended."""
    before = len(out)
    if len(event_types) > len(events.EVENT_TYPES):
        out.append(FieldViolation(at, f"at most {len(events.EVENT_TYPES)} event types, each once"))
        return False
    seen: set[str] = set()
    for i, event_type in enumerate(event_types):
        if event_type not in events.EVENT_TYPES:
            out.append(FieldViolation(f"{at}[{i}]", f"unknown event type; known: {', '.join(events.EVENT_TYPES)}"))
        elif event_type in seen:
            out.append(FieldViolation(f"{at}[{i}]", f"{event_type!r} is named already; name each event type once"))
        seen.add(event_type)
    return len(out) == before


class WebhookService:
    """Webhooks of one database, for any tenant the caller names."""

    def __init__(self, db: Database, allow: AllowList, page_tokens: PageTokens, cap: StoredCap) -> None:
        """`cap` bounds each tenant's webhooks (--max-webhooks-per-tenant)."""
        self._db = db
        self._cap = cap
        self._allow = allow
        self._page_tokens = page_tokens

    async def _check_url(self, tenant: str, url: str, at: str, out: list[FieldViolation]) -> None:
        if not url:
            out.append(FieldViolation(at, "required"))
            return
        check_length(url, MAX_URL, at, out)
        if problem := check_url_shape(url):
            out.append(FieldViolation(at, problem))
        else:
            # As a target's URL: a receiver's name not published yet (or DNS down) was refused
            # ("cannot resolve host"), while a target on the same host was accepted.
            out.extend(await destination_violations([(at, url)], self._allow, tenant))

    async def create(self, tenant: str, request: wpb.CreateWebhookRequest) -> wpb.Webhook:
        """Register a webhook (idempotent by request_id); the answer carries its secret, this once."""
        spec = request.webhook
        violations: list[FieldViolation] = []
        check_length(request.request_id, MAX_REQUEST_ID, "request_id", violations)
        check_length(spec.description, MAX_DESCRIPTION, "webhook.description", violations)
        _check_event_types(spec.event_types, "webhook.event_types", violations)
        await self._check_url(tenant, spec.url, "webhook.url", violations)
        if violations:
            raise invalid_argument(violations)
        definition = wpb.Webhook(
            url=spec.url,
            event_types=events.types_of(events.mask_of(spec.event_types or events.TERMINAL_EVENT_TYPES)),
            description=spec.description,
            enabled=spec.enabled if spec.HasField("enabled") else True,
        )
        secret = signing.new_secret()
        now = time.time()
        webhook = WebhookRecord(
            id=new_id("wh"),
            tenant=tenant,
            request_id=request.request_id or None,
            request_hash=fingerprint(definition),
            url=definition.url,
            event_mask=events.mask_of(definition.event_types),
            description=definition.description,
            enabled=definition.enabled,
            disabled_reason="",
            secret=secret,
            previous_secret=None,
            previous_secret_expire_time=None,
            create_time=now,
            update_time=now,
            consecutive_failures=0,
            circuit_open_until=None,
            circuit_opens=0,
            dropped_events=0,
        )

        async def insert(conn: AsyncConnection) -> wpb.Webhook:
            self._cap.check(await store.count_webhooks(conn, tenant))
            await store.insert_webhook(conn, webhook)
            return webhook_from(webhook, signing_secret=signing.secret_text(secret))

        async def replay(existing: WebhookRecord) -> wpb.Webhook:
            return webhook_from(existing)

        return await create_once(
            self._db,
            kind="webhook",
            request_id=request.request_id,
            fingerprint=webhook.request_hash,
            find=lambda conn: store.find_by_request_id(conn, tenant, request.request_id),
            create=insert,
            replay=replay,
        )

    async def get(self, tenant: str, webhook_id: str) -> wpb.Webhook:
        """A webhook without its secret; NOT_FOUND when missing or another tenant's."""
        async with self._db.read() as conn:
            found = await store.get_webhook(conn, tenant, webhook_id)
        if found is None:
            raise not_found("webhook", webhook_id)
        return webhook_from(found)

    async def list(self, tenant: str, request: wpb.ListWebhooksRequest) -> tuple[list[wpb.Webhook], str]:
        """A page of webhooks, newest first, and the next page's token."""
        limit = page_size(request.page_size, 50)
        before = self._page_tokens.decode(tenant, "webhooks", {}, request.page_token)
        async with self._db.read() as conn:
            rows = await store.list_webhooks(conn, tenant, before_id=before, limit=limit + 1)
        webhooks = [webhook_from(row) for row in rows[:limit]]
        token = self._page_tokens.encode(tenant, "webhooks", {}, webhooks[-1].id) if len(rows) > limit else ""
        return webhooks, token

    async def update(self, tenant: str, request: wpb.UpdateWebhookRequest) -> wpb.Webhook:
        """Change the fields named by the update mask (every set one when it is empty; every one when it is
        `*`, so an unset url or event_types is refused and an unset `enabled` disables). Disabling fails
        the deliveries not yet sent; enabling clears the reason the server disabled it for. Enabling it
        or changing its url closes its circuit: the failures counted were the old receiver's, or the
        caller says it is back, so its deliveries are due at once."""
        spec = request.webhook
        paths = mask_paths(request.update_mask.paths, UPDATABLE) or [
            name for name in UPDATABLE if (spec.HasField(name) if name == "enabled" else getattr(spec, name))
        ]
        violations = [
            FieldViolation(
                "update_mask", f"{path!r} cannot be updated; updatable: {', '.join(UPDATABLE)}, or * for all"
            )
            for path in paths
            if path not in UPDATABLE
        ]
        if not paths:
            violations.append(FieldViolation("update_mask", "nothing to update: set a field of webhook or name it"))
        values: dict[str, Any] = {"update_time": time.time()}
        if "url" in paths:
            await self._check_url(tenant, spec.url, "webhook.url", violations)
            values["url"] = spec.url
        if "event_types" in paths:
            if not spec.event_types:
                violations.append(FieldViolation("webhook.event_types", "name at least one event type"))
            elif _check_event_types(spec.event_types, "webhook.event_types", violations):
                values["event_mask"] = events.mask_of(spec.event_types)
        if "description" in paths:
            check_length(spec.description, MAX_DESCRIPTION, "webhook.description", violations)
            values["description"] = spec.description
        if "enabled" in paths:
            values["enabled"] = spec.enabled
            values["disabled_reason"] = ""
        if violations:
            raise invalid_argument(violations)
        # Not when this very update disables it: disabling fails its deliveries after writing the webhook
        # row, the other lock order (a deadlock with another replica's probe claim); re-enabling closes it.
        disables = "enabled" in paths and not spec.enabled
        closes = not disables and ("url" in paths or "enabled" in paths)

        async def change(conn: AsyncConnection) -> WebhookRecord | None:
            if closes:  # its deliveries first (the lock order), then the webhook
                await store.close_circuit(conn, tenant, request.webhook_id, values["update_time"], try_now=True)
            return await store.update_webhook(conn, tenant, request.webhook_id, values)

        updated = await self._db.transact(change)
        if updated is None:
            raise not_found("webhook", request.webhook_id)
        return webhook_from(updated)

    async def delete(self, tenant: str, webhook_id: str) -> None:
        """Delete a webhook and its deliveries."""
        deleted = await self._db.transact(lambda conn: store.delete_webhook(conn, tenant, webhook_id))
        if not deleted:
            raise not_found("webhook", webhook_id)

    async def rotate_secret(self, tenant: str, request: wpb.RotateWebhookSecretRequest) -> wpb.Webhook:
        """A new secret, returned this once. The previous one keeps signing (alongside) for a day, so
        receivers that have not switched yet still verify, unless revoke_previous."""
        secret = signing.new_secret()
        now = time.time()
        keep = not request.revoke_previous

        async def rotate(conn: AsyncConnection) -> WebhookRecord | None:
            current = await store.get_webhook(conn, tenant, request.webhook_id)
            if current is None:
                raise not_found("webhook", request.webhook_id)
            return await store.update_webhook(
                conn,
                tenant,
                request.webhook_id,
                {
                    "secret": secret,
                    "previous_secret": current.secret if keep else None,
                    "previous_secret_expire_time": now + PREVIOUS_SECRET_GRACE_S if keep else None,
                    "update_time": now,
                },
            )

        rotated = await self._db.transact(rotate)
        if rotated is None:  # deleted between the two statements (PostgreSQL, another replica)
            raise not_found("webhook", request.webhook_id)
        return webhook_from(rotated, signing_secret=signing.secret_text(secret))

    async def list_deliveries(
        self, tenant: str, request: wpb.ListWebhookDeliveriesRequest
    ) -> tuple[builtins.list[wpb.WebhookDelivery], str]:  # `list` here is the method above
        """A page of a webhook's deliveries, newest first."""
        limit = page_size(request.page_size, 50)
        if request.status not in wpb.WebhookDeliveryStatus.values():
            raise invalid_argument([FieldViolation("status", "unknown delivery status")])
        query = {"webhook_id": request.webhook_id, "status": request.status}
        before = self._page_tokens.decode(tenant, "webhook_deliveries", query, request.page_token)
        async with self._db.read() as conn:
            if await store.get_webhook(conn, tenant, request.webhook_id) is None:
                raise not_found("webhook", request.webhook_id)
            rows = await store.list_deliveries(
                conn, tenant, request.webhook_id, status=request.status, before_id=before, limit=limit + 1
            )
        deliveries = [delivery_from(row) for row in rows[:limit]]
        last = deliveries[-1].id if len(rows) > limit else None
        return deliveries, "" if last is None else self._page_tokens.encode(tenant, "webhook_deliveries", query, last)
