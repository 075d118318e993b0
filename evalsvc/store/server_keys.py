"""Queries on the service's own keys (server_keys)."""

from __future__ import annotations

import os
import time

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from evalsvc.store.db import Database
from evalsvc.store.models import ServerKeyRow

SERVER_KEYS = ServerKeyRow.__table__  # type: ignore[attr-defined]
KEY_BYTES = 32


async def get_or_create(db: Database, name: str) -> bytes:
    """The key called `name`, made (random, 256 bits) by whichever server asks first. Replicas that
    start together race to insert it; the losers read the winner's."""
    query = select(SERVER_KEYS.c.secret).where(SERVER_KEYS.c.name == name)
    async with db.read() as conn:
        found = (await conn.execute(query)).scalar_one_or_none()
    if found is not None:
        return bytes(found)
    try:
        async with db.write() as conn:
            secret = os.urandom(KEY_BYTES)
            await conn.execute(insert(SERVER_KEYS).values(name=name, secret=secret, create_time=time.time()))
        return secret
    except IntegrityError:
        async with db.read() as conn:
            return bytes((await conn.execute(query)).scalar_one())
