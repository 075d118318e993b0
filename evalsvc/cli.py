"""The `evalsvc` command: `evalsvc serve` runs the service; `evalsvc migrate` upgrades a database's
schema; `evalsvc keys ...` manages API keys; `evalsvc secrets ...` tenants' own secrets.

Exit codes: 0 success; 1 `serve` could not start because an address, the database or its disk is
unusable (one line says which; the other commands say the same of a database they cannot use), or a
key to revoke or a secret to delete does not exist; 2 bad
configuration (a setting, TLS, secrets, the secrets key) or a database whose schema this version
cannot use (run `evalsvc migrate`). docs/operations.md lists the causes.

`evalsvc backup --db URL FILE` copies a SQLite database, also while a server runs on it (SQLite's online
backup API: a copy of the file alone misses what is still in its -wal); docs/operations.md, "Backups".

`evalsvc cache prune` trims the response cache (docs/targets.md): every tenant to --max-entries
(least recently used first), entries unused for --unused-for, or all of a tenant's with --all."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, NoReturn

from evalsvc import config, logs, package_version

if TYPE_CHECKING:
    from evalsvc.store.db import Database


class _Parser(argparse.ArgumentParser):
    """argparse, with a command line it cannot use reported in one line (not after the whole usage,
    ~60 lines for `serve`), as every other start-up failure is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


# Where `evalsvc gateway` listens when --http-addr (EVALSVC_HTTP_ADDR) is not set.
GATEWAY_HTTP_ADDR = "127.0.0.1:8080"


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per operation."""
    parser = _Parser(prog="evalsvc", description="Run LLM evaluations as a gRPC service.")
    parser.add_argument("--version", action="version", version=f"evalsvc {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC service until SIGTERM/SIGINT")
    config.add_flags(serve)
    migrate = commands.add_parser(
        "migrate", help="upgrade the database schema to this version's; run it once before starting new replicas"
    )
    gateway = commands.add_parser("gateway", help="run the REST gateway alone, in front of a remote gRPC server")
    gateway.add_argument("--grpc-target", required=True, help="host:port of the evalsvc gRPC server")
    gateway.add_argument(
        "--grpc-ca",
        default="",
        help="PEM CA file to verify the gRPC server's TLS certificate; empty: plaintext to the server "
        "(--tls-cert/--tls-key are the gateway's own HTTPS)",
    )
    # Through the settings, as `serve` reads them: EVALSVC_HTTP_ADDR and EVALSVC_DIALECTS were ignored.
    config.add_flags(
        gateway,
        ("http_addr", "dialects", *config.GATEWAY_SETTINGS),
        helps={"http_addr": f"host:port to serve HTTP on (empty: {GATEWAY_HTTP_ADDR})"},
    )
    keys = commands.add_parser("keys", help="create, list and revoke API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="mint a key; prints it once, alone on stdout")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument("--name", default="", help="a label for people")
    create.add_argument(
        "--expires-in", default=None, help="lifetime such as 90s, 15m, 12h or 30d, at most 36500d; default never"
    )
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant", default=None, help="only this tenant's keys")
    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", help="the id shown by `keys list` (the part after evk_)")
    cache = commands.add_parser("cache", help="maintain the response cache").add_subparsers(
        dest="cache_command", required=True
    )
    prune = cache.add_parser(
        "prune", help="remove cache entries: beyond --max-entries per tenant, unused for --unused-for, or --all"
    )
    prune.add_argument("--tenant", default=None, help="only this tenant's entries")
    prune.add_argument("--all", action="store_true", help="remove every entry (of --tenant, e.g. a removed tenant)")
    prune.add_argument("--unused-for", default=None, help="remove entries not used for this long: 90s, 15m, 12h, 30d")
    prune.add_argument(
        "--max-entries",
        type=int,
        default=None,
        help=f"keep at most this many per tenant, least recently used go first "
        f"(default {config.env_name('cache_max_entries')} or {config.Settings.cache_max_entries})",
    )
    secrets = commands.add_parser(
        "secrets", help=f"set, list and delete tenants' own secrets (sealed with {config.env_name('secrets_key')})"
    ).add_subparsers(dest="secrets_command", required=True)
    put = secrets.add_parser(
        "set", help="set a tenant's secret to the value read from stdin (one trailing newline dropped)"
    )
    put.add_argument("--tenant", required=True, help="the tenant that owns the secret")
    put.add_argument("name", help="the name its targets and judges use (api_key_secret, secret:NAME)")
    shown = secrets.add_parser("list", help="list secrets: tenant, name, when set (never values)")
    shown.add_argument("--tenant", default=None, help="only this tenant's secrets")
    drop = secrets.add_parser("delete", help="delete a tenant's secret")
    drop.add_argument("--tenant", required=True, help="the tenant that owns the secret")
    drop.add_argument("name", help="the secret's name")
    secrets.add_parser("generate-key", help=f"print a new random key for {config.env_name('secrets_key')}")
    backup = commands.add_parser(
        "backup",
        help="copy a SQLite database to a new file, also while a server runs on it (PostgreSQL: use pg_dump)",
    )
    backup.add_argument("file", help="the copy to make; it must not exist yet")
    for sub in (migrate, create, listing, revoke, prune, put, shown, drop, backup):
        sub.add_argument("--db", default=None, help=f"SQLAlchemy URL (env {config.env_name('db')})")
    return parser


def _open_database(settings: config.Settings) -> Database:
    """The `--db` of a command that is not `serve` (which names its own failures), or SettingsError in
    one line: a URL that is none, of another engine, or a SQLite file whose directory is missing or
    read-only (each was a traceback)."""
    from sqlalchemy.exc import ArgumentError

    from evalsvc.server import StartupError, check_database_directory
    from evalsvc.store.db import Database

    try:
        check_database_directory(settings.db)
        return Database(
            settings.db,
            sqlite_synchronous=settings.sqlite_synchronous,
            idle_in_transaction_s=settings.idle_in_transaction_s,
        )
    except (StartupError, ValueError, ArgumentError) as exc:
        raise config.SettingsError(f"{config.named('db')}: {exc}") from None


@contextlib.asynccontextmanager
async def _operator_database(command: str, settings: config.Settings) -> AsyncIterator[Database]:
    """The database the operator commands (`keys`, `cache`, `secrets`) work on, at this version's
    schema. A SQLite file whose directory is missing or read-only is refused in one line (it was a
    traceback), and a new file is said to be new: a key minted at a mistyped path goes into a new,
    empty database that no server reads."""
    from evalsvc.store import migrate
    from evalsvc.store.db import sqlite_path

    db = _open_database(settings)
    path = sqlite_path(settings.db)
    new = path is not None and not path.exists()
    try:
        await migrate.prepare(db, unless_served=True)
        if new:
            print(f"evalsvc {command}: there was no database at {path}; made a new, empty one", file=sys.stderr)
        yield db
    finally:
        await db.close()


async def _keys_command(args: argparse.Namespace, settings: config.Settings) -> int:
    from evalsvc.auth.service import KeyService, parse_duration

    # Checked before the database is opened (or made): a wrong lifetime changes nothing.
    expires = parse_duration(args.expires_in) if args.keys_command == "create" and args.expires_in else None
    async with _operator_database("keys", settings) as db:
        keys = KeyService(db)
        if args.keys_command == "create":
            key, info = await keys.create(args.tenant, args.name, expires)
            print(key)
            print(f"created key {info.key_id} for tenant {info.tenant!r}; it is shown only this once", file=sys.stderr)
        elif args.keys_command == "list":
            print(f"{'KEY ID':<14}{'TENANT':<18}{'NAME':<18}{'CREATED':<22}{'EXPIRES':<22}{'REVOKED':<22}LAST USED")
            for info in await keys.list(args.tenant):
                print(
                    f"{info.key_id:<14}{info.tenant:<18}{info.name[:17]:<18}{_when(info.create_time):<22}"
                    f"{_when(info.expire_time):<22}{_when(info.revoke_time):<22}{_when(info.last_used_time)}"
                )
        elif not await keys.revoke(args.key_id):
            print(f"no key with id {args.key_id!r}", file=sys.stderr)
            return 1
        else:
            print(f"revoked key {args.key_id}", file=sys.stderr)
        return 0


async def _cache_command(args: argparse.Namespace, settings: config.Settings) -> int:
    import time

    from evalsvc.auth.service import parse_duration
    from evalsvc.ids import is_tenant_name
    from evalsvc.store import cache as cache_store
    from evalsvc.store import usage

    max_entries = settings.cache_max_entries if args.max_entries is None else args.max_entries
    if max_entries < 0:
        raise ValueError("--max-entries must not be negative")
    if args.tenant is not None and not is_tenant_name(args.tenant):
        print(f"evalsvc cache prune: no tenant can be named {args.tenant!r} ([a-z0-9][a-z0-9_-]*)", file=sys.stderr)
        return 2
    unused_before = time.time() - parse_duration(args.unused_for) if args.unused_for else None
    removed: list[cache_store.Removed] = []
    async with _operator_database("cache", settings) as db, db.write() as conn:
        if args.tenant is not None and not await cache_store.has_entries(conn, args.tenant):
            # A mistyped tenant read "removed 0 cache entries", as a tenant within its bounds does.
            print(f"tenant {args.tenant!r} has no cache entries: nothing to remove", file=sys.stderr)
            return 0
        if args.all:
            if args.tenant is None:
                for tenant in await cache_store.counts(conn):
                    removed.append(await cache_store.delete_tenant(conn, tenant))
            else:
                removed.append(await cache_store.delete_tenant(conn, args.tenant))
        else:
            if unused_before is not None:
                removed.append(await cache_store.delete_unused_since(conn, unused_before, args.tenant))
            tenants = [args.tenant] if args.tenant is not None else list(await cache_store.counts(conn))
            held = await usage.cache_bytes(conn, tenants) if tenants else {}
            for tenant in tenants:
                unused = sum(r.freed[tenant] for r in removed)  # taken by --unused-for above
                evicted = await cache_store.evict(
                    conn, tenant, max_entries, settings.cache_max_bytes, held[tenant] - unused
                )
                removed.append(evicted)
        freed: Counter[str] = sum((r.freed for r in removed), Counter())
        await usage.add_to_totals(conn, cache_bytes={tenant: -size for tenant, size in freed.items()})
    print(f"removed {sum(r.rows for r in removed)} cache entries", file=sys.stderr)
    return 0


async def _secrets_command(args: argparse.Namespace, settings: config.Settings) -> int:
    from evalsvc.ids import is_tenant_name

    if args.secrets_command != "list" and not is_tenant_name(args.tenant):
        print(f"evalsvc secrets: no tenant can be named {args.tenant!r} ([a-z0-9][a-z0-9_-]*)", file=sys.stderr)
        return 2
    async with _operator_database("secrets", settings) as db:
        return await _secrets_in(args, settings, db)


async def _secrets_in(args: argparse.Namespace, settings: config.Settings, db: Database) -> int:
    """`_secrets_command` on its open database."""
    from evalsvc.errors import Reason, ServiceError
    from evalsvc.ids import PageTokens
    from evalsvc.limits import StoredCaps
    from evalsvc.secrets.operator import OperatorSecrets
    from evalsvc.secrets.service import SecretService
    from evalsvc.store import secrets as secret_store

    try:
        # No listing pages here, so no page-token key.
        secrets = SecretService(
            db, OperatorSecrets({}), PageTokens(), StoredCaps.of(settings).secrets, settings.secrets_key
        )
        if args.secrets_command == "set":
            await secrets.check_key()
            value = sys.stdin.read().removesuffix("\n").removesuffix("\r")
            name, _ = await secrets.create(args.tenant, args.name, value)
            print(f"set secret {name} of tenant {args.tenant!r}", file=sys.stderr)
        elif args.secrets_command == "list":
            async with db.read() as conn:
                listed = await secret_store.listing(conn, args.tenant)
            print(f"{'TENANT':<18}{'NAME':<66}SET")
            for secret in listed:
                print(f"{secret.tenant:<18}{secret.name:<66}{_when(secret.create_time)}")
        else:
            await secrets.delete(args.tenant, args.name)
            print(f"deleted secret {args.name.upper()} of tenant {args.tenant!r}", file=sys.stderr)
        return 0
    except ServiceError as exc:
        print(
            f"evalsvc secrets: {exc}{''.join(f'; {v.field} {v.description}' for v in exc.violations)}", file=sys.stderr
        )
        return 1 if exc.reason == Reason.SECRET_NOT_FOUND else 2


async def _migrate_command(settings: config.Settings) -> int:
    from evalsvc.store import migrate
    from evalsvc.store.db import sqlite_path

    db = _open_database(settings)
    path = sqlite_path(settings.db)
    new = path is not None and not path.exists()
    try:
        before, head = await migrate.upgrade(db, unless_served=True)
    finally:
        await db.close()
    if new:  # a mistyped path, as the other operator commands say (`_operator_database`)
        print(f"evalsvc migrate: there was no database at {path}; made a new, empty one", file=sys.stderr)
    if before == {head}:
        print(f"the database schema is already at {head}", file=sys.stderr)
    else:
        print(f"migrated the database schema from {', '.join(sorted(before)) or 'nothing'} to {head}", file=sys.stderr)
    return 0


def _backup_command(args: argparse.Namespace, settings: config.Settings) -> int:
    """Copy the SQLite database to a new file with SQLite's online backup API: one consistent snapshot,
    the WAL's commits included, taken beside a running server (readers do not block its writes)."""
    import sqlite3
    from pathlib import Path

    from evalsvc.store.db import sqlite_path

    try:
        path = sqlite_path(settings.db)
    except ValueError:
        path = None  # a bare path: _open_database names it, as for the other commands
    if path is None:
        _open_database(settings)  # names a URL it cannot use (in-memory SQLite, another engine), as the others do
        print(
            "evalsvc backup: copies a SQLite file; back a PostgreSQL database up with pg_dump "
            "(docs/operations.md, Backups)",
            file=sys.stderr,
        )
        return 2
    target = Path(args.file)
    if not path.is_file():
        print(f"evalsvc backup: there is no database at {path}", file=sys.stderr)
        return 1
    if target.exists() or target.is_symlink():
        print(f"evalsvc backup: {target} exists; name a new file", file=sys.stderr)
        return 2
    partial = target.with_name(f".{target.name}.partial")
    try:
        # Readable by this user only (it holds key hashes and the secrets' ciphertext), and a new file:
        # O_EXCL refuses one left over or planted there (a symlink too).
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        print(f"evalsvc backup: cannot create {partial}: {exc}", file=sys.stderr)
        return 1
    try:
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            copy = sqlite3.connect(partial)
            try:
                source.backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            finally:
                copy.close()
        finally:
            source.close()
        partial.rename(target)
    except (sqlite3.Error, OSError) as exc:
        partial.unlink(missing_ok=True)
        print(f"evalsvc backup: cannot back {path} up to {target}: {exc}", file=sys.stderr)
        return 1
    print(
        f"backed {path} up to {target} ({target.stat().st_size} bytes); keep {config.env_name('secrets_key')} "
        "with it: without it the tenants' secrets in it cannot be opened",
        file=sys.stderr,
    )
    return 0


async def _gateway_command(args: argparse.Namespace, settings: config.Settings) -> int:
    from evalsvc.gateway.dialects import mounts
    from evalsvc.gateway.server import Gateway, GatewayConfigError, remote_channels
    from evalsvc.limits import raise_open_file_limit
    from evalsvc.server import StartupError, check_bindable, listen
    from evalsvc.tls import TlsConfigError, http_ssl_context

    raise_open_file_limit()
    # Every flag is checked before the gateway starts, each failure in one line naming its flag.
    http_addr = settings.http_addr or GATEWAY_HTTP_ADDR
    try:
        mounts(settings.dialects)
    except ValueError as exc:  # an unknown dialect's name, a prefix that is no path
        logging.getLogger("evalsvc").error("evalsvc gateway: %s: %s", config.named("dialects"), exc)
        return 2
    try:
        channels = remote_channels(args.grpc_target, root_certificates=args.grpc_ca)
        tls = http_ssl_context(settings)
    except (GatewayConfigError, TlsConfigError) as exc:
        logging.getLogger("evalsvc").error("evalsvc gateway: %s", exc)
        return 2
    try:
        # As `serve` checks its addresses: `nonsense` was taken for an unknown dialect, a port past
        # 65535 was a traceback.
        check_bindable(http_addr, "HTTP", f"{config.flag_name('http_addr')} / {config.env_name('http_addr')}")
        gateway = Gateway(channels, http_addr, dialects=settings.dialects, settings=settings, tls=tls)
        await listen("HTTP", http_addr, gateway.start())
    except StartupError as exc:
        logging.getLogger("evalsvc").error("evalsvc gateway could not start: %s", exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop()
    return 0


def _ignore_signals_once_stopped() -> None:
    """Once `serve` or `gateway` has stopped gracefully, SIGTERM and SIGINT are ignored for the little
    that is left of the process (the interpreter's teardown, some 50 ms). Closing the event loop gave
    both their default action back, so a second signal then (`timeout` signals the child and its process
    group) killed a process whose shutdown was complete: exit 143 or 130, and no line saying why. Ignored,
    not handled: the interpreter's finalization resets Python handlers to the default action, not SIG_IGN.
    A teardown that hung would then need SIGKILL, which is what an orchestrator sends after its grace."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _when(seconds: float | None) -> str:
    """A stored time as a listing shows it. One past what a date can hold (a key's expiry in the year
    273792727, stored before lifetimes were bounded) is shown as such, not a failure of the listing."""
    import datetime

    if seconds is None:
        return "-"
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return "after 9999-12-31" if seconds > 0 else "before 0001-01-01"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "gateway"):
        for sig in (signal.SIGTERM, signal.SIGINT):  # until the server's own (evalsvc.server.serve)
            signal.signal(sig, _signal_while_starting)
    try:
        return _run(args)
    except config.SettingsError as exc:  # a setting from the environment, or one out of its bounds
        print(f"evalsvc {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # A database that cannot be used (`serve` names its own): one line, as `serve` says it, not a
        # traceback of the driver's (a database or role that does not exist was 180 lines of it).
        from evalsvc.server import database_where
        from evalsvc.store.db import unavailable_cause

        if (cause := unavailable_cause(exc)) is None:
            raise
        db = getattr(args, "db", None) or config.from_args(args).db
        print(f"evalsvc {args.command}: cannot use the database {database_where(db)}: {cause}", file=sys.stderr)
        return 1


def _signal_while_starting(signum: int, frame: object) -> None:
    """A SIGTERM or SIGINT before the server's handlers (its imports take a second): as one during the
    start, end at once in one line, exit 1. It was a bare kill (exit 143, nothing said) or Ctrl-C's
    KeyboardInterrupt traceback."""
    print(f"evalsvc: {signal.Signals(signum).name} arrived during the start: exiting now", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


def _warn_of_unknown_variables() -> None:
    """One WARNING naming the EVALSVC_ variables that are no setting (`config.unknown_variables`)."""
    if unknown := config.unknown_variables(os.environ):
        logging.getLogger("evalsvc").warning(
            "ignoring %s: no setting has that name (the README's configuration table lists them)", ", ".join(unknown)
        )


def _run(args: argparse.Namespace) -> int:
    """The command `args` name; its exit code."""
    if args.command == "secrets" and args.secrets_command == "generate-key":  # needs no setting
        from evalsvc.secrets.sealing import generate_key

        print(generate_key())
        return 0
    # The settings first: one out of its bounds is refused in a fraction of a second, not after the
    # second it takes to import the schema's machinery (alembic, SQLAlchemy) and the server.
    settings = config.from_args(args)
    from evalsvc.store.migrate import SchemaError

    if args.command == "gateway":
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        _warn_of_unknown_variables()
        code = asyncio.run(_gateway_command(args, settings))
        _ignore_signals_once_stopped()
        return code
    if args.command == "backup":
        return _backup_command(args, settings)
    if args.command == "keys":
        try:
            return asyncio.run(_keys_command(args, settings))
        except (ValueError, SchemaError) as exc:
            print(f"evalsvc keys: {exc}", file=sys.stderr)
            return 2
    if args.command == "cache":
        try:
            return asyncio.run(_cache_command(args, settings))
        except (ValueError, SchemaError) as exc:
            print(f"evalsvc cache: {exc}", file=sys.stderr)
            return 2
    if args.command == "secrets":
        from evalsvc.secrets.sealing import SecretsKeyError

        try:
            return asyncio.run(_secrets_command(args, settings))
        except (SecretsKeyError, SchemaError) as exc:
            print(f"evalsvc secrets: {exc}", file=sys.stderr)
            return 2
    logs.configure(settings.log_level, settings.log_format)
    _warn_of_unknown_variables()
    if args.command == "migrate":
        try:
            return asyncio.run(_migrate_command(settings))
        except SchemaError as exc:
            logging.getLogger("evalsvc").error("%s", exc)
            return 2
    if args.command == "serve":
        from evalsvc.limits import raise_open_file_limit
        from evalsvc.secrets.operator import SecretsConfigError
        from evalsvc.secrets.sealing import SecretsKeyError
        from evalsvc.server import ConfigError, StartupError, serve
        from evalsvc.tls import TlsConfigError

        raise_open_file_limit()
        # One line naming the cause; the traceback only for those who asked for debug output.
        show_traceback = logging.getLogger("evalsvc").isEnabledFor(logging.DEBUG)
        try:
            asyncio.run(serve(settings))
            _ignore_signals_once_stopped()
        except (
            ConfigError,
            TlsConfigError,
            SchemaError,
            SecretsConfigError,
            SecretsKeyError,
        ) as exc:
            logging.getLogger("evalsvc").error("%s", exc, exc_info=show_traceback)
            return 2
        except StartupError as exc:
            logging.getLogger("evalsvc").error("evalsvc could not start: %s", exc, exc_info=show_traceback)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
