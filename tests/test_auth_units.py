"""The auth building blocks without a database: passwords, tokens, keys, tiers, cache, config."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.config import ConfigError, load
from shared.errors import InvalidParams, Unauthenticated
from shared.tiers import TierConfig, TierTable, parse_limit
from services.auth import keys
from services.auth.cache import KeyCache
from services.auth.config import RETIRED_ADMIN_EMAILS, AuthConfig
from services.auth.passwords import PRODUCTION, Argon2Params, PasswordHasher
from services.auth.throttle import ThrottlePolicy
from services.auth.tokens import TokenIssuer, TokenVerifier, load_or_create_key
from services.auth.validation import check_email, check_password, common_passwords

pytestmark = pytest.mark.unit

CHEAP = Argon2Params(time_cost=1, memory_kib=8, parallelism=1)


async def test_production_argon2id_parameters_and_equal_cost_for_unknown_users():
    hasher = PasswordHasher(PRODUCTION)
    assert (PRODUCTION.time_cost, PRODUCTION.memory_kib, PRODUCTION.parallelism) == (3, 65536, 4)
    encoded = await hasher.hash("a long enough password")
    assert encoded.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert (await hasher.verify(encoded, "a long enough password")).ok
    assert not (await hasher.verify(encoded, "a wrong password")).ok

    async def cost(encoded_or_none) -> float:
        start = time.perf_counter()
        await hasher.verify(encoded_or_none, "a wrong password")
        return time.perf_counter() - start

    # Interleaved, and the fastest of each: other load on a shared 2-core box
    # only ever adds time, and hits both kinds alike.
    unknown_times, wrong_times = [], []
    for _ in range(3):
        unknown_times.append(await cost(None))
        wrong_times.append(await cost(encoded))
    unknown, wrong = min(unknown_times), min(wrong_times)
    assert 0.5 < unknown / wrong < 2.0  # the dummy hash costs what a real one does


async def test_hashing_runs_off_the_event_loop():
    hasher = PasswordHasher(PRODUCTION, concurrency=1)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    await hasher.hash("a long enough password")
    task.cancel()
    assert ticks >= 3  # the loop kept running while argon2 worked


async def test_rehash_is_offered_when_parameters_change():
    old = await PasswordHasher(CHEAP).hash("password one two")
    stronger = PasswordHasher(Argon2Params(time_cost=2, memory_kib=16, parallelism=1))
    verdict = await stronger.verify(old, "password one two")
    assert verdict.ok and verdict.new_hash and "m=16,t=2" in verdict.new_hash
    assert (await stronger.verify(verdict.new_hash, "password one two")).new_hash is None
    assert not (await stronger.verify("not a hash", "password one two")).ok


def _issuer(ttl: float = 60.0, key: Ed25519PrivateKey | None = None) -> TokenIssuer:
    return TokenIssuer(key or Ed25519PrivateKey.generate(), issuer="iss", audience="aud", ttl=ttl)


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_tokens_verify_and_forgeries_fail():
    key = Ed25519PrivateKey.generate()  # the test keeps the signing key it gave the issuer
    issuer = _issuer(key=key)
    token, expires = issuer.issue("42")
    claims = issuer.verify(token)
    assert claims["sub"] == "42" and claims["exp"] == expires and claims["jti"]
    header, payload, signature = token.split(".")
    forged = [
        _issuer().issue("42")[0],  # another key
        f"{_b64({'alg': 'none'})}.{payload}.",
        f"{header}.{_b64({**claims, 'sub': '1'})}.{signature}",
        jwt.encode(claims, "k" * 32, algorithm="HS256"),  # HMAC instead of EdDSA
        TokenIssuer(Ed25519PrivateKey.generate(), issuer="iss", audience="other", ttl=60).issue("42")[0],
        jwt.encode({k: v for k, v in claims.items() if k != "jti"}, key, algorithm="EdDSA"),
        _issuer(ttl=-60).issue("42")[0],
        "", "x" * 5000, "a.b.c", None, 7,
    ]
    verifier = TokenVerifier(issuer.public_pem, issuer="iss", audience="aud")
    assert verifier.verify(token)["sub"] == "42"
    for bad in forged:
        with pytest.raises(Unauthenticated):
            verifier.verify(bad)
    with pytest.raises(Unauthenticated, match="expired"):
        issuer.verify(_issuer(ttl=-60, key=key).issue("42")[0])


def test_signing_key_is_private_and_reused(tmp_path):
    path = tmp_path / "auth" / "jwt.pem"
    key = load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(path).private_bytes_raw() == key.private_bytes_raw()


def test_api_keys_have_prefix_entropy_and_a_sha256_hash():
    made = {keys.generate_key() for _ in range(1000)}
    assert len(made) == 1000
    key = made.pop()
    assert key.startswith("isk_") and len(key) == 4 + 43 and keys.looks_like_key(key)
    assert len(keys.hash_key(key)) == 32 and keys.same_hash(keys.hash_key(key), keys.hash_key(key))
    assert keys.display_prefix(key) == key[:8]
    for bad in ("", "isk_", "isk_" + "a" * 39, "isk_" + "a" * 200, "ISK_" + "a" * 43, "isk_" + "a" * 42 + "=", 5, None):
        assert not keys.looks_like_key(bad)


def test_tier_table_matches_the_brief_and_budgets_are_configurable():
    tiers = TierTable()
    assert [(t, tiers[t].requests_per_hour, tiers[t].requests_per_month) for t in tiers.names()] == [
        ("free", 100, 3000), ("pro", 1000, 30000), ("enterprise", 10000, 300000), ("unlimited", 1_000_000, None)]
    assert [tiers[t].priority for t in tiers.names()] == [0, 1, 2, 3]
    assert tiers["gone-tier"].name == "free"
    config = load(TierConfig, {"INFERSWARM_TIER_PRO_TOKENS_PER_MONTH": "2_000_000",
                               "INFERSWARM_TIER_FREE_TOKENS_PER_MONTH": "none"})
    assert TierTable(config)["pro"].tokens_per_month == 2_000_000
    assert TierTable(config)["free"].tokens_per_month is None
    with pytest.raises(ValueError):
        parse_limit("-5")


def test_password_rules():
    assert len(common_passwords()) > 100 and "password123" in common_passwords()
    check_password("a perfectly fine passphrase")
    for bad in ("short", "12345678", "Password1", "x" * 1025, "y" * 5000):
        with pytest.raises(InvalidParams) as info:
            check_password(bad)
        assert bad not in info.value.message
    with pytest.raises(InvalidParams):
        check_password("alice@example.com", email="alice@example.com")
    assert check_email("  bob@example.com ") == "bob@example.com"


def test_throttle_delays_double_after_free_failures_up_to_a_cap():
    policy = ThrottlePolicy(base_delay=1, max_delay=60)
    assert [policy.delay(n, 3) for n in range(1, 10)] == [0, 0, 0, 1, 2, 4, 8, 16, 32]
    assert policy.delay(1000, 3) == 60


def test_key_cache_evicts_by_key_user_expiry_age_and_size():
    cache = KeyCache(ttl=10, max_entries=3)
    for i in range(3):
        cache.put(bytes([i]) * 32, {"i": i}, user_id=i % 2, key_id=i, expires_at=None)
    assert cache.get(b"\x01" * 32).result == {"i": 1}
    epoch = cache.epoch
    assert cache.evict(user_id=0) == 2 and cache.epoch == epoch + 1
    assert cache.get(b"\x00" * 32) is None and cache.get(b"\x01" * 32) is not None
    assert cache.evict(key_id=1) == 1 and len(cache) == 0
    cache.put(b"e" * 32, {}, user_id=5, key_id=5, expires_at=time.time() - 1)
    assert cache.get(b"e" * 32) is None
    for i in range(5):
        cache.put(bytes([i]) * 32, {}, user_id=9, key_id=i, expires_at=None)
    assert len(cache) == 3 and cache.get(b"\x00" * 32) is None
    aged = KeyCache(ttl=0.0)
    aged.put(b"a" * 32, {}, user_id=1, key_id=1, expires_at=None)
    time.sleep(0.001)  # kept (the behaviour): older than its ttl of 0
    assert aged.get(b"a" * 32) is None


def test_config_from_environment(tmp_path):
    config = load(AuthConfig, {
        "INFERSWARM_DATA_DIR": str(tmp_path), "INFERSWARM_ADMIN_EMAILS": "",
        "INFERSWARM_ARGON2_MEMORY_KIB": "131072", "INFERSWARM_TOKEN_TTL": "600",
        "DATABASE_URL": "postgresql://u:secretpw@h/db",
    })
    assert config.argon2.memory_kib == 131072 and not hasattr(config, "admin_emails")
    assert config.jwt_key_path == tmp_path / "auth" / "jwt_ed25519.pem"
    assert "secretpw" not in repr(config)
    with pytest.raises(ConfigError) as info:
        load(AuthConfig, {"INFERSWARM_TOKEN_TTL": "-1", "INFERSWARM_ARGON2_TIME_COST": "abc"})
    assert len(info.value.problems) == 2
    with pytest.raises(ConfigError):
        load(AuthConfig, {"INFERSWARM_AUTH_POLL_INTERVAL": "2", "INFERSWARM_AUTH_STALE_AFTER": "1"})
    # Retired: a deployment that still lists admin emails is stopped, and told what replaced it.
    with pytest.raises(ConfigError) as info:
        load(AuthConfig, {"INFERSWARM_ADMIN_EMAILS": "a@x.org"})
    assert info.value.problems == [f"INFERSWARM_ADMIN_EMAILS: {RETIRED_ADMIN_EMAILS}"]
    assert "inferswarm admin grant" in RETIRED_ADMIN_EMAILS
    # The usage retention: unset or 0 keeps for ever; 1 would drop a month records may still arrive for.
    assert config.usage_retention_months == 0
    assert load(AuthConfig, {"INFERSWARM_USAGE_RETENTION_MONTHS": "13"}).usage_retention_months == 13
    for refused in ("1", "-2", "x"):
        with pytest.raises(ConfigError) as info:
            load(AuthConfig, {"INFERSWARM_USAGE_RETENTION_MONTHS": refused})
        assert info.value.problems[0].startswith("INFERSWARM_USAGE_RETENTION_MONTHS: ")
