"""Fixtures shared by the whole test suite.

`pg_server` is one real PostgreSQL for the session (the embedded one, or the
server of `DATABASE_URL` when that is set); `pg_dsn` is a fresh, empty
database on it for one test, dropped afterwards.

A skipped test fails the run: `make test` installs everything the tests need,
so a skip means something is missing, not that the feature works. Set
INFERSWARM_ALLOW_SKIPS=1 to run a part of the suite on a machine that lacks
it (the multi-host test needs root, say).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import structlog

from shared.db import EmbeddedPostgres, ensure_database
from shared.logging import configure_logging


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium for a module of browser tests (tests/browser_support.py)."""
    from browser_support import chromium  # Playwright only for the tests that drive a browser

    with chromium() as running:
        yield running


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where a module's screenshots go (INFERSWARM_WEB_SCREENSHOTS, else a temporary directory)."""
    target = Path(os.environ.get("INFERSWARM_WEB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    target.mkdir(parents=True, exist_ok=True)
    yield target
    print(f"\nscreenshots: {target}")


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


def _failing_skips(config: pytest.Config) -> int:
    """How many tests were skipped, when skips fail the run (0 when allowed)."""
    if os.environ.get("INFERSWARM_ALLOW_SKIPS"):
        return 0
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return len(reporter.stats.get("skipped", [])) if reporter is not None else 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == pytest.ExitCode.OK and _failing_skips(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if skipped := _failing_skips(config):
        terminalreporter.write_line(f"{skipped} test(s) skipped, which fails the run "
                                    "(INFERSWARM_ALLOW_SKIPS=1 allows it)", red=True)


#: The test pyramid's tiers (registered in pyproject.toml); every test has exactly one.
TIERS = ("unit", "rpc", "db", "stack", "faults", "browser")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError(
            f"every test needs exactly one tier marker ({', '.join(TIERS)}; see pyproject.toml); "
            f"{len(wrong)} test(s) have none or several:\n" + "\n".join(wrong))


# -- auth on a fresh database, for the tests of auth's handlers ---------------------------------------------


def _captured_logs(level: str) -> Iterator[io.StringIO]:
    """Logging at `level` configured into a buffer; the previous set-up restored afterwards."""
    root = logging.getLogger()
    handlers, previous = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging(level, "json", service="test", stream=stream, cache_loggers=False)  # type: ignore[arg-type]
    yield stream
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(previous)
    logging.captureWarnings(False)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Logging at info level into a buffer; the previous set-up restored afterwards."""
    yield from _captured_logs("info")


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """Logging at debug level into a buffer; the previous set-up restored afterwards."""
    yield from _captured_logs("debug")


@pytest.fixture
async def store(pg_dsn):
    """The gateway's quota store on a fresh database, migrated (services/gateway/store.py)."""
    from services.gateway.store import MIGRATIONS, QuotaStore
    from shared.db import apply_migrations, create_pool

    pool = await create_pool(pg_dsn, max_size=8)
    await apply_migrations(pool, MIGRATIONS)
    yield QuotaStore(pool)
    await pool.close()


@pytest.fixture
async def auth(pg_dsn, tmp_path):
    """The auth service on this test's database, its handlers called through the dispatcher
    (auth_support.Calls); a module may define its own `auth`."""
    from contextlib import AsyncExitStack

    from auth_support import start_auth

    async with AsyncExitStack() as stack:
        yield await start_auth(stack, tmp_path, pg_dsn)


@pytest.fixture
async def db(pg_dsn):
    """A connection to this test's database (to look at what the service stored)."""
    conn = await asyncpg.connect(pg_dsn)
    yield conn
    await conn.close()
