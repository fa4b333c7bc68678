"""shared.db against a real PostgreSQL: migrations, errors, the embedded server."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from asyncpg import Connection

from shared.config import Secret
from shared.db import (
    EmbeddedPostgres,
    MigrationError,
    apply_migrations,
    close_pool,
    create_pool,
    database_dsn,
    ensure_database,
    translate_errors,
    with_database,
)
from shared.errors import Conflict


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[Connection]:
    connection = await asyncpg.connect(pg_dsn)
    yield connection
    await connection.close()


# Numeric, not lexical, order: 2 runs before 10.
MIGRATIONS = {
    "10_add_email.sql": "ALTER TABLE users ADD COLUMN email text UNIQUE;\n"
    "INSERT INTO steps VALUES (10);",
    "1_steps.sql": "CREATE TABLE steps (n int);",
    "2_users.sql": "CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL);\n"
    "INSERT INTO steps VALUES (2);",
}


@pytest.mark.db
async def test_migrations_run_in_numeric_order_once(conn: Connection, tmp_path: Path) -> None:
    directory = write(tmp_path / "migrations", MIGRATIONS)
    applied = await apply_migrations(conn, directory)
    assert applied == ["1_steps.sql", "2_users.sql", "10_add_email.sql"]
    assert [r["n"] for r in await conn.fetch("SELECT n FROM steps")] == [2, 10]
    rows = await conn.fetch("SELECT version, name, checksum, applied_at FROM schema_migrations")
    assert sorted(r["version"] for r in rows) == ["1", "10", "2"]
    assert all(len(r["checksum"]) == 64 and r["applied_at"] for r in rows)

    assert await apply_migrations(conn, directory) == []  # idempotent
    write(directory, {"11_more.sql": "INSERT INTO steps VALUES (11);"})
    assert await apply_migrations(conn, directory) == ["11_more.sql"]


@pytest.mark.db
async def test_an_edited_migration_is_refused(conn: Connection, tmp_path: Path) -> None:
    directory = write(tmp_path / "migrations", MIGRATIONS)
    await apply_migrations(conn, directory)
    edited = MIGRATIONS["2_users.sql"] + "\n-- edited"
    write(directory, {"2_users.sql": edited, "12_new.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match=r"2_users\.sql was changed after it was applied"):
        await apply_migrations(conn, directory)
    # Nothing new ran on top of a history that does not match.
    assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 3


@pytest.mark.db
async def test_a_migration_of_another_service_is_refused(conn: Connection, tmp_path: Path) -> None:
    await apply_migrations(conn, write(tmp_path / "auth", {"1_users.sql": "SELECT 1;"}))
    with pytest.raises(MigrationError, match="share this database"):
        await apply_migrations(conn, write(tmp_path / "gateway", {"1_keys.sql": "SELECT 1;"}))


@pytest.mark.db
async def test_a_failed_migration_is_rolled_back(conn: Connection, tmp_path: Path) -> None:
    directory = write(
        tmp_path / "migrations",
        {
            "1_ok.sql": "CREATE TABLE ok (n int);",
            "2_bad.sql": "CREATE TABLE half (n int); SELECT nope;",
        },
    )
    with pytest.raises(MigrationError, match=r"2_bad\.sql failed"):
        await apply_migrations(conn, directory)
    assert await conn.fetchval("SELECT to_regclass('ok') IS NOT NULL")
    assert await conn.fetchval("SELECT to_regclass('half') IS NULL")
    assert await conn.fetchval("SELECT array_agg(name) FROM schema_migrations") == ["1_ok.sql"]
    # The migration lock was released, so the fixed file applies.
    write(directory, {"2_bad.sql": "CREATE TABLE half (n int);"})
    assert await apply_migrations(conn, directory) == ["2_bad.sql"]


@pytest.mark.db
async def test_concurrent_apply_is_serialized(pg_dsn: str, tmp_path: Path) -> None:
    # The sleep keeps the first runner inside its migrations while the second
    # arrives; without the lock both would create `jobs` and one would fail.
    directory = write(
        tmp_path / "migrations",
        {
            "1_jobs.sql": "CREATE TABLE jobs (id int PRIMARY KEY); SELECT pg_sleep(0.3);",
            "2_more.sql": "INSERT INTO jobs VALUES (1);",
        },
    )
    first, second = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    try:
        results = await asyncio.gather(
            apply_migrations(first, directory), apply_migrations(second, directory)
        )
    finally:
        await first.close()
        await second.close()
    assert sorted(results, key=len) == [[], ["1_jobs.sql", "2_more.sql"]]


@pytest.mark.db
async def test_migrations_through_a_pool(pg_dsn: str, tmp_path: Path) -> None:
    directory = write(tmp_path / "migrations", {"1_t.sql": "CREATE TABLE t (n int);"})
    pool = await create_pool(pg_dsn, max_size=2)
    try:
        assert await apply_migrations(pool, directory) == ["1_t.sql"]
        assert await pool.fetchval("SELECT count(*) FROM t") == 0
    finally:
        await pool.close()


@pytest.mark.parametrize("bad", ["users.sql", "0001-users.sql", "0001_.sql"])
@pytest.mark.db
async def test_badly_named_files_are_refused(conn: Connection, tmp_path: Path, bad: str) -> None:
    directory = write(tmp_path / "migrations", {bad: "SELECT 1;"})
    with pytest.raises(MigrationError, match="named like"):
        await apply_migrations(conn, directory)


@pytest.mark.db
async def test_a_missing_directory_is_refused(conn: Connection, tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="no such migrations directory"):
        await apply_migrations(conn, tmp_path / "absent")


@pytest.mark.db
async def test_same_version_twice_is_refused(conn: Connection, tmp_path: Path) -> None:
    directory = write(tmp_path / "migrations", {"1_a.sql": "SELECT 1;", "0001_b.sql": "SELECT 1;"})
    with pytest.raises(MigrationError, match="same version"):
        await apply_migrations(conn, directory)


@pytest.mark.db
async def test_unique_violation_becomes_conflict(conn: Connection) -> None:
    await conn.execute("CREATE TABLE users (email text CONSTRAINT users_email_key UNIQUE)")
    with translate_errors():
        await conn.execute("INSERT INTO users VALUES ('a@example.org')")
    with pytest.raises(Conflict) as caught:
        with translate_errors("email already registered"):
            await conn.execute("INSERT INTO users VALUES ('a@example.org')")
    assert caught.value.code == "CONFLICT"
    assert caught.value.message == "email already registered"
    assert caught.value.data == {"constraint": "users_email_key"}
    with pytest.raises(asyncpg.NotNullViolationError):  # other errors pass through
        with translate_errors():
            await conn.execute("CREATE TABLE t (n int NOT NULL); INSERT INTO t VALUES (NULL)")


@pytest.mark.db
async def test_ensure_database_is_idempotent(pg_server: str, pg_dsn: str, conn: Connection) -> None:
    name = urlsplit(pg_dsn).path.lstrip("/")
    assert await ensure_database(pg_server, name) == pg_dsn
    assert await conn.fetchval("SELECT current_database()") == name


@pytest.mark.unit
def test_with_database() -> None:
    assert with_database("postgresql://u:p@db:5432/app?sslmode=require", "auth") == (
        "postgresql://u:p@db:5432/auth?sslmode=require"
    )
    assert with_database("postgresql://postgres@/postgres?host=%2Ftmp%2Fx", "a b") == (
        "postgresql://postgres@/a%20b?host=%2Ftmp%2Fx"
    )


@pytest.mark.db
async def test_database_url_is_used_as_given(tmp_path: Path) -> None:
    url = "postgresql://u:p@db.internal/app"
    async with database_dsn(tmp_path, url) as dsn:
        assert dsn == url
    async with database_dsn(tmp_path, Secret(url)) as dsn:
        assert dsn == url
    assert not (tmp_path / "postgres").exists()


@pytest.mark.db
async def test_embedded_data_survives_a_restart(tmp_path: Path) -> None:
    pgdata = tmp_path / "pg"
    async with EmbeddedPostgres(pgdata) as server:
        conn = await asyncpg.connect(server.dsn)
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')")
        await conn.close()
    assert (pgdata / "PG_VERSION").exists()
    assert not (pgdata / "postmaster.pid").exists()  # stopped, data kept
    with pytest.raises(RuntimeError, match="not started"):
        server.dsn

    async with EmbeddedPostgres(pgdata) as server:
        conn = await asyncpg.connect(server.dsn)
        assert await conn.fetchval("SELECT v FROM kept") == "still here"
        await conn.close()


@pytest.mark.db
async def test_embedded_server_with_a_long_data_dir(tmp_path: Path) -> None:
    # Too long for a unix socket path (~107 bytes): pgserver moves the socket
    # out of the data directory, and we make it owner-only.
    data_dir = tmp_path / ("d" * 60) / ("e" * 40)
    async with database_dsn(data_dir, database="auth") as dsn:
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT current_database()") == "auth"
        await conn.close()
        socket_dir = Path(parse_qs(urlsplit(dsn).query)["host"][0])
        assert not socket_dir.is_relative_to(data_dir)
        socket = next(socket_dir.glob(".s.PGSQL.*[0-9]"))
        assert stat.S_IMODE(socket.stat().st_mode) == 0o700
        # nobody else can replace it: the directory is not writable by others,
        # or (pgserver's 0777 when run as root) sticky
        mode = socket_dir.stat().st_mode
        assert not mode & stat.S_IWOTH or mode & stat.S_ISVTX, oct(mode)


@pytest.mark.db
async def test_the_socket_is_private_from_the_server_start(tmp_path: Path) -> None:
    # PostgreSQL itself makes the socket owner-only before it listens (not a
    # chmod after start, which left a window): the setting is in force on the
    # first start (initdb and start in one pgserver call) and on a restart.
    pgdata = tmp_path / ("d" * 60) / ("e" * 40) / "postgres"
    pgdata.parent.mkdir(parents=True)
    for _ in range(2):
        async with EmbeddedPostgres(pgdata) as server:
            conn = await asyncpg.connect(server.dsn)
            assert await conn.fetchval("SHOW unix_socket_permissions") == "0700"
            await conn.close()
    conf = (pgdata / "postgresql.conf").read_text()
    assert conf.count("unix_socket_permissions = 0700") == 1  # written once, kept


@pytest.mark.db
async def test_closing_a_pool_ends_even_with_a_connection_never_given_back(pg_dsn: str) -> None:
    """A stop must end: a connection held (a query stuck on the server, a task that never
    releases) is terminated after the timeout instead of holding the process forever."""
    pool = await create_pool(pg_dsn, min_size=1, max_size=2)
    held = await pool.acquire()
    stuck = asyncio.ensure_future(held.execute("SELECT pg_sleep(30)"))
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await close_pool(pool, timeout=0.5)
    assert asyncio.get_running_loop().time() - started < 5 and pool.is_closing()
    with pytest.raises(Exception):  # the stuck query's connection was terminated under it
        await asyncio.wait_for(stuck, 5)


@pytest.mark.db
async def test_a_released_connection_costs_no_statement(pg_dsn: str) -> None:
    """asyncpg's reset statement would be a transaction of its own on every release:
    our pools skip it, and still roll back a transaction left open."""
    pool = await create_pool(pg_dsn, min_size=1, max_size=1)
    statements: list[str] = []
    try:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda record: statements.append(record.query))
            await conn.execute("SELECT 1")
        assert statements == ["SELECT 1"]
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMPORARY TABLE left_open (n int)")
        assert await pool.fetchval("SELECT to_regclass('pg_temp.left_open') IS NULL")
    finally:
        await close_pool(pool)
