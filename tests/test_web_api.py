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

import datetime
import ssl

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.config import MeshConfig, Secret
from shared.errors import ERROR_CLASSES, RateLimited, RemoteError, Unavailable
from shared.runner import join_mesh
from services.web.app import create_app, start_site
from services.web.config import WebConfig
from services.web.errors import STATUS, error_headers, status_of
from services.web.security import SECURITY_HEADERS
from web_support import MODEL, PASSWORD, web_stack

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with web_stack(tmp_path_factory.mktemp("web-api")) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node(stack, tmp_path_factory):
    mesh = MeshConfig(data_dir=tmp_path_factory.mktemp("web-node"), bootstrap=(stack.bootstrap,),
                      mesh_secret=Secret(stack.mesh_secret))
    async with AsyncExitStack() as resources:
        yield await join_mesh(resources, "web-under-test", mesh)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(node):
    app = create_app(WebConfig(mesh=node.config, max_body_bytes=MAX_BODY), node.mesh)
    test_client = TestClient(TestServer(app))
    await test_client.start_server()
    yield test_client
    await test_client.close()


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


@pytest.mark.stack
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

    # Logging out ends the session: its token is refused from then on.
    logged_out = await client.post("/api/auth/logout", headers=auth)
    assert logged_out.status == 200 and await logged_out.json() == {"logged_out": True}
    await error_of(await client.get("/api/auth/api-keys", headers=auth), 401, "UNAUTHENTICATED")


@pytest.mark.stack
async def test_rotating_a_key_over_rest(client):
    await register(client, "rest-rita")
    auth = await login(client, "rest-rita")
    key = await (await client.post("/api/auth/api-keys", json={"name": "ci"}, headers=auth)).json()
    url = f"/api/auth/api-keys/{key['id']}/rotate"
    for body, param in [({"overlap_seconds": -1}, "overlap_seconds"), ({"overlap_seconds": 30 * 86_400 + 1},
                        "overlap_seconds"), ({"overlap_seconds": "60"}, "overlap_seconds"),
                        ({"overlap_seconds": 1.5}, "overlap_seconds"), ({"overlap_seconds": True}, "overlap_seconds"),
                        ({"overlap": 60}, "overlap")]:
        error = await error_of(await client.post(url, json=body, headers=auth), 400, "INVALID_PARAMS")
        assert error.get("param", param) == param, error
    await error_of(await client.post(url, data="overlap_seconds=60", headers=auth), 400, "DECODE_ERROR")
    await error_of(await client.post(url, json={}), 401, "UNAUTHENTICATED")
    await error_of(await client.post("/api/auth/api-keys/424242/rotate", json={}, headers=auth), 404, "NOT_FOUND")

    rotated = await client.post(url, json={"overlap_seconds": 600}, headers=auth)
    assert rotated.status == 201, await rotated.text()
    new = await rotated.json()
    assert new["api_key"].startswith("isk_") and new["rotated_from"] == key["id"] and new["name"] == "ci"
    assert new["old_key"]["id"] == key["id"] and new["old_key"]["status"] == "active"
    assert new["old_key"]["expires_at"] is not None
    listed = (await (await client.get("/api/auth/api-keys", headers=auth)).json())["keys"]
    assert [(k["id"], k["rotated_from"]) for k in listed] == [(key["id"], None), (new["id"], key["id"])]
    assert new["api_key"] not in str(listed)
    await error_of(await client.post(url, json={}, headers=auth), 409, "CONFLICT")  # already rotated
    default = await (await client.post(f"/api/auth/api-keys/{new['id']}/rotate", json={}, headers=auth)).json()
    assert default["rotated_from"] == new["id"] and default["old_key"]["expires_at"]
    await client.delete(f"/api/auth/api-keys/{default['id']}", headers=auth)
    await error_of(await client.post(f"/api/auth/api-keys/{default['id']}/rotate", json={}, headers=auth),
                   409, "CONFLICT")  # revoked


@pytest.mark.stack
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


@pytest.mark.stack
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


@pytest.mark.unit
async def test_the_error_table_covers_every_code():
    assert set(ERROR_CLASSES) <= set(STATUS)
    assert status_of(RemoteError("SOMETHING_NEW")) == 502
    assert error_headers(RateLimited("slow down", {"retry_after": 2.2})) == {"Retry-After": "3"}
    assert error_headers(Unavailable()) == {"Retry-After": "1"}
    statuses = {code: entry.status for code, entry in STATUS.items()}
    assert {statuses[c] for c in ("INVALID_PARAMS", "UNAUTHENTICATED", "FORBIDDEN", "NOT_FOUND", "CONFLICT",
                                  "TOO_LARGE", "RATE_LIMITED", "UNAVAILABLE", "TIMEOUT")} == \
        {400, 401, 403, 404, 409, 413, 429, 503, 504}


def self_signed(directory) -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.stack
async def test_over_tls_the_cookies_are_secure_and_hsts_is_sent(node, tmp_path):
    cert, key = self_signed(tmp_path)
    config = WebConfig(mesh=node.config, host="127.0.0.1", port=0, tls_cert=cert, tls_key=key)
    runner, url = await start_site(create_app(config, node.mesh), config)
    try:
        assert url.startswith("https://127.0.0.1:")
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=insecure)) as http:
            page = await http.get(url + "login")
            assert page.status == 200
            assert page.headers["Strict-Transport-Security"].startswith("max-age=")
            csrf = page.cookies["inferswarm_csrf"]
            assert csrf["secure"] and csrf["httponly"] and csrf["samesite"] == "Strict"
            reply = await http.post(url + "api/auth/register", json={
                "username": "tls-tom", "email": "tls-tom@example.com", "password": PASSWORD})
            assert reply.status == 201
            token = csrf.value
            form_token = (await page.text()).split('name="csrf_token" value="')[1].split('"')[0]
            login = await http.post(url + "login", allow_redirects=False, data={
                "csrf_token": form_token, "username_or_email": "tls-tom", "password": PASSWORD},
                headers={"Cookie": f"inferswarm_csrf={token}"})
            assert login.status == 303 and login.headers["Location"] == "/dashboard"
            session = login.cookies["inferswarm_session"]
            assert session["secure"] and session["httponly"] and session["samesite"] == "Strict"
    finally:
        await runner.cleanup()


@pytest.mark.stack
async def test_every_reply_carries_the_security_headers(client):
    for reply in (await client.get("/api/auth/api-keys"), await client.get("/api/nope"),
                  await client.post("/api/auth/register", json={})):
        for name, value in SECURITY_HEADERS.items():
            assert reply.headers.get(name) == value, (reply.url, name)
        assert reply.headers["Cache-Control"] == "no-store"


@pytest.mark.stack
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
