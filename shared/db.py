"""PostgreSQL for services: a pool, ordered migrations, an embedded server.

A service's `__main__` wires it like this::

    dsn = await stack.enter_async_context(
        database_dsn(cfg.mesh.data_dir, cfg.db.url, database="auth"))
    pool = await create_pool(dsn)
    stack.push_async_callback(close_pool, pool)
    await apply_migrations(pool, Path(__file__).parent / "migrations")

With `DATABASE_URL` set that server is used as it is; without it, a real
PostgreSQL shipped in the `pgserver` wheel runs from `<data_dir>/postgres`.
Several processes may share that embedded server: pgserver counts the
processes using a data directory, and the last one to leave stops it.
Store modules wrap their queries in `translate_errors()` so that a unique
violation reaches the caller as `Conflict`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import re
import stat
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit

import asyncpg

from shared.config import Secret, env
from shared.errors import Conflict, Unavailable
from shared.logging import get_logger

__all__ = [
    "CONNECTION_ERRORS",
    "unavailable_when_down",
    "DatabaseConfig",
    "MigrationError",
    "create_pool",
    "close_pool",
    "apply_migrations",
    "translate_errors",
    "EmbeddedPostgres",
    "database_dsn",
    "ensure_database",
    "with_database",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class DatabaseConfig:
    """Which PostgreSQL to use; nest it in a service's config."""

    #: None: run the embedded server under the data directory.
    url: Secret | None = env("DATABASE_URL", default=None)


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, **kwargs: Any
) -> asyncpg.Pool:
    """An asyncpg pool on `dsn`; extra keyword arguments go to `asyncpg.create_pool`.

    A connection goes back to the pool with an open transaction rolled back
    (asyncpg always does that) but without asyncpg's reset statement
    (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`): that
    statement is a transaction of its own on every release -- as many as the
    work itself (bench/quota_scale.py) -- and nothing of ours leaves session
    state on a pooled connection (the migrations release their advisory lock
    themselves; LISTEN has a connection of its own). Pass `reset=` to change that.
    """
    kwargs.setdefault("reset", _keep_session)
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, **kwargs)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset: nothing to undo beyond the rollback asyncpg has done (see `create_pool`)."""


async def close_pool(pool: asyncpg.Pool, timeout: float = 5.0) -> None:
    """Close `pool`, waiting at most `timeout` seconds for the connections in use to come
    back; then terminate them, and say so. A stop must end: a query stuck on the server (or a
    connection never given back) would otherwise keep the process from exiting."""
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except TimeoutError:
        log.warning("database connections still in use at shutdown: terminated", timeout=timeout)
        pool.terminate()


#: Errors that say "the database cannot be reached now", not "this query is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
)

_C = TypeVar("_C", bound=type)


def unavailable_when_down(
    message: str = "the database is unreachable", *, retry_safe: bool = False
) -> Callable[[_C], _C]:
    """Class decorator for store modules: every public coroutine method turns a
    lost database into `UNAVAILABLE` (expected, retryable) instead of an
    `INTERNAL` with a traceback. `retry_safe` says whether the caller may retry
    elsewhere (true only when a failed call cannot have written anything)."""

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return await func(*args, **kwargs)
            except CONNECTION_ERRORS as exc:
                raise Unavailable(message, {"retry_safe": retry_safe}) from exc

        return guarded

    def decorate(cls: _C) -> _C:
        for name, member in list(vars(cls).items()):
            if not name.startswith("_") and inspect.iscoroutinefunction(member):
                setattr(cls, name, wrap(member))
        return cls

    return decorate


@contextmanager
def translate_errors(conflict: str = "already exists") -> Iterator[None]:
    """Turn database errors a caller can cause into domain errors.

    A unique violation becomes `Conflict(conflict)`; `data["constraint"]` names
    the constraint so the caller can tell which value was taken.
    """
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(conflict, {"constraint": exc.constraint_name}) from exc


# --- migrations ------------------------------------------------------------------

_MIGRATION_FILE = re.compile(r"^(\d+)_([A-Za-z0-9_\-]+)\.sql$")
# One fixed key ("inferswm" in ASCII): every process migrating this database
# queues on the same session-level advisory lock.
_MIGRATION_LOCK = 0x696E6665_7273776D

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class MigrationError(RuntimeError):
    """A migration failed, or the files disagree with what was applied."""


@dataclass(frozen=True, slots=True)
class _Migration:
    version: str
    name: str  #: the file name, e.g. "0001_users.sql"
    sql: str
    checksum: str


def _read_migrations(directory: Path) -> list[_Migration]:
    """Every `NNNN_name.sql` in `directory`, in numeric order."""
    if not directory.is_dir():  # e.g. the .sql files were left out of a package
        raise MigrationError(f"{directory}: no such migrations directory")
    found: dict[int, _Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named like 0001_create_users.sql")
        number = int(match[1])
        if number in found:
            raise MigrationError(f"{path.name} and {found[number].name} have the same version")
        data = path.read_bytes()
        found[number] = _Migration(
            match[1], path.name, data.decode(), hashlib.sha256(data).hexdigest()
        )
    return [found[number] for number in sorted(found)]


async def apply_migrations(
    pool_or_conn: asyncpg.Pool | asyncpg.Connection, directory: Path
) -> list[str]:
    """Apply the migrations in `directory` not applied yet; return their file names.

    Each file runs in its own transaction (so it must not use statements that
    refuse one, like CREATE INDEX CONCURRENTLY) and is recorded in
    `schema_migrations`. Processes starting together take turns on an advisory
    lock. A file edited after it was applied is refused: add a new one instead.
    """
    migrations = _read_migrations(directory)
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with pool_or_conn.acquire() as conn:
            return await _apply_locked(conn, migrations)
    return await _apply_locked(pool_or_conn, migrations)


async def _apply_locked(conn: asyncpg.Connection, migrations: list[_Migration]) -> list[str]:
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        # Created under the lock: two concurrent CREATE TABLE IF NOT EXISTS can
        # still collide on the catalog's unique index.
        await conn.execute(_CREATE_TABLE)
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        applied = {row["version"]: row for row in rows}
        _check_history(migrations, applied)
        pending = [m for m in migrations if m.version not in applied]
        for migration in pending:
            await _apply_one(conn, migration)
        return [m.name for m in pending]
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


def _check_history(migrations: list[_Migration], applied: dict[str, Any]) -> None:
    """Refuse to go on when an applied migration's file is not what ran."""
    for migration in migrations:
        row = applied.get(migration.version)
        if row is None:
            continue
        if row["name"] != migration.name:
            raise MigrationError(
                f"version {migration.version} was applied as {row['name']}, but the file is "
                f"{migration.name}; do two services with different migrations share this database?"
            )
        if row["checksum"] != migration.checksum:
            raise MigrationError(
                f"{migration.name} was changed after it was applied (checksum "
                f"{row['checksum'][:12]}… recorded, {migration.checksum[:12]}… now); "
                "add a new migration instead of editing an applied one"
            )


async def _apply_one(conn: asyncpg.Connection, migration: _Migration) -> None:
    try:
        async with conn.transaction():
            await conn.execute(migration.sql)  # no arguments: several statements allowed
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"{migration.name} failed and was rolled back: {exc}") from exc
    log.info("migration applied", migration=migration.name)


# --- DSNs and databases -------------------------------------------------------------


def with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at another database on the same server."""
    return urlsplit(dsn)._replace(path="/" + quote(database)).geturl()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def ensure_database(dsn: str, database: str) -> str:
    """Create `database` on `dsn`'s server unless it exists; return its DSN."""
    conn = await asyncpg.connect(dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            try:
                await conn.execute(f"CREATE DATABASE {_quote_ident(database)}")
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                pass  # another process created it between our check and our CREATE
    finally:
        await conn.close()
    return with_database(dsn, database)


# --- the embedded server ------------------------------------------------------------

# pgserver guards a data directory with a file lock that is per process, not per
# thread, and keeps a plain dict of servers: one thread in it at a time.
_PGSERVER_LOCK = threading.Lock()


def _import_pgserver() -> Any:
    # Importing pgserver asks platformdirs for a runtime directory, which warns
    # when XDG_RUNTIME_DIR is unset (any container, any service manager
    # without a login session). It then uses /tmp/runtime-<uid>, which is fine.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR", category=UserWarning)
        import pgserver
    return pgserver


#: Appended to the cluster's postgresql.conf before each start (the last setting
#: wins): PostgreSQL chmods its unix socket to this before listen(), so no other
#: user can ever connect to it, wherever pgserver puts it.
_PRIVATE_SOCKET = "unix_socket_permissions = 0700  # inferswarm: trust authentication, owner only\n"


def _restrict_socket(pgdata: Path) -> None:
    """Make sure the next start of the cluster in `pgdata` has a private socket."""
    conf = pgdata / "postgresql.conf"
    text = conf.read_text()
    if not text.endswith(_PRIVATE_SOCKET):
        with conf.open("a") as out:  # keeps the owner (pgserver's user when run as root)
            out.write(("" if text.endswith("\n") else "\n") + _PRIVATE_SOCKET)


def _get_server(pgserver: Any, pgdata: Path, cleanup_mode: str | None) -> Any:
    """pgserver.get_server, with the socket made private between initdb and start.

    pgserver runs initdb and starts the server in one constructor and has no
    option for server settings; its documented class is extended (not patched)
    to write `_PRIVATE_SOCKET` at the one moment in between.
    """

    class PrivateSocketServer(pgserver.PostgresServer):  # type: ignore[misc]
        def ensure_postgres_running(self) -> None:
            _restrict_socket(self.pgdata)
            super().ensure_postgres_running()

    # get_server's own steps (pgdata is already resolved): create the directory,
    # reuse the instance this process has for it.
    pgdata.mkdir(exist_ok=True)
    known = pgserver.PostgresServer._instances.get(pgdata)
    return known if known is not None else PrivateSocketServer(pgdata, cleanup_mode=cleanup_mode)


class EmbeddedPostgres:
    """A real PostgreSQL from the `pgserver` wheel, data kept in `pgdata`.

    On first start `initdb` creates the cluster (trust authentication, user
    `postgres`); later starts reuse it. The server listens on a unix socket
    only, no TCP port. With `cleanup_mode="stop"` (the default) leaving the
    context stops the server once no other process uses it and keeps the data;
    "delete" removes the data too; None leaves the server running.

    Run as root, pgserver creates a system user `pgserver` (with `useradd`) to
    run PostgreSQL, chowns `pgdata` to it and adds o+rx to every parent
    directory of `pgdata` so that user can reach it.

    The socket lives in `pgdata` unless that path is too long for a unix
    socket (about 107 bytes); pgserver then puts it in a directory under the
    runtime directory (/tmp/runtime-<uid>/…), world-writable when run as root. Since
    authentication is "trust", the socket must be owner-only from its first
    moment: `unix_socket_permissions = 0700` is written to the cluster's
    postgresql.conf after initdb and before every start (see
    `_PRIVATE_SOCKET`), so PostgreSQL creates the socket owner-only before it
    listens. `_harden` then makes a world-writable socket directory sticky (so
    the socket cannot be replaced) and restricts a socket started without the
    setting.
    """

    def __init__(
        self, pgdata: Path, *, cleanup_mode: Literal["stop", "delete"] | None = "stop"
    ) -> None:
        self.pgdata = Path(pgdata).expanduser().resolve()
        self.cleanup_mode = cleanup_mode
        self._server: Any = None
        self._dsn: str | None = None

    def __repr__(self) -> str:
        state = "running" if self._server is not None else "stopped"
        return f"EmbeddedPostgres({str(self.pgdata)!r}, {state})"

    @property
    def dsn(self) -> str:
        """The DSN of the `postgres` database (the server must be started)."""
        if self._dsn is None:
            raise RuntimeError(f"{self!r} is not started")
        return self._dsn

    async def start(self) -> str:
        """Start (or join) the server; return its DSN. Blocking work runs in a thread."""
        if self._dsn is None:
            self._dsn = await asyncio.to_thread(self._start)
            log.info("embedded postgres ready", pgdata=str(self.pgdata), dsn=self._dsn)
        return self._dsn

    async def stop(self) -> None:
        """Leave the server: stopped (or deleted) when this was its last user."""
        if self._server is not None:
            await asyncio.to_thread(self._stop)

    async def __aenter__(self) -> EmbeddedPostgres:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _start(self) -> str:
        with _PGSERVER_LOCK:
            pgserver = _import_pgserver()
            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            server = _get_server(pgserver, self.pgdata, self.cleanup_mode)
            server.__enter__()  # pgserver's per-process count of users
            self._server = server
            info = server.get_postmaster_info()
            self._harden(info)
            host = quote(str(info.socket_dir))
            return f"postgresql://postgres@/postgres?host={host}&port={info.port}"

    def _harden(self, info: Any) -> None:
        """Make a socket outside `pgdata` reachable by its owner (and root) only.

        Inside `pgdata` (mode 0700) it already is. Outside, anyone could connect
        as the superuser without a password. A server we started already made
        it 0700 (`_PRIVATE_SOCKET`); this covers one started without it (by an
        older version), which stays open until we get here.

        Run as root, pgserver makes that directory world-writable (0777) for its
        `pgserver` user: the sticky bit is added so that no other user can
        replace the socket with one of their own once the server runs.
        """
        if info.socket_dir is not None and info.socket_dir != self.pgdata:
            try:
                info.socket_path.chmod(0o700)
                mode = info.socket_dir.stat().st_mode
                if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
                    info.socket_dir.chmod(stat.S_IMODE(mode) | stat.S_ISVTX)
            except OSError as exc:  # a socket of another user's server we joined
                path = str(info.socket_path)
                log.warning("cannot restrict the postgres socket", path=path, error=str(exc))

    def _stop(self) -> None:
        with _PGSERVER_LOCK:
            server, self._server, self._dsn = self._server, None, None
            server.__exit__(None, None, None)
            if server._count <= 0:
                # pgserver caches servers by data directory and returns a
                # cached one without re-checking that it runs; forget it so a
                # later start in this process really starts the server again.
                type(server)._instances.pop(self.pgdata, None)


@asynccontextmanager
async def database_dsn(
    data_dir: Path, url: str | Secret | None = None, *, database: str = "inferswarm"
) -> AsyncIterator[str]:
    """The DSN a service connects to, for as long as the context lasts.

    With `url` (the service's `DATABASE_URL`) that server and database are
    used as given. Without it, the embedded server under `data_dir/postgres`
    is started and `database` created on it if missing; it is left (stopped
    when no other process uses it) on exit.
    """
    if url is not None:
        yield url.reveal() if isinstance(url, Secret) else url
        return
    async with EmbeddedPostgres(Path(data_dir) / "postgres") as server:
        yield await ensure_database(server.dsn, database)
