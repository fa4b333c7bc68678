"""Tiers stored in PostgreSQL (`auth.tiers`, `auth.set_tier_limits`), against a real database:
the seeded defaults, the environment's token budgets for rows never edited, every refusal
naming its field, the audit, and the change reaching validation -- on the instance that made
it at once, on another instance and a gateway's `KeyValidator` through the invalidation log."""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack

import pytest

from shared.config import load
from shared.errors import Forbidden, InvalidParams, Unauthenticated
from shared.tiers import TierConfig
from services.auth.client import AuthClient, KeyValidator
from auth_support import Calls, start_auth
from test_auth_rpc import Mesh
from waiting import wait_until

pytestmark = pytest.mark.db

_ENV = {"INFERSWARM_TIER_FREE_TOKENS_PER_MONTH": "5000", "INFERSWARM_TIER_PRO_TOKENS_PER_MONTH": "none"}


@pytest.fixture
async def auth(pg_dsn, tmp_path) -> Calls:
    async with AsyncExitStack() as stack:
        yield await start_auth(stack, tmp_path, pg_dsn, tiers=load(TierConfig, _ENV))


def _by_name(tiers: list[dict]) -> dict[str, dict]:
    return {t["name"]: t for t in tiers}


async def test_defaults_are_seeded_and_the_environment_sets_unedited_token_budgets(auth, db):
    rows = {r["name"]: dict(r) for r in await db.fetch("SELECT * FROM tiers")}
    assert set(rows) == {"free", "pro", "enterprise", "unlimited"}
    assert (rows["free"]["requests_per_hour"], rows["free"]["requests_per_month"], rows["free"]["tokens_per_month"],
            rows["free"]["priority"], rows["free"]["updated_at"]) == (100, 3000, 100_000, 0, None)
    assert rows["unlimited"]["requests_per_month"] is None and rows["unlimited"]["spend_per_month"] is None
    tiers = _by_name(await auth("tiers"))  # the operator (in-process): no token
    assert list(tiers) == ["free", "pro", "enterprise", "unlimited"]
    assert tiers["free"] == {"name": "free", "priority": 0, "edited": False, "limits": {
        "requests_per_hour": 100, "requests_per_month": 3000, "tokens_per_month": 5000,  # the environment's
        "spend_per_day": None, "spend_per_month": None}}
    assert tiers["pro"]["limits"]["tokens_per_month"] is None  # "none" in the environment
    assert tiers["enterprise"]["limits"]["tokens_per_month"] == 10_000_000  # not set: the seeded default
    token = await auth.user("anna")
    assert _by_name(await auth("tiers", token=token)) == tiers  # anyone logged in
    me = await auth("me", token=token)
    assert me["limits"]["tokens_per_month"] == 5000 and me["limits"]["spend_per_day"] is None


async def test_an_edited_tier_keeps_its_values_whatever_the_environment(auth, db, pg_dsn, tmp_path):
    admin = await auth.admin("root")
    tier = await auth("set_tier_limits", token=admin, name="free", limits={"requests_per_hour": 50})
    # The edit wrote the budget in effect (the environment's) with it: from now on the row rules.
    assert tier["edited"] and tier["limits"]["tokens_per_month"] == 5000
    assert await db.fetchval("SELECT tokens_per_month FROM tiers WHERE name = 'free'") == 5000
    async with AsyncExitStack() as stack:  # another instance, another environment
        other = await start_auth(stack, tmp_path / "b", pg_dsn,
                                 tiers=load(TierConfig, {"INFERSWARM_TIER_FREE_TOKENS_PER_MONTH": "7",
                                                         "INFERSWARM_TIER_PRO_TOKENS_PER_MONTH": "7"}))
        tiers = _by_name(await other("tiers"))
        assert tiers["free"]["limits"]["tokens_per_month"] == 5000  # edited: the row
        assert tiers["pro"]["limits"]["tokens_per_month"] == 7  # never edited: this instance's environment


async def test_set_tier_limits_checks_every_field(auth):
    admin = await auth.admin("root")
    bad = [
        ({"name": "gold", "limits": {"requests_per_hour": 1}}, "name"),
        ({"name": "free", "limits": {"requests_per_hour": 1.5}}, "requests_per_hour"),
        ({"name": "free", "limits": {"requests_per_hour": -1}}, "requests_per_hour"),
        ({"name": "free", "limits": {"tokens_per_month": 10**12 + 1}}, "tokens_per_month"),
        ({"name": "free", "limits": {"requests_per_month": True}}, "requests_per_month"),
        ({"name": "free", "limits": {"requests_per_month": "100"}}, "requests_per_month"),
        ({"name": "free", "limits": {"spend_per_day": 1.5}}, "spend_per_day"),
        ({"name": "free", "limits": {"spend_per_day": "1.1234567"}}, "spend_per_day"),
        ({"name": "free", "limits": {"spend_per_month": "1000000000.01"}}, "spend_per_month"),
        ({"name": "free", "limits": {"spend_per_month": "-1"}}, "spend_per_month"),
        ({"name": "free", "limits": {"spend_per_month": "1e3"}}, "spend_per_month"),
        ({"name": "free", "limits": {"requests_per_day": 5}}, "requests_per_day"),
        ({"name": "free", "limits": {}}, "limits"),
        ({"name": "free", "limits": {}, "priority": 10}, "priority"),
        ({"name": "free", "limits": {}, "priority": -1}, "priority"),
    ]
    for params, param in bad:
        with pytest.raises(InvalidParams) as refused:
            await auth("set_tier_limits", token=admin, **params)
        assert refused.value.data["param"] == param, params
    tier = await auth("set_tier_limits", token=admin, name="pro", priority=9, limits={
        "spend_per_day": "12.5", "spend_per_month": 1000, "requests_per_month": None, "tokens_per_month": 10**12})
    assert tier["priority"] == 9 and tier["limits"] == {
        "requests_per_hour": 1000, "requests_per_month": None, "tokens_per_month": 10**12,
        "spend_per_day": "12.50", "spend_per_month": "1000.00"}


async def test_only_admins_and_the_operator_may_set_limits(auth):
    user = await auth.user("bea")
    with pytest.raises(Forbidden):
        await auth("set_tier_limits", token=user, name="free", limits={"requests_per_hour": 1})
    with pytest.raises(Unauthenticated):
        await auth("set_tier_limits", token="not-a-token", name="free", limits={"requests_per_hour": 1})
    operator = await auth("set_tier_limits", name="free", limits={"requests_per_hour": 1})  # in-process
    assert operator["limits"]["requests_per_hour"] == 1


async def test_a_change_is_audited_and_logged_once(auth, db):
    admin = await auth.admin("root")
    admin_id = await db.fetchval("SELECT id FROM users WHERE username = 'root'")
    await auth("set_tier_limits", token=admin, name="enterprise", limits={"spend_per_month": "99.5",
                                                                        "requests_per_hour": 10_000})
    rows = await db.fetch("SELECT user_id, actor_id, details FROM audit_log WHERE event = 'tier_changed'")
    assert len(rows) == 1 and rows[0]["user_id"] is None and rows[0]["actor_id"] == admin_id
    assert json.loads(rows[0]["details"]) == {  # requests_per_hour was already 10 000: no change
        "tier": "enterprise", "by": "admin", "from": {"spend_per_month": None},
        "to": {"spend_per_month": "99.50"}}
    logged = await db.fetch("SELECT key_id, user_id, reason FROM invalidations WHERE reason LIKE 'tier%'")
    assert [tuple(r) for r in logged] == [(None, None, "tier_limits_changed")]
    # The same values again change nothing: no audit, no invalidation.
    await auth("set_tier_limits", token=admin, name="enterprise", limits={"spend_per_month": "99.500000"})
    assert await db.fetchval("SELECT count(*) FROM invalidations WHERE reason LIKE 'tier%'") == 1
    # The operator's change, as the audit shows it (its token-ish field name is not redacted).
    await auth("set_tier_limits", name="free", limits={"tokens_per_month": 42})
    event = (await auth("audit", action="tier_changed", limit=1))["events"][0]
    assert event["actor"] == "operator" and event["user"] is None
    assert event["details"]["to"] == {"tokens_per_month": 42} and event["details"]["from"] == {"tokens_per_month": 5000}


async def test_validation_reflects_a_change_on_this_instance_at_once_and_on_another_within_a_second(
        auth, pg_dsn, tmp_path):
    token = await auth.user("cleo")
    key = (await auth("create_key", token=token, name="k"))["api_key"]
    async with AsyncExitStack() as stack:
        other = await start_auth(stack, tmp_path, pg_dsn, tiers=load(TierConfig, _ENV))  # same JWT key
        for instance in (auth, other):  # cached on both
            assert (await instance("validate_key", api_key=key))["limits"]["requests_per_month"] == 3000
        await auth("set_tier_limits", name="free", limits={"requests_per_month": 7}, priority=4)
        answer = await auth("validate_key", api_key=key)
        assert (answer["limits"]["requests_per_month"], answer["priority"]) == (7, 4)
        began = time.monotonic()
        await wait_until(lambda: _limit(other, key), 1.0, message="the other instance kept the old limit")
        assert time.monotonic() - began <= 1.0
        assert (await other("me", token=token))["limits"]["requests_per_month"] == 7


async def _limit(instance: Calls, key: str) -> bool:
    return (await instance("validate_key", api_key=key))["limits"]["requests_per_month"] == 7


async def test_a_gateway_validator_drops_everything_on_a_tier_change(auth, pg_dsn, tmp_path):
    """A `KeyValidator` (what gateways use) over real CurveZMQ: the entry naming neither key
    nor user empties its caches, and the next answer carries the new limits."""
    token = await auth.user("dora")
    key = (await auth("create_key", token=token, name="k"))["api_key"]
    async with AsyncExitStack() as stack:
        mesh = Mesh(stack)
        await mesh.serve(auth)
        client = await mesh.client()  # the mesh's own key: the operator
        validator = await stack.enter_async_context(KeyValidator(client, poll_interval=0.05))
        assert (await validator.validate(key))["limits"]["tokens_per_month"] == 5000
        assert len(validator.cache) == 1
        await AuthClient(client("auth")).set_tier_limits(name="free", limits={"tokens_per_month": 9})
        await wait_until(lambda: len(validator.cache) == 0, 1.0, message="the validator kept its answer")
        assert (await validator.validate(key))["limits"]["tokens_per_month"] == 9
