"""A key's model allow-list at the gateways: real auth, two gateway processes, a worker.

A model outside the list is `FORBIDDEN` naming `model` before anything is routed or
held (`gateway.infer` and `gateway.embed`); widening the list with `auth.update_key`
reaches both gateways' cached answers within about a second.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio

from shared.errors import Forbidden, NotFound
from shared.rpc import Connection
from gateway_support import MODEL, infer, running_mesh
from waiting import wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.stack]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(pg_server, tmp_path_factory):
    async with running_mesh(pg_server, tmp_path_factory.mktemp("gw-models"), workers=1) as running:
        running.ollama.token_delay = running.ollama.prefill_delay = 0.0
        yield running


async def _admitted(connection: Connection, api_key: str) -> bool:
    try:
        return bool((await infer(connection, api_key, max_tokens=2))[-1]["done"])
    except Forbidden:
        return False


async def test_a_key_is_held_to_its_models_and_a_widened_list_reaches_both_gateways_within_a_second(mesh):
    user = await mesh.user("mona")
    auth = mesh.client.mesh("auth")
    key = await auth.call("auth.create_key", {"token": user.token, "name": "narrow", "allowed_models": ["other"]})
    connections = await mesh.gateways()
    before = [await c.call("gateway.quota", {"token": user.token}) for c in connections]
    for connection in connections:
        with pytest.raises(Forbidden) as info:
            await infer(connection, key["api_key"])
        assert info.value.data == {"param": "model", "allowed": ["other"]}
        with pytest.raises(Forbidden) as info:
            await connection.call("gateway.embed", {"api_key": key["api_key"], "model": MODEL, "input": ["hi"]})
        assert info.value.data["param"] == "model"
        with pytest.raises(NotFound):  # allowed, but nobody serves it: the check let it through
            await infer(connection, key["api_key"], model="other")
    # Nothing was held or counted for the refused requests.
    after = [await c.call("gateway.quota", {"token": user.token}) for c in connections]
    assert [_held(a) for a in after] == [_held(b) for b in before]
    # The user's other key (every model) is not affected.
    assert (await infer(connections[0], user.api_key))[-1]["done"]

    await auth.call("auth.update_key", {"token": user.token, "key_id": key["id"], "allowed_models": ["other", MODEL]})
    widened = time.monotonic()
    await asyncio.gather(*(wait_until(lambda c=c: _admitted(c, key["api_key"]), 1.5, interval=0.02,
                                      message="a gateway kept the old allow-list") for c in connections))
    assert time.monotonic() - widened < 1.5

    # Narrowing again is honoured just as fast.
    await auth.call("auth.update_key", {"token": user.token, "key_id": key["id"], "allowed_models": ["other"]})

    async def refused(connection: Connection) -> bool:
        return not await _admitted(connection, key["api_key"])

    await asyncio.gather(*(wait_until(lambda c=c: refused(c), 1.5, interval=0.02,
                                      message="a gateway kept the wider allow-list") for c in connections))


async def test_gateway_models_stays_the_mesh_catalog_for_everyone(mesh):
    models = await (await mesh.gateways())[0].call("gateway.models")
    assert [m["name"] for m in models["models"]] == [MODEL]


def _held(quota: dict) -> dict:
    """The facts of a quota answer but the rolling hour's `reset`: for a counter that is whole,
    that is "now" (it changes with the clock, not with what is held)."""
    facts = {name: dict(fact) for name, fact in quota["rate_limit"].items()}
    facts["requests_per_hour"].pop("reset")
    return facts
