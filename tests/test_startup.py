"""Start-up fails fast and cleanly (docs/operations.md, "Start-up failures"): for each cause a real
`evalsvc serve` exits non-zero within seconds, with one error line that names the cause and the
address or path, no traceback (unless --log-level debug), and a later start is unharmed."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from evalsvc import server as server_module
from evalsvc.gateway.server import check_target
from evalsvc.server import EvalServer, StartupError
from evalsvc.store import migrate
from evalsvc.store.db import Database
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, item_pb2, run_pb2, target_pb2
from tests import dbs
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, chat_reply
from tests.helpers import create_request, exact, keyed_channel, tmpfs, watch_all
from tests.procs import (
    QUICK_S,
    FailedStart,
    assert_failed_cleanly,
    evalsvc_run,
    failed_gateway,
    failed_start,
    start_server,
)


@contextlib.contextmanager
def occupied_port() -> Iterator[int]:
    """A port something else listens on (a plain socket, as another program would)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        yield taken.getsockname()[1]


def assert_one_line(failed: FailedStart, code: int, *named: str) -> str:
    """Exit `code` within QUICK_S with one line of output (a setting's refusal: no log line) naming `named`."""
    lines = failed.output.strip().splitlines()
    assert failed.code == code and failed.seconds < QUICK_S and len(lines) == 1, failed.output
    assert all(part in lines[0] for part in named), failed.output
    return lines[0]


def evalsvc_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m evalsvc ARGS` run to its end (a minute at most), its output captured as text."""
    return evalsvc_run(list(args), os.environ if env is None else env)


async def test_a_second_server_on_the_same_grpc_address_exits_and_the_first_keeps_serving(tmp_path: Path) -> None:
    first = await start_server(dbs.db_url(tmp_path, "first.db"), tmp_path / "first.log", forked=True)
    try:
        failed = failed_start(dbs.db_url(tmp_path, "second.db"), "--grpc-addr", first.target)
        assert_failed_cleanly(failed, 1, "gRPC", first.target, "in use")
        async with grpc.aio.insecure_channel(first.target) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert first.terminate() == 0


async def test_an_http_address_in_use_exits_without_losing_the_first_key(tmp_path: Path) -> None:
    # Fresh: no key yet; on SQLite not even a schema (the failed start migrates it), while a PostgreSQL
    # database is migrated by `evalsvc migrate` before any server starts.
    db = dbs.db_url(tmp_path, "fresh.db", migrated=dbs.USE_POSTGRES)
    with occupied_port() as port:
        failed = failed_start(db, "--http-addr", f"127.0.0.1:{port}")
    assert_failed_cleanly(failed, 1, "HTTP", f"127.0.0.1:{port}", "in use")
    # The failed start minted no key, so the next start still mints and prints one.
    server = await start_server(db, tmp_path / "next.log", forked=True)
    try:
        assert server.bootstrap_key()
    finally:
        assert server.terminate() == 0


def test_a_metrics_address_in_use_exits(tmp_path: Path) -> None:
    with occupied_port() as port:
        failed = failed_start(dbs.db_url(tmp_path), "--metrics-addr", f"127.0.0.1:{port}")
    assert_failed_cleanly(failed, 1, "metrics", f"127.0.0.1:{port}", "in use")


def test_an_address_of_another_machine_exits(tmp_path: Path) -> None:
    """It was said to be "Cannot assign requested address; is another evalsvc running?"."""
    failed = failed_start(dbs.db_url(tmp_path), "--grpc-addr", "192.0.2.1:50051")
    line = assert_failed_cleanly(
        failed, 1, "gRPC", "192.0.2.1:50051", "--grpc-addr / EVALSVC_GRPC_ADDR", "192.0.2.1 is not an address of this"
    )
    assert "another evalsvc" not in line


@pytest.mark.parametrize("addr", ["", "[::1:50051", "::1:50051"])
def test_a_grpc_address_that_is_no_host_port_exits_naming_the_flag(tmp_path: Path, addr: str) -> None:
    """An empty --grpc-addr skipped the address check and `[::1:50051` passed it (read as ::1): each
    failed only after the migration, with grpc's own lines and none naming the flag (an operator probe).
    They are refused as the first step of the start, before the database is touched, as other addresses."""
    failed = failed_start(dbs.db_url(tmp_path, migrated=False), "--grpc-addr", addr)
    assert_failed_cleanly(failed, 1, "gRPC", "--grpc-addr / EVALSVC_GRPC_ADDR", "not HOST:PORT")
    assert not (tmp_path / "evalsvc.db").exists()  # not migrated, not even made


def test_a_missing_database_directory_exits(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    failed = failed_start(f"sqlite+aiosqlite:///{missing / 'evalsvc.db'}")
    assert_failed_cleanly(failed, 1, str(missing), "does not exist")


def test_a_read_only_database_directory_exits(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro", "size=1m") as directory:
        failed = failed_start(f"sqlite+aiosqlite:///{directory / 'evalsvc.db'}")
    assert_failed_cleanly(failed, 1, str(directory), "read-only")


def test_a_full_disk_exits(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "full", "size=64k") as directory:
        failed = failed_start(f"sqlite+aiosqlite:///{directory / 'evalsvc.db'}")
    assert_failed_cleanly(failed, 1, str(directory / "evalsvc.db"), "disk is full")


def test_an_unreachable_postgres_exits(tmp_path: Path) -> None:
    with occupied_port() as port:  # listening, and never answering PostgreSQL's protocol...
        pass  # ...then closed: nothing listens there now
    failed = failed_start(f"postgresql+asyncpg://evalsvc:secret@127.0.0.1:{port}/evalsvc")
    line = assert_failed_cleanly(failed, 1, f"127.0.0.1:{port}", "Connect call failed")
    assert "secret" not in line


@pytest.mark.skipif((reason := dbs.postgres_unavailable()) is not None, reason=reason or "PostgreSQL is not reachable")
@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("postgresql+asyncpg://postgres:pw-hidden@127.0.0.1:5432/evalsvc_no_such_db", "does not exist"),
        ("postgresql+asyncpg://evalsvc_no_such_role:pw-hidden@127.0.0.1:5432/test", "refused the login"),
    ],
    ids=["no-such-database", "no-such-role"],
)
@pytest.mark.parametrize("command", ["serve", "migrate", "keys list", "cache prune --all", "secrets list"])
def test_a_postgres_database_or_role_that_does_not_exist_is_one_line(url: str, named: str, command: str) -> None:
    """Each of these was the driver's 180-line traceback (exit 1) for every command that opens the database."""
    if command == "serve":
        line = assert_failed_cleanly(failed_start(url), 1, "127.0.0.1:5432", named)
    else:
        started = time.monotonic()
        done = evalsvc_command(*command.split(), "--db", url)
        assert done.returncode == 1 and time.monotonic() - started < QUICK_S, done.stderr
        assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr  # one line, no traceback
        line = done.stderr
        assert line.startswith(f"evalsvc {command.split()[0]}: cannot use the database ") and named in line, line
    assert "pw-hidden" not in line  # the password is never shown


def _spoiled_sqlite_file(kind: str, path: Path) -> None:
    """A SQLite file evalsvc cannot use, as operators meet them: a text file, a database whose header
    was overwritten, one truncated (a copy cut short), another program's database with a `runs` table."""
    if kind == "text":
        path.write_text("not a database\n" * 100)
        return
    if kind == "other-program":
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE runs (x)")
            conn.commit()
        return
    shutil.copyfile(dbs.db_url(path.parent, "template.db").removeprefix("sqlite+aiosqlite:///"), path)
    with open(path, "r+b") as f:
        if kind == "header":
            f.write(b"\x13" * 16)
        else:
            f.truncate(8192)


@pytest.mark.parametrize(
    ("kind", "code", "named"),
    [
        ("text", 1, "not a SQLite database"),
        ("header", 1, "not a SQLite database"),
        ("truncated", 1, "is corrupt (restore a backup"),
        ("other-program", 2, "is not an evalsvc database"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "migrate", "keys list"])
def test_a_sqlite_file_that_is_no_evalsvc_database_is_one_line(
    tmp_path: Path, kind: str, code: int, named: str, command: str
) -> None:
    """Each was a 130-200 line traceback; another program's database with a `runs` table was taken for
    an evalsvc database from before migrations, stamped and altered (saved only by its ALTERs failing)."""
    path = tmp_path / "spoiled.db"
    _spoiled_sqlite_file(kind, path)
    before = path.read_bytes()
    url = f"sqlite+aiosqlite:///{path}"
    if command == "serve":
        assert_failed_cleanly(failed_start(url), code, str(path), named)
    else:
        done = evalsvc_command(*command.split(), "--db", url)
        assert done.returncode == code, done.stderr
        # One line, no traceback (`migrate` logs alembic's INFO lines before it).
        (line,) = [line for line in done.stderr.splitlines() if " INFO " not in line]
        assert str(path) in line and named in line, done.stderr
    if kind == "other-program":  # its tables untouched (opening it turned on WAL, in its header)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT name, sql FROM sqlite_master").fetchall() == [("runs", "CREATE TABLE runs (x)")]
    else:
        assert path.read_bytes() == before  # left as it was


@pytest.mark.parametrize("http", [["--http-addr", "127.0.0.1:0"], []])
def test_an_unknown_dialect_exits_2_naming_the_flag(tmp_path: Path, http: list[str]) -> None:
    """Without --http-addr too: it was checked only when the gateway was mounted, so a typo waited for
    the day the gateway was turned on."""
    failed = failed_start(dbs.db_url(tmp_path), *http, "--dialects", "omni,nope")
    assert_failed_cleanly(failed, 2, "--dialects", "EVALSVC_DIALECTS", "'nope'", "omni")


@pytest.mark.parametrize("http", [["--http-addr", "127.0.0.1:0"], []])
def test_a_dialect_named_twice_exits_2_naming_the_flag(tmp_path: Path, http: list[str]) -> None:
    """`omni=/x,omni=/y` was taken, and Omni mounted at both prefixes."""
    failed = failed_start(dbs.db_url(tmp_path), *http, "--dialects", "omni=/x,agno,omni")
    assert_failed_cleanly(failed, 2, "--dialects", "EVALSVC_DIALECTS", "omni is named twice", "'omni=/x' and 'omni'")


async def test_a_schema_this_binary_does_not_know_exits(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'newer.db'}"
    db = Database(url)
    try:
        await migrate.upgrade(db)
        async with db.write() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    finally:
        await db.close()
    assert_failed_cleanly(failed_start(url), 2, "f00dfeed")


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        (
            "--price-table",
            "/no/such/prices.json",
            "(EVALSVC_PRICE_TABLE): [Errno 2] No such file or directory: '/no/such/prices.json'",
        ),
        ("--secrets-file", "/no/such/secrets.json", "/no/such/secrets.json"),
    ],
)
def test_a_setting_that_cannot_be_used_exits_2_naming_the_flag(
    tmp_path: Path, flag: str, value: str, named: str
) -> None:
    assert_failed_cleanly(failed_start(f"sqlite+aiosqlite:///{tmp_path / 'evalsvc.db'}", flag, value), 2, flag, named)


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ("[1, 2]", "must hold a JSON object of models, not an array"),
        ('{"gpt": {"input_per_mtok": "a lot"}}', "model 'gpt' input_per_mtok must be a finite number"),
        ('{"gpt": {"output_per_mtok": -0.5}}', "at least 0, not -0.5"),
        ('{"gpt": {"input_per_mtok": NaN}}', "not nan"),
        ('{"gpt": 0.15}', "model 'gpt' must be an object"),
        ('{"gpt": {"input_per_mtoken": 0.15}}', "'input_per_mtoken'"),
    ],
)
def test_a_price_table_of_another_shape_exits_2_naming_the_flag(tmp_path: Path, table: str, named: str) -> None:
    """`[1, 2]` was a traceback (exit 1); a price that is no number, or negative, was taken."""
    prices = tmp_path / "prices.json"
    prices.write_text(table)
    failed = failed_start(dbs.db_url(tmp_path), "--price-table", str(prices))
    assert_failed_cleanly(failed, 2, "--price-table", str(prices), named)


@pytest.mark.parametrize(
    ("extra", "environ", "named"),
    [
        (["--claim-batch", "0"], {}, ["--claim-batch", "EVALSVC_CLAIM_BATCH", "at least 1, not 0"]),
        (["--lease-ttl-s", "-1"], {}, ["--lease-ttl-s", "EVALSVC_LEASE_TTL_S", "more than 0"]),
        ([], {"EVALSVC_POLL_INTERVAL_S": "0"}, ["--poll-interval-s", "EVALSVC_POLL_INTERVAL_S", "at least 0.01"]),
        (["--poll-interval-s", "1e-300"], {}, ["--poll-interval-s", "at least 0.01, not 1e-300"]),  # spun a core
        (["--heartbeat-s", "1e-300"], {}, ["--heartbeat-s", "EVALSVC_HEARTBEAT_S", "at least 0.01"]),
        (  # grpc.max_connection_idle_ms overflowed: a traceback after the database was migrated
            ["--connection-idle-s", "1e308"],
            {},
            ["--connection-idle-s", "EVALSVC_CONNECTION_IDLE_S", "more than 0 and at most 2147483"],
        ),
        (["--max-graders-per-run", "2000"], {}, ["--max-graders-per-run", "from 1 to 1024, not 2000"]),
        (["--workers", "99999999999999999999"], {}, ["--workers", "EVALSVC_WORKERS", "from 0 to 10000"]),
        ([], {"EVALSVC_GRACE_S": "1e308"}, ["--grace-s", "EVALSVC_GRACE_S", "from 0 to 86400"]),
        ([], {"EVALSVC_WORKERS": "many"}, ["EVALSVC_WORKERS", "'many' is not a whole number"]),
        (["--heartbeat-s", "soon"], {}, ["--heartbeat-s", "'soon' is not a number"]),
        (["--sqlite-synchronous", "SOMETIMES"], {}, ["--sqlite-synchronous", "FULL, NORMAL, EXTRA, not 'SOMETIMES'"]),
        ([], {"EVALSVC_LOG_FORMAT": "yaml"}, ["--log-format", "EVALSVC_LOG_FORMAT", "text, json, not 'yaml'"]),
        (["--cache-default", "always"], {}, ["--cache-default", "EVALSVC_CACHE_DEFAULT", "off, read_write"]),
        (  # no connection is made on it: the destination meant stayed refused
            ["--outbound-allow", "127.0.0.1:11434,127.0.0.1:65536"],
            {},
            ["--outbound-allow", "EVALSVC_OUTBOUND_ALLOW", "'127.0.0.1:65536'", "a port is from 1 to 65535"],
        ),
        (
            [],
            {"EVALSVC_OUTBOUND_ALLOW": "::1:11434"},
            ["--outbound-allow", "EVALSVC_OUTBOUND_ALLOW", "in brackets: '[::1]:11434'"],
        ),
        (
            [],
            {"EVALSVC_OUTBOUND_ALLOW": "10.0.0.0/33"},
            ["--outbound-allow", "EVALSVC_OUTBOUND_ALLOW", "'10.0.0.0/33'"],
        ),
        (  # one tenant's REST streams could take every REST connection
            ["--max-http-connections", "20"],
            {"EVALSVC_MAX_HTTP_STREAMS_PER_TENANT": "11"},
            ["--max-http-streams-per-tenant", "EVALSVC_MAX_HTTP_STREAMS_PER_TENANT", "--max-http-connections"],
        ),
    ],
)
def test_a_setting_out_of_its_bounds_or_not_a_number_exits_2_in_one_line(
    tmp_path: Path, extra: list[str], environ: dict[str, str], named: list[str]
) -> None:
    """A claim batch of 0, an expired lease, a poll interval of 0: the server would start and then run
    nothing, or spin. It refuses to start instead, naming the flag and the variable."""
    failed = failed_start(dbs.db_url(tmp_path), *extra, environ=environ)
    assert failed.code == 2 and failed.seconds < QUICK_S, failed.output
    lines = failed.output.strip().splitlines()
    assert len(lines) == 1 and all(part in lines[0] for part in named), failed.output


@pytest.mark.parametrize("command", ["serve", "migrate", "keys list", "gateway --grpc-target 127.0.0.1:1"])
def test_a_setting_out_of_its_bounds_is_refused_before_the_server_or_the_schema_is_imported(command: str) -> None:
    """A typo in a setting is refused at once, by a fresh process (not a fork of one that has imported
    everything): it waited a second or two for alembic, SQLAlchemy and the server to be imported first."""
    script = (
        "import sys\n"
        "from evalsvc.cli import main\n"
        f"code = main({command.split()!r})\n"
        "heavy = {'alembic', 'sqlalchemy', 'evalsvc.server', 'evalsvc.gateway.server', 'grpc'}\n"
        "print(code, sorted(heavy & set(sys.modules)))\n"
    )
    environ = {**os.environ, "EVALSVC_LOG_LEVEL": "LOUD"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False, env=environ
    )
    assert done.stdout == "2 []\n", done.stdout + done.stderr
    assert "EVALSVC_LOG_LEVEL" in done.stderr and "LOUD" in done.stderr, done.stderr


def test_an_evalsvc_variable_that_is_no_setting_is_named_in_one_warning(tmp_path: Path) -> None:
    """`EVALSVC_WOKERS=8` was ignored without a word: the server ran 64 workers. The variables of the
    operator's secrets, the clients and the tests are not settings, and are not warned of."""
    others = {
        "EVALSVC_SECRET_OPENAI": "x",
        "EVALSVC_API_KEY": "evk_x",
        "EVALSVC_RETRY_MAX_ELAPSED_S": "30",
        "EVALSVC_TEST_DB": "sqlite",
    }
    misspelled = {"EVALSVC_WOKERS": "8", "EVALSVC_FROBNICATE": "1", "EVALSVC_API_KEYS": "evk_x"}
    environ = {**os.environ, **misspelled, **others}
    done = evalsvc_command("migrate", "--db", dbs.db_url(tmp_path), env=environ)
    assert done.returncode == 0, done.stderr
    [warning] = [line for line in done.stderr.splitlines() if " WARNING " in line]
    assert "EVALSVC_API_KEYS, EVALSVC_FROBNICATE, EVALSVC_WOKERS (did you mean EVALSVC_WORKERS?)" in warning
    assert not any(re.search(rf"\b{name}\b", warning) for name in others), warning


@pytest.mark.parametrize(
    ("flag", "value", "minimum"),
    [
        ("--max-message-bytes", "99999999999", "262144"),
        ("--max-concurrent-streams", "3000000000", "1"),
        ("--max-connections", "3000000000", "1"),
    ],
)
def test_a_grpc_setting_past_a_c_int_exits_2_before_the_database_is_touched(
    tmp_path: Path, flag: str, value: str, minimum: str
) -> None:
    """They become gRPC channel arguments, C ints: an OverflowError traceback (exit 1), after the
    database had been made and migrated."""
    path = tmp_path / "evalsvc.db"
    failed = failed_start(f"sqlite+aiosqlite:///{path}", flag, value)
    assert_one_line(failed, 2, flag, f"from {minimum} to 2147483647, not {value}")
    assert not path.exists()


@pytest.mark.parametrize("http", [["--http-addr", "127.0.0.1:0"], []])
def test_a_dialect_prefix_that_is_no_path_exits_2_before_the_database_is_touched(
    tmp_path: Path, http: list[str]
) -> None:
    """`omni=x` was an AssertionError traceback from FastAPI once the database had been migrated, and was
    taken without a word without --http-addr."""
    path = tmp_path / "evalsvc.db"
    failed = failed_start(f"sqlite+aiosqlite:///{path}", *http, "--dialects", "omni=x")
    assert_failed_cleanly(failed, 2, "--dialects", "EVALSVC_DIALECTS", "starting with '/'", "not 'x'")
    assert not path.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--grpc-addr", "127.0.0.1:51999", "--http-addr", "127.0.0.1:51999"], ["--grpc-addr", "--http-addr"]),
        (["--http-addr", "127.0.0.1:51998", "--metrics-addr", "127.0.0.1:51998"], ["--http-addr", "--metrics-addr"]),
        (["--grpc-addr", "[::1]:51997", "--metrics-addr", "[::1]:51997"], ["--grpc-addr", "--metrics-addr"]),
        # Other spellings of one address: a wildcard takes the port on every address, localhost is 127.0.0.1.
        (["--grpc-addr", "0.0.0.0:51996", "--http-addr", "127.0.0.1:51996"], ["--grpc-addr", "--http-addr"]),
        (["--grpc-addr", "localhost:51995", "--metrics-addr", "127.0.0.1:51995"], ["--grpc-addr", "--metrics-addr"]),
    ],
)
def test_two_listeners_on_one_address_exit_2_naming_both_before_the_database_is_touched(
    tmp_path: Path, flags: list[str], named: list[str]
) -> None:
    """Found only after the database had been migrated, as "is another evalsvc running?"."""
    path = tmp_path / "evalsvc.db"
    line = assert_one_line(failed_start(f"sqlite+aiosqlite:///{path}", *flags), 2, *named, "take the same port")
    assert "another evalsvc" not in line and not path.exists()


def test_listeners_on_port_0_may_share_a_host(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0", metrics_addr="127.0.0.1:0")
    settings.check_listeners()
    make_settings(tmp_path, grpc_addr="127.0.0.1:51990", http_addr="127.0.0.2:51990").check_listeners()  # two hosts


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite://"])
@pytest.mark.parametrize("command", [["serve", "--grpc-addr", "127.0.0.1:0"], ["keys", "create", "--tenant", "x"]])
def test_an_in_memory_sqlite_database_exits_2_naming_the_flag(url: str, command: list[str]) -> None:
    """A TypeError traceback from the pool arguments (exit 1). Each connection would have had a database
    of its own: the writer's writes unseen by the readers."""
    done = evalsvc_command(*command, "--db", url)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "--db" in lines[0] and "in-memory" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("url", ["mysql://evalsvc@db/evalsvc", "sqlite:///evalsvc.db"])
def test_a_database_url_of_another_engine_or_driver_exits_2_naming_it(url: str) -> None:
    """Another engine, or SQLite without its async driver, failed deep in SQLAlchemy: a traceback, exit 1."""
    line = assert_failed_cleanly(failed_start(url), 2, "--db", "sqlite+aiosqlite:///", "postgresql+asyncpg://")
    assert repr(url.split(":")[0]) in line


def test_a_path_given_as_the_database_says_which_url_to_write() -> None:
    """`--db evalsvc.db` said `--db, --sqlite-synchronous: Could not parse SQLAlchemy URL from given URL
    string`: a second flag that had nothing to do with it, and no hint of the URL it wanted."""
    line = assert_failed_cleanly(failed_start("evalsvc.db"), 2, "--db", "sqlite+aiosqlite:///evalsvc.db")
    assert "synchronous" not in line


@pytest.mark.parametrize("command", [["keys", "list"], ["migrate"], ["secrets", "list"], ["backup", "copy.db"]])
def test_a_path_given_as_the_database_of_a_command_says_which_url_to_write(tmp_path: Path, command: list[str]) -> None:
    """`evalsvc keys list --db /x/evalsvc.db` said only `Could not parse SQLAlchemy URL from given URL string`
    (`backup`: a traceback), where `serve` says which URL to write."""
    path = tmp_path / "evalsvc.db"
    done = evalsvc_command(*command, "--db", str(path))
    assert done.returncode == 2 and done.stdout == "", done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "--db (EVALSVC_DB)" in line and f"write sqlite+aiosqlite:///{path} for a SQLite file" in line, line
    assert not path.exists()


@pytest.mark.parametrize(
    ("flag", "addr", "named"),
    [
        ("--metrics-addr", "127.0.0.1:99999", "port 99999 is not between 0 and 65535"),
        ("--grpc-addr", "nonsense", "not HOST:PORT"),  # was "(invalid literal for int() with base 10: 'nonsense')"
        ("--http-addr", "127.0.0.1", "not HOST:PORT"),
        ("--grpc-addr", "no-such-host.invalid:50051", "'no-such-host.invalid' is not an address or a name"),
    ],
)
def test_an_address_that_is_not_host_and_port_exits(tmp_path: Path, flag: str, addr: str, named: str) -> None:
    line = assert_failed_cleanly(failed_start(dbs.db_url(tmp_path), flag, addr), 1, addr, flag, named)
    assert "int()" not in line and "another evalsvc" not in line


@pytest.mark.parametrize(
    ("addr", "named"),
    [
        ("nonsense", "not HOST:PORT"),
        ("127.0.0.1:99999", "not between 0 and 65535"),
        ("192.0.2.1:8080", "192.0.2.1 is not"),
    ],
)
def test_the_standalone_gateway_checks_its_address_as_serve_does(addr: str, named: str) -> None:
    """`nonsense` was reported as an unknown dialect, a port past 65535 was a traceback."""
    failed = failed_gateway("--grpc-target", "127.0.0.1:1", "--http-addr", addr)
    assert_failed_cleanly(failed, 1, f"cannot listen for HTTP on {addr} (--http-addr / EVALSVC_HTTP_ADDR)", named)


def test_the_standalone_gateway_reads_its_address_from_the_environment() -> None:
    """EVALSVC_HTTP_ADDR was ignored: the gateway listened on 127.0.0.1:8080 whatever it said."""
    done = evalsvc_command(
        "gateway", "--grpc-target", "127.0.0.1:1", env={**os.environ, "EVALSVC_HTTP_ADDR": "127.0.0.1:99999"}
    )
    lines = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "127.0.0.1:99999 (--http-addr / EVALSVC_HTTP_ADDR)" in lines[0], done.stderr


def test_the_standalone_gateway_exits_when_its_address_is_in_use() -> None:
    with occupied_port() as port:
        failed = failed_gateway("--grpc-target", "127.0.0.1:1", "--http-addr", f"127.0.0.1:{port}")
    assert_failed_cleanly(failed, 1, f"127.0.0.1:{port}", "in use")


@pytest.mark.parametrize(
    ("extra", "environ", "named"),
    [
        # Two tracebacks (the app's lifespan, then SystemExit: 3), exit 3.
        (["--grpc-ca", "/nope.pem"], {}, ["--grpc-ca", "/nope.pem", "cannot be read"]),
        # It started, and every call failed.
        (["--grpc-target", "nonsense"], {}, ["--grpc-target", "'nonsense'", "HOST:PORT"]),
        (["--grpc-target", "127.0.0.1:99999"], {}, ["--grpc-target", "HOST:PORT"]),
        # Named `--dialects`.
        ([], {"EVALSVC_WORKERS": "many"}, ["EVALSVC_WORKERS", "'many'", "whole number"]),
        (
            ["--tls-cert", "cert.pem"],
            {},
            ["--tls-cert (EVALSVC_TLS_CERT) was given", "without --tls-key (EVALSVC_TLS_KEY)"],
        ),
        (["--dialects", "nope"], {}, ["--dialects", "'nope'"]),
        # The variable was ignored: the gateway started with every dialect.
        ([], {"EVALSVC_DIALECTS": "nope"}, ["--dialects", "EVALSVC_DIALECTS", "'nope'"]),
        (["--dialects", "omni=x"], {}, ["--dialects", "starting with '/'"]),
        # Mounted Omni at both prefixes.
        (["--dialects", "omni=/x,omni=/y"], {}, ["--dialects", "omni is named twice", "'omni=/x' and 'omni=/y'"]),
    ],
    ids=[
        "missing-ca",
        "target-not-host-port",
        "target-port-out-of-range",
        "bad-env-setting",
        "half-tls",
        "dialect",
        "dialect-env",
        "dialect-prefix",
        "dialect-twice",
    ],
)
def test_a_standalone_gateway_flag_it_cannot_use_exits_2_in_one_line_naming_it(
    extra: list[str], environ: dict[str, str], named: list[str]
) -> None:
    failed = failed_gateway("--grpc-target", "127.0.0.1:1", *extra, environ=environ)
    assert failed.code == 2 and failed.seconds < QUICK_S, failed.output
    lines = failed.output.strip().splitlines()
    assert len(lines) == 1 and all(part in lines[0] for part in named), failed.output
    if "--dialects" not in extra and "EVALSVC_DIALECTS" not in environ:
        assert "--dialects" not in lines[0]


@pytest.mark.parametrize(
    "target", ["127.0.0.1:50051", "[::1]:50051", "evalsvc.internal:443", "dns:///evalsvc:50051", "unix:/run/e.sock"]
)
def test_the_gateway_takes_host_port_and_grpc_target_strings(target: str) -> None:
    check_target(target)  # raises for what it does not take


def test_debug_logging_adds_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    failed = failed_start(f"sqlite+aiosqlite:///{missing / 'evalsvc.db'}", "--log-level", "debug")
    assert failed.code == 1 and "Traceback" in failed.output and str(missing) in failed.output


async def test_a_partial_start_stops_what_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As if the HTTP port were taken between the start's address check and the gateway's bind: the
    # check is skipped, so the gateway's real bind fails after the database was opened and migrated
    # and gRPC started.
    monkeypatch.setattr(server_module, "check_bindable", lambda addr, what, flags: None)
    with occupied_port() as port:
        server = EvalServer(make_settings(tmp_path, http_addr=f"127.0.0.1:{port}"))
        with pytest.raises(StartupError, match=f"127.0.0.1:{port}"):
            await server.start()
    # The gRPC server it had started is gone: its port is free again, and the database is closed
    # (on SQLite, another engine can take the write lock at once).
    assert server.port
    with socket.create_server(("127.0.0.1", server.port)):
        pass
    assert server.bootstrap_key is None
    restarted = EvalServer(make_settings(tmp_path, db=server.settings.db))
    await restarted.start()
    try:
        assert restarted.bootstrap_key
    finally:
        await restarted.stop()


# --- One server per SQLite file: a second `serve` on a file another one serves is refused.

sqlite_only = pytest.mark.skipif(
    dbs.USE_POSTGRES, reason="SQLite only: replicas share a PostgreSQL database (tests/test_replicas.py)"
)


def assert_refused_for(failed: FailedStart, db_url: str, pid: int) -> None:
    """A start refused because server `pid` serves the SQLite file of db_url, in one line, before it
    changed anything."""
    path = db_url.removeprefix("sqlite+aiosqlite:///")
    line = assert_failed_cleanly(failed, 1, f"cannot use the database {path}: ", f"another evalsvc server (pid {pid})")
    assert "one server per file" in line and "PostgreSQL" in line, line
    assert "requeued" not in failed.output and "migrat" not in failed.output, failed.output


async def serving_health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)).status


@sqlite_only
async def test_a_second_server_on_the_same_sqlite_file_exits_and_the_first_keeps_its_jobs(tmp_path: Path) -> None:
    """A second server on the file requeued every job the first had leased (it took itself for the only
    one): each item was sent to the target twice and the first's results were fenced out. Now it is
    refused, and the first finishes its run with every item sent once."""
    db = dbs.db_url(tmp_path, "shared.db")
    items = [item_pb2.Item(id=f"i{i}", input=f"question {i}", expected_output="ok") for i in range(6)]
    target = target_pb2.Target(
        chat=target_pb2.ChatTarget(endpoint=target_pb2.Endpoint(base_url="", timeout_s=30), model="gpt-test")
    )
    # Slow answers: every job stays leased by the first server while the second starts.
    with FakeEndpoint(dataclasses.replace(chat_reply("ok"), delay_s=4.0)) as llm:
        target.chat.endpoint.base_url = llm.url + "/v1"
        first = await start_server(db, tmp_path / "first.log", "--outbound-allow", "127.0.0.1", forked=True)
        try:
            key = first.bootstrap_key()
            assert key
            async with keyed_channel(first.port, key) as channel:
                stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                request = pb.CreateRunRequest(items=items, target=target, graders=[exact()])
                run_id = (await stub.CreateRun(request)).run.id
                assert await asyncio.to_thread(llm.wait_seen, len(items), 30), "the jobs were not all in flight"
                failed = await asyncio.to_thread(failed_start, db, timeout=QUICK_S)
                await watch_all(stub, run_id)
                run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id))).run
            assert await serving_health(first.target) == health_pb2.HealthCheckResponse.SERVING
        finally:
            assert first.terminate() == 0
        sent = collections.Counter(seen.body["messages"][-1]["content"] for seen in llm.seen)
    assert_refused_for(failed, db, first.proc.pid)
    assert run.status == run_pb2.RUN_STATUS_SUCCEEDED
    assert run.counts.completed_evaluations == run.counts.passed == len(items)
    assert sent == {item.input: 1 for item in items}  # each item sent to the target once
    log = first.log_path.read_text()
    assert "requeued" not in log and "fenced" not in log, log


@sqlite_only
async def test_the_sqlite_file_is_free_again_after_a_stop_or_a_kill_9(tmp_path: Path) -> None:
    """The lock lives as long as the server's process: a server that stopped, or was killed with
    SIGKILL, leaves the file to the next one (which then holds it in turn). Operator commands such as
    `evalsvc keys list` go on working beside a running server."""
    db = dbs.db_url(tmp_path, "shared.db")
    first = await start_server(db, tmp_path / "first.log", forked=True)
    try:
        key = first.bootstrap_key()
        assert key
        assert_refused_for(await asyncio.to_thread(failed_start, db, timeout=QUICK_S), db, first.proc.pid)
        listed = evalsvc_command("keys", "list", "--db", db)
        assert listed.returncode == 0 and "default" in listed.stdout, listed.stderr
    finally:
        first.kill()  # kill -9: the kernel releases the lock with the process
    second = await start_server(db, tmp_path / "second.log", forked=True)
    try:
        assert await serving_health(second.target) == health_pb2.HealthCheckResponse.SERVING
        assert_refused_for(await asyncio.to_thread(failed_start, db, timeout=QUICK_S), db, second.proc.pid)
    finally:
        assert second.terminate() == 0
    third = await start_server(db, tmp_path / "third.log", forked=True)
    try:
        async with keyed_channel(third.port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            ended = (await watch_all(stub, (await stub.CreateRun(create_request(3))).run.id))[-1]
        assert ended.run.status == run_pb2.RUN_STATUS_SUCCEEDED
    finally:
        assert third.terminate() == 0


@sqlite_only
@sqlite_only
async def test_a_database_file_with_another_hard_link_is_refused(tmp_path: Path) -> None:
    """The one-server-per-file lock is taken by path: a second server started through a hard link to a
    served file took `<link>.serve.lock` and served the same file beside the first (a probe). A file
    with more than one link is refused in one line, with nothing migrated; without the link it serves."""
    settings = make_settings(tmp_path)
    path = Path(settings.db.removeprefix("sqlite+aiosqlite:///"))
    first = EvalServer(settings)
    await first.start()
    await first.stop(grace=0.5)
    link = tmp_path / "elsewhere" / "linked.db"
    link.parent.mkdir()
    os.link(path, link)
    before = path.read_bytes()
    for db in (settings.db, f"sqlite+aiosqlite:///{link}"):
        server = EvalServer(make_settings(tmp_path, db=db))
        try:
            with pytest.raises(StartupError) as refused:
                await server.start()
        finally:
            await server.stop(grace=0)
        assert "has 2 hard links" in str(refused.value) and "\n" not in str(refused.value), refused.value
    assert path.read_bytes() == before
    link.unlink()
    again = EvalServer(settings)
    await again.start()
    await again.stop(grace=0.5)


async def test_in_process_servers_take_the_same_lock(tmp_path: Path) -> None:
    """EvalServer (and so evalsvc.testing) holds the lock too: a second one on the file, in this very
    process, does not start; once the first stops, another does."""
    settings = make_settings(tmp_path)
    first = EvalServer(settings)
    await first.start()
    try:
        second = EvalServer(settings)
        try:
            with pytest.raises(StartupError) as refused:
                await second.start()
        finally:
            await second.stop(grace=0)  # nothing, unless it started after all
        assert f"another evalsvc server (pid {os.getpid()}) serves it" in str(refused.value)
        assert str(settings.db.removeprefix("sqlite+aiosqlite:///")) in str(refused.value)
        assert await serving_health(f"127.0.0.1:{first.port}") == health_pb2.HealthCheckResponse.SERVING
    finally:
        await first.stop(grace=0.5)
    again = EvalServer(settings)
    await again.start()
    await again.stop(grace=0.5)
