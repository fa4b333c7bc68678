"""Routing settings stored in PostgreSQL (`auth.settings`, `auth.set_settings`,
`auth.settings_table`), against a real database: the defaults, setting and clearing each,
every refusal naming its setting, who may set them, the audit, and the version gateways poll
(it grows on a change, not on a no-op; `since` answers None when nothing changed)."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack

import pytest

from shared.errors import Forbidden, InvalidParams, Unauthenticated
from auth_support import Auth, outsider, start_auth

pytestmark = pytest.mark.db

NEVER = {"default_model": None, "fallback_models": None, "cache_ttl": None, "aliases": None,
         "first_token_timeout": None}
DEFAULTS = {"default_model": None, "fallback_models": [], "cache_ttl": None, "aliases": {},
            "first_token_timeout": None}


async def test_defaults_for_anyone_logged_in_and_the_operator(auth, db):
    rows = {r["name"]: (json.loads(r["value"]), r["updated_at"]) for r in await db.fetch("SELECT * FROM settings")}
    assert rows == {"default_model": (None, None), "fallback_models": ([], None), "cache_ttl": (None, None),
                    "aliases": ({}, None), "first_token_timeout": (None, None)}
    expected = {**DEFAULTS, "updated_at": NEVER}
    assert await auth("settings") == expected  # the operator (in-process): no token
    token = await auth.user("anna")
    assert await auth("settings", token=token) == expected
    with pytest.raises(Unauthenticated):
        await auth("settings", token="not-a-token")
    table = await auth("settings_table")
    assert table["settings"] == DEFAULTS


async def test_set_and_clear_each_setting(auth):
    admin = await auth.admin("root")
    view = await auth("set_settings", token=admin, settings={"default_model": "qwen2.5:0.5b"})
    assert view["default_model"] == "qwen2.5:0.5b" and view["fallback_models"] == [] and view["cache_ttl"] is None
    assert view["updated_at"]["default_model"] is not None and view["updated_at"]["cache_ttl"] is None
    view = await auth("set_settings", token=admin,
                      settings={"fallback_models": ["smollm2", "llama3.2:1b"], "cache_ttl": 0})
    assert view["default_model"] == "qwen2.5:0.5b"  # left out: kept
    assert view["fallback_models"] == ["smollm2", "llama3.2:1b"] and view["cache_ttl"] == 0
    view = await auth("set_settings", token=admin, settings={"cache_ttl": 86_400, "fallback_models": [
        f"m{i}" for i in range(8)]})
    assert view["cache_ttl"] == 86_400 and len(view["fallback_models"]) == 8
    view = await auth("set_settings", token=admin,
                      settings={"default_model": None, "fallback_models": [], "cache_ttl": None})
    assert {k: view[k] for k in ("default_model", "fallback_models", "cache_ttl")} == {
        "default_model": None, "fallback_models": [], "cache_ttl": None}
    assert all(view["updated_at"][name] is not None for name in ("default_model", "fallback_models", "cache_ttl"))
    assert await auth("settings") == view


async def test_every_refusal_names_its_setting(auth, db):
    admin = await auth.admin("root")
    bad = [
        ({"colour": "red"}, "colour"),
        ({"default_model": "qwen", "speed": 1}, "speed"),
        ({}, "settings"),
        ({"default_model": "no spaces"}, "default_model"),
        ({"default_model": ""}, "default_model"),
        ({"default_model": 7}, "default_model"),
        ({"default_model": "x" * 65}, "default_model"),
        ({"fallback_models": "smollm2"}, "fallback_models"),
        ({"fallback_models": None}, "fallback_models"),
        ({"fallback_models": ["a", "b", "a"]}, "fallback_models"),
        ({"fallback_models": [f"m{i}" for i in range(9)]}, "fallback_models"),
        ({"fallback_models": ["ok", "not ok"]}, "fallback_models"),
        ({"fallback_models": ["ok", 3]}, "fallback_models"),
        ({"cache_ttl": -1}, "cache_ttl"),
        ({"cache_ttl": 86_401}, "cache_ttl"),
        ({"cache_ttl": 1.5}, "cache_ttl"),
        ({"cache_ttl": "60"}, "cache_ttl"),
        ({"cache_ttl": True}, "cache_ttl"),  # a bool is not a number of seconds
    ]
    for settings, param in bad:
        with pytest.raises(InvalidParams) as refused:
            await auth("set_settings", token=admin, settings=settings)
        assert refused.value.data["param"] == param, settings
        assert param in refused.value.message, (settings, refused.value.message)
    with pytest.raises(InvalidParams) as refused:
        await auth("set_settings", token=admin, settings=["default_model"])
    assert refused.value.data["param"] == "settings"
    # Nothing was written by any of them, the good half of a refused change included.
    assert await db.fetchval("SELECT count(*) FROM settings WHERE updated_at IS NOT NULL") == 0
    assert (await auth("settings"))["default_model"] is None


async def test_only_admins_and_the_operator_may_set_them(auth):
    user = await auth.user("bea")
    with pytest.raises(Forbidden):
        await auth("set_settings", token=user, settings={"cache_ttl": 5})
    with pytest.raises(Unauthenticated):
        await auth("set_settings", token="not-a-token", settings={"cache_ttl": 5})
    assert (await auth("set_settings", settings={"cache_ttl": 5}))["cache_ttl"] == 5  # the operator
    admin = await auth.admin("root")
    assert (await auth("set_settings", token=admin, settings={"cache_ttl": 6}))["cache_ttl"] == 6


async def test_a_change_is_audited_with_what_changed_only(auth, db):
    admin = await auth.admin("root")
    admin_id = await db.fetchval("SELECT id FROM users WHERE username = 'root'")
    await auth("set_settings", token=admin, settings={"default_model": "smollm2", "cache_ttl": 30})
    await auth("set_settings", token=admin, settings={"default_model": "smollm2", "fallback_models": ["qwen"]})
    await auth("set_settings", token=admin, settings={"default_model": "smollm2"})  # no change: no row
    await auth("set_settings", settings={"cache_ttl": None})  # the operator
    rows = await db.fetch("SELECT user_id, actor_id, details FROM audit_log WHERE event = 'settings_changed' "
                          "ORDER BY id")
    assert [(r["user_id"], r["actor_id"], json.loads(r["details"])) for r in rows] == [
        (None, admin_id, {"by": "admin", "from": {"default_model": None, "cache_ttl": None},
                          "to": {"default_model": "smollm2", "cache_ttl": 30}}),
        (None, admin_id, {"by": "admin", "from": {"fallback_models": []}, "to": {"fallback_models": ["qwen"]}}),
        (None, None, {"by": "operator", "from": {"cache_ttl": 30}, "to": {"cache_ttl": None}}),
    ]
    events = (await auth("audit", action="settings_changed"))["events"]
    assert [e["actor"] for e in events] == ["operator", "root", "root"]


async def test_settings_table_version_grows_on_a_change_only(auth):
    admin = await auth.admin("root")
    first = await auth("settings_table")
    assert first["settings"] is not None
    assert await auth("settings_table", since=first["version"]) == {"version": first["version"], "settings": None}

    await auth("set_settings", token=admin, settings={"fallback_models": ["a", "b"]})
    second = await auth("settings_table", since=first["version"])
    assert second["version"] > first["version"]
    assert second["settings"] == {**DEFAULTS, "fallback_models": ["a", "b"]}

    await auth("set_settings", token=admin, settings={"fallback_models": ["a", "b"]})  # the same again
    assert await auth("settings_table", since=second["version"]) == {"version": second["version"], "settings": None}

    await auth("set_settings", token=admin, settings={"fallback_models": ["b", "a"]})  # order matters
    third = await auth("settings_table", since=second["version"])
    assert third["version"] > second["version"] and third["settings"]["fallback_models"] == ["b", "a"]
    await auth("set_settings", token=admin, settings={"fallback_models": []})  # a clear is a change too
    assert (await auth("settings_table", since=third["version"]))["version"] > third["version"]
    for since in (-1, 2**63):
        with pytest.raises(InvalidParams) as refused:
            await auth("settings_table", since=since)
        assert refused.value.data["param"] == "since"


async def test_who_may_call_what_over_rpc(pg_dsn, tmp_path):
    async with AsyncExitStack() as stack:
        calls = await start_auth(stack, tmp_path, pg_dsn)
        auth = await Auth(stack, calls).start()
        public, operator = await auth.connect(outsider()), await auth.connect()
        gateway = await auth.connect(auth.credential.member("gateway").client)
        web = await auth.connect(auth.credential.member("web").client)
        user = await calls.user("fay")
        changed = await operator.call("auth.set_settings", {"settings": {"default_model": "smollm2"}})
        assert changed["default_model"] == "smollm2"
        with pytest.raises(Unauthenticated):  # a member, but not the operator
            await gateway.call("auth.set_settings", {"settings": {"cache_ttl": 1}})
        with pytest.raises(Forbidden):
            await public.call("auth.set_settings", {"settings": {"cache_ttl": 1}, "token": user})
        assert (await public.call("auth.settings", {"token": user}))["default_model"] == "smollm2"
        table = await gateway.call("auth.settings_table", {})
        assert table["settings"]["default_model"] == "smollm2"
        assert (await gateway.call("auth.settings_table", {"since": table["version"]}))["settings"] is None
        for caller in (public, web):  # the gateways' alone (and the operator's)
            with pytest.raises(Forbidden):
                await caller.call("auth.settings_table", {})


# -- aliases and first_token_timeout (migration 0017) ----------------------------------------------------


async def test_aliases_and_first_token_timeout_set_replaced_and_cleared(auth, db):
    admin = await auth.admin("root")
    chains = {"fast": ["smollm2", "qwen2.5:0.5b"], "big": ["llama3.2:1b"],
              "nine": [f"m{i}" for i in range(9)]}
    view = await auth("set_settings", token=admin, settings={"aliases": chains, "first_token_timeout": 2.5})
    assert view["aliases"] == chains and view["first_token_timeout"] == 2.5
    assert view["updated_at"]["aliases"] is not None and view["updated_at"]["default_model"] is None
    assert json.loads(await db.fetchval("SELECT value FROM settings WHERE name = 'aliases'")) == chains
    # The whole object is replaced: an alias left out is gone.
    view = await auth("set_settings", token=admin, settings={"aliases": {"fast": ["qwen2.5:0.5b"]}})
    assert view["aliases"] == {"fast": ["qwen2.5:0.5b"]} and view["first_token_timeout"] == 2.5
    view = await auth("set_settings", token=admin, settings={"first_token_timeout": 600})
    assert view["first_token_timeout"] == 600.0 and type(view["first_token_timeout"]) is float
    view = await auth("set_settings", token=admin, settings={"first_token_timeout": 0.1})
    assert view["first_token_timeout"] == 0.1
    aliases = {f"a{i}": ["m"] for i in range(64)}  # the most there may be
    assert (await auth("set_settings", settings={"aliases": aliases}))["aliases"] == aliases
    view = await auth("set_settings", token=admin, settings={"aliases": {}, "first_token_timeout": None})
    assert view["aliases"] == {} and view["first_token_timeout"] is None
    table = await auth("settings_table")
    assert table["settings"] == DEFAULTS


async def test_every_refusal_of_aliases_and_first_token_timeout_names_it(auth, db):
    admin = await auth.admin("root")
    bad = [
        ({"aliases": None}, "aliases"),
        ({"aliases": ["fast"]}, "aliases"),
        ({"aliases": "fast=smollm2"}, "aliases"),
        ({"aliases": {"fast": "smollm2"}}, "aliases"),
        ({"aliases": {"fast": []}}, "aliases"),
        ({"aliases": {"fast": [f"m{i}" for i in range(10)]}}, "aliases"),
        ({"aliases": {"fast": ["a", "b", "a"]}}, "aliases"),
        ({"aliases": {"fast": ["smollm2", "fast"]}}, "aliases"),  # in its own chain
        ({"aliases": {"default": ["smollm2"]}}, "aliases"),  # default_model's
        ({"aliases": {"two words": ["smollm2"]}}, "aliases"),
        ({"aliases": {"": ["smollm2"]}}, "aliases"),
        ({"aliases": {"x" * 65: ["smollm2"]}}, "aliases"),
        ({"aliases": {"fast": ["not ok"]}}, "aliases"),
        ({"aliases": {"fast": [3]}}, "aliases"),
        ({"aliases": {f"a{i}": ["m"] for i in range(65)}}, "aliases"),
        ({"first_token_timeout": 0}, "first_token_timeout"),
        ({"first_token_timeout": 0.05}, "first_token_timeout"),
        ({"first_token_timeout": 600.5}, "first_token_timeout"),
        ({"first_token_timeout": -1}, "first_token_timeout"),
        ({"first_token_timeout": "2"}, "first_token_timeout"),
        ({"first_token_timeout": True}, "first_token_timeout"),
        ({"first_token_timeout": float("nan")}, "first_token_timeout"),
        ({"first_token_timeout": float("inf")}, "first_token_timeout"),
        ({"first_token_timeout": {}}, "first_token_timeout"),
    ]
    for settings, param in bad:
        with pytest.raises(InvalidParams) as refused:
            await auth("set_settings", token=admin, settings={"cache_ttl": 5, **settings})
        assert refused.value.data["param"] == param, settings
        assert param in refused.value.message, (settings, refused.value.message)
    assert await db.fetchval("SELECT count(*) FROM settings WHERE updated_at IS NOT NULL") == 0


async def test_the_version_moves_when_aliases_or_first_token_timeout_change(auth):
    admin = await auth.admin("root")
    first = await auth("settings_table")
    await auth("set_settings", token=admin, settings={"aliases": {"fast": ["a", "b"]}})
    second = await auth("settings_table", since=first["version"])
    assert second["version"] > first["version"] and second["settings"]["aliases"] == {"fast": ["a", "b"]}
    await auth("set_settings", token=admin, settings={"aliases": {"fast": ["a", "b"]}})  # the same: no move
    assert (await auth("settings_table", since=second["version"]))["settings"] is None
    await auth("set_settings", token=admin, settings={"aliases": {"fast": ["b", "a"]}})  # order is the chain
    third = await auth("settings_table", since=second["version"])
    assert third["version"] > second["version"] and third["settings"]["aliases"] == {"fast": ["b", "a"]}
    await auth("set_settings", token=admin, settings={"first_token_timeout": 3})
    fourth = await auth("settings_table", since=third["version"])
    assert fourth["version"] > third["version"] and fourth["settings"]["first_token_timeout"] == 3.0
    await auth("set_settings", token=admin, settings={"first_token_timeout": 3.0})  # 3 == 3.0: no change
    assert (await auth("settings_table", since=fourth["version"]))["settings"] is None
