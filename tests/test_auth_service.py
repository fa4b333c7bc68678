"""The auth service against a real PostgreSQL: every method, and bad input of every kind.

Handlers are called through the dispatcher's binding (as the RPC server does),
so wrong types are refused exactly as they would be over the wire.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from contextlib import AsyncExitStack
from datetime import date, datetime

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.errors import Conflict, Forbidden, InvalidParams, NotFound, RateLimited, Unauthenticated
from services.auth.tokens import TokenVerifier
from auth_support import PASSWORD, Calls, start_auth
from waiting import wait_until

pytestmark = pytest.mark.db

HUGE = "x" * 1_000_000
SQL = "x'); DROP TABLE users; --"


@pytest.fixture
async def auth(pg_dsn, tmp_path) -> Calls:
    async with AsyncExitStack() as stack:
        yield await start_auth(stack, tmp_path, pg_dsn, login_caller_free_failures=3)


# -- register and login ------------------------------------------------------------------


async def test_register_login_and_me(auth):
    user = await auth("register", username="alice", email="Alice@Example.com", password=PASSWORD)
    assert user["username"] == "alice" and user["tier"] == "free" and not user["is_admin"]
    assert "argon2" not in str(user) and PASSWORD not in str(user)
    for identifier in ("alice", "ALICE", "alice@example.com", " Alice@EXAMPLE.com "):
        session = await auth("login", username_or_email=identifier, password=PASSWORD)
        assert session["user"]["id"] == user["id"] and session["expires_at"] > time.time()
    me = await auth("me", token=session["token"])
    assert me["limits"] == {"requests_per_hour": 100, "requests_per_month": 3000, "tokens_per_month": 100_000,
                            "spend_per_day": None, "spend_per_month": None}
    assert me["priority"] == 0 and me["currency"] == "USD"


async def test_passwords_are_stored_as_argon2id_only(auth, db):
    await auth("register", username="bob", email="bob@example.com", password=PASSWORD)
    stored = await db.fetchval("SELECT password_hash FROM users")
    assert stored.startswith("$argon2id$") and PASSWORD not in stored


BAD_REGISTRATIONS = [
        {"username": 5, "email": "a@example.com", "password": PASSWORD},
        {"username": "alice", "email": None, "password": PASSWORD},
        {"username": "alice", "email": "a@example.com", "password": b"bytes-password"},
        {"username": ["alice"], "email": "a@example.com", "password": PASSWORD},
        {"username": "alice", "email": "a@example.com"},
        {"username": "alice", "email": "a@example.com", "password": PASSWORD, "is_admin": True},
        {"username": "", "email": "a@example.com", "password": PASSWORD},
        {"username": "alice", "email": "", "password": PASSWORD},
        {"username": "alice", "email": "a@example.com", "password": ""},
        {"username": HUGE, "email": "a@example.com", "password": PASSWORD},
        {"username": "alice", "email": HUGE + "@example.com", "password": PASSWORD},
        {"username": "alice", "email": "a@example.com", "password": HUGE},
        {"username": "аdmin", "email": "a@example.com", "password": PASSWORD},  # Cyrillic а
        {"username": "al ice", "email": "a@example.com", "password": PASSWORD},
        {"username": "al\x00ice", "email": "a@example.com", "password": PASSWORD},
        {"username": "🦄🦄🦄", "email": "a@example.com", "password": PASSWORD},
        {"username": SQL, "email": "a@example.com", "password": PASSWORD},
        {"username": "alice", "email": "not-an-email", "password": PASSWORD},
        {"username": "alice", "email": "a@b@example.com", "password": PASSWORD},
        {"username": "alice", "email": "a @example.com", "password": PASSWORD},
        {"username": "alice", "email": "a@example.com", "password": "short"},
        {"username": "alice", "email": "a@example.com", "password": "password123"},
        {"username": "alice", "email": "a@example.com", "password": "PASSWORD123"},
        {"username": "alice", "email": "a@example.com", "password": "x" * 1025},
        {"username": "alicealice", "email": "a@example.com", "password": "AliceAlice"},
]


async def test_register_refuses_bad_input(auth, db):
    for params in BAD_REGISTRATIONS:
        with pytest.raises(InvalidParams) as info:
            await auth("register", **params)
        assert "DROP" not in info.value.message and PASSWORD not in info.value.message
    assert await db.fetchval("SELECT count(*) FROM users") == 0


async def test_sql_metacharacters_and_unicode_are_just_data(auth, db):
    email = "o'brien\";DROP/**/TABLE/**/users;--@exämple.com"
    password = "pässwörd 🔐 ' OR '1'='1"
    user = await auth("register", username="o.brien-1", email=email, password=password)
    assert user["email"] == email
    # The same password typed as decomposed unicode (NFD) still logs in.
    decomposed = "pa\u0308sswo\u0308rd 🔐 ' OR '1'='1"
    session = await auth("login", username_or_email=email, password=decomposed)
    assert session["user"]["id"] == user["id"]
    assert await db.fetchval("SELECT count(*) FROM users") == 1
    with pytest.raises(Unauthenticated):
        await auth("login", username_or_email="' OR 1=1 --", password="' OR '1'='1")


async def test_duplicates_conflict_for_a_member_naming_no_client(auth, db):
    """The operator's tools (a member naming no client) hear which field is taken; the
    public never hears about an email (tests/test_attacks_accounts.py)."""
    await auth("register", username="carol", email="carol@example.com", password=PASSWORD)
    errors = []
    for username, email in [("CAROL", "other@example.com"), ("other", "CAROL@example.com"),
                            ("carol", "CAROL@example.com")]:
        with pytest.raises(Conflict) as info:
            await auth("register", username=username, email=email, password=PASSWORD)
        errors.append((info.value.message, info.value.data))
    assert errors == [("username already registered", {}), ("email already registered", {}),
                      ("username already registered", {})]
    assert await db.fetchval("SELECT count(*) FROM users") == 1


async def test_concurrent_duplicate_registrations_exactly_one_wins(auth, db):
    async def attempt(i: int):
        return await auth("register", username="dave", email=f"dave{i}@example.com", password=PASSWORD)

    results = await asyncio.gather(*(attempt(i) for i in range(10)), return_exceptions=True)
    assert sum(isinstance(r, dict) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 9
    assert await db.fetchval("SELECT count(*) FROM users") == 1


async def test_wrong_password_and_unknown_user_fail_alike_and_are_audited(auth, db):
    await auth("register", username="erin", email="erin@example.com", password=PASSWORD)
    messages = []
    for identifier in ("erin", "nobody"):
        with pytest.raises(Unauthenticated) as info:
            await auth("login", username_or_email=identifier, password="wrong password!")
        messages.append(info.value.message)
    assert messages[0] == messages[1]
    events = await db.fetch("SELECT event, user_id, details FROM audit_log WHERE event = 'login_failed'")
    assert len(events) == 2 and "wrong password" not in str(events)


BAD_LOGINS = [
        ({"username_or_email": 1, "password": PASSWORD}, InvalidParams),
        ({"username_or_email": "erin", "password": None}, InvalidParams),
        ({"username_or_email": "", "password": PASSWORD}, InvalidParams),
        ({"username_or_email": HUGE, "password": PASSWORD}, InvalidParams),
        ({"username_or_email": "erin", "password": HUGE}, InvalidParams),
        ({"username_or_email": "erin", "password": ""}, Unauthenticated),
        ({"username_or_email": "erin", "password": PASSWORD, "client_addr": ""}, InvalidParams),
        ({"username_or_email": "erin", "password": PASSWORD, "client_addr": HUGE}, InvalidParams),
        ({"username_or_email": "erin", "password": PASSWORD, "client_addr": 5}, InvalidParams),
]


async def test_login_refuses_bad_input(auth):
    await auth("register", username="erin", email="erin@example.com", password=PASSWORD)
    for params, error in BAD_LOGINS:
        with pytest.raises(error):
            await auth("login", **params)


async def test_repeated_failures_are_slowed_per_account(auth):
    await auth("register", username="frank", email="frank@example.com", password=PASSWORD)
    for _ in range(6):  # five free failures, the sixth locks for a second
        with pytest.raises(Unauthenticated):
            await auth("login", username_or_email="frank", password="not the password")
    with pytest.raises(RateLimited) as info:  # even the right password waits
        await auth("login", username_or_email="frank@example.com", password=PASSWORD)
    assert info.value.data["retry_after"] >= 1
    await asyncio.sleep(info.value.data["retry_after"] + 0.1)  # kept (the behaviour): the delay it announced
    assert (await auth("login", username_or_email="frank", password=PASSWORD))["token"]


async def test_repeated_failures_are_slowed_per_caller(auth):
    for name in ("gina", "hank"):
        await auth("register", username=name, email=f"{name}@example.com", password=PASSWORD)
    for name in ("nobody1", "nobody2", "nobody3", "nobody4"):  # 3 free per caller here
        with pytest.raises(Unauthenticated):
            await auth("login", username_or_email=name, password="guess", client_addr="203.0.113.9")
    with pytest.raises(RateLimited):
        await auth("login", username_or_email="gina", password=PASSWORD, client_addr="203.0.113.9")
    # Another address, and the account itself, are unaffected.
    assert await auth("login", username_or_email="gina", password=PASSWORD, client_addr="198.51.100.7")


async def test_login_rehashes_when_parameters_change(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack:
        old = await start_auth(stack, tmp_path, pg_dsn)
        await old("register", username="ivan", email="ivan@example.com", password=PASSWORD)
    before = await db.fetchval("SELECT password_hash FROM users")
    async with AsyncExitStack() as stack:
        new = await start_auth(stack, tmp_path, pg_dsn, argon2_time_cost=2, argon2_memory_kib=16)
        await new("login", username_or_email="ivan", password=PASSWORD)
        after = await db.fetchval("SELECT password_hash FROM users")
        assert before.startswith("$argon2id$v=19$m=8,t=1,p=1$")
        assert after.startswith("$argon2id$v=19$m=16,t=2,p=1$")
        await new("login", username_or_email="ivan", password=PASSWORD)


# -- tokens --------------------------------------------------------------------------------


def _forge(token: str, tmp_path, **changes) -> str:
    key = serialization.load_pem_private_key((tmp_path / "auth" / "jwt_ed25519.pem").read_bytes(), None)
    claims = {**jwt.decode(token, options={"verify_signature": False}), **changes}
    return jwt.encode(claims, key, algorithm="EdDSA")


async def test_forged_expired_and_garbage_tokens_are_unauthenticated(auth, tmp_path):
    token = await auth.user("judy")
    header, payload, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    other_key = Ed25519PrivateKey.generate()

    def b64(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    bad = [
        jwt.encode(claims, other_key, algorithm="EdDSA"),  # wrong key
        f"{b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",  # alg none
        f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({**claims, 'sub': '1'})}.",
        f"{header}.{b64({**claims, 'sub': '999'})}.{signature}",  # tampered payload
        jwt.encode(claims, "s" * 32, algorithm="HS256"),  # HMAC, not EdDSA
        _forge(token, tmp_path, exp=int(time.time()) - 60),  # expired
        _forge(token, tmp_path, aud="someone-else"),
        _forge(token, tmp_path, iss="evil"),
        _forge(token, tmp_path, sub="not-a-number"),
        _forge(token, tmp_path, sub="99999999999999999999999"),
        "", "garbage", "a.b.c", HUGE, "ü.ñ.ï", SQL,
    ]
    for forged in bad:
        for method, extra in [("me", {}), ("list_keys", {}), ("create_key", {"name": "k"})]:
            with pytest.raises(Unauthenticated):
                await auth(method, token=forged, **extra)
    for wrong_type in (None, 5, b"bytes", ["t"]):
        with pytest.raises(InvalidParams):
            await auth("me", token=wrong_type)
    assert (await auth("me", token=token))["username"] == "judy"


async def test_logout_ends_that_session_only_and_is_audited(auth, db):
    token = await auth.user("lena")
    other = (await auth("login", username_or_email="lena", password=PASSWORD))["token"]
    assert await auth("logout", token=token) == {"logged_out": True}
    assert await auth("logout", token=token) == {"logged_out": True}  # idempotent
    for method in ("me", "verify_token", "list_keys"):
        with pytest.raises(Unauthenticated, match="session ended"):
            await auth(method, token=token)
    assert (await auth("me", token=other))["username"] == "lena"  # the other session goes on
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    row = await db.fetchrow("SELECT user_id, expires_at FROM revoked_tokens WHERE jti = $1", jti)
    assert row["expires_at"].timestamp() == jwt.decode(token, options={"verify_signature": False})["exp"]
    events = await db.fetch("SELECT event FROM audit_log WHERE user_id = $1 AND event = 'logged_out'", row["user_id"])
    assert len(events) == 1
    for bad in ("garbage", token.replace(".", "x", 1)):
        with pytest.raises(Unauthenticated):
            await auth("logout", token=bad)


async def test_token_key_lets_other_services_verify_locally(auth):
    token = await auth.user("kate")
    info = await auth("token_key")
    assert info["algorithm"] == "EdDSA" and "PRIVATE" not in info["public_key"]
    verifier = TokenVerifier(info["public_key"], issuer=info["issuer"], audience=info["audience"])
    claims = verifier.verify(token)
    assert set(claims) >= {"iss", "aud", "sub", "iat", "exp", "jti"}
    assert jwt.get_unverified_header(token)["kid"] == info["kid"]
    assert (await auth("verify_token", token=token))["username"] == "kate"


# -- API keys ----------------------------------------------------------------------------------


async def test_key_is_shown_once_and_stored_only_as_a_hash(auth, db):
    token = await auth.user("leo")
    created = await auth("create_key", token=token, name="laptop")
    api_key = created["api_key"]
    assert api_key.startswith("isk_") and len(api_key) >= 4 + 43
    assert created["prefix"] == api_key[:8] and created["status"] == "active"
    listed = await auth("list_keys", token=token)
    assert [k["id"] for k in listed] == [created["id"]] and "api_key" not in listed[0]
    assert api_key not in str(listed)
    row = await db.fetchrow("SELECT * FROM api_keys")
    assert row["key_hash"] == hashlib.sha256(api_key.encode()).digest()
    assert api_key not in str(dict(row)) and api_key[8:20] not in str(dict(row))
    audit = await db.fetch("SELECT event FROM audit_log WHERE event = 'key_created'")
    assert len(audit) == 1


BAD_KEY_REQUESTS = [
        {"name": ""}, {"name": "   "}, {"name": "x" * 101}, {"name": HUGE}, {"name": "a\nb"},
        {"name": 5}, {"name": None}, {"name": "k", "expires_in_days": 0},
        {"name": "k", "expires_in_days": -1}, {"name": "k", "expires_in_days": 10**6},
        {"name": "k", "expires_in_days": "7"}, {"name": "k", "expires_in_days": 1.5},
        {"name": "k", "expires_in_days": True},
]


async def test_create_key_refuses_bad_input(auth):
    token = await auth.user("mia")
    for params in BAD_KEY_REQUESTS:
        with pytest.raises(InvalidParams):
            await auth("create_key", token=token, **params)
    assert await auth("list_keys", token=token) == []


async def test_key_names_may_be_unicode_and_sql(auth):
    token = await auth.user("nick")
    for name in ("ключ 🔑", SQL):
        assert (await auth("create_key", token=token, name=name))["name"] == name


async def test_validate_key_answers_from_memory(auth):
    token = await auth.user("olga")
    created = await auth("create_key", token=token, name="ci")
    store = auth.service.store
    lookups = 0
    original = store.key_by_hash

    async def counting(key_hash):
        nonlocal lookups
        lookups += 1
        return await original(key_hash)

    store.key_by_hash = counting
    for _ in range(200):
        answer = await auth("validate_key", api_key=created["api_key"])
    assert lookups == 1
    assert answer["key_id"] == created["id"] and answer["user_id"] == (await auth("me", token=token))["id"]
    assert answer["tier"] == "free" and answer["limits"]["requests_per_hour"] == 100
    assert answer["priority"] == 0 and isinstance(answer["cursor"], int)
    # Use is recorded in batches, not per call.
    assert (await auth("list_keys", token=token))[0]["last_used_at"] is None
    await auth.service.housekeeper.flush()
    assert (await auth("list_keys", token=token))[0]["last_used_at"] is not None


GARBAGE_KEYS = ["", "isk_", "isk_" + "\ud800" * 43, "isk_short", "sk-" + "a" * 48, HUGE, "isk_" + "é" * 43,
                                 "isk_" + "a" * 42 + "'", SQL, "isk_" + "A" * 43]


async def test_validate_key_refuses_garbage_and_wrong_types(auth):
    for bad in GARBAGE_KEYS:
        with pytest.raises(Unauthenticated):
            await auth("validate_key", api_key=bad)
    for wrong in (None, 5, b"isk_x", ["isk_x"], {"k": 1}):
        with pytest.raises(InvalidParams):
            await auth("validate_key", api_key=wrong)
    with pytest.raises(InvalidParams):
        await auth("validate_key")


async def test_revoked_key_is_refused_at_once(auth, db):
    token = await auth.user("paul")
    key = await auth("create_key", token=token, name="k")
    await auth("validate_key", api_key=key["api_key"])  # now cached
    revoked = await auth("revoke_key", token=token, key_id=key["id"])
    assert revoked["status"] == "revoked"
    with pytest.raises(Unauthenticated, match="revoked"):
        await auth("validate_key", api_key=key["api_key"])
    assert (await auth("revoke_key", token=token, key_id=key["id"]))["status"] == "revoked"  # again: fine
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE event = 'key_revoked'") == 1


async def test_revoking_someone_elses_key_is_not_found(auth):
    owner = await auth.user("quinn")
    thief = await auth.user("rita")
    key = await auth("create_key", token=owner, name="k")
    for key_id in (key["id"], 424242):
        with pytest.raises(NotFound):
            await auth("revoke_key", token=thief, key_id=key_id)
    for bad in (0, -1, 2**63, 2**64 - 1):
        with pytest.raises(InvalidParams):
            await auth("revoke_key", token=thief, key_id=bad)
    with pytest.raises(InvalidParams):
        await auth("revoke_key", token=thief, key_id=str(key["id"]))
    assert await auth("validate_key", api_key=key["api_key"])


async def test_expired_key_is_refused(auth, db):
    token = await auth.user("sam")
    key = await auth("create_key", token=token, name="k", expires_in_days=1)
    assert (await auth("validate_key", api_key=key["api_key"]))["expires_at"] > time.time()
    auth.service.cache.clear()  # as after a restart; the database now says "expired"
    await db.execute("UPDATE api_keys SET expires_at = now() - interval '1 second'")
    with pytest.raises(Unauthenticated, match="expired"):
        await auth("validate_key", api_key=key["api_key"])
    assert (await auth("list_keys", token=token))[0]["status"] == "expired"


async def test_cached_key_stops_at_its_expiry(auth, db):
    token = await auth.user("tara")
    key = await auth("create_key", token=token, name="k", expires_in_days=1)
    await auth("validate_key", api_key=key["api_key"])
    (entry,) = auth.service.cache.entries()
    entry.valid_until = time.monotonic()  # the key's expiry passes while it is cached
    await db.execute("UPDATE api_keys SET expires_at = now() - interval '1 second'")
    with pytest.raises(Unauthenticated, match="expired"):
        await auth("validate_key", api_key=key["api_key"])


async def test_too_many_keys_is_a_conflict(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        auth = await start_auth(stack, tmp_path, pg_dsn, max_keys_per_user=2)
        token = await auth.user("uma")
        first = await auth("create_key", token=token, name="a")
        await auth("create_key", token=token, name="b")
        with pytest.raises(Conflict):
            await auth("create_key", token=token, name="c")
        await auth("revoke_key", token=token, key_id=first["id"])
        assert await auth("create_key", token=token, name="c")


# -- rotation ----------------------------------------------------------------------------------


async def _refused(auth, api_key: str) -> bool:
    try:
        await auth("validate_key", api_key=api_key)
    except Unauthenticated:
        return True
    return False


async def test_rotation_makes_a_successor_and_both_keys_work_during_the_overlap(auth, db):
    token = await auth.user("rosa")
    old = await auth("create_key", token=token, name="deploy bot", expires_in_days=10)
    assert (await auth("validate_key", api_key=old["api_key"]))["key_id"] == old["id"]  # cached
    before = time.time()
    new = await auth("rotate_key", token=token, key_id=old["id"], overlap_seconds=3600)
    # The successor: shown once, the same name and expiry, naming the key it replaces.
    assert new["api_key"].startswith("isk_") and new["api_key"] != old["api_key"]
    assert new["prefix"] == new["api_key"][:8] and new["status"] == "active"
    assert (new["name"], new["expires_at"], new["rotated_from"]) == ("deploy bot", old["expires_at"], old["id"])
    # The old key: active for one hour more (its cached answer, with the old expiry, was dropped).
    retired = new["old_key"]
    assert retired["id"] == old["id"] and retired["status"] == "active"
    stops = datetime.fromisoformat(retired["expires_at"]).timestamp()
    assert before + 3600 - 5 < stops < time.time() + 3600 + 5
    for api_key, key_id in ((old["api_key"], old["id"]), (new["api_key"], new["id"])):
        answer = await auth("validate_key", api_key=api_key)
        assert answer["key_id"] == key_id
    assert (await auth("validate_key", api_key=old["api_key"]))["expires_at"] == pytest.approx(stops, abs=0.01)
    # The list shows the chain; the key itself never.
    listed = {k["id"]: k for k in await auth("list_keys", token=token)}
    assert listed[new["id"]]["rotated_from"] == old["id"] and listed[old["id"]]["rotated_from"] is None
    assert new["api_key"] not in str(listed)
    row = await db.fetchrow("SELECT key_hash, rotated_from FROM api_keys WHERE id = $1", new["id"])
    assert row["key_hash"] == hashlib.sha256(new["api_key"].encode()).digest() and row["rotated_from"] == old["id"]
    # Audited once, with both ids; caches told through the invalidation log.
    audit = await db.fetch("SELECT user_id, actor_id, details FROM audit_log WHERE event = 'key_rotated'")
    assert len(audit) == 1
    details = json.loads(audit[0]["details"])
    assert (details["key_id"], details["new_key_id"], details["overlap_seconds"]) == (old["id"], new["id"], 3600)
    assert new["api_key"] not in audit[0]["details"]
    assert await db.fetchval("SELECT count(*) FROM invalidations WHERE key_id = $1 AND reason = 'key_rotated'",
                             old["id"]) == 1


async def test_rotation_with_no_overlap_stops_the_old_key_at_once(auth):
    token = await auth.user("sven")
    old = await auth("create_key", token=token, name="ci")
    await auth("validate_key", api_key=old["api_key"])  # now cached, with no expiry
    new = await auth("rotate_key", token=token, key_id=old["id"], overlap_seconds=0)
    assert new["old_key"]["status"] == "expired" and new["expires_at"] is None
    with pytest.raises(Unauthenticated, match="expired"):
        await auth("validate_key", api_key=old["api_key"])
    assert (await auth("validate_key", api_key=new["api_key"]))["key_id"] == new["id"]
    statuses = {k["id"]: k["status"] for k in await auth("list_keys", token=token)}
    assert statuses == {old["id"]: "expired", new["id"]: "active"}


async def test_rotation_stops_the_old_key_at_the_end_of_a_short_overlap(auth):
    token = await auth.user("tilda")
    old = await auth("create_key", token=token, name="ci")
    new = await auth("rotate_key", token=token, key_id=old["id"], overlap_seconds=1)
    stops = datetime.fromisoformat(new["old_key"]["expires_at"]).timestamp()
    assert (await auth("validate_key", api_key=old["api_key"]))["key_id"] == old["id"]  # cached till its expiry
    await wait_until(lambda: _refused(auth, old["api_key"]), 3.0, message="the old key outlived its overlap")
    assert time.time() >= stops - 0.05  # not before its time
    assert time.time() < stops + 1.0
    assert (await auth("validate_key", api_key=new["api_key"]))["key_id"] == new["id"]


async def test_rotation_never_extends_a_key(auth):
    token = await auth.user("ugo")
    old = await auth("create_key", token=token, name="short-lived", expires_in_days=1)
    new = await auth("rotate_key", token=token, key_id=old["id"], overlap_seconds=30 * 86_400)
    assert new["old_key"]["expires_at"] == old["expires_at"] == new["expires_at"]
    default = await auth("create_key", token=token, name="default overlap")
    rotated = await auth("rotate_key", token=token, key_id=default["id"])
    left = datetime.fromisoformat(rotated["old_key"]["expires_at"]).timestamp() - time.time()
    assert 86_400 - 60 < left <= 86_400  # 24 hours unless told otherwise


async def test_rotation_refusals(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack:
        auth = await start_auth(stack, tmp_path, pg_dsn, max_keys_per_user=2)
        owner, thief = await auth.user("vera"), await auth.user("wim")
        key = await auth("create_key", token=owner, name="k")
        for bad in (-1, 30 * 86_400 + 1, 2**63, True, 1.5, "60", None):
            with pytest.raises(InvalidParams) as info:
                await auth("rotate_key", token=owner, key_id=key["id"], overlap_seconds=bad)
            assert info.value.data.get("param", "overlap_seconds") == "overlap_seconds"
        for bad_id in (0, -1, 2**63, "1"):
            with pytest.raises(InvalidParams):
                await auth("rotate_key", token=owner, key_id=bad_id)
        for key_id in (key["id"], 424242):  # someone else's key is no key at all
            with pytest.raises(NotFound):
                await auth("rotate_key", token=thief, key_id=key_id)
        with pytest.raises(Unauthenticated):
            await auth("rotate_key", token="not a token", key_id=key["id"])
        # A live successor: rotating again is a conflict naming it (a double submit makes one key).
        new = await auth("rotate_key", token=owner, key_id=key["id"], overlap_seconds=600)
        with pytest.raises(Conflict) as info:
            await auth("rotate_key", token=owner, key_id=key["id"])
        assert info.value.data == {"param": "key_id", "status": "rotated", "successor": new["id"]}
        # Two live keys (the old one in its overlap, the new): the limit holds.
        with pytest.raises(Conflict, match="live keys"):
            await auth("rotate_key", token=owner, key_id=new["id"])
        # Revoking the successor undoes the rotation: the old key (still in its overlap) may be rotated again.
        await auth("revoke_key", token=owner, key_id=new["id"])
        again = await auth("rotate_key", token=owner, key_id=key["id"], overlap_seconds=0)
        assert again["rotated_from"] == key["id"] and again["old_key"]["status"] == "expired"
        await auth("revoke_key", token=owner, key_id=again["id"])
        with pytest.raises(Conflict) as info:
            await auth("rotate_key", token=owner, key_id=again["id"])
        assert info.value.data["status"] == "revoked" and info.value.data["param"] == "key_id"
        expired = await auth("create_key", token=owner, name="old")
        await db.execute("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1",
                         expired["id"])
        with pytest.raises(Conflict) as info:
            await auth("rotate_key", token=owner, key_id=expired["id"])
        assert info.value.data["status"] == "expired"
        with pytest.raises(Conflict) as info:  # the key the second rotation expired
            await auth("rotate_key", token=owner, key_id=key["id"])
        assert info.value.data["status"] == "expired"
        assert await db.fetchval("SELECT count(*) FROM audit_log WHERE event = 'key_rotated'") == 2
        assert await db.fetchval("SELECT count(*) FROM api_keys WHERE rotated_from IS NOT NULL") == 2


# -- administration ----------------------------------------------------------------------------


async def test_set_tier_is_for_admins_and_takes_effect_at_once(auth, db):
    user_token = await auth.user("victor")
    admin_token = await auth.admin("root")
    key = await auth("create_key", token=user_token, name="k")
    assert (await auth("validate_key", api_key=key["api_key"]))["tier"] == "free"
    with pytest.raises(Forbidden):
        await auth("set_tier", token=user_token, user="victor", tier="unlimited")
    changed = await auth("set_tier", token=admin_token, user="victor", tier="pro")
    assert changed["tier"] == "pro"
    answer = await auth("validate_key", api_key=key["api_key"])
    assert answer["tier"] == "pro" and answer["limits"]["requests_per_hour"] == 1000 and answer["priority"] == 1
    assert (await auth("set_tier", token=admin_token, user=changed["id"], tier="unlimited"))["tier"] == "unlimited"
    answer = await auth("validate_key", api_key=key["api_key"])
    assert answer["limits"]["requests_per_month"] is None
    events = await db.fetch("SELECT details, actor_id FROM audit_log WHERE event = 'tier_changed' ORDER BY id")
    assert len(events) == 2 and all(e["actor_id"] != changed["id"] for e in events)
    with pytest.raises(NotFound):
        await auth("set_tier", token=admin_token, user="nobody", tier="pro")
    for bad in ({"tier": "platinum"}, {"tier": 1}, {"tier": "PRO"}):
        with pytest.raises(InvalidParams):
            await auth("set_tier", token=admin_token, user="victor", **bad)
    for bad_user in (None, 0, 2**64 - 1, "", HUGE, 1.5):
        with pytest.raises(InvalidParams):
            await auth("set_tier", token=admin_token, user=bad_user, tier="pro")
    assert (await auth("login", username_or_email="root", password=PASSWORD))["user"]["is_admin"]


async def test_disabled_user_loses_keys_and_sessions(auth):
    user_token = await auth.user("wendy")
    admin_token = await auth.admin("root")
    key = await auth("create_key", token=user_token, name="k")
    await auth("validate_key", api_key=key["api_key"])
    with pytest.raises(Forbidden):
        await auth("set_active", token=user_token, user="wendy", active=False)
    await auth("set_active", token=admin_token, user="wendy", active=False)
    with pytest.raises(Unauthenticated):
        await auth("validate_key", api_key=key["api_key"])
    with pytest.raises(Unauthenticated):
        await auth("me", token=user_token)
    with pytest.raises(Forbidden):
        await auth("login", username_or_email="wendy", password=PASSWORD)
    with pytest.raises(Conflict):
        await auth("set_active", token=admin_token, user="root", active=False)
    await auth("set_active", token=admin_token, user="wendy", active=True)
    assert (await auth("validate_key", api_key=key["api_key"]))["key_id"] == key["id"]


async def test_invalidations_log(auth):
    token = await auth.user("xena")
    start = await auth("invalidations")
    assert start == {"cursor": 0, "entries": [], "reset": False, "more": False}
    keys = [await auth("create_key", token=token, name=f"k{i}") for i in range(3)]
    for key in keys:
        await auth("revoke_key", token=token, key_id=key["id"])
    answer = await auth("invalidations", since=0)
    assert [e["key_id"] for e in answer["entries"]] == [k["id"] for k in keys]
    assert answer["cursor"] == answer["entries"][-1]["seq"] and not answer["reset"]
    page = await auth("invalidations", since=0, limit=2)
    assert page["more"] and page["cursor"] == page["entries"][-1]["seq"]
    assert (await auth("invalidations", since=answer["cursor"]))["entries"] == []
    assert (await auth("invalidations", since=answer["cursor"] + 100))["reset"]
    for bad in ({"since": -1}, {"since": "0"}, {"since": 2**64 - 1}, {"limit": 0}):
        with pytest.raises(InvalidParams):
            await auth("invalidations", **bad)


# -- usage --------------------------------------------------------------------------------------


def _record(request_id: str, user_id: int, key_id: int | None, **extra) -> dict:
    return {"request_id": request_id, "user_id": user_id, "key_id": key_id, "model": "smollm2-135m",
            "prompt_hash": hashlib.sha256(request_id.encode()).hexdigest(), "prompt_tokens": 10,
            "completion_tokens": 5, "cached": False, "latency_ms": 12, "status": "ok",
            "worker": "inference-1", **extra}


async def test_usage_is_recorded_once_and_aggregated_per_day_and_key(auth, db):
    token = await auth.user("yara")
    user_id = (await auth("me", token=token))["id"]
    k1 = (await auth("create_key", token=token, name="one"))["id"]
    k2 = (await auth("create_key", token=token, name="two"))["id"]
    yesterday = time.time() - 86_400
    batch = [
        _record("r1", user_id, k1),
        _record("r2", user_id, k1, cached=True),
        _record("r3", user_id, k2, status="error", completion_tokens=0),
        _record("r4", user_id, None),
        _record("r5", user_id, k1, at=yesterday),
        _record("r1", user_id, k1),  # the same request twice in one batch
    ]
    assert await auth("record_usage", batch=batch) == {"inserted": 5, "duplicates": 0, "rejected": 0}
    assert await auth("record_usage", batch=batch) == {"inserted": 0, "duplicates": 5, "rejected": 0}
    # Retried concurrently, by several gateways at once: still once.
    again = await asyncio.gather(*(auth("record_usage", batch=batch) for _ in range(5)))
    assert all(a["inserted"] == 0 for a in again)
    assert await db.fetchval("SELECT count(*) FROM usage") == 5
    report = await auth("usage", token=token)
    assert report["totals"] == {"requests": 5, "prompt_tokens": 50, "completion_tokens": 20,
                                "tokens": 70, "errors": 1, "cache_hits": 1,
                                "cost": {}, "unpriced": 5}  # no model has a price (tests/test_prices.py)
    today = date.today().isoformat()
    rows = {(d["day"], d["key_id"]): d for d in report["days"]}
    assert rows[(today, k1)]["requests"] == 2 and rows[(today, k1)]["cache_hits"] == 1
    assert rows[(today, k2)]["errors"] == 1 and rows[(today, None)]["requests"] == 1
    one_day = await auth("usage", token=token, start=today, end=today)
    assert one_day["totals"]["requests"] == 4
    prompts = await db.fetch("SELECT prompt_hash FROM usage")
    assert all(len(p["prompt_hash"]) == 64 for p in prompts)


async def test_usage_rejects_unknown_users_and_foreign_keys(auth):
    a = await auth.user("zack")
    b = await auth.user("zoe")
    a_id = (await auth("me", token=a))["id"]
    b_key = (await auth("create_key", token=b, name="k"))["id"]
    batch = [_record("x1", 424242, None), _record("x2", a_id, b_key), _record("x3", a_id, None)]
    assert await auth("record_usage", batch=batch) == {"inserted": 1, "duplicates": 0, "rejected": 2}
    assert await auth("record_usage", batch=[]) == {"inserted": 0, "duplicates": 0, "rejected": 0}


BAD_RECORD_CHANGES = [
        {"request_id": ""}, {"request_id": HUGE}, {"request_id": 5}, {"request_id": "é"},
        {"user_id": "1"}, {"user_id": -1}, {"user_id": 2**64 - 1}, {"user_id": None},
        {"key_id": 1.0}, {"model": ""}, {"model": None}, {"prompt_tokens": -1},
        {"prompt_tokens": 2**40}, {"completion_tokens": "5"}, {"cached": 1}, {"latency_ms": -5},
        {"status": "OK; DROP"}, {"status": ""}, {"prompt_hash": "what is the meaning of life?"},
        {"prompt": "never the prompt"}, {"at": "yesterday"}, {"at": 0}, {"at": float("nan")},
        {"worker": HUGE},
]


async def test_record_usage_refuses_bad_records(auth, db):
    token = await auth.user("adam")
    user_id = (await auth("me", token=token))["id"]
    for change in BAD_RECORD_CHANGES:
        with pytest.raises(InvalidParams) as info:
            await auth("record_usage", batch=[_record("ok-1", user_id, None), {**_record("bad", user_id, None), **change}])
        assert info.value.data["index"] == 1
    assert await db.fetchval("SELECT count(*) FROM usage") == 0


async def test_record_usage_refuses_bad_batches(auth):
    for batch in ({"request_id": "x"}, "batch", None, [1, 2], [_record(str(i), 1, None) for i in range(1001)]):
        with pytest.raises(InvalidParams):
            await auth("record_usage", batch=batch)


BAD_RANGES = [{"start": "yesterday"}, {"start": "2024-13-01"}, {"end": HUGE}, {"start": 20240101},
     {"start": "2024-02-01", "end": "2024-01-01"}, {"start": "2020-01-01", "end": "2024-01-01"},
     {"start": "2024-01-01'; --"}, {"start": "２０２４-01-01"}]


async def test_usage_refuses_bad_ranges(auth):
    token = await auth.user("beth")
    for params in BAD_RANGES:
        with pytest.raises(InvalidParams):
            await auth("usage", token=token, **params)


# -- when the database or the invalidation log cannot be reached ----------------------------------


async def test_an_unreachable_database_is_unavailable_not_internal():
    from shared.errors import Unavailable
    from services.auth.store import AuthStore
    from services.auth.usage_store import UsageStore

    pool = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:9/none", min_size=0, max_size=1)
    try:
        with pytest.raises(Unavailable):
            await AuthStore(pool).user_by_id(1)
        with pytest.raises(Unavailable):
            await UsageStore(pool).daily(1, date.today(), date.today())
    finally:
        await pool.close()


async def test_an_instance_that_cannot_sync_stops_trusting_its_cache(auth):
    token = await auth.user("cleo")
    key = await auth("create_key", token=token, name="k")
    feed = auth.service.feed
    await feed.pause_polling()  # as if every poll failed from now on
    store = auth.service.store
    original, lookups = store.key_by_hash, 0

    async def counting(key_hash):
        nonlocal lookups
        lookups += 1
        return await original(key_hash)

    store.key_by_hash = counting
    await auth("validate_key", api_key=key["api_key"])
    await auth("validate_key", api_key=key["api_key"])
    assert lookups == 1  # trusted: from memory
    feed.synced_at = time.monotonic() - feed.stale_after - 0.01
    for expected in (2, 3):
        await auth("validate_key", api_key=key["api_key"])
        assert lookups == expected  # untrusted: the database, every call
