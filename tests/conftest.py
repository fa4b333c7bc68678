"""Fixtures shared by the whole test suite.

`pg_server` is one real PostgreSQL for the session (the embedded one, or the
server of `DATABASE_URL` when that is set); `pg_dsn` is a fresh, empty
database on it for one test, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from shared.db import EmbeddedPostgres, ensure_database


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The DSN of a server-wide database on which tests may create databases."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    # A sync fixture with its own short-lived loops: the server is plain
    # processes and threads, nothing in it is bound to an event loop.
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    dsn = asyncio.run(server.start())
    try:
        yield dsn
    finally:
        asyncio.run(server.stop())


@pytest.fixture
async def pg_dsn(pg_server: str) -> AsyncIterator[str]:
    """The DSN of a new empty database, dropped (connections and all) after the test."""
    name = f"test_{secrets.token_hex(6)}"
    dsn = await ensure_database(pg_server, name)
    try:
        yield dsn
    finally:
        conn = await asyncpg.connect(pg_server)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
