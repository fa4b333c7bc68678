"""Reports from a real streaming replica (issue 21, part 3): `DATABASE_REPLICA_URL`.

The module starts a primary of its own (pgserver's PostgreSQL, as the
embedded one starts: the session's `pg_server` is shared by every other test,
and may be an external server) and, for each test, a streaming replica of it
with the same binaries: `pg_basebackup -R` (which writes `standby.signal` and
`primary_conninfo`; initdb's pg_hba.conf lets the local superuser replicate
over the socket, and `max_wal_senders` is 10 by default), then `pg_ctl start`
on a unix socket of its own, under a short /tmp path (a socket's path has
about 107 bytes). Each server is stopped by its own pg_ctl in the teardown.

Shown: with replay paused on the replica, usage recorded on the primary is
missing from `auth.report`, `auth.org_report`, `auth.usage` and
`auth.top_spenders` until replay resumes -- so the replica answered them --
while creating a key, validating it (the replica has no such key) and recording
usage work at once (the primary). The replica killed (`pg_ctl stop -m
immediate`), the reports come from the primary with one warning, and go back
to the replica when it is started again; a replica unreachable from the start
does not keep auth from starting.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from time import monotonic
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

from shared.config import Secret, load
from shared.db import EmbeddedPostgres, ensure_database
from shared.replica import ReplicaConfig, ReplicaReader
from services.auth.config import AuthConfig
from auth_support import Calls, start_auth
from test_alerts import usage

pytestmark = pytest.mark.db

#: As root, pgserver runs PostgreSQL as its system user `pgserver` (PostgreSQL refuses root);
#: the replica's commands run as that user too, so that its files are the server's.
RUN_AS = "pgserver" if os.geteuid() == 0 else None


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("primary") / "data", cleanup_mode="delete")
    asyncio.run(server.start())
    try:
        yield server
    finally:
        asyncio.run(server.stop())


class Replica:
    """A streaming replica of a primary: its data and its socket in a directory of its own, driven by
    its own pg_ctl. It listens on no TCP port (`-h ""`): `PORT` only names its socket file."""

    PORT = 5433

    def __init__(self, primary_dsn: str) -> None:
        import pgserver  # imported (and its warnings settled) by EmbeddedPostgres already

        self.bin = Path(pgserver.pg_config(["--bindir"]).strip())
        self.primary_dsn = primary_dsn
        self.root = Path(tempfile.mkdtemp(prefix="isr-", dir="/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if RUN_AS is not None:
            shutil.chown(self.root, RUN_AS, RUN_AS)

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@/{quote(database)}?host={quote(str(self.root))}&port={self.PORT}"

    def create(self) -> None:
        """A base backup of the primary, streaming the WAL it needs, set up as a standby (-R)."""
        self._run("pg_basebackup", "-D", str(self.data), "-R", "-X", "stream", "-c", "fast",
                  "-d", self.primary_dsn)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.log),
                  "-o", f'-h "" -p {self.PORT} -k {self.root}', "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def running(self) -> bool:
        """Whether its postmaster runs (`pg_ctl status`: 0 running, 3 not, 4 no data directory)."""
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False) == 0

    def destroy(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, name: str, *args: str, check: bool = True) -> int:
        # Output to a file, not a pipe: the server pg_ctl starts would inherit the pipe and keep it open.
        with open(self.root / "commands.log", "a") as out:
            done = subprocess.run([str(self.bin / name), *args], stdout=out, stderr=subprocess.STDOUT,
                                  user=RUN_AS, timeout=90)
        if check and done.returncode != 0:
            logs = "".join(p.read_text()[-3000:] for p in (self.root / "commands.log", self.log) if p.exists())
            raise AssertionError(f"{name} {' '.join(args)}: exit {done.returncode}\n{logs}")
        return done.returncode


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0) -> Any:
    """`check()`'s first true answer, polled; fails after `timeout` seconds."""
    deadline = monotonic() + timeout
    while not (answer := await check()):
        if monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)
    return answer


@asynccontextmanager
async def connected(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def replayed(primary_dsn: str, replica_dsn: str) -> None:
    """Wait until the replica has replayed everything written on the primary so far: a row written
    now on the primary (WAL is replayed in order) appears there."""
    token = secrets.token_hex(8)
    async with connected(primary_dsn) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS replica_probe (token text)")
        await conn.execute("INSERT INTO replica_probe VALUES ($1)", token)

    async def arrived() -> bool:
        try:
            async with connected(replica_dsn) as conn:
                return await conn.fetchval("SELECT count(*) FROM replica_probe WHERE token = $1", token) == 1
        except (asyncpg.UndefinedTableError, asyncpg.InvalidCatalogNameError):
            return False  # the table, or the database, not replayed yet

    await eventually(arrived, "a row written on the primary replayed on the replica")


@pytest.fixture
async def cluster(primary: EmbeddedPostgres) -> AsyncIterator[tuple[str, Replica, str]]:
    """(a fresh database on the primary, a replica streaming from the primary, its name)."""
    name = f"test_{secrets.token_hex(6)}"
    dsn = await ensure_database(primary.dsn, name)
    replica = Replica(primary.dsn)
    try:
        await asyncio.to_thread(replica.create)
        await asyncio.to_thread(replica.start)
        async with connected(replica.dsn("postgres")) as conn:
            assert await conn.fetchval("SELECT pg_is_in_recovery()")
        await replayed(dsn, replica.dsn(name))
        yield dsn, replica, name
    finally:
        await asyncio.to_thread(replica.destroy)
        async with connected(primary.dsn) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def replica_lines(stream: Any, level: str | None = None) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "shared.replica"
            and (level is None or line["level"] == level)]


def served_by(stream: Any) -> list[str]:
    return [line["served_by"] for line in replica_lines(stream) if line["event"] == "read served"]


async def figures(auth: Calls, token: str, org_id: int | None = None) -> dict[str, int]:
    """How many requests each report counts (the caller's own, of every user, of the organisation)."""
    counted = {
        "report": (await auth("report", token=token))["totals"]["requests"],
        "usage": (await auth("usage", token=token))["totals"]["requests"],
        "top_spenders": sum(s["requests"] for s in (await auth("top_spenders"))["spenders"]),
    }
    if org_id is not None:
        counted["org_report"] = (await auth("org_report", token=token, org=org_id))["totals"]["requests"]
    return counted


def with_replica(replica: Replica, database: str) -> dict[str, Any]:
    return {"replica": ReplicaConfig(url=Secret(replica.dsn(database)))}


async def replay(replica: Replica, database: str, action: str) -> None:
    """Pause or resume replay on the replica, and wait until it is so."""
    async with connected(replica.dsn(database)) as conn:
        await conn.execute(f"SELECT pg_wal_replay_{action}()")
        state = "paused" if action == "pause" else "not paused"

        async def reached() -> bool:
            return await conn.fetchval("SELECT pg_get_wal_replay_pause_state()") == state

        await eventually(reached, f"replay {state}")


async def test_reports_read_the_replica_everything_else_the_primary(cluster, tmp_path, debug_log):
    dsn, replica, name = cluster
    async with AsyncExitStack() as stack:
        auth = await start_auth(stack, tmp_path, dsn, **with_replica(replica, name))
        reader = auth.service._usage.reports_pool
        assert isinstance(reader, ReplicaReader)
        token = await auth.user("ada")
        ada = (await auth("me", token=token))["id"]
        org = await auth("create_org", token=token, name="Acme")
        laptop = await auth("create_key", token=token, name="laptop")
        acme = await auth("create_key", token=token, name="acme", org=org["id"])
        await auth("record_usage", batch=usage(ada, laptop["id"], "0.01") + usage(ada, acme["id"], "0.02"))
        await replayed(dsn, replica.dsn(name))
        before = {"report": 2, "usage": 2, "top_spenders": 2, "org_report": 1}
        assert await figures(auth, token, org["id"]) == before

        await replay(replica, name, "pause")
        # Writes, and reads that must see them, go to the primary: a key made now is validated
        # (the replica has no such key), its usage recorded and listed at once.
        late = await auth("create_key", token=token, name="late")
        assert (await auth("validate_key", api_key=late["api_key"]))["key_id"] == late["id"]
        async with connected(replica.dsn(name)) as conn:
            assert await conn.fetchval("SELECT count(*) FROM api_keys WHERE id = $1", late["id"]) == 0
        batch = usage(ada, late["id"], "0.01", 2) + usage(ada, acme["id"], "0.02")
        assert await auth("record_usage", batch=batch) == {"inserted": 3, "duplicates": 0, "rejected": 0}
        assert len(await auth("recent_usage", token=token)) == 5
        # The reports do not have them yet: the replica answered, replay paused.
        assert await figures(auth, token, org["id"]) == before
        by_key = await auth("report", token=token, by="key")
        assert late["id"] not in {row["key_id"] for row in by_key["rows"]}

        await replay(replica, name, "resume")
        after = {"report": 5, "usage": 5, "top_spenders": 5, "org_report": 2}

        async def caught_up() -> bool:
            return await figures(auth, token, org["id"]) == after

        await eventually(caught_up, "the reports with the usage recorded while replay was paused")
        assert (reader.state, reader.fallbacks) == ("closed", 0)
    served = served_by(debug_log)
    assert served and set(served) == {"replica"}
    assert not replica_lines(debug_log, "warning")


async def test_reports_fall_back_to_the_primary_while_the_replica_is_down(cluster, tmp_path, debug_log):
    dsn, replica, name = cluster
    async with AsyncExitStack() as stack:
        auth = await start_auth(stack, tmp_path, dsn, **with_replica(replica, name))
        reader = auth.service._usage.reports_pool
        token = await auth.user("bob")
        bob = (await auth("me", token=token))["id"]
        key = await auth("create_key", token=token, name="k")
        await auth("record_usage", batch=usage(bob, key["id"], "0.01"))
        await replayed(dsn, replica.dsn(name))
        await replay(replica, name, "pause")
        await auth("record_usage", batch=usage(bob, key["id"], "0.01", 2))
        assert await figures(auth, token) == {"report": 1, "usage": 1, "top_spenders": 1}  # the replica's

        await asyncio.to_thread(replica.stop, "immediate")
        for _ in range(3):  # the primary's, every time; the replica is not tried again while it rests
            assert await figures(auth, token) == {"report": 3, "usage": 3, "top_spenders": 3}
        assert reader.state == "open" and reader.fallbacks == 3 * 4  # `usage` reads twice
        [warning] = replica_lines(debug_log, "warning")
        assert warning["event"] == "read replica failing: lag-tolerant reads go to the primary"
        assert "primary" in served_by(debug_log)

        # Started again, it replays what it missed (a pause does not outlive a restart); once its
        # rest is over, a report probes it and it serves the reports again.
        await asyncio.to_thread(replica.start)

        async def back() -> bool:
            await auth("report", token=token)
            return reader.state == "closed"

        await eventually(back, "the reports served by the replica again")
        fallbacks = reader.fallbacks
        assert await figures(auth, token) == {"report": 3, "usage": 3, "top_spenders": 3}
        assert reader.fallbacks == fallbacks and served_by(debug_log)[-4:] == ["replica"] * 4
    assert [line["event"] for line in replica_lines(debug_log, "info")] == [
        "read replica answers again: lag-tolerant reads go to it"]
    assert len(replica_lines(debug_log, "warning")) == 1


async def test_auth_starts_and_reports_with_the_replica_unreachable(pg_dsn, tmp_path, log_stream):
    nowhere = Path(tempfile.mkdtemp(prefix="isr-", dir="/tmp"))  # no server ever listened here
    try:
        url = f"postgresql://postgres@/auth?host={quote(str(nowhere))}&port=5433"
        config = load(AuthConfig, {"DATABASE_REPLICA_URL": url}).replica  # as the process reads it
        assert config.url is not None and config.url.reveal() == url and url not in repr(config)
        async with AsyncExitStack() as stack:
            auth = await start_auth(stack, tmp_path, pg_dsn, replica=config)
            token = await auth.user("cyd")
            cy = (await auth("me", token=token))["id"]
            await auth("record_usage", batch=usage(cy, None, "0.01", 2))
            for _ in range(2):
                assert await figures(auth, token) == {"report": 2, "usage": 2, "top_spenders": 2}
    finally:
        shutil.rmtree(nowhere)
    [warning] = replica_lines(log_stream, "warning")
    assert "FileNotFoundError" in warning["error"] or "ConnectionRefusedError" in warning["error"]
