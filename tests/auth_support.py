"""Helpers shared by the auth tests: a cheap config, a running service, calls by wire name.

Admins are made as the operator makes them: `auth.grant_admin`, a members-only
method (`Calls.admin` calls the handler; over RPC, call it with the mesh key).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import zmq.asyncio
from nacl.public import PrivateKey

from shared.config import MeshConfig
from shared.identity import CurveKeyPair, MeshCredential, NodeIdentity
from shared.rpc import Connection, Dispatcher, RpcServer
from services.auth.app import open_auth
from services.auth.config import AuthConfig
from services.auth.service import AuthService

ADMIN_EMAIL = "root@example.org"  #: the address tests give the admin they grant (it confers nothing)
PASSWORD = "correct horse battery staple"


def cheap_config(data_dir: Path, **overrides: Any) -> AuthConfig:
    """Production shape, test costs: argon2 at its minimum, short intervals."""
    options: dict[str, Any] = dict(
        mesh=MeshConfig(data_dir=data_dir),
        argon2_time_cost=1,
        argon2_memory_kib=8,
        argon2_parallelism=1,
        hash_concurrency=4,
        poll_interval=0.2,
        stale_after=1.0,
        login_max_delay=30.0,
    )
    options.update(overrides)
    return AuthConfig(**options)


class Calls:
    """Calls `auth.*` handlers through the dispatcher's binding (types checked)."""

    def __init__(self, service: AuthService) -> None:
        self.service = service
        self.dispatcher = Dispatcher(service)

    async def __call__(self, method: str, /, **params: Any) -> Any:
        handler = self.dispatcher.get(f"auth.{method}")
        assert handler is not None, method
        return await handler.call(params)

    async def user(self, username: str, email: str | None = None, password: str = PASSWORD) -> str:
        """Register and log in; the session token."""
        await self("register", username=username, email=email or f"{username}@example.com",
                   password=password)
        answer = await self("login", username_or_email=username, password=password)
        return answer["token"]

    async def admin(self, username: str, email: str = ADMIN_EMAIL, password: str = PASSWORD) -> str:
        """Register, be granted admin as the operator would (`auth.grant_admin`), log in; the token."""
        token = await self.user(username, email, password)
        await self("grant_admin", user=username, reason="test")
        return token


class Auth:
    """Auth served over real CurveZMQ, and connections to it as a member or an outsider."""

    def __init__(self, stack: AsyncExitStack, calls: Calls) -> None:
        self.stack, self.calls = stack, calls
        self.credential = MeshCredential(MeshCredential.new_secret())
        self.node = NodeIdentity.generate()
        self.context = zmq.asyncio.Context()
        stack.callback(self.context.destroy, 0)

    async def start(self) -> Auth:
        self.server = RpcServer(Dispatcher(self.calls.service), curve=self.node.curve,
                                members=self.credential.roster)
        await self.stack.enter_async_context(self.server)
        return self

    async def connect(self, keys: CurveKeyPair | None = None) -> Connection:
        """As the mesh (the mesh client key) unless other keys are given."""
        connection = Connection(self.server.endpoint, self.node.curve.public, keys or self.credential.client,
                                context=self.context)
        connection.open()
        self.stack.push_async_callback(connection.close)
        return connection


def outsider() -> CurveKeyPair:
    """A fresh CURVE key pair: a caller from outside the mesh."""
    return CurveKeyPair.from_private(PrivateKey.generate())


async def start_auth(stack: AsyncExitStack, data_dir: Path, dsn: str, **overrides: Any) -> Calls:
    return Calls(await open_auth(stack, cheap_config(data_dir, **overrides), dsn))


@asynccontextmanager
async def table_locked(dsn: str, table: str) -> AsyncIterator[float]:
    """Hold `table` in ACCESS EXCLUSIVE mode (every read of it waits) until the
    block ends: auth made slow for real. Yields when the lock was taken."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield time.monotonic()
    finally:
        await conn.close()
