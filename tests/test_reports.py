"""Cost and usage reports on a real PostgreSQL (issue 18, part 7): `auth.report`, `auth.top_spenders`.

Usage is stored through the store function `auth.record_usage` uses
(`UsageStore.record`), at moments chosen across days, ISO weeks and months,
with prices in force from before them; every figure is checked exactly, money
as `Decimal`s. Who may see the top spenders is checked over real CurveZMQ.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from datetime import datetime
from decimal import Decimal

import pytest

from shared.errors import Forbidden, InvalidParams, Unauthenticated
from services.auth.prices import cost_of
from services.auth.usage_store import UsageRecord
from auth_support import Auth, Calls, outsider, start_auth

# 2025-12-29 is a Monday: ISO week 1 of 2026 runs to Sunday 2026-01-04.
RANGE = {"start": "2025-12-01", "end": "2026-02-28"}


async def _prices(db) -> None:
    """Versions from long ago (`auth.set_price` refuses the past, rightly: this is the test's history)."""
    await db.execute("""INSERT INTO model_prices (model, input_price, output_price, currency, effective_from)
                        VALUES ('m-a', 1, 2, 'USD', '2025-01-01 00:00:00+00'), ('m-b', 3, 4, 'EUR', '2025-01-01 00:00:00+00')""")


def _cost(model: str, prompt: int, completion: int) -> Decimal:
    prices = {"m-a": (Decimal(1), Decimal(2)), "m-b": (Decimal(3), Decimal(4))}[model]
    return cost_of(prompt, completion, False, input=prices[0], output=prices[1])


async def _store(auth: Calls, user_id: int, rows: list[tuple]) -> None:
    """(request id, moment, model, key id, prompt tokens, completion tokens) each."""
    records = [UsageRecord(request_id=rid, user_id=user_id, key_id=key, model=model, prompt_hash=None,
                           prompt_tokens=prompt, completion_tokens=completion, cached=False, latency_ms=5,
                           status="ok", worker=None, created_at=datetime.fromisoformat(at))
               for rid, at, model, key, prompt, completion in rows]
    assert (await auth.service._usage.record(records))["inserted"] == len(records)


async def _ada(auth: Calls, db) -> tuple[str, int, int]:
    """ada's token and her keys' ids, with her usage stored."""
    await _prices(db)
    token = await auth.user("ada")
    user_id = (await auth("me", token=token))["id"]
    laptop = (await auth("create_key", token=token, name="laptop"))["id"]
    ci = (await auth("create_key", token=token, name="=cmd|' /C calc'!A0"))["id"]
    await _store(auth, user_id, [
        ("r1", "2025-12-29T10:00:00+00:00", "m-a", laptop, 1000, 500),
        ("r2", "2025-12-31T23:59:59+00:00", "m-b", ci, 100, 50),
        ("r3", "2026-01-01T00:00:00+00:00", "m-a", None, 10, 10),
        ("r4", "2026-01-04T23:00:00+00:00", "m-free", laptop, 7, 3),  # no price: unpriced
        ("r5", "2026-01-05T00:00:00+00:00", "m-a", laptop, 2000, 0),  # the next ISO week
        ("r6", "2026-02-02T08:00:00+00:00", "m-a", ci, 1, 1),
    ])
    return token, laptop, ci


def _exact(row: dict) -> dict:
    """A report row with its money as Decimals (and its strings checked to be exact decimals)."""
    for text in row["cost"].values():
        assert isinstance(text, str) and "e" not in text.lower()
    return {**row, "cost": {cur: Decimal(text) for cur, text in row["cost"].items()}}


def _figures(requests: int, prompt: int, completion: int, cost: dict, unpriced: int = 0) -> dict:
    return {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion, "cost": cost,
            "unpriced": unpriced}


R1, R2, R3, R5, R6 = (_cost("m-a", 1000, 500), _cost("m-b", 100, 50), _cost("m-a", 10, 10),
                      _cost("m-a", 2000, 0), _cost("m-a", 1, 1))


@pytest.mark.db
async def test_report_per_day_week_and_month_with_every_figure_exact(auth, db):
    token, _, _ = await _ada(auth, db)
    bob = await auth.user("bob")
    await _store(auth, (await auth("me", token=bob))["id"], [("b1", "2026-01-02T00:00:00+00:00", "m-a", None, 9, 9)])
    assert (R1, R2, R3, R5, R6) == (Decimal("0.002"), Decimal("0.0005"), Decimal("0.00003"), Decimal("0.002"),
                                    Decimal("0.000003"))

    daily = await auth("report", token=token, **RANGE)
    assert (daily["start"], daily["end"], daily["group_by"], daily["by"]) == ("2025-12-01", "2026-02-28", "day", None)
    assert [(r["period"], _exact(r)) for r in daily["rows"]] == [
        ("2025-12-29", {"period": "2025-12-29", **_figures(1, 1000, 500, {"USD": R1})}),
        ("2025-12-31", {"period": "2025-12-31", **_figures(1, 100, 50, {"EUR": R2})}),
        ("2026-01-01", {"period": "2026-01-01", **_figures(1, 10, 10, {"USD": R3})}),
        ("2026-01-04", {"period": "2026-01-04", **_figures(1, 7, 3, {}, unpriced=1)}),
        ("2026-01-05", {"period": "2026-01-05", **_figures(1, 2000, 0, {"USD": R5})}),
        ("2026-02-02", {"period": "2026-02-02", **_figures(1, 1, 1, {"USD": R6})}),
    ]  # bob's request is not ada's
    assert daily["rows"][0]["cost"] == {"USD": "0.0020000000"}  # NUMERIC's own digits, never a float
    assert _exact(daily["totals"]) == _figures(6, 3118, 564, {"EUR": R2, "USD": R1 + R3 + R5 + R6}, unpriced=1)

    weekly = await auth("report", token=token, group_by="week", **RANGE)
    assert [_exact(r) for r in weekly["rows"]] == [
        {"period": "2025-12-29", **_figures(4, 1117, 563, {"EUR": R2, "USD": R1 + R3}, unpriced=1)},
        {"period": "2026-01-05", **_figures(1, 2000, 0, {"USD": R5})},
        {"period": "2026-02-02", **_figures(1, 1, 1, {"USD": R6})},
    ]
    monthly = await auth("report", token=token, group_by="month", **RANGE)
    assert [_exact(r) for r in monthly["rows"]] == [
        {"period": "2025-12-01", **_figures(2, 1100, 550, {"EUR": R2, "USD": R1})},
        {"period": "2026-01-01", **_figures(3, 2017, 13, {"USD": R3 + R5}, unpriced=1)},
        {"period": "2026-02-01", **_figures(1, 1, 1, {"USD": R6})},
    ]
    # A range cutting a week: the week is named by its Monday, and only the range's days count.
    cut = await auth("report", token=token, group_by="week", start="2026-01-01", end="2026-01-04")
    assert [_exact(r) for r in cut["rows"]] == [
        {"period": "2025-12-29", **_figures(2, 17, 13, {"USD": R3}, unpriced=1)}]


@pytest.mark.db
async def test_report_by_model_and_by_key(auth, db):
    token, laptop, ci = await _ada(auth, db)
    by_model = await auth("report", token=token, group_by="month", by="model", **RANGE)
    assert [_exact(r) for r in by_model["rows"]] == [
        {"period": "2025-12-01", "model": "m-a", **_figures(1, 1000, 500, {"USD": R1})},
        {"period": "2025-12-01", "model": "m-b", **_figures(1, 100, 50, {"EUR": R2})},
        {"period": "2026-01-01", "model": "m-a", **_figures(2, 2010, 10, {"USD": R3 + R5})},
        {"period": "2026-01-01", "model": "m-free", **_figures(1, 7, 3, {}, unpriced=1)},
        {"period": "2026-02-01", "model": "m-a", **_figures(1, 1, 1, {"USD": R6})},
    ]
    by_key = await auth("report", token=token, group_by="week", by="key", **RANGE)
    ci_name = "=cmd|' /C calc'!A0"
    assert [_exact(r) for r in by_key["rows"]] == [
        {"period": "2025-12-29", "key_id": None, "key_name": None, **_figures(1, 10, 10, {"USD": R3})},
        {"period": "2025-12-29", "key_id": laptop, "key_name": "laptop",
         **_figures(2, 1007, 503, {"USD": R1}, unpriced=1)},
        {"period": "2025-12-29", "key_id": ci, "key_name": ci_name, **_figures(1, 100, 50, {"EUR": R2})},
        {"period": "2026-01-05", "key_id": laptop, "key_name": "laptop", **_figures(1, 2000, 0, {"USD": R5})},
        {"period": "2026-02-02", "key_id": ci, "key_name": ci_name, **_figures(1, 1, 1, {"USD": R6})},
    ]
    assert by_key["totals"] == by_model["totals"]


@pytest.mark.db
async def test_report_refusals_name_the_field(auth):
    token = await auth.user("cyd")
    refusals = [({"start": "2026-02-01", "end": "2026-01-31"}, "start"),
                ({"start": "2024-12-31", "end": "2026-01-01"}, "start"),  # 367 days, both included
                ({"start": "yesterday"}, "start"), ({"end": "2026-1-1"}, "end"),
                ({"group_by": "year"}, "group_by"), ({"by": "user"}, "by")]
    for params, field in refusals:
        with pytest.raises(InvalidParams) as caught:
            await auth("report", token=token, **params)
        assert caught.value.data.get("param") == field, params
    longest = await auth("report", token=token, start="2025-01-02", end="2026-01-02")  # 366 days
    assert longest["rows"] == [] and longest["totals"] == _figures(0, 0, 0, {})
    with pytest.raises(Unauthenticated):
        await auth("report", token="not-a-token")


@pytest.mark.db
async def test_top_spenders_rank_by_cost_per_currency_then_requests(auth, db):
    token, _, _ = await _ada(auth, db)
    ids = {}
    for name in ("bob", "dee", "eli"):
        ids[name] = (await auth("me", token=await auth.user(name)))["id"]
    ids["ada"] = (await auth("me", token=token))["id"]
    await _store(auth, ids["bob"], [("b1", "2026-01-02T00:00:00+00:00", "m-a", None, 10_000_000, 0),
                                    ("b2", "2026-01-03T00:00:00+00:00", "m-b", None, 1000, 0)])
    # dee spends exactly what ada spends in USD (0.004033), in five requests to her four.
    await _store(auth, ids["dee"], [(f"d{i}", "2026-01-10T00:00:00+00:00", "m-a", None, p, 0)
                                    for i, p in enumerate((1000, 1000, 1000, 1000, 33))])
    await _store(auth, ids["eli"], [(f"e{i}", "2026-01-11T00:00:00+00:00", "m-free", None, 1, 1)
                                    for i in range(3)])
    admin = await auth.admin("root")

    top = await auth("top_spenders", token=admin, limit=2, **RANGE)
    ranked = [(s["currency"], s["rank"], s["username"], None if s["cost"] is None else Decimal(s["cost"]),
               s["requests"]) for s in top["spenders"]]
    assert ranked == [
        ("EUR", 1, "bob", Decimal("0.003"), 1), ("EUR", 2, "ada", R2, 1),
        ("USD", 1, "bob", Decimal(10), 1), ("USD", 2, "dee", Decimal("0.004033"), 5),  # ada: 4 requests, 3rd
        (None, 1, "eli", None, 3), (None, 2, "ada", None, 1),  # no price: ranked by requests
    ]
    assert top["spenders"][2]["cost"] == "10.0000000000"
    assert top["spenders"][2]["user_id"] == ids["bob"] and top["spenders"][2]["prompt_tokens"] == 10_000_000
    everyone = await auth("top_spenders", token=admin, **RANGE)  # default limit 10
    assert [s["username"] for s in everyone["spenders"] if s["currency"] == "USD"] == ["bob", "dee", "ada"]
    assert next(s for s in everyone["spenders"] if s["username"] == "ada" and s["currency"] == "USD")["cost"] \
        == str(R1 + R3 + R5 + R6) == "0.0040330000"
    january = await auth("top_spenders", start="2026-01-06", end="2026-01-31")  # the operator: no token
    assert [(s["currency"], s["username"]) for s in january["spenders"]] == [("USD", "dee"), (None, "eli")]

    with pytest.raises(Forbidden):
        await auth("top_spenders", token=token)
    for params, field in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"),
                          ({"start": "2026-03-01", "end": "2026-01-01"}, "start")):
        with pytest.raises(InvalidParams) as caught:
            await auth("top_spenders", token=admin, **params)
        assert caught.value.data.get("param") == field


@pytest.mark.db
async def test_who_may_see_the_top_spenders_over_rpc(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        calls = await start_auth(stack, tmp_path, pg_dsn)
        auth = await Auth(stack, calls).start()
        public = await auth.connect(outsider())
        operator = await auth.connect()
        gateway = await auth.connect(auth.credential.member("gateway").client)
        user = await calls.user("fay")
        admin = await calls.admin("gus")
        with pytest.raises(Unauthenticated):
            await public.call("auth.top_spenders", {})
        with pytest.raises(Unauthenticated):  # a member, but not the operator
            await gateway.call("auth.top_spenders", {})
        with pytest.raises(Forbidden):
            await public.call("auth.top_spenders", {"token": user})
        assert (await public.call("auth.top_spenders", {"token": admin}))["spenders"] == []
        assert (await operator.call("auth.top_spenders", {"limit": 100}))["spenders"] == []
        mine = await public.call("auth.report", {"token": user, "group_by": "month", "by": "key"})
        assert mine["rows"] == [] and mine["by"] == "key"
