"""Per-key limits and per-user budgets (`auth.create_key`/`update_key` `limits`, `auth.set_budget`,
`auth.me`, `auth.validate_key`'s `scopes`), against a real PostgreSQL: what is stored, audited and
logged, the tighter-of rule, the cache dropped on a change, and every refusal naming its field."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from decimal import Decimal

import pytest

from shared.errors import Forbidden, InvalidParams, NotFound
from shared.tiers import TierConfig
from auth_support import Calls, start_auth
from services.auth.limits import check_money, effective, money_text

pytestmark = pytest.mark.db

NO_LIMITS = dict.fromkeys(("requests_per_hour", "requests_per_month", "tokens_per_month", "spend_per_day",
                           "spend_per_month"))
FREE = {"requests_per_hour": 100, "requests_per_month": 3_000, "tokens_per_month": 100_000}


@pytest.fixture
async def auth(pg_dsn, tmp_path) -> Calls:
    async with AsyncExitStack() as stack:
        yield await start_auth(stack, tmp_path, pg_dsn, currency="EUR",
                               tiers=TierConfig(free_tokens=100_000))


async def _audit(db, event: str) -> list[dict]:
    rows = await db.fetch("SELECT details FROM audit_log WHERE event = $1 ORDER BY id", event)
    return [json.loads(r["details"]) for r in rows]


async def test_a_key_created_with_limits_carries_them_to_validation(auth, db):
    token = await auth.user("lena")
    key = await auth("create_key", token=token, name="ci",
                     limits={"requests_per_hour": 5, "tokens_per_month": 0, "spend_per_month": "1.5"})
    assert key["limits"] == {**NO_LIMITS, "requests_per_hour": 5, "tokens_per_month": 0, "spend_per_month": "1.50"}
    assert (await auth("list_keys", token=token))[0]["limits"] == key["limits"]
    row = await db.fetchrow("SELECT requests_per_hour, tokens_per_month, spend_per_month FROM api_keys")
    assert tuple(row) == (5, 0, Decimal("1.5"))
    assert (await _audit(db, "key_created"))[0]["limits"] == {"requests_per_hour": 5, "tokens_per_month": 0,
                                                              "spend_per_month": "1.50"}
    answer = await auth("validate_key", api_key=key["api_key"])
    user_id = answer["user_id"]
    assert answer["currency"] == "EUR"
    # The key's limit may be looser than the tier's (5 < 100 here, but 0 < 100000 too): both scopes are
    # enforced; the user scope is the tier's alone (no budget yet).
    assert answer["limits"] == {**NO_LIMITS, **FREE}
    assert answer["scopes"] == [
        {"scope": "user", "id": user_id, "limits": {**NO_LIMITS, **FREE}},
        {"scope": "key", "id": key["id"], "limits": key["limits"]},
    ]
    # A key without limits of its own has the user scope alone; a rotation's successor keeps them.
    plain = await auth("create_key", token=token, name="plain")
    assert plain["limits"] == NO_LIMITS
    assert [s["scope"] for s in (await auth("validate_key", api_key=plain["api_key"]))["scopes"]] == ["user"]
    new = await auth("rotate_key", token=token, key_id=key["id"], overlap_seconds=0)
    assert new["limits"] == key["limits"]
    assert (await auth("validate_key", api_key=new["api_key"]))["scopes"][1]["limits"] == key["limits"]


async def test_editing_limits_is_audited_logged_and_seen_at_once(auth, db):
    token = await auth.user("milo")
    key = await auth("create_key", token=token, name="k", limits={"requests_per_hour": 5, "spend_per_day": "2"})
    assert (await auth("validate_key", api_key=key["api_key"]))["scopes"][1]["limits"]["requests_per_hour"] == 5
    assert len(auth.service.cache) == 1  # cached now: the edit must drop it
    updated = await auth("update_key", token=token, key_id=key["id"],
                         limits={"requests_per_hour": 7, "spend_per_day": None, "requests_per_month": 90})
    assert updated["limits"] == {**NO_LIMITS, "requests_per_hour": 7, "requests_per_month": 90}
    assert updated["name"] == "k"
    key_scope = (await auth("validate_key", api_key=key["api_key"]))["scopes"][1]
    assert key_scope["limits"] == updated["limits"]
    assert (await _audit(db, "key_updated"))[-1] == {"key_id": key["id"], "changed": {
        "requests_per_hour": {"from": 5, "to": 7}, "requests_per_month": {"from": None, "to": 90},
        "spend_per_day": {"from": "2.00", "to": None}}}
    assert await db.fetchval("SELECT count(*) FROM invalidations WHERE key_id = $1 AND reason = 'key_updated'",
                             key["id"]) == 1
    # Names left out are kept; the same value again changes nothing and logs nothing.
    again = await auth("update_key", token=token, key_id=key["id"], limits={"requests_per_hour": 7})
    assert again["limits"] == updated["limits"]
    assert len(await _audit(db, "key_updated")) == 1
    # Every limit cleared: the key scope is gone from the answer.
    await auth("update_key", token=token, key_id=key["id"],
               limits={"requests_per_hour": None, "requests_per_month": None})
    assert [s["scope"] for s in (await auth("validate_key", api_key=key["api_key"]))["scopes"]] == ["user"]


@pytest.mark.parametrize("limits, param", [
    ({"requests_per_day": 5}, "requests_per_day"),
    ({"requests_per_hour": -1}, "requests_per_hour"),
    ({"requests_per_hour": 10**12 + 1}, "requests_per_hour"),
    ({"requests_per_hour": "5"}, "requests_per_hour"),
    ({"requests_per_hour": True}, "requests_per_hour"),
    ({"tokens_per_month": 1.0}, "tokens_per_month"),
    ({"spend_per_day": 1.5}, "spend_per_day"),
    ({"spend_per_day": "-1"}, "spend_per_day"),
    ({"spend_per_day": "1e3"}, "spend_per_day"),
    ({"spend_per_day": "NaN"}, "spend_per_day"),
    ({"spend_per_month": "0.1234567"}, "spend_per_month"),
    ({"spend_per_month": "1000000000.01"}, "spend_per_month"),
    ({"spend_per_month": 10**9 + 1}, "spend_per_month"),
    ("5", "limits"),
])
async def test_limit_refusals_name_the_limit(auth, db, limits, param):
    token = await auth.user("nora")
    with pytest.raises(InvalidParams) as info:
        await auth("create_key", token=token, name="k", limits=limits)
    assert info.value.data["param"] == param
    key = await auth("create_key", token=token, name="ok")
    with pytest.raises(InvalidParams) as info:
        await auth("update_key", token=token, key_id=key["id"], limits=limits)
    assert info.value.data["param"] == param
    assert await db.fetchval("SELECT count(*) FROM api_keys") == 1
    assert not await _audit(db, "key_updated")


def test_money_is_exact_and_shown_with_cents():
    assert [money_text(v) for v in ("1.5", Decimal("1.500000"), 100, "0.123456", "0", None)] == \
        ["1.50", "1.50", "100.00", "0.123456", "0.00", None]
    assert check_money(10**9, "x") == Decimal(10**9) and check_money("0.000001", "x") == Decimal("0.000001")
    # The tighter of tier and user per counter; a tier's money limit (a Decimal or a string) is honoured.
    tier = {**FREE, "spend_per_day": Decimal("5"), "spend_per_month": "20"}
    assert effective(tier, {"spend_per_day": Decimal("7.25"), "spend_per_month": Decimal("3")}) == \
        {**FREE, "spend_per_day": "5.00", "spend_per_month": "3.00"}
    assert effective({"requests_per_hour": None}, {"spend_per_day": None}) == NO_LIMITS


async def test_a_budget_is_set_cleared_and_reaches_every_answer(auth, db):
    token = await auth.user("olga")
    key = await auth("create_key", token=token, name="k")
    before = await auth("validate_key", api_key=key["api_key"])
    assert before["scopes"][0]["limits"]["spend_per_month"] is None
    me = await auth("me", token=token)
    assert (me["budget"], me["currency"], me["limits"]) == (
        {"spend_per_day": None, "spend_per_month": None}, "EUR", {**NO_LIMITS, **FREE})
    account = await auth("set_budget", token=token, spend_per_month="10", spend_per_day=1)
    assert account["budget"] == {"spend_per_day": "1.00", "spend_per_month": "10.00"}
    assert account["limits"] == {**FREE, "spend_per_day": "1.00", "spend_per_month": "10.00"}
    assert account["username"] == "olga" and account["currency"] == "EUR"
    # The cached answer was dropped: the next validation has the budget, in both fields.
    after = await auth("validate_key", api_key=key["api_key"])
    assert after["limits"] == account["limits"] == after["scopes"][0]["limits"]
    assert (await auth("me", token=token))["budget"] == account["budget"]
    verified = await auth("verify_token", token=token)
    assert verified["scopes"] == [{"scope": "user", "id": verified["id"], "limits": account["limits"]}]
    assert (await _audit(db, "budget_changed")) == [
        {"from": {"spend_per_day": None, "spend_per_month": None}, "to": {"spend_per_day": "1.00",
                                                                          "spend_per_month": "10.00"}}]
    assert await db.fetchval("SELECT count(*) FROM invalidations WHERE user_id = $1 AND reason = 'budget_changed'",
                             verified["id"]) == 1
    # One left out is kept; null clears it.
    cleared = await auth("set_budget", token=token, spend_per_day=None)
    assert cleared["budget"] == {"spend_per_day": None, "spend_per_month": "10.00"}
    assert (await auth("validate_key", api_key=key["api_key"]))["limits"]["spend_per_day"] is None
    for params, param in [({}, "spend_per_day"), ({"spend_per_day": 0.5}, "spend_per_day"),
                          ({"spend_per_month": "1.0000001"}, "spend_per_month")]:
        with pytest.raises(InvalidParams) as info:
            await auth("set_budget", token=token, **params)
        assert info.value.data["param"] == param
    assert len(await _audit(db, "budget_changed")) == 2


async def test_the_tighter_of_tier_and_budget_per_counter(auth):
    token = await auth.user("petra")
    key = await auth("create_key", token=token, name="k", limits={"requests_per_hour": 500})
    await auth("set_budget", token=token, spend_per_day="0")
    answer = await auth("validate_key", api_key=key["api_key"])
    # The tier's counts stay (the user sets no counts); a budget of 0 is a limit, not "none".
    assert answer["limits"] == {**FREE, "spend_per_day": "0.00", "spend_per_month": None}
    # The key's 500 req/h is looser than the tier's 100: kept as set, both scopes are enforced.
    assert answer["scopes"][1]["limits"]["requests_per_hour"] == 500


async def test_an_admin_sets_another_users_budget_and_a_user_may_not(auth, db):
    admin = await auth.admin("root")
    user = await auth.user("quinn")
    other = await auth.user("rosa")
    key = await auth("create_key", token=user, name="k")
    await auth("validate_key", api_key=key["api_key"])  # cached
    account = await auth("set_budget", token=admin, user="quinn@example.com", spend_per_month="3.25")
    assert account["username"] == "quinn" and account["budget"]["spend_per_month"] == "3.25"
    assert (await auth("validate_key", api_key=key["api_key"]))["limits"]["spend_per_month"] == "3.25"
    row = await db.fetchrow("SELECT a.user_id, a.actor_id FROM audit_log a WHERE event = 'budget_changed'")
    assert (row["user_id"], row["actor_id"]) == (account["id"], (await auth("me", token=admin))["id"])
    # `auth.audit` knows the event: the user sees who changed their budget.
    events = (await auth("audit", token=user, action="budget_changed"))["events"]
    assert [(e["actor"], e["user"], e["details"]["to"]) for e in events] == [("root", "quinn",
                                                                             {"spend_per_month": "3.25"})]
    # A user naming someone else (by name, email or id) is refused; naming themselves is their own budget.
    for ref in ("quinn", "quinn@example.com", account["id"], "nobody"):
        with pytest.raises(Forbidden):
            await auth("set_budget", token=other, user=ref, spend_per_month="0")
    own = await auth("set_budget", token=other, user="ROSA", spend_per_day="2")
    assert own["username"] == "rosa" and own["budget"]["spend_per_day"] == "2.00"
    with pytest.raises(NotFound):
        await auth("set_budget", token=admin, user="nobody", spend_per_day="1")
    assert (await auth("me", token=user))["budget"]["spend_per_month"] == "3.25"
