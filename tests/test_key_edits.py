"""A key's model allow-list and editing a key (`auth.create_key`, `auth.update_key`), against
a real PostgreSQL: what is stored, audited and logged, and every refusal naming its field."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from shared.errors import Conflict, InvalidParams, NotFound, Unauthenticated

pytestmark = pytest.mark.db


def _in(days: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(days=days)).isoformat()


async def test_a_key_created_with_an_allow_list_carries_it_everywhere(auth, db):
    token = await auth.user("alma")
    key = await auth("create_key", token=token, name="bot", allowed_models=["llama-3:8b", "qwen/2.5", "llama-3:8b"],
                     expires_at=_in(5))
    assert key["allowed_models"] == ["llama-3:8b", "qwen/2.5"]  # duplicates dropped, order kept
    assert 4.9 * 86_400 < datetime.fromisoformat(key["expires_at"]).timestamp() - datetime.now().timestamp()
    answer = await auth("validate_key", api_key=key["api_key"])
    assert answer["allowed_models"] == ["llama-3:8b", "qwen/2.5"]
    assert (await auth("list_keys", token=token))[0]["allowed_models"] == ["llama-3:8b", "qwen/2.5"]
    assert await db.fetchval("SELECT allowed_models FROM api_keys") == ["llama-3:8b", "qwen/2.5"]
    details = json.loads(await db.fetchval("SELECT details FROM audit_log WHERE event = 'key_created'"))
    assert details["allowed_models"] == ["llama-3:8b", "qwen/2.5"]
    every = await auth("create_key", token=token, name="all")
    assert every["allowed_models"] is None
    assert (await auth("validate_key", api_key=every["api_key"]))["allowed_models"] is None
    # A rotation's successor keeps the list.
    new = await auth("rotate_key", token=token, key_id=key["id"], overlap_seconds=0)
    assert new["allowed_models"] == ["llama-3:8b", "qwen/2.5"]


async def test_editing_a_key_is_audited_logged_and_seen_by_validation_at_once(auth, db):
    token = await auth.user("bruno")
    key = await auth("create_key", token=token, name="ci", allowed_models=["a"])
    assert (await auth("validate_key", api_key=key["api_key"]))["allowed_models"] == ["a"]  # cached now
    updated = await auth("update_key", token=token, key_id=key["id"], allowed_models=["a", "b"], name="ci 2")
    assert (updated["name"], updated["allowed_models"], updated["expires_at"]) == ("ci 2", ["a", "b"], None)
    assert (await auth("validate_key", api_key=key["api_key"]))["allowed_models"] == ["a", "b"]
    audit = await db.fetch("SELECT user_id, actor_id, details FROM audit_log WHERE event = 'key_updated'")
    assert len(audit) == 1 and audit[0]["user_id"] == audit[0]["actor_id"]
    assert json.loads(audit[0]["details"]) == {"key_id": key["id"], "changed": {
        "name": {"from": "ci", "to": "ci 2"}, "allowed_models": {"from": ["a"], "to": ["a", "b"]}}}
    assert await db.fetchval("SELECT count(*) FROM invalidations WHERE key_id = $1 AND reason = 'key_updated'",
                             key["id"]) == 1
    # Set an expiry, then clear it and the list; fields left out are kept.
    when = _in(2)
    updated = await auth("update_key", token=token, key_id=key["id"], expires_at=when)
    assert datetime.fromisoformat(updated["expires_at"]) == datetime.fromisoformat(when)
    assert updated["allowed_models"] == ["a", "b"] and updated["name"] == "ci 2"
    assert (await auth("validate_key", api_key=key["api_key"]))["expires_at"] is not None
    updated = await auth("update_key", token=token, key_id=key["id"], expires_at=None, allowed_models=None)
    assert (updated["expires_at"], updated["allowed_models"]) == (None, None)
    answer = await auth("validate_key", api_key=key["api_key"])
    assert (answer["expires_at"], answer["allowed_models"]) == (None, None)
    # Nothing changed: nothing audited or logged.
    await auth("update_key", token=token, key_id=key["id"], name="ci 2")
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE event = 'key_updated'") == 3
    assert await db.fetchval("SELECT count(*) FROM invalidations WHERE reason = 'key_updated'") == 3


@pytest.mark.parametrize("params, field", [
    ({"allowed_models": []}, "allowed_models"),
    ({"allowed_models": "a,b"}, "allowed_models"),
    ({"allowed_models": ["ok", "bad name"]}, "allowed_models"),
    ({"allowed_models": ["-leading"]}, "allowed_models"),
    ({"allowed_models": ["x" * 65]}, "allowed_models"),
    ({"allowed_models": [f"m{i}" for i in range(65)]}, "allowed_models"),
    ({"allowed_models": [5]}, "allowed_models"),
    ({"expires_at": "yesterday"}, "expires_at"),
    ({"expires_at": "2001-01-01T00:00:00+00:00"}, "expires_at"),
    ({"expires_at": "2999-01-01T00:00:00"}, "expires_at"),
    ({"expires_at": "2999-01-01T00:00:00+00:00"}, "expires_at"),
    ({"expires_at": 5}, "expires_at"),
    ({"name": ""}, "name"),
    ({"name": 5}, "name"),
    ({}, "name"),
])
async def test_edit_refusals_name_the_field(auth, db, params, field):
    token = await auth.user("carla")
    key = await auth("create_key", token=token, name="k")
    with pytest.raises(InvalidParams) as info:
        await auth("update_key", token=token, key_id=key["id"], **params)
    assert info.value.data["param"] == field
    if "name" not in params and params:
        with pytest.raises(InvalidParams) as info:
            await auth("create_key", token=token, name="k2", **params)
        assert info.value.data["param"] == field
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE event = 'key_updated'") == 0


async def test_edit_refusals_of_whose_and_which_key(auth, db):
    owner, other = await auth.user("dora"), await auth.user("emil")
    key = await auth("create_key", token=owner, name="k")
    for key_id in (key["id"], 424242):  # someone else's key is no key at all
        with pytest.raises(NotFound):
            await auth("update_key", token=other, key_id=key_id, name="mine")
    with pytest.raises(Unauthenticated):
        await auth("update_key", token="not a token", key_id=key["id"], name="x")
    with pytest.raises(InvalidParams):
        await auth("create_key", token=owner, name="k", expires_in_days=3, expires_at=_in(3))
    await auth("revoke_key", token=owner, key_id=key["id"])
    with pytest.raises(Conflict) as info:
        await auth("update_key", token=owner, key_id=key["id"], allowed_models=["a"])
    assert info.value.data == {"param": "key_id", "status": "revoked"}
    assert await db.fetchval("SELECT allowed_models FROM api_keys WHERE id = $1", key["id"]) is None
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE event = 'key_updated'") == 0
