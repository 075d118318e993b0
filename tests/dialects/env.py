"""What every dialect test shares: a real server whose REST gateway serves one dialect, its default judge
a real-HTTP fake (tests/fake_llm.py), and an HTTP client authenticated the way the vendor documents.

A dialect's test module subclasses `DialectEnv` with its vendor's helpers and builds it in its `env`
fixture from `dialect_gateway`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from evalsvc.server import EvalServer
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint
from tests.helpers import serving_gateway, watch_to_end


@dataclass(kw_only=True)
class DialectEnv:
    srv: EvalServer
    http: httpx.AsyncClient  # sends the key in the vendor's header
    judge: FakeEndpoint  # the server's default judge
    key: str  # the test's API key

    @property
    def base_url(self) -> str:
        """The gateway's URL: what a vendor's own client is pointed at."""
        return str(self.http.base_url).rstrip("/")

    @property
    def native_auth(self) -> dict[str, str]:
        """The key as the native routes take it, whatever header the vendor uses."""
        return {"authorization": f"Bearer {self.key}"}

    async def save_target(self, name: str, target: dict[str, Any], **labels: str) -> str:
        """A saved target created through the native route (what vendors call an agent or a model); its id."""
        body = {"target": {"displayName": name, "labels": labels, "target": target}}
        created = await self.http.post("/v1/targets", json=body, headers=self.native_auth)
        assert created.status_code == 200, created.text
        return str(created.json()["target"]["id"])

    async def native(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to a native route (`/v1/runs`, `/v1/datasets`...) as the test's tenant; the answer."""
        answer = await self.http.post(path, json=body, headers=self.native_auth)
        assert answer.status_code == 200, answer.text
        return answer.json()  # type: ignore[no-any-return]

    async def ended(self, run_id: str) -> dict[str, Any]:
        """The run as its terminal event shows it, read on the native NDJSON watch rather than through
        the dialect, whose reads may have effects (Bland caches a finished run's summary)."""
        return await watch_to_end(self.http, run_id, self.native_auth)


@contextmanager
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing inside logs at ERROR: neither evalsvc nor uvicorn, whose "Exception in ASGI application"
    (with a traceback, after a plain-text 500) its own logging config keeps from the root logger caplog
    reads, so caplog's handler is added to uvicorn's logger too."""
    server_log = logging.getLogger("uvicorn")
    server_log.addHandler(caplog.handler)
    try:
        yield
    finally:
        server_log.removeHandler(caplog.handler)
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, [f"{record.name}: {record.getMessage()}" for record in errors]


def chat_target(url: str, model: str, **endpoint: Any) -> dict[str, Any]:
    """A chat target on an OpenAI-compatible fake."""
    return {"chat": {"endpoint": {"baseUrl": url + "/v1", **endpoint}, "model": model}}


@asynccontextmanager
async def dialect_gateway(
    folder: Path,
    dialect: str,
    judge: FakeEndpoint,
    *,
    key_header: str = "authorization",
    key_prefix: str = "Bearer ",
    **settings: Any,
) -> AsyncIterator[tuple[EvalServer, httpx.AsyncClient]]:
    """A started server whose gateway serves `dialect`, `judge` its default judge (more settings may be
    given), and a client sending the bootstrap key as `key_header: key_prefix<key>`."""
    configured = make_settings(
        folder,
        http_addr="127.0.0.1:0",
        dialects=dialect,
        outbound_allow="127.0.0.1",
        judge_base_url=judge.url + "/v1",
        **{"judge_model": "judge-test", **settings},
    )
    async with serving_gateway(configured, key_header=key_header, key_prefix=key_prefix) as (srv, http):
        assert srv.bootstrap_key
        yield srv, http


async def check_head(http: httpx.AsyncClient, *paths: str) -> None:
    """HEAD on each of a dialect's GET paths answers as GET does without the body (RFC 9110 9.3.2): the
    same status and content type, whether the GET is served or refused (a HEAD was a 405 whose Allow
    listed GET)."""
    for path in paths:
        got, head = await http.get(path), await http.head(path)
        shown = (got.status_code, got.headers.get("content-type"), b"")
        assert (head.status_code, head.headers.get("content-type"), head.content) == shown, (path, got.text)
