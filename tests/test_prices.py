"""Prices per model and the cost of every usage record, on a real PostgreSQL (issue 18, part 3).

Costs are checked exactly, as `Decimal`s, at the price in force at each
record's moment; authorisation over real CurveZMQ (an outsider, a user, an
admin, a member of another role, the operator).
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import asyncpg
import pytest

from shared.db import apply_migrations
from shared.errors import Conflict, Forbidden, InvalidParams, Unauthenticated
from services.auth.app import MIGRATIONS
from services.auth.prices import cost_of
from auth_support import Auth, Calls, outsider, start_auth

MODEL = "qwen2.5:0.5b"


def _record(request_id: str, user_id: int, at: float | None = None, **extra) -> dict:
    return {"request_id": request_id, "user_id": user_id, "model": MODEL, "prompt_tokens": 1000,
            "completion_tokens": 500, "cached": False, "status": "ok", "at": at, **extra}


async def _user_id(auth: Calls, token: str) -> int:
    return (await auth("me", token=token))["id"]


async def _costs(db) -> dict[str, Decimal | None]:
    return {r["request_id"]: r["cost"] for r in await db.fetch("SELECT request_id, cost FROM usage")}


@pytest.mark.db
async def test_a_price_change_prices_each_record_at_the_price_of_its_moment(auth, db):
    token = await auth.user("ada")
    user_id = await _user_id(auth, token)
    first = await auth("set_price", model=MODEL, input="0.15", output="0.6")  # from now, as the operator
    begins = datetime.fromisoformat(first["effective_from"])
    assert first["status"] == "current" and first["input"] == "0.150000" and first["cached"] is None
    later = (begins + timedelta(seconds=120)).isoformat()
    second = await auth("set_price", model=MODEL, input="0.2", output=1, effective_from=later)
    assert second["status"] == "scheduled" and second["output"] == "1.000000"
    listed = await auth("prices", token=token)
    assert [(p["input"], p["status"]) for p in listed] == [("0.150000", "current"), ("0.200000", "scheduled")]

    t = begins.timestamp()
    batch = [_record("before", user_id, t - 60), _record("first", user_id, t + 60),
             _record("second", user_id, t + 180)]
    assert (await auth("record_usage", batch=batch))["inserted"] == 3
    # 1000 x 0.15 + 500 x 0.6 = 450 per million; then 1000 x 0.2 + 500 x 1 = 700 per million.
    assert await _costs(db) == {"before": None, "first": Decimal("0.0004500000"),
                                "second": Decimal("0.0007000000")}
    # Stored costs never change: a price scheduled after them reprices nothing.
    await auth("set_price", model=MODEL, input="9", output="9",
               effective_from=(begins + timedelta(seconds=240)).isoformat())
    assert (await _costs(db))["second"] == Decimal("0.0007000000")

    report = await auth("usage", token=token)
    assert report["totals"]["cost"] == {"USD": "0.0011500000"} and report["totals"]["unpriced"] == 1
    costs = {(c["model"], c["currency"]): c for c in report["costs"]}
    assert costs[(MODEL, "USD")]["cost"] == "0.0011500000" and costs[(MODEL, "USD")]["requests"] == 2
    assert costs[(MODEL, None)] == {**costs[(MODEL, None)], "cost": None, "unpriced": 1, "requests": 1}
    assert report["days"][0]["cost"] == {"USD": "0.0011500000"}


@pytest.mark.db
async def test_cached_answers_use_the_cached_price_when_there_is_one(auth, db):
    user_id = await _user_id(auth, await auth.user("bea"))
    await auth("set_price", model=MODEL, input="1", output="2", cached="0.1")
    await auth("set_price", model="free-cache", input="1", output="2", cached="0")
    await auth("set_price", model="no-cache-price", input="1", output="2")
    batch = [_record("hit", user_id, cached=True), _record("miss", user_id),
             _record("free", user_id, cached=True, model="free-cache"),
             _record("full", user_id, cached=True, model="no-cache-price"),
             _record("unknown", user_id, model="nobody-priced-me")]
    await auth("record_usage", batch=batch)
    assert await _costs(db) == {
        "hit": Decimal("0.0011000000"),  # 1000 x 0.1 + 500 x 2
        "miss": Decimal("0.0020000000"),  # 1000 x 1 + 500 x 2
        "free": Decimal("0.0010000000"),  # the prompt free, the answer not
        "full": Decimal("0.0020000000"),  # no cached price: the input price
        "unknown": None,  # no price: NULL, never 0
    }
    assert await db.fetchval("SELECT currency FROM usage WHERE request_id = 'unknown'") is None


@pytest.mark.db
async def test_a_cost_the_gateway_charged_is_stored_as_charged(auth, db):
    """A gateway priced the request (its receipt and the budget say so): the record keeps that
    figure even when the version auth has for the moment differs; cost and currency go together."""
    token = await auth.user("gus")
    user_id = await _user_id(auth, token)
    await auth("set_price", model=MODEL, input="1", output="2")
    batch = [_record("charged", user_id, cost="0.0000004200", currency="EUR"), _record("priced-here", user_id)]
    await auth("record_usage", batch=batch)
    assert await _costs(db) == {"charged": Decimal("0.0000004200"), "priced-here": Decimal("0.0020000000")}
    assert await db.fetchval("SELECT currency FROM usage WHERE request_id = 'charged'") == "EUR"
    report = await auth("usage", token=token)
    assert report["totals"]["cost"] == {"EUR": "0.0000004200", "USD": "0.0020000000"}
    for bad, field in (({"cost": "0.1"}, "currency"), ({"currency": "USD"}, "cost"),
                       ({"cost": 0.1, "currency": "USD"}, "cost"), ({"cost": "1e-3", "currency": "USD"}, "cost"),
                       ({"cost": "0.00000000001", "currency": "USD"}, "cost"),
                       ({"cost": "0.1", "currency": "usd"}, "currency")):
        with pytest.raises(InvalidParams) as refused:
            await auth("record_usage", batch=[_record("bad", user_id, **bad)])
        assert refused.value.data["field"] == field, bad


@pytest.mark.db
async def test_costs_are_rounded_half_to_even_at_ten_decimals(auth, db):
    user_id = await _user_id(auth, await auth.user("cyd"))
    cases = {"m-half-down": "0.00005", "m-half-up": "0.00015", "m-even": "0.00025", "m-below": "0.000025",
             "m-above": "0.000075"}
    for model, price in cases.items():
        await auth("set_price", model=model, input=price, output="0")
    await auth("record_usage", batch=[_record(model, user_id, model=model, prompt_tokens=1, completion_tokens=0)
                                      for model in cases])
    expected = {"m-half-down": "0E-10", "m-half-up": "2E-10", "m-even": "2E-10", "m-below": "0E-10",
                "m-above": "1E-10"}
    costs = await _costs(db)
    for model, price in cases.items():
        assert costs[model] == Decimal(expected[model]), model
        assert costs[model] == cost_of(1, 0, False, input=Decimal(price), output=Decimal(0))
    # The largest record at the largest price still fits: no overflow, exact.
    await auth("set_price", model="dear", input="999999.999999", output="999999.999999")
    big = 2**31 - 1
    await auth("record_usage", batch=[_record("dear", user_id, model="dear", prompt_tokens=big,
                                              completion_tokens=big)])
    assert (await _costs(db))["dear"] == cost_of(big, big, False, input=Decimal("999999.999999"),
                                                 output=Decimal("999999.999999"))


BAD_PRICES = [
    ({"input": "-1"}, "input"), ({"input": "abc"}, "input"), ({"output": "0.1234567"}, "output"),
    ({"output": 0.1}, "output"), ({"cached": "1e3"}, "cached"), ({"input": "NaN"}, "input"),
    ({"input": "1000000"}, "input"), ({"input": True}, "input"), ({"output": ""}, "output"),
    ({"model": "bad model"}, "model"), ({"model": ""}, "model"), ({"model": "x" * 65}, "model"),
    ({"model": "-dash"}, "model"), ({"currency": "usd"}, "currency"),
    ({"effective_from": "tomorrow"}, "effective_from"), ({"effective_from": "2030-01-01T00:00:00"}, "effective_from"),
    ({"effective_from": "2001-01-01T00:00:00Z"}, "effective_from"),
]


@pytest.mark.db
async def test_bad_prices_are_invalid_params_naming_the_field(auth, db):
    for change, param in BAD_PRICES:
        params = {"model": MODEL, "input": "1", "output": "2", **change}
        with pytest.raises(InvalidParams) as caught:
            await auth("set_price", **params)
        assert caught.value.data.get("param") == param, (change, caught.value)
    assert await db.fetchval("SELECT count(*) FROM model_prices") == 0
    with pytest.raises(InvalidParams):
        await auth("prices", model="bad model")
    moment = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    await auth("set_price", model=MODEL, input="1", output="2", effective_from=moment)
    with pytest.raises(Conflict):
        await auth("set_price", model=MODEL, input="3", output="4", effective_from=moment)


@pytest.mark.db
async def test_who_may_set_and_read_prices_over_rpc(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack:
        calls = await start_auth(stack, tmp_path, pg_dsn)
        auth = await Auth(stack, calls).start()
        public = await auth.connect(outsider())
        operator = await auth.connect()  # the mesh secret's own key
        gateway = await auth.connect(auth.credential.member("gateway").client)
        user = await calls.user("dan")
        admin = await calls.admin("eve")
        price = {"model": MODEL, "input": "0.5", "output": "1.5"}

        with pytest.raises(Unauthenticated):
            await public.call("auth.set_price", price)
        with pytest.raises(Unauthenticated):  # a member, but not the operator
            await gateway.call("auth.set_price", price)
        with pytest.raises(Forbidden):
            await public.call("auth.set_price", {**price, "token": user})
        with pytest.raises(InvalidParams) as caught:  # typed on the wire, naming the field
            await public.call("auth.set_price", {**price, "input": "-0.5", "token": admin})
        assert caught.value.data["param"] == "input"
        assert await db.fetchval("SELECT count(*) FROM model_prices") == 0

        by_admin = await public.call("auth.set_price", {**price, "token": admin})
        later = (datetime.fromisoformat(by_admin["effective_from"]) + timedelta(minutes=5)).isoformat()
        by_operator = await operator.call("auth.set_price", {**price, "output": "2", "effective_from": later})
        assert by_operator["status"] == "scheduled"

        with pytest.raises(Unauthenticated):
            await public.call("auth.prices", {})
        seen = await public.call("auth.prices", {"token": user, "model": MODEL})
        assert [p["output"] for p in seen] == ["1.500000", "2.000000"]
        assert seen == await operator.call("auth.prices", {})

        events = await db.fetch("SELECT actor_id, details FROM audit_log WHERE event = 'price_set' ORDER BY id")
        admin_id = (await calls("me", token=admin))["id"]
        assert [e["actor_id"] for e in events] == [admin_id, None]
        details = [json.loads(e["details"]) for e in events]
        assert [(d["by"], d["input"], d["output"]) for d in details] == [
            ("admin", "0.5", "1.5"), ("operator", "0.5", "2")]


@pytest.mark.unit
def test_cost_of_is_exact_and_rounds_half_to_even():
    assert cost_of(3, 7, False, input=Decimal("0.1"), output=Decimal("0.2")) == Decimal("0.0000017000")
    assert cost_of(1, 0, True, input=Decimal("1"), output=Decimal("1"), cached_price=Decimal("0.00035")) \
        == Decimal("4E-10")
    assert cost_of(1, 0, True, input=Decimal("0.00035"), output=Decimal("1")) == Decimal("4E-10")
    assert cost_of(1, 0, False, input=Decimal("0.00045"), output=Decimal("1")) == Decimal("4E-10")


@pytest.mark.db
async def test_usage_stored_before_prices_stays_unpriced_after_the_migration(pg_dsn, tmp_path):
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted(MIGRATIONS.glob("*.sql")):
        if path.name < "0008":
            (before / path.name).write_bytes(path.read_bytes())
    conn = await asyncpg.connect(pg_dsn)
    try:
        await apply_migrations(conn, before)
        user_id = await conn.fetchval("INSERT INTO users (username, email, password_hash) "
                                      "VALUES ('old', 'old@example.com', 'x') RETURNING id")
        await conn.execute("INSERT INTO usage (request_id, user_id, model, prompt_tokens, completion_tokens, status) "
                           "VALUES ('old-1', $1, $2, 10, 5, 'ok'), ('old-2', $1, $2, 1, 1, 'ok')", user_id, MODEL)
        applied = await apply_migrations(conn, MIGRATIONS)
        assert applied[:2] == ["0008_model_prices.sql", "0009_daily_cost_tokens.sql"]  # and any later ones
        assert await conn.fetchval("SELECT count(*) FROM usage WHERE cost IS NULL") == 2
        row = await conn.fetchrow("SELECT model, currency, requests, cost, unpriced FROM usage_daily_costs")
        assert dict(row) == {"model": MODEL, "currency": "", "requests": 2, "cost": Decimal(0), "unpriced": 2}
    finally:
        await conn.close()
