"""Organisations on a real PostgreSQL (`auth.create_org` ... `auth.org_report`): membership, roles,
invitations, the last-owner rule, who may do what, organisation keys (and their revocation when
their owner is removed), limits (checked, audited, logged for the caches, in `validate_key`'s
scopes), and usage attributed to the organisation and the member as a gateway records it."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack
from datetime import datetime, timezone

import pytest

from shared.errors import Conflict, Forbidden, InvalidParams, NotFound, Unauthenticated
from auth_support import Calls, start_auth
from waiting import wait_until

pytestmark = pytest.mark.db


async def _join(auth: Calls, owner: str, org: str, username: str, role: str = "member") -> str:
    """Register `username`, invite them as `role`, accept; their token."""
    token = await auth.user(username)
    invite = await auth("invite", token=owner, org=org, username=username, role=role)
    await auth("answer_invite", token=token, invite_id=invite["id"], accept=True)
    return token


async def _events(db, event: str) -> list[dict]:
    return [json.loads(r["details"]) for r in await db.fetch(
        "SELECT details FROM audit_log WHERE event = $1 ORDER BY id", event)]


async def test_create_invite_accept_decline_and_list(auth, db):
    ada = await auth.user("ada")
    org = await auth("create_org", token=ada, name="  Acme Labs ")
    assert (org["name"], org["role"]) == ("Acme Labs", "owner")
    assert org["limits"] == dict.fromkeys(
        ("requests_per_hour", "requests_per_month", "tokens_per_month", "spend_per_day", "spend_per_month"))
    with pytest.raises(Conflict) as taken:  # unique whatever the case
        await auth("create_org", token=ada, name="ACME LABS")
    assert taken.value.data["param"] == "name"
    for bad in ("", "x" * 65, "tab\there"):
        with pytest.raises(InvalidParams) as refused:
            await auth("create_org", token=ada, name=bad)
        assert refused.value.data["param"] == "name"

    bob, cy = await auth.user("bob"), await auth.user("cyd")
    invite = await auth("invite", token=ada, org="acme labs", username="BOB", role="admin")
    assert (invite["username"], invite["role"], invite["invited_by"], invite["org"]) == ("bob", "admin", "ada", "Acme Labs")
    assert [i["id"] for i in await auth("invitations", token=bob)] == [invite["id"]]
    assert await auth("invitations", token=cy) == []
    with pytest.raises(Conflict):  # one pending invitation at a time
        await auth("invite", token=ada, org=org["id"], username="bob")
    with pytest.raises(NotFound):  # not bob's to answer
        await auth("answer_invite", token=cy, invite_id=invite["id"], accept=True)
    answer = await auth("answer_invite", token=bob, invite_id=invite["id"], accept=True)
    assert answer["accepted"] and answer["org"]["role"] == "admin"
    with pytest.raises(Conflict) as again:
        await auth("answer_invite", token=bob, invite_id=invite["id"], accept=False)
    assert again.value.data["status"] == "accepted"
    with pytest.raises(Conflict):  # a member already
        await auth("invite", token=ada, org=org["id"], username="bob")

    declined = await auth("invite", token=bob, org=org["id"], username="cyd")
    assert (await auth("answer_invite", token=cy, invite_id=declined["id"], accept=False)) == {
        "accepted": False, "org": None}
    with pytest.raises(NotFound):  # cy is not a member: the organisation is not there for cy
        await auth("org", token=cy, org=org["id"])

    detail = await auth("org", token=bob, org="Acme Labs")
    assert [(m["username"], m["role"]) for m in detail["members"]] == [("ada", "owner"), ("bob", "admin")]
    assert detail["invites"] == []
    listed = await auth("orgs", token=bob)
    assert [(o["name"], o["role"], o["members"]) for o in listed] == [("Acme Labs", "admin", 2)]
    assert [e["role"] for e in await _events(db, "org_joined")] == ["admin"]
    assert len(await _events(db, "org_created")) == 1 and len(await _events(db, "org_invited")) == 2


async def test_roles_and_the_last_owner(auth, db):
    ada = await auth.user("ada")
    org = (await auth("create_org", token=ada, name="acme"))["id"]
    bob = await _join(auth, ada, "acme", "bob", "admin")
    cy = await _join(auth, ada, "acme", "cyd")
    with pytest.raises(Conflict) as last:
        await auth("set_member_role", token=ada, org=org, user="ada", role="member")
    assert last.value.data["reason"] == "last_owner"
    with pytest.raises(Conflict):  # nor may the last owner leave
        await auth("remove_member", token=ada, org=org, user="ada")
    with pytest.raises(Forbidden):  # roles are the owners'
        await auth("set_member_role", token=bob, org=org, user="cyd", role="admin")
    with pytest.raises(Forbidden):  # an admin invites, but not an owner
        await auth("invite", token=bob, org=org, username="ana", role="owner")
    with pytest.raises(Forbidden):  # a member invites nobody
        await auth("invite", token=cy, org=org, username="bob")
    with pytest.raises(InvalidParams) as role:
        await auth("set_member_role", token=ada, org=org, user="cyd", role="king")
    assert role.value.data["param"] == "role"
    with pytest.raises(NotFound) as nobody:
        await auth("set_member_role", token=ada, org=org, user="zed", role="admin")
    assert nobody.value.data["param"] == "user"

    promoted = await auth("set_member_role", token=ada, org=org, user="bob", role="owner")
    assert promoted["role"] == "owner"
    assert (await auth("set_member_role", token=bob, org=org, user="ada", role="member"))["role"] == "member"
    assert [(e["from"], e["to"]) for e in await _events(db, "org_role_changed")] == [
        ("admin", "owner"), ("owner", "member")]
    with pytest.raises(Forbidden):  # ada is a plain member now: she cannot remove cy
        await auth("remove_member", token=ada, org=org, user="cyd")
    removed = await auth("remove_member", token=cy, org=org, user="cyd")  # but anyone may leave
    assert removed["removed"]["username"] == "cyd"
    with pytest.raises(NotFound):
        await auth("org", token=cy, org=org)
    left = (await _events(db, "org_member_removed"))[0]
    assert left["left"] is True and left["org_id"] == org


async def test_not_a_member_is_not_found_and_strangers_learn_nothing(auth):
    ada, eve = await auth.user("ada"), await auth.user("eve")
    org = (await auth("create_org", token=ada, name="acme"))["id"]
    for call in (dict(method="org"), dict(method="org_report"), dict(method="set_org_limits", limits={}),
                 dict(method="invite", username="ada"), dict(method="remove_member", user="ada")):
        method = call.pop("method")
        for ref in (org, "acme", org + 1000, "nothing"):
            with pytest.raises(NotFound) as missing:
                await auth(method, token=eve, org=ref, **call)
            assert missing.value.data["param"] == "org"
    with pytest.raises(NotFound):  # nor may eve make a key of it
        await auth("create_key", token=eve, name="k", org=org)
    with pytest.raises(InvalidParams):
        await auth("org", token=ada, org=0)
    with pytest.raises(Unauthenticated):
        await auth("orgs", token="not a token")


async def test_org_keys_carry_the_org_scope_and_go_with_their_member(auth, db):
    ada = await auth.user("ada")
    org = (await auth("create_org", token=ada, name="acme"))["id"]
    bob = await _join(auth, ada, "acme", "bob")
    personal = await auth("create_key", token=bob, name="mine")
    shared = await auth("create_key", token=bob, name="work", org="acme")
    assert (personal["org_id"], shared["org_id"]) == (None, org)
    assert json.loads(await db.fetchval(
        "SELECT details FROM audit_log WHERE event = 'key_created' ORDER BY id DESC LIMIT 1"))["org_id"] == org

    mine = await auth("validate_key", api_key=personal["api_key"])
    assert mine["org_id"] is None
    assert mine["scopes"] == [{"scope": "user", "id": mine["user_id"], "limits": mine["limits"]}]
    work = await auth("validate_key", api_key=shared["api_key"])
    assert work["org_id"] == org
    assert [s["scope"] for s in work["scopes"]] == ["user", "org"]
    assert work["scopes"][1] == {"scope": "org", "id": org, "limits": dict.fromkeys(
        ("requests_per_hour", "requests_per_month", "tokens_per_month", "spend_per_day", "spend_per_month"))}
    verified = await auth("verify_token", token=bob)  # a session is personal: no organisation
    assert "org_id" not in verified or verified["org_id"] is None

    # Limits: checked, audited, logged as an invalidation of each live key, seen at once.
    for limits, param in (({"requests_per_month": -1}, "requests_per_month"),
                          ({"requests_per_month": 10**12 + 1}, "requests_per_month"),
                          ({"spend_per_day": 1.5}, "spend_per_day"), ({"spend_per_day": "1.1234567"}, "spend_per_day"),
                          ({"spend_per_month": "1000000001"}, "spend_per_month"), ({"speed": 1}, "speed"),
                          ({}, "limits")):
        with pytest.raises(InvalidParams) as refused:
            await auth("set_org_limits", token=ada, org=org, limits=limits)
        assert refused.value.data["param"] == param, limits
    with pytest.raises(Forbidden):
        await auth("set_org_limits", token=bob, org=org, limits={"requests_per_month": 6})
    changed = await auth("set_org_limits", token=ada, org=org,
                         limits={"requests_per_month": 6, "spend_per_day": "2.5"})
    assert changed["limits"]["requests_per_month"] == 6 and changed["limits"]["spend_per_day"] == "2.50"
    work = await auth("validate_key", api_key=shared["api_key"])
    assert work["scopes"][1]["limits"]["requests_per_month"] == 6
    kept = await auth("set_org_limits", token=ada, org=org, limits={"spend_per_day": None})
    assert kept["limits"]["requests_per_month"] == 6 and kept["limits"]["spend_per_day"] is None
    assert [(e["from"], e["to"]) for e in await _events(db, "org_limits_changed")] == [
        ({"requests_per_month": None, "spend_per_day": None}, {"requests_per_month": 6, "spend_per_day": "2.50"}),
        ({"spend_per_day": "2.50"}, {"spend_per_day": None})]
    assert await db.fetchval("SELECT count(*) FROM invalidations WHERE key_id = $1 AND reason = 'org_limits_changed'",
                             shared["id"]) == 2

    # A rotated organisation key stays the organisation's.
    rotated = await auth("rotate_key", token=bob, key_id=shared["id"], overlap_seconds=0)
    assert rotated["org_id"] == org

    # Removing bob revokes his keys of the organisation, not his own.
    removed = await auth("remove_member", token=ada, org=org, user="bob")
    assert removed["revoked_keys"] == [shared["id"], rotated["id"]]  # the expired one too
    with pytest.raises(Unauthenticated):
        await auth("validate_key", api_key=rotated["api_key"])
    assert (await auth("validate_key", api_key=personal["api_key"]))["org_id"] is None
    assert await db.fetchval("SELECT count(*) FROM invalidations WHERE key_id = $1 AND reason = 'org_member_removed'",
                             rotated["id"]) == 1
    with pytest.raises(NotFound):
        await auth("create_key", token=bob, name="again", org=org)


async def test_usage_is_attributed_to_the_org_and_the_member(auth, db):
    await db.execute("INSERT INTO model_prices (model, input_price, output_price, currency, effective_from) "
                     "VALUES ('m', 1, 2, 'USD', '2025-01-01 00:00:00+00')")
    ada = await auth.user("ada")
    org = (await auth("create_org", token=ada, name="acme"))["id"]
    bob = await _join(auth, ada, "acme", "bob")
    ids = {name: (await auth("me", token=t))["id"] for name, t in (("ada", ada), ("bob", bob))}
    ada_key = await auth("create_key", token=ada, name="ada-work", org=org)
    bob_key = await auth("create_key", token=bob, name="bob-work", org=org)
    bob_own = await auth("create_key", token=bob, name="bob-own")
    at = time.time() - 5
    day = datetime.fromtimestamp(at, timezone.utc).date()

    def record(rid: str, user: str, key: dict, prompt: int, completion: int) -> dict:
        return {"request_id": rid, "user_id": ids[user], "key_id": key["id"], "model": "m", "prompt_tokens": prompt,
                "completion_tokens": completion, "cached": False, "latency_ms": 5, "status": "ok", "at": at}

    batch = [record("r1", "ada", ada_key, 1000, 500), record("r2", "bob", bob_key, 2000, 1000),
             record("r3", "bob", bob_key, 1000, 0), record("r4", "bob", bob_own, 7000, 7000)]
    assert await auth("record_usage", batch=batch) == {"inserted": 4, "duplicates": 0, "rejected": 0}
    assert await auth("record_usage", batch=batch[:1]) == {"inserted": 0, "duplicates": 1, "rejected": 0}
    assert await db.fetchval("SELECT count(*) FROM usage WHERE org_id = $1", org) == 3

    span = {"start": day.isoformat(), "end": day.isoformat()}
    report = await auth("org_report", token=ada, org="acme", by="member", **span)
    assert report["all_members"] is True and report["by"] == "member"
    rows = {r["username"]: r for r in report["rows"]}
    assert (rows["ada"]["requests"], rows["ada"]["cost"]) == (1, {"USD": "0.0020000000"})
    assert (rows["bob"]["requests"], rows["bob"]["prompt_tokens"], rows["bob"]["cost"]) == (
        2, 3000, {"USD": "0.0050000000"})
    assert rows["bob"]["user_id"] == ids["bob"] and rows["bob"]["period"] == day.isoformat()
    assert report["totals"]["requests"] == 3 and report["totals"]["cost"] == {"USD": "0.0070000000"}
    # A plain member sees only their own usage of the organisation; by key, by model too.
    own = await auth("org_report", token=bob, org=org, by="key", group_by="month", **span)
    assert own["all_members"] is False
    assert [(r["key_name"], r["requests"], r["period"]) for r in own["rows"]] == [("bob-work", 2, day.replace(day=1).isoformat())]
    by_model = await auth("org_report", token=ada, org=org, by="model", **span)
    assert [(r["model"], r["requests"]) for r in by_model["rows"]] == [("m", 3)]
    # Bob's own report bills him for both of his keys.
    mine = await auth("report", token=bob, **span)
    assert mine["totals"]["requests"] == 3
    with pytest.raises(InvalidParams) as by:
        await auth("report", token=bob, by="member", **span)  # a user's report has no members
    assert by.value.data["param"] == "by"
    with pytest.raises(InvalidParams) as by:
        await auth("org_report", token=ada, org=org, by="colour")
    assert by.value.data["param"] == "by"


async def test_limit_changes_evict_cached_answers_on_other_instances(auth, pg_dsn, tmp_path):
    """A second auth instance holding an org key's answer drops it within a second of a change here."""
    async with AsyncExitStack() as stack:
        other = await start_auth(stack, tmp_path / "other", pg_dsn)
        ada = await auth.user("ada")
        org = (await auth("create_org", token=ada, name="acme"))["id"]
        key = await auth("create_key", token=ada, name="work", org=org)
        assert (await other("validate_key", api_key=key["api_key"]))["scopes"][1]["limits"]["requests_per_hour"] is None
        await auth("set_org_limits", token=ada, org=org, limits={"requests_per_hour": 5})
        changed = time.monotonic()

        async def seen() -> bool:
            answer = await other("validate_key", api_key=key["api_key"])
            return answer["scopes"][1]["limits"]["requests_per_hour"] == 5

        await wait_until(seen, 1.0, interval=0.02, message="the other instance kept the old limits")
        assert time.monotonic() - changed <= 1.0


async def test_two_owners_demoting_each_other_at_once_leave_one_owner(auth):
    ada = await auth.user("ada")
    org = (await auth("create_org", token=ada, name="acme"))["id"]
    bob = await _join(auth, ada, "acme", "bob", "owner")
    for _ in range(5):
        results = await asyncio.gather(
            auth("set_member_role", token=ada, org=org, user="bob", role="admin"),
            auth("set_member_role", token=bob, org=org, user="ada", role="admin"), return_exceptions=True)
        assert sum(isinstance(r, dict) for r in results) == 1, results  # the other: CONFLICT, or FORBIDDEN
        assert all(isinstance(r, (dict, Conflict, Forbidden)) for r in results), results
        owners = [m["username"] for m in (await auth("org", token=ada, org=org))["members"] if m["role"] == "owner"]
        assert len(owners) == 1
        winner, loser = (ada, "bob") if owners == ["ada"] else (bob, "ada")
        await auth("set_member_role", token=winner, org=org, user=loser, role="owner")
