"""The process lifecycle: a real service joins a real DHT, serves over CurveZMQ,
uses the embedded PostgreSQL with its migrations, and withdraws on stop."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import pytest

from shared.config import ConfigError, MeshConfig, Secret, load
from shared.db import apply_migrations, create_pool, database_dsn
from shared.dht import service_topic
from shared.errors import NoProviders
from shared.identity import MeshCredential
from shared.rpc import method
from shared.runner import join_mesh, mesh_credential, serve

FAST_TTL = 2.0


class Notes:
    """A toy service with a table of its own."""

    name = "notes"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @method
    async def add(self, text: str) -> int:
        return await self._pool.fetchval("INSERT INTO notes (text) VALUES ($1) RETURNING id", text)

    @method(idempotent=True)
    async def count(self) -> int:
        return await self._pool.fetchval("SELECT count(*) FROM notes")


def mesh_config(data_dir: Path, secret: str, seeds: tuple[str, ...] = ()) -> MeshConfig:
    return MeshConfig(data_dir=data_dir, bootstrap=seeds, mesh_secret=Secret(secret), record_ttl=FAST_TTL)


@pytest.mark.db
async def test_service_on_embedded_postgres_serves_through_the_mesh_and_withdraws(tmp_path):
    secret = MeshCredential.new_secret().hex()
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_notes.sql").write_text("CREATE TABLE notes (id serial PRIMARY KEY, text text NOT NULL);")

    async def build(stack: AsyncExitStack, node) -> list[object]:
        # No DATABASE_URL: the embedded PostgreSQL under the data directory.
        dsn = await stack.enter_async_context(database_dsn(node.config.data_dir, None, database="notes"))
        pool = await create_pool(dsn)
        stack.push_async_callback(pool.close)
        assert await apply_migrations(pool, migrations) == ["0001_notes.sql"]
        return [Notes(pool)]

    async with AsyncExitStack() as stack:
        client = await join_mesh(stack, "client", mesh_config(tmp_path / "client", secret))
        seeds = (client.discovery.address,)
        ready: list[dict] = []
        stop = asyncio.Event()
        service = asyncio.create_task(
            serve("notes", build, mesh_config(tmp_path / "svc", secret, seeds), ready=ready.append, stop=stop,
                  role="operator")  # no service of ours: the operator may announce any topic
        )
        for _ in range(100):
            if ready or service.done():
                break
            await asyncio.sleep(0.05)
        assert ready and ready[0]["ready"] == "notes"
        json.dumps(ready[0])  # the ready line is JSON

        notes = client.mesh("notes")
        assert await notes.call("notes.add", {"text": "hello"}) == 1
        assert await notes.call("notes.count", idempotent=True) == 1

        stop.set()
        await asyncio.wait_for(service, 15)
        client.discovery.forget(service_topic("notes"))  # past the lookup cache
        with pytest.raises(NoProviders):
            await client.discovery.lookup(service_topic("notes"))


@pytest.mark.unit
def test_joining_a_mesh_without_its_secret_is_a_config_error(tmp_path):
    config = MeshConfig(data_dir=tmp_path, bootstrap=("127.0.0.1:7400",))
    with pytest.raises(ConfigError, match="INFERSWARM_CREDENTIAL: required to join"):
        mesh_credential(config)


@pytest.mark.unit
def test_first_node_creates_the_secret_once(tmp_path):
    config = load(MeshConfig, {"INFERSWARM_DATA_DIR": str(tmp_path)})
    first = mesh_credential(config)
    assert (tmp_path / "mesh.secret").stat().st_mode & 0o777 == 0o600
    assert mesh_credential(config).mesh_id == first.mesh_id
