"""The operator's routing settings applied by real gateway processes within a second.

Real auth (in this process, on PostgreSQL), two gateway processes, a worker serving
`m1` (ollama backend against tests/ollama_server.py). Set with `auth.set_settings`
as the operator does (`inferswarm admin settings set`):

* `default_model`: a request naming `default` is served by it, and its record and
  receipt name the model that served;
* `fallback_models`: a request for a model nobody serves goes to the first fallback
  with a worker; without fallbacks it is `NOT_FOUND`;
* `cache_ttl`: 0 and nothing is answered from the workers' cache; 300 and a repeated
  deterministic request is.
"""

from __future__ import annotations

import time

import asyncpg
import pytest
import pytest_asyncio

from shared.errors import Forbidden, NotFound
from shared.rpc import Connection
from gateway_support import MODEL, infer, running_mesh
from waiting import wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.stack]

ASKED = {"temperature": 0, "seed": 7, "max_tokens": 3}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pg_server, tmp_path_factory):
    async with running_mesh(pg_server, tmp_path_factory.mktemp("gw-settings"), workers=1) as running:
        running.ollama.token_delay = running.ollama.prefill_delay = 0.0
        yield running


async def _set(mesh, **settings) -> float:
    await mesh.client.mesh("auth").call("auth.set_settings", {"settings": settings})
    return time.monotonic()


async def _served_by(connection: Connection, api_key: str, model: str) -> str | None:
    """The model the final chunk says served a request for `model`; None when none serves it."""
    try:
        return (await infer(connection, api_key, model=model, max_tokens=2))[-1]["model"]
    except NotFound:
        return None


async def test_default_and_fallback_models_reach_every_gateway_within_a_second(mesh):
    user = await mesh.user("sam")
    gateways = await mesh.gateways()
    for connection in gateways:
        assert await _served_by(connection, user.api_key, "default") is None
        assert await _served_by(connection, user.api_key, "nobody-serves-me") is None

    changed = await _set(mesh, default_model=MODEL, fallback_models=["also-missing", MODEL])
    for connection in gateways:
        await wait_until(lambda c=connection: _served_by(c, user.api_key, "default"), 1.5, interval=0.02,
                         message="a gateway ignored the default model")
    assert time.monotonic() - changed <= 1.5
    for connection in gateways:
        assert await _served_by(connection, user.api_key, "nobody-serves-me") == MODEL
    # The records name the model that served (m1), the refusals the model asked for.
    rows = await wait_until(lambda: _models_recorded(mesh, user.id), 10, interval=0.1)
    assert {(r["model"], r["status"]) for r in rows} == {
        ("default", "not_found"), ("nobody-serves-me", "not_found"), (MODEL, "ok")}

    await _set(mesh, default_model=None, fallback_models=[])
    for connection in gateways:
        await wait_until(lambda c=connection: _refused(c, user.api_key), 1.5, interval=0.02,
                         message="a gateway kept the old default model")


async def _models_recorded(mesh, user_id: int) -> list[asyncpg.Record] | None:
    """The user's records (model, status) once the two gateways' routed requests are among them."""
    conn = await asyncpg.connect(mesh.auth_dsn)
    try:
        rows = await conn.fetch("SELECT model, status FROM usage WHERE user_id = $1", user_id)
    finally:
        await conn.close()
    return rows if sum(r["status"] == "ok" for r in rows) >= 4 else None


async def _refused(connection: Connection, api_key: str) -> bool:
    return await _served_by(connection, api_key, "default") is None


async def _cached(connection: Connection, api_key: str) -> bool:
    return (await infer(connection, api_key, **ASKED))[-1]["cached"] is True


async def test_the_cache_ttl_setting_turns_the_workers_cache_off_and_on(mesh):
    user = await mesh.user("cora")
    connection = (await mesh.gateways())[0]
    await _set(mesh, cache_ttl=0)

    async def never_cached() -> bool:  # within a second the gateways pass 0: two asks, no hit
        return not await _cached(connection, user.api_key) and not await _cached(connection, user.api_key)

    await wait_until(never_cached, 1.5, interval=0.05, message="the workers kept caching")
    await _set(mesh, cache_ttl=300)
    await wait_until(lambda: _cached(connection, user.api_key), 1.5, interval=0.05,
                     message="the workers never cached again")
    await _set(mesh, cache_ttl=None)


async def test_a_keys_allow_list_holds_against_the_default_and_the_fallbacks(mesh):
    """The model asked for and not allowed is FORBIDDEN, fallbacks or not; a fallback the key
    may not use is skipped, so the request ends as it would without it."""
    user = await mesh.user("alba")
    auth = mesh.client.mesh("auth")
    key = await auth.call("auth.create_key", {"token": user.token, "name": "narrow",
                                              "allowed_models": ["nobody-serves-me", "default"]})
    connection = (await mesh.gateways())[0]
    await _set(mesh, default_model=MODEL, fallback_models=[MODEL])

    async def fallback_skipped() -> bool:  # within a second the gateways have the settings
        return await _served_by(connection, user.api_key, "nobody-serves-me") == MODEL

    await wait_until(fallback_skipped, 1.5, interval=0.02)
    assert await _served_by(connection, key["api_key"], "nobody-serves-me") is None  # m1 is not its to use
    with pytest.raises(Forbidden):
        await infer(connection, key["api_key"], model=MODEL, max_tokens=2)
    with pytest.raises(Forbidden):  # `default` is allowed by name, the model it stands for is not
        await infer(connection, key["api_key"], model="default", max_tokens=2)
    await _set(mesh, default_model=None, fallback_models=[])
