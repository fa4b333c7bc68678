"""The cost rule gateways and auth share (shared/pricing.py) and one request's spend
(services/gateway/spend.py): exact decimals, worst cases never below the cost."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from shared.pricing import UNITS, Price, cost_of
from services.gateway.quota import money_text, money_units
from services.gateway.spend import Spend

pytestmark = pytest.mark.unit

PRICE = Price("m", Decimal("0.15"), Decimal("0.6"), Decimal("0.075"), "USD", 0.0)


def test_a_cost_is_a_whole_number_of_budget_units_and_the_worst_case_covers_it():
    rng = random.Random(18)
    for _ in range(2000):
        price = Price("m", Decimal(rng.randint(0, 10**9)) / 1000, Decimal(rng.randint(0, 10**9)) / 1000,
                      None if rng.random() < 0.5 else Decimal(rng.randint(0, 10**9)) / 1000, "USD", 0.0)
        prompt, output = rng.randint(0, 40_000), rng.randint(0, 8_000)
        cost = price.cost(prompt, output, cached=rng.random() < 0.5)
        assert cost == cost.quantize(Decimal("1e-10"))  # ten decimals: a whole number of units
        assert Decimal(price.units(prompt, output)) / UNITS == price.cost(prompt, output)
        used_prompt, used_output = rng.randint(0, prompt), rng.randint(0, output)
        assert price.units(used_prompt, used_output, cached=rng.random() < 0.5) <= price.worst(prompt, output)


def test_the_worst_case_rounds_up_and_the_cost_half_to_even():
    tiny = Price("m", Decimal("0.000001"), Decimal("0.000001"), None, "USD", 0.0)
    assert tiny.cost(1, 0) == Decimal("0E-10")  # 1e-12 rounds to 0 at ten decimals...
    assert tiny.worst(1, 0) == 1  # ...but is reserved as a whole unit
    assert cost_of(5, 0, False, input=Decimal("0.00001"), output=Decimal(0)) == Decimal("0E-10")  # 0.5e-10: even
    assert PRICE.cost(1000, 500, cached=True) == Decimal("0.0003750000")  # 1000 x 0.075 + 500 x 0.6


def test_money_text_is_exact_with_at_least_two_decimals():
    assert money_text(UNITS) == "1.00" and money_text(0) == "0.00"
    assert money_text(money_units("0.0012345")) == "0.0012345"
    assert money_units("0.00000000015", up=True) == 2 and money_units("1.5") == 15 * UNITS // 10


def test_room_is_the_output_a_budget_left_can_pay_for_beside_the_prompt():
    spend = Spend(PRICE, True)
    room = spend.room(Decimal("0.01"), 100)  # 0.01 - 100 x 0.15e-6, at 0.6e-6 a token
    assert room == 16641
    assert spend.worst(100, room) <= money_units("0.01") < spend.worst(100, room + 1)
    assert Spend(Price("m", Decimal(1), Decimal(0), None, "USD", 0.0), True).room(Decimal(1), 5) is None


def test_a_caller_without_a_budget_spends_nothing_but_the_cost_is_still_known():
    spend = Spend(PRICE, False)
    assert spend.worst(100, 100) == 0 and spend.used(100, 100) == 0
    assert spend.cost(1000, 0) == Decimal("0.0001500000")
    assert Spend(None, True).cost(1, 1) is None and not Spend(None, True).counted


def test_a_free_request_s_cost_is_plain_digits_on_the_wire_and_in_a_receipt():
    from shared.identity import NodeIdentity
    from shared.receipts import sign, verify

    free = Spend(Price("m", Decimal(0), Decimal(0), None, "USD", 0.0), True).cost(10, 10)
    assert free == 0 and format(free, "f") == "0.0000000000"
    node = NodeIdentity.generate()
    text = sign(node, request_id="gw-1", model="m", prompt_tokens=10, completion_tokens=10, at=1.5, user_id=1,
                cost=free)
    assert verify(text, [node.public_key.hex()]).cost == "0.0000000000"


def test_the_integer_path_is_cost_of_exactly():
    rng = random.Random(21)
    for _ in range(5000):
        prices = [Decimal(rng.randint(0, 10**12 - 1)) / 10**6 for _ in range(3)]
        cached = None if rng.random() < 0.3 else prices[2]
        price = Price("m", prices[0], prices[1], cached, "USD", 0.0)
        prompt, output, hit = rng.randint(0, 10**6), rng.randint(0, 10**5), rng.random() < 0.5
        assert price.cost(prompt, output, hit) == cost_of(prompt, output, hit, input=prices[0], output=prices[1],
                                                          cached_price=cached)
    with pytest.raises(ValueError):
        Price("m", Decimal("0.0000001"), Decimal(0), None, "USD", 0.0)


def test_a_caller_with_a_budget_is_refused_until_prices_load_and_for_another_currency():
    from shared.errors import Forbidden, Unavailable
    from services.gateway.callers import Caller
    from services.gateway.prices import PriceBook
    from services.gateway.quota import Scope

    budgeted = Caller(1, 2, "free", (Scope("k:2", {"spend_per_month": UNITS}),), 0, currency="USD")
    free = Caller(1, None, "free", (Scope("u:1", {"requests_per_hour": 100}),), 0, currency="USD")
    book = PriceBook(None)  # type: ignore[arg-type]  # never started: as before auth first answers
    with pytest.raises(Unavailable) as waiting:
        Spend.of(budgeted, book, "m", 0.0)
    assert waiting.value.data["retry_safe"] is True
    assert Spend.of(free, book, "m", 0.0).price is None  # no budget: served, unpriced
    book._apply([{"model": "m", "input": "1", "output": "2", "cached": None, "currency": "EUR",
                  "effective_from": "2026-01-01T00:00:00+00:00"}])
    book._table.loaded = True
    with pytest.raises(Forbidden) as currency:
        Spend.of(budgeted, book, "m", 1.9e9)
    assert currency.value.data["param"] == "model" and "EUR" in currency.value.message
    assert Spend.of(free, book, "m", 1.9e9).cost(1_000_000, 0) == Decimal("1.0000000000")
