"""Attacks on accounts (issue 15, finding 7, and password change / log out everywhere).

* (a) a registration flood from one source -- an address web vouches for (an
  IPv6 client by its /64), or a CURVE key -- is `RATE_LIMITED` past the limit,
  before any hash, while another source registers;
* (b) the overall cap holds across sources, and a source's refused attempts
  do not use it up;
* (c) registering an address that is already registered answers exactly like
  a new one (body, status, and comparable time: the password is hashed
  anyway) over RPC, REST and the CLI; a taken username is still `CONFLICT`;
* (d) a password change (old password checked and throttled like a login)
  ends every other session, and the old password no longer logs in;
* (e) "log out everywhere" ends every session, this one included, over RPC,
  REST (a gateway refuses the token within its 1 s) and the CLI; the
  dashboard's account page does both with its CSRF token.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from contextlib import AsyncExitStack

import aiohttp
import pytest

from shared.errors import Conflict, InvalidParams, RateLimited, Unauthenticated
from auth_support import PASSWORD, Auth, outsider, start_auth
from stack import Cli
from web_support import web_stack

pytestmark = pytest.mark.timeout(240)

NEW_PASSWORD = "a brand new passphrase 42"


def params(username: str, email: str | None = None, password: str = PASSWORD) -> dict:
    return {"username": username, "email": email or f"{username}@example.com", "password": password}


def public_answer(username: str, email: str) -> dict:
    """What the public hears for any registration that is not refused."""
    return {"username": username, "email": email, "tier": "free", "is_admin": False,
            "message": "account created: log in"}


# -- (a) and (b): registration throttling ----------------------------------------------------------


@pytest.mark.db
async def test_a_flood_from_one_source_is_refused_while_another_registers(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack:
        auth = await Auth(stack, await start_auth(stack, tmp_path, pg_dsn, register_per_source=3,
                                                  register_overall=1000)).start()
        web = await auth.connect()  # a member, vouching for its HTTP clients' addresses
        hasher = auth.calls.service.passwords

        async def from_addr(addr: str, name: str) -> dict:
            return await web.call("auth.register", {**params(name), "client_addr": addr})

        for i in range(3):
            assert await from_addr("198.51.100.7", f"flood{i}") == public_answer(f"flood{i}", f"flood{i}@example.com")
        hashed = hasher.completed
        for i in range(3, 8):
            with pytest.raises(RateLimited) as info:
                await from_addr("198.51.100.7", f"flood{i}")
            assert info.value.data["reason"] == "registrations" and 1 <= info.value.data["retry_after"] <= 60
        assert hasher.completed == hashed  # refused before any hash
        await from_addr("198.51.100.8", "neighbour")  # another source is not affected

        # An IPv6 client is one source per /64, however it rotates inside it.
        for i in range(3):
            await from_addr(f"2001:db8:1:2::{i + 1}", f"six{i}")
        with pytest.raises(RateLimited):
            await from_addr("2001:db8:1:2:ffff::9", "six3")
        await from_addr("2001:db8:1:3::1", "six4")

        # A direct caller is its CURVE key; it may not name an address.
        flooder = await auth.connect(outsider())
        for i in range(3):
            await flooder.call("auth.register", params(f"key{i}"))
        with pytest.raises(RateLimited):
            await flooder.call("auth.register", params("key3"))
        with pytest.raises(Exception) as info:
            await flooder.call("auth.register", {**params("key4"), "client_addr": "203.0.113.1"})
        assert info.value.code == "FORBIDDEN"
        await (await auth.connect(outsider())).call("auth.register", params("otherkey"))
        assert await db.fetchval("SELECT count(*) FROM users") == 3 + 1 + 3 + 1 + 3 + 1


@pytest.mark.db
async def test_the_overall_cap_holds_and_refusals_do_not_use_it_up(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack:
        auth = await Auth(stack, await start_auth(stack, tmp_path, pg_dsn, register_per_source=2,
                                                  register_overall=4)).start()
        web = await auth.connect()

        async def from_addr(addr: str, name: str) -> dict:
            return await web.call("auth.register", {**params(name), "client_addr": addr})

        await from_addr("192.0.2.1", "aa1")
        await from_addr("192.0.2.1", "aa2")
        for i in range(5):  # refused by its source: counted nowhere
            with pytest.raises(RateLimited):
                await from_addr("192.0.2.1", f"aa{i + 3}")
        await from_addr("192.0.2.2", "bb1")
        await from_addr("192.0.2.3", "cc1")
        for i, addr in enumerate(["192.0.2.4", "192.0.2.5", "192.0.2.6"]):  # every new source: the cap
            with pytest.raises(RateLimited) as info:
                await from_addr(addr, f"late{i}")
            assert info.value.data["reason"] == "registrations"
        with pytest.raises(RateLimited):  # a member naming no client counts overall too
            await web.call("auth.register", params("operator-made"))
        assert await db.fetchval("SELECT count(*) FROM users") == 4


# -- (c) a registered address is not revealed ------------------------------------------------------


@pytest.mark.db
async def test_a_registered_email_answers_like_a_new_one_in_body_and_time(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack:
        # Real hashing cost, so that skipping the hash would show in the time.
        auth = await Auth(stack, await start_auth(stack, tmp_path, pg_dsn, argon2_time_cost=2,
                                                  argon2_memory_kib=19456, register_per_source=1000,
                                                  register_overall=1000)).start()
        public = await auth.connect(outsider())
        await public.call("auth.register", params("owner", "owner@example.com"))

        new_times, taken_times = [], []
        for i in range(7):
            started = time.perf_counter()
            fresh = await public.call("auth.register", params(f"fresh{i}", f"fresh{i}@example.com"))
            new_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            again = await public.call("auth.register", params(f"claim{i}", "OWNER@example.com",
                                                              password=f"another password {i}"))
            taken_times.append(time.perf_counter() - started)
            assert fresh == public_answer(f"fresh{i}", f"fresh{i}@example.com")
            assert again == public_answer(f"claim{i}", "OWNER@example.com")
        new_median, taken_median = statistics.median(new_times), statistics.median(taken_times)
        assert 0.5 < taken_median / new_median < 2.0, (new_times, taken_times)

        # Nothing was created or changed for the taken address; the owner still logs in.
        assert await db.fetchval("SELECT count(*) FROM users WHERE username LIKE 'claim%'") == 0
        with pytest.raises(Unauthenticated):
            await public.call("auth.login", {"username_or_email": "claim0", "password": "another password 0"})
        with pytest.raises(Unauthenticated):
            await public.call("auth.login", {"username_or_email": "owner@example.com",
                                             "password": "another password 0"})
        await public.call("auth.login", {"username_or_email": "owner@example.com", "password": PASSWORD})

        # Usernames are public handles: a taken one is said, whatever the email.
        for email in ("owner@example.com", "nobody@example.com"):
            with pytest.raises(Conflict) as info:
                await public.call("auth.register", params("owner", email))
            assert info.value.message == "username already registered"


# -- (d) and (e) over RPC ----------------------------------------------------------------------------


@pytest.mark.db
async def test_password_change_ends_other_sessions_and_the_old_password(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        auth = await Auth(stack, await start_auth(stack, tmp_path, pg_dsn)).start()
        rpc = await auth.connect(outsider())
        await rpc.call("auth.register", params("paula"))

        async def login(password: str = PASSWORD) -> str:
            return (await rpc.call("auth.login", {"username_or_email": "paula", "password": password}))["token"]

        here, elsewhere = await login(), await login()
        with pytest.raises(InvalidParams) as info:  # the rules of registration
            await rpc.call("auth.change_password", {"token": here, "old_password": PASSWORD,
                                                    "new_password": "short"})
        assert info.value.data["param"] == "new_password"
        changed = await rpc.call("auth.change_password", {"token": here, "old_password": PASSWORD,
                                                          "new_password": NEW_PASSWORD})
        assert changed["user"]["username"] == "paula"
        for ended in (here, elsewhere):
            with pytest.raises(Unauthenticated):
                await rpc.call("auth.me", {"token": ended})
        assert (await rpc.call("auth.me", {"token": changed["token"]}))["username"] == "paula"
        with pytest.raises(Unauthenticated):
            await login(PASSWORD)
        current = await login(NEW_PASSWORD)

        # The old password is checked like a login: guesses lock the account.
        refusals = []
        for _ in range(8):
            try:
                await rpc.call("auth.change_password", {"token": current, "old_password": "a wrong guess",
                                                        "new_password": "whatever passphrase"})
            except (Unauthenticated, RateLimited) as exc:
                refusals.append(type(exc))
        assert refusals[:5] == [Unauthenticated] * 5 and RateLimited in refusals[5:]
        assert (await rpc.call("auth.me", {"token": current}))["username"] == "paula"  # nothing changed


@pytest.mark.db
async def test_logout_all_ends_every_session_this_one_too(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        auth = await Auth(stack, await start_auth(stack, tmp_path, pg_dsn)).start()
        rpc = await auth.connect(outsider())
        await rpc.call("auth.register", params("lou"))
        await rpc.call("auth.register", params("bystander"))
        login = {"username_or_email": "lou", "password": PASSWORD}
        tokens = [(await rpc.call("auth.login", login))["token"] for _ in range(3)]
        other = (await rpc.call("auth.login", {"username_or_email": "bystander", "password": PASSWORD}))["token"]
        assert await rpc.call("auth.logout_all", {"token": tokens[0]}) == {"logged_out": True, "everywhere": True}
        for token in tokens:
            for name in ("auth.me", "auth.list_keys", "auth.logout_all"):
                with pytest.raises(Unauthenticated):
                    await rpc.call(name, {"token": token})
            with pytest.raises(Unauthenticated):  # what gateways ask
                await (await auth.connect()).call("auth.verify_token", {"token": token})
        assert (await rpc.call("auth.me", {"token": other}))["username"] == "bystander"  # others untouched
        fresh = (await rpc.call("auth.login", login))["token"]  # logging in again works
        assert (await rpc.call("auth.me", {"token": fresh}))["username"] == "lou"


# -- REST, the dashboard and the CLI, on a real stack ------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("accounts")) as running:
        yield running


async def rest(http: aiohttp.ClientSession, base: str, path: str, token: str | None = None,
               body: dict | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    method = http.post if body is not None or path in ("/api/auth/logout", "/api/auth/logout-all") else http.get
    kwargs = {"json": body} if body is not None else {}
    async with method(base + path, headers=headers, **kwargs) as reply:
        return reply.status, await reply.json()


async def rest_login(http, base: str, who: str, password: str = PASSWORD) -> str:
    status, answer = await rest(http, base, "/api/auth/login", body={"username_or_email": who,
                                                                     "password": password})
    assert status == 200, answer
    return answer["token"]


async def refused_within(http, base: str, token: str, seconds: float) -> float:
    """How long until the gateway (`GET /api/quota`) refuses `token`; fails past `seconds`."""
    started = time.monotonic()
    while True:
        status, answer = await rest(http, base, "/api/quota", token)
        if status == 401:
            return time.monotonic() - started
        assert status == 200, answer
        assert time.monotonic() - started < seconds, "the gateway still honours an ended session"
        await asyncio.sleep(0.05)


@pytest.mark.stack
async def test_rest_register_password_and_logout_all(stack):
    base = stack.base_url
    async with aiohttp.ClientSession() as http:
        status, first = await rest(http, base, "/api/auth/register", body=params("rita"))
        assert (status, first) == (201, public_answer("rita", "rita@example.com"))
        status, again = await rest(http, base, "/api/auth/register", body=params("rita2", "rita@example.com"))
        assert (status, again) == (201, public_answer("rita2", "rita@example.com"))
        status, taken = await rest(http, base, "/api/auth/register", body=params("rita", "new@example.com"))
        assert status == 409 and taken["error"]["code"] == "CONFLICT"

        here, elsewhere = await rest_login(http, base, "rita"), await rest_login(http, base, "rita")
        assert (await rest(http, base, "/api/quota", elsewhere))[0] == 200  # known to the gateway
        status, wrong = await rest(http, base, "/api/auth/password", here,
                                   {"old_password": "not it at all", "new_password": NEW_PASSWORD})
        assert status == 401 and wrong["error"]["code"] == "UNAUTHENTICATED"
        status, changed = await rest(http, base, "/api/auth/password", here,
                                     {"old_password": PASSWORD, "new_password": NEW_PASSWORD})
        assert status == 200, changed
        assert await refused_within(http, base, elsewhere, 1.5) <= 1.5
        assert (await rest(http, base, "/api/auth/api-keys", elsewhere))[0] == 401
        assert (await rest(http, base, "/api/auth/api-keys", changed["token"]))[0] == 200
        status, _ = await rest(http, base, "/api/auth/login", body={"username_or_email": "rita",
                                                                    "password": PASSWORD})
        assert status == 401

        others = [await rest_login(http, base, "rita", NEW_PASSWORD) for _ in range(2)]
        for token in others:
            assert (await rest(http, base, "/api/quota", token))[0] == 200
        status, answer = await rest(http, base, "/api/auth/logout-all", changed["token"])
        assert (status, answer) == (200, {"logged_out": True, "everywhere": True})
        for token in [changed["token"], *others]:
            assert (await rest(http, base, "/api/auth/api-keys", token))[0] == 401  # auth: at once
            await refused_within(http, base, token, 1.5)  # gateways: within their second


def csrf_of(html: str) -> dict:
    found = re.search(r'<input type="hidden" name="([^"]+)" value="([^"]+)">', html)
    assert found, html[:500]
    return {found.group(1): found.group(2)}


@pytest.mark.stack
async def test_the_account_page_changes_the_password_and_logs_out_everywhere(stack):
    base = stack.base_url
    async with aiohttp.ClientSession() as http:
        await rest(http, base, "/api/auth/register", body=params("dana"))
        api_session = await rest_login(http, base, "dana")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        form = csrf_of(await (await browser.get(f"{base}/login")).text())
        reply = await browser.post(f"{base}/login", allow_redirects=False,
                                   data={**form, "username_or_email": "dana", "password": PASSWORD})
        assert reply.status == 303
        page = await browser.get(f"{base}/account")
        assert page.status == 200 and "Change password" in await page.text()
        form = csrf_of(await page.text())

        without_csrf = await browser.post(f"{base}/account/password", allow_redirects=False, data={
            "old_password": PASSWORD, "new_password": NEW_PASSWORD, "new_password2": NEW_PASSWORD})
        assert without_csrf.status == 403
        wrong = await browser.post(f"{base}/account/password", allow_redirects=False, data={
            **form, "old_password": "not my password", "new_password": NEW_PASSWORD,
            "new_password2": NEW_PASSWORD})
        assert wrong.status == 401 and "wrong password" in await wrong.text()
        changed = await browser.post(f"{base}/account/password", allow_redirects=False, data={
            **form, "old_password": PASSWORD, "new_password": NEW_PASSWORD, "new_password2": NEW_PASSWORD})
        assert changed.status == 303 and changed.headers["Location"] == "/account?changed=1"
        page = await browser.get(f"{base}/account?changed=1", allow_redirects=False)  # the new cookie
        assert page.status == 200 and "every other session has ended" in await page.text()
        async with aiohttp.ClientSession() as http:
            assert (await rest(http, base, "/api/auth/api-keys", api_session))[0] == 401
            api_session = await rest_login(http, base, "dana", NEW_PASSWORD)

        out = await browser.post(f"{base}/account/logout-all", allow_redirects=False, data=form)
        assert out.status == 303
        assert (await browser.get(f"{base}/dashboard", allow_redirects=False)).status == 303  # to the login
        async with aiohttp.ClientSession() as http:
            assert (await rest(http, base, "/api/auth/api-keys", api_session))[0] == 401


@pytest.mark.stack
def test_the_cli_registers_changes_the_password_and_logs_out_everywhere(stack, tmp_path):
    port = int(stack.bootstrap.rsplit(":", 1)[1])
    laptop = Cli(stack.data_dir, port, tmp_path / "laptop")
    desktop = Cli(stack.data_dir, port, tmp_path / "desktop")

    first = laptop("register", "cleo", "cleo@example.com", "--password-stdin", stdin=PASSWORD)
    again = laptop("register", "cleo2", "CLEO@example.com", "--password-stdin", stdin=PASSWORD)
    assert first.returncode == again.returncode == 0, (first.stderr, again.stderr)
    assert first.stdout.replace("cleo", "X") == again.stdout.replace("cleo2", "X")
    assert "account created" in first.stdout and first.stderr == again.stderr == ""

    for cli in (laptop, desktop):
        assert cli("login", "cleo", "--password-stdin", stdin=PASSWORD).returncode == 0
    changed = laptop("password", "--password-stdin", stdin=f"{PASSWORD}\n{NEW_PASSWORD}\n")
    assert changed.returncode == 0 and "password changed" in changed.stdout, changed.stderr
    assert laptop("keys", "list").returncode == 0  # this CLI keeps a fresh session
    refused = desktop("keys", "list")
    assert refused.returncode == 3 and "session ended" in refused.stderr
    assert desktop("login", "cleo", "--password-stdin", stdin=PASSWORD).returncode == 3
    assert desktop("login", "cleo", "--password-stdin", stdin=NEW_PASSWORD).returncode == 0

    out = laptop("logout", "--everywhere")
    assert out.returncode == 0 and "logged out everywhere" in out.stdout, out.stderr
    assert not (tmp_path / "laptop" / "inferswarm" / "credentials.json").exists()
    refused = desktop("keys", "list")
    assert refused.returncode == 3 and "session ended" in refused.stderr
