"""An upstream key pool on a real stack: requests through the gateway, keys rested and disabled.

Real auth, a gateway process and a worker process whose `pooled` model is an
OpenAI backend with three keys from one variable (`api_keys_env`), against
tests/openai_server.py playing the API's keys: the first serves, the second's
quota is spent (429 with the API's reset headers), the third is revoked (401).

Every request through the gateway is answered: the worker rotates over its keys,
tries the spent one once and rests it until its reset, disables the revoked one
after one refusal -- logged at error level, without the key -- and the operator
sees each key's state and usage in `inference.models` (what the metrics service,
the status page and `inferswarm status` show), never the key itself.
"""

from __future__ import annotations

import json

import pytest
import pytest_asyncio

from shared.dht import model_topic
from gateway_support import infer, running_mesh
from openai_server import OpenAIServer

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.stack]

KEYS = {"sk-test-serves-0001": None, "sk-test-spent-0002": 429, "sk-test-revoked-0003": 401}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(pg_server, tmp_path_factory):
    async with running_mesh(pg_server, tmp_path_factory.mktemp("key-pool"), workers=0, gateways=1) as mesh:
        server = await mesh.stack.enter_async_context(OpenAIServer(("gpt-pool",), reply="pooled keys answer"))
        server.keys = dict(KEYS)
        server.reset_after = 600.0  # spent for the whole test
        catalog = {"pooled": {"backend": "openai", "url": server.base_url, "model": "gpt-pool", "slots": 2,
                              "api_keys_env": "POOL_KEYS"}}
        await mesh.start_worker("w-pooled", catalog=catalog, POOL_KEYS=",".join(KEYS))
        [worker] = await mesh.wait_for(model_topic("pooled"), 1)
        yield mesh, server, worker


async def test_requests_are_served_while_one_key_is_spent_and_one_revoked(stack):
    mesh, server, worker = stack
    user = await mesh.user("pooler")
    connection = (await mesh.gateways())[0]
    for _ in range(8):
        chunks = await infer(connection, user.api_key, model="pooled", max_tokens=2)
        assert chunks[-1]["model"] == "pooled" and "tried" not in chunks[-1]
    serves, spent, revoked = KEYS
    assert server.requests_by_key[serves] >= 8
    assert server.requests_by_key[spent] == 1  # refused once, then rested until its reset
    assert server.requests_by_key[revoked] == 1  # refused once, then disabled

    answer = await mesh.client.mesh.connection(worker).call("inference.models")
    [model] = [m for m in answer["models"] if m["name"] == "pooled"]
    keys = model["keys"]
    assert [(k["key"], k["state"]) for k in keys] == [
        ("key-1 …0001", "ok"), ("key-2 …0002", "exhausted"), ("key-3 …0003", "disabled")]
    assert keys[0]["requests"] >= 8 and keys[0]["completion_tokens"] >= 8
    assert keys[0]["remaining_requests"] is not None and keys[0]["limit_requests"] == server.limit_requests
    assert keys[1]["until"] is not None and keys[1]["last_status"] == 429
    assert keys[2]["last_status"] == 401
    assert model["breaker"]["state"] == "closed"  # the model works: its breaker stays closed
    shown = json.dumps(answer)
    assert not any(key in shown for key in KEYS)

    log = (mesh.root / "w-pooled.log").read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    disabled = [line for line in lines if line.get("event") == "upstream key disabled"]
    assert [(d["level"], d["upstream_key"], d["status"]) for d in disabled] == [("error", "key-3 …0003", 401)]
    assert not any(key in log for key in KEYS)
