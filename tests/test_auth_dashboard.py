"""The auth methods behind the dashboard: recent requests and the admin's user list."""

from __future__ import annotations

import time

import pytest

from shared.errors import Forbidden, InvalidParams, Unauthenticated

pytestmark = pytest.mark.db


def record(request_id: str, user_id: int, key_id: int | None, at: float, **extra) -> dict:
    return {"request_id": request_id, "user_id": user_id, "key_id": key_id, "model": "smollm2",
            "prompt_tokens": 7, "completion_tokens": 3, "cached": False, "latency_ms": 40,
            "status": "ok", "at": at, **extra}


async def test_recent_usage_is_the_callers_newest_first(auth):
    mine, theirs = await auth.user("nina"), await auth.user("omar")
    nina = (await auth("me", token=mine))["id"]
    omar = (await auth("me", token=theirs))["id"]
    key = await auth("create_key", token=mine, name="laptop")
    now = time.time()
    batch = [record(f"n{i}", nina, key["id"], now - 60 * i) for i in range(5)]
    batch.append(record("o1", omar, None, now, status="error"))
    assert (await auth("record_usage", batch=batch))["inserted"] == 6

    recent = await auth("recent_usage", token=mine, limit=3)
    assert [r["created_at"] for r in recent] == sorted((r["created_at"] for r in recent), reverse=True)
    assert len(recent) == 3 and all(r["key_name"] == "laptop" and r["status"] == "ok" for r in recent)
    assert {"model", "prompt_tokens", "completion_tokens", "latency_ms", "cached"} <= set(recent[0])
    assert [r["status"] for r in await auth("recent_usage", token=theirs)] == ["error"]
    with pytest.raises(InvalidParams):
        await auth("recent_usage", token=mine, limit=0)
    with pytest.raises(Unauthenticated):
        await auth("recent_usage", token="not-a-token")


async def test_list_users_is_for_admins_only(auth):
    admin = await auth.admin("root")
    member = await auth.user("pia")
    users = await auth("list_users", token=admin)
    assert [u["username"] for u in users] == ["root", "pia"]
    assert users[0]["is_admin"] is True and "password_hash" not in users[0]
    assert [u["username"] for u in await auth("list_users", token=admin, limit=1, offset=1)] == ["pia"]
    with pytest.raises(Forbidden):
        await auth("list_users", token=member)
