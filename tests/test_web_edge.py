"""The HTTP edge of /v1: OpenAI's error codes, JSON 404/405, model retrieval,
`x-request-id` and CORS.

Stack tests run on a stack of their own (`inferswarm up`, every hop real) with
CORS open to two origins and a free tier of 2 000 tokens a month, on a
PostgreSQL server started here so the tests can read the usage rows auth
keeps. SDK-visible behaviour is checked with the official `openai` package,
the rest with aiohttp. Unit tests cover the error table and the CORS rules.
"""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import httpx
import openai
import pytest

from shared.db import EmbeddedPostgres, with_database
from shared.errors import (DecodeError, InvalidParams, NotFound, RateLimited, Timeout, Unauthenticated,
                           Unavailable)
from services.web.config import parse_origins
from services.web.cors import CorsPolicy, allowed_request_headers
from services.web.errors import (CONTEXT_LENGTH, MISSING_CREDENTIAL, UNKNOWN_URL, MethodNotAllowed,
                                 openai_error_body, openai_error_headers, status_of)
from services.web.relay import Relay
from waiting import wait_until, wait_until_sync
from web_support import MODEL, new_account, new_key, post_json, web_stack

pytestmark = [pytest.mark.timeout(120)]

ORIGIN = "https://app.example.com"
DEV_ORIGIN = "http://localhost:5173"
STRANGER = "https://evil.example.net"
MONTHLY_TOKENS = 2000  # the free tier's budget here: a request for 4 000 tokens can never fit
HELLO = [{"role": "user", "content": "Say something."}]


# -- the stack ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """A PostgreSQL server of this module's own, so the tests can read auth's `usage` table."""
    server = EmbeddedPostgres(tmp_path_factory.mktemp("edge-pg") / "data", cleanup_mode="delete")
    dsn = asyncio.run(server.start())
    try:
        yield dsn
    finally:
        asyncio.run(server.stop())


@pytest.fixture(scope="module")
def stack(tmp_path_factory, database):
    with web_stack(tmp_path_factory.mktemp("web-edge"), DATABASE_URL=database,
                   INFERSWARM_WEB_CORS_ORIGINS=f"{ORIGIN}, {DEV_ORIGIN}",
                   INFERSWARM_TIER_FREE_TOKENS_PER_MONTH=str(MONTHLY_TOKENS)) as running:
        yield running


@pytest.fixture(scope="module")
def api_key(stack) -> str:
    return new_key(stack, "edge-eve")


@pytest.fixture(scope="module")
def client(stack, api_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=0)


async def usage_request_ids(database: str) -> set[str]:
    conn = await asyncpg.connect(with_database(database, "inferswarm_auth"))
    try:
        return {row["request_id"] for row in await conn.fetch("SELECT request_id FROM usage")}
    finally:
        await conn.close()


def counting_client(stack, api_key: str, max_retries: int) -> tuple[openai.OpenAI, list[str]]:
    """An SDK client that notes every HTTP request it sends (retries included)."""
    sent: list[str] = []
    http = openai.DefaultHttpxClient(event_hooks={"request": [lambda request: sent.append(str(request.url))]})
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=api_key, max_retries=max_retries,
                         http_client=http), sent


# -- OpenAI's error codes, through the SDK ----------------------------------------------------------------


@pytest.mark.stack
def test_a_bad_or_revoked_key_is_invalid_api_key(stack):
    bad = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="isk_" + "x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        bad.chat.completions.create(model=MODEL, messages=HELLO)
    assert (refused.value.code, refused.value.type) == ("invalid_api_key", "invalid_request_error")
    assert refused.value.response.headers["x-request-id"].startswith("req_")

    token, key = new_account(stack, "edge-rex")
    revoker = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    assert revoker.models.list().data
    key_id = _key_id(stack, token)
    httpx.delete(f"{stack.base_url}/api/auth/api-keys/{key_id}", headers={"Authorization": f"Bearer {token}"},
                 timeout=30).raise_for_status()

    def refused_now() -> openai.AuthenticationError | None:
        try:
            revoker.models.list()
        except openai.AuthenticationError as exc:
            return exc
        return None

    revoked = wait_until_sync(refused_now, 10, interval=0.05, message="the revoked key still works")
    assert revoked.code == "invalid_api_key" and revoked.status_code == 401


def _key_id(stack, token: str) -> int:
    keys = httpx.get(f"{stack.base_url}/api/auth/api-keys", headers={"Authorization": f"Bearer {token}"},
                     timeout=30).json()["keys"]
    return keys[0]["id"]


@pytest.mark.stack
async def test_no_key_at_all_is_a_401_with_a_null_code(stack):
    async with aiohttp.ClientSession() as http:
        reply = await http.get(f"{stack.base_url}/v1/models")
        assert reply.status == 401
        error = (await reply.json())["error"]
        assert error["code"] is None and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.stack
def test_unknown_model_and_bad_parameter(client):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert (unknown.value.code, unknown.value.type) == ("model_not_found", "invalid_request_error")
    with pytest.raises(openai.BadRequestError) as invalid:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=9)
    assert invalid.value.code is None and invalid.value.param == "temperature"


@pytest.mark.stack
def test_an_hourly_limit_is_rate_limit_exceeded(stack):
    limited = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=new_key(stack, "edge-rita"), max_retries=0)
    error = None
    for _ in range(105):  # the free tier admits 100 requests an hour
        try:
            limited.completions.create(model=MODEL, prompt="x", max_tokens=1)
        except openai.RateLimitError as exc:
            error = exc
            break
    assert error is not None, "never rate limited"
    assert (error.code, error.type) == ("rate_limit_exceeded", "requests")
    assert "x-should-retry" not in error.response.headers
    assert int(error.response.headers["retry-after"]) >= 1


@pytest.mark.stack
async def test_a_monthly_limit_is_insufficient_quota_and_not_retried(stack):
    key = new_key(stack, "edge-mona")
    sdk, sent = counting_client(stack, key, max_retries=2)
    with pytest.raises(openai.RateLimitError) as refused:
        await asyncio.to_thread(sdk.chat.completions.create, model=MODEL, messages=HELLO, max_tokens=4000)
    assert (refused.value.code, refused.value.type) == ("insufficient_quota", "insufficient_quota")
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(sent) == 1, sent  # the SDK would have retried a 429 twice without it

    # The REST API keeps its own body for the same refusal.
    async with aiohttp.ClientSession() as http:
        reply = await http.post(f"{stack.base_url}/api/inference", headers={"X-API-Key": key},
                                json={"model": MODEL, "prompt": "x", "max_tokens": 4000})
        assert reply.status == 429
        assert (await reply.json())["error"]["code"] == "RATE_LIMITED"


@pytest.mark.stack
async def test_a_money_budget_shows_in_headers_and_its_refusal_is_insufficient_quota(stack):
    """An admin prices the model; a key with a budget of 0.0005: the reply says what is left
    (x-inferswarm-budget-*), and once the worst case no longer fits the SDK gets a 429
    insufficient_quota naming the budget, not retried."""
    admin_token, _ = new_account(stack, "edge-prices")
    stack.grant_admin("edge-prices")
    post_json(f"{stack.base_url}/api/prices", {"model": MODEL, "input": "1", "output": "100"},
              {"Authorization": f"Bearer {admin_token}"})
    token, _ = new_account(stack, "edge-budget")
    key = post_json(f"{stack.base_url}/api/auth/api-keys", {"name": "capped", "limits": {"spend_per_month": "0.0005"}},
                    {"Authorization": f"Bearer {token}"})["api_key"]
    sdk, sent = counting_client(stack, key, max_retries=2)

    def charged() -> httpx.Headers | None:  # the gateways learn a price within a second
        raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=2)
        headers = raw.headers
        return headers if headers.get("x-inferswarm-budget-remaining", "0.0005") != "0.0005" else None

    headers = await asyncio.to_thread(wait_until_sync, charged, 10.0, interval=0.2)
    assert headers["x-inferswarm-budget-limit"] == "0.0005" and headers["x-inferswarm-budget-reset"]
    sent.clear()
    with pytest.raises(openai.RateLimitError) as refused:  # 100 tokens of output at 100 a million: 0.01
        await asyncio.to_thread(sdk.chat.completions.create, model=MODEL, messages=HELLO, max_tokens=100)
    assert (refused.value.code, refused.value.type) == ("insufficient_quota", "insufficient_quota")
    assert "spend_per_month budget of 0.0005" in refused.value.message, refused.value.message
    assert refused.value.response.headers["x-should-retry"] == "false" and len(sent) == 1


# -- /v1/models/{id} ---------------------------------------------------------------------------------------


@pytest.mark.stack
def test_retrieving_a_model(client):
    raw = client.models.with_raw_response.retrieve(MODEL)
    model = raw.parse()
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "inferswarm")
    assert raw.headers["x-request-id"].startswith("req_") and raw.headers["x-ratelimit-limit-requests"]
    # ids may hold `/` and `:` (the SDK sends `/` as %2F); an unknown one is model_not_found
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("org/some-model:7b")
    assert unknown.value.code == "model_not_found" and "org/some-model:7b" in unknown.value.message


# -- x-request-id ------------------------------------------------------------------------------------------


@pytest.mark.stack
async def test_x_request_id_is_the_usage_records_id(stack, client, database):
    raw = await asyncio.to_thread(client.chat.completions.with_raw_response.create,
                                  model=MODEL, messages=HELLO, max_tokens=2)
    request_id = raw.headers["x-request-id"]
    assert request_id.startswith("gw-")
    await wait_until(lambda: _recorded(database, request_id), 15, interval=0.1,
                     message="no usage row carries the reply's x-request-id")

    streamed = await asyncio.to_thread(client.chat.completions.with_raw_response.create,
                                       model=MODEL, messages=HELLO, max_tokens=2, stream=True)
    stream_id = streamed.headers["x-request-id"]
    assert [c for c in streamed.parse()]
    # A gateway that puts `request_id` on a stream's first chunk makes it the header's; an
    # older one tells it only at the end, after the headers left, so the header is our own.
    if stream_id.startswith("gw-"):
        await wait_until(lambda: _recorded(database, stream_id), 15, interval=0.1,
                         message="no usage row carries the stream's x-request-id")
    else:
        assert stream_id.startswith("req_") and stream_id != request_id


async def _recorded(database: str, request_id: str) -> bool:
    return request_id in await usage_request_ids(database)


@pytest.mark.stack
async def test_x_request_id_on_errors_and_the_client_id_echoed(stack, api_key):
    async with aiohttp.ClientSession() as http:
        seen = set()
        for path in ("/v1/nope", "/v1/models"):
            reply = await http.get(f"{stack.base_url}{path}", headers={"X-Client-Request-Id": "trace-42"})
            assert reply.headers["x-request-id"].startswith("req_")
            assert reply.headers["x-client-request-id"] == "trace-42"
            seen.add(reply.headers["x-request-id"])
        assert len(seen) == 2
        odd = await http.get(f"{stack.base_url}/v1/models", headers={"X-Client-Request-Id": "a b\tc",
                                                                    "Authorization": f"Bearer {api_key}"})
        assert odd.status == 200 and "x-client-request-id" not in odd.headers
        page = await http.get(f"{stack.base_url}/")
        assert "x-request-id" not in page.headers  # /v1 only


# -- 404 and 405 as JSON -----------------------------------------------------------------------------------


@pytest.mark.stack
async def test_unknown_urls_and_wrong_methods_are_openai_json(stack, api_key):
    auth = {"Authorization": f"Bearer {api_key}"}
    async with aiohttp.ClientSession() as http:
        reply = await http.post(f"{stack.base_url}/v1/chat/complete", headers=auth, json={})
        assert reply.status == 404 and reply.content_type == "application/json"
        error = (await reply.json())["error"]
        assert error["code"] == "unknown_url" and error["type"] == "invalid_request_error"
        assert error["message"].startswith("Unknown request URL: POST /v1/chat/complete.")

        reply = await http.get(f"{stack.base_url}/v1/chat/completions", headers=auth)
        assert reply.status == 405 and reply.content_type == "application/json"
        assert "POST" in reply.headers["Allow"]
        error = (await reply.json())["error"]
        assert error == {"message": "Invalid method for URL (GET /v1/chat/completions)",
                         "type": "invalid_request_error", "param": None, "code": None}

        rest = await http.get(f"{stack.base_url}/api/nope")  # the REST API keeps its own body
        assert rest.status == 404 and (await rest.json())["error"]["code"] == "NOT_FOUND"


# -- CORS --------------------------------------------------------------------------------------------------


@pytest.mark.stack
async def test_a_listed_origin_gets_a_preflight_and_readable_replies(stack, api_key):
    async with aiohttp.ClientSession() as http:
        preflight = await http.options(f"{stack.base_url}/v1/chat/completions", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, "
                                              "x-stainless-retry-count, openai-organization, x-forged"})
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert set(preflight.headers["Access-Control-Allow-Methods"].replace(" ", "").split(",")) >= {"GET", "POST"}
        allowed = {h.strip() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
        assert allowed == {"authorization", "content-type", "x-stainless-os", "x-stainless-retry-count",
                           "openai-organization"}
        assert int(preflight.headers["Access-Control-Max-Age"]) > 0
        assert "Access-Control-Allow-Credentials" not in preflight.headers

        for reply in (
            await http.post(f"{stack.base_url}/v1/chat/completions", json={
                "model": MODEL, "messages": HELLO, "max_tokens": 2, "stream": True},
                headers={"Origin": DEV_ORIGIN, "Authorization": f"Bearer {api_key}"}),
            await http.get(f"{stack.base_url}/v1/models", headers={"Origin": ORIGIN}),  # a 401
        ):
            await reply.read()
            assert reply.headers["Access-Control-Allow-Origin"] == reply.request_info.headers["Origin"]
            assert "Origin" in reply.headers["Vary"]
            exposed = reply.headers["Access-Control-Expose-Headers"]
            assert "x-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed
            assert "Access-Control-Allow-Credentials" not in reply.headers


@pytest.mark.stack
async def test_other_origins_and_other_routes_get_no_cors(stack, api_key):
    async with aiohttp.ClientSession() as http:
        preflight = await http.options(f"{stack.base_url}/v1/models", headers={
            "Origin": STRANGER, "Access-Control-Request-Method": "GET"})
        assert preflight.status == 403
        assert "Access-Control-Allow-Origin" not in preflight.headers
        reply = await http.get(f"{stack.base_url}/v1/models",
                               headers={"Origin": STRANGER, "Authorization": f"Bearer {api_key}"})
        assert reply.status == 200 and "Access-Control-Allow-Origin" not in reply.headers
        assert "Origin" in reply.headers["Vary"]
        for path in ("/", "/api/quota", "/login"):  # the dashboard and REST: never, even for a listed origin
            page = await http.get(f"{stack.base_url}{path}", headers={"Origin": ORIGIN})
            assert "Access-Control-Allow-Origin" not in page.headers, path
        preflight = await http.options(f"{stack.base_url}/api/quota", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
        assert "Access-Control-Allow-Origin" not in preflight.headers


# -- units: the error table, the CORS rules, the relay's request id ----------------------------------------


def body_of(exc) -> dict:
    return openai_error_body(exc)["error"]


@pytest.mark.unit
def test_openai_codes_of_the_error_table():
    assert body_of(Unauthenticated("API key revoked"))["code"] == "invalid_api_key"
    assert body_of(Unauthenticated("no key", {"reason": MISSING_CREDENTIAL}))["code"] is None
    assert body_of(NotFound("no worker serves model 'm'", {"model": "m"}))["code"] == "model_not_found"
    assert body_of(NotFound("Unknown request URL", {"reason": UNKNOWN_URL}))["code"] == "unknown_url"
    assert body_of(NotFound("no such key"))["code"] == "not_found"
    long = InvalidParams("too long", {"param": "messages", "reason": CONTEXT_LENGTH})
    assert body_of(long) == {"message": "too long", "type": "invalid_request_error", "param": "messages",
                             "code": "context_length_exceeded"}
    assert body_of(InvalidParams("bad", {"param": "top_p"}))["code"] is None
    assert body_of(DecodeError("not JSON"))["code"] is None
    assert body_of(Unavailable())["code"] == "unavailable" and body_of(Timeout())["code"] == "timeout"

    monthly = RateLimited("tokens_per_month limit of 10 reached", {"retry_after": 99, "counter": "tokens_per_month"})
    assert (body_of(monthly)["type"], body_of(monthly)["code"]) == ("insufficient_quota", "insufficient_quota")
    assert openai_error_headers(monthly) == {"Retry-After": "99", "x-should-retry": "false"}
    hourly = RateLimited("slow down", {"retry_after": 1.5, "counter": "requests_per_hour", "request_id": "gw-1"})
    assert (body_of(hourly)["type"], body_of(hourly)["code"]) == ("requests", "rate_limit_exceeded")
    assert openai_error_headers(hourly) == {"Retry-After": "2", "x-request-id": "gw-1"}

    wrong = MethodNotAllowed("Invalid method for URL (GET /v1/completions)", {"allow": ["POST"]})
    assert status_of(wrong) == 405 and openai_error_headers(wrong) == {"Allow": "POST"}
    assert body_of(wrong)["code"] is None


@pytest.mark.unit
def test_cors_origins_and_headers():
    assert parse_origins(" https://App.Example.com/ ,http://localhost:5173, https://x.org:443") == (
        "https://app.example.com", "http://localhost:5173", "https://x.org")
    for bad in ("ftp://x.org", "https://x.org/path", "x.org", "https://user@x.org"):
        with pytest.raises(ValueError):
            parse_origins(bad)
    listed = CorsPolicy(["https://a.example"])
    assert listed.allow_origin("https://a.example") == "https://a.example"
    assert listed.allow_origin("https://b.example") is None and listed.allow_origin(None) is None
    assert CorsPolicy(["*"]).allow_origin("https://b.example") == "*"
    assert not CorsPolicy([]).enabled
    assert allowed_request_headers("Authorization, X-Stainless-Lang,cookie, openai-beta, x-api-key") == \
        "authorization, x-stainless-lang, openai-beta"


class _Chunks:
    """The relay's view of a stream: an async iterator of chunks (what `shared.rpc.Stream` is)."""

    def __init__(self, chunks: list[dict]) -> None:
        self._chunks = iter(chunks)

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> dict:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None


@pytest.mark.unit
async def test_the_relay_keeps_the_request_id_of_the_first_chunk_that_has_it():
    early = Relay(None, _Chunks([{"text": "a", "request_id": "gw-early"}, {"text": "b"},  # type: ignore[arg-type]
                                 {"done": True, "finish_reason": "stop", "request_id": "gw-early"}]))
    pieces = early.texts()
    assert await anext(pieces) == "a" and early.headers()["x-request-id"] == "gw-early"
    late = Relay(None, _Chunks([{"text": "a"}, {"done": True, "request_id": "gw-late"}]))  # type: ignore[arg-type]
    assert await late.collect() == "a" and late.request_id == "gw-late"
    assert "x-request-id" not in Relay(None, _Chunks([])).headers()  # type: ignore[arg-type]
