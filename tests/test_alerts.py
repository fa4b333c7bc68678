"""Spending alerts and their webhooks, on a real PostgreSQL with a real HTTP receiver.

Two auth instances share one database (each with its own webhook sender);
usage is stored through `auth.record_usage` as gateways send it (with `cost`
and `currency`). Thresholds fire once each, whichever instance stores a batch
and however often; each alert reaches the receiver once, signed; failures are
retried with backoff and logged; addresses off the public internet are refused.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import AsyncExitStack
from typing import Any

import asyncpg
import pytest

from shared.errors import Forbidden, InvalidParams, NotFound
from shared.metrics import BUDGET_ALERTS, Metrics
from shared.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, signature_header, verify_signature
from services.auth.app import open_auth
from services.auth.webhook_sender import WebhookPolicy
from services.auth.webhook_urls import PublicResolver, RefusedAddress, is_public
from auth_support import Calls, cheap_config
from waiting import wait_until
from webhook_support import Receiver

#: Alerts looked at with each batch (alert_interval 0), so each alert's `spent` is its batch's.
FAST = dict(webhook_allow_private=True, webhook_poll_interval=0.05, webhook_base_delay=0.05,
            webhook_max_delay=0.2, webhook_max_attempts=3, alert_interval=0)


async def _instance(stack: AsyncExitStack, tmp_path, dsn: str, name: str, **overrides: Any) -> tuple[Calls, Metrics]:
    metrics = Metrics()  # every instance signs with one key, as a mesh's must
    config = cheap_config(tmp_path / name, jwt_key_file=tmp_path / "jwt.pem", **{**FAST, **overrides})
    service = await open_auth(stack, config, dsn, metrics=metrics)
    return Calls(service), metrics


@pytest.fixture
async def pair(pg_dsn, tmp_path):
    """Two auth instances on one database, private addresses allowed (the receiver is local)."""
    async with AsyncExitStack() as stack:
        first = await _instance(stack, tmp_path, pg_dsn, "a")
        second = await _instance(stack, tmp_path, pg_dsn, "b")
        yield first, second


def usage(user_id: int, key_id: int | None, cost: str, n: int = 1) -> list[dict[str, Any]]:
    """`n` records as a gateway ships them, each with its cost in USD."""
    return [{"request_id": secrets.token_hex(8), "user_id": user_id, "key_id": key_id, "model": "m1",
             "prompt_tokens": 3, "completion_tokens": 8, "cached": False, "status": "ok", "at": time.time(),
             "cost": cost, "currency": "USD"} for _ in range(n)]


async def account(auth: Calls, name: str) -> tuple[str, int, dict[str, Any]]:
    token = await auth.user(name)
    me = await auth("me", token=token)
    key = await auth("create_key", token=token, name="k")
    return token, me["id"], key


async def settled(db, count: int) -> list[asyncpg.Record]:
    """The deliveries once `count` of them are no longer pending."""
    async def done() -> list[asyncpg.Record] | None:
        rows = await db.fetch("SELECT * FROM webhook_deliveries WHERE status <> 'pending' ORDER BY id")
        return rows if len(rows) >= count else None
    return await wait_until(done, 20, message=f"{count} deliveries never settled")


def alert_counts(metrics: Metrics) -> dict[tuple[str, ...], float]:
    return {series: n for (name, series), n in metrics.drain().counters.items() if name == BUDGET_ALERTS.name}


@pytest.mark.db
async def test_thresholds_fire_once_each_across_instances_and_retried_batches(pair, db):
    (a, metrics_a), (b, metrics_b) = pair
    async with Receiver() as receiver:
        token, user_id, key = await account(a, "ida")
        await a("set_budget", token=token, spend_per_month="0.10")
        hook = await a("set_webhook", token=token, url=receiver.url)
        secret = hook["secret"]
        assert secret.startswith("whsec_") and hook["thresholds"] == [50, 80, 100]

        async def both(batch: list[dict[str, Any]]) -> None:  # one batch, sent to both instances at once
            await asyncio.gather(a("record_usage", batch=batch), b("record_usage", batch=batch))

        await both(usage(user_id, key["id"], "0.01", 4))  # 0.04: nothing yet
        assert (await a("alerts", token=token))["alerts"] == []
        for _ in range(6):  # 0.05 ... 0.10, each batch twice
            await both(usage(user_id, key["id"], "0.01"))
        await a("record_usage", batch=usage(user_id, key["id"], "0.01", 3))  # past the budget: nothing new
        alerts = (await b("alerts", token=token))["alerts"]
        assert [(x["scope"], x["counter"], x["threshold"]) for x in alerts] == [
            ("user", "spend_per_month", 100), ("user", "spend_per_month", 80), ("user", "spend_per_month", 50)]
        assert [x["spent"] for x in alerts] == ["0.10", "0.08", "0.05"] and alerts[0]["budget"] == "0.10"
        assert alerts[0]["period_start"].endswith("-01") and alerts[0]["currency"] == "USD"
        audited = await db.fetch("SELECT user_id, actor_id, details FROM audit_log WHERE event = 'budget_alert'")
        assert len(audited) == 3 and {r["user_id"] for r in audited} == {user_id}
        assert {json.loads(r["details"])["threshold"] for r in audited} == {50, 80, 100}
        counted = {**alert_counts(metrics_a)}
        for series, n in alert_counts(metrics_b).items():
            counted[series] = counted.get(series, 0) + n
        assert counted == {("spend_per_month", "50"): 1, ("spend_per_month", "80"): 1,
                           ("spend_per_month", "100"): 1}

        await settled(db, 3)
        assert len(receiver.hits) == 3  # each delivered once, by one of the two senders
        events = receiver.events
        assert sorted(e["data"]["threshold"] for e in events) == [50, 80, 100]
        assert {e["id"] for e in events} == {x["event_id"] for x in alerts}
        for hit in receiver.hits:
            assert hit.headers["content-type"] == "application/json"
            assert hit.headers[EVENT_ID_HEADER] == hit.event["id"]
            assert verify_signature(secret, hit.headers[SIGNATURE_HEADER], hit.body)
            tampered = hit.body.replace(b'"threshold":', b'"threshold": ')
            assert not verify_signature(secret, hit.headers[SIGNATURE_HEADER], tampered)
            assert not verify_signature("whsec_other", hit.headers[SIGNATURE_HEADER], hit.body)
        event = next(e for e in events if e["data"]["threshold"] == 100)
        assert event["type"] == "budget.threshold_reached" and isinstance(event["created"], int)
        assert event["data"] == {"scope": "user", "id": user_id, "counter": "spend_per_month", "threshold": 100,
                                 "spent": "0.10", "budget": "0.10", "currency": "USD",
                                 "period_start": alerts[0]["period_start"]}
        log = (await a("webhook_deliveries", token=token))["deliveries"]
        assert len(log) == 3 and {d["status"] for d in log} == {"delivered"}
        assert all(d["status_code"] == 200 and d["attempt"] == 1 and d["next_attempt_at"] is None for d in log)


@pytest.mark.db
async def test_coalesced_looks_fire_each_threshold_once_and_a_stop_looks_last(pg_dsn, tmp_path, db):
    """As deployed (INFERSWARM_ALERT_INTERVAL > 0): batches are answered at once and the
    budgets looked at in rounds; ten batches crossing 50, 80 and 100 % fire each once, and
    what a stopping instance has not looked at yet it looks at before it goes."""
    async with AsyncExitStack() as stack:
        auth, _ = await _instance(stack, tmp_path, pg_dsn, "coalesced", alert_interval=0.3)
        token, user_id, key = await account(auth, "cody")
        await auth("set_budget", token=token, spend_per_month="0.10")
        for _ in range(10):
            await auth("record_usage", batch=usage(user_id, key["id"], "0.01"))

        async def fired() -> list[int] | None:
            alerts = (await auth("alerts", token=token))["alerts"]
            return sorted(a["threshold"] for a in alerts) if len(alerts) == 3 else None

        assert await wait_until(fired, 5, interval=0.05) == [50, 80, 100]
        for _ in range(3):  # past the budget: nothing new, however often it is looked at
            await auth("record_usage", batch=usage(user_id, key["id"], "0.01"))
        stopping, _ = await _instance(stack, tmp_path, pg_dsn, "stopping", alert_interval=60)
        other_token, other_id, other_key = await account(stopping, "dora")
        await stopping("set_budget", token=other_token, spend_per_day="0.02")
        await stopping("record_usage", batch=usage(other_id, other_key["id"], "0.01"))  # looked at at once

        async def half() -> bool:
            return [a["threshold"] for a in (await stopping("alerts", token=other_token))["alerts"]] == [50]

        await wait_until(half, 5, interval=0.05)
        await stopping("record_usage", batch=usage(other_id, other_key["id"], "0.01"))  # the next round: a minute
        assert [a["threshold"] for a in (await stopping("alerts", token=other_token))["alerts"]] == [50]
    assert await db.fetchval("SELECT count(*) FROM alert_events WHERE user_id = $1", user_id) == 3
    last = await db.fetch("SELECT threshold FROM alert_events WHERE user_id = $1 ORDER BY threshold", other_id)
    assert [r["threshold"] for r in last] == [50, 80, 100]  # looked at as the instance stopped


@pytest.mark.db
async def test_a_keys_daily_budget_and_its_owners_thresholds(pair, db):
    (a, _), (b, _) = pair
    token, user_id, key = await account(a, "kai")
    await a("update_key", token=token, key_id=key["id"], limits={"spend_per_day": "0.04"})
    other = await a("create_key", token=token, name="other")
    async with Receiver() as receiver:
        await a("set_webhook", token=token, url=receiver.url, thresholds=[100, 25, 25])
        assert (await b("webhook", token=token))["thresholds"] == [25, 100]
        await b("record_usage", batch=usage(user_id, other["id"], "0.50", 2))  # another key: not this budget
        await b("record_usage", batch=usage(user_id, key["id"], "0.01"))
        await a("record_usage", batch=usage(user_id, key["id"], "0.03") + usage(user_id, None, "0.02"))
        alerts = (await a("alerts", token=token))["alerts"]
        assert [(x["scope"], x["id"], x["counter"], x["threshold"], x["spent"]) for x in alerts] == [
            ("key", key["id"], "spend_per_day", 100, "0.04"), ("key", key["id"], "spend_per_day", 25, "0.01")]
        assert alerts[0]["period_start"] == time.strftime("%Y-%m-%d", time.gmtime())
        await settled(db, 2)
        assert sorted(e["data"]["threshold"] for e in receiver.events) == [25, 100]


@pytest.mark.db
async def test_a_receiver_failing_twice_gets_it_on_the_third_attempt(pair, db):
    (a, _), _ = pair
    token, user_id, key = await account(a, "rae")
    await a("set_budget", token=token, spend_per_day="1")
    async with Receiver(answers=[500, 500]) as receiver:
        await a("set_webhook", token=token, url=receiver.url, thresholds=[100])
        await a("record_usage", batch=usage(user_id, key["id"], "1"))
        [delivery] = await settled(db, 1)
        assert delivery["status"] == "delivered" and delivery["attempts"] == 3
        log = (await a("webhook_deliveries", token=token))["deliveries"]
        assert [(d["attempt"], d["status_code"], d["error"]) for d in log] == [(3, 200, None), (2, 500, None),
                                                                             (1, 500, None)]
        assert log[0]["next_attempt_at"] is None and log[1]["next_attempt_at"] and log[2]["next_attempt_at"]
        assert {d["status"] for d in log} == {"delivered"} and log[0]["delivered_at"]
        assert len({hit.headers[EVENT_ID_HEADER] for hit in receiver.hits}) == 1 and len(receiver.hits) == 3
        page = await a("webhook_deliveries", token=token, limit=2)
        rest = await a("webhook_deliveries", token=token, limit=2, before_id=page["next_before_id"])
        assert [d["attempt"] for d in page["deliveries"] + rest["deliveries"]] == [3, 2, 1]


@pytest.mark.db
async def test_a_receiver_never_answering_2xx_fails_after_the_last_attempt(pair, db):
    (a, _), _ = pair
    token, user_id, key = await account(a, "nia")
    await a("set_budget", token=token, spend_per_day="1")
    async with Receiver(status=503) as receiver:
        await a("set_webhook", token=token, url=receiver.url, thresholds=[50])
        await a("record_usage", batch=usage(user_id, key["id"], "0.5"))
        [delivery] = await settled(db, 1)
        assert delivery["status"] == "failed" and delivery["attempts"] == 3 and len(receiver.hits) == 3
        log = (await a("webhook_deliveries", token=token))["deliveries"]
        assert [(d["attempt"], d["status_code"]) for d in log] == [(3, 503), (2, 503), (1, 503)]
        assert log[0]["next_attempt_at"] is None and {d["status"] for d in log} == {"failed"}
    # A receiver that is gone: no status, the error says why.
    token, user_id, key = await account(a, "gus")
    await a("set_budget", token=token, spend_per_day="1")
    async with Receiver() as closed:
        url = closed.url
    await a("set_webhook", token=token, url=url, thresholds=[50])
    await a("record_usage", batch=usage(user_id, key["id"], "0.5"))
    await settled(db, 2)
    log = (await a("webhook_deliveries", token=token))["deliveries"]
    assert len(log) == 3 and all(d["status_code"] is None and d["error"] for d in log)


@pytest.mark.db
async def test_private_loopback_and_link_local_addresses_are_refused_by_default(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack, Receiver() as receiver:
        auth, _ = await _instance(stack, tmp_path, pg_dsn, "strict", webhook_allow_private=False)
        token, user_id, key = await account(auth, "eve")
        for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest/meta-data/", "http://localhost/",
                    "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://2130706433/", "http://10.0.0.7/",
                    "http://192.168.1.1/", "http://100.64.0.1/", "http://[fe80::1]/", "http://0.0.0.0/",
                    receiver.url):
            with pytest.raises(InvalidParams) as refused:
                await auth("set_webhook", token=token, url=url)
            assert refused.value.data["param"] == "url", url
        for url in ("ftp://example.com/", "https://user:pw@example.com/", "https://", "javascript:alert(1)",
                    "https://example.com/" + "a" * 2040, "https://exa mple.com/"):
            with pytest.raises(InvalidParams) as refused:
                await auth("set_webhook", token=token, url=url)
            assert refused.value.data["param"] == "url", url
        assert await db.fetchval("SELECT count(*) FROM webhooks") == 0
        # DNS rebinding, or a URL stored before: checked again at delivery, nothing is sent.
        await db.execute("INSERT INTO webhooks (user_id, url, secret, thresholds) VALUES ($1, $2, 'whsec_x', "
                         "'{100}')", user_id, receiver.url)
        await auth("set_budget", token=token, spend_per_day="1")
        await auth("record_usage", batch=usage(user_id, key["id"], "1"))
        await wait_until(lambda: db.fetchval("SELECT count(*) FROM webhook_attempts"), 10)
        [attempt] = await db.fetch("SELECT * FROM webhook_attempts")
        assert attempt["status_code"] is None and "refused" in attempt["error"] and receiver.hits == []
    resolver = PublicResolver()
    with pytest.raises(RefusedAddress):
        await resolver.resolve("localhost", 80)
    await resolver.close()
    assert is_public("93.184.216.34") and not is_public("::ffff:169.254.169.254") and not is_public("224.0.0.1")


@pytest.mark.db
async def test_who_may_read_and_change_a_webhook(pair, db):
    (a, _), _ = pair
    owner = await a.user("olga")
    other = await a.user("pete")
    admin = await a.admin("root")
    async with Receiver() as receiver:
        made = await a("set_webhook", token=owner, url=receiver.url, thresholds=[90])
        for method, params in (("webhook", {}), ("alerts", {}), ("webhook_deliveries", {})):
            with pytest.raises(Forbidden):
                await a(method, token=other, user="olga", **params)
            assert await a(method, token=admin, user="olga") is not None
            assert await a(method, token=owner, user="OLGA@example.com") is not None
        shown = await a("webhook", token=admin, user="olga")
        assert shown == {k: v for k, v in made.items() if k != "secret"} and "secret" not in shown
        with pytest.raises(NotFound):
            await a("webhook", token=other)
        changed = await a("set_webhook", token=owner, url=receiver.url + "?v=2")
        assert changed["secret"] is None and changed["thresholds"] == [90]  # kept, and so is the secret
        rotated = await a("rotate_webhook_secret", token=owner)
        assert rotated["secret"].startswith("whsec_") and rotated["secret"] != made["secret"]
        stored = await db.fetchval("SELECT secret FROM webhooks")
        assert stored == rotated["secret"]
        for thresholds in ([], [0], [101], [1, 2, 3, 4, 5, 6], ["50"], [True]):
            with pytest.raises(InvalidParams) as refused:
                await a("set_webhook", token=owner, url=receiver.url, thresholds=thresholds)
            assert refused.value.data["param"] == "thresholds"
        assert await a("remove_webhook", token=owner) == {"removed": True}
        assert await a("remove_webhook", token=owner) == {"removed": False}
        with pytest.raises(NotFound):
            await a("rotate_webhook_secret", token=owner)
    audited = await db.fetch("SELECT event, details::text AS details FROM audit_log WHERE event LIKE 'webhook%'")
    assert [r["event"] for r in audited] == ["webhook_set", "webhook_set", "webhook_secret_rotated",
                                             "webhook_removed"]
    assert not any(made["secret"] in r["details"] or "whsec" in r["details"] for r in audited)
    assert json.loads(audited[0]["details"]) == {"host": "127.0.0.1", "thresholds": [90], "created": True}


@pytest.mark.unit
def test_verify_signature_checks_the_body_the_secret_and_the_time():
    body = b'{"id":"evt_1","type":"budget.threshold_reached"}'
    header = signature_header("whsec_abc", body, timestamp=1_700_000_000)
    assert verify_signature("whsec_abc", header, body, now=1_700_000_100)
    assert not verify_signature("whsec_abc", header, body, now=1_700_000_301)  # too old: a replay
    assert not verify_signature("whsec_abd", header, body, now=1_700_000_000)
    for i in range(len(body)):  # any byte changed
        changed = body[:i] + bytes([body[i] ^ 1]) + body[i + 1:]
        assert not verify_signature("whsec_abc", header, changed, now=1_700_000_000)
    for bad in ("", "t=1700000000", "v1=" + "0" * 64, "t=x,v1=00", "t=1700000000,v1=\u00e9"):
        assert not verify_signature("whsec_abc", bad, body, now=1_700_000_000)
    assert verify_signature("whsec_abc", header.replace(",", ", v1=00,"), body, now=1_700_000_000)


@pytest.mark.unit
def test_retries_back_off_exponentially_with_jitter_up_to_the_maximum():
    policy = WebhookPolicy(base_delay=1.0, max_delay=3600.0)
    for attempt, delay in ((1, 1), (2, 2), (5, 16), (12, 2048), (13, 3600), (40, 3600), (100, 3600)):
        waits = [policy.retry_in(attempt) for _ in range(200)]
        assert all(delay / 2 <= w <= delay for w in waits), attempt
        assert max(waits) - min(waits) > delay / 10  # drawn, not fixed: receivers are not hit all at once


@pytest.mark.db
async def test_old_alerts_and_delivery_logs_are_pruned(pair, db):
    (a, _), _ = pair
    token, user_id, key = await account(a, "olga")
    await a("set_budget", token=token, spend_per_day="1")
    async with Receiver() as receiver:
        await a("set_webhook", token=token, url=receiver.url, thresholds=[50])
        await a("record_usage", batch=usage(user_id, key["id"], "1"))
        await settled(db, 1)
    await db.execute("UPDATE webhook_attempts SET at = now() - interval '91 days'")
    kept = await db.fetchval("SELECT count(*) FROM alert_events")
    await db.execute("INSERT INTO alert_events (event_id, user_id, scope, subject_id, counter, period_start, "
                     "threshold, spent, budget, currency) VALUES ('evt_old', $1, 'user', $1, 'spend_per_day', "
                     "now() - interval '401 days', 50, 1, 1, 'USD')", user_id)
    await a.service.store.prune(86_400)
    assert await db.fetchval("SELECT count(*) FROM webhook_attempts") == 0
    assert await db.fetchval("SELECT count(*) FROM alert_events") == kept  # this year's stay
    assert await db.fetchval("SELECT count(*) FROM alert_events WHERE event_id = 'evt_old'") == 0
