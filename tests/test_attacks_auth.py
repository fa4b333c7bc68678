"""Attacks on login (issue 15, findings 2 and 3): each performed, each refused.

* 60 concurrent wrong passwords for one account, from 60 CURVE keys (a
  guesser rotating keys to escape the per-caller count): the attempt is
  reserved before it is hashed, per account whatever the key, so exactly
  `FREE + 1` get a verdict (five free, the sixth locks the account) and Argon2
  runs that many times; the other 54 are `RATE_LIMITED` with `retry_after`.
* the bound holds whichever of two auth instances on one database each guess reaches;
* the owner is not locked out: an address the web vouches for that has not
  failed on the account gets through the lock (a fresh key does not: keys cost
  nothing), and the owner's login does not reopen the account to the guessers;
* a flood of logins past the Argon2 queue (one hashing thread, eight waiting)
  is refused at once while the queue is full, and the service recovers;
* the same attack through the web's `/api/auth/login` and `/login` gets 429
  with `Retry-After`, and the owner, from another address, still logs in.
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest
import zmq.asyncio
from nacl.public import PrivateKey

from shared.errors import MeshError, RateLimited, Unauthenticated
from shared.identity import CurveKeyPair, MeshCredential, NodeIdentity
from shared.rpc import Connection, Dispatcher, RpcServer
from services.auth.passwords import QUEUE_PER_THREAD
from services.auth.throttle import source_of
from auth_support import PASSWORD, Calls, start_auth
from web_support import PASSWORD as WEB_PASSWORD, web_stack

pytestmark = pytest.mark.timeout(180)

FREE = 5  # INFERSWARM_LOGIN_FREE_FAILURES's default
LOCK = 30.0  # the first lock: longer than any burst here, so the bound is exact
GUESSES = 60


class Auth:
    """One auth service on a real CurveZMQ socket; callers as members or with fresh keys."""

    def __init__(self, stack: AsyncExitStack, calls: Calls) -> None:
        self.stack = stack
        self.calls = calls
        self.credential = MeshCredential(MeshCredential.new_secret())
        self.context = zmq.asyncio.Context()
        stack.callback(self.context.destroy, 0)
        self.node = NodeIdentity.generate()
        self.server = RpcServer(Dispatcher(calls.service), curve=self.node.curve,
                                members=self.credential.roster)

    @classmethod
    async def start(cls, stack: AsyncExitStack, calls: Calls) -> Auth:
        auth = cls(stack, calls)
        await stack.enter_async_context(auth.server)
        return auth

    def connect(self, keys: CurveKeyPair | None = None) -> Connection:
        """A connection with `keys` (default: a fresh outsider key, as a guesser makes them)."""
        keys = keys or CurveKeyPair.from_private(PrivateKey.generate())
        connection = Connection(self.server.endpoint, self.node.curve.public, keys, context=self.context)
        connection.open()
        self.stack.push_async_callback(connection.close)
        return connection

    def member(self) -> Connection:
        return self.connect(self.credential.client)


async def login(connection: Connection, user: str, password: str, **extra: Any) -> Any:
    """`auth.login`'s answer, or the typed error it raised."""
    params = {"username_or_email": user, "password": password, **extra}
    try:
        return await connection.call("auth.login", params, timeout=60)
    except MeshError as exc:
        return exc


@pytest.mark.db
async def test_concurrent_guesses_from_rotating_keys_get_a_handful_of_verdicts(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        calls = await start_auth(stack, tmp_path, pg_dsn, login_base_delay=LOCK)
        auth = await Auth.start(stack, calls)
        hasher = calls.service.passwords
        web = auth.member()
        await calls("register", username="olga", email="olga@example.com", password=PASSWORD)
        hashed = hasher.completed

        guessers = [auth.connect() for _ in range(GUESSES)]  # 60 CURVE keys
        results = await asyncio.gather(*(login(g, "olga", f"guess number {i}") for i, g in enumerate(guessers)))
        verdicts = [r for r in results if isinstance(r, Unauthenticated)]
        refused = [r for r in results if isinstance(r, RateLimited)]
        assert len(verdicts) == FREE + 1 and len(refused) == GUESSES - FREE - 1, results
        assert all(0 < r.data["retry_after"] <= LOCK and r.data["reason"] == "locked" for r in refused)
        assert hasher.completed - hashed == FREE + 1  # Argon2 ran only for the verdicts

        # A fresh key gets nothing through the lock, not even the owner's.
        assert isinstance(await login(auth.connect(), "olga", PASSWORD), RateLimited)
        # An address the web vouches for, that has not failed here, does.
        owner = await login(web, "olga", PASSWORD, client_addr="198.51.100.7")
        assert owner["user"]["username"] == "olga"
        # ... and the owner's login did not reopen the account to the guessers.
        assert isinstance(await login(auth.connect(), "olga", "one more guess"), RateLimited)
        # An address gets one attempt through the lock: wrong, and it is bound too.
        assert isinstance(await login(web, "olga", "a guess via the web", client_addr="203.0.113.50"),
                          Unauthenticated)
        assert isinstance(await login(web, "olga", PASSWORD, client_addr="203.0.113.50"), RateLimited)
        # The owner's address is still welcome, again and again.
        for _ in range(3):
            assert (await login(web, "olga", PASSWORD, client_addr="198.51.100.7"))["token"]
        assert hasher.completed - hashed == FREE + 1 + 1 + 1 + 3


@pytest.mark.db
async def test_the_owner_logging_in_during_the_attack_neither_fails_nor_helps_it(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        calls = await start_auth(stack, tmp_path, pg_dsn, login_base_delay=LOCK)
        auth = await Auth.start(stack, calls)
        web = auth.member()
        await calls("register", username="pia", email="pia@example.com", password=PASSWORD)
        guessers = [auth.connect() for _ in range(GUESSES)]
        owner = [login(web, "pia", PASSWORD, client_addr=f"198.51.100.{i}") for i in range(1, 4)]
        results = await asyncio.gather(*(login(g, "pia", "wrong guess!") for g in guessers), *owner)
        attack, mine = results[:GUESSES], results[GUESSES:]
        assert all(isinstance(r, dict) and r["token"] for r in mine), mine
        # The owner's successes gave their reservations back but forgave nobody else.
        assert 1 <= sum(isinstance(r, Unauthenticated) for r in attack) <= FREE + 1, attack
        assert all(isinstance(r, (Unauthenticated, RateLimited)) for r in attack)


@pytest.mark.db
async def test_the_bound_holds_across_auth_instances_sharing_a_database(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        first = await start_auth(stack, tmp_path, pg_dsn, login_base_delay=LOCK)
        second = await start_auth(stack, tmp_path, pg_dsn, login_base_delay=LOCK)
        instances = [await Auth.start(stack, first), await Auth.start(stack, second)]
        await first("register", username="sam", email="sam@example.com", password=PASSWORD)
        hashed = [a.calls.service.passwords.completed for a in instances]
        guessers = [instances[i % 2].connect() for i in range(GUESSES)]
        results = await asyncio.gather(*(login(g, "sam", "guess guess") for g in guessers))
        assert sum(isinstance(r, Unauthenticated) for r in results) == FREE + 1, results
        assert sum(isinstance(r, RateLimited) for r in results) == GUESSES - FREE - 1
        assert sum(a.calls.service.passwords.completed - h for a, h in zip(instances, hashed)) == FREE + 1
        # The owner gets through on either instance from a clean address.
        for auth in instances:
            assert (await login(auth.member(), "sam", PASSWORD, client_addr="198.51.100.9"))["token"]


@pytest.mark.unit
def test_addresses_are_counted_by_what_the_client_cannot_vary_cheaply():
    assert source_of("203.0.113.9") == "addr:203.0.113.9"
    assert source_of("::ffff:203.0.113.9") == "addr:203.0.113.9"
    same = {source_of(f"2001:db8:1:2:{i:x}::1") for i in range(100)}  # one /64
    assert same == {"addr:2001:db8:1:2::/64"}
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("unknown") == "addr:unknown"


@pytest.mark.db
async def test_a_flood_past_the_argon2_queue_is_refused_at_once_and_the_service_recovers(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        # 64 MiB, 8 passes (about half a second a hash here), one thread and
        # eight waiting: a full queue takes seconds to drain.
        calls = await start_auth(stack, tmp_path, pg_dsn, hash_concurrency=1, argon2_time_cost=8,
                                 argon2_memory_kib=65536)
        auth = await Auth.start(stack, calls)
        hasher = calls.service.passwords
        room = hasher.concurrency + hasher.queue
        assert room == 1 + QUEUE_PER_THREAD
        await calls("register", username="quinn", email="quinn@example.com", password=PASSWORD)
        hashed, turned_away = hasher.completed, hasher.refused

        # Fill the queue: unknown names from fresh keys, so no lock applies.
        filling = [asyncio.ensure_future(login(auth.connect(), f"filler{i}", "some password"))
                   for i in range(room)]
        flood = [auth.connect() for _ in range(40)]
        await asyncio.gather(*(c.call("auth.token_key") for c in flood))  # handshakes done beforehand
        while hasher.admitted < room:
            await asyncio.sleep(0.005)

        async def timed(connection: Connection, name: str) -> tuple[float, bool, Any]:
            begun = time.monotonic()
            outcome = await login(connection, name, "some password")
            return time.monotonic() - begun, hasher.admitted == room, outcome

        results = await asyncio.gather(*(timed(c, f"flood{i}") for i, c in enumerate(flood)))
        assert all(isinstance(r, RateLimited) and r.data == {"retry_after": 1, "reason": "busy"}
                   for _, _, r in results), results
        # Each refused in milliseconds, while the queue was still full.
        assert all(full for _, full, _ in results)
        # (generous for a loaded 2-core box: a verdict would take a queued Argon2 hash each)
        assert max(t for t, _, _ in results) < 0.5, sorted(t for t, _, _ in results)

        fillers = await asyncio.gather(*filling)
        assert all(isinstance(r, Unauthenticated) for r in fillers), fillers
        assert hasher.completed - hashed == room and hasher.refused - turned_away == len(flood)
        # Recovered: nothing waits, the refused were not counted against anyone, logins work.
        assert hasher.admitted == 0
        assert (await login(auth.connect(), "quinn", PASSWORD))["token"]
        assert isinstance(await login(flood[0], "flood0", "some password"), Unauthenticated)


# -- through the web ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Behind a proxy that writes X-Forwarded-For, so the test can be two clients.
    with web_stack(tmp_path_factory.mktemp("auth-attacks"), INFERSWARM_WEB_TRUST_PROXY="1",
                   INFERSWARM_LOGIN_BASE_DELAY=str(LOCK)) as running:
        yield running


def from_addr(addr: str) -> dict[str, str]:
    return {"X-Forwarded-For": addr}


@pytest.mark.stack
async def test_the_same_attack_through_the_web_gets_429_with_retry_after(stack):
    attacker, owner = from_addr("203.0.113.66"), from_addr("198.51.100.23")
    url = f"{stack.base_url}/api/auth/login"
    async with aiohttp.ClientSession() as http:
        reply = await http.post(f"{stack.base_url}/api/auth/register", headers=owner, json={
            "username": "rosa", "email": "rosa@example.com", "password": WEB_PASSWORD})
        assert reply.status == 201, await reply.text()

        async def guess(i: int) -> tuple[int, str | None, dict]:
            async with http.post(url, headers=attacker, json={"username_or_email": "rosa",
                                                              "password": f"wrong password {i}"}) as r:
                return r.status, r.headers.get("Retry-After"), await r.json()

        replies = await asyncio.gather(*(guess(i) for i in range(GUESSES)))
        statuses = [status for status, _, _ in replies]
        assert statuses.count(401) == FREE + 1 and statuses.count(429) == GUESSES - FREE - 1, statuses
        for status, retry_after, body in replies:
            if status == 429:
                assert 1 <= int(retry_after) <= LOCK and body["error"]["retry_after"] == int(retry_after)

        # The attacker's address has failed here: even the right password waits, in JSON and on the form.
        right = {"username_or_email": "rosa", "password": WEB_PASSWORD}
        reply = await http.post(url, headers=attacker, json=right)
        assert reply.status == 429 and int(reply.headers["Retry-After"]) >= 1
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            form = await (await browser.get(f"{stack.base_url}/login", headers=attacker)).text()
            csrf = re.search(r'<input type="hidden" name="([^"]+)" value="([^"]+)">', form)
            assert csrf
            page = await browser.post(f"{stack.base_url}/login", headers=attacker, allow_redirects=False,
                                      data={csrf.group(1): csrf.group(2), **right, "next": "/dashboard"})
            assert page.status == 429 and int(page.headers["Retry-After"]) >= 1
            assert "Too many failed attempts" in await page.text()

        # The owner, from an address that has not failed on the account, logs in.
        reply = await http.post(url, headers=owner, json=right)
        assert reply.status == 200, await reply.text()
        assert (await reply.json())["user"]["username"] == "rosa"
