"""Shared fixtures: a real server on port 0 over a real database, and real channels to it
(evalsvc.testing's EvalServiceTestServer, as users' own tests start one).

The database is a SQLite file, or with `EVALSVC_TEST_DB=postgres` a scratch PostgreSQL database per
test (tests/dbs.py); when that PostgreSQL is unreachable every test is skipped, saying why."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from evalsvc.config import Settings
from evalsvc.server import EvalServer
from evalsvc.testing import EvalServiceTestServer, keyed_channel, settings_for_tests
from evalsvc.v1 import dataset_service_pb2_grpc, eval_run_service_pb2_grpc
from tests import dbs
from tests.helpers import Tenant

# The SDK and evalctl retry calls that are safe to repeat for 30 s by default (RetryPolicy.max_elapsed_s). Here,
# about as long as the count bound that was there before it (5 attempts, 0.75-1.5 s): the many tests that call an
# address where nothing listens (127.0.0.1:1) expect their answer in that time, not in 30 s. Tests of the bound
# set their own (RetryPolicy(max_elapsed_s=...), or the variable in evalctl's environment). Set here, before any
# test, so that the evalctl processes the tests start inherit it too.
os.environ.setdefault("EVALSVC_RETRY_MAX_ELAPSED_S", "1.5")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="long crash tests: crash battery 50 kills instead of 10; replica watchers 12 kills instead of 4",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"evalsvc test database: {'PostgreSQL at ' + dbs.ADMIN_URL if dbs.USE_POSTGRES else 'SQLite files'}"


# `make test` runs the suite on two pytest-xdist workers, a module at a time (`-n 2 --dist loadfile`). These
# modules run one after another on one worker, never beside each other: each either keeps the CPUs busy for
# a long while (the fuzzer, kill -9 batteries with several server processes, grading processes) or asserts
# a latency bound (a run ends within 1 s, a GetRun answers within 1.5 s while grading saturates the CPUs, a
# revoked key's stream ends within 4 s) that two of them side by side on a 2-core machine could break.
ONE_AT_A_TIME = frozenset(
    {
        "tests/test_gateway_fuzz.py",
        "tests/test_crash_battery.py",
        "tests/test_replica_watchers.py",
        "tests/test_grading_isolation.py",
        "tests/test_liveness.py",
        "tests/test_revocation.py",
        "tests/test_gateway_limits.py",  # bounds another tenant's GetRun latency while a 3 MB body is read
    }
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile`, with the ONE_AT_A_TIME modules as one file. (Not `xdist_group` marks with
    `--dist loadgroup`: pytest-xdist 3.8 renames the node ids that mark, which pytest 9.2 no longer lets it.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class OneAtATimeScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "one at a time" if module in ONE_AT_A_TIME else module

    return OneAtATimeScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not dbs.USE_POSTGRES:
        return
    reason = dbs.postgres_unavailable()
    if reason is not None:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _scratch_databases() -> Iterator[None]:
    """Drop the PostgreSQL databases a test created (after its servers stopped: autouse tears down last).

    Databases of module-scoped fixtures were created before this fixture started, so they survive
    until the session ends."""
    before = dbs.created_count()
    yield
    dbs.drop_created(since=before)


@pytest.fixture(scope="session", autouse=True)
def _no_api_key_from_the_shell() -> Iterator[None]:
    """No EVALSVC_API_KEY from the shell the tests run in: the SDK sends it when given no key (a keyless client's
    test sent a developer's exported key). A test that wants one sets it (monkeypatch.setenv, a subprocess's env)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("EVALSVC_API_KEY", raising=False)
        yield


@pytest.fixture(scope="session", autouse=True)
def _scratch_template() -> Iterator[None]:
    yield
    dbs.drop_created()
    dbs.drop_template()


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for an in-process test server (evalsvc.testing's defaults) over a fresh database (tests/dbs.py)."""
    db = overrides.pop("db") if "db" in overrides else dbs.db_url(tmp_path)
    return settings_for_tests(str(db), **overrides)


@pytest.fixture
async def test_server(tmp_path: Path) -> AsyncIterator[EvalServiceTestServer]:
    async with EvalServiceTestServer(database_url=dbs.db_url(tmp_path)) as started:
        yield started


@pytest.fixture
def server(test_server: EvalServiceTestServer) -> EvalServer:
    return test_server.server


@pytest.fixture
async def channel(server: EvalServer) -> AsyncIterator[grpc.aio.Channel]:
    """A channel that presents the server's bootstrap key (tenant `default`) on every call; to `server`,
    which a module may override with a server of its own settings."""
    assert server.bootstrap_key
    async with keyed_channel(f"127.0.0.1:{server.port}", server.bootstrap_key) as ch:
        yield ch


@pytest.fixture
def runs(channel: grpc.aio.Channel) -> eval_run_service_pb2_grpc.EvalRunServiceStub:
    return eval_run_service_pb2_grpc.EvalRunServiceStub(channel)


@pytest.fixture
def datasets(channel: grpc.aio.Channel) -> dataset_service_pb2_grpc.DatasetServiceStub:
    return dataset_service_pb2_grpc.DatasetServiceStub(channel)


@pytest.fixture
async def tenants(server: EvalServer) -> AsyncIterator[tuple[Tenant, Tenant]]:
    """Two tenants of `server`: the bootstrap key's (`default`), and `other`."""
    assert server.bootstrap_key
    other_key, _ = await server.keys.create("other")
    async with (
        keyed_channel(f"127.0.0.1:{server.port}", server.bootstrap_key) as mine,
        keyed_channel(f"127.0.0.1:{server.port}", other_key) as theirs,
    ):
        yield Tenant(mine), Tenant(theirs)
