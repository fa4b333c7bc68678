"""The auth service over real CurveZMQ RPC: the public/internal split, revocation
reaching gateways (`KeyValidator`) and other auth instances (LISTEN/NOTIFY)
within a second, and `python -m services.auth` as a process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import zmq.asyncio
from nacl.public import PrivateKey

from shared.config import MeshConfig, Secret
from shared.dht import service_topic
from shared.dht.memory import MemoryDiscovery, MemoryRegistry
from shared.errors import Forbidden, InvalidParams, MeshError, MethodNotFound, RateLimited, Timeout, Unauthenticated
from shared.identity import CurveKeyPair, MeshCredential, NodeIdentity
from shared.rpc import Connection, Dispatcher, MeshClient, RpcServer
from shared.runner import join_mesh
from services.auth.client import KeyValidator
from services.auth.keys import hash_key
from auth_support import PASSWORD, Calls, start_auth, table_locked
from waiting import wait_until

pytestmark = pytest.mark.db

ROOT = Path(__file__).resolve().parent.parent


class Mesh:
    """One auth test mesh: a credential, a discovery registry, connections to close."""

    def __init__(self, stack: AsyncExitStack) -> None:
        self.stack = stack
        self.credential = MeshCredential(MeshCredential.new_secret())
        self.registry = MemoryRegistry()
        self.context = zmq.asyncio.Context()
        stack.callback(self.context.destroy, 0)

    async def serve(self, auth: Calls) -> RpcServer:
        """Serve `auth` on a CurveZMQ socket and announce it in the registry."""
        node = NodeIdentity.generate()
        server = RpcServer(Dispatcher(auth.service), curve=node.curve, members=self.credential.roster)
        await self.stack.enter_async_context(server)
        await MemoryDiscovery(self.registry, node).announce(
            service_topic("auth"), service="auth", endpoint=server.endpoint, version="test")
        server.node = node  # type: ignore[attr-defined]
        return server

    async def connect(self, server: RpcServer, keys: CurveKeyPair | None = None) -> Connection:
        """A connection as a member (default) or with other (outsider) keys."""
        connection = Connection(server.endpoint, server.node.curve.public,  # type: ignore[attr-defined]
                                keys or self.credential.client, context=self.context)
        connection.open()
        self.stack.push_async_callback(connection.close)
        return connection

    async def client(self) -> MeshClient:
        discovery = MemoryDiscovery(self.registry, NodeIdentity.generate())
        return await self.stack.enter_async_context(MeshClient(discovery, self.credential.client))


def outsider() -> CurveKeyPair:
    return CurveKeyPair.from_private(PrivateKey.generate())


async def session(connection: Connection, username: str) -> str:
    await connection.call("auth.register", {"username": username, "email": f"{username}@example.com",
                                            "password": PASSWORD})
    answer = await connection.call("auth.login", {"username_or_email": username, "password": PASSWORD})
    return answer["token"]


async def refused_within(validate, api_key: str, limit: float) -> float:
    """Seconds until `validate(api_key)` raises Unauthenticated; fails past `limit`."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            await validate(api_key)
        except Unauthenticated:
            return time.monotonic() - start
        await asyncio.sleep(0.01)
    raise AssertionError(f"key still honoured after {limit}s")


async def test_public_methods_are_open_and_internal_ones_are_members_only(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        mesh = Mesh(stack)
        server = await mesh.serve(await start_auth(stack, tmp_path, pg_dsn))
        stranger = await mesh.connect(server, outsider())
        member = await mesh.connect(server)

        token = await session(stranger, "alice")
        key = await stranger.call("auth.create_key", {"token": token, "name": "laptop"})
        assert [k["id"] for k in await stranger.call("auth.list_keys", {"token": token})] == [key["id"]]
        assert "BEGIN PUBLIC KEY" in (await stranger.call("auth.token_key"))["public_key"]

        internal = [
            ("auth.validate_key", {"api_key": key["api_key"]}),
            ("auth.record_usage", {"batch": []}),
            ("auth.invalidations", {"since": 0}),
            ("auth.verify_token", {"token": token}),
        ]
        for name, params in internal:
            with pytest.raises(Forbidden):
                await stranger.call(name, params)
            await member.call(name, params)
        answer = await member.call("auth.validate_key", {"api_key": key["api_key"]})
        assert answer["key_id"] == key["id"] and answer["tier"] == "free"

        # Only a member may say which client address a login comes from.
        with pytest.raises(Forbidden):
            await stranger.call("auth.login", {"username_or_email": "alice", "password": PASSWORD,
                                               "client_addr": "203.0.113.1"})
        assert await member.call("auth.login", {"username_or_email": "alice", "password": PASSWORD,
                                                "client_addr": "203.0.113.1"})
        # Bad input over the wire: typed errors, and the server keeps serving.
        for name, params, error in [
            ("auth.login", {"username_or_email": ["alice"], "password": PASSWORD}, InvalidParams),
            ("auth.register", {"username": "x" * 100_000, "email": "a@b.co", "password": PASSWORD}, InvalidParams),
            ("auth.revoke_key", {"token": token, "key_id": "1; DELETE FROM api_keys"}, InvalidParams),
            ("auth.me", {"token": "eyJhbGciOiJub25lIn0.e30."}, Unauthenticated),
            ("auth.create_key", {"token": token}, InvalidParams),
            ("auth.drop_tables", {}, MethodNotFound),
        ]:
            with pytest.raises(error):
                await stranger.call(name, params)
        assert (await stranger.call("auth.me", {"token": token}))["username"] == "alice"


async def test_failed_logins_are_counted_per_caller_key(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        mesh = Mesh(stack)
        server = await mesh.serve(await start_auth(stack, tmp_path, pg_dsn, login_caller_free_failures=3))
        guesser = await mesh.connect(server, outsider())
        honest = await mesh.connect(server, outsider())
        await session(honest, "bob")
        for name in ("n1", "n2", "n3", "n4"):
            with pytest.raises(Unauthenticated):
                await guesser.call("auth.login", {"username_or_email": name, "password": "guess guess"})
        with pytest.raises(RateLimited) as info:
            await guesser.call("auth.login", {"username_or_email": "bob", "password": PASSWORD})
        assert info.value.data["retry_after"] >= 1
        assert await honest.call("auth.login", {"username_or_email": "bob", "password": PASSWORD})


async def test_key_validator_caches_and_drops_a_revoked_key_within_a_second(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        mesh = Mesh(stack)
        server = await mesh.serve(await start_auth(stack, tmp_path, pg_dsn))
        web = await mesh.connect(server, outsider())
        token = await session(web, "carol")
        admin_token = await session(web, "root")  # root@example.com is not admin here
        keys = [await web.call("auth.create_key", {"token": token, "name": f"k{i}"}) for i in range(2)]

        validator = await stack.enter_async_context(KeyValidator(await mesh.client()))
        first = await validator.validate(keys[0]["api_key"])
        assert first["key_id"] == keys[0]["id"] and len(validator.cache) == 1
        asked = validator.asked
        for _ in range(100):
            assert (await validator.validate(keys[0]["api_key"]))["key_id"] == keys[0]["id"]
        await validator.validate(keys[1]["api_key"])
        assert validator.asked - asked == 1  # the second key once; the first from the cache

        with pytest.raises(Forbidden):
            await web.call("auth.set_tier", {"token": admin_token, "user": "carol", "tier": "pro"})
        await web.call("auth.revoke_key", {"token": token, "key_id": keys[0]["id"]})
        elapsed = await refused_within(validator.validate, keys[0]["api_key"], 1.0)
        assert elapsed < 1.0
        assert (await validator.validate(keys[1]["api_key"]))["key_id"] == keys[1]["id"]
        for garbage in ("", "isk_nope", "x" * 10_000):
            with pytest.raises(Unauthenticated):
                await validator.validate(garbage)


async def test_a_rotated_key_works_through_its_overlap_and_stops_within_a_second_after(pg_dsn, tmp_path):
    """A gateway's validator caches the old key with no expiry; the rotation's
    invalidation drops that answer, the next one carries the new expiry, and the
    cache serves it no longer than that."""
    async with AsyncExitStack() as stack:
        mesh = Mesh(stack)
        server = await mesh.serve(await start_auth(stack, tmp_path, pg_dsn))
        web = await mesh.connect(server, outsider())
        token = await session(web, "rolf")
        old = await web.call("auth.create_key", {"token": token, "name": "service"})
        validator = await stack.enter_async_context(KeyValidator(await mesh.client()))
        assert (await validator.validate(old["api_key"]))["expires_at"] is None  # cached: no expiry

        new = await web.call("auth.rotate_key", {"token": token, "key_id": old["id"], "overlap_seconds": 2})
        stops = datetime.fromisoformat(new["old_key"]["expires_at"]).timestamp()
        await wait_until(lambda: validator.cache.get(hash_key(old["api_key"])) is None, 1.0,
                         message="the rotation did not reach the validator's cache within a second")
        while time.time() < stops - 0.3:  # the overlap: both keys work
            assert (await validator.validate(old["api_key"]))["key_id"] == old["id"]
            assert (await validator.validate(new["api_key"]))["key_id"] == new["id"]
            await asyncio.sleep(0.05)
        assert (await validator.validate(old["api_key"]))["expires_at"] == pytest.approx(stops, abs=0.01)
        await wait_until(lambda: refused(validator.validate, old["api_key"]), stops + 1.0 - time.time() + 0.5,
                         message="the old key outlived its overlap")
        assert stops - 0.05 <= time.time() < stops + 1.0
        assert (await validator.validate(new["api_key"]))["key_id"] == new["id"]


async def refused(validate, api_key: str) -> bool:
    try:
        await validate(api_key)
    except Unauthenticated:
        return True
    return False


async def test_key_validator_never_caches_an_answer_older_than_its_cursor(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        mesh = Mesh(stack)
        auth = await start_auth(stack, tmp_path, pg_dsn)
        await mesh.serve(auth)
        token = await auth.user("hugo")
        key = (await auth("create_key", token=token, name="k"))["api_key"]
        validator = await stack.enter_async_context(KeyValidator(await mesh.client()))
        await validator.pause_polling()  # hold the validator's view still
        # As if this validator had seen an invalidation the auth instance has not applied yet.
        validator.cursor = auth.service.feed.cursor + 1
        validator.synced_at = time.monotonic()
        answer = await validator.validate(key)
        assert answer["cursor"] < validator.cursor and len(validator.cache) == 0
        validator.cursor = answer["cursor"]
        await validator.validate(key)
        assert len(validator.cache) == 1


async def test_untrusted_key_validator_shares_one_call_among_callers_of_a_key(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        mesh = Mesh(stack)
        auth = await start_auth(stack, tmp_path, pg_dsn)
        await mesh.serve(auth)
        token = await auth.user("ivy")
        key = (await auth("create_key", token=token, name="k"))["api_key"]
        validator = await stack.enter_async_context(KeyValidator(await mesh.client()))
        await validator.pause_polling()
        validator.synced_at = float("-inf")  # as after a missed poll: the cache is not trusted
        answers = await asyncio.gather(*(validator.validate(key) for _ in range(50)))
        assert validator.asked == 1 and len({a["key_id"] for a in answers}) == 1

        # An eviction while a call is in flight: later callers make their own.
        first = asyncio.create_task(validator.validate(key))
        await asyncio.sleep(0)
        validator.cache.evict(key_id=answers[0]["key_id"], user_id=answers[0]["user_id"])
        await asyncio.gather(first, validator.validate(key))
        assert validator.asked == 3


async def outcome(started: float, call: asyncio.Task[Any], limit: float) -> tuple[float, Any]:
    """(seconds from `started` until `call` ended, its result or error); fails past `limit`."""
    done, _ = await asyncio.wait((call,), timeout=limit)
    assert done, f"still running after {limit}s"
    ended = time.monotonic() - started
    return ended, call.exception() or call.result()


async def test_a_shared_validation_never_fails_a_caller_before_its_own_deadline(pg_dsn, tmp_path):
    """auth.validate_key held up by a lock on api_keys: a caller with 0.5 s left begins the
    call; one with 1.5 s joins it; one with 30 s must not: it begins its own. Each of the
    first two gets TIMEOUT at its own deadline (the joiner not at the first one's), and
    the third gets its answer once the lock goes, after as long as that took."""
    async with AsyncExitStack() as stack:
        mesh = Mesh(stack)
        auth = await start_auth(stack, tmp_path, pg_dsn)
        await mesh.serve(auth)
        token = await auth.user("jack")
        key = await auth("create_key", token=token, name="k")
        validator = await stack.enter_async_context(KeyValidator(await mesh.client()))
        async with table_locked(pg_dsn, "api_keys"):
            started = time.monotonic()
            short = asyncio.create_task(validator.validate(key["api_key"], deadline=started + 0.5))
            joiner = asyncio.create_task(validator.validate(key["api_key"], deadline=started + 1.5))
            patient = asyncio.create_task(validator.validate(key["api_key"], deadline=started + 30))
            for _ in range(100):
                if validator.asked == 2:
                    break
                await asyncio.sleep(0.01)
            assert validator.asked == 2  # the short caller's call, shared by the joiner; the patient one's own
            ended, error = await outcome(started, short, 5)
            assert isinstance(error, Timeout) and 0.45 <= ended < 1.2, (ended, error)
            ended, error = await outcome(started, joiner, 5)
            assert isinstance(error, Timeout) and 1.45 <= ended < 2.2, (ended, error)
            assert not patient.done()
        released = time.monotonic() - started
        ended, answer = await outcome(started, patient, 10)
        assert answer["key_id"] == key["id"] and ended >= released
        assert validator.asked == 2  # the joiner, out of time on the short call, waited on the patient one's
        assert (await validator.validate(key["api_key"], deadline=time.monotonic() + 1))["key_id"] == key["id"]
        with pytest.raises(Timeout):  # no time left and not cached: refused without a call
            validator.cache.clear()
            await validator.validate(key["api_key"], deadline=time.monotonic())
        assert validator.asked == 2


async def test_tier_change_and_disabled_user_reach_the_validator_within_a_second(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        mesh = Mesh(stack)
        server = await mesh.serve(await start_auth(stack, tmp_path, pg_dsn))
        web = await mesh.connect(server, outsider())
        token = await session(web, "dave")
        admin = await session(web, "root")
        operator = await mesh.connect(server)  # the mesh key: only a member may grant admin
        await operator.call("auth.grant_admin", {"user": "root"})
        key = (await web.call("auth.create_key", {"token": token, "name": "k"}))["api_key"]
        validator = await stack.enter_async_context(KeyValidator(await mesh.client()))
        assert (await validator.validate(key))["tier"] == "free"

        await web.call("auth.set_tier", {"token": admin, "user": "dave", "tier": "enterprise"})
        start = time.monotonic()
        while (await validator.validate(key))["tier"] != "enterprise":
            assert time.monotonic() - start < 1.0, "tier change not seen within a second"
            await asyncio.sleep(0.01)

        await web.call("auth.set_active", {"token": admin, "user": "dave", "active": False})
        assert await refused_within(validator.validate, key, 1.0) < 1.0


async def test_key_validator_fails_closed_when_auth_is_unreachable(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        mesh = Mesh(stack)
        auth_stack = await stack.enter_async_context(AsyncExitStack())
        server = await Mesh.serve(mesh, await start_auth(auth_stack, tmp_path, pg_dsn))
        # Served on its own stack so that it can be stopped mid-test.
        web = await mesh.connect(server, outsider())
        token = await session(web, "erin")
        key = (await web.call("auth.create_key", {"token": token, "name": "k"}))["api_key"]
        validator = await stack.enter_async_context(KeyValidator(await mesh.client(), max_timeout=0.3))
        await validator.validate(key)
        await web.close()
        await auth_stack.aclose()  # auth is gone: polls fail from now on
        await wait_until(lambda: not validator.trusted, validator.stale_after + 5,
                         message="the validator still trusts its cache with auth gone")
        with pytest.raises(MeshError):
            await validator.validate(key)  # not the cached answer


async def test_auth_instances_sharing_a_database_hear_revocations(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        writer = await start_auth(stack, tmp_path, pg_dsn)
        # Polls too slow to matter: only LISTEN/NOTIFY can evict this fast.
        listening = await start_auth(stack, tmp_path, pg_dsn, poll_interval=4.9, stale_after=5.0)
        # This one misses every notification: its poll must catch up.
        deaf = await start_auth(stack, tmp_path, pg_dsn, poll_interval=0.3, stale_after=1.0)
        await deaf.service.feed.stop_listening()

        token = await writer.user("frank")
        keys = [await writer("create_key", token=token, name=f"k{i}") for i in range(2)]
        await listening("validate_key", api_key=keys[0]["api_key"])
        await deaf("validate_key", api_key=keys[1]["api_key"])
        assert len(listening.service.cache) == 1 and len(deaf.service.cache) == 1

        await writer("revoke_key", token=token, key_id=keys[0]["id"])
        await writer("revoke_key", token=token, key_id=keys[1]["id"])
        validate_listening = lambda k: listening("validate_key", api_key=k)  # noqa: E731
        validate_deaf = lambda k: deaf("validate_key", api_key=k)  # noqa: E731
        # the notification, not the 4.9 s poll (a ceiling generous for a loaded box)
        assert await refused_within(validate_listening, keys[0]["api_key"], 2.5) < 2.5
        assert await refused_within(validate_deaf, keys[1]["api_key"], 1.0) < 1.0


async def test_auth_instance_survives_losing_its_listen_connection(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        writer = await start_auth(stack, tmp_path, pg_dsn)
        reader = await start_auth(stack, tmp_path, pg_dsn, poll_interval=0.3, stale_after=1.0)
        token = await writer.user("gina")
        key = await writer("create_key", token=token, name="k")
        await reader("validate_key", api_key=key["api_key"])
        conn = await asyncpg.connect(pg_dsn)
        try:
            pid = reader.service.feed.listener_pid
            assert pid is not None
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        await writer("revoke_key", token=token, key_id=key["id"])
        validate = lambda k: reader("validate_key", api_key=k)  # noqa: E731
        assert await refused_within(validate, key["api_key"], 1.0) < 1.0
        await wait_until(lambda: reader.service.feed.listener_pid not in (None, pid), 5,
                         message="the listen connection was never reopened")


async def test_python_m_services_auth_runs_a_working_process(pg_dsn, tmp_path):
    secret = MeshCredential.new_secret().hex()
    async with AsyncExitStack() as stack:
        config = MeshConfig(data_dir=tmp_path / "client", mesh_secret=Secret(secret), record_ttl=2.0)
        client = await join_mesh(stack, "client", config)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("INFERSWARM_")},
            "DATABASE_URL": pg_dsn, "INFERSWARM_DATA_DIR": str(tmp_path / "auth"),
            "INFERSWARM_MESH_SECRET": secret, "INFERSWARM_BOOTSTRAP": client.discovery.address,
            "INFERSWARM_RECORD_TTL": "2", "INFERSWARM_ARGON2_TIME_COST": "1",
            "INFERSWARM_ARGON2_MEMORY_KIB": "8", "INFERSWARM_ARGON2_PARALLELISM": "1",
        }
        proc = subprocess.Popen([sys.executable, "-m", "services.auth"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
            assert line, proc.stderr.read()
            assert json.loads(line)["ready"] == "auth"
            auth = client.mesh("auth")
            await auth.call("auth.register", {"username": "ops", "email": "ops@example.org", "password": PASSWORD})
            login = await auth.call("auth.login", {"username_or_email": "ops", "password": PASSWORD})
            assert not login["user"]["is_admin"]  # registering never makes an admin
            granted = await auth.call("auth.grant_admin", {"user": "ops"})  # the client is a member
            assert granted["is_admin"] and granted["changed"]
            assert (await auth.call("auth.me", {"token": login["token"]}))["is_admin"]
            key = await auth.call("auth.create_key", {"token": login["token"], "name": "k"})
            assert (await auth.call("auth.validate_key", {"api_key": key["api_key"]}))["key_id"] == key["id"]
            assert (tmp_path / "auth" / "auth" / "jwt_ed25519.pem").stat().st_mode & 0o777 == 0o600
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 30)
            stderr = proc.stderr.read()
        assert code == 0, stderr
        assert key["api_key"] not in stderr and PASSWORD not in stderr and login["token"] not in stderr
