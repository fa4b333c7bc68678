"""The REST API through aiohttp's test client, against real services.

The application under test is built in this process (`create_app`) on a mesh
node that joined a real stack (`inferswarm up`): auth on real PostgreSQL, the
gateway and a worker when they exist. Only the HTTP front is in-process.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from shared.config import MeshConfig, Secret
from shared.runner import join_mesh
from services.web.app import create_app
from services.web.config import WebConfig
from services.web.security import SECURITY_HEADERS
from web_support import HAS_GATEWAY, MODEL, PASSWORD, web_stack

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

MAX_BODY = 64 * 1024
needs_gateway = pytest.mark.skipif(not HAS_GATEWAY, reason="services/gateway has no __main__ yet")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("web-api")) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(stack, tmp_path_factory):
    mesh = MeshConfig(data_dir=tmp_path_factory.mktemp("web-node"), bootstrap=(stack.bootstrap,),
                      mesh_secret=Secret(stack.mesh_secret))
    async with AsyncExitStack() as resources:
        node = await join_mesh(resources, "web-under-test", mesh)
        app = create_app(WebConfig(mesh=mesh, max_body_bytes=MAX_BODY), node.mesh)
        test_client = TestClient(TestServer(app))
        await test_client.start_server()
        resources.push_async_callback(test_client.close)
        yield test_client


async def register(client, name: str) -> dict:
    reply = await client.post("/api/auth/register", json={
        "username": name, "email": f"{name}@example.com", "password": PASSWORD})
    assert reply.status == 201, await reply.text()
    return await reply.json()


async def login(client, name: str) -> dict:
    reply = await client.post("/api/auth/login", json={"username_or_email": name, "password": PASSWORD})
    assert reply.status == 200, await reply.text()
    return {"Authorization": f"Bearer {(await reply.json())['token']}"}


async def error_of(reply, status: int, code: str) -> dict:
    assert reply.status == status, await reply.text()
    assert reply.content_type == "application/json"
    error = (await reply.json())["error"]
    assert error["code"] == code and error["message"]
    return error


async def test_register_login_and_the_key_lifecycle(client):
    user = await register(client, "rest-alice")
    assert user["username"] == "rest-alice" and user["tier"] == "free" and "password" not in str(user)
    auth = await login(client, "rest-alice")

    assert (await (await client.get("/api/auth/api-keys", headers=auth)).json()) == {"keys": []}
    created = await client.post("/api/auth/api-keys", json={"name": "laptop", "expires_in_days": 30}, headers=auth)
    assert created.status == 201
    key = await created.json()
    assert key["api_key"].startswith("isk_") and key["status"] == "active" and key["expires_at"]

    listed = (await (await client.get("/api/auth/api-keys", headers=auth)).json())["keys"]
    assert [k["id"] for k in listed] == [key["id"]]
    assert "api_key" not in listed[0] and key["api_key"] not in str(listed)  # shown once

    revoked = await client.delete(f"/api/auth/api-keys/{key['id']}", headers=auth)
    assert revoked.status == 200 and (await revoked.json())["status"] == "revoked"

    usage = await client.get("/api/usage", headers=auth)
    assert usage.status == 200
    report = await usage.json()
    assert set(report) >= {"start", "end", "days", "totals"}


async def test_errors_map_to_statuses_through_the_one_table(client):
    await register(client, "rest-bob")
    bob = await login(client, "rest-bob")
    carol = (await register(client, "rest-carol")) and await login(client, "rest-carol")
    carols_key = await (await client.post("/api/auth/api-keys", json={"name": "c"}, headers=carol)).json()

    taken = await client.post("/api/auth/register", json={
        "username": "rest-bob", "email": "other@example.com", "password": PASSWORD})
    await error_of(taken, 409, "CONFLICT")
    bad_email = await client.post("/api/auth/register", json={
        "username": "rest-dan", "email": "not-an-email", "password": PASSWORD})
    assert (await error_of(bad_email, 400, "INVALID_PARAMS"))["param"] == "email"
    await error_of(await client.post("/api/auth/login", json={"username_or_email": "rest-bob", "password": "x" * 12}),
                   401, "UNAUTHENTICATED")
    await error_of(await client.get("/api/auth/api-keys"), 401, "UNAUTHENTICATED")
    await error_of(await client.get("/api/auth/api-keys", headers={"Authorization": "Bearer forged.token.here"}),
                   401, "UNAUTHENTICATED")
    await error_of(await client.delete(f"/api/auth/api-keys/{carols_key['id']}", headers=bob), 404, "NOT_FOUND")
    await error_of(await client.delete("/api/auth/api-keys/987654321", headers=bob), 404, "NOT_FOUND")
    await error_of(await client.delete("/api/auth/api-keys/abc", headers=bob), 400, "INVALID_PARAMS")
    await error_of(await client.get("/api/no-such-route"), 404, "NOT_FOUND")
    await error_of(await client.post("/api/auth/login", data=b"{not json", headers={"Content-Type": "application/json"}),
                   400, "DECODE_ERROR")
    await error_of(await client.post("/api/auth/api-keys", json=["a list"], headers=bob), 400, "DECODE_ERROR")
    huge = await client.post("/api/auth/register", data=b"x" * (MAX_BODY + 1),
                             headers={"Content-Type": "application/json"})
    await error_of(huge, 413, "TOO_LARGE")
    # Carol's key was not touched by Bob's attempt.
    keys = (await (await client.get("/api/auth/api-keys", headers=carol)).json())["keys"]
    assert keys[0]["status"] == "active"


async def test_failed_logins_are_throttled_with_429_and_retry_after(client):
    await register(client, "rest-erin")
    statuses = []
    for _ in range(8):  # five failures are free, then the account is locked for 1, 2, 4... s
        reply = await client.post("/api/auth/login", json={"username_or_email": "rest-erin", "password": "wrong-pass-1"})
        statuses.append(reply.status)
        if reply.status == 429:
            break
    assert statuses[-1] == 429, statuses
    assert int(reply.headers["Retry-After"]) >= 1
    error = await error_of(reply, 429, "RATE_LIMITED")
    assert error["retry_after"] == int(reply.headers["Retry-After"])
    # Even the right password waits until the lock ends.
    right = await client.post("/api/auth/login", json={"username_or_email": "rest-erin", "password": PASSWORD})
    assert right.status == 429


async def test_every_reply_carries_the_security_headers(client):
    for reply in (await client.get("/api/auth/api-keys"), await client.get("/api/nope"),
                  await client.post("/api/auth/register", json={})):
        for name, value in SECURITY_HEADERS.items():
            assert reply.headers.get(name) == value, (reply.url, name)
        assert reply.headers["Cache-Control"] == "no-store"


@needs_gateway
async def test_quota_and_inference_with_an_api_key(client):
    await register(client, "rest-fay")
    auth = await login(client, "rest-fay")
    key = (await (await client.post("/api/auth/api-keys", json={"name": "k"}, headers=auth)).json())["api_key"]

    quota = await client.get("/api/quota", headers={"X-API-Key": key})
    assert quota.status == 200, await quota.text()
    by_token = await client.get("/api/quota", headers=auth)
    assert by_token.status == 200, await by_token.text()

    reply = await client.post("/api/inference", headers={"X-API-Key": key}, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert reply.status == 200, await reply.text()
    body = await reply.json()
    assert body["text"] == "The quick brown fox " and body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4
    assert reply.headers["x-ratelimit-limit-requests"] == "100"

    streamed = await client.post("/api/inference", headers={"X-API-Key": key}, json={
        "model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True})
    assert streamed.status == 200 and streamed.content_type == "application/x-ndjson"
    lines = [line for line in (await streamed.text()).splitlines() if line]
    assert lines[-1].startswith('{"done": true')

    await error_of(await client.post("/api/inference", json={"model": MODEL, "prompt": "x"}), 401, "UNAUTHENTICATED")
    await error_of(await client.post("/api/inference", headers={"X-API-Key": "isk_" + "x" * 43},
                                     json={"model": MODEL, "prompt": "x"}), 401, "UNAUTHENTICATED")
    await error_of(await client.post("/api/inference", headers={"X-API-Key": key},
                                     json={"model": "no-such-model", "prompt": "x"}), 404, "NOT_FOUND")
