"""Webhooks: tenants' endpoints notified of run events (Standard Webhooks; docs/webhooks.md).

`events` names the event types, `signing` builds and signs a delivery, `service` manages webhooks,
and `sender` sends the outbox that the run transactions write (evalsvc.store.webhooks.enqueue).
"""
