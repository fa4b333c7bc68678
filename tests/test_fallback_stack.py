"""Fallback after admission, on a real stack: an alias's chain tried in order when a model fails.

Real auth (in this process, on PostgreSQL), a gateway process, two worker processes:
`big` and `small`, each an Ollama backend against its own tests/ollama_server.py,
which fails on command; and `tiny`, an OpenAI backend whose server has a small
context window. The operator sets, as `inferswarm admin settings set` does,
the alias `chain` -> [big, small] and a first-token time of 1 s, and prices big at
ten times small.

For each way a model fails before its first token -- its server down (503), its
upstream's rate limit (429), too slow to start -- a request for `chain` is served
by `small`: the first chunk and the final one say so, the final chunk names what
was tried, and the usage record is small's, priced at small's price. A request
that opts out (`fallback: false`) gets big's error; one whose every model fails
gets the last error naming the chain -- and both are kept as dead letters. A
prompt too long for `tiny` goes on to `small` (the alias `long`).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from shared.dht import model_topic
from shared.errors import InvalidParams, NotFound, Unavailable
from gateway_support import infer, running_mesh
from ollama_server import OllamaServer
from openai_server import OpenAIServer
from waiting import wait_until

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.stack]

CHAIN = {"chain": ["big", "small"], "long": ["tiny", "small"]}
PRICES = {"big": ("10", "20"), "small": ("1", "2")}  # per million tokens


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(pg_server, tmp_path_factory):
    async with running_mesh(pg_server, tmp_path_factory.mktemp("fallback"), workers=0, gateways=1) as mesh:
        servers = {}
        for name in ("big", "small"):
            server = servers[name] = await mesh.stack.enter_async_context(
                OllamaServer(("llama3:8b",), reply="one two three four five six"))
            catalog = {name: {"backend": "ollama", "url": server.url, "model": "llama3:8b", "slots": 2}}
            await mesh.start_worker(f"w-{name}", catalog=catalog, INFERSWARM_PROBE_INTERVAL="0.3")
            await mesh.wait_for(model_topic(name), 1)
        tiny = servers["tiny"] = await mesh.stack.enter_async_context(
            OpenAIServer(("gpt-tiny",), reply="short context reply"))
        tiny.context_window = 64  # tokens: a long prompt does not fit
        catalog = {"tiny": {"backend": "openai", "url": tiny.base_url, "model": "gpt-tiny", "slots": 2}}
        await mesh.start_worker("w-tiny", catalog=catalog, INFERSWARM_PROBE_INTERVAL="0.3")
        await mesh.wait_for(model_topic("tiny"), 1)
        auth = mesh.client.mesh("auth")
        for model, (input_price, output_price) in PRICES.items():
            await auth.call("auth.set_price", {"model": model, "input": input_price, "output": output_price})
        await auth.call("auth.set_settings", {"settings": {"aliases": CHAIN, "first_token_timeout": 1.0}})
        mesh.probe = await mesh.user("probe")
        yield mesh, servers


async def _healed(mesh, servers: dict[str, OllamaServer], connection) -> None:
    """Every server serves again, and `chain` is served by big (healthy, announced, not cooling)."""
    for name in ("big", "small"):
        servers[name].heal()
        servers[name].prefill_delay = 0.0

    async def big_serves() -> bool:
        try:
            chunks = await infer(connection, mesh.probe.api_key, model="chain")
        except NotFound:  # the gateway has not polled the alias yet (within a second)
            return False
        return chunks[-1]["model"] == "big" and "tried" not in chunks[-1]

    await wait_until(big_serves, 20, interval=0.2, message="big never served the chain again")


async def _record(mesh, request_id: str) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        conn = await asyncpg.connect(mesh.auth_dsn)
        try:
            row = await conn.fetchrow("SELECT model, status, cost FROM usage WHERE request_id = $1", request_id)
        finally:
            await conn.close()
        return dict(row) if row is not None else None

    return await wait_until(find, 10, interval=0.1, message=f"no usage record of {request_id}")


async def _dead_letter(mesh, request_id: str) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        answer = await mesh.client.mesh("auth").call("auth.dead_letters", {"limit": 50})
        return next((d for d in answer["dead_letters"] if d["request_id"] == request_id), None)

    return await wait_until(find, 10, interval=0.1, message=f"no dead letter of {request_id}")


@pytest.mark.parametrize("kind, code", [("down", "UNAVAILABLE"), ("rate_limited", "RATE_LIMITED"),
                                        ("slow", "TIMEOUT")])
async def test_a_model_failing_before_its_first_token_falls_back_to_the_next_of_the_chain(stack, kind, code):
    mesh, servers = stack
    connection = (await mesh.gateways())[0]
    await _healed(mesh, servers, connection)
    user = await mesh.user(f"fb-{kind.replace('_', '')}")
    if kind == "down":
        servers["big"].fail_status = 503
    elif kind == "rate_limited":
        servers["big"].fail_status = 429
    else:
        servers["big"].prefill_delay = 5.0  # past the 1 s the chain gives a model to start

    fallbacks = (await connection.call("gateway.health"))["fallbacks"]
    chunks = await infer(connection, user.api_key, model="chain", max_tokens=3)
    first, final = chunks[0], chunks[-1]
    assert (await connection.call("gateway.health"))["fallbacks"] == fallbacks + 1
    assert first["model"] == "small" and final["model"] == "small"
    assert final["tried"] == [{"model": "big", "code": code}]
    assert "".join(c.get("text", "") for c in chunks[:-1]).split() == ["one", "two", "three"]
    record = await _record(mesh, final["request_id"])
    assert (record["model"], record["status"]) == ("small", "ok")
    usage = final["usage"]  # priced as small: what served
    expected = (Decimal(usage["prompt_tokens"]) * 1 + Decimal(usage["completion_tokens"]) * 2) / 1_000_000
    assert record["cost"] == expected
    # Served in the end, it is no dead letter.
    letters = await mesh.client.mesh("auth").call("auth.dead_letters", {"limit": 50})
    assert final["request_id"] not in {d["request_id"] for d in letters["dead_letters"]}


async def test_a_prompt_too_long_for_a_model_goes_to_the_next_of_the_chain(stack):
    mesh, servers = stack
    connection = (await mesh.gateways())[0]
    await _healed(mesh, servers, connection)
    user = await mesh.user("fb-long")
    short = await infer(connection, user.api_key, model="long", max_tokens=3)
    assert short[-1]["model"] == "tiny" and "tried" not in short[-1]  # it fits: the chain's first serves
    long_prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(200))}]
    chunks = await infer(connection, user.api_key, model="long", messages=long_prompt, max_tokens=3)
    assert chunks[0]["model"] == chunks[-1]["model"] == "small"
    assert chunks[-1]["tried"] == [{"model": "tiny", "code": "INVALID_PARAMS"}]
    record = await _record(mesh, chunks[-1]["request_id"])
    assert (record["model"], record["status"]) == ("small", "ok")


async def test_a_request_that_opts_out_gets_the_first_models_error_and_is_a_dead_letter(stack):
    mesh, servers = stack
    connection = (await mesh.gateways())[0]
    await _healed(mesh, servers, connection)
    user = await mesh.user("fb-optout")
    servers["big"].fail_status = 503
    before = len(servers["small"].requests)
    with pytest.raises(Unavailable) as raised:
        await infer(connection, user.api_key, model="chain", fallback=False)
    assert "tried" not in raised.value.data
    assert len(servers["small"].requests) == before  # small was never asked
    request_id = raised.value.data["request_id"]
    record = await _record(mesh, request_id)
    assert (record["model"], record["status"]) == ("big", "unavailable")
    letter = await _dead_letter(mesh, request_id)
    assert (letter["asked"], letter["model"], letter["status"]) == ("chain", "big", "unavailable")
    assert letter["tried"] == [{"model": "big", "code": "UNAVAILABLE"}]


async def test_a_request_whose_every_model_fails_names_the_chain_and_is_a_dead_letter(stack):
    mesh, servers = stack
    connection = (await mesh.gateways())[0]
    await _healed(mesh, servers, connection)
    user = await mesh.user("fb-allfail")
    servers["big"].fail_status = 503
    servers["small"].fail_status = 429
    with pytest.raises(Unavailable) as raised:
        await infer(connection, user.api_key, model="chain")
    tried = [{"model": "big", "code": "UNAVAILABLE"}, {"model": "small", "code": "RATE_LIMITED"}]
    assert raised.value.data["tried"] == tried
    letter = await _dead_letter(mesh, raised.value.data["request_id"])
    assert (letter["asked"], letter["model"]) == ("chain", "small")
    assert letter["tried"] == tried and len(letter["prompt_hash"]) == 64
    assert "hello" not in json.dumps(letter)  # the prompt's hash, never its text


async def test_a_fallback_that_is_not_a_boolean_is_invalid_params_and_costs_nothing(stack):
    mesh, servers = stack
    connection = (await mesh.gateways())[0]
    user = await mesh.user("fb-bad")
    before = len(servers["big"].requests) + len(servers["small"].requests)
    for value in ("no", 0, [], {"x": 1}):
        with pytest.raises(InvalidParams) as refused:
            await infer(connection, user.api_key, model="chain", fallback=value)
        assert refused.value.data["param"] == "fallback", value
    assert len(servers["big"].requests) + len(servers["small"].requests) == before
