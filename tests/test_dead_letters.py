"""Dead letters stored in PostgreSQL (`auth.record_usage`, `auth.dead_letters`, the housekeeper),
against a real database: a failed record with the models it tried becomes one (an `ok` one, or
one without `tried`, does not), shipped twice it is stored once, malformed `asked`/`tried` are
dropped and the record kept, the bound holds after housekeeping, and who may read them -- over
real CurveZMQ too."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from contextlib import AsyncExitStack

import pytest

from shared.errors import Forbidden, InvalidParams, Unauthenticated
from services.auth.housekeeping import Housekeeper
from services.auth.store import AuthStore
from auth_support import Auth, outsider, start_auth
from waiting import wait_until

pytestmark = pytest.mark.db

TRIED = [{"model": "llama3", "code": "UNAVAILABLE"}, {"model": "smollm2", "code": "TIMEOUT"}]


def _record(request_id: str, user_id: int, **extra) -> dict:
    return {"request_id": request_id, "user_id": user_id, "key_id": None, "model": "qwen2.5:0.5b",
            "prompt_hash": hashlib.sha256(request_id.encode()).hexdigest(), "prompt_tokens": 10,
            "completion_tokens": 0, "cached": False, "latency_ms": 12, "status": "ok", **extra}


async def _user_id(auth, name: str) -> tuple[str, int]:
    token = await auth.user(name)
    return token, (await auth("me", token=token))["id"]


async def test_failed_records_with_attempts_become_dead_letters_once(auth, db):
    token, user_id = await _user_id(auth, "ada")
    key_id = (await auth("create_key", token=token, name="k"))["id"]
    at = time.time() - 60
    batch = [
        _record("dead-1", user_id, key_id=key_id, status="error", asked="fast", tried=TRIED, at=at),
        _record("dead-2", user_id, status="timeout", tried=TRIED[:1]),
        _record("ok-after-fallback", user_id, asked="fast", tried=TRIED),  # served in the end: no dead letter
        _record("failed-alone", user_id, status="error"),  # nothing tried before: no dead letter
        _record("failed-empty", user_id, status="error", tried=[]),
    ]
    assert await auth("record_usage", batch=batch) == {"inserted": 5, "duplicates": 0, "rejected": 0}
    # Shipped again, and by three gateways at once: stored once.
    assert await auth("record_usage", batch=batch) == {"inserted": 0, "duplicates": 5, "rejected": 0}
    await asyncio.gather(*(auth("record_usage", batch=batch) for _ in range(3)))
    rows = await db.fetch("SELECT * FROM dead_letters ORDER BY id")
    assert [r["request_id"] for r in rows] == ["dead-1", "dead-2"]
    first = rows[0]
    assert (first["user_id"], first["key_id"], first["asked"], first["model"], first["status"]) == (
        user_id, key_id, "fast", "qwen2.5:0.5b", "error")
    assert first["prompt_hash"] == hashlib.sha256(b"dead-1").hexdigest()
    assert json.loads(first["tried"]) == TRIED and abs(first["at"].timestamp() - at) < 0.001
    assert rows[1]["asked"] is None  # not given: the last model is the one asked for
    usage_at = await db.fetchval("SELECT created_at FROM usage WHERE request_id = 'dead-2'")
    assert rows[1]["at"] == usage_at  # no `at`: the usage row's moment

    page = await auth("dead_letters")  # the operator (in-process): no token
    assert [d["request_id"] for d in page["dead_letters"]] == ["dead-2", "dead-1"] and page["next"] is None
    assert page["dead_letters"][1] == {
        "id": first["id"], "request_id": "dead-1", "user_id": user_id, "key_id": key_id, "asked": "fast",
        "model": "qwen2.5:0.5b", "prompt_hash": first["prompt_hash"], "status": "error", "tried": TRIED,
        "at": first["at"].isoformat()}


async def test_rejected_records_leave_no_dead_letter(auth, db):
    _, user_id = await _user_id(auth, "bob")
    batch = [_record("nobody", 424242, status="error", tried=TRIED), _record("mine", user_id, status="error",
                                                                            tried=TRIED)]
    assert await auth("record_usage", batch=batch) == {"inserted": 1, "duplicates": 0, "rejected": 1}
    assert [r["request_id"] for r in await db.fetch("SELECT request_id FROM dead_letters")] == ["mine"]


MALFORMED = [
    {"asked": ""}, {"asked": 5}, {"asked": "é"}, {"asked": "x" * 201},
    {"tried": "llama3"}, {"tried": {"model": "llama3", "code": "TIMEOUT"}}, {"tried": [TRIED[0]] * 11},
    {"tried": [{"model": "llama3"}]}, {"tried": [{"model": "llama3", "code": "TIMEOUT", "extra": 1}]},
    {"tried": [{"model": "", "code": "TIMEOUT"}]}, {"tried": [{"model": 3, "code": "TIMEOUT"}]},
    {"tried": [TRIED[0], {"model": "x", "code": "timeout"}]}, {"tried": [{"model": "x", "code": "A B"}]},
    {"tried": [{"model": "x", "code": ""}]}, {"tried": ["llama3"]},
]


async def test_malformed_asked_and_tried_are_dropped_and_the_record_kept(auth, db):
    _, user_id = await _user_id(auth, "cyd")
    batch = [_record(f"bad-{i}", user_id, status="error", **change) for i, change in enumerate(MALFORMED)]
    assert await auth("record_usage", batch=batch) == {"inserted": len(MALFORMED), "duplicates": 0, "rejected": 0}
    assert await db.fetchval("SELECT count(*) FROM usage") == len(MALFORMED)
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0  # every `tried` dropped
    # A bad `asked` is dropped alone: the good `tried` still makes a dead letter, asked null.
    done = await auth("record_usage", batch=[_record("asked-bad", user_id, status="error", asked="", tried=TRIED),
                                             _record("asked-same", user_id, status="error", asked="qwen2.5:0.5b",
                                                     tried=TRIED)])
    assert done["inserted"] == 2
    rows = await db.fetch("SELECT request_id, asked, tried FROM dead_letters ORDER BY id")
    assert [(r["request_id"], r["asked"], json.loads(r["tried"])) for r in rows] == [
        ("asked-bad", None, TRIED), ("asked-same", None, TRIED)]
    # The fields of accounting are still refused as before.
    with pytest.raises(InvalidParams):
        await auth("record_usage", batch=[_record("x", user_id, status="error", tried=TRIED, prompt_tokens=-1)])


async def test_paging_and_the_model_filter(auth):
    _, user_id = await _user_id(auth, "dan")
    batch = [_record(f"r{i}", user_id, status="error", model=f"m{i % 3}", tried=[{"model": "z", "code": "TIMEOUT"}],
                     **({"asked": "fast"} if i % 2 else {})) for i in range(7)]
    await auth("record_usage", batch=batch)
    first = await auth("dead_letters", limit=3)
    assert [d["request_id"] for d in first["dead_letters"]] == ["r6", "r5", "r4"]
    second = await auth("dead_letters", limit=3, before=first["next"])
    assert [d["request_id"] for d in second["dead_letters"]] == ["r3", "r2", "r1"]
    third = await auth("dead_letters", limit=3, before=second["next"])
    assert [d["request_id"] for d in third["dead_letters"]] == ["r0"] and third["next"] is None
    by_last = await auth("dead_letters", model="m1")
    assert [d["request_id"] for d in by_last["dead_letters"]] == ["r4", "r1"]
    by_asked = await auth("dead_letters", model="fast")
    assert [d["request_id"] for d in by_asked["dead_letters"]] == ["r5", "r3", "r1"]
    assert (await auth("dead_letters", model="nothing"))["dead_letters"] == []
    for params, param in (({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"before": 0}, "before"),
                          ({"before": 2**63}, "before"), ({"model": ""}, "model"), ({"model": "x" * 201}, "model"),
                          ({"model": "é"}, "model")):
        with pytest.raises(InvalidParams) as refused:
            await auth("dead_letters", **params)
        assert refused.value.data["param"] == param


async def test_the_housekeeper_keeps_the_newest_within_the_bound(pg_dsn, tmp_path, db):
    async with AsyncExitStack() as stack:
        auth = await start_auth(stack, tmp_path, pg_dsn, dead_letters_max=5)
        _, user_id = await _user_id(auth, "eve")
        for n in range(3):  # 12 dead letters in three batches
            await auth("record_usage", batch=[_record(f"b{n}-{i}", user_id, status="error", tried=TRIED)
                                              for i in range(4)])
        assert await db.fetchval("SELECT count(*) FROM dead_letters") == 12
        await auth.service.housekeeper.prune()  # the round each instance runs every ten minutes
        kept = [r["request_id"] for r in await db.fetch("SELECT request_id FROM dead_letters ORDER BY id")]
        assert kept == ["b1-3", "b2-0", "b2-1", "b2-2", "b2-3"]
        await auth.service.housekeeper.prune()  # within the bound: nothing more goes
        assert await db.fetchval("SELECT count(*) FROM dead_letters") == 5
        # A retried batch whose dead letters were pruned does not bring them back.
        await auth("record_usage", batch=[_record(f"b0-{i}", user_id, status="error", tried=TRIED) for i in range(4)])
        assert await db.fetchval("SELECT count(*) FROM dead_letters") == 5

        # The loop itself, with its intervals shrunk: the bound holds as more arrive.
        pool = auth.service.store.pool
        async with Housekeeper(AuthStore(pool), flush_interval=0.05, prune_interval=0.05, dead_letters_max=2):
            await auth("record_usage", batch=[_record(f"late-{i}", user_id, status="error", tried=TRIED)
                                              for i in range(6)])
            await wait_until(lambda: _two_left(db), 10)
        assert [r["request_id"] for r in await db.fetch("SELECT request_id FROM dead_letters ORDER BY id")] == [
            "late-4", "late-5"]


async def _two_left(db) -> bool:
    return await db.fetchval("SELECT count(*) FROM dead_letters") == 2


async def test_only_admins_and_the_operator_read_them(auth):
    _, user_id = await _user_id(auth, "fay")
    user = await auth.user("gus")
    admin = await auth.admin("root")
    await auth("record_usage", batch=[_record("d", user_id, status="error", tried=TRIED)])
    assert len((await auth("dead_letters", token=admin))["dead_letters"]) == 1
    with pytest.raises(Forbidden):
        await auth("dead_letters", token=user)
    with pytest.raises(Unauthenticated):
        await auth("dead_letters", token="not-a-token")


async def test_who_may_call_it_over_rpc(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        calls = await start_auth(stack, tmp_path, pg_dsn)
        auth = await Auth(stack, calls).start()
        public, operator = await auth.connect(outsider()), await auth.connect()
        web = await auth.connect(auth.credential.member("web").client)
        gateway = await auth.connect(auth.credential.member("gateway").client)
        user, admin = await calls.user("hal"), await calls.admin("root")
        user_id = (await calls("me", token=user))["id"]
        await gateway.call("auth.record_usage", {"batch": [_record("over-rpc", user_id, status="error",
                                                                   tried=TRIED, asked="fast")]})
        listed = await operator.call("auth.dead_letters", {})
        assert [(d["request_id"], d["asked"], d["tried"]) for d in listed["dead_letters"]] == [
            ("over-rpc", "fast", TRIED)]
        assert (await public.call("auth.dead_letters", {"token": admin}))["dead_letters"] == listed["dead_letters"]
        assert (await web.call("auth.dead_letters", {"token": admin, "limit": 100}))["next"] is None
        for caller in (public, web):  # a user's token: never, whoever relays it
            with pytest.raises(Forbidden):
                await caller.call("auth.dead_letters", {"token": user})
        for caller in (public, web, gateway):  # no token: only the operator
            with pytest.raises(Unauthenticated):
                await caller.call("auth.dead_letters", {})
        with pytest.raises(InvalidParams):
            await operator.call("auth.dead_letters", {"limit": "all"})
