"""The audit log read back on a real PostgreSQL (issue 18, part 8): `auth.audit`.

Events are made the way users and admins make them (register, log in, create,
rotate and revoke keys, change tiers, set prices), then read back: a user sees
only the events they did or that are about them, an admin sees everyone's and
filters them; pages are complete and never overlap; no key ever appears.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from datetime import datetime, timedelta

import asyncpg
import pytest

from shared.errors import Forbidden, InvalidParams, NotFound, Unauthenticated
from auth_support import Auth, Calls, outsider, start_auth


async def _history(auth: Calls) -> tuple[str, str, str, list[str]]:
    """ada and bob with keys (one rotated, one revoked), an admin who moved bob's tier; the
    tokens of ada, bob and the admin, and every raw key made."""
    ada, bob = await auth.user("ada"), await auth.user("bob")
    raw = []
    first = await auth("create_key", token=ada, name="laptop")
    raw.append(first["api_key"])
    raw.append((await auth("rotate_key", token=ada, key_id=first["id"]))["api_key"])
    second = await auth("create_key", token=bob, name="ci")
    raw.append(second["api_key"])
    await auth("revoke_key", token=bob, key_id=second["id"])
    admin = await auth.admin("root")
    await auth("set_tier", token=admin, user="bob", tier="pro")
    await auth("set_price", token=admin, model="m-a", input="1", output="2")
    return ada, bob, admin, raw


def _all_text(page: dict) -> str:
    return json.dumps(page)


@pytest.mark.db
async def test_a_user_sees_their_own_events_only(auth):
    ada, bob, _, _ = await _history(auth)
    mine = (await auth("audit", token=ada))["events"]
    assert [e["action"] for e in mine] == ["key_rotated", "key_created", "user_registered"]
    assert all(e["user"] == "ada" and e["actor"] == "ada" for e in mine)
    assert mine[0]["id"] > mine[1]["id"] > mine[2]["id"]  # newest first
    assert datetime.fromisoformat(mine[0]["at"]).tzinfo is not None
    assert mine[1]["details"]["name"] == "laptop" and "prefix" in mine[1]["details"]
    bobs = (await auth("audit", token=bob))["events"]
    assert [(e["action"], e["actor"]) for e in bobs] == [
        ("tier_changed", "root"), ("key_revoked", "bob"), ("key_created", "bob"), ("user_registered", "bob")]
    assert bobs[0]["details"]["to"] == "pro"
    # Naming themselves is fine; naming anyone else (existing or not) is refused alike.
    assert (await auth("audit", token=ada, user="ADA"))["events"] == mine
    for other in ("bob", "nobody-at-all", 999):
        with pytest.raises(Forbidden):
            await auth("audit", token=ada, user=other)
    with pytest.raises(Unauthenticated):
        await auth("audit", token="not-a-token")


@pytest.mark.db
async def test_an_admin_sees_all_and_filters_by_user_action_and_time(auth):
    _, _, admin, _ = await _history(auth)
    everything = (await auth("audit", token=admin))["events"]
    actions = [e["action"] for e in everything]
    assert actions[:3] == ["price_set", "tier_changed", "admin_granted"]
    assert actions.count("user_registered") == 3 and len(actions) == 10
    granted = everything[2]
    assert granted["actor"] == "operator" and granted["user"] == "root"
    assert everything[0]["actor"] == "root" and everything[0]["user"] is None
    assert everything == (await auth("audit"))["events"]  # the operator, without a token

    bobs = (await auth("audit", token=admin, user="bob"))["events"]
    assert {e["user"] for e in bobs} == {"bob"} and len(bobs) == 4
    roots = (await auth("audit", token=admin, user="root"))["events"]  # as actor or as subject
    assert [e["action"] for e in roots] == ["price_set", "tier_changed", "admin_granted", "user_registered"]
    keys = (await auth("audit", token=admin, action="key_*"))["events"]
    assert [e["action"] for e in keys] == ["key_revoked", "key_created", "key_rotated", "key_created"]
    assert [e["action"] for e in (await auth("audit", token=admin, action="key_revoked"))["events"]] \
        == ["key_revoked"]
    with pytest.raises(NotFound):
        await auth("audit", token=admin, user="nobody-at-all")

    cut = datetime.fromisoformat(everything[2]["at"])  # admin_granted: since includes, until excludes
    later = (await auth("audit", token=admin, since=cut.isoformat()))["events"]
    assert [e["id"] for e in later] == [e["id"] for e in everything if datetime.fromisoformat(e["at"]) >= cut]
    earlier = (await auth("audit", token=admin, until=cut.isoformat()))["events"]
    assert {e["id"] for e in earlier} | {e["id"] for e in later} == {e["id"] for e in everything}
    assert not {e["id"] for e in earlier} & {e["id"] for e in later}
    future = (cut + timedelta(days=1)).date().isoformat()
    assert (await auth("audit", token=admin, since=future))["events"] == []


@pytest.mark.db
async def test_pages_are_complete_and_never_overlap(auth):
    _, _, admin, _ = await _history(auth)
    everything = (await auth("audit", token=admin, limit=500))["events"]
    assert (await auth("audit", token=admin, limit=500))["next_before_id"] is None
    seen, before = [], None
    while True:
        page = await auth("audit", token=admin, limit=3, before_id=before)
        assert len(page["events"]) <= 3
        seen += page["events"]
        before = page["next_before_id"]
        if before is None:
            break
        assert before == page["events"][-1]["id"]
    assert [e["id"] for e in seen] == [e["id"] for e in everything] and len(set(e["id"] for e in seen)) == 10
    exact = await auth("audit", token=admin, limit=10)  # a last page exactly full: nothing after it
    assert exact["next_before_id"] is None


@pytest.mark.db
async def test_refusals_name_the_field(auth):
    token = await auth.user("cyd")
    refusals = [({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"before_id": 0}, "before_id"),
                ({"action": "key_exploded"}, "action"), ({"action": "zz*"}, "action"), ({"action": ""}, "action"),
                ({"since": "yesterday"}, "since"), ({"until": "2026-13-01"}, "until"),
                ({"since": "2026-02-01", "until": "2026-01-01"}, "since"), ({"user": ""}, "user")]
    for params, field in refusals:
        with pytest.raises(InvalidParams) as caught:
            await auth("audit", token=token, **params)
        assert caught.value.data.get("param") == field, params
    assert len((await auth("audit", token=token, limit=500, since="2020-01-01T00:00:00Z"))["events"]) == 1


@pytest.mark.db
async def test_no_secret_ever_appears(auth, pg_dsn):
    _, _, admin, raw = await _history(auth)
    with pytest.raises(Unauthenticated):
        await auth("login", username_or_email="ada", password="wrong-password-here")
    text = _all_text(await auth("audit", token=admin, limit=500))
    assert "login_failed" in text
    for key in raw:
        assert key not in text and key[12:] not in text
    conn = await asyncpg.connect(pg_dsn)
    try:
        hashes = [bytes(r["key_hash"]).hex() for r in await conn.fetch("SELECT key_hash FROM api_keys")]
        passwords = [r["password_hash"] for r in await conn.fetch("SELECT password_hash FROM users")]
        # A row that held a secret, as a later writer might add by mistake, is shown redacted.
        await conn.execute("INSERT INTO audit_log (event, details) VALUES ('key_updated', "
                           "'{\"api_key\": \"sk-leak\", \"nested\": [{\"password_hash\": \"x\"}], \"name\": \"ok\"}')")
    finally:
        await conn.close()
    text = _all_text(await auth("audit", token=admin, limit=500))
    assert not any(h in text for h in hashes) and not any(p in text for p in passwords)
    assert "sk-leak" not in text and '"password_hash": "x"' not in text
    leaked = (await auth("audit", token=admin, limit=1))["events"][0]
    assert leaked["details"] == {"api_key": "[redacted]", "nested": [{"password_hash": "[redacted]"}], "name": "ok"}


@pytest.mark.db
async def test_who_may_read_the_audit_log_over_rpc(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        calls = await start_auth(stack, tmp_path, pg_dsn)
        auth = await Auth(stack, calls).start()
        public = await auth.connect(outsider())
        operator = await auth.connect()
        gateway = await auth.connect(auth.credential.member("gateway").client)
        user = await calls.user("fay")
        await calls.admin("gus")
        with pytest.raises(Unauthenticated):
            await public.call("auth.audit", {})
        with pytest.raises(Unauthenticated):  # a member, but not the operator
            await gateway.call("auth.audit", {})
        mine = await public.call("auth.audit", {"token": user})
        assert [e["user"] for e in mine["events"]] == ["fay"]
        everyone = await operator.call("auth.audit", {"user": "gus"})
        assert [e["action"] for e in everyone["events"]] == ["admin_granted", "user_registered"]
