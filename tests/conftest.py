"""Shared fixtures: a real server on port 0 over a real SQLite file, and real channels to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from evalsvc.config import Settings
from evalsvc.server import EvalServer
from evalsvc.v1 import dataset_service_pb2_grpc, eval_run_service_pb2_grpc
from tests.helpers import keyed_channel


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for an in-process test server: port 0, a fresh SQLite file, quick polling."""
    values: dict[str, object] = {
        "grpc_addr": "127.0.0.1:0",
        "db": f"sqlite+aiosqlite:///{tmp_path / 'evalsvc.db'}",
        "poll_interval_s": 0.2,
        "grace_s": 1.0,
        "auth_cache_s": 0.0,
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EvalServer]:
    srv = EvalServer(make_settings(tmp_path))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=1.0)


@pytest.fixture
async def channel(server: EvalServer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel that presents the server's bootstrap key (tenant `default`) on every call."""
    assert server.bootstrap_key
    async with keyed_channel(server.port, server.bootstrap_key) as ch:
        yield ch


@pytest.fixture
def runs(channel: grpc.aio.Channel) -> eval_run_service_pb2_grpc.EvalRunServiceStub:
    return eval_run_service_pb2_grpc.EvalRunServiceStub(channel)


@pytest.fixture
def datasets(channel: grpc.aio.Channel) -> dataset_service_pb2_grpc.DatasetServiceStub:
    return dataset_service_pb2_grpc.DatasetServiceStub(channel)
